"""Routers: which expert(s) each item goes to, with one interface for every strategy.

A router is an ``nn.Module`` with ``forward(x_Nd, ids) -> Routing``: ``x_Nd`` are the N routed
items (whole tokens in token MoE; token *slices*, section-major, in the sectional family) and
``ids`` (B, T) the token ids of their positions (item n of group g sits at position n mod B*T).
The token-MoE FFN and the sectional experts build theirs with :func:`build_router` from the
registry :data:`ROUTERS`, keyed by the names of :data:`~sectional_moe.models.spec.ROUTING_RULES`.

* :class:`TopKRouter` (``topk``): a linear router in fp32 (bf16 logits flip near-tied experts),
  softmax, top-k (renormalised for k > 1; k = 1 gates by the raw probability, Switch-style),
  load-balancing loss (1.0 = balanced) and z-loss, returned unscaled;
* :class:`HashRouter` (``hash``, Roller et al. 2021): a fixed seeded table (token id, group) ->
  expert, no parameters, no aux loss;
* :class:`FixedRouter` (``segment_fixed``): item group e -> expert e (dedicated: the experts run
  it as one batched GEMM).

Adding a strategy: a :class:`~sectional_moe.models.spec.RoutingRule` (torch-free facts for
validation and FLOP counting), a :class:`Router` subclass registered with :func:`register_router`,
and ``conf/routing/<name>.yaml`` (README, "Extending").

Shape legend (torchtitan style): N items, E experts, K experts per item, d item width, G groups.

Imports: torch, :mod:`sectional_moe.models.spec`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sectional_moe.models.spec import ROUTING_RULES, ModelSpec, RoutingRule


@dataclass
class Routing:
    """A router's decision for N items.

    ``expert_ids``/``weights`` (N, K) and ``counts`` (E,) are None for dedicated routing, where
    item group e goes to expert e and every expert gets N/E items.
    """

    expert_ids: torch.Tensor | None  # (N, K) int64
    weights: torch.Tensor | None  # (N, K), fp32 for a learned router, the activation dtype otherwise
    counts: torch.Tensor | None  # (E,) fp32: assignments per expert
    lb_loss: torch.Tensor | None = None  # unscaled load-balancing loss (1.0 = balanced)
    z_loss: torch.Tensor | None = None  # unscaled router z-loss
    dedicated: bool = False

    def layer_aux(self, drop_frac: torch.Tensor | None = None) -> "LayerAux | None":
        """What the routed layer reports (None for dedicated routing: balanced by construction)."""
        if self.dedicated or self.counts is None:
            return None
        return LayerAux(counts=self.counts.detach(), lb_loss=self.lb_loss, z_loss=self.z_loss, drop_frac=drop_frac)


@dataclass
class LayerAux:
    """What a routed layer reports per forward pass: expert load and its router's unscaled losses."""

    counts: torch.Tensor  # (E,) fp32 assignments per expert, detached
    lb_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    drop_frac: torch.Tensor | None = None  # share of assignments dropped by the capacity factor


# ------------------------------------------------------------------------------ pure functions
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


def load_stats(counts_E: torch.Tensor) -> dict[str, torch.Tensor]:
    """Balance statistics of one layer's expert counts (detached): max/mean, CV, dead experts."""
    c = counts_E.detach().float()
    mean = c.mean().clamp_min(1e-9)
    return {
        "max_over_mean": c.max() / mean,
        "cv": c.std(unbiased=False) / mean,
        "dead": (c == 0).sum().float(),
    }


# ------------------------------------------------------------------------------ router modules
class Router(nn.Module):
    """Base of every router: ``forward(x_Nd, ids) -> Routing``.

    Args:
        spec: the model spec (E, top_k, hash seed, vocabulary).
        layer: the decoder layer index (seeds per-layer tables).
        dim: the item width d (d_model in token MoE, the section width in the sectional family).
        groups: item groups G (1 in token MoE, E sections in the sectional family); items are group-major.
    """

    rule: RoutingRule  # set by register_router

    def __init__(self, spec: ModelSpec, layer: int, dim: int, groups: int):
        super().__init__()
        self.num_experts, self.groups = spec.n_experts, groups
        self.top_k = self.rule.experts_per_item(spec)

    def forward(self, x_Nd: torch.Tensor, ids: torch.Tensor) -> Routing:  # pragma: no cover - abstract
        raise NotImplementedError


