"""CPU threads that follow the machine's load during a run (``threads=auto`` on CPU).

The start-up choice (:func:`sectional_moe.hardware.auto_threads`) sees the load of the moment; a
job that starts next to ours later would make a 2-thread run collapse (OpenMP threads spin-wait
for the one that shares its core). Every ``check_every_s`` seconds of training this callback
measures how many cores other processes keep busy and sets torch's intra-op threads to the idle
cores (:func:`~sectional_moe.hardware.threads_for_load`), back up when the other work ends.

A changed thread count changes the order of float reductions: runs that must be bit-identical
across a resume set ``threads=N`` (or ``OMP_NUM_THREADS``), which disables this callback.

Imports: lightning, torch, :mod:`sectional_moe.hardware`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning.pytorch as pl
import torch

from sectional_moe.hardware import CpuLoadMeter, threads_for_load, usable_cores

log = logging.getLogger("sectional_moe")

#: a core running our threads counts as taken once other work uses this much of it (in-run check)
IN_RUN_SLACK = 0.25


class AdaptiveThreads(pl.Callback):
    """Re-measure the foreign CPU load every ``check_every_s`` seconds and follow it."""

    def __init__(self, check_every_s: float = 30.0, max_threads: int | None = None) -> None:
        self.check_every_s = check_every_s
        self.max_threads = max_threads or usable_cores()
        self.changes: list[tuple[int, int, float]] = []  # (step, threads, foreign busy cores)
        self._meter: CpuLoadMeter | None = None
        self._next = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._meter = CpuLoadMeter()
        self._next = time.monotonic() + self.check_every_s

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.monotonic()
        if self._meter is None or now < self._next:
            return
        self._next = now + self.check_every_s
        foreign = self._meter.sample()
        if foreign is None:
            return
        wanted = min(self.max_threads, threads_for_load(foreign, usable_cores(), slack=IN_RUN_SLACK))
        current = torch.get_num_threads()
        if wanted != current:
            torch.set_num_threads(wanted)
            self.changes.append((trainer.global_step, wanted, foreign))
            log.info("threads %d -> %d at step %d: other processes keep %.1f of %d cores busy", current, wanted,
                     trainer.global_step, foreign, usable_cores())
