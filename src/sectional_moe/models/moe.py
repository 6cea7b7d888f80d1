"""Token-routed MoE FFN (the ``model=moe`` family): whole tokens go to experts.

``routing=topk``: a linear router (fp32) scores each token over E experts, top-k (renormalised for k > 1;
k = 1 gates by the expert's probability, Switch-style),
load-balancing loss (1.0 = balanced) and router z-loss, optional always-on shared expert,
dropless by default with an optional capacity factor.
``routing=hash`` (Roller et al. 2021): a fixed seeded token-id -> expert table, one expert per
token, no router parameters and no aux loss; expert load is still logged (it follows token
frequency).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sectional_moe.models.blocks import SwiGLU
from sectional_moe.models.routing import (
    ExpertFFN,
    causal_priority,
    expert_counts,
    hash_table,
    load_balance_loss,
    route_topk,
    router_z_loss,
)
from sectional_moe.spec import ModelSpec


class TokenMoEFFN(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        self.routing, self.top_k = spec.routing, spec.top_k if spec.routing == "topk" else 1
        self.capacity_factor = spec.capacity_factor
        E, D, hidden = spec.n_experts, spec.d_model, spec.resolved_expert_d_ff
        self.experts = ExpertFFN(E, D, hidden)
        if self.routing == "topk":
            self.router = nn.Linear(D, E, bias=False)
        else:
            # one table per layer (seed offset by layer) so layers do not all share one partition
            self.register_buffer("table", hash_table(rows=spec.vocab_size, cols=1, num_experts=E, seed=spec.hash_seed + layer))
        self.shared = SwiGLU(D, hidden) if spec.shared_expert else None

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        B, T, D = x.shape
        x_ND = x.reshape(B * T, D)
        aux: dict[str, torch.Tensor] = {}
        if self.routing == "topk":
            with torch.autocast(device_type=x.device.type, enabled=False):
                logits_NE = F.linear(x_ND.float(), self.router.weight.float())
            weights_NK, ids_NK, probs_NE = route_topk(logits_NE, self.top_k)
            counts_E = expert_counts(ids_NK, self.experts.num_experts)
            aux["lb_loss"] = load_balance_loss(probs_NE=probs_NE, counts_E=counts_E, top_k=self.top_k)
            aux["z_loss"] = router_z_loss(logits_NE)
        else:
            ids_NK = self.table[ids.reshape(-1)]  # (N, 1)
            weights_NK = torch.ones_like(ids_NK, dtype=x.dtype)
            counts_E = expert_counts(ids_NK, self.experts.num_experts)
        priority = causal_priority(batch=B, seq=T) if self.capacity_factor is not None else None
        y_ND, dropped = self.experts.forward_routed(x_ND, ids_NK, weights_NK, counts_E, self.capacity_factor, priority)
        if self.shared is not None:
            y_ND = y_ND + self.shared(x_ND)
        aux["counts"] = counts_E.detach()
        if self.capacity_factor is not None:
            aux["drop_frac"] = dropped
        return y_ND.view(B, T, D), aux
