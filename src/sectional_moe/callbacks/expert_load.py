"""Expert-load metrics of routed layers, logged on log steps only (no per-step host sync).

Keys per logging window (counts accumulated on the device between log steps):

* summary over routed layers, through ``LightningModule.log`` (so they also reach
  ``callback_metrics`` and ``metrics.json``): ``moe/load_max_over_mean`` (worst layer),
  ``moe/load_cv`` (mean over layers), ``moe/dead_experts`` (sum), and ``moe/expert{e}/frac``, the
  layer-averaged fraction of assignments per expert (first ``max_expert_keys`` experts);
* per routed layer i, straight to the loggers (one host sync, one row):
  ``moe/layer{i}/load_max_over_mean``, ``moe/layer{i}/load_cv``, ``moe/layer{i}/dead_experts``, and
  the per-expert fractions ``moe/layer{i}/frac_e{e}`` only while layers x experts <=
  ``max_layer_frac_keys`` (above it, once, an info line says they are left out).

So a run logs at most ``3 + max_expert_keys + 3 * layers + max_layer_frac_keys`` expert-load keys,
whatever its number of experts. At the end of training the cumulative per-layer, per-expert
fractions are written to ``expert_load.json`` in the run directory (never bounded).
"""

from __future__ import annotations

import json
import logging

import lightning.pytorch as pl
import torch

from sectional_moe.callbacks.throughput import log_to_loggers
from sectional_moe.runs.layout import RunDir
from sectional_moe.models.routers import load_stats

log = logging.getLogger(__name__)

# load_stats() name -> per-layer key suffix
_LAYER_KEYS = {"max_over_mean": "load_max_over_mean", "cv": "load_cv", "dead": "dead_experts"}


def window_stats(window: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Per routed layer, from its expert counts (E,): :func:`load_stats` plus ``frac``, the share
    of assignments per expert (E,). Device tensors, no sync; computed once per log step."""
    return [{**load_stats(w), "frac": w / w.sum().clamp_min(1)} for w in window]


def summary_metrics(stats: list[dict[str, torch.Tensor]], max_expert_keys: int) -> dict[str, torch.Tensor]:
    """Summary over layers of :func:`window_stats` (device tensors, no sync)."""
    metrics = {
        "moe/load_max_over_mean": torch.stack([s["max_over_mean"] for s in stats]).max(),
        "moe/load_cv": torch.stack([s["cv"] for s in stats]).mean(),
        "moe/dead_experts": torch.stack([s["dead"] for s in stats]).sum(),
    }
    frac = torch.stack([s["frac"] for s in stats]).mean(0)
    for e in range(min(len(frac), max_expert_keys)):
        metrics[f"moe/expert{e}/frac"] = frac[e]
    return metrics


def layer_metrics(layers: list[int], stats: list[dict[str, torch.Tensor]], with_fractions: bool) -> dict[str, float]:
    """Per-layer statistics (and per-expert fractions) of :func:`window_stats` as host floats, with one device sync."""
    keys: list[str] = []
    values: list[torch.Tensor] = []
    for layer, s in zip(layers, stats):
        for name, suffix in _LAYER_KEYS.items():
            keys.append(f"moe/layer{layer}/{suffix}")
            values.append(s[name])
        if with_fractions:
            keys += [f"moe/layer{layer}/frac_e{e}" for e in range(len(s["frac"]))]
            values += list(s["frac"].unbind())
    return dict(zip(keys, torch.stack(values).tolist())) if values else {}


class ExpertLoadMonitor(pl.Callback):
    """Expert-load statistics per logging window, bounded in keys (see the module docstring).

    Args:
        max_expert_keys: layer-averaged ``moe/expert{e}/frac`` keys for at most this many experts.
        max_layer_frac_keys: per-layer ``moe/layer{i}/frac_e{e}`` keys are logged only while
            routed layers x experts <= this (0 disables them).
    """

    def __init__(self, max_expert_keys: int = 16, max_layer_frac_keys: int = 64):
        self.max_expert_keys = max_expert_keys
        self.max_layer_frac_keys = max_layer_frac_keys
        self._window: list[torch.Tensor] | None = None
        self._total: list[torch.Tensor] | None = None
        self._layers: list[int] = []
        self._told_capped = False

    @property
    def layer_fractions(self) -> bool:
        """Whether the per-layer, per-expert fractions fit under ``max_layer_frac_keys``."""
        return bool(self._window) and len(self._window) * len(self._window[0]) <= self.max_layer_frac_keys

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        latest = getattr(pl_module, "latest_counts", None) or []
        counts = [(i, c) for i, c in enumerate(latest) if c is not None]
        if not counts:
            return
        if self._window is None:
            self._layers = [i for i, _ in counts]
            self._window = [torch.zeros_like(c) for _, c in counts]
            self._total = [torch.zeros_like(c) for _, c in counts]
        for w, t, (_, c) in zip(self._window, self._total, counts):
            w += c
            t += c
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self._log_window(trainer, pl_module)
            for w in self._window:
                w.zero_()

    def _log_window(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._window is not None
        stats = window_stats(self._window)
        pl_module.log_dict(summary_metrics(stats, self.max_expert_keys), on_step=True, on_epoch=False)
        fractions = self.layer_fractions
        if not fractions and not self._told_capped and trainer.is_global_zero:
            self._told_capped = True
            log.info("expert load: %d routed layers x %d experts > callbacks.expert_load.max_layer_frac_keys=%d; "
                     "per-layer expert fractions (moe/layer*/frac_e*) are not logged, only the load statistics "
                     "(all fractions are in expert_load.json)", len(self._window), len(self._window[0]),
                     self.max_layer_frac_keys)
        if trainer.loggers:  # host floats straight to the loggers: one sync, not one self.log per key
            log_to_loggers(trainer, layer_metrics(self._layers, stats, fractions))

    def load_table(self) -> dict[str, list[float]]:
        """Cumulative fraction of assignments per expert, per routed layer."""
        if not self._total:
            return {}
        return {f"layer{l}": (t / t.sum().clamp_min(1)).tolist() for l, t in zip(self._layers, self._total)}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        table = self.load_table()
        if table and trainer.is_global_zero and trainer.default_root_dir:
            RunDir(trainer.default_root_dir).expert_load_file.write_text(json.dumps(table, indent=1))
