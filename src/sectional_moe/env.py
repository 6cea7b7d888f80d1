"""The process's place in a job, read from its environment: rank, SLURM ids, preemption signals.

Torch-free and Lightning-free, so the launcher, the status files and the entry points can ask
"am I rank 0?" or "which SLURM job is this?" before anything heavy is imported.

Imports: the standard library and :mod:`sectional_moe.errors` only.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess

from sectional_moe.errors import ConfigError

log = logging.getLogger("sectional_moe")

# submitit's preemption signal (it reads the same variable); NCCL may use USR1, so USR2 everywhere
PREEMPT_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what a SIGTERM-killed process returns too; the batch script requeues on it


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


def preempt_signal() -> signal.Signals:
    """The early-warning signal SLURM sends before a time limit: ``SIGUSR2`` unless overridden."""
    name = os.environ.get(PREEMPT_SIGNAL_ENV, "USR2").upper().removeprefix("SIG")
    try:
        return signal.Signals[f"SIG{name}"]
    except KeyError:
        raise ConfigError(PREEMPT_SIGNAL_ENV, f"{PREEMPT_SIGNAL_ENV}={name!r} is not a signal name; use USR2 (or unset it)") from None


def slurm_job_id() -> str | None:
    """This job's id as squeue and scontrol take it, or None outside SLURM.

    ``<array id>_<task>`` for an array task: its own ``SLURM_JOB_ID`` can equal the array's id,
    and that id names every task of the array.
    """
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def slurm_job_state(job_id: str | None = None) -> str | None:
    """SLURM's current state of a job (default: this one): ``RUNNING``, ``COMPLETING``, ...; None if unknown.

    After ``scancel``, a time limit or ``scontrol requeue`` the job is ``COMPLETING`` while its
    processes get SIGTERM; a SIGTERM sent as a warning (preemption with a grace time,
    ``scancel --signal=TERM``) leaves it ``RUNNING``.
    """
    job_id = job_id or slurm_job_id()
    if not job_id:
        return None
    try:
        proc = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    states = proc.stdout.split()
    return states[0] if proc.returncode == 0 and len(states) == 1 else None