ROUTERS: dict[str, type[Router]] = {}


def register_router(name: str) -> Callable[[type[Router]], type[Router]]:
    """Class decorator: the router module of the routing strategy ``name`` (its rule must exist)."""

    def add(cls: type[Router]) -> type[Router]:
        if name not in ROUTING_RULES:
            raise KeyError(f"no RoutingRule named {name!r}: register_routing(RoutingRule({name!r}, ...)) first")
        cls.rule = ROUTING_RULES[name]
        ROUTERS[name] = cls
        return cls

    return add


def build_router(spec: ModelSpec, layer: int, *, dim: int, groups: int) -> Router:
    """The router of ``spec.routing`` for one layer."""
    try:
        cls = ROUTERS[str(spec.routing)]
    except KeyError:
        raise KeyError(f"routing={spec.routing!r} has no router module; known: {sorted(ROUTERS)}") from None
    return cls(spec, layer, dim, groups)


@register_router("topk")
class TopKRouter(Router):
    """Learned top-k routing (see the module docstring); one router shared by all groups."""

    def __init__(self, spec: ModelSpec, layer: int, dim: int, groups: int):
        super().__init__(spec, layer, dim, groups)
        self.weight = nn.Parameter(torch.empty(self.num_experts, dim))  # as nn.Linear(dim, E).weight
        nn.init.normal_(self.weight, std=spec.init_std)

    def forward(self, x_Nd: torch.Tensor, ids: torch.Tensor) -> Routing:
        with torch.autocast(device_type=x_Nd.device.type, enabled=False):
            logits_NE = F.linear(x_Nd.float(), self.weight.float())
        weights_NK, ids_NK, probs_NE = route_topk(logits_NE, self.top_k)
        counts_E = expert_counts(ids_NK, self.num_experts)
        return Routing(ids_NK, weights_NK, counts_E,
                       lb_loss=load_balance_loss(probs_NE=probs_NE, counts_E=counts_E, top_k=self.top_k),
                       z_loss=router_z_loss(logits_NE))


@register_router("hash")
class HashRouter(Router):
    """(token id, group) -> expert from a fixed seeded table (one table per layer)."""

    def __init__(self, spec: ModelSpec, layer: int, dim: int, groups: int):
        super().__init__(spec, layer, dim, groups)
        # seed offset by layer, so that layers do not all share one partition
        self.register_buffer("table", hash_table(rows=spec.vocab_size, cols=groups, num_experts=self.num_experts,
                                                 seed=spec.hash_seed + layer))

    def forward(self, x_Nd: torch.Tensor, ids: torch.Tensor) -> Routing:
        ids_NK = self.table[ids.reshape(-1)].t().reshape(-1, 1)  # (G*B*T, 1), group-major like the items
        return Routing(ids_NK, torch.ones_like(ids_NK, dtype=x_Nd.dtype), expert_counts(ids_NK, self.num_experts))


@register_router("segment_fixed")
class FixedRouter(Router):
    """Item group e -> expert e (needs G = E groups); dedicated, so no per-item tensors."""

    def __init__(self, spec: ModelSpec, layer: int, dim: int, groups: int):
        super().__init__(spec, layer, dim, groups)
        if groups != self.num_experts:
            raise ValueError(f"segment_fixed routing needs one item group per expert, got {groups} groups for {self.num_experts} experts")

    def forward(self, x_Nd: torch.Tensor, ids: torch.Tensor) -> Routing:
        return Routing(None, None, None, dedicated=True)


def rename_legacy_table(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """Load-state-dict pre-hook: checkpoints written before routers were modules kept a hash
    table at ``<layer>.table``; it now lives at ``<layer>.router.table``."""
    old = prefix + "table"
    if old in state_dict:
        state_dict[prefix + "router.table"] = state_dict.pop(old)
