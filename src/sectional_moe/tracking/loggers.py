"""Experiment loggers (W&B and CSV) built from the ``logger`` config group, and the logged run config.

W&B runs get a deterministic id, a name from the overrides and one group per sweep, so runs
compare side by side and a restarted job continues its own W&B run (``resume="allow"``). Without
an API key W&B runs offline into the run directory (upload later with ``wandb sync``). The CSV
logger appends across restarts instead of deleting earlier rows, as Lightning's does.

Imports: lightning, :mod:`sectional_moe.tracking.wandb_ids`, :mod:`sectional_moe.tracking.wandb_files`.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping, MutableMapping

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from sectional_moe.tracking import wandb_files
from sectional_moe.tracking.wandb_ids import resolve_wandb_mode

log = logging.getLogger(__name__)


class _AppendingWriter(ExperimentWriter):
    """Keeps an existing metrics.csv; rows from ``resume_step`` on are dropped (they are re-logged)."""

    def __init__(self, log_dir: str, resume_step: int | None = None):
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            keys, rows = list(reader.fieldnames or []), list(reader)
        # a row cut short by a kill -9 has no parsable step: drop it, like every row the resumed run re-logs
        rows = [r for r in rows if _step_of(r) is not None and (self.resume_step is None or _step_of(r) < self.resume_step)]
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = keys


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger`` writing ``<save_dir>/<name>/metrics.csv`` and continuing it after a restart."""

    def __init__(self, save_dir: str, name: str = "csv", resume_step: int | None = None, flush_logs_every_n_steps: int = 1):
        # flushed at every logged step (an append of a few rows): a killed run keeps its curve up to
        # its last checkpoint, which the resumed run then continues without a gap
        super().__init__(save_dir=save_dir, name=name, version="", flush_logs_every_n_steps=flush_logs_every_n_steps)
        self._resume_step = resume_step

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(self.log_dir, self._resume_step)
        return self._experiment


def build_loggers(cfg_logger: Mapping[str, Any], *, run_dir: Path, name: str, group: str | None,
                  wandb_id: str, tags: list[str], resume_step: int | None, quiet: bool = False) -> list[Logger]:
    """Instantiate the selected loggers (any of ``wandb``, ``csv``) for the run in ``run_dir``.

    ``resume_step``: the step the run resumes from; CSV rows from it on are dropped (they are
    logged again). 0 for a run that starts from scratch, which drops the rows of a killed attempt
    that never reached a checkpoint; None keeps every row. ``quiet``: W&B prints nothing to the
    console (sweep jobs).
    """
    loggers: list[Logger] = []
    if "wandb" in cfg_logger:
        detach_inherited_wandb_service()
        finish_leftover_wandb_run()
        w = dict(cfg_logger["wandb"])
        mode = resolve_wandb_mode(w.pop("mode", "auto"))
        w.pop("startup_timeout_s", None)  # used by the start-up check (wandb_ids.startup_mode), not by wandb.init
        if quiet:  # a sweep job: no banner, no run-history table, no sync hint (the job prints its own lines)
            import wandb

            w.setdefault("settings", wandb.Settings(silent=True))
        loggers.append(
            WandbLogger(
                project=w.pop("project"),
                entity=w.pop("entity", None),
                name=name,
                id=wandb_id,
                group=group,
                tags=list(tags),
                save_dir=str(run_dir),
                log_model=w.pop("log_model", False),
                mode=mode,
                job_type=w.pop("job_type", "train"),
                **w,
            )
        )
    for lg in loggers:  # Lightning 2.6 always passes anonymous=None, which wandb 0.31 warns about on every run
        init = getattr(lg, "_wandb_init", None)
        if isinstance(init, dict) and init.get("anonymous") is None:
            init.pop("anonymous", None)
    if "csv" in cfg_logger or "wandb" in cfg_logger:  # CSV metrics always sit next to a W&B run
        csv_cfg = cfg_logger.get("csv") or {}
        loggers.append(AppendingCSVLogger(save_dir=str(run_dir), name=csv_cfg.get("name", "csv"), resume_step=resume_step))
    return loggers


def detach_inherited_wandb_service(environ: MutableMapping[str, str] | None = None) -> bool:
    """Forget a ``WANDB_SERVICE`` token inherited from the process that launched this one.

    wandb exports the address of its ``wandb-core`` service to the environment, so a job started
    from a process that used wandb (a notebook, pytest, a login-node script) would attach to that
    parent's service: on another node it cannot, and after a requeue the parent still holds the
    killed attempt's run, so the resumed run fails with "run ID ... is in use". A token is ours
    only if it names this process as the one that started the service. Returns True if one was dropped.
    """
    env = os.environ if environ is None else environ
    token = env.get("WANDB_SERVICE", "")
    owner = re.match(r"\d+-(\d+)-", token)
    if token and (owner is None or int(owner.group(1)) != os.getpid()):
        del env["WANDB_SERVICE"]
        return True
    return False


def finish_leftover_wandb_run() -> bool:
    """Finish a W&B run still open in this process (a previous in-process job that did not close
    it), so this job gets its own: Lightning's WandbLogger would silently reuse it (pitfall P2)."""
    wandb = sys.modules.get("wandb")
    if wandb is None or wandb.run is None:
        return False
    log.warning("finishing the W&B run %s left open in this process, so that this run gets its own", wandb.run.id)
    wandb.finish()
    return True


def finish_wandb_run(exit_code: int = 0, *, preempting: bool = False, wait_for_files: bool = True) -> None:
    """Close this process's W&B run, if one is open, so the next job of an in-process multirun
    starts its own (pitfall P2).

    A non-zero ``exit_code`` marks the W&B run *failed* (not *finished*) on the dashboard.
    ``preempting``: the job was preempted and is being requeued, so the run is marked preempting
    (where this wandb version has it) and closed without the failed state; the requeued job
    continues the same run id. ``wait_for_files``: for an offline run, wait until wandb-core has
    written the run file (:func:`wandb_files.wait_until_written`); a job that must exit within a
    grace time passes False. Never raises: a dead wandb-core (killed with the job) must not mask
    the run's outcome.
    """
    wandb = sys.modules.get("wandb")
    if wandb is None or wandb.run is None:
        return
    settings = getattr(wandb.run, "settings", None)
    run_file = getattr(settings, "sync_file", None) if getattr(settings, "mode", None) == "offline" else None
    try:
        if preempting:
            mark = getattr(wandb.run, "mark_preempting", None)
            if callable(mark):
                mark()
            exit_code = 0
        wandb.finish(exit_code=exit_code)
    except Exception as err:  # noqa: BLE001 - see the docstring
        log.warning("could not close the W&B run cleanly (%s: %s); its local files hold what was logged", type(err).__name__, err)
        return
    if wait_for_files and run_file and not wandb_files.wait_until_written(run_file):
        log.warning("W&B had not finished writing %s after 30 s; a report read now may miss its last records", run_file)


def _step_of(row: Mapping[str, Any]) -> int | None:
    try:
        return int(float(row.get("step") or ""))
    except (TypeError, ValueError):
        return None
