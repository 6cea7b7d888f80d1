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
from sectional_moe.report.collect import (
    RunRecord, collect, comparable, expert_fractions, find_wandb_files, read_wandb_files, record_from_api_run,
    steady_state, tidy_row, to_frame,
)
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
    fail_id = a.index[a["state"] == "failed"][0]
    if fail_id in b.index:  # the job failed after W&B started (AdamW at fit time): W&B also says failed
        assert b.loc[fail_id, "state"] == "failed"
    common = sorted(b.index)
    pd.testing.assert_frame_equal(a.loc[common], b.loc[common], check_exact=False, rtol=1e-9)
    assert set(wb["source"]) == {"wandb-offline"} and set(runs_table["source"]) == {"runs"}


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
    from sectional_moe.wandb_files import read_run, run_dirs

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
            rows.append({"run": f"sect E={E} s={seed}", "run_id": f"s{E}{seed}", "state": "done", "family": "sectional",
                         "size": "tiny", "experts": E, "routing": "segment_fixed", "seed": seed, "step_time_s": t,
                         "compute_flops": C, "tokens": C / 1e6, "flops_per_token": 1e6, "params_total": 1e6,
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
    assert k.fit is not None and k.fit.kappa == pytest.approx(0.004, abs=5e-4)  # the overhead the data was made with
    true_t = {E: 1.0 + 2.0 * (1 / E + 1 / E**2) + 0.004 * E**2 for E in (1, 2, 4, 8, 16)}
    assert k.fit.measured_e_opt == min(true_t, key=true_t.get)  # the swept E with the lowest step time (8)
    fits = {f.family: f for f in report.law_fits}
    sect = fits["sectional"]
    assert sect.reason is None and 0.1 < sect.params["alpha"] < 0.6
    inside = (sect.band[0] <= sect.curve + 1e-9) & (sect.curve <= sect.band[1] + 1e-9)
    assert inside.mean() > 0.9  # the fitted curve lies within its bootstrap band
    assert "needs >=" in fits["dense"].reason
    assert all(f.png is not None for f in report.figures), [(f.slug, f.skipped) for f in report.figures]
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
