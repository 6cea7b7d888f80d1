"""Road-map studies: each ``experiments/<name>.yaml`` is one question, runnable as one command.

    python -m sectional_moe.studies list
    python -m sectional_moe.studies dry-run e_sweep --scale gpu     # jobs, FLOPs, predicted cost
    python -m sectional_moe.studies run e_sweep                     # cpu scale, then the report

A study file holds the question, the hypothesis, the metric and how to read it, a list of
``sweeps`` (each one ``python train.py -m ...`` multirun, because Hydra's basic sweeper only
makes cartesian products and a dense baseline must not be repeated for every E) and ``scales``
(the overrides of each scale, normally ``experiment=study_cpu`` or ``experiment=study_gpu``).
All sweeps of a study share one W&B group and one sweep directory,
``outputs/studies/multirun/study-<name>-<scale>/``, so the report and W&B compare them side by side.
Re-running a study runs only the jobs that did not finish (the DONE markers of train.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from omegaconf import OmegaConf

from sectional_moe.errors import ConfigError
from sectional_moe.sweeps import expand_sweep

REPO = Path(__file__).resolve().parents[2]
STUDIES_DIR = REPO / "experiments"
TASK_NAME = "studies"
# what a GPU job is assumed to sustain when predicting its cost (dense bf16 peak x MFU)
GPU_PEAK_TFLOPS = {"h100": 989.4, "a100": 312.0}
ASSUMED_MFU = {"gpu": 0.35, "cpu": 0.25}


@dataclasses.dataclass
class Study:
    """One road-map study as written in ``experiments/<name>.yaml``."""

    name: str
    question: str
    hypothesis: str
    metric: str
    read: str
    sweeps: dict[str, list[str]]  # scale -> sweep lines ("*" for every scale)
    scales: dict[str, list[str]]
    report: dict[str, Any]
    parallel: int | None = None  # concurrent sweeps on the cpu scale (None: one per core); 1 for timing studies

    def group(self, scale: str) -> str:
        return f"study-{self.name}-{scale}"

    def scale_overrides(self, scale: str) -> list[str]:
        if scale not in self.scales:
            raise ConfigError("scale", f"study {self.name!r} has no scale {scale!r}; use one of {sorted(self.scales)}")
        return list(self.scales[scale])

    def sweep_lines(self, scale: str) -> list[str]:
        """The sweeps run at ``scale``: its own list if the study has one, else the shared one."""
        return list(self.sweeps.get(scale, self.sweeps.get("*", [])))

    def jobs(self, scale: str, ends_only: bool = False) -> list[list[str]]:
        """Every job's overrides (scale first, then the sweep's), in launch order; with
        ``ends_only`` just the first and last job of each sweep (a quick structural check)."""
        base = self.scale_overrides(scale)
        out: list[list[str]] = []
        for sweep in self.sweep_lines(scale):
            jobs = expand_sweep(shlex.split(sweep))
            out += [base + job for job in (jobs[:1] + jobs[-1:] if ends_only and len(jobs) > 1 else jobs)]
        return out


def study_names() -> list[str]:
    return sorted(p.stem for p in STUDIES_DIR.glob("*.yaml"))


def load_study(name: str) -> Study:
    """Read ``experiments/<name>.yaml``; a missing study names the ones that exist."""
    path = STUDIES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError("study", f"no study {name!r} in {STUDIES_DIR}; use one of {', '.join(study_names())}")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # ${...} belong to the jobs
    assert isinstance(raw, dict)
    missing = {"question", "hypothesis", "metric", "read", "sweeps", "scales"} - set(raw)
    if missing:
        raise ConfigError("study", f"{path} lacks {sorted(missing)}")
    return Study(name=name, question=raw["question"].strip(), hypothesis=raw["hypothesis"].strip(),
                 metric=raw["metric"], read=raw["read"].strip(),
                 sweeps=raw["sweeps"] if isinstance(raw["sweeps"], dict) else {"*": list(raw["sweeps"])},
                 scales={k: list(v) for k, v in raw["scales"].items()}, report=dict(raw.get("report") or {}),
                 parallel=raw.get("parallel"))


@contextlib.contextmanager
def config_composer() -> Iterator[Callable[[list[str]], Any]]:
    """``with config_composer() as compose: cfg = compose(overrides)``: the composed train config of
    a job (no Hydra runtime: for validation and costing). One initialisation for many jobs."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import sectional_moe.runs  # noqa: F401  (registers the resolvers the config uses)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        yield lambda overrides: compose(config_name="train", overrides=overrides)
    GlobalHydra.instance().clear()


