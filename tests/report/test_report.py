"""Sweep report (issue 7): collect a real tiny sweep from its run directories and from its offline
W&B files, check both give the same table, render the report and log it to W&B offline.

One multirun subprocess per module (5 nano jobs of 4 steps, one failing inside the job after W&B
started), shared by every test here; the fit/figure paths a tiny sweep cannot reach (κ, bands)
run on a synthetic table.
"""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sectional_moe.report import analysis
from sectional_moe.report.cli import main as report_main
from sectional_moe.report.sources import collect
from sectional_moe.report.sources.wandb_api import record_from_api_run
from sectional_moe.report.sources.wandb_offline import find_wandb_files, read_wandb_files
from sectional_moe.report.table import RunRecord, comparable, expert_fractions, steady_state, tidy_row, to_frame
from sectional_moe.report.figures import FIGURE_SLUGS
from sectional_moe.report.html import build_report, write_report
from tests.conftest import run_train_cli

# one experiment file per job: a Cartesian sweep cannot give dense + two MoE families + one failure
_FAST = """\
data: {vocab_size: 512, batch_size: 4}
trainer: {max_steps: 4, val_check_interval: 2, limit_val_batches: 1, limit_test_batches: 1, log_every_n_steps: 1}
optim: {warmup_steps: 1OPTIM}
hardware: {peak_tflops: 1.0}   # skips the CPU matmul probe (MFU relative to 1 TFLOP/s)
"""
# one experiment file per job (short run names): a Cartesian sweep cannot give dense + two MoE
# families + one failure. r_fail fails inside the job, after the loggers started: AdamW rejects eps < 0.
CASES = {
    "r_dense": ("dense", "", ""),
    "r_moe2": ("moe", "experts: 2\n", ""),
    "r_moe4": ("moe", "experts: 4\n", ""),
    "r_sect2": ("sectional", "experts: 2\n", ""),
    "r_fail": ("moe", "experts: 2\n", ", eps: -1.0"),
}


