"""Loop-over-experts reference implementations, used only to test the vectorised expert paths."""

from __future__ import annotations

import torch

from sectional_moe.models.blocks import causal_attention, swiglu


def expert_ffn(w13: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    gate, up = (x @ w13).chunk(2, dim=-1)
    return swiglu(gate, up) @ w2


def dedicated_ffn(ffn, x_END: torch.Tensor) -> torch.Tensor:
    """Expert e applied to group e, one expert at a time."""
    return torch.stack([expert_ffn(ffn.w13[e], ffn.w2[e], x_END[e]) for e in range(ffn.num_experts)])


def routed_ffn(ffn, x_Nd: torch.Tensor, ids_NK: torch.Tensor, weights_NK: torch.Tensor, capacity: int | None = None,
               priority_N: torch.Tensor | None = None) -> torch.Tensor:
    """y[n] = sum_k w[n,k] * expert_{ids[n,k]}(x[n]); with a capacity, the first `capacity`
    assignments to each expert in (priority, item, slot) order are kept (priority: item order)."""
    y = torch.zeros_like(x_Nd)
    N, K = ids_NK.shape
    prio = torch.arange(N) if priority_N is None else priority_N
    for e in range(ffn.num_experts):
        n_idx, k_idx = (ids_NK == e).nonzero(as_tuple=True)
        if capacity is not None:
            order = torch.argsort((prio[n_idx] * N + n_idx) * K + k_idx)
            n_idx, k_idx = n_idx[order][:capacity], k_idx[order][:capacity]
        if len(n_idx):
            out = expert_ffn(ffn.w13[e], ffn.w2[e], x_Nd[n_idx])
            y.index_add_(0, n_idx, out * weights_NK[n_idx, k_idx].unsqueeze(-1))
    return y


def section_attention(attn, x_ENS: torch.Tensor, B: int, T: int, rope, stride: int) -> torch.Tensor:
    """E separate small attentions, expert e on section e."""
    outs = []
    h, k, c = attn.h, attn.k, attn.c
    cos, sin = rope(T, c, stride)
    for e in range(x_ENS.shape[0]):
        xe = x_ENS[e].view(B, T, -1)
        q = (xe @ attn.wq[e]).view(B, T, h, c).transpose(1, 2)
        kv = (xe @ attn.wkv[e]).view(B, T, 2, k, c)
        kk, vv = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        y = causal_attention(q, kk, vv, cos, sin).transpose(1, 2).reshape(B * T, h * c)
        outs.append(y @ attn.wo[e])
    return torch.stack(outs)
