"""Planner: budget → configurations → Hydra command, checked against the laws and the flops module."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from sectional_moe.flops import flops_per_token, param_counts
from sectional_moe.spec import ModelSpec, spec_from_config
from sectional_moe.theory import laws as lw
from sectional_moe.theory import planner as pl

REPO = Path(__file__).resolve().parents[2]


def _spec(run: pl.PlannedRun, vocab_size: int = 8192) -> ModelSpec:
    """Rebuild the spec the way train.py will: from the overrides of the printed command."""
    ov = dict(o.split("=", 1) for o in run.overrides(group="g"))
    size = {k.split(".", 1)[1]: int(v) for k, v in ov.items() if k.startswith("size.")}
    family = ov["model"]
    model = {"family": family}
    if family == "sectional":
        model["seq_reduction"] = "experts"
    cfg = {"size": {"name": ov["size"], **size}, "model": model, "routing": {"name": ov.get("routing")},
           "experts": int(ov["experts"]) if "experts" in ov else None, "data": {"vocab_size": vocab_size}}
    if family == "moe":
        cfg["routing"]["top_k"] = 2
    return spec_from_config(cfg)


@pytest.mark.parametrize("family", ["dense", "moe", "sectional"])
def test_plan_spends_the_budget_and_matches_the_law_target(family):
    budget = 1e17
    p = pl.plan(budget=budget, family=family)
    assert p.runs, p.notes
    for run in p.runs:
        spec = _spec(run)
        m = flops_per_token(spec, training=True)
        assert m == pytest.approx(run.flops_per_token, rel=1e-12)
        # steps are rounded to whole steps only
        assert run.compute == pytest.approx(budget, rel=1.0 / run.max_steps)
        assert run.tokens == run.max_steps * run.batch_size * run.seq_len
        assert abs(math.log(run.matched / run.target)) <= math.log(1.05) or run.matched == run.target
        assert param_counts(spec)["total"] == pytest.approx(run.n_total, rel=1e-12)


def test_dense_plan_uses_the_epoch_frontier_by_default():
    p = pl.plan(budget=1e18, family="dense")
    f = lw.chinchilla_frontier(C=1e18, **lw.CHINCHILLA.coefficients("epoch_mle"))
    assert p.law == "chinchilla" and "epoch_mle' [P]" in p.law_provenance
    assert p.allocation["N_opt"] == pytest.approx(float(f["N_opt"]))
    run = p.runs[0]
    assert run.target_name == "N_opt" and run.n_total == pytest.approx(float(f["N_opt"]), rel=0.05)
    assert run.predicted_loss is not None


def test_sectional_plan_uses_wan_and_says_it_is_our_assumption():
    p = pl.plan(budget=1e18, family="sectional", experts=[2, 4, 8])
    assert p.law == "wan2026"
    assert p.allocation["M_opt"] == pytest.approx(float(lw.wan_m_opt(1e18)))
    assert any("[I]" in n and "sectional" in n for n in p.notes)
    assert [r.experts for r in p.runs] == [2, 4, 8]
    for r in p.runs:
        assert r.d_model % r.experts == 0 and r.seq_len % r.experts == 0
        assert r.n_heads % r.experts == 0 or r.experts >= r.n_heads


def test_moe_plan_reports_the_wan_band_and_zhao_optima():
    p = pl.plan(budget=1e17, family="moe", experts=[8])
    assert any("18–25" in n for n in p.notes) and any("G* = 6.78" in n for n in p.notes)
    assert p.runs[0].n_total > p.runs[0].n_active


def test_hydra_command_has_the_framework_keys_and_merges_shared_shapes():
    p = pl.plan(budget=1e16, family="sectional", experts=[4], group="plan_test")
    cmd = p.commands[0]
    assert cmd.startswith("python train.py -m model=sectional experts=4 routing=segment_fixed size=")
    for key in ("size.d_model=", "size.n_layers=", "size.n_heads=", "size.n_kv_heads=", "size.d_ff=", "size.seq_len=",
                "trainer.max_steps=", "data.batch_size=16", "group=plan_test"):
        assert key in cmd
    run = p.runs[0]
    twin = pl.PlannedRun(**{**run.__dict__, "experts": 8})
    merged = pl.hydra_commands([run, twin], group="g")
    assert len(merged) == 1 and "experts=4,8" in merged[0]


def test_default_group_name_and_nearest_preset():
    assert pl.plan(budget=1e17, family="dense").group == "plan_1e17"
    assert pl.plan(budget=2.5e18, family="dense").group == "plan_2.5e18"
    assert pl.nearest_preset(256) == "small" and pl.nearest_preset(700) == "base" and pl.nearest_preset(64) == "nano"


def test_planner_rejects_bad_input():
    with pytest.raises(ValueError, match="family"):
        pl.plan(budget=1e17, family="mlp")
    with pytest.raises(ValueError, match="budget"):
        pl.plan(budget=0, family="dense")
    with pytest.raises(ValueError, match="law"):
        pl.plan(budget=1e17, family="dense", law="kaplan")


def test_size_presets_match_the_framework_configs():
    conf = REPO / "conf" / "size"
    if not conf.is_dir():
        pytest.skip("conf/size not present in this checkout")
    import yaml

    for name, preset in pl.SIZE_PRESETS.items():
        path = conf / f"{name}.yaml"
        assert path.exists(), f"preset {name} missing from conf/size"
        cfg = yaml.safe_load(path.read_text())
        assert {k: cfg[k] for k in preset} == preset, name
