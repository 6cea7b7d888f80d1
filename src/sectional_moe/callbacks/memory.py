"""Device memory per logging window (torchtitan's DeviceMemoryMonitor convention), this rank's own.

On CUDA, read from the caching allocator's host-side counters (no device sync), with the peaks
reset after every window so each logged value is that window's peak:

* ``mem/max_allocated_gib``, ``mem/max_reserved_gib``: peak memory held by tensors / by the allocator;
* ``mem/max_allocated_pct``, ``mem/max_reserved_pct``: the same as % of the device's capacity;
* ``mem/alloc_retries``: cudaMalloc retries after freeing cached blocks (memory pressure; slow);
* ``mem/ooms``: out-of-memory errors the allocator raised.

On CPU: ``mem/rss_gib`` (resident set now), ``mem/peak_rss_gib`` (process peak so far; the OS keeps
no per-window peak) and ``mem/rss_pct`` (% of physical RAM).

Each rank measures itself; only rank 0's loggers write, so the logged values are rank 0's.
"""

from __future__ import annotations

import os
import resource
import sys
from typing import Any

import lightning.pytorch as pl
import torch

from sectional_moe.callbacks.throughput import StepClock, log_to_loggers

GIB = 1024**3
CUDA_MEM_KEYS = ("mem/max_allocated_gib", "mem/max_reserved_gib", "mem/max_allocated_pct", "mem/max_reserved_pct",
                 "mem/alloc_retries", "mem/ooms")
CPU_MEM_KEYS = ("mem/rss_gib", "mem/peak_rss_gib", "mem/rss_pct")


def cpu_memory() -> dict[str, float]:
    """Resident set size now and at its peak (GiB), and as % of physical RAM."""
    rss = peak = None
    try:  # Linux: VmRSS and VmHWM are read together, so peak >= rss (getrusage lags behind)
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        rss = int(fields["VmRSS"].split()[0]) * 1024
        peak = int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
        rss = peak
    peak = max(peak, rss)
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return {"mem/rss_gib": rss / GIB, "mem/peak_rss_gib": peak / GIB, "mem/rss_pct": 100.0 * rss / total}


def cuda_memory(device: torch.device) -> dict[str, float]:
    """Peak allocated/reserved memory since the last reset, capacity shares, retries and OOMs."""
    stats = torch.cuda.memory_stats(device)
    capacity = torch.cuda.get_device_properties(device).total_memory
    allocated = stats.get("allocated_bytes.all.peak", 0)
    reserved = stats.get("reserved_bytes.all.peak", 0)
    return {
        "mem/max_allocated_gib": allocated / GIB,
        "mem/max_reserved_gib": reserved / GIB,
        "mem/max_allocated_pct": 100.0 * allocated / capacity,
        "mem/max_reserved_pct": 100.0 * reserved / capacity,
        "mem/alloc_retries": float(stats.get("num_alloc_retries", 0)),
        "mem/ooms": float(stats.get("num_ooms", 0)),
    }


class MemoryMonitor(pl.Callback):
    """Logs this rank's memory on logging steps and keeps the run's peak for the summary."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.peaks: dict[str, float] = {}
        self._clock = StepClock()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.device = trainer.strategy.root_device

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._clock.last_step = trainer.global_step
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def measure(self) -> dict[str, float]:
        """Current window's figures for this process's device."""
        return cuda_memory(self.device) if self.device.type == "cuda" else cpu_memory()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        _, log_now = self._clock.advance(trainer)
        if not log_now:
            return
        metrics = self.measure()
        for key, value in metrics.items():
            self.peaks[key] = max(self.peaks.get(key, value), value)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        log_to_loggers(trainer, metrics)

    def summary(self) -> dict[str, float]:
        """Largest value of every ``mem/`` key over the run's windows (plus a final reading)."""
        if self._clock.last_step is not None:
            for key, value in self.measure().items():
                self.peaks[key] = max(self.peaks.get(key, value), value)
        return dict(self.peaks)
