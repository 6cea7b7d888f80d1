"""Experiment loggers (W&B and CSV) built from the ``logger`` config group, and the logged run config.

W&B runs get a deterministic id, a name from the overrides and one group per sweep, so runs
compare side by side and a restarted job continues its own W&B run (``resume="allow"``). Without
an API key W&B runs offline into the run directory (upload later with ``wandb sync``). The CSV
logger appends across restarts instead of deleting earlier rows, as Lightning's does.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping, MutableMapping

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from sectional_moe.runs import resolve_wandb_mode

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
                  wandb_id: str, tags: list[str], resume_step: int | None) -> list[Logger]:
    """Instantiate the selected loggers (any of ``wandb``, ``csv``) for the run in ``run_dir``."""
    loggers: list[Logger] = []
    if "wandb" in cfg_logger:
        detach_inherited_wandb_service()
        finish_leftover_wandb_run()
        w = dict(cfg_logger["wandb"])
        mode = resolve_wandb_mode(w.pop("mode", "auto"))
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
    import sys

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
    import sys

    from sectional_moe import wandb_files

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


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become strings so every logger accepts them."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = str(list(value))
        else:
            out[name] = value
    return out


def _step_of(row: Mapping[str, Any]) -> int | None:
    try:
        return int(float(row.get("step") or ""))
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------------- secrets
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)  # environment variable names
# config key names: whole words only, so data.tokenizer_path or max_expert_keys are not "secret"
SECRET_KEY_NAME = re.compile(r"(?:^|[_\-])(?:api_?key|key|token|secret|password|passwd|credentials?)$", re.IGNORECASE)
REDACTED = "***REDACTED***"
_MIN_SECRET_LEN = 8  # shorter values ("1", "true") are not secrets and would redact everything


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of environment variables whose name looks secret (``*KEY*``, ``*TOKEN*``, ``*SECRET*``,
    ``*PASSWORD*``...), longest first so that a secret containing another is redacted whole."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if SECRET_NAME.search(k) and len(v) >= _MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    for value in secret_values() if secrets is None else secrets:
        text = text.replace(value, REDACTED)
    return text


def redact_secrets(flat: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a flat logged config without secrets: values of secret-named keys and any value
    containing a secret environment variable's value (e.g. resolved from ``${oc.env:...}``)."""
    secrets = secret_values()
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if SECRET_KEY_NAME.search(key.rsplit(".", 1)[-1]) and value not in (None, "") and not isinstance(value, (bool, int, float)):
            out[key] = REDACTED
        elif isinstance(value, str):
            out[key] = redact_text(value, secrets)
        else:
            out[key] = value
    return out


def scrub_secrets_in_files(directory: Path) -> None:
    """Replace secret environment values in the small text files of ``directory`` (Hydra's
    ``.hydra/*.yaml``, which hold the command-line overrides verbatim)."""
    secrets = secret_values()
    if not secrets or not directory.is_dir():
        return
    for path in directory.glob("*.yaml"):
        text = path.read_text()
        clean = redact_text(text, secrets)
        if clean != text:
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # parallel jobs of a sweep scrub multirun.yaml too
            tmp.write_text(clean)
            os.replace(tmp, path)
