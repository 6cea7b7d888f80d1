"""The fresh-process ratio benchmark's plumbing (issue 17's reference and token-MoE ratios): pairs of
sides in alternating order, per-round ratios into a geometric mean with a t-interval on the logs,
a verdict that needs the whole interval on one side of the target. Timing itself is the benchmark's."""

from __future__ import annotations

import math

import pytest

from sectional_moe import device as dev
from sectional_moe.bench import fresh, ratios
from sectional_moe.bench.report import ratio_interval
from sectional_moe.bench.runners import OPTIM
from sectional_moe.models.flops import flops_per_token


@pytest.fixture
def in_process(monkeypatch):
    calls = []

    def run_here(fn, args):  # a spawned child would not see the fake allocator setting
        calls.append(args[-1])  # a_first
        return fn(*args)

    monkeypatch.setattr(fresh, "run_in_fresh_process", run_here)
    monkeypatch.setattr(dev, "reuse_host_memory", lambda value, device: dev.HostMallocChoice(False, "test"))
    return calls


def test_processes_alternate_which_side_starts_and_each_gives_one_ratio(in_process):
    report = ratios.run(rounds=3, warmup=0, pairs=1, block=1, threads=None, quick=True, log=lambda msg: None)
    assert in_process == [True, False, True]
    (row,) = report["results"]
    assert len(row["round_ratios"]) == 3 and all(r > 0 for r in row["round_ratios"])
    low, high = row["ratio_ci95"]
    assert low <= row["ratio"] <= high
    assert row["verdict"] == ratios.verdict(low, high, 1.0)
    assert "| our dense vs GPT-2-style reference, fp32 (quick shape) (tokens_per_s) | nano 2 x 64 |" in ratios.to_markdown(report)


def test_blocks_alternate_abba_from_the_side_that_starts():
    assert [ratios.block_is_a(b, True) for b in range(6)] == [True, False, False, True, True, False]
    assert [ratios.block_is_a(b, False) for b in range(6)] == [False, True, True, False, False, True]


def test_both_sides_train_on_in_one_process_and_a_routed_side_reports_its_flops_and_load(in_process):
    a, b = ratios.SideSpec("routed", "moe", "topk", 4), ratios.SideSpec("routed")
    out = ratios.train_pair(a, b, True, 1, 2, 2, None)
    case = ratios.case_of(a, True)
    assert out["a"]["flops_per_step"] == pytest.approx(flops_per_token(case.spec) * case.batch * case.spec.seq_len)
    assert len(out["a"]["step_times"]) == len(out["b"]["step_times"]) == 4  # 2 pairs x 2 steps, one block each per pair
    assert out["a"]["load"]["max_over_mean"] >= 1.0 and 0 <= out["a"]["load"]["empty_experts"] < 4
    assert out["b"]["load"] is None  # dense: no routers


def test_the_jobs_optimizer_is_used_with_its_auto_warmup_resolved_and_the_main_benchmark_trains_alike():
    opt = ratios.job_optim()
    assert opt["warmup_steps"] == ratios.JOB_WARMUP_STEPS and opt["schedule"] == "cosine"
    assert {k: OPTIM[k] for k in ("lr", "eps", "weight_decay", "warmup_steps")} == {
        k: opt[k] for k in ("lr", "eps", "weight_decay", "warmup_steps")}
    assert list(OPTIM["betas"]) == list(opt["betas"])


def test_ratio_interval_is_a_geometric_mean_and_symmetric_under_inversion():
    mean, low, high = ratio_interval([0.8, 1.0, 1.25])
    assert mean == pytest.approx(1.0) and low < 1.0 < high
    inv = ratio_interval([1 / 0.8, 1.0, 1 / 1.25])
    assert inv[1] == pytest.approx(1 / high) and inv[2] == pytest.approx(1 / low)
    assert ratio_interval([0.9]) is None
    assert math.isclose(ratio_interval([0.9, 0.9])[0], 0.9)


@pytest.mark.parametrize("low, high, verdict", [(1.01, 1.2, "met"), (0.7, 0.84, "not met"), (0.8, 0.9, "not distinguishable from the target")])
def test_the_verdict_needs_the_whole_interval_on_one_side_of_the_target(low, high, verdict):
    assert ratios.verdict(low, high, 0.85) == verdict


def test_the_routed_batch_and_a_name_filter_select_the_comparisons():
    comps = ratios.comparisons(routed_batch=16, only="E = 16")
    assert [c.name for c in comps] == ["token MoE top-k E = 16 vs dense, fp32, batch 16",
                                       "token MoE top-k E = 16 vs dense, fp32 + compile, batch 16"]
    assert all(ratios.case_of(side, False).batch == 16 for c in comps for side in (c.a, c.b))
    assert ratios.case_of(ratios.comparisons()[2].a, False).batch == ratios.ROUTED_SHAPE["batch"]
    with pytest.raises(SystemExit, match="matches none"):
        ratios.comparisons(only="E = 64")


@pytest.mark.parametrize("flag", ["--rounds", "--pairs", "--block", "--threads", "--routed-batch"])
def test_counts_below_one_are_refused_with_the_flag_named(flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        ratios.main([flag, "0", "--out", ""])
    assert exit_.value.code == 2 and f"{flag} must be >= 1 (got 0)" in capsys.readouterr().err


def test_the_report_records_the_machine_the_load_and_the_command_given(in_process):
    report = ratios.run(rounds=1, warmup=0, pairs=1, block=1, threads=None, quick=True, log=lambda msg: None,
                        argv=["--quick", "--rounds", "1"])
    meta = report["meta"]
    assert meta["command"] == "python -m sectional_moe.bench.ratios --quick --rounds 1"
    assert {"host", "cpu", "cores", "started", "load_avg_start", "load_avg_end"} <= set(meta)
    assert meta["rounds"] == 1 and meta["optim"]["warmup_steps"] == ratios.JOB_WARMUP_STEPS
