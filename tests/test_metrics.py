"""Throughput/MFU, memory and W&B metrics: peak lookup, real tiny Trainer runs, offline run files read back."""

from __future__ import annotations

import json
import logging
import math
import struct
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader

from sectional_moe import hardware
from sectional_moe.callbacks import ExpertLoadMonitor, MemoryMonitor, SpeedMonitor, WandbSummary
from sectional_moe.errors import ConfigError
from sectional_moe.flops import flops_per_token, param_counts
from sectional_moe.hardware import Peak, gpu_peak, lookup_gpu, peak_flops
from sectional_moe.lit import LMModule
from sectional_moe.spec import ModelSpec
from sectional_moe.wandb_files import BLOCK, find_run_file, iter_raw_records, read_run, run_dirs, wait_until_written

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


# ---------------------------------------------------------------------------------------------- peak table
@pytest.mark.parametrize("name,dtype,tflops,key", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4, "h100-sxm"),
    ("NVIDIA H100 PCIe", "bf16", 756.0, "h100-pcie"),
    ("NVIDIA H100 NVL", "bf16", 835.5, "h100-nvl"),
    ("NVIDIA H200", "bf16", 989.4, "h200"),
    ("NVIDIA GH200 480GB", "bf16", 989.4, "h100-sxm"),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0, "a100"),
    ("NVIDIA A100-PCIE-40GB", "fp32", 19.5, "a100"),
    ("NVIDIA A100 80GB PCIe", "tf32", 156.0, "a100"),
    ("NVIDIA A10G", "bf16", 125.0, "a10"),
    ("NVIDIA L4", "bf16", 121.0, "l4"),
    ("NVIDIA L40S", "bf16", 362.05, "l40s"),
    ("NVIDIA GeForce RTX 4090", "bf16", 165.2, "rtx-4090"),
    ("Tesla V100-SXM2-16GB", "fp16", 125.0, "v100-sxm"),
    ("Tesla V100-PCIE-32GB", "tf32", 14.0, "v100-pcie"),  # no TF32 cores: the fp32 rate
])
def test_gpu_names_map_to_dense_peaks(name, dtype, tflops, key):
    assert lookup_gpu(name) == key
    assert gpu_peak(name, dtype) == Peak(tflops * 1e12, f"table:{key}")


@pytest.mark.parametrize("name,dtype", [("NVIDIA Quantum X9000", "bf16"), ("Tesla V100-SXM2-16GB", "bf16"), ("", "fp32")])
def test_unknown_gpu_or_dtype_gives_no_peak(name, dtype):
    assert gpu_peak(name, dtype) == Peak(None, "unknown")
    # a CUDA device is never required: the name is passed in
    assert peak_flops("cuda", "bf16-mixed" if dtype == "bf16" else "32-true", device_name=name).flops_per_s is None


def test_override_wins_over_table_and_probe(tmp_path):
    assert peak_flops("cuda", "bf16-mixed", override_tflops=123.0, device_name="NVIDIA H100 80GB HBM3") == Peak(123e12, "override")
    assert peak_flops("cuda", "bf16-mixed", override_tflops=50, device_name="NVIDIA Quantum X9000") == Peak(50e12, "override")
    assert peak_flops("cpu", "32-true", override_tflops=0.5, cache_dir=tmp_path) == Peak(0.5e12, "override")
    assert not (tmp_path / "hardware").exists()  # no probe ran
    for bad in (0, -5, "fast", True):
        with pytest.raises(ConfigError) as err:
            peak_flops("cpu", override_tflops=bad)
        assert err.value.key == "hardware.peak_tflops"


def test_cpu_peak_is_probed_once_then_read_from_the_machine_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "load_average", lambda: 0.0)  # a quiet machine, whatever this one is doing
    first = peak_flops("cpu", "32-true", cache_dir=tmp_path)
    path = hardware.probe_cache_file(tmp_path)
    assert first.source == f"cpu-probe:{path}" and path.parent == tmp_path / "hardware"
    assert first.flops_per_s > 1e8  # any CPU of this decade does > 0.1 GFLOP/s in fp32
    monkeypatch.setattr(hardware, "measure_matmul_flops", lambda *a, **k: pytest.fail("probed again"))
    assert peak_flops("cpu", "32-true", cache_dir=tmp_path) == first


