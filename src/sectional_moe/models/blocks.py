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
from sectional_moe.models.routers import LayerAux
from sectional_moe.models.spec import ModelSpec


def _rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as plain ops (at least fp32): what :class:`_RMSNormFn` computes, and what
    ``torch.compile`` sees (Inductor fuses these ops into one kernel by itself)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.to(xf.dtype)).to(x.dtype)


def _rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm of x in x's dtype, the fp32 reciprocal RMS (..., 1)): statistics in at least fp32."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 statistics under bf16 autocast
    ms = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(xf.shape[-1])
    rstd = ms.add_(eps).rsqrt_()  # (..., 1)
    return (xf * rstd).mul_(weight.to(xf.dtype)).to(x.dtype), rstd


class _RMSNormFn(torch.autograd.Function):
    """Eager RMSNorm with a hand-written backward: half the elementwise passes of the autograd
    graph of the plain ops (on CPU these passes, not the matmuls, made our model slower than a
    LayerNorm GPT-2). ``weight`` broadcasts against x: (D,) or the per-section (E, 1, S)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, rstd = _rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        xf = x.to(rstd.dtype)
        g = grad.to(rstd.dtype)
        xhat = xf * rstd
        dweight = (g * xhat).sum_to_size(weight.shape).to(weight.dtype) if ctx.needs_input_grad[1] else None
        dx = None
        if ctx.needs_input_grad[0]:
            gw = g * weight.to(rstd.dtype)
            dot = torch.linalg.vecdot(gw, xhat, dim=-1).unsqueeze(-1).div_(xf.shape[-1])  # mean(gw * xhat)
            dx = torch.addcmul(gw, xhat, dot, value=-1).mul_(rstd).to(x.dtype)
        return dx, dweight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in fp32 for stability under bf16 autocast (output in x's dtype)."""
    if torch.compiler.is_compiling():
        return _rms_norm_reference(x, weight, eps)
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        # inference (decoding: one row per call, so op count is the cost): one op where dtypes allow
        if x.dtype == weight.dtype == torch.float32 and weight.dim() == 1:
            return F.rms_norm(x, (x.shape[-1],), weight, eps)
        return _rms_norm_forward(x, weight, eps)[0]
    return _RMSNormFn.apply(x, weight, eps)


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


def _apply_rope_real(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rope` in real arithmetic: what ``torch.compile`` traces (Inductor generates no complex code)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, T, Dh/2) each
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) in fp32; x is (B, H, T, Dh), cos/sin are (T, Dh/2).

    Eager: one complex multiply by cos + i sin (bit-identical to the real form, and ~8x faster on
    CPU with its backward: one kernel each way instead of six muls, two adds and a cat).
    """
    if torch.compiler.is_compiling():
        return _apply_rope_real(x, cos, sin)
    xf = x.float()
    if xf.stride(-1) != 1 or xf.storage_offset() % 2 or any(st % 2 for st in xf.stride()[:-1]):
        xf = xf.contiguous()  # view_as_complex needs (re, im) pairs at even offsets
    z = torch.view_as_complex(xf.unflatten(-1, (-1, 2))) * torch.complex(cos.float(), sin.float())
    return torch.view_as_real(z).flatten(-2).to(x.dtype)


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


class _SwiGLUFn(torch.autograd.Function):
    """silu(gate) * up of one fused (..., 2F) projection, whose backward writes both halves of the
    input gradient into one buffer: autograd of ``chunk`` + two muls concatenates them instead, a
    full extra pass over the widest activation of the model."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(gate_up, act)
        return act * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        gate_up, act = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        out = torch.empty_like(gate_up)
        d_gate, d_up = out.chunk(2, dim=-1)
        torch.mul(grad, act, out=d_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=d_gate)
        return out


def swiglu_fused(gate_up: torch.Tensor) -> torch.Tensor:
    """:func:`swiglu` of the two halves (gate, up) of the last dim of ``gate_up`` (..., 2F) -> (..., F)."""
    if torch.compiler.is_compiling() or not (torch.is_grad_enabled() and gate_up.requires_grad):
        return swiglu(*gate_up.chunk(2, dim=-1))
    return _SwiGLUFn.apply(gate_up)


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
        return self.w2(swiglu_fused(self.w13(x)))


class TransformerBlock(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then + ffn(norm(x)).

    ``ffn`` defaults to a dense SwiGLU; the token-MoE family passes a routed FFN instead. Every
    block returns ``(x, aux)``: aux is the routed FFN's :class:`~sectional_moe.models.routers.LayerAux` (None if dense).
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

    def forward(self, x: torch.Tensor, ids: torch.Tensor, rope: Rope, cache: KVCache | None = None) -> tuple[torch.Tensor, LayerAux | None]:
        x = x + self.attn(self.attn_norm(x), rope, self.rope_stride, cache)
        h = self.ffn_norm(x)
        if isinstance(self.ffn, SwiGLU):
            return x + self.ffn(h), None
        out, aux = self.ffn(h, ids)
        return x + out, aux
