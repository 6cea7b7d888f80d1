"""The run-directory contract: every file and marker of a run, and the operations on them.

One run owns one directory (``outputs/<task>/runs/<key>/`` or ``.../multirun/<group>/<key>/``)::

    .hydra/config.yaml  overrides.yaml  hydra.yaml   Hydra's record of the launch
    checkpoints/last.ckpt (.prev, .corrupt)  best-step*.ckpt
    csv/metrics.csv  csv/hparams.yaml              every logged metric and the logged config
    wandb/                                         the W&B run files
    status.json    running | done | failed | requeued | stopped | interrupted (+ error)
    metrics.json   final metrics                   DONE   written last, when the run finished
    run_config.json  the identity config of the finished run (what a re-launch is checked against)
    wandb_id       the W&B run id of the current attempt (a restart from scratch draws a new one)
    expert_load.json   cumulative expert load
    train.log      the job's log                   replaced/<n>/      outputs moved aside by force=true
    .run.lock      the live process that owns the directory (host, pid): see runs.lock

A sweep directory holds its runs plus ``summary.json``, ``multirun.yaml`` and ``logs/``.

:class:`RunDir` is the only place these names are spelled; ``train``, the launcher, the report
collector, ``evaluate`` and the studies all go through it. Torch-free: the Hydra plugin scan
imports it.

Imports: :mod:`sectional_moe.files`, :mod:`sectional_moe.secrets`, :mod:`sectional_moe.runs.identity`,
:mod:`sectional_moe.runs.status`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from sectional_moe.files import atomic_write
from sectional_moe.runs.identity import identity_diff
from sectional_moe.runs.status import read_status_file, write_status_file
from sectional_moe.secrets import redact_yaml_text


@dataclass(frozen=True)
class RunDir:
    """A run's output directory (it need not exist yet)."""

    path: Path

    DONE = "DONE"
    STATUS = "status.json"
    METRICS = "metrics.json"
    IDENTITY = "run_config.json"
    WANDB_ID = "wandb_id"
    EXPERT_LOAD = "expert_load.json"
    TRAIN_LOG = "train.log"
    LOCK = ".run.lock"
    HYDRA = ".hydra"
    CHECKPOINTS = "checkpoints"
    LAST_CKPT = "last.ckpt"
    PREV_SUFFIX = ".prev"  # last.ckpt.prev: the last.ckpt before the newest one
    CORRUPT_SUFFIX = ".corrupt"  # a checkpoint that failed verification, kept for inspection
    CSV = "csv"
    WANDB = "wandb"
    REPLACED = "replaced"
    #: what ``force=true`` moves aside (the Hydra record and the log of the current launch stay)
    ARCHIVED = ("checkpoints", "csv", "wandb", "metrics.json", "status.json", "DONE", "run_config.json",
                "expert_load.json", "wandb_id")

    def __init__(self, path: str | os.PathLike) -> None:
        object.__setattr__(self, "path", Path(path))

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------------------ file names
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def done_marker(self) -> Path:
        return self.path / self.DONE

    @property
    def status_file(self) -> Path:
        return self.path / self.STATUS

    @property
    def metrics_file(self) -> Path:
        return self.path / self.METRICS

    @property
    def identity_file(self) -> Path:
        return self.path / self.IDENTITY

    @property
    def wandb_id_file(self) -> Path:
        return self.path / self.WANDB_ID

    @property
    def expert_load_file(self) -> Path:
        return self.path / self.EXPERT_LOAD

    @property
    def lock_file(self) -> Path:
        return self.path / self.LOCK

    @property
    def hydra_dir(self) -> Path:
        return self.path / self.HYDRA

    @property
    def hydra_config(self) -> Path:
        """Hydra's resolved-at-launch config (``.hydra/config.yaml``)."""
        return self.hydra_dir / "config.yaml"

    @property
    def hydra_overrides(self) -> Path:
        return self.hydra_dir / "overrides.yaml"

    @property
    def hydra_runtime(self) -> Path:
        """``.hydra/hydra.yaml`` (holds ``hydra.job.override_dirname``)."""
        return self.hydra_dir / "hydra.yaml"

    HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")

    def write_hydra_record(self, files: Mapping[str, str]) -> None:
        """Write Hydra's record of the launch (``.hydra/config.yaml``, ``hydra.yaml``,
        ``overrides.yaml``), secrets redacted. ``train`` writes it only once the run is accepted
        (``hydra.output_subdir`` is null), so a refused launch leaves the directory as it was."""
        unknown = set(files) - set(self.HYDRA_FILES)
        if unknown:
            raise ValueError(f"not a Hydra record file: {sorted(unknown)}")
        for name, text in files.items():
            atomic_write(self.hydra_dir / name, redact_yaml_text(text))

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoint_dir / self.LAST_CKPT

    @property
    def prev_checkpoint(self) -> Path:
        return self.checkpoint_dir / (self.LAST_CKPT + self.PREV_SUFFIX)

    def csv_dir(self, name: str = CSV) -> Path:
        return self.path / name

    def metrics_csv(self, name: str = CSV) -> Path:
        return self.csv_dir(name) / "metrics.csv"

    def hparams_yaml(self, name: str = CSV) -> Path:
        return self.csv_dir(name) / "hparams.yaml"

    @property
    def wandb_dir(self) -> Path:
        return self.path / self.WANDB

    # ------------------------------------------------------------------------------ questions
    def looks_like_run(self) -> bool:
        """A run directory (it has a status, a Hydra record or a DONE marker)."""
        return self.status_file.is_file() or self.hydra_config.is_file() or self.done_marker.is_file()

    def is_done(self) -> bool:
        return self.done_marker.is_file()

    def done_metrics(self) -> dict[str, Any]:
        """The final metrics the DONE marker holds ({} if absent or unreadable)."""
        try:
            value = json.loads(self.done_marker.read_text())
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def final_metrics(self) -> dict[str, Any]:
        """``metrics.json`` ({} if absent or unreadable)."""
        try:
            value = json.loads(self.metrics_file.read_text())
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    # ------------------------------------------------------------------------------ status
    def write_status(self, state: str, error: str | None = None, **extra: Any) -> None:
        """Record the run's state (rank 0 only; see :mod:`sectional_moe.runs.status`)."""
        write_status_file(self.status_file, state, error, **extra)

    def read_status(self) -> dict[str, Any] | None:
        return read_status_file(self.status_file)

    # ------------------------------------------------------------------------------ outcome
    def mark_done(self, metrics: Mapping[str, Any], identity: Mapping[str, Any]) -> None:
        """Write the final metrics, the identity config and, last, the DONE marker."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.metrics_file, json.dumps(dict(metrics), indent=1, sort_keys=True))
        atomic_write(self.identity_file, json.dumps(dict(identity), indent=1, sort_keys=True, default=str))
        atomic_write(self.done_marker, json.dumps(dict(metrics)))
        self.write_status("done")

    def changed_identity(self, identity: Mapping[str, Any], limit: int = 6) -> list[str]:
        """Keys whose value differs between ``identity`` and the finished run recorded here, as
        ``key: old -> new``; [] if equal or if the run recorded no identity config."""
        try:
            saved = json.loads(self.identity_file.read_text())
        except (OSError, ValueError):
            return []  # a run from before this check: nothing to compare against
        return identity_diff(saved, identity, limit)

    # ------------------------------------------------------------------------------ W&B id
    def recorded_wandb_id(self) -> str | None:
        try:
            return self.wandb_id_file.read_text().strip() or None
        except OSError:
            return None

    def record_wandb_id(self, run_id: str) -> None:
        atomic_write(self.wandb_id_file, run_id + "\n")

    # ------------------------------------------------------------------------------ force=true
    def archive_outputs(self) -> Path | None:
        """Move the previous outputs into ``replaced/<n>/``; the Hydra record and log of the
        current launch stay. Returns the archive, or None if nothing moved."""
        present = [self.path / name for name in self.ARCHIVED if (self.path / name).exists()]
        if not present:
            return None
        n = 0
        while (self.path / self.REPLACED / str(n)).exists():
            n += 1
        dest = self.path / self.REPLACED / str(n)
        dest.mkdir(parents=True)
        for path in present:
            os.replace(path, dest / path.name)
        return dest


@dataclass(frozen=True)
class SweepDir:
    """A multirun's directory: its run directories plus the sweep's own files."""

    path: Path

    SUMMARY = "summary.json"
    MULTIRUN_YAML = "multirun.yaml"
    LOGS = "logs"

    def __init__(self, path: str | os.PathLike) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def summary_file(self) -> Path:
        """Every job's state at the end of the multirun (written by the sweep summary)."""
        return self.path / self.SUMMARY

    @property
    def logs_dir(self) -> Path:
        return self.path / self.LOGS

    def run(self, key: str) -> RunDir:
        return RunDir(self.path / key)
