"""Sweeps: expanding ``experts=4,8 routing=topk,hash`` into jobs, and the end-of-multirun summary.

In a multirun a failing job records its error in its ``status.json`` and returns instead of
raising, so the other jobs still run; :class:`SweepSummary` (a Hydra callback, see
``conf/hydra/default.yaml``) then lists every job of the sweep with its state and error, and exits
non-zero if any job did not finish. Finished jobs leave a ``DONE`` marker, so launching the same
multirun again only runs what did not finish.

Imports: hydra, :mod:`sectional_moe.runs`, :mod:`sectional_moe.secrets`, :mod:`sectional_moe.errors`
(torch-free: ``launch`` and ``studies`` use :func:`expand_sweep`).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping

import yaml
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from sectional_moe.errors import ConfigError
from sectional_moe.runs.identity import override_key, run_key
from sectional_moe.runs.layout import RunDir, SweepDir
from sectional_moe.secrets import redact_message, redact_override, redact_text, scrub_secrets_in_files


def expand_sweep(task_overrides: list[str]) -> list[list[str]]:
    """The job override lists Hydra's basic sweeper makes of ``experts=4,8 routing=topk,hash``."""
    parsed = OverridesParser.create().parse_overrides(task_overrides)
    return [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def job_dirname(overrides: list[str], exclude_keys: list[str], seed: Any) -> str:
    """Same rule as Hydra's ``override_dirname`` (sorted ``k=v`` joined by commas) + the seed."""
    kept = sorted(o for o in overrides if override_key(o) not in set(exclude_keys))
    seed_value = next((o.split("=", 1)[1] for o in overrides if override_key(o) == "seed"), seed)
    return run_key(",".join(kept), seed_value)


def recorded_jobs(sweep_dir: Path) -> list[list[str]]:
    """The override lists the jobs of a sweep recorded (``.hydra/overrides.yaml``), in directory order:
    the jobs of a sweeper that chooses them as it goes (an Optuna search), which no expansion of the
    command line can list."""
    return [sorted(key) for key in _dirs_by_overrides(sweep_dir)]


def _dirs_by_overrides(sweep_dir: Path) -> dict[frozenset[str], Path]:
    """Job directories of a sweep keyed by the overrides Hydra recorded in ``.hydra/overrides.yaml``.

    Matching on what was recorded, not on a recomputed name, survives what the name cannot show:
    interpolated values (``'${size.d_ff}'`` becomes ``_48_``) and long names shortened to a digest.
    """
    found: dict[frozenset[str], Path] = {}
    children = sorted(sweep_dir.iterdir()) if sweep_dir.is_dir() else []
    for path in (RunDir(d).hydra_overrides for d in children if d.is_dir()):
        if not path.is_file():
            continue
        try:  # plain YAML: the recorded values may hold interpolations that must stay text
            recorded = yaml.safe_load(path.read_text()) or []
        except (OSError, yaml.YAMLError):  # a half-written file: fall back to the computed name
            continue
        found[_override_key_set(str(o) for o in recorded)] = path.parent.parent
    return found


def _override_key_set(overrides: Any) -> frozenset[str]:
    # redacted on both sides: the job's scrubbed overrides.yaml still matches a literal secret
    return frozenset(redact_override(o) for o in overrides)


def sweep_table(sweep_dir: Path, jobs: list[list[str]], exclude_keys: list[str], seed: Any) -> list[dict[str, Any]]:
    """One row per job of the sweep: its overrides, directory, state and error (secrets redacted)."""
    recorded = _dirs_by_overrides(sweep_dir)
    rows = []
    for overrides in jobs:
        run_dir = recorded.get(_override_key_set(overrides)) or sweep_dir / job_dirname(overrides, exclude_keys, seed)
        status = RunDir(run_dir).read_status() or {}
        state = status.get("state", "not started")
        if state == "running":
            state = "unfinished"  # killed (OOM, time limit) before it could record an outcome
        error = status.get("error")
        rows.append({"job": redact_message(" ".join(overrides)) or "(no overrides)", "dir": redact_text(str(run_dir)),
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
        try:
            check_launcher(OmegaConf.select(config, "hydra.launcher"))
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        hydra_cfg = config.hydra
        sweep_dir = Path(str(hydra_cfg.sweep.dir))
        exclude = list(OmegaConf.select(hydra_cfg, "job.config.override_dirname.exclude_keys") or [])
        # unresolved: reading the ListConfig would resolve ${oc.env:...} in the values, printing a
        # secret and no longer matching the overrides the jobs recorded
        task = OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False)
        assert isinstance(task, list)
        basic = "BasicSweeper" in str(OmegaConf.select(hydra_cfg, "sweeper._target_", default="BasicSweeper"))
        jobs = expand_sweep([str(o) for o in task]) if basic else recorded_jobs(sweep_dir)
        rows = sweep_table(sweep_dir, jobs, exclude, config.get("seed"))
        scrub_secrets_in_files(sweep_dir)  # multirun.yaml holds the command line verbatim
        SweepDir(sweep_dir).summary_file.write_text(json.dumps(rows, indent=1))
        print(f"\nsweep summary ({sweep_dir}):\n{format_table(rows)}", flush=True)
        bad = [r for r in rows if r["state"] != "done"]
        if bad:
            print(f"{len(bad)} of {len(rows)} jobs did not finish; launch the same command again to run only those.", file=sys.stderr, flush=True)
            sys.exit(1)


def check_launcher(launcher: Mapping[str, Any] | None) -> None:
    """A SLURM launcher needs ``sbatch``: refuse to start a multirun without it (before any job).

    Raises:
        ConfigError: ``hydra/launcher: ...`` when the launcher submits to SLURM and ``sbatch`` is
            not on PATH (not a SLURM login node).
    """
    target = str((launcher or {}).get("_target_", ""))
    if "slurm" not in target.lower():
        return
    assert launcher is not None
    launcher.get("tasks_per_node")  # resolves ${smoe.slurm_tasks:...}: a config error comes before "no SLURM here"
    if shutil.which("sbatch") is None:
        raise ConfigError("hydra/launcher", f"{target.rsplit('.', 1)[-1]} submits jobs with sbatch, which is not on PATH (no SLURM here); "
                          "run on a SLURM login node, start a local cluster (as root: bash slurm/local-cluster.sh start), "
                          "or drop hydra/launcher=... to run the jobs locally")
