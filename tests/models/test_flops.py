"""Analytic FLOPs and parameter counts against a real CPU forward/backward."""

from __future__ import annotations

import pytest
import torch

from sectional_moe.bench.probes import measure_flops
from sectional_moe.models.flops import attention_recompute_flops, flops_breakdown, flops_per_token, param_counts, wan_triad
from sectional_moe.models import build_model
from tests.models.cases import all_cases, tiny_spec


@pytest.mark.parametrize("family,routing,kw", list(all_cases()))
def test_analytic_parameter_count_equals_the_model(family, routing, kw):
    spec = tiny_spec(family, routing, **kw)
    assert param_counts(spec)["total"] == build_model(spec).num_parameters()


def assert_flops_match_the_counter(spec) -> None:
    B = 3
    ids = torch.randint(0, spec.vocab_size, (B, spec.seq_len))
    measured = measure_flops(build_model(spec), ids, training=True)
    tokens = B * spec.seq_len
    model_flops = flops_per_token(spec, training=True) * tokens
    # the flash attention backward recomputes QK^T: executed, but not model FLOPs (PaLM convention)
    recompute = attention_recompute_flops(spec) * tokens
    # exact: every item makes K assignments whatever the router picks, and with a capacity the
    # dropped assignments are computed and then zeroed
    assert measured == pytest.approx(model_flops + recompute, rel=1e-9)
    assert measured - recompute == pytest.approx(model_flops, rel=0.02)


@pytest.mark.parametrize("family,routing,kw", list(all_cases()))
def test_analytic_training_flops_match_flop_counter(family, routing, kw):
    torch.manual_seed(0)
    assert_flops_match_the_counter(tiny_spec(family, routing, **kw))


@pytest.mark.parametrize("family,kw", [
    pytest.param("moe", dict(shared_expert=True), id="moe-shared_expert"),
    pytest.param("moe", dict(shared_expert=True, top_k=3), id="moe-shared_expert-k3"),
    pytest.param("moe", dict(capacity_factor=0.5), id="moe-capacity0.5"),  # drops ~half: still computed, still counted
    pytest.param("moe", dict(capacity_factor=1.25, top_k=3), id="moe-capacity1.25-k3"),
    pytest.param("moe", dict(top_k=1), id="moe-k1"),
    pytest.param("moe", dict(top_k=3), id="moe-k3"),
    pytest.param("sectional", dict(top_k=1), id="sectional-k1"),
    pytest.param("sectional", dict(top_k=2), id="sectional-k2"),
    pytest.param("sectional", dict(top_k=1, seq_reduction=2, capacity_factor=0.5), id="sectional-k1-capacity"),
])
def test_routed_variants_flops_match_flop_counter(family, kw):
    """top-k routing variants: K expert FFNs per item, the shared expert, and capacity dropping
    (which zeroes the dropped rows' contribution after computing them)."""
    torch.manual_seed(0)
    assert_flops_match_the_counter(tiny_spec(family, "topk", **kw))


def test_untied_head_counts_twice_and_embedding_lookup_is_free():
    tied = tiny_spec("dense", None)
    untied = tiny_spec("dense", None, tie_embeddings=False)
    V, D = tied.vocab_size, tied.d_model
    assert param_counts(untied)["total"] - param_counts(tied)["total"] == V * D
    assert flops_breakdown(tied)["lm_head"] == 2 * V * D == flops_breakdown(untied)["lm_head"]


def test_sequence_reduction_divides_the_sectional_layer_cost():
    r1 = tiny_spec("sectional", "segment_fixed", seq_reduction=1, n_layers=1)
    r4 = tiny_spec("sectional", "segment_fixed", seq_reduction=4, n_layers=1)
    b1, b4 = flops_breakdown(r1), flops_breakdown(r4)
    for key in ("qkv", "attn_out", "ffn"):
        assert b4[key] == pytest.approx(b1[key] / 4)
    assert b4["attn_scores"] == pytest.approx(b1["attn_scores"] / 16)  # (T/r)^2 / r per token


def test_moe_active_parameters_count_k_of_e_experts():
    spec = tiny_spec("moe", "topk", experts=8, top_k=2, n_layers=1)
    dense = tiny_spec("dense", None, n_layers=1)
    expert = 3 * spec.d_model * spec.resolved_expert_d_ff
    p, pd = param_counts(spec), param_counts(dense)
    assert p["active"] == pytest.approx(pd["active"] - expert + 2 * expert + spec.d_model * 8)
    assert p["non_embedding"] - pd["non_embedding"] == 7 * expert + spec.d_model * 8
    triad = wan_triad(spec)
    assert triad["M"] == pytest.approx(6 * triad["N_a"] + 3 * (flops_breakdown(spec)["attn_scores"] + flops_breakdown(spec)["lm_head"]))


def test_active_parameters_are_what_a_token_reads_and_flop_equivalent_is_the_cost_count():
    """active = parameters a token's computation reads (the K routed experts, not E); the
    FLOP-equivalent count folds the sectional layer's 1/r saving in, so only there they part."""
    dense, moe = tiny_spec("dense", None), tiny_spec("moe", "hash", experts=8)
    sect = tiny_spec("sectional", "segment_fixed", seq_reduction=4)
    pd, pm, ps = param_counts(dense), param_counts(moe), param_counts(sect)
    assert pd["active"] == pd["non_embedding"]
    assert pm["active"] == pd["active"]  # hash: one expert of the size of the dense FFN per token
    assert ps["active"] == ps["non_embedding"]  # every section's expert, the pooling and the pre-expert layer
    assert ps["flop_equivalent"] < ps["active"] / 2  # the shortened layers count once per r tokens
    for p in (pd, pm):  # without shortening the two counts differ only by the norm weights
        assert 0 < p["active"] - p["flop_equivalent"] < 0.02 * p["active"]
    assert wan_triad(sect)["N_a"] == ps["flop_equivalent"]
