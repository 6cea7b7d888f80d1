"""Token-routed MoE FFN (the ``model=moe`` family): whole tokens go to experts.

The router (:mod:`sectional_moe.models.routers`: ``topk``, ``hash``, or any registered strategy)
decides, the stacked experts (:class:`~sectional_moe.models.experts.ExpertFFN`) compute; an
optional always-on shared expert is added. Dropless by default, with an optional capacity
factor served position-major (causal) in training only: capacity is shared by the items of a
batch, so evaluation (``model.eval()``) is dropless, and a sequence's loss never depends on the
other sequences of its evaluation batch or on the batch size.

Imports: torch, :mod:`sectional_moe.models` (blocks, experts, routers, spec).
"""

from __future__ import annotations

import torch
from torch import nn

from sectional_moe.models.blocks import SwiGLU
from sectional_moe.models.experts import ExpertFFN, causal_priority
from sectional_moe.models.routers import LayerAux, build_router, rename_legacy_table
from sectional_moe.models.spec import ModelSpec


class TokenMoEFFN(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        self.capacity_factor = spec.capacity_factor
        E, D, hidden = spec.n_experts, spec.d_model, spec.resolved_expert_d_ff
        self.experts = ExpertFFN(E, D, hidden)
        self.router = build_router(spec, layer, dim=D, groups=1)
        self.shared = SwiGLU(D, hidden) if spec.shared_expert else None
        self.register_load_state_dict_pre_hook(rename_legacy_table)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, LayerAux | None]:
        B, T, D = x.shape
        x_ND = x.reshape(B * T, D)
        routing = self.router(x_ND, ids)
        capacity = self.capacity_factor if self.training else None  # evaluation is dropless (see the module doc)
        priority = causal_priority(batch=B, seq=T) if capacity is not None else None
        y_ND, dropped = self.experts(x_ND, routing, capacity, priority)
        if self.shared is not None:
            y_ND = y_ND + self.shared(x_ND)
        return y_ND.view(B, T, D), routing.layer_aux(dropped)
