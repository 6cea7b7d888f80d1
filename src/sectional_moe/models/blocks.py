"""Shared building blocks of every family: RMSNorm, RoPE, grouped-query attention, SwiGLU.

The sectional and token-MoE families are built from these same pieces, so the only difference
between two families is the difference that matters. Functional forms (``rms_norm``,
``apply_rope``, ``causal_attention``, ``swiglu``) are used both by the full-width modules here and
by the stacked per-section experts in :mod:`sectional_moe.models.sectional`.

Every attention also runs incrementally against a :class:`~sectional_moe.models.cache.KVCache`
(``cache=``): new positions are appended and attend to all cached ones. Without a cache (training)
the code path is the plain causal one.

Shape legend: B batch, T tokens, D d_model, H query heads, K kv heads, Dh head dim, n new positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sectional_moe.models.cache import KVCache
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

    def forward(self, T: int, head_dim: int, stride: int = 1, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for positions start*stride, (start+1)*stride, ... (T of them). A shortened sequence
        keeps the original position scale, so a relative distance means the same at every resolution.
        ``start`` > 0 when decoding: the index of the first new position at this resolution."""
        cos, sin = getattr(self, f"cos_{head_dim}"), getattr(self, f"sin_{head_dim}")
        if start and (start + T - 1) * stride >= cos.shape[0]:
            raise ValueError(f"position {(start + T - 1) * stride} is beyond the RoPE table of seq_len={cos.shape[0]} positions")
        return cos[start * stride : (start + T) * stride : stride], sin[start * stride : (start + T) * stride : stride]


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


def cached_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache
) -> torch.Tensor:
    """:func:`causal_attention` of n new positions that also attend to every cached position.

    q: (B, H, n, Dh); k, v: (B, K, n, Dh) of the new positions only; cos/sin (n, Dh/2) at their
    absolute positions. Rotated k and v are appended to ``cache``. Returns (B, H, n, Dh).
    """
    start = cache.length
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = cache.append(k, v)  # (B, K, start + n, Dh)
    n, gqa = q.shape[2], k.shape[1] != q.shape[1]
    if start == 0:  # the first chunk (prefill): plain causal attention, as in training
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    # SDPA's is_causal aligns the mask top-left; new query i sits at position start + i
    mask = None if n == 1 else torch.ones(n, start + n, dtype=torch.bool, device=q.device).tril(diagonal=start)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


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

    def forward(self, x: torch.Tensor, rope: Rope, stride: int = 1, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k, v = self.wkv(x).view(B, T, 2, self.n_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, K, T, Dh)
        if cache is None:
            y = causal_attention(q, k, v, *rope(T, self.head_dim, stride))
        else:  # T new positions after cache.length cached ones (at this block's resolution)
            y = cached_attention(q, k, v, *rope(T, self.head_dim, stride, start=cache.length), cache)
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
    ``rope_stride`` > 1 when the block runs on a sequence shortened by that factor. With a
    ``cache`` (from :meth:`new_cache`), x holds only the new positions (incremental decoding).
    """

    def __init__(self, spec: ModelSpec, ffn: nn.Module | None = None, rope_stride: int = 1):
        super().__init__()
        self.rope_stride = rope_stride
        self.attn_norm = RMSNorm(spec.d_model, spec.norm_eps)
        self.attn = Attention(spec)
        self.ffn_norm = RMSNorm(spec.d_model, spec.norm_eps)
        self.ffn = ffn if ffn is not None else SwiGLU(spec.d_model, spec.d_ff)

    def new_cache(self, max_len: int) -> KVCache:
        """A KV cache for up to ``max_len`` positions at this block's resolution."""
        return KVCache(max_len)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, rope: Rope, cache: KVCache | None = None) -> tuple[torch.Tensor, dict]:
        x = x + self.attn(self.attn_norm(x), rope, self.rope_stride, cache)
        h = self.ffn_norm(x)
        if isinstance(self.ffn, SwiGLU):
            return x + self.ffn(h), {}
        out, aux = self.ffn(h, ids)
        return x + out, aux
