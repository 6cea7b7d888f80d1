"""Where runs are read from: run directories, offline W&B run files, or the W&B public API.

Each source yields :class:`~sectional_moe.report.table.RunRecord`\ s; :func:`collect` turns them
into the one tidy table (:func:`~sectional_moe.report.table.tidy_row`), whatever the source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pandas as pd

from sectional_moe.report.sources.run_dirs import find_run_dirs, iter_run_dirs
from sectional_moe.report.sources.wandb_api import iter_wandb_api, parse_wandb_source
from sectional_moe.report.sources.wandb_offline import REPORT_CONFIG_FLAG, find_wandb_files, iter_wandb_dir
from sectional_moe.report.table import RunRecord, tidy_row, to_frame

__all__ = ["REPORT_CONFIG_FLAG", "collect", "detect_kind", "parse_wandb_source"]


def detect_kind(source: str | Path) -> str:
    """``wandb-api`` for ``wandb:...``, ``runs`` if run directories exist below, else ``wandb-offline``."""
    if str(source).startswith("wandb:"):
        return "wandb-api"
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{source}: no such directory")
    if find_run_dirs(path):
        return "runs"
    if find_wandb_files(path):
        return "wandb-offline"
    raise FileNotFoundError(f"{source}: no run directories (status.json / .hydra) and no run-*.wandb files below it")


def collect(source: str | Path, *, kind: str = "auto", progress: bool = False, api: Any = None,
            on_record: Callable[[RunRecord], None] | None = None) -> pd.DataFrame:
    """The tidy table of every run under ``source`` (see the module docstring).

    Args:
        source: a directory (a sweep, a task's outputs, a folder of W&B runs) or ``wandb:ENTITY/PROJECT[/GROUP]``.
        kind: ``auto`` | ``runs`` | ``wandb-offline`` | ``wandb-api`` (a sweep directory holds both
            run directories and W&B files; ``auto`` prefers the run directories).
        progress: show a tqdm bar while reading runs.
        api: a ``wandb.Api`` to use (tests pass a stand-in).
    """
    kind = detect_kind(source) if kind == "auto" else kind
    if kind == "runs":
        total, records = iter_run_dirs(Path(source))
    elif kind == "wandb-offline":
        total, records = iter_wandb_dir(Path(source))
    elif kind == "wandb-api":
        total, records = iter_wandb_api(str(source), api=api)
    else:
        raise ValueError(f"kind={kind!r}: use auto, runs, wandb-offline or wandb-api")
    from tqdm.auto import tqdm  # a progress bar only when asked

    rows = []
    for rec in tqdm(records, total=total, desc=f"collecting ({kind})", unit="run", disable=not progress, leave=False):
        if on_record is not None:
            on_record(rec)
        rows.append(tidy_row(rec))
    return to_frame(rows)
