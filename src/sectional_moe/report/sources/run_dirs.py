"""Source 1: run directories (``outputs/<task>/multirun/<group>/<run_key>/`` or ``.../runs/<run_key>/``).

``status.json`` + ``DONE`` give the state, ``csv/hparams.yaml`` the flat logged config (with the
whole spec as ``spec.*``; ``.hydra/config.yaml`` when the job failed before logging),
``csv/metrics.csv`` the time series, ``metrics.json`` the final metrics (a fallback); jobs a
sweep's ``summary.json`` lists but that never created a directory become ``not started`` rows.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml
from omegaconf import OmegaConf

from sectional_moe.models.spec import spec_from_config
from sectional_moe.report.table import RunRecord
from sectional_moe.runs.identity import flatten, run_name
from sectional_moe.runs.layout import RunDir, SweepDir
from sectional_moe.tracking.wandb_ids import derived_wandb_id


def _read_csv_history(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return [{k: v for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]


def _read_yaml(path: Path) -> dict[str, Any] | None:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _hydra_config(run_dir: Path) -> dict[str, Any]:
    """The job's composed config, flattened like the logged one (for jobs that failed before logging)."""
    path = RunDir(run_dir).hydra_config
    if not path.is_file():
        return {}
    loaded = OmegaConf.load(path)
    cfg = OmegaConf.to_container(loaded, resolve=False)
    flat = flatten(cfg) if isinstance(cfg, dict) else {}
    flat.setdefault("family", flat.get("model.family"))
    flat.setdefault("routing_name", flat.get("routing.name"))
    if isinstance(flat.get("size"), dict) or "size.name" in flat:
        flat["size"] = flat.get("size.name")
    try:  # the spec train.py would have logged; a config that failed validation has none
        resolved = OmegaConf.to_container(loaded, resolve=True)
        spec = spec_from_config(resolved)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - an invalid or unresolvable config: the row keeps the raw keys
        return flat
    return {**flat, **flatten({"spec": spec.to_dict()})}


def is_run_dir(path: Path) -> bool:
    return RunDir(path).looks_like_run()


def find_run_dirs(root: Path) -> list[Path]:
    """Run directories below ``root`` (or ``root`` itself); ``wandb``/``checkpoints`` are not searched."""
    root = Path(root)
    if is_run_dir(root):
        return [root]
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if here != root and is_run_dir(here):
            found.append(here)
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if d not in (RunDir.WANDB, RunDir.CHECKPOINTS, RunDir.CSV, RunDir.HYDRA, "report"))
    return sorted(found)


_SEED_SUFFIX = re.compile(r"(^|,)seed=[^,]*$")


def read_run_dir(run_dir: Path) -> RunRecord:
    """One run directory as a :class:`RunRecord` (state from ``DONE``/``status.json``)."""
    run = RunDir(run_dir)
    status = run.read_status() or {}
    done = run.is_done()
    state = "done" if done else {"running": "unfinished", "failed": "failed", "done": "done"}.get(status.get("state"), "unfinished")
    config = _read_yaml(run.hparams_yaml()) or {}
    csv_name = RunDir.CSV
    if not config:  # failed before the loggers were built, or logger=none
        config = _hydra_config(run_dir)
    else:
        csv_name = str(config.get("logger.csv.name") or RunDir.CSV)
        config = {**config, **flatten({k: v for k, v in config.items() if isinstance(v, dict)})}
    history = _read_csv_history(run.metrics_csv(csv_name))
    final = run.final_metrics()
    key = run_dir.name
    group = run_dir.parent.name if run_dir.parent.parent.name == "multirun" else config.get("group")
    task = config.get("task_name") or (run_dir.parent.parent.parent.name if run_dir.parent.parent.name == "multirun" else run_dir.parent.parent.name)
    config.setdefault("task_name", task)
    # the name W&B got: run_name(override_dirname), which Hydra records in hydra.yaml (a long key is
    # shortened with a digest, so stripping ",seed=N" from the directory name is only a fallback)
    hydra_job = ((_read_yaml(run.hydra_runtime) or {}).get("hydra") or {}).get("job") or {}
    override_dirname = hydra_job.get("override_dirname")
    name = run_name(str(override_dirname)) if override_dirname is not None else (_SEED_SUFFIX.sub("", key) or "default")
    error = status.get("error") if state != "done" else None
    if state == "unfinished" and not status:
        error = "no status.json (never started, or an old run)"
    run_id = run.recorded_wandb_id() or derived_wandb_id(str(task), group, key)
    return RunRecord(run_id=run_id, name=name, group=group, state=state, error=error,
                     config=config, history=history, final=final, source="runs", path=str(run_dir))


def _not_started(root: Path, found: Sequence[Path]) -> list[RunRecord]:
    """Jobs listed in a sweep's ``summary.json`` that have no run directory in that sweep.

    ``summary.json`` records each job's directory as Hydra saw it, i.e. relative to wherever the
    sweep was launched (or absolute on the launching machine). A sweep read from another working
    directory, or copied elsewhere, would then list its finished runs again as "not started", so
    a job is matched by its run-directory *name* inside the directory that holds the summary.
    """
    names_by_sweep: dict[Path, set[str]] = {}
    for d in found:
        names_by_sweep.setdefault(d.parent.resolve(), set()).add(d.name)
    out = []
    for summary in sorted(Path(root).rglob(SweepDir.SUMMARY)):
        try:
            jobs = json.loads(summary.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(jobs, list):
            continue
        sweep_dir = summary.parent
        present = names_by_sweep.get(sweep_dir.resolve(), set())
        for job in jobs:
            if not isinstance(job, dict) or not job.get("dir"):
                continue
            name = Path(str(job["dir"])).name
            run_dir = sweep_dir / name
            if name in present or run_dir.exists():
                continue
            overrides = dict(o.split("=", 1) for o in str(job.get("job", "")).split() if "=" in o)
            config = {"experts": overrides.get("experts"), "routing_name": overrides.get("routing"),
                      "family": overrides.get("model"), "size": overrides.get("size"), "seed": overrides.get("seed")}
            group = sweep_dir.name
            out.append(RunRecord(run_id=derived_wandb_id(str(sweep_dir.parent.parent.name), group, name),
                                 name=_SEED_SUFFIX.sub("", name), group=group, state="not started",
                                 error=job.get("error"), config=config, source="runs", path=str(run_dir)))
    return out


def iter_run_dirs(root: Path) -> tuple[int, Iterator[RunRecord]]:
    dirs = find_run_dirs(root)
    extra = _not_started(root, dirs)

    def gen() -> Iterator[RunRecord]:
        for d in dirs:
            yield read_run_dir(d)
        yield from extra

    return len(dirs) + len(extra), gen()
