"""Expert-load metrics of routed layers, logged on log steps only (no per-step host sync)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import torch

from sectional_moe.models.routing import load_stats


class ExpertLoadMonitor(pl.Callback):
    """Per routed layer: max/mean load, coefficient of variation and dead experts over the last
    logging window; the fraction of assignments per expert (averaged over layers, at most
    ``max_expert_keys`` keys). Counts stay on the device between log steps. At the end of
    training the cumulative per-layer, per-expert fractions are written to ``expert_load.json``.
    """

    def __init__(self, max_expert_keys: int = 16):
        self.max_expert_keys = max_expert_keys
        self._window: list[torch.Tensor] | None = None
        self._total: list[torch.Tensor] | None = None
        self._layers: list[int] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        aux = getattr(pl_module, "latest_aux", None) or []
        counts = [(i, a["counts"]) for i, a in enumerate(aux) if "counts" in a]
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
            pl_module.log_dict(self._window_metrics(), on_step=True, on_epoch=False)
            for w in self._window:
                w.zero_()

    def _window_metrics(self) -> dict[str, torch.Tensor]:
        assert self._window is not None
        metrics: dict[str, torch.Tensor] = {}
        stats = [load_stats(w) for w in self._window]
        for layer, s in zip(self._layers, stats):
            for name, value in s.items():
                metrics[f"moe/layer{layer}/{name}"] = value
        metrics["moe/load_max_over_mean"] = torch.stack([s["max_over_mean"] for s in stats]).max()
        metrics["moe/load_cv"] = torch.stack([s["cv"] for s in stats]).mean()
        metrics["moe/dead_experts"] = torch.stack([s["dead"] for s in stats]).sum()
        frac = torch.stack([w / w.sum().clamp_min(1) for w in self._window]).mean(0)
        for e in range(min(len(frac), self.max_expert_keys)):
            metrics[f"moe/expert{e}/frac"] = frac[e]
        return metrics

    def load_table(self) -> dict[str, list[float]]:
        """Cumulative fraction of assignments per expert, per routed layer."""
        if not self._total:
            return {}
        return {f"layer{l}": (t / t.sum().clamp_min(1)).tolist() for l, t in zip(self._layers, self._total)}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        table = self.load_table()
        if table and trainer.is_global_zero and trainer.default_root_dir:
            Path(trainer.default_root_dir, "expert_load.json").write_text(json.dumps(table, indent=1))
