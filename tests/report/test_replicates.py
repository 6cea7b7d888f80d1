"""Seed replicates: t-intervals, configuration pooling, seed-paired differences and their verdicts."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from sectional_moe.report.replicates import aggregate, paired_differences, t_interval, verdict


def test_the_t_interval_is_the_textbook_one():
    x = [10.0, 12.0, 11.0, 13.0]
    ci = t_interval(x)
    half = stats.t.ppf(0.975, 3) * np.std(x, ddof=1) / 2
    assert ci["n"] == 4 and ci["mean"] == 11.5 and ci["ci_lo"] == pytest.approx(11.5 - half) and ci["ci_hi"] == pytest.approx(11.5 + half)
    assert t_interval([3.0])["ci_lo"] is None and t_interval([])["n"] == 0
    assert t_interval([1.0, float("nan"), 3.0])["n"] == 2


def _runs(rows):
    return pd.DataFrame([{"state": "done", "size": "nano", "experts": None, "routing": "none", **r} for r in rows])


def test_configurations_pool_their_seeds_and_only_their_seeds():
    df = _runs([dict(family="dense", seed=s, val_ppl_best=70 + s) for s in range(3)]
               + [dict(family="moe", routing="topk", experts=8, seed=s, val_ppl_best=60 + 2 * s) for s in range(3)]
               + [dict(family="moe", routing="topk", experts=8, seed=3, val_ppl_best=None)])  # no metric: left out
    agg = aggregate(df, "val_ppl_best")
    assert len(agg) == 2
    moe = agg[agg["family"] == "moe"].iloc[0]
    assert moe["n"] == 3 and moe["mean"] == 62 and moe["seeds"] == "0,1,2"


def test_every_model_setting_a_study_varies_separates_configurations():
    """The pre-expert readings, expert widths, capacity and depth pattern are configuration keys:
    runs that differ in one of them are never pooled as seeds of one configuration."""
    from sectional_moe.models.spec import ModelSpec
    from sectional_moe.report.table import _spec_columns, to_frame

    base = dict(family="sectional", vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192,
                seq_len=64, experts=4, routing="segment_fixed")
    readings = {r: _spec_columns(ModelSpec(**base, pre_expert_resolution=r), {}) for r in ("short", "full", "cross")}
    assert {c["pre_expert_resolution"] for c in readings.values()} == {"short", "full", "cross"}
    moe = _spec_columns(ModelSpec(**{**base, "family": "moe", "routing": "topk"}, expert_d_ff=48, capacity_factor=1.25), {})
    assert (moe["expert_d_ff"], moe["capacity_factor"], moe["shared_expert"]) == (48, 1.25, False)
    # through to_frame, the typing step every report takes (a string column typed as a number became NaN)
    df = to_frame([{"run": f"{r}-{s}", "run_id": f"{r}{s}", "state": "done", "size": "nano", **readings[r], "seed": s,
                    "val_ppl_best": 70.0 + s} for r in ("short", "full") for s in range(2)]
                  + [{"run": f"moe-{s}", "run_id": f"moe{s}", "state": "done", **moe, "seed": s, "val_ppl_best": 60.0}
                     for s in range(2)])
    agg = aggregate(df, "val_ppl_best")
    assert sorted(agg["pre_expert_resolution"].dropna()) == ["full", "short"]
    assert agg.loc[agg["family"] == "moe", "shared_expert"].tolist() == [False]


def test_paired_differences_cancel_what_the_seeds_share_and_give_a_verdict():
    seed_effect = [5.0, -3.0, 8.0]  # large and shared: unpaired, the two would overlap
    df = _runs([dict(family="dense", seed=s, val_ppl_best=70 + e) for s, e in enumerate(seed_effect)]
               + [dict(family="moe", routing="topk", experts=8, seed=s, val_ppl_best=67 + e + 0.1 * s) for s, e in enumerate(seed_effect)]
               + [dict(family="sectional", routing="segment_fixed", experts=4, seed=s, val_ppl_best=70 + e + d)
                  for s, (e, d) in enumerate(zip(seed_effect, (1.0, -1.0, 0.5)))])
    diff = paired_differences(df, "val_ppl_best").set_index("family")
    assert diff.loc["moe", "n_pairs"] == 3 and diff.loc["moe", "diff_mean"] == pytest.approx(-2.9)
    assert diff.loc["moe", "verdict"] == "better"  # the interval of the paired differences is tight
    assert diff.loc["sectional", "verdict"] == "not distinguishable at n = 3"
    unpaired = aggregate(df, "val_ppl_best").set_index("family")
    assert unpaired.loc["moe", "ci_hi"] > unpaired.loc["dense", "ci_lo"]  # unpaired intervals overlap


def test_a_reference_with_several_configurations_is_paired_within_each():
    df = _runs([dict(family="dense", n_layers=n, seed=s, val_loss_best=4.0 - 0.1 * n + 0.01 * s) for n in (2, 4) for s in (0, 1)]
               + [dict(family="moe", routing="topk", experts=4, n_layers=n, seed=s, val_loss_best=3.9 - 0.1 * n + 0.01 * s)
                  for n in (2, 4) for s in (0, 1)])
    diff = paired_differences(df, "val_loss_best")
    assert len(diff) == 2 and np.allclose(diff["diff_mean"], -0.1) and set(diff["n_pairs"]) == {2}


def test_verdicts_follow_the_direction_of_the_metric():
    assert verdict(-2.0, -1.0, 3, "val_ppl_best") == "better" and verdict(1.0, 2.0, 3, "val_ppl_best") == "worse"
    assert verdict(1.0, 2.0, 3, "tokens_per_s") == "better" and verdict(-1.0, 1.0, 5, "mfu") == "not distinguishable at n = 5"
    assert verdict(None, None, 1, "val_ppl_best") == "no interval at n = 1"
    assert not math.isnan(t_interval([1.0, 1.0])["ci_lo"])  # zero spread: a zero-width interval


def test_the_report_pools_seeds_pairs_them_with_dense_and_draws_intervals(tmp_path):
    from sectional_moe.report.html import build_report, render_markdown, write_report
    from sectional_moe.report.table import to_frame
    from sectional_moe.report.wandb_dashboard import report_run_keys

    rng = np.random.default_rng(0)
    rows = []
    for s in range(3):
        shared = rng.normal(0, 2)
        rows.append(dict(run="dense", run_id=f"d{s}", state="done", family="dense", size="nano", routing="none", seed=s,
                         val_ppl_best=70 + shared, val_loss_best=math.log(70 + shared), compute_flops=1e14, tokens_per_s=5e3))
        for e in (2, 4):
            ppl = 66 + e + shared + rng.normal(0, 0.2)
            rows.append(dict(run=f"moe E={e}", run_id=f"m{e}{s}", state="done", family="moe", size="nano", routing="topk",
                             experts=e, seed=s, val_ppl_best=ppl, val_loss_best=math.log(ppl), compute_flops=1.2e14,
                             tokens_per_s=4e3))
    report = build_report(to_frame(rows), source="synthetic", metric="val_ppl_best", n_boot=5)
    agg = report.replicate_table()
    assert list(agg["n"]) == [3, 3, 3] and agg.iloc[0]["experts"] == 2  # best first
    paired = report.paired_table().set_index("experts")
    assert paired.loc[2, "verdict"] == "better"  # 2 ppl below dense, whatever the seed
    assert paired.loc[4, "verdict"] == "not distinguishable at n = 3"  # equal to dense up to noise
    assert paired.loc[2, "diff_mean"] == pytest.approx(-2.0, abs=0.5)
    md = render_markdown(report)
    assert "paired by seed" in md and "Student t-interval" in md
    assert {"replicates", "paired_differences"} <= set(report_run_keys(report)["tables"])  # the W&B report run carries them
    fits = __import__("json").loads(write_report(report, tmp_path)["fits"].read_text())
    assert len(fits["replicates"]) == 3 and fits["interval"].startswith("Student t-interval")


def test_a_learning_rate_sweep_draws_the_tuning_curve_with_each_lines_best():
    from sectional_moe.report.figures import fig_lr_tuning
    from sectional_moe.report.table import to_frame

    rows = [dict(run=f"{fam} lr={lr}", run_id=f"{fam}{lr}{s}", state="done", family=fam, size="nano", routing="none", seed=s,
                 lr=lr, val_loss_best=4.0 + (math.log10(lr) + 2.3) ** 2 + 0.01 * s)
            for fam in ("dense", "moe") for lr in (2e-3, 5e-3, 1e-2) for s in (0, 1)]
    fig = fig_lr_tuning(to_frame(rows), "val_loss_best")
    assert fig.png is not None and "best lr" in fig.caption
    flat = to_frame([{**r, "lr": 5e-3} for r in rows])
    assert fig_lr_tuning(flat, "val_loss_best").skipped


def test_the_typed_table_keeps_every_architecture_column_a_spec_gives():
    """to_frame types each column (int, bool, str, else float): a config column missing from its
    type list would silently become NaN and runs differing in it would be pooled as seeds."""
    from sectional_moe.models.spec import ModelSpec
    from sectional_moe.report.table import _spec_columns, to_frame

    base = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192, seq_len=64, experts=4)
    specs = [ModelSpec(family="sectional", routing="segment_fixed", pre_expert_resolution="cross", **base),
             ModelSpec(family="moe", routing="topk", expert_d_ff=48, capacity_factor=1.25, shared_expert=True, **base)]
    for i, spec in enumerate(specs):
        columns = _spec_columns(spec, {"model.seq_reduction": "experts"})
        row = to_frame([{"run": str(i), "run_id": str(i), "state": "done", **columns}]).iloc[0]
        for key, value in columns.items():
            if value is not None:
                assert row[key] == value, (spec.family, key, row[key], value)


def test_a_reference_on_a_nullable_column_pairs_each_arm_by_e_whatever_its_width():
    """slicemoe_check's question: slices against parameter-matched token top-1, paired by seed and
    E. top_k is a nullable column (empty for dense and slices without a learned router), and the
    reference's expert width follows from its E, so the slice arm (another width) still pairs by E."""
    from sectional_moe.report.table import to_frame

    rows = [{"family": "dense", "routing": "none", "seed": s, "val_ppl_best": 80.0 + s} for s in range(3)]
    for e in (4, 8):
        rows += [{"family": "moe", "routing": "topk", "experts": e, "top_k": 1, "expert_d_ff": 192 // e, "seed": s,
                  "val_ppl_best": 78.0 + e + s} for s in range(3)]
        rows += [{"family": "sectional", "routing": "topk", "experts": e, "top_k": None, "expert_d_ff": 192, "seed": s,
                  "val_ppl_best": 77.0 + e + s + 0.1 * s} for s in range(3)]
    df = to_frame([{"run": str(i), "run_id": str(i), "state": "done", "size": "nano", **r} for i, r in enumerate(rows)])
    diff = paired_differences(df, "val_ppl_best", reference={"family": "moe", "top_k": 1})
    slices = diff[diff["family"] == "sectional"].set_index("experts")
    assert sorted(slices.index) == [4, 8] and set(slices["n_pairs"]) == {3}
    assert np.allclose(slices["diff_mean"], -1.0 + 0.1)  # each E against the token arm of the same E
    assert diff[diff["family"] == "dense"].empty  # dense has no E to pair with


def test_reference_values_keep_their_type_and_a_reference_that_selects_nothing_is_refused(tmp_path):
    from sectional_moe.report.cli import parse_reference
    from sectional_moe.report.replicates import check_reference
    from sectional_moe.report.table import to_frame

    assert parse_reference("family=moe,top_k=1,capacity_factor=1.25,pre_expert=false") == {
        "family": "moe", "top_k": 1, "capacity_factor": 1.25, "pre_expert": False}
    df = to_frame([{"run": "a", "run_id": "a", "state": "done", "family": "dense", "routing": "none", "seed": 0}])
    check_reference(df, {"family": "dense"})
    with pytest.raises(ValueError, match="no finished run has these values"):
        check_reference(df, {"family": "moe", "top_k": 3})
    with pytest.raises(ValueError, match="not a column"):
        check_reference(df, {"famly": "moe"})