def _case_yaml(model: str, extra: str, optim_extra: str) -> str:
    fast = _FAST.replace("OPTIM", optim_extra)
    return f"# @package _global_\ndefaults:\n  - override /size: nano\n  - override /model: {model}\n{fast}{extra}"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the 5-job sweep once; return its group directory."""
    root = tmp_path_factory.mktemp("report-sweep")
    exp = root / "conf" / "experiment"
    exp.mkdir(parents=True)
    for name, case in CASES.items():
        (exp / f"{name}.yaml").write_text(_case_yaml(*case))
    proc = run_train_cli("-m", "--config-dir", str(root / "conf"), f"experiment={','.join(CASES)}", "trainer.enable_progress_bar=false",
                         "task_name=rep", "group=tiny", f"paths.log_dir={root / 'outputs'}",
                         cwd=root, env={"WANDB_MODE": "offline"}, timeout=900)
    group = root / "outputs" / "rep" / "multirun" / "tiny"
    assert proc.returncode == 1, f"one job must fail and the sweep exit 1\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "1 of 5 jobs did not finish" in proc.stderr, proc.stderr[-3000:]
    return group


@pytest.fixture(scope="module")
def runs_table(sweep: Path) -> pd.DataFrame:
    return collect(sweep, kind="runs")


def _row(df: pd.DataFrame, case: str) -> pd.Series:
    hits = df[df["run"] == f"experiment={case}"]
    assert len(hits) == 1, (case, list(df["run"]))
    return hits.iloc[0]


# ============================================================================================
def test_run_directories_give_one_row_per_run_with_state(runs_table: pd.DataFrame) -> None:
    df = runs_table
    assert len(df) == 5
    assert sorted(df["state"]) == ["done"] * 4 + ["failed"]
    failed = _row(df, "r_fail")
    assert failed["state"] == "failed" and "eps" in failed["error"].lower()
    assert set(df["family"]) == {"dense", "moe", "sectional"}
    dense = _row(df, "r_dense")
    assert pd.isna(dense["experts"]) and dense["routing"] == "none" and pd.isna(dense["load_cv"])
    for case, fam, E, routing in (("r_moe2", "moe", 2, "topk"), ("r_moe4", "moe", 4, "topk"), ("r_sect2", "sectional", 2, "segment_fixed")):
        r = _row(df, case)
        assert (r["family"], r["experts"], r["routing"], r["state"]) == (fam, E, routing, "done")
        if fam == "moe":  # routed layers log their load; segment_fixed has no router and no load keys
            assert len(expert_fractions(r["expert_frac"])) == E
            assert expert_fractions(r["expert_frac"]).sum() == pytest.approx(1.0, abs=1e-4)
            assert r["load_max_over_mean"] >= 1.0
    done = df[df["state"] == "done"]
    for col in ("params_total", "params_active", "flops_per_token", "tokens", "val_ppl_best", "val_ppl_final", "test_ppl",
                "tokens_per_s", "step_time_s", "mfu", "peak_mem_gib"):
        assert done[col].notna().all() and (done[col] > 0).all(), col
    # 4 steps x 4 sequences x 64 tokens; C = D x FLOPs/token; best <= final; ppl = exp(loss)
    assert (done["tokens"] == 4 * 4 * 64).all()
    np.testing.assert_allclose(done["compute_flops"], done["tokens"] * done["flops_per_token"], rtol=1e-9)
    assert (done["val_ppl_best"] <= done["val_ppl_final"] + 1e-9).all()
    np.testing.assert_allclose(done["val_ppl_best"], np.exp(done["val_loss_best"]), rtol=1e-4)
    assert (done["steady_windows"] >= 1).all()  # 4 logging windows, the first is warm-up
    assert (done["mem_kind"] == "cpu_peak_rss").all()
    assert df["params_active"].max() < df["params_total"].max()


def test_offline_wandb_files_give_the_same_table(sweep: Path, runs_table: pd.DataFrame) -> None:
    wb = collect(sweep, kind="wandb-offline")
    a, b = comparable(runs_table), comparable(wb)
    done = a[a["state"] == "done"].index
    assert set(done) <= set(b.index), "every finished run has a W&B run"
    assert set(b.index) <= set(a.index)
    assert (a.loc[b.index, "run"] == b["run"]).all()  # the same names (W&B's run_name), not only the same ids
    # r_fail fails inside trainer.fit (AdamW rejects eps < 0), after log_hyperparams started its W&B
    # run, and train.py finishes that run with exit_code=1: the W&B source must list it as failed
    fail_id = a.index[a["state"] == "failed"][0]
    assert fail_id in b.index, "the failed job wrote no W&B run file"
    assert b.loc[fail_id, "state"] == "failed"
    assert wb.set_index("run_id").loc[fail_id, "error"] == "W&B exit code 1"
    common = sorted(b.index)
    pd.testing.assert_frame_equal(a.loc[common], b.loc[common], check_exact=False, rtol=1e-9)
    assert set(wb["source"]) == {"wandb-offline"} and set(runs_table["source"]) == {"runs"}


def test_sectional_switches_and_data_baselines_are_columns_of_both_sources(sweep: Path, runs_table: pd.DataFrame) -> None:
    wb = comparable(collect(sweep, kind="wandb-offline"))
    for table in (comparable(runs_table), wb):
        sect = table[table["run"] == "experiment=r_sect2"].iloc[0]
        assert (sect["seq_reduction_setting"], sect["seq_reduction"], sect["sectional_every"]) == ("experts", 2, 2)
        assert (sect["pre_expert"], sect["expert_attention"], sect["merge_proj"], sect["seq_pool"]) == (True, True, False, "mean")
        moe = table[table["run"] == "experiment=r_moe2"].iloc[0]
        assert pd.isna(moe["sectional_every"]) and pd.isna(moe["pre_expert"]) and pd.isna(moe["seq_reduction_setting"])
        done = table[table["state"] == "done"]
        assert (done["unigram_val_ppl"] > done["bigram_val_ppl"]).all() and (done["bigram_val_ppl"] > 1).all()
        assert (done["n_layers"] == 2).all() and (done["max_steps"] == 4).all()


def _copy_sweep(sweep: Path, dest_root: Path, rewrite_dir) -> Path:
    """The sweep copied to ``dest_root`` with the task/multirun/group layout, its summary.json dirs
    rewritten by ``rewrite_dir`` (as another launch directory would have recorded them)."""
    import shutil

    copy = dest_root / "rep" / "multirun" / "tiny"
    shutil.copytree(sweep, copy, symlinks=True)
    jobs = json.loads((copy / "summary.json").read_text())
    for job in jobs:
        job["dir"] = rewrite_dir(Path(job["dir"]).name)
    (copy / "summary.json").write_text(json.dumps(jobs))
    return copy


def test_a_copied_sweep_read_from_elsewhere_lists_no_finished_run_as_not_started(
        sweep: Path, runs_table: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert (sweep / "summary.json").is_file(), "the sweep summary (sectional_moe.cluster.sweeps) was not written"
    # relative to the launch directory (what a launch from the repo root records) and absolute on a
    # machine the sweep no longer lives on: neither resolves from here
    for name, rewrite in (("relative", lambda d: f"outputs/rep/multirun/tiny/{d}"),
                          ("stale-absolute", lambda d: f"/nonexistent/launch/outputs/rep/multirun/tiny/{d}")):
        copy = _copy_sweep(sweep, tmp_path / name, rewrite)
        jobs = json.loads((copy / "summary.json").read_text())
        jobs.append({"job": "experiment=r_never", "dir": rewrite("experiment=r_never"), "state": "not started", "error": None})
        (copy / "summary.json").write_text(json.dumps(jobs))
        monkeypatch.chdir(tmp_path)  # neither the launch directory nor the sweep
        table = collect(copy, kind="runs")
        assert len(table) == 6, table[["run", "state", "path"]]
        never = table[table["state"] == "not started"]
        assert never["run"].tolist() == ["experiment=r_never"] and never["path"].item() == str(copy / "experiment=r_never")
        pd.testing.assert_frame_equal(comparable(table[table["state"] != "not started"]), comparable(runs_table),
                                      check_exact=False, rtol=1e-12)


def test_api_adapter_matches_offline_reader(sweep: Path) -> None:
    """The W&B API path (online only) on stand-in Run objects built from the offline files."""

    class Summary(dict):
        @property
        def _json_dict(self) -> dict:
            return dict(self)

    class FakeRun:
        def __init__(self, rec: RunRecord):
            self.id, self.name, self.group, self.job_type = rec.run_id, rec.name, rec.group, "train"
            self.state = "finished" if rec.state == "done" else "crashed"
            self.config = {k: v for k, v in rec.config.items() if "." not in k or not isinstance(v, dict)}
            self.summary = Summary(rec.final)
            self._history = rec.history
            self.url = "https://example.invalid/run"

        def scan_history(self):
            return iter(self._history)

    recs = [read_wandb_files(files) for files in find_wandb_files(sweep).values()]
    recs = [r for r in recs if r is not None and r.state == "done"]
    assert recs
    offline = to_frame(tidy_row(r) for r in recs)
    api = to_frame(tidy_row(record_from_api_run(FakeRun(r))) for r in recs)
    pd.testing.assert_frame_equal(comparable(offline), comparable(api))


def test_report_cli_writes_every_figure_and_lists_the_failure(sweep: Path, runs_table: pd.DataFrame, tmp_path: Path) -> None:
    out = tmp_path / "report"
    code = report_main([str(sweep), "--out", str(out), "--no-progress", "--wandb", "offline", "--n-boot", "20",
                        "--metric", "val_ppl_best", "--group-by", "routing"])
    assert code == 0
    page = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    for slug in FIGURE_SLUGS:  # each figure is drawn, or the report says why not
        assert f"data-figure='{slug}'" in page or f"data-skipped='{slug}'" in page, slug
    drawn = re.findall(r"data-figure='(\w+)'><img alt='[^']*' src='data:image/png;base64,([^']+)'", page)
    assert {s for s, _ in drawn} >= {"quality_vs_experts", "throughput_memory_vs_experts", "loss_vs_compute", "step_cost_kappa", "expert_load"}
    for _, b64 in drawn:
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
    for slug, _ in drawn:
        assert f"(figures/{slug}.png)" in md and (out / "figures" / f"{slug}.png").is_file()
    assert "Skipped:" in md and "needs >=" in md  # the scaling fit says why it was skipped (too few runs)
    # the failed run is listed as failed, in both renderings and the CSV/JSON twins
    not_finished = page.split("id='not-finished'")[1].split("<h2")[0]
    assert "experiment=r_fail" in not_finished and "failed" in not_finished and "epsilon" in not_finished
    csv = pd.read_csv(out / "runs.csv")
    assert len(csv) == 5 and csv.loc[csv["run"].str.contains("r_fail"), "state"].item() == "failed"
    assert len(pd.read_json(out / "runs.json")) == 5
    # comparison sorted best first
    cmp_rows = re.findall(r"<td>(experiment=r_\w+)", page.split("id='comparison'")[1].split("<h2")[0])
    best_first = runs_table[runs_table["state"] == "done"].sort_values("val_ppl_best")["run"].tolist()
    assert cmp_rows == best_first

    # the W&B summary run: offline, readable, holds the tables and images, and is not collected as a run
    from sectional_moe.tracking.wandb_files import read_run, run_dirs

    (wb_dir,) = run_dirs(out)
    rec = read_run(wb_dir)
    assert rec["config"]["sectional_moe_report"] is True and rec["run"]["group"] == "tiny"
    logged = rec["history"][0]
    # wandb 0.31 records nested media references as "<key>/<field>" items
    assert logged["runs/_type"] == "table-file" and logged["comparison/_type"] == "table-file"
    assert logged["runs/nrows"] == 5 and logged["comparison/nrows"] == 4
    table_file = json.loads((wb_dir / "files" / logged["runs/path"]).read_text())
    assert len(table_file["data"]) == 5 and "state" in table_file["columns"]
    images = {k.split("/")[1] for k in logged if k.startswith("figures/") and k.endswith("/_type") and logged[k] == "image-file"}
    assert images == {s for s, _ in drawn}
    assert rec["summary"]["report/failed"] == 1
    assert find_wandb_files(out) and all(read_wandb_files(f) is None for f in find_wandb_files(out).values())  # skipped as a run


def test_logged_metric_names_map_to_table_columns() -> None:
    from sectional_moe.report.cli import table_column

    assert table_column("val/ppl") == "val_ppl_best" and table_column("perf/step_time") == "step_time_s"
    assert table_column("val_ppl_final") == "val_ppl_final" and table_column("routing") == "routing"


def test_cli_rejects_unknown_metric(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert report_main([str(sweep), "--out", str(tmp_path), "--no-progress", "--metric", "nope"]) == 2
    assert "--metric 'nope'" in capsys.readouterr().err


# ============================================================================================
# Without training: fits and figures on a synthetic sweep big enough for κ and scaling bands
# ============================================================================================
def _synthetic() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for E in (1, 2, 4, 8, 16):
        for seed in (0, 1):  # step time: summed R1 QKV fraction + a quadratic overhead κ = 0.004 s/E²
            t = 1.0 + 2.0 * (1 / E + 1 / E**2) + 0.004 * E**2 + rng.normal(0, 1e-3)
            C = 1e15 * E ** 0.5 * (1 + seed)
            loss = 2.0 + 5.0 * (C / 1e15) ** -0.3 + rng.normal(0, 0.01)
            # FLOPs/token of the same r = E shape: the exact compute term the κ fit is given
            rows.append({"run": f"sect E={E} s={seed}", "run_id": f"s{E}{seed}", "state": "done", "family": "sectional",
                         "size": "tiny", "experts": E, "routing": "segment_fixed", "seed": seed, "step_time_s": t,
                         "seq_reduction_setting": "experts", "seq_reduction": E, "sectional_every": 1, "batch_tokens": 2048,
                         "compute_flops": C, "tokens": C / 1e6, "flops_per_token": 1e6 * (1 / E + 1 / E**2), "params_total": 1e6,
                         "params_non_embedding": 8e5,
                         "val_loss_best": loss, "val_ppl_best": math.exp(loss), "tokens_per_s": 1e4 / t, "peak_mem_gib": 1 + E / 10,
                         "load_max_over_mean": 1.0, "expert_frac": ",".join(["%g" % (1 / E)] * E)})
    rows.append({"run": "dense", "run_id": "d", "state": "done", "family": "dense", "size": "tiny", "routing": "none", "seed": 0,
                 "val_loss_best": 3.0, "val_ppl_best": math.exp(3.0), "step_time_s": 1.5, "compute_flops": 1e15, "tokens_per_s": 7e3,
                 "peak_mem_gib": 1.0})
    rows.append({"run": "broken", "run_id": "b", "state": "unfinished", "family": "moe", "experts": 8, "routing": "hash", "error": "killed"})
    return to_frame(rows)


def test_synthetic_sweep_fits_kappa_and_scaling_bands(tmp_path: Path) -> None:
    df = _synthetic()
    report = build_report(df, source="synthetic", metric="val_ppl_best", group_by="routing", n_boot=30)
    (k,) = report.kappas
    assert k.fit is not None and k.fit.compute_term == "exact"  # flops_per_token x batch_tokens, not R1
    assert k.fit.kappa == pytest.approx(0.004, abs=5e-4)  # the overhead the data was made with
    true_t = {E: 1.0 + 2.0 * (1 / E + 1 / E**2) + 0.004 * E**2 for E in (1, 2, 4, 8, 16)}
    assert k.fit.measured_e_opt == min(true_t, key=true_t.get)  # the swept E with the lowest step time (8)
    fits = {f.family: f for f in report.law_fits}
    sect = fits["sectional"]
    assert sect.reason is None and 0.1 < sect.params["alpha"] < 0.6
    inside = (sect.band[0] <= sect.curve + 1e-9) & (sect.curve <= sect.band[1] + 1e-9)
    assert inside.mean() > 0.9  # the fitted curve lies within its bootstrap band
    assert "needs >=" in fits["dense"].reason
    drawn = {f.slug: f for f in report.figures}
    assert drawn.pop("lr_tuning").skipped == "no configuration was trained at more than one learning rate"
    assert all(f.png is not None for f in drawn.values()), [(f.slug, f.skipped) for f in drawn.values()]
    paths = write_report(report, tmp_path)
    assert "broken" in paths["md"].read_text().split("## Runs that did not finish")[1].split("##")[0]


def test_pareto_and_steady_state_definitions() -> None:
    mask = analysis.pareto_mask(np.array([1, 2, 3, 4, np.nan]), np.array([5, 3, 4, 1, 0]))
    assert mask.tolist() == [True, True, False, True, False]
    # windows: 100 tokens at 10/s (warm-up), then 200 at 20/s and 300 at 10/s -> 500 tokens / 40 s
    hist = [{"perf/tokens": 100, "perf/tokens_per_s": 10, "perf/mfu": 0.1, "perf/step_time_s": 1},
            {"val/loss": 3.0},
            {"perf/tokens": 300, "perf/tokens_per_s": 20, "perf/mfu": 0.2, "perf/step_time_s": 1},
            {"perf/tokens": 600, "perf/tokens_per_s": 10, "perf/mfu": 0.1, "perf/step_time_s": 2}]
    s = steady_state(hist, warmup_windows=1)
    assert s["tokens_per_s"] == pytest.approx(500 / 40) and s["steady_windows"] == 2
    assert s["mfu"] == pytest.approx((0.2 * 10 + 0.1 * 30) / 40)
    assert s["step_time_s"] == pytest.approx(40 / (10 + 15))


# ============================================================================================
# Grouping by every varying config column, degenerate fits, baselines
# ============================================================================================
def _sect_rows(every: int, r_setting: str, *, kappa: float, seeds=(0, 1), E_list=(2, 4, 8, 16)) -> list[dict]:
    rows = []
    for E in E_list:
        r = E if r_setting == "experts" else int(r_setting)
        work = 1e6 * (0.5 + 0.5 / r + 1 / E**2)  # FLOPs/token: dense layers + the shortened sectional ones
        for seed in seeds:
            t = 0.2 + 1.5 * work / 2e6 + kappa * E**2 + 1e-4 * seed
            loss = 3.0 + 0.1 * every + 0.01 * E
            rows.append({"run": f"E={E} every={every} r={r_setting} s={seed}", "run_id": f"{E}-{every}-{r_setting}-{seed}",
                         "state": "done", "family": "sectional", "size": "tiny", "experts": E, "routing": "segment_fixed",
                         "seed": seed, "sectional_every": every, "seq_reduction_setting": r_setting, "seq_reduction": r,
                         "pre_expert": True, "batch_tokens": 2048, "flops_per_token": work, "step_time_s": t,
                         "val_loss_best": loss, "val_ppl_best": math.exp(loss), "unigram_val_ppl": 400.0, "bigram_val_ppl": 90.0})
    return rows


def test_runs_that_differ_in_a_config_setting_are_separate_kappa_fits_and_lines() -> None:
    df = to_frame(_sect_rows(1, "experts", kappa=0.002) + _sect_rows(2, "experts", kappa=0.004) + _sect_rows(2, "2", kappa=0.001))
    # r follows E in two groups, so only the setting (not the resolved r) may split them
    assert analysis.varying_config_columns(analysis.finished(df)) == ["seq_reduction_setting", "sectional_every"]
    fits = {k.label: k for k in analysis.kappa_fits(df)}
    assert set(fits) == {"size=tiny, routing=segment_fixed, seq_reduction=experts, sectional_every=1",
                         "size=tiny, routing=segment_fixed, seq_reduction=experts, sectional_every=2",
                         "size=tiny, routing=segment_fixed, seq_reduction=2, sectional_every=2"}
    for label, kappa in (("seq_reduction=experts, sectional_every=1", 0.002), ("seq_reduction=experts, sectional_every=2", 0.004),
                         ("seq_reduction=2, sectional_every=2", 0.001)):
        k = fits[f"size=tiny, routing=segment_fixed, {label}"]
        assert len(k.data) == 8 and k.fit.compute_term == "exact"
        assert k.fit.kappa == pytest.approx(kappa, rel=1e-3)  # exact FLOPs as the compute term: no R1 bias at fixed r

    import matplotlib.pyplot as plt

    from sectional_moe.report import figures

    fig, ax = plt.subplots()
    figures._lines_vs_experts(ax, df, "val_ppl_best", "routing")
    figures._baselines(ax, df, "val_ppl_best")
    labels = set(ax.get_legend_handles_labels()[1])
    plt.close(fig)
    assert labels == {"segment_fixed, seq_reduction=experts, sectional_every=1", "segment_fixed, seq_reduction=experts, sectional_every=2",
                      "segment_fixed, seq_reduction=2, sectional_every=2",
                      "unigram baseline (validation, ppl 400)", "bigram baseline (validation, ppl 90)"}


def test_quality_figure_draws_the_baselines_only_when_logged() -> None:
    import matplotlib.pyplot as plt

    from sectional_moe.report import figures

    df = to_frame(_sect_rows(2, "experts", kappa=0.0))
    for metric, expected in (("val_ppl_best", 2), ("val_loss_best", 2), ("test_ppl", 0)):
        fig, ax = plt.subplots()
        drawn = figures._baselines(ax, df, metric)
        plt.close(fig)
        assert len(drawn) == expected, metric
    assert figures._baselines(plt.subplots()[1], df.assign(unigram_val_ppl=np.nan, bigram_val_ppl=np.nan), "val_ppl_best") == []
    plt.close("all")
    fig = figures.fig_quality_vs_experts(df, "val_loss_best", "routing")
    assert fig.png is not None and "unigram and bigram" in fig.caption


def _compute_rows(C: np.ndarray, loss: np.ndarray) -> pd.DataFrame:
    return to_frame({"run": f"r{i}", "run_id": f"r{i}", "state": "done", "family": "sectional", "size": "tiny", "experts": 4,
                     "routing": "segment_fixed", "seed": i, "compute_flops": c, "val_loss_best": l, "val_ppl_best": math.exp(l)}
                    for i, (c, l) in enumerate(zip(C, loss)))


def test_a_compute_law_over_a_few_percent_of_compute_is_not_fitted() -> None:
    # the mission sweep: 6 runs spanning ~8 % of compute (E went to its bound, alpha's CI to [0, 0.57])
    C = 4.8e11 * np.linspace(1.0, 1.08, 6)
    (fit,) = analysis.compute_law_fits(_compute_rows(C, 5.2 - 0.1 * np.log(C / C[0])), n_boot=5)
    assert fit.reason and "2 distinct compute budget(s) spanning 1.08x" in fit.reason and fit.curve is None
    assert analysis.count_budgets(C) == 2 and analysis.count_budgets(np.array([1e15, 1.01e15, 3e15, 9e15])) == 3
    # three distinct budgets are not enough either when they span less than 3x
    C = 4.8e11 * np.repeat([1.0, 1.2, 1.45], 2)
    (fit,) = analysis.compute_law_fits(_compute_rows(C, 5.2 - 0.1 * np.log(C / C[0])), n_boot=5)
    assert fit.reason and "3 distinct compute budget(s) spanning 1.45x" in fit.reason and ">= 3x" in fit.reason


def test_a_fit_whose_floor_collapses_to_its_bound_is_reported_as_degenerate_not_plotted() -> None:
    C = np.geomspace(1e15, 1e17, 6)
    pure_power = 8.0 * (C / 1e16) ** -0.05  # no irreducible loss: E is not identified and runs to 0
    df = _compute_rows(C, pure_power)
    (fit,) = analysis.compute_law_fits(df, n_boot=5)
    assert fit.reason.startswith("degenerate fit, not a result") and "E = " in fit.reason and "lower bound 0" in fit.reason
    assert fit.curve is None and fit.params["E"] < 1e-3
    from sectional_moe.report.figures import fig_scaling

    figure = fig_scaling(df, "val_ppl_best", "routing", [fit])
    assert figure.png is None and any("degenerate" in n for n in figure.notes)
    # a well-posed law over 100x with a floor is fitted and plotted
    (good,) = analysis.compute_law_fits(_compute_rows(C, 2.0 + 3.0 * (C / 1e16) ** -0.3), n_boot=5)
    assert good.reason is None and good.params["E"] == pytest.approx(2.0, rel=1e-3)
    assert fig_scaling(df, "val_ppl_best", "routing", [good]).png is not None


def test_at_bounds_names_each_parameter_at_a_bound() -> None:
    law = analysis.COMPUTE_LAW
    assert analysis.at_bounds(law, {"E": 1.5, "A": 2.0, "alpha": 0.3}, scale=3.0) == []
    msgs = analysis.at_bounds(law, {"E": 1e-5, "A": 2.0, "alpha": 3.0}, scale=3.0)
    assert len(msgs) == 2 and msgs[0].startswith("E = 1e-05") and "alpha = 3 sits at its upper bound 3" in msgs[1]


def test_compute_leverage_reads_both_pareto_frontiers() -> None:
    """A family reaching every loss with half the dense compute has leverage 2 at every level."""
    from sectional_moe.report.analysis import compute_leverage

    C = np.array([1e12, 2e12, 4e12, 8e12])
    loss = 3.0 + 2.0 * (C / 1e12) ** -0.5
    rows = [{"state": "done", "family": "dense", "compute_flops": c, "val_loss_best": l} for c, l in zip(C, loss)]
    rows += [{"state": "done", "family": "moe", "compute_flops": c / 2, "val_loss_best": l} for c, l in zip(C, loss)]
    rows += [{"state": "done", "family": "moe", "compute_flops": 1e13, "val_loss_best": 9.0}]  # dominated: not on the frontier
    rows += [{"state": "done", "family": "sectional", "compute_flops": 1e12, "val_loss_best": 1.0},
             {"state": "done", "family": "sectional", "compute_flops": 2e12, "val_loss_best": 0.9}]  # no shared loss range
    lev = compute_leverage(pd.DataFrame(rows))
    moe = lev[lev["family"] == "moe"]
    assert len(moe) == 3 and np.allclose(moe["leverage"], 2.0)
    assert moe["val_loss"].between(loss.min(), loss.max()).all()
    assert lev[lev["family"] == "sectional"]["reason"].str.contains("share no loss range").all()


def test_chinchilla_fits_with_runaway_exponents_are_not_results() -> None:
    from sectional_moe.report.analysis import implausible_exponents

    assert implausible_exponents({"alpha": 3.94, "beta": 0.42})[0].startswith("alpha = 3.94 > 2")
    assert implausible_exponents({"alpha": 0.34, "beta": 0.28}) == []


def test_theory_isoflop_reads_a_sweep_directory_as_the_report_does(sweep: Path, capsys) -> None:
    """`python -m sectional_moe.theory isoflop <sweep dir>` collects the runs itself (no report first)."""
    from sectional_moe.theory import cli as theory_cli

    assert theory_cli.main(["isoflop", str(sweep), "--bootstrap", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["source"] == str(sweep) and "params_non_embedding" in out["conventions"]
    assert {f["family"] for f in out["families"]} <= {"dense", "moe", "sectional"} and out["families"]


def test_cli_refuses_a_reference_it_cannot_use_in_one_line(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for bad in ("family=nothing", "famly=dense", "family"):
        assert report_main([str(sweep), "--out", str(tmp_path), "--no-progress", "--reference", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --reference") and "\n" not in err
    assert not (tmp_path / "report.md").exists()  # refused before anything was written
