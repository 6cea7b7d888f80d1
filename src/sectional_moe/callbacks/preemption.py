"""Checkpoint on preemption: a training job that SLURM is about to stop saves ``last.ckpt`` and hands over.

Who does what when a job is about to be stopped (one requeue mechanism per path, never two):

* **The launcher requeues.** Under ``hydra/launcher=slurm`` that is submitit: SLURM sends
  ``SIGUSR2`` ``signal_delay_s`` seconds before the time limit (or ``scancel --signal=USR2``
  preempts), submitit's handler calls the launcher's ``checkpoint()`` (same overrides, same job
  directory) and ``scontrol requeue``\\ s the task, at most ``max_num_timeout`` times for time
  limits. In the plain sbatch path (``slurm/*.sbatch``) the batch script does it
  (``slurm/requeue.sh``) when the training exits with :data:`EXIT_PREEMPTED`.
* **Training only checkpoints.** :class:`PreemptionCheckpoint` catches ``SIGUSR2`` and
  ``SIGTERM``, saves ``<run dir>/checkpoints/last.ckpt`` at the next optimiser-step boundary (all
  ranks agree on the step, so the collective save cannot deadlock), then hands over: to
  submitit's handler if there is one, and exits with :data:`EXIT_PREEMPTED`. After a SIGTERM it
  asks for a requeue only while SLURM still lists the job as running (preemption with a grace
  time); a cancel, a time limit or an external requeue is left to SLURM.
* **Lightning's own SLURM auto-requeue is off** (:func:`sectional_moe.training.run.cluster_plugins`): it would save an
  ``hpc_ckpt_N.ckpt`` that ``resume=auto`` never reads, from inside the signal handler (mid-step,
  with collectives), and requeue a second time (ecosystem.md pitfall P5).

Whatever stopped the job (also a ``SIGKILL`` with no warning), the rerun starts in the same
deterministic run directory and ``resume=auto`` continues from its ``last.ckpt``: model,
optimiser, scheduler, data position, and the same W&B run id.

Imports: lightning, :mod:`sectional_moe.env`, :mod:`sectional_moe.runs`, :mod:`sectional_moe.tracking`.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from sectional_moe.env import EXIT_PREEMPTED, in_slurm_job, preempt_signal, slurm_job_state
from sectional_moe.runs.layout import RunDir
from sectional_moe.runs.lock import release_held
from sectional_moe.tracking.loggers import finish_wandb_run

log = logging.getLogger("sectional_moe")


class PreemptionCheckpoint(pl.Callback):
    """SLURM signal handling of a training job (installed only inside a SLURM job).

    Both signals below only set a flag: saving inside the handler could snapshot a half-applied
    optimiser step and would run collectives from a signal context. After every optimiser step
    the ranks OR their flags (one tiny all-reduce under DDP, nothing on one process), so they all
    save ``last.ckpt`` at the same step; then the process exits with :data:`EXIT_PREEMPTED`. It
    never returns: a returned result would make submitit stop waiting for a requeued task.

    * The preemption signal (``SIGUSR2``; the time-limit warning or ``scancel --signal=USR2``):
      save, then hand over to whoever requeues (module doc): submitit's handler, or the batch
      script, which sees the exit code.
    * ``SIGTERM``: SLURM preempts (with a grace time), cancels, requeues or times out the job and
      sends SIGKILL ``KillWait`` (or ``GraceTime``) seconds later. Save the same way, then
      requeue only if SLURM still lists the job ``RUNNING`` (a warning: preemption with a grace
      time). Any other state means SLURM is ending or requeueing the job itself, and a
      ``scontrol requeue`` now would bring a ``scancel``-ed job back. The batch scripts apply the
      same rule.

    SLURM signals every process of the job, so after a SIGTERM (and right after submitit's
    requeue, which SIGTERMs the job) W&B's service and any DataLoader worker are gone. The usual
    teardown would then raise and turn the stop into a failure and a submitit result, so in
    those cases the process closes W&B while it can, flushes the other loggers and leaves with
    ``os._exit``. If a dead service makes training fail before the step ends, the job leaves the
    same way without a new checkpoint, and the rerun resumes from the previous one.

    A signal during testing (after training) is not acted on: the job finishes or is killed, and a
    rerun resumes from ``last.ckpt``.

    Args:
        ckpt_path: where to save; ``None`` = ``<checkpoint callback dirpath>/last.ckpt``, i.e. the
            file ``resume=auto`` reads.
    """

    def __init__(self, ckpt_path: str | None = None) -> None:
        self.ckpt_path = ckpt_path
        self.signum: signal.Signals | None = None
        self._previous: Any = None  # the preemption signal's handler before ours (submitit's)
        self._saved: dict[int, Any] = {}
        self._received: set[signal.Signals] = set()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # First in the hook order, so that after a SIGTERM the checkpoint is saved before any
        # logging callback's on_train_batch_end calls the (dead) W&B service. Moving ourselves
        # to the front while Lightning iterates the list keeps the callbacks after us in place.
        if trainer.callbacks and trainer.callbacks[0] is not self and self in trainer.callbacks:
            trainer.callbacks.remove(self)
            trainer.callbacks.insert(0, self)
        # A metrics call that was on its way to W&B's service when SLURM's SIGTERM stopped it must
        # not fail the step whose checkpoint is about to be saved.
        for logger in trainer.loggers:
            if not getattr(logger.log_metrics, "_smoe_guarded", False):
                logger.log_metrics = self._tolerate_after_sigterm(logger.log_metrics)

    def _tolerate_after_sigterm(self, log_metrics: Any) -> Any:
        """``log_metrics`` that drops the row instead of raising once the job got SIGTERM."""

        @functools.wraps(log_metrics)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return log_metrics(*args, **kwargs)
            except Exception as err:
                # the service may have got the signal a moment before this process did
                deadline = time.monotonic() + 0.5
                while signal.SIGTERM not in self._received and time.monotonic() < deadline:
                    time.sleep(0.01)
                if signal.SIGTERM not in self._received:
                    raise
                log.warning("metrics row dropped after SIGTERM: %s: %s", type(err).__name__, err)
                return None

        guarded._smoe_guarded = True  # type: ignore[attr-defined]
        return guarded

    # Lightning installs its own SIGTERM handler when fit/test starts (after `setup`), so ours go
    # in at the start of each stage and come out at its teardown.
    def _install(self) -> None:
        if self._saved:
            return
        self.signum = preempt_signal()
        for sig in (self.signum, signal.SIGTERM):
            self._saved[int(sig)] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)
        self._previous = self._saved[int(self.signum)]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install()  # keeps Lightning's SIGTERM handler from failing the run during testing

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for sig, handler in self._saved.items():
            if signal.getsignal(sig) == self._on_signal:  # Lightning may already have restored its originals
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._saved.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        sig = signal.Signals(signum)
        log.warning("received %s: saving a checkpoint after this step", sig.name)
        self._received.add(sig)

    def target(self, trainer: pl.Trainer) -> Path:
        if self.ckpt_path:
            return Path(self.ckpt_path)
        cb = trainer.checkpoint_callback
        dirpath = getattr(cb, "dirpath", None) or RunDir(trainer.default_root_dir).checkpoint_dir
        return Path(dirpath) / RunDir.LAST_CKPT

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % max(1, trainer.accumulate_grad_batches):
            return  # mid-accumulation: no optimiser step to resume from
        if not trainer.strategy.reduce_boolean_decision(bool(self._received), all=False):
            return
        path = self.target(trainer)
        if trainer.is_global_zero and path.is_symlink():  # save_last="link": never write through the link
            path.unlink()
        trainer.save_checkpoint(str(path))
        log.warning("preemption checkpoint at step %d: %s", trainer.global_step, path)
        self._leave(trainer, path.parent.parent, f"at step {trainer.global_step}", f"resumes from {path.name}")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if signal.SIGTERM not in self._received or isinstance(exception, SystemExit):
            return  # a real error (or our own exit): train.main records it
        log.warning("training failed after SIGTERM (%s: %s), most likely on a process SLURM stopped too; "
                    "leaving as preempted without a new checkpoint", type(exception).__name__, exception)
        self._leave(trainer, self.target(trainer).parent.parent, "before the step ended", "resumes from the previous last.ckpt")

    def _leave(self, trainer: pl.Trainer, run_dir: Path, when: str, resume: str) -> None:
        """Record the stop, hand over to the requeue owner, exit with EXIT_PREEMPTED (never returns)."""
        sig = self.signum if self.signum in self._received else signal.SIGTERM
        requeue = False
        if trainer.is_global_zero:  # submitit requeues from rank 0 only; the status is rank 0's too
            requeue, why = self._should_requeue(sig)
            RunDir(run_dir).write_status("requeued" if requeue else "stopped", f"{sig.name} {when}: {why}; {resume}")
        by_submitit = requeue and callable(self._previous)
        # After a SIGTERM, or once submitit has requeued the job (SLURM then SIGTERMs every process
        # of it), W&B's service and any DataLoader worker are gone or about to be: the usual
        # teardown would fail on them and turn the stop into a failure (and a submitit result).
        # So flush what can be flushed and leave with os._exit.
        hard = signal.SIGTERM in self._received or by_submitit
        if hard:
            if signal.SIGTERM not in self._received:
                # while its service still runs; the requeued job continues the same run id
                finish_wandb_run(preempting=True, wait_for_files=False)
            for logger in trainer.loggers:  # the CSV rows still in memory
                try:
                    logger.save()
                except Exception as err:  # noqa: BLE001 - W&B's service may be gone; the others still count
                    log.warning("could not flush %s: %s", type(logger).__name__, err)
        if by_submitit:
            try:
                self._previous(int(sig), None)  # submitit: checkpoint() + scontrol requeue + sys.exit
            except SystemExit:
                pass  # requeued; we exit with our own code below
        if hard:
            release_held()  # os._exit skips every finally: the requeued job must find the directory free
            sys.stdout.flush()
            sys.stderr.flush()
            logging.shutdown()
            os._exit(EXIT_PREEMPTED)
        # the plain sbatch path (its batch script requeues on this exit code) and ranks > 0:
        # a normal exit, so train.main closes W&B as preempted
        raise SystemExit(EXIT_PREEMPTED)

    def _should_requeue(self, sig: signal.Signals) -> tuple[bool, str]:
        """Whether this job should be requeued after ``sig``, and why (for the status file)."""
        if sig != signal.SIGTERM:
            return True, "time-limit warning or preemption"
        state = slurm_job_state()
        if state == "RUNNING":
            return True, "preempted with a grace time"
        log.warning("SIGTERM while SLURM lists the job as %s: SLURM cancels, times out or requeues it itself; "
                    "not requeueing here", state or "unknown")
        return False, f"SLURM ends the job itself (state {state or 'unknown'}), not requeued here"


class InterruptCheckpoint(pl.Callback):
    """SIGTERM or Ctrl-C outside SLURM: save ``last.ckpt`` at the end of the current optimiser step,
    record status ``interrupted`` and exit 143 (SIGTERM) or 130 (SIGINT). The same command then
    resumes from that checkpoint in the same W&B run.

    The handler only sets a flag (saving inside it could snapshot a half-applied step). One process
    acts at the next step; several agree on the step every :attr:`SYNC_EVERY` steps (one tiny
    all-reduce, not one per step). A second Ctrl-C stops at once, a second SIGTERM changes nothing (the checkpoint
    of the last validation remains). During validation the stop waits for the validation to end;
    during testing (training is over and checkpointed) the run stops after the current batch.
    """

    EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}
    SYNC_EVERY = 10  # with several processes, they agree on stopping every this many steps

    def __init__(self, ckpt_path: str | None = None) -> None:
        self.ckpt_path = ckpt_path
        self.received: signal.Signals | None = None
        self._pending: str | None = None  # saved; stop at the next hook
        self._saved: dict[int, Any] = {}

    def _install(self) -> None:
        if self._saved:
            return
        for sig in self.EXIT_CODES:
            self._saved[int(sig)] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)

    def _restore(self) -> None:
        for sig, handler in self._saved.items():
            if signal.getsignal(sig) == self._on_signal:
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._saved.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        sig = signal.Signals(signum)
        if self.received is not None and sig == signal.SIGTERM:
            # a repeated SIGTERM (a process group signalled twice, a study runner forwarding what its
            # sweeps also got) changes nothing: SIGKILL is the hard stop, as the first message says
            return
        if self.received is not None:  # a Ctrl-C after the first signal: stop now
            self._restore()
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.received = sig
        what = "Ctrl-C" if sig == signal.SIGINT else sig.name
        print(f"\n{what}: saving a checkpoint after this step, then stopping ({'Ctrl-C again' if sig == signal.SIGINT else 'SIGKILL'} "
              "stops at once)", file=sys.stderr, flush=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install()  # after Lightning's own SIGTERM handler, which fit installs

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()

    def target(self, trainer: pl.Trainer) -> Path:
        if self.ckpt_path:
            return Path(self.ckpt_path)
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None) or RunDir(trainer.default_root_dir).checkpoint_dir
        return Path(dirpath) / RunDir.LAST_CKPT

    def _stop(self, trainer: pl.Trainer, message: str) -> None:
        sig = self.received or signal.SIGTERM
        if trainer.is_global_zero:
            RunDir(trainer.default_root_dir).write_status("interrupted", f"{'SIGINT (Ctrl-C)' if sig == signal.SIGINT else sig.name} {message}")
        raise SystemExit(self.EXIT_CODES[sig])

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % max(1, trainer.accumulate_grad_batches):
            return
        if self._pending is not None:
            return
        if trainer.world_size == 1:
            stop = self.received is not None
        elif trainer.global_step % self.SYNC_EVERY == 0:  # ranks agree on the step; a collective every step would sync the host
            stop = trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
        else:
            return
        if not stop:
            return
        path = self.target(trainer)
        if trainer.is_global_zero and path.is_symlink():
            path.unlink()
        trainer.save_checkpoint(str(path))
        log.warning("interrupted: checkpoint at step %d: %s", trainer.global_step, path)
        # stop at the next hook, once Lightning has logged this step's metrics (the CSV then ends
        # exactly where the checkpoint does, and the resumed run continues it without a gap)
        self._pending = f"at step {trainer.global_step}; the same command resumes from {path.name}"

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is not None:
            self._stop(trainer, self._pending)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is not None:
            self._stop(trainer, self._pending)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.received is not None:
            self._stop(trainer, "while testing; the same command tests again from the final checkpoint")


def cluster_callbacks() -> list[pl.Callback]:
    """Signal handling on top of the configured callbacks: SLURM's preemption inside a SLURM job,
    a checkpoint on SIGTERM/Ctrl-C everywhere else."""
    return [PreemptionCheckpoint()] if in_slurm_job() else [InterruptCheckpoint()]
