"""``python -m sectional_moe.bench``: run the benchmark round-robin and write ``bench.json`` / ``bench.md``.

Imports: torch, :mod:`sectional_moe.bench` (cases, probes, runners, report), :mod:`sectional_moe.hardware`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from sectional_moe.bench.cases import (DEFAULT_BATCH, FAMILY_ROUTINGS, Case, Setup, build_cases, parse_combos,
                                       parse_setups, reference_case, study_cases)
from sectional_moe.bench.probes import GemmProbe, gemm_shapes, training_gemms
from sectional_moe.bench.report import assemble_report, paired_delta, plot_scaling, to_markdown, write_outputs
from sectional_moe.bench.runners import BenchSettings, Runner, quiet_lightning
from sectional_moe.device import choose_precision, pick_device, reuse_host_memory
from sectional_moe.files import REPO_ROOT
from sectional_moe.hardware import measure_matmul_flops



def build_runners(settings: BenchSettings) -> tuple[list[Case], list[Runner], list[Runner]]:
    """Every case and (case, mode, setup) runner of a benchmark: the main rounds' runners and the
    overhead-only runners (callbacks on vs off, paired, in their own rounds)."""
    main_setup = settings.main_setup
    cases = build_cases(settings.presets, settings.experts, settings.combos, settings.vocab_size,
                        settings.seq_lens, settings.d_models)
    runners: list[Runner] = []
    for case in cases:
        b = settings.batch_of(case)
        runners.append(Runner(case, "lightning", b, main_setup))
        if case.label in settings.overhead:
            runners.extend([Runner(case, "lightning_nocb", b, main_setup), Runner(case, "bare", b, main_setup)])
        # side by side: every family at one E (and dense) in every setup
        if not settings.seq_lens and not settings.d_models and (case.family == "dense" or case.experts == settings.side_experts):
            runners.extend(Runner(case, "lightning", b, s) for s in settings.setups if s != main_setup)
    extra: list[Case] = []
    if settings.study:
        extra += study_cases()
        for case in extra:
            runners.extend(Runner(case, "lightning", settings.batch_of(case), s) for s in (settings.setups or [main_setup]))
    if settings.reference:
        ref = reference_case(settings.quick)
        extra.append(ref)
        for s in [Setup("fp32"), Setup("bf16")]:
            runners.extend([Runner(ref, "bare", ref.batch or 8, s), Runner(ref, "reference", ref.batch or 8, s)])
    overhead: list[Runner] = []
    if settings.overhead_rounds or settings.overhead_ci:
        for case in cases:
            if case.label in settings.overhead:
                b = settings.batch_of(case)
                overhead += [Runner(case, "overhead_cb", b, main_setup), Runner(case, "overhead_nocb", b, main_setup)]
    return cases + extra, runners, overhead


def run_benchmark(settings: BenchSettings, progress: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Measure every configuration round-robin; return the JSON-ready report (also written if ``out``)."""
    log = progress or (lambda msg: None)
    import lightning.pytorch  # noqa: F401  (imported first: it resets its loggers' levels on import)

    device = pick_device(settings.device)
    torch.set_flush_denormal(True)  # as train.py: denormal gradients slow CPU matmuls severalfold
    from torch._dynamo import config as dynamo_config

    # every compiled runner is another model through the same forward code; Dynamo's default of 8
    # compiled versions per function would silently run the later ones eagerly
    dynamo_config.recompile_limit = 256
    dynamo_config.accumulated_recompile_limit = 4096
    if settings.threads:
        torch.set_num_threads(settings.threads)
    host_malloc = reuse_host_memory(settings.malloc_reuse, device.type)  # as train.py does: what a run gets
    quiet_lightning()

    started = _dt.datetime.now(_dt.timezone.utc)
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    cases, runners, overhead = build_runners(settings)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    probes = {(r.case.name, r.setup.dtype_name): GemmProbe(training_gemms(gemm_shapes(r.case.spec, r.batch)), device,
                                                           dtypes[r.setup.dtype_name]) for r in runners}
    generic_probe = measure_matmul_flops("fp32") if device.type == "cpu" else None

    for rnd in range(settings.rounds):
        shift = rnd % max(1, len(runners))
        order = runners[shift:] + runners[:shift]  # rotate: no configuration always runs first/last
        t_round = time.perf_counter()
        probed: set[tuple[str, str]] = set()
        for runner in order:
            runner.run_round(settings, device)
            key = (runner.case.name, runner.setup.dtype_name)
            if runner.mode in ("lightning", "bare") and key not in probed:  # the GEMM probe runs interleaved too
                probes[key].run(settings.probe_reps)
                probed.add(key)
        log(f"round {rnd + 1}/{settings.rounds}: {len(order)} runs in {time.perf_counter() - t_round:.1f}s")
    for runner in runners:
        runner.state = None  # compiled modules are no longer needed: free their memory
    overhead_stop = run_overhead_rounds(overhead, settings, lambda runner: runner.run_round(
        replace(settings, steps=settings.overhead_steps), device), log)

    report = assemble_report(settings, device, cases, runners + overhead, probes, generic_probe, started)
    report["meta"]["machine"]["load_avg_start"] = load_start
    report["meta"]["overhead_stop"] = overhead_stop
    report["meta"]["machine"]["malloc_reuse"] = {"applied": host_malloc.applied, "reason": host_malloc.reason}
    if settings.out is not None:
        write_outputs(report, settings.out)
        if settings.plot:
            plot_scaling(report, settings.out / "scaling.png")
    return report


