"""Shared building blocks of every family: RMSNorm, RoPE, grouped-query attention, SwiGLU.

The sectional and token-MoE families are built from these same pieces, so the only difference
between two families is the difference that matters. Functional forms (``rms_norm``,
``apply_rope``, ``causal_attention``, ``swiglu``) are used both by the full-width modules here and
by the stacked per-section experts in :mod:`sectional_moe.models.sectional`.

Shape legend: B batch, T tokens, D d_model, H query heads, K kv heads, Dh head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sectional_moe.spec import ModelSpec


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in fp32 for stability under bf16 autocast."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Rope(nn.Module):
    """RoPE cos/sin tables, one row per absolute position, for each head width in use.

    Non-persistent buffers: rebuilt from the spec, never stored in checkpoints.
    """

    def __init__(self, head_dims: set[int], max_positions: int, theta: float = 10000.0):
        super().__init__()
        t = torch.arange(max_positions, dtype=torch.float32)
        for hd in sorted(head_dims):
            inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
            freqs = torch.outer(t, inv_freq)  # (P, hd/2)
            self.register_buffer(f"cos_{hd}", freqs.cos(), persistent=False)
            self.register_buffer(f"sin_{hd}", freqs.sin(), persistent=False)

    def forward(self, T: int, head_dim: int, stride: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for positions 0, stride, 2*stride, ... (T of them). A shortened sequence keeps the
        original position scale, so a relative distance means the same at every resolution."""
        cos, sin = getattr(self, f"cos_{head_dim}"), getattr(self, f"sin_{head_dim}")
        return cos[: T * stride : stride], sin[: T * stride : stride]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]); x is (B, H, T, Dh), cos/sin are (T, Dh/2)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, T, Dh/2) each
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """RoPE + causal SDPA with grouped-query attention.

    q: (B, H, T, Dh); k, v: (B, K, T, Dh) with H % K == 0. Returns (B, H, T, Dh).
    SDPA picks flash / memory-efficient kernels on GPU and the fused CPU kernel otherwise.
    """
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class Attention(nn.Module):
    """Full-width causal self-attention with GQA (LLaMA layout: separate q, k, v, o)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = spec.n_heads, spec.n_kv_heads, spec.head_dim
        D = spec.d_model
        self.wq = nn.Linear(D, spec.n_heads * spec.head_dim, bias=False)
        self.wkv = nn.Linear(D, 2 * spec.n_kv_heads * spec.head_dim, bias=False)
        self.wo = nn.Linear(spec.n_heads * spec.head_dim, D, bias=False)

    def forward(self, x: torch.Tensor, rope: Rope, stride: int = 1) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k, v = self.wkv(x).view(B, T, 2, self.n_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, K, T, Dh)
        y = causal_attention(q, k, v, *rope(T, self.head_dim, stride))
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN: w2(silu(w1 x) * w3 x), w1 and w3 fused into one matmul."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(swiglu(gate, up))


class TransformerBlock(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then + ffn(norm(x)).

    ``ffn`` defaults to a dense SwiGLU; the token-MoE family passes a routed FFN instead. Every
    block returns ``(x, aux)``: aux is a dict of router losses and load statistics ({} if dense).
    ``rope_stride`` > 1 when the block runs on a sequence shortened by that factor.
    """

    def __init__(self, spec: ModelSpec, ffn: nn.Module | None = None, rope_stride: int = 1):
        super().__init__()
        self.rope_stride = rope_stride
        self.attn_norm = RMSNorm(spec.d_model, spec.norm_eps)
        self.attn = Attention(spec)
        self.ffn_norm = RMSNorm(spec.d_model, spec.norm_eps)
        self.ffn = ffn if ffn is not None else SwiGLU(spec.d_model, spec.d_ff)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, dict]:
        x = x + self.attn(self.attn_norm(x), rope, self.rope_stride)
        h = self.ffn_norm(x)
        if isinstance(self.ffn, SwiGLU):
            return x + self.ffn(h), {}
        out, aux = self.ffn(h, ids)
        return x + out, aux
