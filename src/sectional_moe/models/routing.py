"""Routers, router losses and the vectorised expert FFN shared by the token-MoE and sectional families.

Shape legend (torchtitan style): N routed items (tokens, or token slices in the sectional family),
E experts, K experts per item, d item width, F expert hidden width.

Routers are small pure functions returning tensors; nothing is kept in globals. Router logits and
softmax always run in fp32 (bf16 logits flip near-tied experts). Losses are returned unscaled; the
LightningModule multiplies them by their coefficients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sectional_moe.models.blocks import swiglu


def route_topk(logits_NE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax (fp32) over E experts, keep the top k; for k > 1 renormalise the kept weights to sum to 1.

    With k = 1 the gate is the raw top probability (Switch Transformer): renormalising a single
    weight would make it exactly 1, and the router would get no gradient from the LM loss.
    Returns (weights_NK fp32, expert_ids_NK int64, probs_NE fp32).
    """
    probs_NE = torch.softmax(logits_NE.float(), dim=-1)
    top_NK, ids_NK = probs_NE.topk(k, dim=-1)
    weights_NK = top_NK / top_NK.sum(dim=-1, keepdim=True) if k > 1 else top_NK
    return weights_NK, ids_NK, probs_NE


def causal_priority(*, batch: int, seq: int, groups: int = 1, group_major: bool = False) -> torch.Tensor:
    """Capacity priority of routed items, position-major: lower is served first.

    Items are ``(batch, seq)`` flattened row-major, with ``groups`` (sections) as an outer
    (``group_major``: sectional slices are section-major) or no extra axis. An item at position t
    ranks after every item at positions < t of every sequence, so whether it is dropped never
    depends on a later token: capacity stays causal. Returns int64 of length groups*batch*seq.
    """
    t = torch.arange(seq).view(1, 1, seq)
    b = torch.arange(batch).view(1, batch, 1)
    g = torch.arange(groups).view(groups, 1, 1)
    prio = (t * batch + b) * groups + g  # (G, B, T)
    return (prio if group_major else prio.permute(1, 2, 0)).reshape(-1)