def run_overhead_rounds(overhead: list[Runner], settings: BenchSettings, run: Callable[[Runner], Any],
                        log: Callable[[str], None] = lambda msg: None) -> str:
    """Callbacks on vs off: paired runs of each overhead case (pairs are consecutive runners), adjacent
    in every round, the first of a pair alternating. ``settings.overhead_rounds`` rounds, or with
    ``settings.overhead_ci`` as many as it takes (at least that many, at most ``overhead_max_rounds``
    or ``overhead_max_s`` seconds) until every pair's 95 % interval of the step-time difference is
    narrower than ±overhead_ci. Returns why the rounds stopped (written into the report)."""
    pairs = [overhead[i:i + 2] for i in range(0, len(overhead), 2)]
    started, rnd = time.perf_counter(), 0
    while True:
        widths = [(s[2] if (s := paired_delta(on.round_medians, off.round_medians)) else float("inf")) for on, off in pairs]
        if rnd >= settings.overhead_rounds:
            if not settings.overhead_ci:
                return f"{rnd} rounds (fixed)"
            if pairs and max(widths) < settings.overhead_ci:
                return f"{rnd} rounds: every 95 % half-width below {settings.overhead_ci:.1%}"
            if rnd >= settings.overhead_max_rounds or time.perf_counter() - started > settings.overhead_max_s:
                return (f"{rnd} rounds, {time.perf_counter() - started:.0f} s: budget spent with the widest 95 % "
                        f"half-width {max(widths):.1%} (target {settings.overhead_ci:.1%})")
        if not pairs:
            return "no overhead cases"
        t_round = time.perf_counter()
        for pair in pairs:
            for runner in (pair if rnd % 2 == 0 else pair[::-1]):
                run(runner)
        rnd += 1
        shown = ", ".join("–" if w == float("inf") else f"±{w:.1%}" for w in widths)
        log(f"overhead round {rnd}: {len(overhead)} runs in {time.perf_counter() - t_round:.1f}s (95 % half-widths before it: {shown})")


