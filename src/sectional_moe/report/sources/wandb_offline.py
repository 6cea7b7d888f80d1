"""Source 2: offline (or synced) W&B runs: every ``run-<id>.wandb`` file below a directory.

Read with :func:`sectional_moe.tracking.wandb_files.read_run`; several files of one id (a resumed
offline run writes one per attempt) are merged in start order.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from sectional_moe.report.table import RunRecord, num, series
from sectional_moe.runs.identity import flatten
from sectional_moe.tracking.wandb_files import read_run


REPORT_CONFIG_FLAG = "sectional_moe_report"  # set in the config of our own summary runs (skipped)


def wandb_state(exit_code: int | None, summary: Mapping[str, Any], history: Sequence[Mapping[str, Any]],
                 config: Mapping[str, Any]) -> tuple[str, str | None]:
    """State of a W&B run from its exit record and what it logged.

    train.py finishes the W&B run with ``exit_code=1`` when the job fails (``loggers.finish_wandb_run``), so a
    non-zero exit code means failed. A run that exited 0 but lacks the final metrics its config
    asked for (test if ``test``, else validation if ``train``) is reported as failed too: runs
    written before train.py passed the exit code closed with 0 whatever happened. An explicit
    ``run/state`` summary key (``run/error``) wins if a future train.py writes one.
    """
    if summary.get("run/state"):
        return str(summary["run/state"]), summary.get("run/error")
    if exit_code is None:
        return "unfinished", "no exit record (still running, or killed)"
    if exit_code != 0:
        return "failed", f"W&B exit code {exit_code}"
    needs = "test/loss" if config.get("test", True) not in (False, "false") else ("val/loss" if config.get("train", True) not in (False, "false") else None)
    summary_key = {"test/loss": "summary/test_loss", "val/loss": "summary/val_loss_final"}.get(needs or "", "")
    if needs and not series(history, needs) and num(summary.get(summary_key)) is None:
        return "failed", f"the W&B run closed without {needs} (the job failed; see its status.json/train.log)"
    return "done", None


def _run_file_started(path: Path) -> str:
    found = re.search(r"run-(\d{8}_\d{6})-", path.parent.name)
    return found.group(1) if found else path.parent.name


def find_wandb_files(root: Path) -> dict[str, list[Path]]:
    """``run-<id>.wandb`` files below ``root`` grouped by run id, each group in start order."""
    groups: dict[str, list[Path]] = {}
    for path in sorted(Path(root).rglob("run-*.wandb")):
        if path.parent.is_symlink() or path.parent.name == "latest-run":
            continue
        run_id = path.stem[len("run-"):]
        groups.setdefault(run_id, []).append(path)
    return {k: sorted(v, key=_run_file_started) for k, v in groups.items()}


def read_wandb_files(files: Sequence[Path]) -> RunRecord | None:
    """Merge the run files of one id (a resumed offline run writes one file per attempt)."""
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    exit_code: int | None = None
    for path in files:
        data = read_run(path)
        config.update(data["config"])
        summary.update(data["summary"])
        history.extend(data["history"])
        info = {**info, **{k: v for k, v in data["run"].items() if v}}
        exit_code = data["exit_code"]
    if config.get(REPORT_CONFIG_FLAG):
        return None
    config = {**config, **flatten({k: v for k, v in config.items() if isinstance(v, dict) and k != "_wandb"})}
    state, error = wandb_state(exit_code, summary, history, config)
    return RunRecord(run_id=str(info.get("id") or files[0].stem[4:]), name=str(info.get("name") or ""), group=info.get("group") or None,
                     state=state, error=error, config=config, history=history, final=summary, source="wandb-offline",
                     path=str(files[-1].parent))


def iter_wandb_dir(root: Path) -> tuple[int, Iterator[RunRecord]]:
    groups = find_wandb_files(root)

    def gen() -> Iterator[RunRecord]:
        for files in groups.values():
            rec = read_wandb_files(files)
            if rec is not None:
                yield rec

    return len(groups), gen()
