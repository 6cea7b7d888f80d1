"""Tiny model specs of every family and routing, shared by the model, FLOP, compile and bench tests."""

from __future__ import annotations

import pytest

from sectional_moe.models.spec import ModelSpec

FAMILY_ROUTING = [
    ("dense", None),
    ("moe", "topk"),
    ("moe", "hash"),
    ("sectional", "segment_fixed"),
    ("sectional", "topk"),
    ("sectional", "hash"),
]


def tiny_spec(family: str, routing: str | None, **kw) -> ModelSpec:
    base = dict(
        family=family, routing=routing, experts=None if family == "dense" else 4, vocab_size=97,
        d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, seq_len=32, seq_reduction=4,
    )
    base.update(kw)
    return ModelSpec(**base).validate()


SECTIONAL_VARIANTS = [
    dict(),
    dict(seq_reduction=2, seq_pool="linear", merge_proj=True),
    dict(seq_reduction=1, pre_expert=False),
    dict(expert_attention=False, sectional_every=2),
    dict(experts=8, seq_reduction=8),  # more sections than heads: one head per section
    dict(pre_expert_resolution="full"),  # the pre-expert layer at full length, shortened after it
    dict(pre_expert_resolution="cross", seq_reduction=2, seq_pool="linear"),  # short queries over full keys
    dict(pre_expert_resolution="cross", merge_proj=True, sectional_every=2),
]


def all_cases():
    for family, routing in FAMILY_ROUTING:
        variants = SECTIONAL_VARIANTS if family == "sectional" else [dict()]
        for i, kw in enumerate(variants):
            yield pytest.param(family, routing, kw, id=f"{family}-{routing}-v{i}")
