"""``python -m sectional_moe.bench.allocator``: what ``malloc_reuse`` buys per job shape on this CPU.

``malloc_reuse`` (:func:`sectional_moe.device.reuse_host_memory`) changes glibc's thresholds for the
whole process, so the two sides cannot share one process as the main benchmark's setups do. Each
round trains every case twice, in two fresh spawned processes back to back (system malloc, then
reuse, or the other way round in alternate rounds), with the same weights, batches, optimiser and
thread count; foreign load hits both sides of a pair alike. Per case the report gives the round
medians, the paired step-time change with its Student-t 95 % interval, and the peak RSS of each
side. Writes ``allocator.json`` and ``allocator.md`` (``--out``).

Imports: torch (in the children), :mod:`sectional_moe.bench` (cases, fresh, runners, report), :mod:`sectional_moe.device`.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
from typing import Any, Sequence

from sectional_moe.bench.cases import Case, make_spec, reference_case, study_cases
from sectional_moe.bench.fresh import paired_rounds
from sectional_moe.bench.report import check_positive, paired_delta, print_and_write, run_conditions, run_meta, run_start
from sectional_moe.device import HOST_MALLOC_USER_ENV, reuse_host_memory
from sectional_moe.files import REPO_ROOT

SIDES = ("system", "reuse")
DEFAULT_JOB = {"preset": "tiny", "family": "sectional", "routing": "segment_fixed", "experts": 4, "vocab": 8192, "batch": 16}


def allocator_cases(quick: bool = False) -> list[Case]:
    """The default job's shape (``python train.py``), the studies' points and the issue-17 reference shape."""
    j = DEFAULT_JOB
    default = Case(j["preset"], j["family"], j["routing"], j["experts"],
                   make_spec(j["preset"], j["family"], j["routing"], j["experts"], j["vocab"]), batch=j["batch"], tag="default_job")
    if quick:
        return [reference_case(quick=True)]
    return [default, *study_cases(), reference_case()]


def train_side(side: str, case_index: int, quick: bool, warmup: int, steps: int, threads: int) -> dict[str, Any]:
    """One side of a pair, in a fresh process: set the allocator, train ``warmup + steps`` bare steps
    (fp32 eager, as the CPU runs of this machine), return the timed steps' wall times and peak RSS."""
    choice = reuse_host_memory(side == "reuse", "cpu")
    if side == "reuse" and not choice.applied:
        raise RuntimeError(f"malloc_reuse could not be applied: {choice.reason}")
    import torch  # (already imported by the bench package as the child unpickled this function; every training allocation follows the setting)

    from sectional_moe.bench.runners import run_bare

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # as train.py
    case = allocator_cases(quick)[case_index]
    result = run_bare(case, case.batch or 8, warmup, steps, torch.device("cpu"), "32-true", False, False)
    return {"step_times": result.step_times, "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run(rounds: int, warmup: int, steps: int, threads: int, quick: bool = False, log: Any = print,
        argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Every case, ``rounds`` times, each side in its own spawned process; the JSON-ready report
    (``argv``: the command-line arguments it records, None for the process's own)."""
    cases = allocator_cases(quick)
    env_user = [k for k in HOST_MALLOC_USER_ENV if os.environ.get(k)]
    if env_user:
        raise SystemExit(f"error: unset {', '.join(env_user)}: the 'system' side must be glibc's defaults")
    start = run_start()
    pairs = [tuple((train_side, (side, i, quick, warmup, steps, threads)) for side in SIDES) for i in range(len(cases))]
    results = paired_rounds(pairs, rounds, log)  # type: ignore[arg-type]
    medians = {(i, side): [statistics.median(r[k]["step_times"]) for r in results[i]] for i in range(len(cases))
               for k, side in enumerate(SIDES)}
    rss = {(i, side): [r[k]["max_rss_bytes"] for r in results[i]] for i in range(len(cases)) for k, side in enumerate(SIDES)}
    rows = []
    for i, case in enumerate(cases):
        system, reuse = medians[(i, "system")], medians[(i, "reuse")]
        stats = paired_delta(reuse, system)
        row: dict[str, Any] = {
            "case": case.tag if case.tag != "study_cpu" else f"study_cpu {case.label}", "label": case.label,
            "preset": case.preset, "batch": case.batch, "seq_len": case.spec.seq_len,
            "system_step_s": statistics.median(system), "reuse_step_s": statistics.median(reuse),
            "round_medians_system_s": system, "round_medians_reuse_s": reuse,
            "system_max_rss_mib": max(rss[(i, "system")]) / 2**20, "reuse_max_rss_mib": max(rss[(i, "reuse")]) / 2**20,
        }
        if stats is not None:
            _, mean, half = stats
            row.update(step_time_change=mean, step_time_change_ci95=[mean - half, mean + half], speedup=1 / (1 + mean))
        rows.append(row)
    return {"meta": run_meta(start, "sectional_moe.bench.allocator", argv, threads=threads, rounds=rounds, warmup=warmup,
                             steps=steps, torch_precision="32-true eager"),
            "results": rows}


def to_markdown(report: dict[str, Any]) -> str:
    m = report["meta"]
    command, load = run_conditions(m)
    lines = [
        "# malloc_reuse: system malloc vs freed memory kept for the next step", "",
        (f"{command}, {m['threads']} thread(s), fp32 eager bare "
         f"training loop, {m['rounds']} rounds x {m['warmup']}+{m['steps']} steps per side, each side a fresh process, "
         f"pairs back to back (order alternating); {load}."), "",
        "| job shape | batch x seq | system ms/step | reuse ms/step | step-time change, 95 % CI (paired) | speed-up | peak RSS system / reuse MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        ci = r.get("step_time_change_ci95")
        change = f"{r['step_time_change']:+.1%} [{ci[0]:+.1%}, {ci[1]:+.1%}]" if ci else "n/a (1 round)"
        speed = f"{r['speedup']:.3f}x" if "speedup" in r else "n/a"
        lines.append(f"| {r['case']} ({r['label']}, {r['preset']}) | {r['batch']} x {r['seq_len']} | {1e3 * r['system_step_s']:.1f} | "
                     f"{1e3 * r['reuse_step_s']:.1f} | {change} | {speed} | {r['system_max_rss_mib']:.0f} / {r['reuse_max_rss_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sectional_moe.bench.allocator", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rounds", type=int, default=6, help="pairs per case")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side")
    p.add_argument("--steps", type=int, default=20, help="timed steps per side")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per side")
    p.add_argument("--out", default=str(REPO_ROOT / "docs" / "bench"), help="output directory ('' = write nothing)")
    p.add_argument("--quick", action="store_true", help="smoke run: the quick reference shape only")
    a = p.parse_args(argv)
    check_positive(p, a, "rounds", "steps", "threads")
    if a.warmup < 0:
        p.error("--warmup must be >= 0")
    if platform.libc_ver()[0] != "glibc":
        print("error: malloc_reuse tunes glibc; this interpreter does not run on glibc", file=sys.stderr)
        return 2
    report = run(a.rounds, a.warmup, a.steps, a.threads, quick=a.quick, argv=argv)
    print_and_write(report, to_markdown(report), a.out, "allocator")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
