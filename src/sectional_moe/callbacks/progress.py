"""Progress in optimiser steps of the whole run (``step 200/800``), not batches of an epoch.

Lightning's bar counts the batches of the current epoch (``Epoch 0: 212/644``), which says nothing
about an 800-step run that spans epochs. :class:`StepProgressBar` counts ``global_step`` against
``max_steps`` across epochs and resumes. Where the output is not a terminal (a sweep job's log,
a SLURM output file) it draws no bar and instead prints one line per validation::

    step 400/800 (50%)  train/loss 4.91  val/ppl 141.2  2.3 steps/s  eta 2m54s

Imports: lightning.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar


def _eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class StepProgressBar(TQDMProgressBar):
    """A TQDM bar over ``max_steps`` on a terminal; one plain line per validation elsewhere.

    Args:
        refresh_rate: update the bar every N steps (terminal only).
        plain: True = lines, False = bar, None = bar only when stderr is a terminal.
        prefix: put in front of every plain line (a sweep job's name).
    """

    def __init__(self, refresh_rate: int = 20, plain: bool | None = None, prefix: str = "") -> None:
        self.plain = (not sys.stderr.isatty()) if plain is None else plain
        super().__init__(refresh_rate=0 if self.plain else refresh_rate)
        self.prefix = prefix
        self.lines: list[str] = []
        self._t0 = 0.0
        self._step0 = 0

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)  # the W&B/CSV version string: noise in a bar
        return items

    # ------------------------------------------------------------------ the bar (terminal)
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0, self._step0 = time.monotonic(), trainer.global_step
        super().on_train_start(trainer, pl_module)
        self._reset_bar(trainer)

    def _reset_bar(self, trainer: pl.Trainer) -> None:
        bar = self.train_progress_bar if self.is_enabled else None
        if bar is None:
            return
        bar.reset(total=trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None)
        bar.initial = 0
        bar.n = trainer.global_step
        bar.set_description("train")
        bar.refresh()

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        if self._leave and self.is_enabled:
            self.train_progress_bar = self.init_train_tqdm()
            self._reset_bar(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        bar = self.train_progress_bar if self.is_enabled else None
        step = trainer.global_step
        if bar is not None and self._should_update(step, bar.total or 0):
            bar.n = step
            bar.refresh()
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.is_enabled and not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    # ------------------------------------------------------------------ plain lines (logs)
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self.plain and not trainer.sanity_checking and trainer.is_global_zero:
            self._print_line(trainer)

    def _print_line(self, trainer: pl.Trainer) -> None:
        step, total = trainer.global_step, trainer.max_steps
        metrics = trainer.callback_metrics
        parts = [f"step {step}/{total}" + (f" ({100 * step / total:.0f}%)" if total and total > 0 else "")]
        for key in ("train/loss", "val/ppl"):
            if key in metrics:
                parts.append(f"{key} {float(metrics[key]):.4g}")
        elapsed = time.monotonic() - self._t0
        done = step - self._step0
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            parts.append(f"{rate:.3g} steps/s")
            if total and total > step:
                parts.append(f"eta {_eta((total - step) / rate)}")
        line = (f"[{self.prefix}] " if self.prefix else "") + "  ".join(parts)
        self.lines.append(line)
        print(line, flush=True)