def job_cost(cfg: Any, scale: str, peak_tflops: float | None) -> dict[str, Any]:
    """Validated shape and predicted cost of one job: params, FLOPs/token, tokens, total FLOPs and
    hours at ``ASSUMED_MFU`` of ``peak_tflops`` (an estimate, not a measurement)."""
    from sectional_moe.config import validate_config
    from sectional_moe.flops import flops_per_token, param_counts

    spec = validate_config(cfg, check_device=(scale == "cpu"))
    t = cfg.trainer
    devices = int(t.devices) * int(t.num_nodes) if str(t.devices).isdigit() else 1
    tokens = int(t.max_steps) * int(cfg.data.batch_size) * spec.seq_len * devices * int(t.accumulate_grad_batches)
    fpt = flops_per_token(spec, training=True)
    total = fpt * tokens
    p = param_counts(spec)
    row = {"family": spec.family, "routing": spec.routing, "experts": spec.experts, "size": spec.size,
           "params_total": p["total"], "params_active": p["active"], "flops_per_token": fpt,
           "tokens": tokens, "flops": total, "devices": devices}
    if peak_tflops:
        row["hours"] = total / (peak_tflops * 1e12 * ASSUMED_MFU[scale if scale in ASSUMED_MFU else "gpu"] * devices) / 3600
    return row


def dry_run(study: Study, scale: str, peak_tflops: float | None = None, ends_only: bool = False) -> list[dict[str, Any]]:
    """Compose and validate every job of the study at ``scale`` (or the ends of each sweep) and
    predict its cost."""
    if peak_tflops is None:
        if scale == "cpu":
            from sectional_moe.hardware import peak_flops

            import os

            cache = os.environ.get("SECTIONAL_MOE_CACHE", str(Path.home() / ".cache" / "sectional_moe"))
            peak_tflops = (peak_flops("cpu", "32-true", cache_dir=cache).flops_per_s or 0) / 1e12 or None
        else:
            peak_tflops = GPU_PEAK_TFLOPS["h100"]
    rows = []
    with config_composer() as compose:
        for job in study.jobs(scale, ends_only):
            row = job_cost(compose(job), scale, peak_tflops)
            rows.append({"job": " ".join(job[len(study.scale_overrides(scale)):]) or "(defaults)", **row})
    return rows


def format_dry_run(study: Study, scale: str, rows: list[dict[str, Any]]) -> str:
    lines = [f"study {study.name} ({scale}): {len(rows)} jobs, group {study.group(scale)}",
             f"  question: {study.question}", ""]
    width = max([len(r["job"]) for r in rows] + [3])
    header = f"{'job':{width}s} {'params':>8s} {'active':>8s} {'MF/tok':>8s} {'tokens':>9s} {'PFLOP':>9s} {'hours':>8s}"
    lines.append(header)
    for r in rows:
        hours = f"{r['hours']:.3f}" if "hours" in r else "-"
        lines.append(f"{r['job']:{width}s} {r['params_total'] / 1e6:7.2f}M {r['params_active'] / 1e6:7.2f}M "
                     f"{r['flops_per_token'] / 1e6:8.2f} {r['tokens']:9.2e} {r['flops'] / 1e15:9.4f} {hours:>8s}")
    total_flops = sum(r["flops"] for r in rows)
    total_hours = sum(r.get("hours", math.nan) for r in rows)
    lines.append(f"total: {total_flops / 1e15:.3f} PFLOP, about {total_hours:.1f} device-hours "
                 f"at {ASSUMED_MFU.get(scale, ASSUMED_MFU['gpu']):.0%} MFU (an estimate, not a measurement)")
    return "\n".join(lines)


def train_commands(study: Study, scale: str, extra: list[str], parallel: int = 1) -> list[list[str]]:
    """One ``python train.py -m`` command per sweep of the study (each split into up to
    ``parallel`` parts), all in the study's group, the commands with the most jobs first."""
    base = [sys.executable, str(REPO / "train.py"), "-m", f"task_name={TASK_NAME}", f"group={study.group(scale)}"]
    lines = [part for sweep in study.sweep_lines(scale) for part in split_sweep_line(sweep, parallel)]
    if parallel > 1:
        lines.sort(key=lambda line: -len(expand_sweep(shlex.split(line))))
    return [base + study.scale_overrides(scale) + shlex.split(line) + list(extra) for line in lines]


