"""Training throughput, model FLOP/s and MFU, measured over logging windows.

A *window* is the run of optimiser steps between two logging steps (``trainer.log_every_n_steps``).
Per batch the callback only adds Python integers (tokens and samples, read from the batch *shape*)
and host timestamps, so the hot path never waits for the device. On a log step it synchronises
the device once, closes the window and sends one row straight to the loggers (see
:func:`log_to_loggers`; keys in :data:`PERF_KEYS`):

* ``perf/tokens_per_s`` (global) and ``perf/tokens_per_s_per_device``, ``perf/samples_per_s`` (global);
* ``perf/step_time_s``: window wall time / optimiser steps in it;
* ``perf/data_share``: fraction of the window spent between a batch's end and the next batch's
  start (waiting for the data loader, plus Lightning's per-batch bookkeeping);
* ``perf/tflops_per_s_per_device``: model FLOPs (``flops_per_token(spec, training=True)`` per
  trained token, PaLM convention: no recompute) per second;
* ``perf/mfu``: that rate / the device's dense peak (a fraction, 0-1); absent when the peak is unknown;
* ``perf/tokens``, ``perf/flops``: cumulative trained tokens and model FLOPs over all ranks (x-axes
  for scaling plots; they continue across restarts through the callback's checkpointed state).

Global figures are the per-device ones times ``world_size``: every rank trains batches of the same
shape in lock-step under DDP/FSDP, so summing over ranks needs no collective.

Validation, and the checkpoint saved after it, are excluded from train time: the clock stops at
``on_validation_start`` and restarts at the start of the next training batch (the device is
synchronised at both ends, once per validation). The loading of that one batch is excluded too:
Lightning fetches it after the checkpoint, and the two cannot be told apart from a callback.

*Steady state* drops the first ``warmup_windows`` windows of each fit (compilation, allocator and
data-loader warm-up; the first window also starts only at the first batch). :meth:`SpeedMonitor.summary`
returns time-weighted steady-state figures: total tokens / total time over the steady windows.

The peak used as the MFU denominator is logged once as run config (``perf/peak_tflops``,
``perf/peak_source``), so every MFU can be checked by hand.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch

from sectional_moe.models.flops import flops_per_token
from sectional_moe.hardware import Peak, peak_flops

PERF_KEYS = (
    "perf/tokens_per_s", "perf/tokens_per_s_per_device", "perf/samples_per_s", "perf/step_time_s",
    "perf/data_share", "perf/tflops_per_s_per_device", "perf/mfu", "perf/tokens", "perf/flops",
)


def batch_shape(batch: Any) -> tuple[int, int]:
    """(samples, trained tokens) of a batch of token blocks (B, T+1): B and B*T. Shape only, no sync."""
    ids = batch[0] if isinstance(batch, (list, tuple)) else batch
    if isinstance(ids, dict):
        ids = ids.get("input_ids", next(iter(ids.values())))
    B = int(ids.shape[0])
    T = int(ids.shape[1]) - 1 if ids.dim() > 1 else 1  # the last position of a block is only a target
    return B, B * max(T, 1)


def log_to_loggers(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Send host floats straight to the loggers at Lightning's current logging step.

    ``LightningModule.log`` costs 1-2 ms *per key* on a slow CPU (it moves each key's result state
    to the value's device through a generic collection walk), which made 12 keys per log step cost
    4 % of a nano step; one ``log_metrics`` call per logger costs a fraction of that. The metrics
    form their own logger row at the same ``trainer/global_step`` as Lightning's row.
    """
    if not trainer.loggers:
        return
    # Lightning's own logging step (optimiser steps taken before this one), as its rows use
    step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step - 1)
    for lg in trainer.loggers:
        lg.log_metrics(metrics, step=step)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work so host timestamps mean something (log steps only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Tells on which ``on_train_batch_end`` an optimiser step just finished on a logging step.

    ``global_step`` only moves when the optimiser steps, so with gradient accumulation the
    micro-batches in between are never log steps; this matches Lightning's own logging cadence.
    """

    def __init__(self) -> None:
        self.last_step: int | None = None

    def advance(self, trainer: pl.Trainer) -> tuple[int, bool]:
        """-> (optimiser steps since the previous call, is this a logging step)."""
        step = trainer.global_step
        stepped = 0 if self.last_step is None else step - self.last_step  # reset in on_train_start
        self.last_step = step
        every = trainer.log_every_n_steps
        return stepped, bool(stepped and every and step % every == 0)


class SpeedMonitor(pl.Callback):
    """Tokens/s, samples/s, step time, data-loading share, model FLOP/s and MFU (see module doc).

    Args:
        peak_tflops: ``hardware.peak_tflops`` override (dense TFLOP/s per device); None = the
            device table or, on CPU, the cached matmul probe.
        cache_dir: ``paths.cache_dir``: where the CPU probe result is cached.
        warmup_windows: logging windows per fit excluded from the steady-state summary.
    """

    def __init__(self, peak_tflops: float | None = None, cache_dir: str | None = None, warmup_windows: int = 1):
        self.peak_tflops = peak_tflops
        self.cache_dir = cache_dir
        self.warmup_windows = max(0, int(warmup_windows))
        self.peak = Peak(None, "unknown")
        self.flops_per_token: float | None = None
        self.world_size = 1
        self.device = torch.device("cpu")
        # cumulative over all ranks, checkpointed
        self.tokens = 0
        self.samples = 0
        self.last_metrics: dict[str, float] = {}  # the last logged window
        self._clock = StepClock()
        self._reset_run()

    # ------------------------------------------------------------------------------------------
    def _reset_run(self) -> None:
        self._windows = 0
        self._steady = {"tokens": 0, "samples": 0, "steps": 0, "time": 0.0, "data": 0.0}
        self._win_start: float | None = None
        self._last_end: float | None = None
        self._eval_start: float | None = None
        self._reset_window()

    def _reset_window(self) -> None:
        self._win = {"tokens": 0, "samples": 0, "steps": 0, "data": 0.0, "excluded": 0.0}

    def state_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "samples": self.samples}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens = int(state_dict.get("tokens", 0))
        self.samples = int(state_dict.get("samples", 0))

    # ------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.device = trainer.strategy.root_device
        self.world_size = trainer.world_size
        spec = getattr(pl_module, "spec", None)
        self.flops_per_token = flops_per_token(spec, training=True) if spec is not None else None
        self.peak = peak_flops(self.device, trainer.precision, override_tflops=self.peak_tflops, cache_dir=self.cache_dir)

    @property
    def peak_tflops_used(self) -> float | None:
        return None if self.peak.flops_per_s is None else self.peak.flops_per_s / 1e12

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset_run()
        self._clock.last_step = trainer.global_step
        params = {"perf/peak_tflops": self.peak_tflops_used, "perf/peak_source": self.peak.source,
                  "perf/flops_per_token": self.flops_per_token}
        for lg in trainer.loggers:
            lg.log_hyperparams(params)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._eval_start is not None:  # validation (and its checkpoint) ran since the last batch
            synchronize(self.device)
            now = time.perf_counter()
            self._win["excluded"] += now - self._eval_start
            self._eval_start = self._last_end = None
        if self._win_start is None:
            self._win_start = now
        elif self._last_end is not None:
            self._win["data"] += now - self._last_end

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        samples, tokens = batch_shape(batch)
        self._win["samples"] += samples
        self._win["tokens"] += tokens
        self.samples += samples * self.world_size
        self.tokens += tokens * self.world_size
        stepped, log_now = self._clock.advance(trainer)
        self._win["steps"] += stepped
        if log_now and self._win_start is not None:
            synchronize(self.device)
            self.last_metrics = self._close_window(time.perf_counter())
            log_to_loggers(trainer, self.last_metrics)
        self._last_end = time.perf_counter()

    def _close_window(self, now: float) -> dict[str, float]:
        w = self._win
        elapsed = max(now - self._win_start - w["excluded"], 1e-9)
        metrics = self.rates(w["tokens"], w["samples"], w["steps"], elapsed, w["data"])
        metrics["perf/tokens"] = float(self.tokens)
        if self.flops_per_token is not None:
            metrics["perf/flops"] = float(self.tokens) * self.flops_per_token
        self._windows += 1
        if self._windows > self.warmup_windows:
            for key in ("tokens", "samples", "steps", "data"):
                self._steady[key] += w[key]
            self._steady["time"] += elapsed
        self._win_start = now
        self._reset_window()
        return metrics

    def rates(self, tokens: int, samples: int, steps: int, seconds: float, data_seconds: float) -> dict[str, float]:
        """Per-window (or steady-state) metrics from local counts over ``seconds`` of train time."""
        out = {
            "perf/tokens_per_s": tokens * self.world_size / seconds,
            "perf/tokens_per_s_per_device": tokens / seconds,
            "perf/samples_per_s": samples * self.world_size / seconds,
            "perf/data_share": data_seconds / seconds,
        }
        if steps:
            out["perf/step_time_s"] = seconds / steps
        if self.flops_per_token is not None:
            flops_per_s = tokens * self.flops_per_token / seconds
            out["perf/tflops_per_s_per_device"] = flops_per_s / 1e12
            if self.peak.flops_per_s:
                out["perf/mfu"] = flops_per_s / self.peak.flops_per_s
        return out

    # ------------------------------------------------------------------------------------------
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self._win_start is None or self._eval_start is not None:
            return
        synchronize(self.device)
        self._eval_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log_x_axes(pl_module)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_x_axes(pl_module)

    def _log_x_axes(self, pl_module: pl.LightningModule) -> None:
        """Put the cumulative x-axes into evaluation rows too, so val/test curves plot against them.

        Through ``self.log`` to share the evaluation row (two keys per evaluation: its cost is moot).
        float64, because float32 drifts past 2^24 tokens; ``max`` over ranks of identical values,
        so DDP neither warns nor changes them.
        """
        if self.tokens == 0:  # an evaluation outside a fit: there is no training x-axis to report
            return
        metrics = {"perf/tokens": float(self.tokens)}
        if self.flops_per_token is not None:
            metrics["perf/flops"] = float(self.tokens) * self.flops_per_token
        device = pl_module.device
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        pl_module.log_dict({k: torch.tensor(v, dtype=dtype, device=device) for k, v in metrics.items()},
                           batch_size=1, sync_dist=True, reduce_fx="max")

    # ------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Steady-state figures of this fit (``perf/...`` rate keys, time-weighted over the windows
        after the first ``warmup_windows``; empty rates if there were none), the peak and totals."""
        s = self._steady
        out: dict[str, Any] = {}
        if s["time"] > 0:
            out.update(self.rates(s["tokens"], s["samples"], s["steps"], s["time"], s["data"]))
        out.update({
            "perf/steady_windows": max(0, self._windows - self.warmup_windows),
            "perf/peak_tflops": self.peak_tflops_used,
            "perf/peak_source": self.peak.source,
            "perf/tokens": float(self.tokens),
        })
        if self.flops_per_token is not None:
            out["perf/flops"] = float(self.tokens) * self.flops_per_token
        return out