class FakeProbe:
    """The CPU probe without timing: queued rates, and a load / core / thread count set by the test."""

    def __init__(self, monkeypatch) -> None:
        self.rates: list[float] = []
        self.calls, self.load, self.cores, self.threads = 0, 0.0, 4, 2
        monkeypatch.setattr(hardware, "measure_matmul_flops", self._measure)
        monkeypatch.setattr(hardware, "load_average", lambda: self.load)
        monkeypatch.setattr(hardware, "usable_cores", lambda: self.cores)
        monkeypatch.setattr(hardware.torch, "get_num_threads", lambda: self.threads)

    def _measure(self, dtype: str, *args, **kwargs) -> float:
        self.calls += 1
        return self.rates.pop(0)

    def peak(self, cache_dir: Path, precision: str = "32-true", rate: float | None = None) -> float:
        if rate is not None:
            self.rates.append(rate)
        return peak_flops("cpu", precision, cache_dir=cache_dir).flops_per_s


def test_heavy_load_means_other_work_on_the_probes_cores():
    assert not hardware.heavy_load(None, 2, 2)  # no load average (Windows): trusted
    assert not hardware.heavy_load(0.4, 2, 2) and hardware.heavy_load(0.6, 2, 2)
    assert not hardware.heavy_load(1.4, 2, 1) and hardware.heavy_load(1.6, 2, 1)  # one core left idle
    assert not hardware.heavy_load(6.0, 16, 8) and hardware.heavy_load(9.0, 16, 8)


def test_cpu_probe_cache_is_trusted_only_when_quiet_and_at_the_same_thread_count(tmp_path, monkeypatch, caplog):
    probe = FakeProbe(monkeypatch)
    path = hardware.probe_cache_file(tmp_path)
    entries = lambda: json.loads(path.read_text())["probes"]  # noqa: E731

    # quiet (load 1.0 on 4 cores, 2 threads): probed once, recorded with its load and threads, then reused
    probe.load = 1.0
    with caplog.at_level(logging.INFO, logger="sectional_moe.hardware"):
        assert probe.peak(tmp_path, rate=100e9) == 100e9
    assert "CPU peak probe: 100.0 GFLOP/s fp32" in caplog.text and "WARNING" not in caplog.text.upper()
    e = entries()["fp32@2threads"]
    assert (e["threads"], e["cores"], e["loadavg_1m"], e["under_load"]) == (2, 4, 1.0, False)
    assert probe.peak(tmp_path) == 100e9 and probe.calls == 1

    # another thread count is another entry, probed once
    probe.threads, probe.load = 4, 0.2
    assert probe.peak(tmp_path, rate=180e9) == 180e9 and probe.calls == 2
    assert probe.peak(tmp_path) == 180e9 and probe.calls == 2
    e["threads"] = 4  # an entry whose recorded thread count disagrees with its key is not trusted either
    cache = json.loads(path.read_text())
    cache["probes"]["fp32@2threads"] = e
    path.write_text(json.dumps(cache))
    probe.threads = 2
    assert probe.peak(tmp_path, rate=90e9) == 90e9 and probe.calls == 3  # not comparable: replaced

    # under load (3.5 > the 2 idle cores + slack): the probe is used now, stored untrusted, warned about
    probe.load = 3.5
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sectional_moe.hardware"):
        assert probe.peak(tmp_path, "bf16-mixed", rate=50e9) == 50e9
    assert any(r.levelno == logging.WARNING and "busy" in r.getMessage() for r in caplog.records)
    assert entries()["bf16@2threads"]["under_load"] is True and entries()["bf16@2threads"]["loadavg_1m"] == 3.5
    # ... so every later run probes again, keeping the best rate (a peak is only ever under-measured)
    assert probe.peak(tmp_path, "bf16-mixed", rate=40e9) == 50e9 and probe.calls == 5
    probe.load = 0.5
    assert probe.peak(tmp_path, "bf16-mixed", rate=120e9) == 120e9 and probe.calls == 6
    assert entries()["bf16@2threads"]["under_load"] is False
    assert probe.peak(tmp_path, "bf16-mixed") == 120e9 and probe.calls == 6  # quiet now: trusted
    probe.load = 9.0
    assert probe.peak(tmp_path, "bf16-mixed") == 120e9 and probe.calls == 6  # a trusted entry survives later load


