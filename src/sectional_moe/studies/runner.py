"""Running a study: validate and cost every job (dry run), launch its sweeps, then its report.

All sweeps of a study share one W&B group and one sweep directory,
``outputs/studies/multirun/study-<name>-<scale>/``, so the report and W&B compare them side by side.
Re-running a study runs only the jobs that did not finish (the DONE markers of train.py).

Imports: hydra, :mod:`sectional_moe.studies.catalog`, :mod:`sectional_moe.training.validate`,
:mod:`sectional_moe.models` (spec, flops), :mod:`sectional_moe.hardware`, :mod:`sectional_moe.resolvers`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from sectional_moe import resolvers
from sectional_moe.cluster.sweeps import expand_sweep, sweep_table
from sectional_moe.errors import ConfigError
from sectional_moe.files import CONF_DIR, REPO_ROOT, atomic_write
from sectional_moe.models.flops import flops_per_token, param_counts
from sectional_moe.runs.layout import RunDir
from sectional_moe.studies.catalog import Study
from sectional_moe.training.validate import validate_config

TASK_NAME = "studies"
# what a GPU job is assumed to sustain when predicting its cost (dense bf16 peak x MFU)
GPU_PEAK_TFLOPS = {"h100": 989.4, "a100": 312.0}
ASSUMED_MFU = {"gpu": 0.35, "cpu": 0.25}


@contextlib.contextmanager
def config_composer() -> Iterator[Callable[[list[str]], Any]]:
    """``with config_composer() as compose: cfg = compose(overrides)``: the composed train config of
    a job (no Hydra runtime: for validation and costing). One initialisation for many jobs."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    resolvers.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield lambda overrides: compose(config_name="train", overrides=overrides)
    GlobalHydra.instance().clear()


def job_cost(cfg: Any, scale: str, peak_tflops: float | None) -> dict[str, Any]:
    """Validated shape and predicted cost of one job: params, FLOPs/token, tokens, total FLOPs and
    hours at ``ASSUMED_MFU`` of ``peak_tflops`` (an estimate, not a measurement)."""
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


