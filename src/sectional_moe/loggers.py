"""Experiment loggers (W&B and CSV) built from the ``logger`` config group, and the logged run config.

W&B runs get a deterministic id, a name from the overrides and one group per sweep, so runs
compare side by side and a restarted job continues its own W&B run (``resume="allow"``). Without
an API key W&B runs offline into the run directory (upload later with ``wandb sync``). The CSV
logger appends across restarts instead of deleting earlier rows, as Lightning's does.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Mapping

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from sectional_moe.runs import resolve_wandb_mode


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
        if self.resume_step is not None:
            rows = [r for r in rows if not r.get("step") or int(float(r["step"])) < self.resume_step]
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = keys


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger`` writing ``<save_dir>/<name>/metrics.csv`` and continuing it after a restart."""

    def __init__(self, save_dir: str, name: str = "csv", resume_step: int | None = None):
        super().__init__(save_dir=save_dir, name=name, version="")
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
    if "csv" in cfg_logger:
        loggers.append(AppendingCSVLogger(save_dir=str(run_dir), name=cfg_logger["csv"].get("name", "csv"), resume_step=resume_step))
    return loggers


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
