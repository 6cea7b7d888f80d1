"""Throughput/MFU, memory and W&B metrics: peak lookup, real tiny Trainer runs, offline run files read back."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader

from sectional_moe.callbacks import ExpertLoadMonitor, MemoryMonitor, SpeedMonitor, WandbSummary
from sectional_moe.models.flops import flops_per_token, param_counts
from sectional_moe.hardware import Peak
from sectional_moe.training.module import LMModule
from sectional_moe.models.spec import ModelSpec
from sectional_moe.tracking.wandb_files import find_run_file, iter_raw_records, read_run, run_dirs, wait_until_written

B, T, V = 4, 32, 97  # batch, seq_len and vocabulary of every run here
OPTIM = dict(lr=1e-3, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1, fused=False, schedule="constant",
             warmup_steps=1, min_lr_ratio=0.1)


def tiny_module(family: str = "dense", routing: str | None = None, max_steps: int = 12) -> LMModule:
    spec = ModelSpec(family=family, routing=routing, experts=None if family == "dense" else 4, vocab_size=V,
                     d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, seq_len=T).validate()
    torch.manual_seed(0)
    return LMModule(spec.to_dict(), OPTIM, max_steps)


def token_loader(n: int = 256, delay_s: float = 0.0) -> DataLoader:
    """Random token blocks (B, T+1); ``delay_s`` of collate time per batch imitates a slow loader."""
    data = torch.randint(0, V, (n, T + 1), generator=torch.Generator().manual_seed(0))

    def collate(rows: list[torch.Tensor]) -> torch.Tensor:
        if delay_s:
            time.sleep(delay_s)
        return torch.stack(rows)

    return DataLoader(data, batch_size=B, collate_fn=collate)


class CaptureLogger(Logger):
    """Keeps every logged row and hyper-parameter in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, Any]] = []
        self.params: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return "capture"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append({**metrics, "step": step})

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self.params.update(dict(params))


class Stopwatch(pl.Callback):
    """Independent host timing: the end of every training batch and every validation interval."""

    def __init__(self) -> None:
        self.batch_start: list[float] = []
        self.batch_end: dict[int, float] = {}
        self.val_start: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch_start.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batch_end[trainer.global_step] = time.perf_counter()

    def on_validation_start(self, trainer, pl_module):
        self.val_start.append(time.perf_counter())

    def paused(self, start: float, end: float) -> float:
        """Time from each validation start to the next training batch start, within (start, end)."""
        return sum(min(t for t in self.batch_start if t > v) - v for v in self.val_start if start < v < end)


class SlowValidation(pl.Callback):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_validation_batch_end(self, *args, **kwargs):
        time.sleep(self.seconds)


def fit(module: LMModule, callbacks: list[pl.Callback], *, root: Path, max_steps: int = 12, log_every: int = 3,
        val_every: int = 6, loggers: list[Logger] | None = None, loader_delay: float = 0.0, test: bool = False) -> pl.Trainer:
    trainer = pl.Trainer(
        default_root_dir=str(root),  # files a callback writes (expert_load.json) stay in the test's directory
        accelerator="cpu", devices=1, precision="32-true", max_steps=max_steps, max_epochs=-1, log_every_n_steps=log_every,
        val_check_interval=val_every, check_val_every_n_epoch=None, limit_val_batches=2, limit_test_batches=2,
        num_sanity_val_steps=0, logger=loggers or False, callbacks=callbacks, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, token_loader(delay_s=loader_delay), token_loader(32))
    if test:
        trainer.test(module, token_loader(32), verbose=False)
    return trainer