def test_cpu_probe_entries_of_the_old_format_are_probed_again(tmp_path, monkeypatch):
    """Entries without a recorded load (the 0.25 s probe that once gave an MFU of ~0.9) are not trusted."""
    probe = FakeProbe(monkeypatch)
    path = hardware.probe_cache_file(tmp_path)
    path.parent.mkdir(parents=True)
    old = {"flops_per_s": 3e9, "shape": [512, 512, 512], "torch": "2.5", "measured_at": "2025-01-01T00:00:00"}
    path.write_text(json.dumps({"probes": {"fp32@2threads": old}, "cpu_model": "x", "hostname": "h"}))
    assert probe.peak(tmp_path, rate=80e9) == 80e9 and probe.calls == 1
    assert probe.peak(tmp_path) == 80e9 and probe.calls == 1
    path.write_text("{not json")  # a corrupt cache is re-measured
    assert probe.peak(tmp_path, rate=70e9) == 70e9 and probe.calls == 2


# ---------------------------------------------------------------------------------------------- throughput
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
    from sectional_moe.train import build_callbacks

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


def _frame(records: list[bytes]) -> bytes:
    """Write records in the .wandb framing (LevelDB log blocks), splitting across blocks."""
    out = bytearray(b":W&B" + struct.pack("<HB", 0xBEE1, 0))
    for rec in records:
        first = True
        while True:
            room = BLOCK - len(out) % BLOCK
            if room < 7:
                out += b"\0" * room
                continue
            piece, rec = rec[: room - 7], rec[room - 7:]
            kind = (1 if not rec else 2) if first else (4 if not rec else 3)
            out += struct.pack("<IHB", 0, len(piece), kind) + piece
            first = False
            if not rec:
                break
    return bytes(out)


def test_run_file_reader_reassembles_records_spanning_blocks(tmp_path):
    from wandb.proto import wandb_internal_pb2 as pb

    records = []
    for i in range(3):
        rec = pb.Record()
        item = rec.summary.update.add()
        item.key, item.value_json = f"k{i}", f'"{"x" * (50_000 * i)}"'
        records.append(rec.SerializeToString())
    path = tmp_path / "run-test.wandb"
    path.write_bytes(_frame(records) + b"\0" * 100)  # a zero-filled tail ends the log
    assert list(iter_raw_records(path)) == records
    assert read_run(path)["summary"] == {f"k{i}": "x" * (50_000 * i) for i in range(3)}
    path.write_bytes(_frame(records)[:-10])  # a killed run: the last record is cut short
    assert len(list(iter_raw_records(path))) == 2


def test_a_run_file_counts_as_written_only_once_it_holds_its_exit_record(tmp_path):
    from wandb.proto import wandb_internal_pb2 as pb

    from sectional_moe.wandb_files import has_exit_record

    summary = pb.Record()
    summary.summary.update.add(key="k", value_json="1")
    exit_rec = pb.Record()
    exit_rec.exit.exit_code = 0
    path = tmp_path / "run-x.wandb"
    assert not has_exit_record(path)  # not created yet
    path.write_bytes(_frame([]))  # the 7-byte header wandb-core writes first
    assert not has_exit_record(path) and not wait_until_written(path, timeout_s=0.2)
    path.write_bytes(_frame([summary.SerializeToString()]))
    assert not has_exit_record(path)
    path.write_bytes(_frame([summary.SerializeToString(), exit_rec.SerializeToString()]))
    assert has_exit_record(path) and wait_until_written(path, timeout_s=0.2)
