"""W&B integration: x-axes for charts and the run summary a runs table compares.

``define_metric``: ``perf/tokens`` and ``perf/flops`` are declared as metrics, and every
``train/ val/ test/ perf/ mem/ moe/`` metric gets ``x_axis`` (default ``perf/tokens``) as its
default x-axis. Both counters are logged in every ``perf/`` row and every val/test row (by
:class:`~sectional_moe.callbacks.throughput.SpeedMonitor`); W&B's ``step_sync`` copies the current
x-axis value into the other rows (``train/``, ``moe/``, ``mem/``), so every chart has it.
W&B applies the *first* matching glob, and Lightning's ``WandbLogger`` declares ``*`` (x-axis
``trainer/global_step``) when the run starts, so our ``<ns>/*`` globs alone would never apply
(checked on offline runs): each metric is therefore also declared by its exact name, the known
ones at setup and new ones as they first appear (checked on log steps, validation and test ends).

Run summary keys (:data:`SUMMARY_KEYS`; absent when not measured, e.g. no MFU on an unknown GPU):

==================================  ===========================================================
``summary/val_ppl_best``            lowest validation perplexity (and ``summary/val_loss_best``)
``summary/val_ppl_final``           last validation perplexity (and ``summary/val_loss_final``)
``summary/test_ppl``                test perplexity of the last ``trainer.test`` (``summary/test_loss``)
``summary/tokens_per_s``            steady-state global training tokens/s (``..._per_device`` too)
``summary/samples_per_s``           steady-state global samples/s
``summary/step_time_s``             steady-state seconds per optimiser step
``summary/data_share``              steady-state fraction of time outside the training step
``summary/tflops_per_s_per_device`` steady-state model TFLOP/s per device
``summary/mfu``                     steady-state MFU (fraction of ``summary/peak_tflops``)
``summary/steady_windows``          logging windows the steady-state figures average (0: none yet)
``summary/peak_tflops``             MFU denominator, dense TFLOP/s per device (``summary/peak_source``)
``summary/tokens``, ``summary/flops``   cumulative trained tokens and model FLOPs, all ranks
``summary/mem_<key>``               run peak of each ``mem/<key>`` (e.g. ``summary/mem_max_reserved_gib``
                                    on CUDA, ``summary/mem_peak_rss_gib`` on CPU)
``summary/params_total``            all parameters (tied head once); ``summary/params_active``: read
                                    per token; ``summary/params_flop_equivalent``: FLOP-equivalent active
                                    (N_a); ``summary/params_non_embedding``
``summary/flops_per_token``         training model FLOPs per token (``summary/flops_per_token_forward``)
``summary/world_size``              number of devices
==================================  ===========================================================

Works with an offline run (the summary is written to ``run-<id>.wandb``; read it back with
:func:`sectional_moe.wandb_files.read_run`); without a ``WandbLogger`` it only keeps
:attr:`WandbSummary.values` and writes nothing. Only rank 0 writes.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger

from sectional_moe.callbacks.memory import CPU_MEM_KEYS, CUDA_MEM_KEYS, MemoryMonitor
from sectional_moe.callbacks.throughput import PERF_KEYS, SpeedMonitor
from sectional_moe.errors import ConfigError
from sectional_moe.models.flops import flops_per_token, param_counts

NAMESPACES = ("train", "val", "test", "perf", "mem", "moe")
X_AXES = ("perf/tokens", "perf/flops")
_STEADY_KEYS = ("tokens_per_s", "tokens_per_s_per_device", "samples_per_s", "step_time_s", "data_share",
                "tflops_per_s_per_device", "mfu", "peak_tflops", "peak_source", "tokens", "flops", "steady_windows")
SUMMARY_KEYS = (
    "summary/val_loss_best", "summary/val_ppl_best", "summary/val_loss_final", "summary/val_ppl_final",
    "summary/test_loss", "summary/test_ppl",
    *(f"summary/{k}" for k in _STEADY_KEYS),
    "summary/params_total", "summary/params_active", "summary/params_flop_equivalent", "summary/params_non_embedding",
    "summary/flops_per_token", "summary/flops_per_token_forward", "summary/world_size",
)  # plus summary/mem_<key> for every mem/<key> measured


# declared at setup; keys not listed here (per-layer moe/ keys, ...) are declared when first seen
KNOWN_METRICS = (
    "train/loss", "val/loss", "val/ppl", "test/loss", "test/ppl", "moe/lb_loss", "moe/z_loss", "moe/drop_frac",
    "moe/load_max_over_mean", "moe/load_cv", "moe/dead_experts", *PERF_KEYS, *CUDA_MEM_KEYS, *CPU_MEM_KEYS,
)


def wandb_run(trainer: pl.Trainer) -> Any | None:
    """The W&B run of the trainer's first ``WandbLogger`` on rank 0, else None."""
    if not trainer.is_global_zero:
        return None
    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger):
            return lg.experiment
    return None


