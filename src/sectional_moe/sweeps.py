"""Sweep bookkeeping: per-job status files and the end-of-multirun summary.

Every job writes ``<run dir>/status.json`` (``running`` -> ``done`` | ``failed`` with the error).
In a multirun a failing job records its error and returns instead of raising, so the other jobs
still run; :class:`SweepSummary` (a Hydra callback, see ``conf/hydra/default.yaml``) then lists
every job of the sweep with its state and error, and exits non-zero if any job did not finish.
Finished jobs leave a ``DONE`` marker, so launching the same multirun again only runs what did
not finish.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from sectional_moe import runs

# sectional_moe.loggers and .slurm import Lightning (3 s); they are imported where used, so that
# launch.py and studies.py, which only need expand_sweep, start fast

STATUS_FILE = "status.json"


def write_status(run_dir: Path, state: str, error: str | None = None, **extra: Any) -> None:
    """Atomically record a job's state (temp file + rename, so a reader never sees half a file).

    Only rank 0 writes: every rank of a DDP job runs the same failure paths in ``train.main``,
    and a second writer would race the first and bump ``attempt`` twice. Secrets in the error
    text (e.g. an override resolved from ``${oc.env:...}``) are redacted.
    """
    from sectional_moe.loggers import redact_text
    from sectional_moe.slurm import is_rank_zero, slurm_job_id

    if not is_rank_zero():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / STATUS_FILE
    previous = read_status(run_dir) or {}
    if error is not None:
        error = redact_text(error)
    extra = {k: redact_text(v) if isinstance(v, str) else v for k, v in extra.items()}
    status = {
        "state": state,
        "error": error,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "started": previous.get("started") if state != "running" else time.strftime("%Y-%m-%dT%H:%M:%S"),
        "attempt": previous.get("attempt", 0) + (1 if state == "running" else 0),
        "host": socket.gethostname(),
        "slurm_job_id": slurm_job_id(),
        **extra,
    }
    # a temp name of this process's own: two writers (a requeued attempt overlapping the old one,
    # a stray rank) never rename each other's half-written file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(status, indent=1))
    os.replace(tmp, path)


def read_status(run_dir: Path) -> dict[str, Any] | None:
    """The job's last recorded status, or None if there is none (or it cannot be read)."""
    try:
        return json.loads((run_dir / STATUS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def expand_sweep(task_overrides: list[str]) -> list[list[str]]:
    """The job override lists Hydra's basic sweeper makes of ``experts=4,8 routing=topk,hash``."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(task_overrides)
    return [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def job_dirname(overrides: list[str], exclude_keys: list[str], seed: Any) -> str:
    """Same rule as Hydra's ``override_dirname`` (sorted ``k=v`` joined by commas) + the seed."""
    kept = sorted(o for o in overrides if runs.override_key(o) not in set(exclude_keys))
    seed_value = next((o.split("=", 1)[1] for o in overrides if runs.override_key(o) == "seed"), seed)
    return runs.run_key(",".join(kept), seed_value)


def _dirs_by_overrides(sweep_dir: Path) -> dict[frozenset[str], Path]:
    """Job directories of a sweep keyed by the overrides Hydra recorded in ``.hydra/overrides.yaml``.

    Matching on what was recorded, not on a recomputed name, survives what the name cannot show:
    interpolated values (``'${size.d_ff}'`` becomes ``_48_``) and long names shortened to a digest.
    """
    found: dict[frozenset[str], Path] = {}
    for path in sweep_dir.glob("*/.hydra/overrides.yaml"):
        try:  # plain YAML: the recorded values may hold interpolations that must stay text
            recorded = yaml.safe_load(path.read_text()) or []
        except (OSError, yaml.YAMLError):  # a half-written file: fall back to the computed name
            continue
        found[_override_key_set(str(o) for o in recorded)] = path.parent.parent
    return found


def _override_key_set(overrides: Any) -> frozenset[str]:
    from sectional_moe.loggers import redact_text

    # redacted on both sides: the job's scrubbed overrides.yaml still matches a literal secret
    return frozenset(redact_text(o) for o in overrides)


def sweep_table(sweep_dir: Path, jobs: list[list[str]], exclude_keys: list[str], seed: Any) -> list[dict[str, Any]]:
    """One row per job of the sweep: its overrides, directory, state and error (secrets redacted)."""
    from sectional_moe.loggers import redact_text

    recorded = _dirs_by_overrides(sweep_dir)
    rows = []
    for overrides in jobs:
        run_dir = recorded.get(_override_key_set(overrides)) or sweep_dir / job_dirname(overrides, exclude_keys, seed)
        status = read_status(run_dir) or {}
        state = status.get("state", "not started")
        if state == "running":
            state = "unfinished"  # killed (OOM, time limit) before it could record an outcome
        error = status.get("error")
        rows.append({"job": redact_text(" ".join(overrides)) or "(no overrides)", "dir": redact_text(str(run_dir)),
                     "state": state, "error": redact_text(error) if error else error})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`sweep_table` as a fixed-width text table (first line of each error)."""
    width = max([len(r["job"]) for r in rows] + [3])
    lines = [f"{'job':<{width}}  state       error"]
    for r in rows:
        lines.append(f"{r['job']:<{width}}  {r['state']:<10}  {(r['error'] or '').splitlines()[0] if r['error'] else ''}")
    return "\n".join(lines)


class SweepSummary(Callback):
    """At the end of a multirun: print each job's state and error; exit 1 if any did not finish.

    At its start: refuse a launcher that cannot work here (SLURM without ``sbatch``), exit 2.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from sectional_moe.config import check_launcher
        from sectional_moe.errors import ConfigError

        try:
            check_launcher(OmegaConf.select(config, "hydra.launcher"))
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from sectional_moe.loggers import scrub_secrets_in_files

        hydra_cfg = config.hydra
        sweep_dir = Path(str(hydra_cfg.sweep.dir))
        exclude = list(OmegaConf.select(hydra_cfg, "job.config.override_dirname.exclude_keys") or [])
        # unresolved: reading the ListConfig would resolve ${oc.env:...} in the values, printing a
        # secret and no longer matching the overrides the jobs recorded
        task = OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False)
        assert isinstance(task, list)
        jobs = expand_sweep([str(o) for o in task])
        rows = sweep_table(sweep_dir, jobs, exclude, config.get("seed"))
        scrub_secrets_in_files(sweep_dir)  # multirun.yaml holds the command line verbatim
        (sweep_dir / "summary.json").write_text(json.dumps(rows, indent=1))
        print(f"\nsweep summary ({sweep_dir}):\n{format_table(rows)}", flush=True)
        bad = [r for r in rows if r["state"] != "done"]
        if bad:
            print(f"{len(bad)} of {len(rows)} jobs did not finish; launch the same command again to run only those.", file=sys.stderr, flush=True)
            sys.exit(1)