def _run_concurrently(commands: list[list[str]], parallel: int, log_dir: Path) -> int:
    """Run ``commands`` with at most ``parallel`` at a time; return the worst exit code."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

    def one(i: int, cmd: list[str]) -> int:
        log = log_dir / f"sweep-{i:02d}.log"
        print(f"[{i}] start ({len(commands)} sweeps, {parallel} at a time): {' '.join(shlex.quote(c) for c in cmd[3:])}\n"
              f"[{i}]   log: {log}", flush=True)
        start = time.monotonic()
        with log.open("w") as out:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
        print(f"[{i}] exit {rc} after {time.monotonic() - start:.0f} s", flush=True)
        return rc

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return max(pool.map(lambda ic: one(*ic), enumerate(commands)), default=0)


def sweep_dir(study: Study, scale: str, log_dir: Path = REPO / "outputs") -> Path:
    return log_dir / TASK_NAME / "multirun" / study.group(scale)


# a plain comma list `key=a,b,c` (no quotes, interpolations, ranges or globs): safe to split
_PLAIN_SWEEP = re.compile(r"^([+~]*[\w./@-]+)=([^'\"${}\[\]()\s]+(?:,[^'\"${}\[\]()\s,]+)+)$")


def split_sweep_line(line: str, parts: int) -> list[str]:
    """Split a sweep line into up to ``parts`` lines with the same jobs between them, by cutting
    the value list of its longest plain ``key=a,b,c`` sweep; a line without one stays whole."""
    tokens = shlex.split(line)
    lists = [(len(m.group(2).split(",")), i, m) for i, t in enumerate(tokens) if (m := _PLAIN_SWEEP.match(t))]
    if parts <= 1 or not lists:
        return [line]
    n, i, match = max(lists, key=lambda x: (x[0], -x[1]))
    values = match.group(2).split(",")
    chunks = [values[k::parts] for k in range(min(parts, n))]
    return [shlex.join(tokens[:i] + [f"{match.group(1)}={','.join(chunk)}"] + tokens[i + 1:]) for chunk in chunks]


def resolve_parallel(parallel: str | int, scale: str, study: Study | None = None) -> int:
    """``--parallel auto``: the study's own ``parallel`` if it sets one (a study that measures step
    time must not share the cores: ``parallel: 1``), else every core on the CPU scale (one
    single-threaded job per core: nano models barely use a second thread), and one at a time
    otherwise (jobs go to GPUs or SLURM)."""
    if str(parallel) == "auto":
        if study is not None and study.parallel is not None:
            return int(study.parallel)
        return max(1, os.cpu_count() or 1) if scale == "cpu" else 1
    value = int(parallel)
    if value < 1:
        raise ConfigError("--parallel", f"--parallel {value}: pass a positive number of concurrent sweeps, or auto")
    return value


def run(study: Study, scale: str, extra: list[str], report_out: Path | None, parallel: int = 1) -> int:
    """Run every sweep of the study (each failing job is recorded, the others go on), then write
    the report; returns the worst exit code.

    With ``parallel`` > 1 up to that many ``train.py -m`` processes run at once, each with one
    intra-op thread (``OMP_NUM_THREADS=1`` unless set): the sweep lines are split into
    balanced parts (:func:`split_sweep_line`), the largest start first, and each writes its log to
    ``<sweep dir>/logs/``. Every job still lands in the study's one sweep directory and W&B group.
    """
    commands = train_commands(study, scale, extra, parallel)
    worst = 0
    if parallel <= 1:
        for cmd in commands:
            print("$", " ".join(shlex.quote(c) for c in cmd[1:]), flush=True)
            worst = max(worst, subprocess.run(cmd, cwd=REPO).returncode)
    else:
        worst = _run_concurrently(commands, parallel, sweep_dir(study, scale) / "logs")
    if report_out is not None:
        cmd = [sys.executable, "-m", "sectional_moe.report", str(sweep_dir(study, scale)), "--out", str(report_out),
               "--metric", study.metric, *study.report.get("args", [])]
        print("$", " ".join(shlex.quote(c) for c in cmd[1:]), flush=True)
        worst = max(worst, subprocess.run(cmd, cwd=REPO).returncode)
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sectional_moe.studies", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the studies and their questions")
    for name, help_ in (("dry-run", "compose, validate and cost every job"), ("run", "run the study, then its report"),
                        ("commands", "print the train.py commands of the study")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("study", help=f"one of: {', '.join(study_names())}")
        p.add_argument("--scale", default="cpu", help="cpu (2 cores, < 30 min) or gpu")
        if name == "dry-run":
            p.add_argument("--peak-tflops", type=float, default=None, help="device peak for the cost estimate")
            p.add_argument("--json", action="store_true")
        if name == "run":
            p.add_argument("--report-dir", type=Path, default=None,
                           help="where the report goes (default docs/results/<study>-<scale>)")
            p.add_argument("--no-report", action="store_true")
            p.add_argument("--parallel", default="auto",
                           help="sweeps run at once, one thread each (default auto: every core on the cpu scale, 1 on gpu)")
        if name in ("run", "commands"):
            p.add_argument("overrides", nargs="*", help="extra overrides for every job, e.g. hydra/launcher=slurm")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            for n in study_names():
                s = load_study(n)
                print(f"{n:16s} {s.question}  [{len(s.jobs('cpu'))} cpu jobs]")
            return 0
        study = load_study(args.study)
        if args.command == "dry-run":
            rows = dry_run(study, args.scale, args.peak_tflops)
            print(json.dumps(rows, indent=1) if args.json else format_dry_run(study, args.scale, rows))
            return 0
        if args.command == "commands":
            for cmd in train_commands(study, args.scale, args.overrides):
                print(" ".join(shlex.quote(c) for c in ["python", "train.py", *cmd[3:]]))
            return 0
        out = None if args.no_report else (args.report_dir or REPO / "docs" / "results" / f"{study.name}-{args.scale}")
        return run(study, args.scale, args.overrides, out, resolve_parallel(args.parallel, args.scale, study))
    except ConfigError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
