"""``python -m sectional_moe.bench``: run the benchmark round-robin and write ``bench.json`` / ``bench.md``.

Imports: torch, :mod:`sectional_moe.bench` (cases, probes, runners, report), :mod:`sectional_moe.hardware`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from sectional_moe.bench.cases import DEFAULT_BATCH, FAMILY_ROUTINGS, build_cases, parse_combos
from sectional_moe.bench.probes import GemmProbe, gemm_shapes, training_gemms
from sectional_moe.bench.report import assemble_report, plot_scaling, to_markdown, write_outputs
from sectional_moe.bench.runners import BenchSettings, Runner, run_bare, run_lightning
from sectional_moe.device import pick_device
from sectional_moe.files import REPO_ROOT
from sectional_moe.hardware import measure_matmul_flops



def run_benchmark(settings: BenchSettings, progress: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Measure every configuration round-robin; return the JSON-ready report (also written if ``out``)."""
    log = progress or (lambda msg: None)
    import lightning.pytorch  # noqa: F401  (imported first: it resets its loggers' levels on import)

    device = pick_device(settings.device)
    torch.set_flush_denormal(True)  # as train.py: denormal gradients slow CPU matmuls severalfold
    if settings.threads:
        torch.set_num_threads(settings.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")

    started = _dt.datetime.now(_dt.timezone.utc)
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    cases = build_cases(settings.presets, settings.experts, settings.combos, settings.vocab_size,
                        settings.seq_lens, settings.d_models)
    runners: list[Runner] = []
    for case in cases:
        b = settings.batch_for(case.preset)
        runners.append(Runner(case, "lightning", b))
        if case.label in settings.overhead:
            runners.extend([Runner(case, "lightning_nocb", b), Runner(case, "bare", b)])
    mm_dtype = torch.bfloat16 if settings.precision.startswith("bf16") else torch.float32
    probes = {c.name: GemmProbe(training_gemms(gemm_shapes(c.spec, settings.batch_for(c.preset))), device, mm_dtype)
              for c in cases}
    generic_probe = measure_matmul_flops("fp32") if device.type == "cpu" else None

    for rnd in range(settings.rounds):
        shift = rnd % max(1, len(runners))
        order = runners[shift:] + runners[:shift]  # rotate: no configuration always runs first/last
        t_round = time.perf_counter()
        for runner in order:
            kw = dict(batch=runner.batch, warmup=settings.warmup, steps=settings.steps, device=device,
                      precision=settings.precision, compile_model=settings.compile, measure_memory=True)
            if runner.mode == "bare":
                res = run_bare(runner.case, **kw)
            else:
                res = run_lightning(runner.case, **kw, callbacks_on=runner.mode == "lightning", log_every=settings.log_every)
            runner.times.extend(res.step_times)
            if res.step_times:
                runner.round_medians.append(statistics.median(res.step_times))
            runner.hooks.extend(res.hook_times)
            if res.step_mem is not None:
                runner.step_mem.append(res.step_mem)
            runner.static_mem = res.static_mem
            if runner.mode == "lightning":  # the GEMM probe runs interleaved too, once per case per round
                probes[runner.case.name].run(settings.probe_reps)
        log(f"round {rnd + 1}/{settings.rounds}: {len(order)} runs in {time.perf_counter() - t_round:.1f}s")

    report = assemble_report(settings, device, cases, runners, probes, generic_probe, started)
    report["meta"]["machine"]["load_avg_start"] = load_start
    if settings.out is not None:
        write_outputs(report, settings.out)
        if settings.plot:
            plot_scaling(report, settings.out / "scaling.png")
    return report




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
    p.add_argument("--precision", default="auto", help="auto (bf16-mixed on CUDA, 32-true on CPU) or a Lightning precision")
    p.add_argument("--compile", default="auto", choices=("auto", "true", "false"), help="torch.compile the model (auto: on CUDA)")
    p.add_argument("--log-every", type=int, default=None,
                   help="trainer.log_every_n_steps (default: warmup+steps, i.e. one logging step per run: "
                        "a pessimistic cadence for the callbacks' cost)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's). On a shared CPU, 1 thread (or OMP_WAIT_POLICY=PASSIVE) "
                        "avoids OpenMP spin-waits stalling every op when another process holds a core")
    p.add_argument("--probe-reps", type=int, default=2, help="timed repetitions of each GEMM shape per round")
    p.add_argument("--out", default=str(REPO_ROOT / "docs" / "bench"), help="output directory ('' = write nothing)")
    p.add_argument("--quick", action="store_true", help="smoke run: nano preset, E=4, 2 rounds of 1+1 steps, vocab 512")
    a = p.parse_args(argv)

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
    precision = a.precision if a.precision != "auto" else ("bf16-mixed" if device.type == "cuda" else "32-true")
    compile_model = device.type == "cuda" if a.compile == "auto" else a.compile == "true"
    command = "python -m sectional_moe.bench " + " ".join(shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv))
    return BenchSettings(
        presets=presets, experts=experts, combos=combos, overhead=a.overhead or default_overhead,
        batch=a.batch_size, rounds=rounds, warmup=max(1, warmup), steps=max(1, steps),
        vocab_size=a.vocab_size or (512 if quick else 8192), device=str(device), precision=precision,
        compile=compile_model, log_every=a.log_every or (max(1, warmup) + max(1, steps)),
        probe_reps=a.probe_reps, threads=a.threads, seq_lens=a.seq_len, d_models=a.d_model, plot=a.plot, stat=a.stat, out=Path(a.out) if a.out else None, quick=quick, command=command.strip(),
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
