"""The vectorised expert FFN shared by the token-MoE and sectional families.

E SwiGLU experts with stacked weights, run without a Python loop over experts. What goes where
comes from a :class:`~sectional_moe.models.routers.Routing`:

* dedicated routing (``segment_fixed``): item group e always goes to expert e, one batched GEMM
  per projection (``bmm`` over the expert axis);
* routed items (``topk``, ``hash``, ...): each item goes to K experts, dispatched by sort + gather
  + grouped GEMM, dropless; an optional capacity factor zeroes the contribution of assignments
  beyond each expert's capacity, served in :func:`causal_priority` order so it stays causal.

Shape legend: N routed items, E experts, K experts per item, d item width, F expert hidden width.

Imports: torch, :mod:`sectional_moe.models.blocks`, :mod:`sectional_moe.models.kernels`,
:mod:`sectional_moe.models.routers`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sectional_moe.models.blocks import swiglu_fused
from sectional_moe.models.kernels import grouped_mm
from sectional_moe.models.routers import Routing


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


class ExpertFFN(nn.Module):
    """E SwiGLU experts with stacked weights: w13 (E, d, 2F), w2 (E, F, d) (see the module docstring)."""

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.w13 = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        nn.init.normal_(self.w13, std=0.02)
        nn.init.normal_(self.w2, std=0.02)

    def forward(self, x_Nd: torch.Tensor, routing: Routing, capacity_factor: float | None = None,
                priority_N: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Items through their experts as ``routing`` says. Returns (y (N, d), dropped fraction or None).

        Dedicated routing needs the items group-major, E equal groups (the sectional layout).
        """
        if routing.dedicated:
            E = self.num_experts
            y = self.forward_dedicated(x_Nd.view(E, -1, x_Nd.shape[-1]))  # (E, N/E, d)
            return y.reshape(x_Nd.shape), None
        assert routing.expert_ids is not None and routing.weights is not None and routing.counts is not None
        y, dropped = self.forward_routed(x_Nd, routing.expert_ids, routing.weights, routing.counts,
                                         capacity_factor, priority_N)
        return y, dropped if capacity_factor is not None else None

    def forward_dedicated(self, x_END: torch.Tensor) -> torch.Tensor:
        """x (E, N, d) -> (E, N, d); slice e of every item through expert e."""
        return torch.bmm(swiglu_fused(torch.bmm(x_END, self.w13)), self.w2)  # (E, N, 2F) -> (E, N, F) -> (E, N, d)

    #: inference with fewer assignments than experts goes through :meth:`_forward_few` (off: always
    #: the grouped GEMM; the benchmark of decoding compares both)
    few_token_path = True

    def _forward_few(self, x_Nd: torch.Tensor, flat_ids: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
        """Inference with fewer assignments than experts (decoding: one token a step): each
        assignment through its own expert's weights, views, no copies, instead of sorting and a
        grouped GEMM that visits every expert (on CPU the per-step op count is decoding's cost)."""
        N, K = weights_NK.shape
        y = torch.zeros_like(x_Nd)
        w = weights_NK.reshape(-1)
        for a, e in enumerate(flat_ids.tolist()):  # host ids: free on CPU, one sync on GPU
            x = x_Nd[a // K : a // K + 1]  # (1, d)
            h = swiglu_fused(x @ self.w13[e]) @ self.w2[e]  # (1, d)
            y[a // K : a // K + 1] += (h * w[a].to(h.dtype)).to(y.dtype)
        return y

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
        if (self.few_token_path and capacity_factor is None and N * K <= self.num_experts and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):
            return self._forward_few(x_Nd, flat_ids, weights_NK), torch.zeros((), device=x_Nd.device)
        if capacity_factor is not None and priority_N is not None:
            by_priority = priority_N.to(flat_ids.device).repeat_interleave(K).argsort(stable=True)
            order = by_priority[flat_ids[by_priority].argsort(stable=True)]  # by expert, then priority
        else:
            order = flat_ids.argsort(stable=True)  # assignments grouped by expert
        item_of = order // K  # source item of each sorted assignment
        ends_E = counts_E.cumsum(0)
        offs = ends_E.to(torch.int32)
        x_sorted = x_Nd.index_select(0, item_of)  # (N*K, d); its backward is index_add_, not an accumulating index_put_ (10x on CPU)
        y_sorted = grouped_mm(swiglu_fused(grouped_mm(x_sorted, self.w13, offs)), self.w2, offs)  # (N*K, d)
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