def dry_run(study: Study, scale: str, peak_tflops: float | None = None, ends_only: bool = False,
            progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Compose and validate every job of the study at ``scale`` (or the ends of each sweep) and
    predict its cost. ``progress`` receives a line before each step that takes time."""
    say = progress or (lambda _line: None)
    if peak_tflops is None:
        if scale == "cpu":
            say("measuring this CPU's matmul peak for the cost estimate (cached per machine; --peak-tflops skips it)")
            from sectional_moe.hardware import peak_flops  # torch: only to measure this CPU

            cache = os.environ.get("SECTIONAL_MOE_CACHE", str(Path.home() / ".cache" / "sectional_moe"))
            peak_tflops = (peak_flops("cpu", "32-true", cache_dir=cache).flops_per_s or 0) / 1e12 or None
        else:
            peak_tflops = GPU_PEAK_TFLOPS["h100"]
    rows = []
    n_base = len(study.scale_overrides(scale))
    stages: list[tuple[str, list[list[str]]]] = []
    if study.tune is not None:
        tune_jobs = [study.scale_overrides(scale) + job for p in study.tune.points
                     for job in expand_sweep(shlex.split(study.tune.line(p, scale)))]
        stages.append(("tune", tune_jobs))
    stages.append(("main", study.jobs(scale, ends_only)))
    total, done = sum(len(jobs) for _, jobs in stages), 0
    with config_composer() as compose:
        for stage, jobs in stages:
            for job in jobs:
                done += 1
                say(f"[{done}/{total}] composing and validating {' '.join(job[n_base:]) or '(defaults)'}")
                row = job_cost(compose(job), scale, peak_tflops)
                rows.append({"stage": stage, "job": " ".join(job[n_base:]) or "(defaults)", **row})
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
    mfu = ASSUMED_MFU.get(scale, ASSUMED_MFU["gpu"])
    unit = "CPU-hours" if scale == "cpu" else "GPU-hours"
    for stage in dict.fromkeys(r.get("stage", "main") for r in rows):
        part = [r for r in rows if r.get("stage", "main") == stage]
        lines.append(f"stage {stage}: {len(part)} jobs, {sum(r['flops'] for r in part) / 1e15:.3f} PFLOP, about "
                     f"{sum(r.get('hours', math.nan) for r in part):.2f} {unit}")
    total_flops = sum(r["flops"] for r in rows)
    total_hours = sum(r.get("hours", math.nan) for r in rows)
    lines.append(f"total: {total_flops / 1e15:.3f} PFLOP, about {total_hours:.1f} {unit} "
                 f"at {mfu:.0%} MFU (an estimate, not a measurement)")
    if study.tune is not None:
        seeds = study.tune.seeds_for(scale)
        lines.append(f"tuning: {study.tune.param} over {study.tune.values} per point "
                     f"({', '.join(p.name for p in study.tune.points)}), each value from seed{'s' if len(seeds) > 1 else ''} "
                     f"{', '.join(map(str, seeds))}{' (ranked by the mean)' if len(seeds) > 1 else ''}, winners applied to the main sweeps")
    if study.seeds > 1:
        lines.append(f"seeds: every main job without its own seed runs seeds 0..{study.seeds - 1}")
    return "\n".join(lines)


def train_commands(study: Study, scale: str, extra: list[str], parallel: int = 1, tuned: dict[str, Any] | None = None,
                   stage: str = "main") -> list[list[str]]:
    """One ``python train.py -m`` command per sweep of the study (each split into up to
    ``parallel`` parts), all in the study's group, the commands with the most jobs first.

    ``stage="tune"``: the tuning sweeps (one per point, in the shared tuning group); ``tuned``
    (point -> winner) puts the tuned value into the main sweeps.
    """
    if stage == "tune":
        assert study.tune is not None
        group, sweeps = study.tune_group(scale), [study.tune.line(p, scale) for p in study.tune.points]
    else:
        group, sweeps = study.group(scale), study.sweep_lines(scale, tuned)
    base = [sys.executable, str(REPO_ROOT / "train.py"), "-m", f"task_name={TASK_NAME}", f"group={group}"]
    lines = [part for sweep in sweeps for part in split_sweep_line(sweep, parallel)]
    if parallel > 1:
        lines.sort(key=lambda line: -len(expand_sweep(shlex.split(line))))
    return [base + study.scale_overrides(scale) + shlex.split(line) + list(extra) for line in lines]


TUNING_FILE = "tuning.json"
#: keys Hydra leaves out of a job's directory name (conf/hydra/default.yaml, override_dirname)
DIRNAME_EXCLUDED = ("seed", "group", "task_name")


def tuning_results(study: Study, scale: str, log_dir: Path = REPO_ROOT / "outputs", extra: Sequence[str] = ()) -> dict[str, Any]:
    """Each tuning point's best validation loss per value of the tuned key, and its winner.

    Read from the tuning jobs' run directories (the shared tuning sweep directory), each found by
    the overrides it was launched with (``extra``: the study's own, e.g. the pinned precision); a
    point whose jobs have not all finished has no winner yet (``winner: None``, with the missing
    values).
    """
    assert study.tune is not None
    tune = study.tune
    directory = log_dir / TASK_NAME / "multirun" / study.tune_group(scale)
    out: dict[str, Any] = {"param": tune.param, "group": study.tune_group(scale), "values": tune.values,
                           "overrides": tune.overrides.get(scale, tune.overrides.get("*", [])), "points": {}}
    for point in tune.points:
        launched = [f"task_name={TASK_NAME}", f"group={study.tune_group(scale)}"]  # as train_commands launches them
        # expanded as Hydra's sweeper does, whole: a key given twice (a scale's val_check_interval=auto,
        # then the stage's =125) is one override with the later value, as the job recorded it
        jobs = expand_sweep(launched + study.scale_overrides(scale) + shlex.split(tune.line(point, scale)) + list(extra))
        by_seed: dict[str, dict[str, float]] = {}
        missing: list[str] = []
        for job, row in zip(jobs, sweep_table(directory, jobs, list(DIRNAME_EXCLUDED), tune.seeds_for(scale)[0])):
            value = next(o.split("=", 1)[1] for o in job if o.startswith(f"{tune.param}="))
            seed = next(o.split("=", 1)[1] for o in job if o.startswith("seed="))
            best = RunDir(row["dir"]).final_metrics().get("val/loss_best") if row["state"] == "done" else None
            if best is None:
                missing.append(value)
            else:
                by_seed.setdefault(value, {})[seed] = float(best)
        missing = list(dict.fromkeys(missing))
        # a value's loss: the mean over the stage's seeds (one seed: that seed's loss)
        losses = {v: sum(s.values()) / len(s) for v, s in by_seed.items() if v not in missing}
        winner = min(losses, key=losses.__getitem__) if losses and not missing else None
        out["points"][point.name] = {"train": point.train, "applies_to": point.applies_to, "val_loss_best": losses,
                                     "val_loss_best_by_seed": by_seed, "missing": missing, "winner": winner}
    return out


def winners(results: dict[str, Any]) -> dict[str, Any]:
    """point name -> the tuned value, for the points whose tuning finished."""
    return {name: p["winner"] for name, p in results["points"].items() if p["winner"] is not None}


def _run_concurrently(commands: list[list[str]], parallel: int, log_dir: Path) -> int:
    """Run ``commands`` with at most ``parallel`` at a time; return the worst exit code."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

    def one(i: int, cmd: list[str]) -> int:
        if _STOPPED_BY:  # told to stop: the queued sweeps neither start nor truncate their earlier logs
            return 128 + _STOPPED_BY[0]
        log = log_dir / f"sweep-{i:02d}.log"
        print(f"[{i}] start ({len(commands)} sweeps, {parallel} at a time): {' '.join(shlex.quote(c) for c in cmd[3:])}\n"
              f"[{i}]   log: {log}", flush=True)
        start = time.monotonic()
        with log.open("w") as out:
            rc = _call(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        print(f"[{i}] exit {rc} after {time.monotonic() - start:.0f} s", flush=True)
        return rc

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return max(pool.map(lambda ic: one(*ic), enumerate(commands)), default=0)


def sweep_dir(study: Study, scale: str, log_dir: Path = REPO_ROOT / "outputs") -> Path:
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
    worst, tuned = 0, None
    if scale == "cpu":
        extra = [*extra, pinned_precision(extra, parallel)]
    if study.tune is not None:  # the tuning stage first: its winners go into the main sweeps
        tune_dir = REPO_ROOT / "outputs" / TASK_NAME / "multirun" / study.tune_group(scale)
        worst = _launch(train_commands(study, scale, extra, parallel, stage="tune"), parallel, tune_dir / "logs")
        if _STOPPED_BY:  # stopped: no winners from a partial stage, no report of it
            return max(worst, 128 + _STOPPED_BY[0])
        results = tuning_results(study, scale, extra=extra)
        tuned = winners(results)
        unfinished = [name for name, p in results["points"].items() if p["winner"] is None]
        if unfinished:
            print(f"error: tune: the tuning of {', '.join(unfinished)} did not finish (see {tune_dir}); "
                  "run the study again to finish it before the main sweeps", file=sys.stderr, flush=True)
            return max(worst, 1)
        print(f"tuned {study.tune.param}: " + ", ".join(f"{k}={v}" for k, v in tuned.items()), flush=True)
        if report_out is not None:  # the tuning curves (metric vs lr) and every loss, next to the study's report
            report_out.mkdir(parents=True, exist_ok=True)
            atomic_write(report_out / TUNING_FILE, json.dumps(results, indent=1))
            worst = max(worst, _report(tune_dir, report_out / "tuning", "val_loss_best", ["--group-by", "family"]))
    worst = max(worst, _launch(train_commands(study, scale, extra, parallel, tuned), parallel, sweep_dir(study, scale) / "logs"))
    if _STOPPED_BY:  # stopped: the committed report of the last finished pass is not overwritten by a partial one
        return max(worst, 128 + _STOPPED_BY[0])
    if report_out is not None:
        worst = max(worst, _report(sweep_dir(study, scale), report_out, study.metric, study.report.get("args", [])))
    return worst


def pinned_precision(extra: list[str], parallel: int, log_dir: Path = REPO_ROOT / "outputs") -> str:
    """The ``trainer.precision=`` override every CPU-scale study job gets, decided once per machine.

    ``precision=auto`` on a CPU with AVX512-BF16 races bf16 against fp32 matmuls in each process,
    and the winner can flip with the machine's momentary load; the runs of one study (and the
    tuning runs whose winners it uses) must share one precision to be comparable. The first
    study run resolves ``auto`` once and records it in ``<log_dir>/studies/precision-cpu.json``;
    every later run and resumed study reuses it. An explicit ``trainer.precision=`` wins.
    """
    given = next((o for o in extra if o.lstrip("+").startswith("trainer.precision=")), None)
    if given is not None:
        return given
    record = log_dir / TASK_NAME / "precision-cpu.json"
    if record.exists():
        pinned = json.loads(record.read_text())
    else:
        import torch

        from sectional_moe.device import choose_precision

        torch.set_num_threads(1 if parallel > 1 else torch.get_num_threads())  # as the jobs will run
        choice = choose_precision({"accelerator": "cpu", "precision": "auto"})
        pinned = {"precision": choice.precision, "reason": choice.reason, "threads": torch.get_num_threads()}
        atomic_write(record, json.dumps(pinned, indent=1))
    print(f"study precision: {pinned['precision']} ({pinned['reason']}; pinned in {record}, delete it to decide again)", flush=True)
    return f"trainer.precision={pinned['precision']}"


#: the sweeps and reports this process has running (stopped with it: :func:`children_stop_with_runner`)
_CHILDREN: set[subprocess.Popen] = set()
#: the signal that stopped the runner, once one did
_STOPPED_BY: list[int] = []


def _call(cmd: list[str], **kwargs: Any) -> int:
    """Run ``cmd`` in the repository and return its exit code; nothing new starts once the runner
    was told to stop (:func:`children_stop_with_runner`)."""
    if _STOPPED_BY:
        return 128 + _STOPPED_BY[0]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, **kwargs)
    _CHILDREN.add(proc)
    try:
        if _STOPPED_BY:  # stopped while this one was starting
            proc.send_signal(signal.SIGTERM)
        return proc.wait()
    finally:
        _CHILDREN.discard(proc)


def stop_exit_code() -> int | None:
    """128 + the signal that stopped the runner (143 for SIGTERM), or None."""
    return 128 + _STOPPED_BY[0] if _STOPPED_BY else None


@contextlib.contextmanager
def children_stop_with_runner() -> Iterator[None]:
    """SIGTERM to the study runner (``kill``, a batch system stopping the job) reaches its sweeps:
    each gets one SIGTERM (train.py saves ``last.ckpt`` and records ``interrupted``; a repeated
    SIGTERM changes nothing there), no further sweep or report starts, and the runner returns
    when they have exited (:func:`stop_exit_code` then gives 143). Without this the sweeps would
    run on as orphans and the same study started again would race them for the run directories.
    A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        if _STOPPED_BY:
            return
        _STOPPED_BY.append(signum)
        live = list(_CHILDREN)
        print(f"study runner: SIGTERM, stopping {len(live)} sweep(s) after their current step; "
              "the same command resumes them", file=sys.stderr, flush=True)
        for proc in live:
            proc.send_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _report(source: Path, out: Path, metric: str, args: list[str]) -> int:
    """``python -m sectional_moe.report SOURCE --out OUT --metric METRIC ARGS``; its exit code."""
    cmd = [sys.executable, "-m", "sectional_moe.report", str(source), "--out", str(out), "--metric", metric, *args]
    print("$", " ".join(shlex.quote(c) for c in cmd[1:]), flush=True)
    return _call(cmd)


def _launch(commands: list[list[str]], parallel: int, log_dir: Path) -> int:
    """Run the commands one after another, or ``parallel`` at a time with logs in ``log_dir``."""
    if parallel > 1:
        return _run_concurrently(commands, parallel, log_dir)
    worst = 0
    for cmd in commands:
        print("$", " ".join(shlex.quote(c) for c in cmd[1:]), flush=True)
        worst = max(worst, _call(cmd))
    return worst