def expert_counts(ids_NK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Number of (item, slot) assignments per expert, shape (E,), fp32, static-shaped (no bincount)."""
    flat = ids_NK.reshape(-1)
    return torch.zeros(num_experts, device=flat.device, dtype=torch.float32).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.float32)
    )


def load_balance_loss(*, probs_NE: torch.Tensor, counts_E: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch-style balance loss ``E * sum_e f_e * P_e``, normalised so perfect balance gives 1.0.

    f_e is the fraction of the N*K assignments that went to expert e (no gradient), P_e the mean
    router probability of e (carries the gradient). Uniform routing: f_e = P_e = 1/E -> 1.0.
    """
    num_experts = probs_NE.shape[-1]
    n_assign = probs_NE.shape[0] * top_k
    f_E = counts_E.detach() / n_assign
    P_E = probs_NE.mean(dim=0)
    return num_experts * torch.dot(f_E, P_E)


def router_z_loss(logits_NE: torch.Tensor) -> torch.Tensor:
    """Mean squared log-partition of the router logits (ST-MoE); keeps logits small."""
    return torch.logsumexp(logits_NE.float(), dim=-1).pow(2).mean()


def hash_table(*, rows: int, cols: int, num_experts: int, seed: int) -> torch.Tensor:
    """A fixed random (rows, cols) table of expert ids drawn from a dedicated generator.

    The global RNG is never touched, so the table is identical in every process and on every
    device for the same seed, and it is saved with the model as a buffer.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randint(num_experts, (rows, cols), generator=gen, dtype=torch.int64)


class ExpertFFN(nn.Module):
    """E SwiGLU experts with stacked weights: w13 (E, d, 2F), w2 (E, F, d).

    Two vectorised paths, no Python loop over experts:
      * ``forward_dedicated``: item group e always goes to expert e (one batched GEMM per projection);
      * ``forward_routed``: items routed to K experts each, dispatched by sort + gather + grouped GEMM
        (dropless; an optional capacity zeroes the contribution of over-capacity assignments).
    """

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.w13 = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        nn.init.normal_(self.w13, std=0.02)
        nn.init.normal_(self.w2, std=0.02)

    def forward_dedicated(self, x_END: torch.Tensor) -> torch.Tensor:
        """x (E, N, d) -> (E, N, d); slice e of every item through expert e."""
        gate, up = torch.bmm(x_END, self.w13).chunk(2, dim=-1)  # (E, N, F) each
        return torch.bmm(swiglu(gate, up), self.w2)

    def forward_routed(
        self,
        x_Nd: torch.Tensor,
        ids_NK: torch.Tensor,
        weights_NK: torch.Tensor,
        counts_E: torch.Tensor,
        capacity_factor: float | None = None,
        priority_N: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted sum over each item's K experts. Returns (y (N, d), dropped fraction (scalar)).

        With a capacity, each expert keeps its first ``capacity`` assignments in ``priority_N``
        order (lower first; default: item order), e.g. :func:`causal_priority`.
        """
        N, K = ids_NK.shape
        flat_ids = ids_NK.reshape(-1)  # (N*K,)
        if capacity_factor is not None and priority_N is not None:
            by_priority = priority_N.to(flat_ids.device).repeat_interleave(K).argsort(stable=True)
            order = by_priority[flat_ids[by_priority].argsort(stable=True)]  # by expert, then priority
        else:
            order = flat_ids.argsort(stable=True)  # assignments grouped by expert
        item_of = order // K  # source item of each sorted assignment
        ends_E = counts_E.cumsum(0)
        offs = ends_E.to(torch.int32)
        x_sorted = x_Nd[item_of]  # (N*K, d)
        gate, up = _grouped_mm(x_sorted, self.w13, offs).chunk(2, dim=-1)
        y_sorted = _grouped_mm(swiglu(gate, up), self.w2, offs)  # (N*K, d)
        w_sorted = weights_NK.reshape(-1)[order].to(y_sorted.dtype)
        dropped = torch.zeros((), device=x_Nd.device)
        if capacity_factor is not None:
            capacity = math.ceil(capacity_factor * N * K / self.num_experts)
            sorted_ids = flat_ids[order]
            start_E = ends_E - counts_E
            rank = torch.arange(N * K, device=x_Nd.device) - start_E[sorted_ids].long()
            keep = rank < capacity
            w_sorted = w_sorted * keep.to(w_sorted.dtype)
            dropped = 1.0 - keep.float().mean()
        y_sorted = y_sorted * w_sorted.unsqueeze(-1)
        y = torch.zeros_like(x_Nd).index_add_(0, item_of, y_sorted.to(x_Nd.dtype))
        return y, dropped.detach()


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Grouped GEMM rows x[offs[e-1]:offs[e]] @ w[e]: x (M, K), w (G, K, N), offs (G,) int32 -> (M, N).

    Under autocast both sides are cast to the autocast dtype explicitly (the op is not on every
    backend's autocast list, and it wants one dtype on both sides), so bf16-mixed training runs
    the experts in bf16 on GPU. Under ``torch.compile`` a non-bf16 call goes through the opaque
    :func:`grouped_mm_op`: the fake (meta) kernel of ``aten._grouped_mm`` accepts only bf16, so
    an fp32 call would otherwise break the graph; a bf16 call stays on aten (Inductor lowers it).
    """
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dtype), w.to(dtype)
    elif x.dtype != w.dtype:
        w = w.to(x.dtype)
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return grouped_mm_op(x, w, offs)
    return F.grouped_mm(x, w, offs=offs)


# --- grouped GEMM as an opaque custom op (torch.compile, non-bf16) --------------------------------
# Same maths as aten._grouped_mm, but with our own shape-only fake kernels, so Dynamo/AOTAutograd
# trace it at fp32 without running aten's bf16-only meta check. Eager code never calls these
# (FlopCounterMode and the loop references see plain aten ops).


@torch.library.custom_op("sectional_moe::grouped_mm", mutates_args=(), schema="(Tensor x, Tensor w, Tensor offs) -> Tensor")
def grouped_mm_op(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x (M, K) grouped along M by offs, w (G, K, N) -> (M, N)."""
    return torch._grouped_mm(x, w, offs=offs)


@grouped_mm_op.register_fake
def _(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("sectional_moe::grouped_mm_wgrad", mutates_args=(), schema="(Tensor x, Tensor dy, Tensor offs) -> Tensor")
def grouped_mm_wgrad_op(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Weight gradient of :func:`grouped_mm_op`: per group g, x_g^T @ dy_g. x (M, K), dy (M, N) -> (G, K, N)."""
    return torch._grouped_mm(x.t(), dy, offs=offs)


@grouped_mm_wgrad_op.register_fake
def _(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(offs.shape[0], x.shape[1], dy.shape[1])


def _grouped_mm_setup(ctx, inputs, output) -> None:
    x, w, offs = inputs
    ctx.save_for_backward(x, w, offs)


def _grouped_mm_backward(ctx, grad_out: torch.Tensor):
    x, w, offs = ctx.saved_tensors
    grad_out = grad_out.contiguous()  # the CPU/CUDA kernels want 16-byte-aligned row strides
    dx = grouped_mm_op(grad_out, w.transpose(-2, -1), offs) if ctx.needs_input_grad[0] else None
    dw = grouped_mm_wgrad_op(x, grad_out, offs) if ctx.needs_input_grad[1] else None
    return dx, dw, None


grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def load_stats(counts_E: torch.Tensor) -> dict[str, torch.Tensor]:
    """Balance statistics of one layer's expert counts (detached): max/mean, CV, dead experts."""
    c = counts_E.detach().float()
    mean = c.mean().clamp_min(1e-9)
    return {
        "max_over_mean": c.max() / mean,
        "cv": c.std(unbiased=False) / mean,
        "dead": (c == 0).sum().float(),
    }
