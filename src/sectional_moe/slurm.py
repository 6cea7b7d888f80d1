"""SLURM support: the Hydra launcher, rank awareness, and checkpoint-on-preemption.

Who does what when a job is about to be stopped (one requeue mechanism per path, never two):

* **The launcher requeues.** Under ``hydra/launcher=slurm`` that is submitit: SLURM sends
  ``SIGUSR2`` ``signal_delay_s`` seconds before the time limit (or ``scancel --signal=USR2``
  preempts), submitit's handler calls the launcher's ``checkpoint()`` (same overrides, same job
  directory) and ``scontrol requeue``\\ s the task, at most ``max_num_timeout`` times for time
  limits. In the plain sbatch path (``slurm/*.sbatch``) the batch script's trap does the same.
* **Training only checkpoints.** :class:`PreemptionCheckpoint` catches the same ``SIGUSR2``,
  saves ``<run dir>/checkpoints/last.ckpt`` at the next optimiser-step boundary (all ranks agree
  on the step, so the collective save cannot deadlock) and then hands the signal on: to
  submitit's handler if there is one, else it exits so that the batch script can requeue.
* **Lightning's own SLURM auto-requeue is off** (:func:`cluster_plugins`): it would save an
  ``hpc_ckpt_N.ckpt`` that ``resume=auto`` never reads, from inside the signal handler (mid-step,
  with collectives), and requeue a second time (ecosystem.md pitfall P5).

Whatever stopped the job (also an external ``scontrol requeue``, which sends no warning signal),
the rerun starts in the same deterministic run directory and ``resume=auto`` continues from its
``last.ckpt``: model, optimiser, scheduler, data position, and the same W&B run id.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from omegaconf import OmegaConf

from sectional_moe.errors import ConfigError

log = logging.getLogger("sectional_moe")

# submitit's preemption signal (it reads the same variable); NCCL may use USR1, so USR2 everywhere
PREEMPT_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"
EXIT_PREEMPTED = 143  # what a SIGTERM'd process returns: the batch script then requeues


def global_rank() -> int:
    """This process's rank from the launcher's environment, before any Trainer exists.

    ``RANK`` (torchrun, Lightning's own re-launch), ``SLURM_PROCID`` (srun) - the order Lightning
    uses - else 0. Under a SLURM batch step without srun ``SLURM_PROCID`` is 0 too.
    """
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        value = os.environ.get(var)
        if value is not None and value.isdigit():
            return int(value)
    return 0


def is_rank_zero() -> bool:
    """True on the process that may write logs, W&B, metrics.json and status files."""
    return global_rank() == 0


def quiet_non_zero_ranks() -> None:
    """Detach the file handlers Hydra gave this process unless it is rank 0.

    Every rank of a multi-process job runs the Hydra app in the same run directory; only rank 0
    should append to ``train.log`` (the others still log to stderr, i.e. the SLURM output file).
    """
    if is_rank_zero():
        return
    for logger in (logging.getLogger(), log):
        for handler in list(logger.handlers):
            if isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
                handler.close()


def in_slurm_job() -> bool:
    """True inside a SLURM allocation (batch job, srun step or submitit task)."""
    return "SLURM_JOB_ID" in os.environ


def cluster_plugins() -> list[Any]:
    """Trainer plugins: under SLURM, Lightning's SLURM environment with auto-requeue off.

    Ranks, world size and the master address then come from SLURM (``srun`` started the
    processes; Lightning never re-launches the script). Requeueing stays with the launcher.
    """
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if in_slurm_job() and SLURMEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=False)]
    return []


def preempt_signal() -> signal.Signals:
    """The early-warning signal SLURM sends before a time limit: ``SIGUSR2`` unless overridden."""
    name = os.environ.get(PREEMPT_SIGNAL_ENV, "USR2").upper().removeprefix("SIG")
    try:
        return signal.Signals[f"SIG{name}"]
    except KeyError:
        raise ConfigError(PREEMPT_SIGNAL_ENV, f"{PREEMPT_SIGNAL_ENV}={name!r} is not a signal name; use USR2 (or unset it)") from None


class PreemptionCheckpoint(pl.Callback):
    """SLURM signal handling of a training job (installed only inside a SLURM job).

    * ``SIGUSR2`` (the time-limit warning, or ``scancel --signal=USR2``): save ``last.ckpt`` at the
      next optimiser step, then hand over to the launcher's requeue (see the module doc). The
      handler only sets a flag: saving inside it could snapshot a half-applied optimiser step
      and would run collectives from a signal context. The ranks OR their flags after every
      optimiser step (one tiny all-reduce per step under DDP, nothing on one process), so they
      all save at the same step.
    * ``SIGTERM``: SLURM is cancelling or requeueing the job and sends SIGKILL ``KillWait``
      seconds later. Lightning's own reaction (stop training, raise) would make the job *return*:
      submitit would then record a result and the launcher stop waiting for a requeued task, and
      the run would be marked failed. So the process just waits for the kill, writing nothing;
      a requeued run resumes from its last checkpoint.

    Args:
        ckpt_path: where to save; ``None`` = ``<checkpoint callback dirpath>/last.ckpt``, i.e. the
            file ``resume=auto`` reads.
    """

    def __init__(self, ckpt_path: str | None = None) -> None:
        self.ckpt_path = ckpt_path
        self.signum: signal.Signals | None = None
        self._previous: Any = None  # the preemption signal's handler before ours (submitit's)
        self._saved: dict[int, Any] = {}
        self._pending = False

    # Lightning installs its own SIGTERM handler when fit/test starts (after `setup`), so ours go
    # in at the start of each stage and come out at its teardown.
    def _install(self) -> None:
        if self._saved:
            return
        self.signum = preempt_signal()
        for sig, handler in ((self.signum, self._on_signal), (signal.SIGTERM, self._on_sigterm)):
            self._saved[int(sig)] = signal.getsignal(sig)
            signal.signal(sig, handler)
        self._previous = self._saved[int(self.signum)]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        ours = {self._on_signal, self._on_sigterm}
        for sig, handler in self._saved.items():
            if signal.getsignal(sig) in ours:  # Lightning may already have restored its originals
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._saved.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        log.warning("received %s: saving a checkpoint after this step, then requeueing", signal.Signals(signum).name)
        self._pending = True

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        log.warning("received SIGTERM: SLURM is cancelling or requeueing this job; waiting for the kill "
                    "without writing anything (a requeued run resumes from its last checkpoint)")
        while True:  # SIGKILL ends this; returning would let training go on and report a result
            time.sleep(60)

    def target(self, trainer: pl.Trainer) -> Path:
        if self.ckpt_path:
            return Path(self.ckpt_path)
        cb = trainer.checkpoint_callback
        dirpath = getattr(cb, "dirpath", None) or os.path.join(trainer.default_root_dir, "checkpoints")
        return Path(dirpath) / "last.ckpt"

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % max(1, trainer.accumulate_grad_batches):
            return  # mid-accumulation: no optimiser step to resume from
        if not trainer.strategy.reduce_boolean_decision(self._pending, all=False):
            return
        path = self.target(trainer)
        if trainer.is_global_zero and path.is_symlink():  # save_last="link": never write through the link
            path.unlink()
        trainer.save_checkpoint(str(path))
        log.warning("preemption checkpoint at step %d: %s", trainer.global_step, path)
        if trainer.is_global_zero:
            from sectional_moe.sweeps import write_status

            write_status(path.parent.parent, "requeued", f"preempted at step {trainer.global_step}; resumes from {path.name}")
        self._hand_over(trainer)

    def _hand_over(self, trainer: pl.Trainer) -> None:
        """Give the signal to whoever requeues: submitit's handler, else exit for the batch script."""
        previous = self._previous
        if callable(previous) and self.signum is not None:
            previous(int(self.signum), None)  # submitit: checkpoint() + scontrol requeue + sys.exit on rank 0
        # other ranks (submitit requeues from rank 0 only), and the plain sbatch path
        raise SystemExit(EXIT_PREEMPTED)


def cluster_callbacks() -> list[pl.Callback]:
    """Callbacks a SLURM job needs on top of the configured ones."""
    return [PreemptionCheckpoint()] if in_slurm_job() else []


# ----------------------------------------------------------------------------------------------
# resolvers of conf/hydra/launcher/slurm.yaml


def _tasks_per_node(devices: Any) -> int:
    """``hydra.launcher.tasks_per_node``: one SLURM task (process) per device of the trainer.

    A count SLURM cannot use (``auto``, ``-1``) is a user error met while Hydra builds the
    launcher, where a raised error would come out as a long OmegaConf traceback; so this prints
    the one-line error and exits 2 itself (SystemExit passes through OmegaConf and Hydra).
    """
    if isinstance(devices, (list, tuple)) or (hasattr(devices, "__len__") and not isinstance(devices, str)):
        return len(devices)  # an explicit device list, e.g. [0, 1]
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        err = ConfigError("trainer.devices", f"devices={devices!r}: SLURM needs the number of devices per node; "
                          "pass e.g. trainer.devices=4 (one task per device)")
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    return devices


def _gpus_per_node(accelerator: Any, devices: Any) -> int | None:
    """``hydra.launcher.gpus_per_node``: the trainer's devices when it trains on GPUs, else none."""
    if str(accelerator) in ("gpu", "cuda"):
        return _tasks_per_node(devices)
    return None


def register_resolvers() -> None:
    """``${smoe.slurm_tasks:...}`` and ``${smoe.slurm_gpus:...}`` used by conf/hydra/launcher/slurm.yaml."""
    for name, fn in (("smoe.slurm_tasks", _tasks_per_node), ("smoe.slurm_gpus", _gpus_per_node)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()