def _metric(trainer: pl.Trainer, key: str) -> float | None:
    value = trainer.callback_metrics.get(key)
    return None if value is None else float(value)


class WandbSummary(pl.Callback):
    """Declares the x-axes and keeps the W&B run summary up to date (see the module docstring).

    Args:
        x_axis: default x-axis of every namespaced metric: ``perf/tokens`` or ``perf/flops``.
    """

    def __init__(self, x_axis: str = "perf/tokens"):
        if x_axis not in X_AXES:
            raise ConfigError("callbacks.wandb_summary.x_axis", f"x_axis={x_axis!r}; use one of {', '.join(X_AXES)}")
        self.x_axis = x_axis
        self.values: dict[str, Any] = {}
        self._defined: set[str] = set()

    def state_dict(self) -> dict[str, Any]:
        keep = ("summary/val_loss_best", "summary/val_ppl_best")  # a resumed run keeps its best
        return {k: self.values[k] for k in keep if k in self.values}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.values.update(state_dict)

    # ------------------------------------------------------------------------------------------
    def _write(self, trainer: pl.Trainer, values: dict[str, Any]) -> None:
        values = {k: v for k, v in values.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
        self.values.update(values)
        run = wandb_run(trainer)
        if run is not None and values:
            run.summary.update(values)

    def _define(self, trainer: pl.Trainer, keys: Any) -> None:
        """Declare the x-axis of every not yet declared namespaced metric in ``keys``."""
        run = wandb_run(trainer)
        if run is None:
            return
        new = [k for k in keys if k not in self._defined and k.split("/", 1)[0] in NAMESPACES]
        for key in new:
            if key in X_AXES:
                run.define_metric(key)
            else:
                run.define_metric(key, step_metric=self.x_axis)
        self._defined.update(new)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        run = wandb_run(trainer)
        if run is not None and not self._defined:
            self._define(trainer, X_AXES)
            for ns in NAMESPACES:
                run.define_metric(f"{ns}/*", step_metric=self.x_axis)
            self._define(trainer, KNOWN_METRICS)
        spec = getattr(pl_module, "spec", None)
        static: dict[str, Any] = {"summary/world_size": trainer.world_size}
        if spec is not None:
            p = param_counts(spec)
            static.update({
                "summary/params_total": p["total"], "summary/params_active": p["active"],
                "summary/params_flop_equivalent": p["flop_equivalent"],
                "summary/params_non_embedding": p["non_embedding"],
                "summary/flops_per_token": flops_per_token(spec, training=True),
                "summary/flops_per_token_forward": flops_per_token(spec, training=False),
            })
        self._write(trainer, static)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        every = trainer.log_every_n_steps
        if every and trainer.global_step % every == 0 and wandb_run(trainer) is not None:
            self._define(trainer, trainer.callback_metrics)  # keys logged since: a dict scan, no device work

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._define(trainer, trainer.callback_metrics)
        loss, ppl = _metric(trainer, "val/loss"), _metric(trainer, "val/ppl")
        if loss is None:
            return
        values: dict[str, Any] = {"summary/val_loss_final": loss, "summary/val_ppl_final": ppl}
        best = self.values.get("summary/val_loss_best")
        if best is None or loss < best:
            values.update({"summary/val_loss_best": loss, "summary/val_ppl_best": ppl})
        self._write(trainer, values)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        values: dict[str, Any] = {}
        for cb in trainer.callbacks:
            if isinstance(cb, SpeedMonitor):
                summary = cb.summary()
                values.update({f"summary/{k}": summary.get(f"perf/{k}") for k in _STEADY_KEYS})
            elif isinstance(cb, MemoryMonitor):
                values.update({f"summary/mem_{k.split('/', 1)[1]}": v for k, v in cb.summary().items()})
        self._write(trainer, values)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._define(trainer, trainer.callback_metrics)
        self._write(trainer, {"summary/test_loss": _metric(trainer, "test/loss"), "summary/test_ppl": _metric(trainer, "test/ppl")})