@pytest.fixture(autouse=True)
def _no_wandb_by_default(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


def test_speed_monitor_on_a_run_of_known_size(tmp_path):
    """12 steps of B=4 x T=32 tokens, logged every 3 steps; a slow loader and a slow validation."""
    module = tiny_module()
    speed, memory, watch, capture = SpeedMonitor(cache_dir=str(tmp_path)), MemoryMonitor(), Stopwatch(), CaptureLogger()
    summary = WandbSummary()  # no WandbLogger: keeps its values, writes nothing
    delay, val_sleep = 0.02, 0.25
    offset = 2**30 + 1  # as if resumed after 1G tokens: float32 would round the counters
    speed.load_state_dict({"tokens": offset, "samples": 0})
    fit(module, [watch, speed, memory, summary, SlowValidation(val_sleep)], root=tmp_path, loggers=[capture],
        loader_delay=delay)

    fpt = flops_per_token(module.spec, training=True)
    peak = speed.peak.flops_per_s
    assert speed.peak.source.startswith("cpu-probe:") and peak > 0
    assert capture.params["perf/peak_tflops"] == pytest.approx(peak / 1e12)
    train_rows = [r for r in capture.rows if "perf/tokens_per_s" in r]
    assert [r["step"] for r in train_rows] == [2, 5, 8, 11]  # Lightning's 0-based log steps 3, 6, 9, 12
    windows = []
    for i, row in enumerate(train_rows):
        step = 3 * (i + 1)
        assert row["perf/tokens"] == offset + step * B * T  # exact cumulative counters
        assert row["perf/flops"] == (offset + step * B * T) * fpt
        seconds = 3 * row["perf/step_time_s"]
        windows.append(seconds)
        assert row["perf/tokens_per_s"] * seconds == pytest.approx(3 * B * T, rel=1e-9)
        assert row["perf/samples_per_s"] * seconds == pytest.approx(3 * B, rel=1e-9)
        assert row["perf/tflops_per_s_per_device"] * 1e12 == pytest.approx(row["perf/tokens_per_s"] * fpt, rel=1e-9)
        assert row["perf/mfu"] == pytest.approx(row["perf/tokens_per_s"] * fpt / peak, rel=1e-9)
        assert 0 < row["perf/mfu"] < 1
        # the loader sleeps `delay` per batch, outside the training step; the clock starts at the first
        # batch and restarts at the first batch after validation (step 7), so two windows see 2 loads
        assert row["perf/data_share"] * seconds >= (2 if i in (0, 2) else 3) * delay * 0.9
        assert 0 < row["perf/data_share"] < 1
        if i == 0:
            continue
        # independent wall clock between the batch ends that bound the window, minus validation
        start, end = watch.batch_end[step - 3], watch.batch_end[step]
        assert seconds == pytest.approx(end - start - watch.paused(start, end), rel=0.1, abs=0.005)
        assert seconds < 3 * delay + 2 * val_sleep  # validation (2 batches x val_sleep) is not train time
    val_rows = [r for r in capture.rows if "val/loss" in r]
    assert [r["perf/tokens"] for r in val_rows] == [offset + 6 * B * T, offset + 12 * B * T]  # x-axes in eval rows too

    # steady state: the windows after the first, time-weighted
    steady = speed.summary()
    assert steady["perf/steady_windows"] == 3
    assert steady["perf/tokens_per_s"] == pytest.approx(9 * B * T / sum(windows[1:]), rel=1e-6)
    assert steady["perf/mfu"] == pytest.approx(steady["perf/tokens_per_s"] * fpt / peak, rel=1e-9)
    assert summary.values["summary/tokens_per_s"] == steady["perf/tokens_per_s"]
    assert summary.values["summary/tokens"] == offset + 12 * B * T

    # CPU memory: this process's resident set
    mem_rows = [r for r in capture.rows if "mem/rss_gib" in r]
    assert len(mem_rows) == 4
    assert all(0 < r["mem/rss_gib"] <= r["mem/peak_rss_gib"] and 0 < r["mem/rss_pct"] < 100 for r in mem_rows)
    assert summary.values["summary/mem_peak_rss_gib"] >= mem_rows[-1]["mem/peak_rss_gib"]


def test_no_mfu_when_the_peak_is_unknown_and_override_sets_it(tmp_path, monkeypatch):
    import sectional_moe.callbacks.throughput as throughput

    capture = CaptureLogger()
    with monkeypatch.context() as m:  # what an unlisted GPU gives
        m.setattr(throughput, "peak_flops", lambda *a, **k: Peak(None, "unknown"))
        fit(tiny_module(max_steps=4), [SpeedMonitor()], root=tmp_path, max_steps=4, log_every=2, val_every=4, loggers=[capture])
    rows = [r for r in capture.rows if "perf/tokens_per_s" in r]
    assert rows and all("perf/mfu" not in r and r["perf/tflops_per_s_per_device"] > 0 for r in rows)
    assert capture.params["perf/peak_tflops"] is None and capture.params["perf/peak_source"] == "unknown"

    capture = CaptureLogger()
    speed = SpeedMonitor(peak_tflops=0.001, cache_dir=str(tmp_path))
    fit(tiny_module(max_steps=4), [speed], root=tmp_path, max_steps=4, log_every=2, val_every=4, loggers=[capture])
    assert speed.peak == Peak(1e9, "override")
    row = [r for r in capture.rows if "perf/mfu" in r][-1]
    assert row["perf/mfu"] == pytest.approx(row["perf/tflops_per_s_per_device"] * 1e12 / 1e9, rel=1e-9)


def test_default_callbacks_config_builds_the_metrics_callbacks(compose, tmp_path):
    from sectional_moe.training.run import build_callbacks

    cfg = compose("hardware.peak_tflops=12.5", f"paths.cache_dir={tmp_path}")
    callbacks = {type(c): c for c in build_callbacks(cfg)}
    assert {SpeedMonitor, MemoryMonitor, WandbSummary, ExpertLoadMonitor} <= set(callbacks)
    assert callbacks[SpeedMonitor].peak_tflops == 12.5 and callbacks[SpeedMonitor].cache_dir == str(tmp_path)


# ---------------------------------------------------------------------------------------------- expert load
def _load_keys(rows: list[dict[str, Any]]) -> set[str]:
    return {k for r in rows for k in r if k.startswith("moe/") and k not in ("moe/lb_loss", "moe/z_loss")}


def test_expert_load_is_logged_per_layer_with_fractions_under_the_cap(tmp_path, caplog):
    module = tiny_module("moe", "topk", max_steps=6)  # 2 routed layers x 4 experts = 8 fraction keys
    capture = CaptureLogger()
    fit(module, [ExpertLoadMonitor()], root=tmp_path, max_steps=6, log_every=3, val_every=6, loggers=[capture])
    keys = _load_keys(capture.rows)
    per_layer = {f"moe/layer{i}/{k}" for i in (0, 1) for k in ("load_max_over_mean", "load_cv", "dead_experts")}
    fracs = {f"moe/layer{i}/frac_e{e}" for i in (0, 1) for e in range(4)}
    summary = {"moe/load_max_over_mean", "moe/load_cv", "moe/dead_experts", *(f"moe/expert{e}/frac" for e in range(4))}
    assert keys == per_layer | fracs | summary
    layer_rows = [r for r in capture.rows if "moe/layer0/load_cv" in r]
    assert [r["step"] for r in layer_rows] == [2, 5]  # log steps only
    for row in layer_rows:
        for i in (0, 1):  # fractions of one layer's assignments sum to 1; max/mean is max(frac) * E
            frac = [row[f"moe/layer{i}/frac_e{e}"] for e in range(4)]
            assert sum(frac) == pytest.approx(1.0)
            assert row[f"moe/layer{i}/load_max_over_mean"] == pytest.approx(4 * max(frac), rel=1e-5)
            assert row[f"moe/layer{i}/dead_experts"] == sum(f == 0 for f in frac)
    assert "not logged" not in caplog.text


def test_expert_load_key_count_is_bounded_whatever_the_number_of_experts(tmp_path, caplog):
    """Above the cap only the summary statistics are logged, and the run says so once."""
    from sectional_moe.callbacks.expert_load import layer_metrics, summary_metrics, window_stats

    L, E = 6, 32  # 192 > 64 layer x expert fractions
    window = [torch.rand(E) * 10 for _ in range(L)]
    window[0][3] = 0.0
    monitor = ExpertLoadMonitor(max_expert_keys=16, max_layer_frac_keys=64)
    monitor._window = window
    assert not monitor.layer_fractions
    stats = window_stats(window)
    summary, layers = summary_metrics(stats, 16), layer_metrics(list(range(L)), stats, monitor.layer_fractions)
    assert len(summary) == 3 + 16 and len(layers) == 3 * L
    assert layers["moe/layer0/dead_experts"] == 1.0 and summary["moe/dead_experts"].item() == 1.0
    assert not any("frac_e" in k for k in layers)
    with_fracs = layer_metrics(list(range(2)), stats[:2], True)
    assert len(with_fracs) == 2 * (3 + E)  # under a larger cap: every fraction of every layer

    # a real run with more layer x experts than the cap: summary keys only, one info line
    module = tiny_module("moe", "topk", max_steps=6)
    capture = CaptureLogger()
    with caplog.at_level(logging.INFO, logger="sectional_moe.callbacks.expert_load"):
        fit(module, [ExpertLoadMonitor(max_expert_keys=2, max_layer_frac_keys=7)], root=tmp_path, max_steps=6,
            log_every=2, val_every=6, loggers=[capture])
    keys = _load_keys(capture.rows)
    assert not any("frac_e" in k for k in keys) and len(keys) == 3 + 2 + 3 * 2
    assert sum("max_layer_frac_keys=7" in r.getMessage() for r in caplog.records) == 1  # said once, 3 log steps
    assert json.loads((tmp_path / "expert_load.json").read_text()).keys() == {"layer0", "layer1"}  # all in the file


# ---------------------------------------------------------------------------------------------- W&B
def test_offline_wandb_run_file_holds_the_summary_keys(tmp_path, monkeypatch):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb.finish()  # a run another in-process test left open would be reused by WandbLogger (pitfall P2)
    module = tiny_module("moe", "topk", max_steps=8)
    logger = WandbLogger(project="sectional-moe-test", save_dir=str(tmp_path), mode="offline")
    summary = WandbSummary()
    try:
        fit(module, [SpeedMonitor(cache_dir=str(tmp_path)), MemoryMonitor(), ExpertLoadMonitor(), summary],
            root=tmp_path, max_steps=8, log_every=2, val_every=4, loggers=[logger], test=True)
        run_file = logger.experiment.settings.sync_file
    finally:
        wandb.finish()
    assert wait_until_written(run_file)  # wandb-core may still be writing when finish() returns
    (run_dir,) = run_dirs(tmp_path)
    run = read_run(run_dir)
    s = run["summary"]
    params = param_counts(module.spec)
    expected = {
        "summary/val_ppl_best", "summary/val_ppl_final", "summary/val_loss_best", "summary/test_ppl", "summary/test_loss",
        "summary/tokens_per_s", "summary/tokens_per_s_per_device", "summary/mfu", "summary/peak_tflops",
        "summary/peak_source", "summary/mem_peak_rss_gib", "summary/params_total", "summary/params_active",
        "summary/flops_per_token", "summary/tokens", "summary/flops",
    }
    assert expected <= set(s), (sorted(expected - set(s)), _record_kinds(run_dir), run["exit_code"])
    assert {k: s[k] for k in summary.values} == summary.values  # what the callback computed, read back
    assert s["summary/params_total"] == params["total"] and s["summary/params_active"] == params["active"]
    assert s["summary/flops_per_token"] == flops_per_token(module.spec, training=True)
    assert s["summary/tokens"] == 8 * B * T
    assert s["summary/val_ppl_best"] <= s["summary/val_ppl_final"]
    assert s["summary/test_ppl"] == pytest.approx(math.exp(s["summary/test_loss"]), rel=1e-5)
    assert s["summary/mfu"] == pytest.approx(s["summary/tflops_per_s_per_device"] / s["summary/peak_tflops"], rel=1e-9)
    assert run["config"]["perf/peak_tflops"] == s["summary/peak_tflops"]
    # charts: every namespaced metric plots against cumulative tokens by default
    for key in ("train/loss", "val/ppl", "test/ppl", "perf/mfu", "mem/rss_gib", "moe/lb_loss", "moe/load_cv"):
        assert run["metrics"].get(key) == "perf/tokens", key
    assert run["metrics"]["perf/tokens"] is None and "perf/flops" in run["metrics"]
    rows_with_val = [r for r in run["history"] if "val/ppl" in r]
    assert rows_with_val and all("perf/tokens" in r and "perf/flops" in r for r in rows_with_val)
    # other rows get the x-axis from W&B's step_sync
    assert all("perf/tokens" in r for r in run["history"] if "train/loss" in r or "mem/rss_gib" in r)


def _record_kinds(run_dir: Path) -> dict[str, int]:
    """How many records of each kind a run file holds (for a failure message)."""
    from collections import Counter

    from wandb.proto import wandb_internal_pb2 as pb

    kinds: Counter[str] = Counter()
    for raw in iter_raw_records(find_run_file(run_dir)):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kinds[rec.WhichOneof("record_type") or "?"] += 1
    return dict(kinds)
