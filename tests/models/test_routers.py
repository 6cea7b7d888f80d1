"""Routers as modules: one interface for every strategy, and a new strategy is one class plus a rule.

The random router below exists only in this test. It is the worked example of README's
"Extending" section: a rule, a registered class, and then both families build it, count its
FLOPs and train with it, with no other file touched.
"""

from __future__ import annotations

import pytest
import torch

from sectional_moe.bench.probes import measure_flops
from sectional_moe.models import build_model
from sectional_moe.models.flops import attention_recompute_flops, flops_per_token
from sectional_moe.models.loss import lm_loss
from sectional_moe.models.routers import ROUTERS, FixedRouter, HashRouter, Router, Routing, TopKRouter, expert_counts, register_router
from sectional_moe.models.spec import ROUTING_RULES, ModelSpec, RoutingRule, register_routing, routings_for
from tests.models.cases import tiny_spec


class RandomRouter(Router):
    """Each item to one uniformly random expert (a baseline no one should ship)."""

    def __init__(self, spec: ModelSpec, layer: int, dim: int, groups: int):
        super().__init__(spec, layer, dim, groups)
        self.generator = torch.Generator().manual_seed(spec.hash_seed + layer)

    def forward(self, x_Nd: torch.Tensor, ids: torch.Tensor) -> Routing:
        expert_ids = torch.randint(self.num_experts, (x_Nd.shape[0], 1), generator=self.generator).to(x_Nd.device)
        return Routing(expert_ids, torch.ones_like(expert_ids, dtype=x_Nd.dtype), expert_counts(expert_ids, self.num_experts))


@pytest.fixture
def random_routing():
    """Register the random strategy for one test, then remove it again."""
    register_routing(RoutingRule("random", ("moe", "sectional"), note="each item to a random expert"))
    register_router("random")(RandomRouter)
    yield
    ROUTING_RULES.pop("random")
    ROUTERS.pop("random")


def test_every_routing_rule_has_its_router_module_and_the_families_agree():
    assert set(ROUTERS) == set(ROUTING_RULES)
    assert ROUTERS["topk"] is TopKRouter and ROUTERS["hash"] is HashRouter and ROUTERS["segment_fixed"] is FixedRouter
    assert routings_for("moe") == ("topk", "hash")
    assert routings_for("sectional") == ("topk", "hash", "segment_fixed")
    assert routings_for("dense") == (None,)


@pytest.mark.parametrize("family,routing", [("moe", "topk"), ("moe", "hash"), ("sectional", "topk"),
                                            ("sectional", "hash"), ("sectional", "segment_fixed")])
def test_token_moe_and_sectional_experts_share_the_router_interface(family, routing):
    spec = tiny_spec(family, routing)
    model = build_model(spec)
    owners = [b.ffn if family == "moe" else b.experts for b in model.blocks if hasattr(b, "experts") or family == "moe"]
    routers = [o.router for o in owners]
    assert routers and all(type(r) is ROUTERS[routing] for r in routers)
    groups = 1 if family == "moe" else spec.n_experts
    dim = spec.d_model if family == "moe" else spec.section_dim
    ids = torch.randint(0, spec.vocab_size, (2, 8))
    routing_out = routers[0](torch.randn(groups * 16, dim), ids)
    assert isinstance(routing_out, Routing)
    if routing_out.dedicated:
        assert routing_out.expert_ids is None and routing_out.layer_aux() is None
    else:
        assert routing_out.expert_ids.shape == (groups * 16, spec.experts_per_item)
        assert routing_out.counts.sum() == groups * 16 * spec.experts_per_item
        aux = routing_out.layer_aux()
        assert (aux.lb_loss is not None) == (routing == "topk") and aux.counts.shape == (spec.n_experts,)


def test_unknown_routing_names_the_choices():
    from sectional_moe.errors import ConfigError

    with pytest.raises(ConfigError, match="use one of topk, hash"):
        tiny_spec("moe", "random")


@pytest.mark.parametrize("family", ["moe", "sectional"])
def test_a_new_strategy_is_one_class_and_one_rule(random_routing, family):
    torch.manual_seed(0)
    spec = tiny_spec(family, "random")
    model = build_model(spec)
    # FLOPs: the rule says one expert per item and no router matmul; the counter agrees exactly
    ids = torch.randint(0, spec.vocab_size, (3, spec.seq_len))
    tokens = ids.numel()
    measured = measure_flops(model, ids, training=True)
    assert measured == pytest.approx((flops_per_token(spec) + attention_recompute_flops(spec)) * tokens, rel=1e-9)
    # it trains through the shared loss, and every routed layer reports its expert load
    batch = torch.randint(0, spec.vocab_size, (2, spec.seq_len + 1))
    out = lm_loss(model, batch)
    out.loss.backward()
    routed = [a for a in out.aux if a is not None]
    assert routed and all(a.counts.sum() > 0 and a.lb_loss is None for a in routed)
    assert out.lb_loss is None and torch.isfinite(out.loss)
