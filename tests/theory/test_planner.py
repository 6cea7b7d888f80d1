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
    """Rebuild the spec the way train.py will: from the overrides of the printed command, on top
    of the conf/model and conf/routing defaults."""
    ov = dict(o.split("=", 1) for o in run.overrides(group="g"))
    size = {k.split(".", 1)[1]: int(v) for k, v in ov.items() if k.startswith("size.")}
    family = ov["model"]
    model = {"family": family, **{"sectional": {"seq_reduction": "experts", "sectional_every": 2}}.get(family, {})}
    model.update({k.split(".", 1)[1]: (v if v == "experts" else int(v)) for k, v in ov.items() if k.startswith("model.")})
    routing = {"name": ov.get("routing"), **({"top_k": 2} if ov.get("routing") == "topk" else {})}
    routing.update({k.split(".", 1)[1]: int(v) for k, v in ov.items() if k.startswith("routing.")})
    cfg = {"size": {"name": ov["size"], **size}, "model": model, "routing": routing,
           "experts": int(ov["experts"]) if "experts" in ov else None, "data": {"vocab_size": vocab_size}}
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
    assert run.predicted_loss == pytest.approx(float(lw.CHINCHILLA.predict("epoch_mle", N=run.matched, D=run.tokens)))


def test_sectional_plan_uses_wan_and_says_it_is_our_assumption():
    p = pl.plan(budget=1e18, family="sectional", experts=[2, 4, 8])
    assert p.law == "wan2026"
    assert p.allocation["M_opt"] == pytest.approx(float(lw.wan_m_opt(1e18)))
    assert any("[I]" in n and "sectional" in n for n in p.notes)
    assert [r.experts for r in p.runs] == [2, 4, 8] and p.expert_choice["rule"] == "given"
    for r in p.runs:
        assert r.d_model % r.experts == 0 and r.seq_len % r.experts == 0
        assert r.n_heads % r.experts == 0 or r.experts >= r.n_heads
        # the command pins what the FLOPs were counted with (conf's sectional_every is 2, r = E)
        assert "model.sectional_every=2" in r.overrides(group="g") and "model.seq_reduction=experts" in r.overrides(group="g")


def test_sectional_expert_count_is_the_cost_model_optimum_among_valid_splits():
    from sectional_moe.theory import cost_model as cm

    p = pl.plan(budget=1e18, family="sectional", kappa=1e5)
    (run,) = p.runs
    choice = p.expert_choice
    a = cm.qkv_cost_traditional(d_model=run.d_model, seq_len=run.seq_len)
    valid = choice["valid_E"]
    assert run.experts in valid and all(run.d_model % E == 0 and run.seq_len % E == 0 for E in valid)
    # the best valid E of S(E) for the chosen shape, and a fixed point of shape <-> E
    assert run.experts == max(valid, key=lambda E: cm.savings(E, a_trad=a, kappa=1e5, view="summed"))
    assert choice["e_opt_numeric_root"] == pytest.approx(cm.e_opt(a_trad=a, kappa=1e5, view="summed").numeric_root)
    assert pl.sectional_expert_count({k: getattr(run, k) for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "seq_len")},
                                     kappa=1e5)["E"] == run.experts
    # a larger overhead constant gives fewer experts (E_opt ∝ κ^-1/3)
    assert pl.plan(budget=1e18, family="sectional", kappa=1e7).runs[0].experts < run.experts
    assert choice["kappa_is_default"] is False and not any("placeholder" in n for n in p.notes)
    assert any("placeholder" in n for n in pl.plan(budget=1e17, family="sectional").notes)


def test_sectional_predicted_loss_is_chinchilla_at_active_parameters_and_says_so():
    run = pl.plan(budget=1e18, family="sectional").runs[0]
    embedding = run.n_total - run.n_non_embedding
    expected = lw.CHINCHILLA.predict("epoch_mle", N=run.n_active + embedding, D=run.tokens)
    assert run.predicted_loss == pytest.approx(float(expected), rel=1e-12)
    assert run.predicted_loss_law == "chinchilla/epoch_mle" and run.predicted_loss_note.startswith("[I] assumption")


def test_moe_plan_takes_top_k_from_zhao_and_e_from_its_active_ratio_optimum():
    p = pl.plan(budget=1e20, family="moe")
    (run,) = p.runs
    z = lw.zhao_optima(**lw.ZHAO.coefficients())
    assert run.top_k == round(z["G_opt"]) == 7 and run.expert_d_ff == pl.fine_grained_width(run.d_ff, 7)
    assert "routing.top_k=7" in p.commands[0] and f"model.expert_d_ff={run.expert_d_ff}" in p.commands[0]
    cands = {c["E"]: c for c in p.expert_choice["candidates"]}
    assert set(cands) == set(pl.MOE_EXPERT_CANDIDATES)
    gap = {E: abs(math.log(c["N_a_over_N"] / min(1.0, c["zhao_N_a_over_N_opt"]))) for E, c in cands.items()}
    assert run.experts == min(gap, key=gap.get)
    spec = _spec(run)
    assert param_counts(spec)["active"] / param_counts(spec)["non_embedding"] == pytest.approx(cands[run.experts]["N_a_over_N"])
    assert run.predicted_loss == pytest.approx(float(lw.ZHAO.predict(N=run.n_non_embedding, D=run.tokens, N_a=run.n_active, G=7, S=0.0)))
    # a larger model wants a sparser one (Zhao: (N_a/N)* ∝ N^-0.19)
    assert pl.plan(budget=1e22, family="moe").runs[0].experts > run.experts


def test_moe_plan_reports_the_wan_band_and_zhao_optima():
    p = pl.plan(budget=1e17, family="moe", experts=[8], top_k=2)
    assert any("18–25" in n for n in p.notes) and any("G* = 6.78" in n for n in p.notes)
    assert p.runs[0].n_total > p.runs[0].n_active and p.runs[0].top_k == 2 and p.runs[0].expert_d_ff is None


def test_global_batch_follows_the_deepseek_rule_and_keeps_steps_sane():
    for budget in (1e17, 1e18, 1e19):
        run = pl.plan(budget=budget, family="dense").runs[0]
        assert run.batch_tokens == run.batch_size * run.seq_len
        assert run.batch_tokens == pytest.approx(0.2920 * budget**0.3271, abs=run.seq_len / 2)  # rounded to whole sequences
        assert 1_000 < run.max_steps < 50_000  # the fixed 16 x 256 batch gave 784k steps at 1e18
    assert "DeepSeek" in pl.plan(budget=1e18, family="dense").batch_rule
    assert any("extrapolated" in n for n in pl.plan(budget=1e15, family="dense").notes)
    given = pl.plan(budget=1e18, family="dense", batch_size=16)
    assert given.runs[0].batch_size == 16 and given.batch_rule.startswith("given")


def test_hydra_command_has_the_framework_keys_and_merges_shared_shapes():
    p = pl.plan(budget=1e16, family="sectional", experts=[4], group="plan_test")
    cmd = p.commands[0]
    assert cmd.startswith("python train.py -m model=sectional experts=4 routing=segment_fixed model.seq_reduction=experts "
                          "model.sectional_every=2 size=")
    for key in ("size.d_model=", "size.n_layers=", "size.n_heads=", "size.n_kv_heads=", "size.d_ff=", "size.seq_len=",
                "trainer.max_steps=", f"data.batch_size={p.runs[0].batch_size}", "group=plan_test"):
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