def settings_from_args(argv: Sequence[str] | None = None) -> BenchSettings:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m sectional_moe.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--presets", nargs="+", default=None,
                   help="conf/size presets (default: small on CPU; small base large on CUDA)")
    p.add_argument("--experts", nargs="+", type=int, default=None, help="E values (default 4 8 16)")
    p.add_argument("--configs", nargs="+", default=None,
                   help="family-routing pairs (default: all): dense moe-topk moe-hash sectional-segment_fixed sectional-topk sectional-hash")
    p.add_argument("--overhead", nargs="+", default=None,
                   help="configurations (label, e.g. dense sectional-segment_fixed-E8) also run as a bare loop and "
                        "as Lightning without callbacks (default: dense, sectional-segment_fixed-E8, moe-topk-E8)")
    p.add_argument("--seq-len", nargs="+", type=int, default=[], help="sweep: sequence lengths (default: the preset's)")
    p.add_argument("--d-model", nargs="+", type=int, default=[],
                   help="sweep: model widths, d_ff scaled alike (default: the preset's)")
    p.add_argument("--stat", default="best_round", choices=("best_round", "median"),
                   help="step-time statistic: best_round = lowest per-round median (robust on a shared machine); "
                        "median = median of all timed steps pooled")
    p.add_argument("--plot", action="store_true", help="also write scaling.png: step time and memory vs analytic FLOPs per step")
    p.add_argument("--batch-size", type=int, default=None, help=f"sequences per step (default per preset: {DEFAULT_BATCH})")
    p.add_argument("--rounds", type=int, default=None, help="round-robin rounds (default 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per run (default 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run per round (default 4)")
    p.add_argument("--vocab-size", type=int, default=None, help="vocabulary (default 8192, the data default)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--precision", default="auto", choices=("auto", "32-true", "bf16-mixed"),
                   help="the main setup's precision (E sweep, overhead cases); auto = what trainer.precision=auto picks here")
    p.add_argument("--compile", default="auto", choices=("auto", "true", "false"),
                   help="compile the main setup (auto: on CUDA, off on CPU, where the side-by-side setups show compiled speed)")
    p.add_argument("--setups", nargs="+", default=None,
                   help="setups trained side by side per family (at --side-experts) and at the studies' job shape: "
                        "fp32 bf16 fp32+compile bf16+compile (default on CPU: all four; CUDA: bf16 bf16+compile; --quick: fp32 bf16)")
    p.add_argument("--side-experts", type=int, default=None, help="E of the side-by-side table (default 8; --quick 4)")
    p.add_argument("--no-study", action="store_true", help="skip the studies' job shape (conf/experiment/study_cpu.yaml)")
    p.add_argument("--no-reference", action="store_true", help="skip our dense model vs the GPT-2-style reference (bare loops)")
    p.add_argument("--overhead-rounds", type=int, default=None,
                   help="extra paired rounds of the overhead cases, callbacks on vs off (default 12; --quick 0)")
    p.add_argument("--overhead-steps", type=int, default=8, help="timed steps per overhead round")
    p.add_argument("--overhead-ci", type=float, default=None,
                   help="keep adding overhead rounds (after --overhead-rounds) until every case's 95 %% interval of the "
                        "callbacks on-vs-off difference is narrower than this, e.g. 0.01 for ±1 %% (default: fixed rounds)")
    p.add_argument("--overhead-max-rounds", type=int, default=200, help="with --overhead-ci: at most this many rounds")
    p.add_argument("--overhead-max-s", type=float, default=3600.0, help="with --overhead-ci: at most this many seconds")
    p.add_argument("--log-every", type=int, default=None,
                   help="trainer.log_every_n_steps (default: warmup+steps, i.e. one logging step per run: "
                        "a pessimistic cadence for the callbacks' cost)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's). On a shared CPU, 1 thread (or OMP_WAIT_POLICY=PASSIVE) "
                        "avoids OpenMP spin-waits stalling every op when another process holds a core")
    p.add_argument("--malloc-reuse", default="auto", choices=("auto", "true", "false"),
                   help="the malloc_reuse setting of train.py for this process (python -m sectional_moe.bench.allocator measures its effect)")
    p.add_argument("--probe-reps", type=int, default=2, help="timed repetitions of each GEMM shape per round")
    p.add_argument("--out", default=str(REPO_ROOT / "docs" / "bench"), help="output directory ('' = write nothing)")
    p.add_argument("--quick", action="store_true", help="smoke run: nano preset, E=4, 2 rounds of 1+1 steps, vocab 512")
    a = p.parse_args(argv)
    if a.overhead_ci is not None and not 0 < a.overhead_ci < 1:
        p.error(f"--overhead-ci {a.overhead_ci}: give the 95 % half-width to reach as a fraction in (0, 1), e.g. 0.01 for ±1 %")

    quick = a.quick
    presets = a.presets or (["nano"] if quick else (["small", "base", "large"] if cuda else ["small"]))
    experts = a.experts or ([4] if quick else [4, 8, 16])
    combos = parse_combos(a.configs) if a.configs else list(FAMILY_ROUTINGS)
    default_overhead = ["dense", "sectional-segment_fixed-E4", "moe-topk-E4"] if quick else \
        ["dense", "sectional-segment_fixed-E8", "moe-topk-E8"]
    rounds = a.rounds or (2 if quick else 3)
    warmup = a.warmup if a.warmup is not None else 1
    steps = a.steps or (1 if quick else 4)
    device = pick_device(a.device)
    precision = a.precision if a.precision != "auto" else choose_precision({"accelerator": device.type, "precision": "auto"}).precision
    compile_model = device.type == "cuda" if a.compile == "auto" else a.compile == "true"
    default_setups = ["fp32", "bf16"] if quick else (["bf16", "bf16+compile"] if cuda else ["fp32", "bf16", "bf16+compile", "fp32+compile"])
    setups = parse_setups(a.setups or default_setups)
    command = "python -m sectional_moe.bench " + " ".join(shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv))
    return BenchSettings(
        presets=presets, experts=experts, combos=combos, overhead=a.overhead or default_overhead,
        batch=a.batch_size, rounds=rounds, warmup=max(1, warmup), steps=max(1, steps),
        vocab_size=a.vocab_size or (512 if quick else 8192), device=str(device), precision=precision,
        compile=compile_model, log_every=a.log_every or (max(1, warmup) + max(1, steps)),
        probe_reps=a.probe_reps, threads=a.threads, seq_lens=a.seq_len, d_models=a.d_model, plot=a.plot, stat=a.stat, out=Path(a.out) if a.out else None, quick=quick, command=command.strip(),
        setups=setups, side_experts=a.side_experts or (experts[0] if quick else 8), study=not a.no_study,
        reference=not a.no_reference,
        overhead_rounds=a.overhead_rounds if a.overhead_rounds is not None else (0 if quick else 12),
        overhead_steps=max(1, a.overhead_steps),
        overhead_ci=a.overhead_ci, overhead_max_rounds=a.overhead_max_rounds, overhead_max_s=a.overhead_max_s,
        malloc_reuse={"true": True, "false": False}.get(a.malloc_reuse, "auto"),
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    settings = settings_from_args(argv)
    report = run_benchmark(settings, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(to_markdown(report))
    if settings.out is not None:
        print(f"wrote {settings.out / 'bench.json'} and {settings.out / 'bench.md'}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
