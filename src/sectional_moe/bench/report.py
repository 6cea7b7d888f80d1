"""The benchmark's report: statistics per (case, mode), ratios to dense, framework overhead, targets, Markdown, plot.

Imports: torch (versions), lightning (version), :mod:`sectional_moe.bench` (cases, probes, runners).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any

import torch

from sectional_moe.bench.cases import Case
from sectional_moe.bench.probes import MIB, GemmProbe, git_commit, machine_info
from sectional_moe.bench.runners import MODES, BenchSettings, Runner, median, quartiles, step_time
from sectional_moe.models.flops import flops_per_token

SCHEMA_VERSION = 1


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _runner_stats(r: Runner, probe: GemmProbe, stat: str = "best_round") -> dict[str, Any]:
    spec = r.case.spec
    tokens = r.batch * spec.seq_len
    step = step_time(r.times, r.round_medians, stat)
    fpt = flops_per_token(spec, training=True)
    tps = tokens / step if step else None
    model_flops = tps * fpt if tps else None
    peak = probe.rate()
    q = quartiles(r.times)
    mem = max(r.step_mem) if r.step_mem else None
    return {
        "case": r.case.name, "label": r.case.label, "group": r.case.group, "preset": r.case.preset,
        "d_model": spec.d_model, "n_layers": spec.n_layers, "family": spec.family,
        "routing": spec.routing, "experts": r.case.experts,
        "top_k": spec.top_k if spec.routing == "topk" else (1 if spec.routing else None),
        "seq_reduction": spec.seq_reduction if spec.family == "sectional" else None,
        "mode": r.mode, "batch_size": r.batch, "seq_len": spec.seq_len, "tokens_per_step": tokens,
        "flops_per_token": fpt, "n_timed_steps": len(r.times), "step_times_s": r.times,
        "step_time_s": step, "step_statistic": stat, "step_time_median_all_s": median(r.times),
        "step_time_iqr_s": list(q) if q else None,
        # robustness check on a shared machine: foreign load only ever slows a round down
        "round_median_step_times_s": r.round_medians,
        "step_time_best_round_s": min(r.round_medians) if r.round_medians else None,
        "tokens_per_s": tps, "model_flops_per_s": model_flops,
        "gemm_peak_flops_per_s": peak, "frac_of_gemm_peak": _ratio(model_flops, peak),
        "static_mem_mib": r.static_mem / MIB if r.static_mem is not None else None,
        "step_mem_mib": mem / MIB if mem is not None else None,
        "peak_mem_mib": (r.static_mem + mem) / MIB if (mem is not None and r.static_mem is not None) else None,
        # mean, not median: the logging steps (1 in log_every) carry most of the callbacks' cost
        "callback_hook_s_per_step": statistics.fmean(r.hooks) if r.hooks else None,
        "callback_hook_s_steps": r.hooks,
    }


def assemble_report(settings: BenchSettings, device: torch.device, cases: list[Case], runners: list[Runner],
                    probes: dict[str, GemmProbe], generic_probe: float | None, started: _dt.datetime) -> dict[str, Any]:
    """JSON-ready report: metadata, one row per (case, mode), ratios to dense, overheads, targets."""
    import lightning

    rows = [_runner_stats(r, probes[r.case.name], settings.stat) for r in runners]
    by_key = {(row["case"], row["mode"]): row for row in rows}
    # ratios to dense of the same size (preset + swept keys), in the same mode when dense ran in it
    for row in rows:
        dense = by_key.get((f"{row['group']}/dense", row["mode"])) or by_key.get((f"{row['group']}/dense", "lightning"))
        row["tokens_per_s_vs_dense"] = _ratio(row["tokens_per_s"], dense["tokens_per_s"]) if dense else None
        row["model_flops_vs_dense"] = _ratio(row["model_flops_per_s"], dense["model_flops_per_s"]) if dense else None
        row["frac_of_gemm_peak_vs_dense"] = _ratio(row["frac_of_gemm_peak"], dense["frac_of_gemm_peak"]) if dense else None
        row["peak_mem_vs_dense"] = _ratio(row["peak_mem_mib"], dense["peak_mem_mib"]) if dense else None

    overhead = []
    for case in cases:
        lit, nocb, bare = (by_key.get((case.name, m)) for m in MODES)
        if nocb is None or bare is None or lit is None:
            continue
        step = lit["step_time_s"]
        hook = lit["callback_hook_s_per_step"]
        overhead.append({
            "case": case.name, "label": case.label,
            "bare_tokens_per_s": bare["tokens_per_s"], "lightning_nocb_tokens_per_s": nocb["tokens_per_s"],
            "lightning_tokens_per_s": lit["tokens_per_s"],
            "lightning_vs_bare": _ratio(lit["tokens_per_s"], bare["tokens_per_s"]),
            "lightning_nocb_vs_bare": _ratio(nocb["tokens_per_s"], bare["tokens_per_s"]),
            # > 0: the callbacks made the step slower by this fraction (paired medians)
            "callbacks_step_time_delta": (_ratio(lit["step_time_s"], nocb["step_time_s"]) or 1.0) - 1.0,
            "callback_hook_s_per_step": hook,
            "callback_hook_frac_of_step": _ratio(hook, step),
        })

    return {
        "schema_version": SCHEMA_VERSION,
        "meta": {
            "date": started.isoformat(timespec="seconds"),
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": settings.command,
            "git_commit": git_commit(),
            "torch": torch.__version__, "lightning": lightning.__version__, "python": platform.python_version(),
            "machine": {**machine_info(device), "load_avg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
            "device": device.type, "precision": settings.precision, "compile": settings.compile,
            "settings": {
                "presets": settings.presets, "experts": settings.experts, "seq_lens": settings.seq_lens,
                "d_models": settings.d_models,
                "combos": [f if r is None else f"{f}-{r}" for f, r in settings.combos], "overhead_cases": settings.overhead,
                "batch_size": {p: settings.batch_for(p) for p in settings.presets}, "rounds": settings.rounds,
                "warmup_steps": settings.warmup, "timed_steps_per_round": settings.steps,
                "vocab_size": settings.vocab_size, "log_every_n_steps": settings.log_every,
                "quick": settings.quick, "gemm_probe_reps": settings.probe_reps, "step_statistic": settings.stat, "threads": torch.get_num_threads(),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            },
            "generic_matmul_probe_flops_per_s": generic_probe,
        },
        "results": rows,
        "overhead": overhead,
        "targets": targets(rows, overhead),
    }


def targets(rows: list[dict[str, Any]], overhead: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each computed from the measured rows (None when not measured)."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, threshold: float, higher_is_better: bool = True) -> None:
        met = None if value is None else (value >= threshold if higher_is_better else value <= threshold)
        out.append({"target": name, "value": value, "threshold": threshold,
                    "direction": ">=" if higher_is_better else "<=", "met": met})

    for o in overhead:
        if o["label"].startswith(("dense", "sectional")):
            add(f"{o['case']}: Lightning+callbacks tokens/s vs bare loop", o["lightning_vs_bare"], 0.95)
    main = [r for r in rows if r["mode"] == "lightning"]
    for r in main:
        if r["family"] == "sectional" and r["routing"] == "segment_fixed":
            add(f"{r['case']}: model FLOP/s vs dense", r["model_flops_vs_dense"], 0.90)
        if r["family"] == "moe" and r["routing"] == "topk" and r["experts"] == 8 and r["top_k"] == 2:
            add(f"{r['case']}: model FLOP/s vs dense", r["model_flops_vs_dense"], 0.70)
    for o in overhead:
        add(f"{o['case']}: metrics callbacks, hook time / step time", o["callback_hook_frac_of_step"], 0.02, False)
        add(f"{o['case']}: metrics callbacks on vs off, step-time difference", o["callbacks_step_time_delta"], 0.02, False)
    for r in main:
        if r["family"] == "dense":
            add(f"{r['case']}: model FLOP/s / matmul rate at its GEMM shapes", r["frac_of_gemm_peak"], 0.50)
    return out


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------
def _fmt(x: float | None, spec: str = ".2f", scale: float = 1.0) -> str:
    return "–" if x is None else format(x * scale, spec)


def to_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: metadata, the main table, framework overhead and the targets."""
    m = report["meta"]
    mach = m["machine"]
    lines = [
        "# Training benchmark",
        "",
        f"- date: {m['date']} (finished {m['finished']})",
        f"- machine: {mach['cpu_model']}, {mach['cpu_cores']} cores, torch threads {mach['torch_threads']}"
        + (f", GPU {mach['gpu']}" if mach.get("gpu") else ", no GPU"),
        f"- load average at start / end: {_loadavg(mach.get('load_avg_start'))} / {_loadavg(mach.get('load_avg_end'))}",
        f"- torch {m['torch']}, lightning {m['lightning']}, python {m['python']}; device {m['device']}, "
        f"precision {m['precision']}, compile {m['compile']}",
        f"- git commit: {m['git_commit'] or 'unknown'}",
        f"- command: `{m['command']}`",
        f"- {m['settings']['rounds']} rounds round-robin x ({m['settings']['warmup_steps']} warm-up + "
        f"{m['settings']['timed_steps_per_round']} timed steps); batch "
        + ", ".join(f"{p}={b}" for p, b in m["settings"]["batch_size"].items())
        + f"; synthetic tokens, vocab {m['settings']['vocab_size']}",
        "- step time: " + ("median of each round's timed steps, best round (foreign load on a shared machine only "
                           "slows a round down); the pooled median of all steps is in bench.json"
                           if m["settings"].get("step_statistic") == "best_round" else "median of all timed steps"),
    ]
    if m.get("rederived"):
        lines.append(f"- note: {m['rederived']}")
    if m.get("generic_matmul_probe_flops_per_s"):
        lines.append(f"- generic fp32 matmul probe (512x512x512): {m['generic_matmul_probe_flops_per_s'] / 1e9:.1f} GFLOP/s")
    lines += [
        "",
        "## Training throughput (Lightning + metrics callbacks)",
        "",
        "Model FLOPs are analytic (`flops_per_token`, matmuls only, backward = 2x forward). *GEMM peak* is the rate this "
        "machine reaches on the model's own projection GEMMs (forward + both backward GEMMs, timed alone); "
        "*% peak* = model FLOP/s / GEMM peak. *Peak mem* = parameters + AdamW state + the step's transient peak.",
        "",
        "| size | config | E | step ms | tokens/s | x dense | model GFLOP/s | x dense | GEMM peak GFLOP/s | % peak | peak mem MiB | x dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        if r["mode"] != "lightning":
            continue
        lines.append(
            f"| {r['group']} | {r['label']} | {r['experts'] or '–'} | {_fmt(r['step_time_s'], '.1f', 1e3)} | "
            f"{_fmt(r['tokens_per_s'], '.0f')} | {_fmt(r['tokens_per_s_vs_dense'])} | {_fmt(r['model_flops_per_s'], '.1f', 1e-9)} | "
            f"{_fmt(r['model_flops_vs_dense'])} | {_fmt(r['gemm_peak_flops_per_s'], '.1f', 1e-9)} | "
            f"{_fmt(r['frac_of_gemm_peak'], '.0f', 100)} | {_fmt(r['peak_mem_mib'], '.0f')} | {_fmt(r['peak_mem_vs_dense'])} |"
        )
    if report["overhead"]:
        lines += [
            "",
            "## Framework overhead (same model, batch and optimiser)",
            "",
            "| config | bare tokens/s | Lightning no-cb tokens/s | Lightning + cb tokens/s | Lightning+cb / bare | "
            "no-cb / bare | callbacks on vs off (step time) | callback hook time / step |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for o in report["overhead"]:
            lines.append(
                f"| {o['case']} | {_fmt(o['bare_tokens_per_s'], '.0f')} | {_fmt(o['lightning_nocb_tokens_per_s'], '.0f')} | "
                f"{_fmt(o['lightning_tokens_per_s'], '.0f')} | {_fmt(o['lightning_vs_bare'], '.3f')} | "
                f"{_fmt(o['lightning_nocb_vs_bare'], '.3f')} | {_fmt(o['callbacks_step_time_delta'], '+.1f', 100)} % | "
                f"{_fmt(o['callback_hook_frac_of_step'], '.2f', 100)} % |"
            )
    if report["targets"]:
        lines += ["", "## Targets (issue 9)", "", "| target | measured | threshold | met |", "|---|---|---|---|"]
        for t in report["targets"]:
            met = "–" if t["met"] is None else ("yes" if t["met"] else "**no**")
            lines.append(f"| {t['target']} | {_fmt(t['value'], '.3f')} | {t['direction']} {t['threshold']} | {met} |")
    return "\n".join(lines) + "\n"


def _loadavg(x: list[float] | None) -> str:
    return "–" if not x else " ".join(f"{v:.2f}" for v in x)


def plot_scaling(report: dict[str, Any], path: Path) -> Path:
    """Step time and peak memory against analytic training FLOPs per step, one marker series per
    family/routing (main path rows), log-log: a slope-1 line is cost growing in proportion to work."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if r["mode"] == "lightning" and r["step_time_s"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        series.setdefault(r["family"] + ("" if r["routing"] is None else f"-{r['routing']}"), []).append(r)
    for name, rs in sorted(series.items()):
        x = [r["flops_per_token"] * r["tokens_per_step"] / 1e9 for r in rs]
        axes[0].scatter(x, [r["step_time_s"] for r in rs], label=name)
        mem = [(xi, r["peak_mem_mib"]) for xi, r in zip(x, rs) if r["peak_mem_mib"] is not None]
        if mem:
            axes[1].scatter(*zip(*mem), label=name)
    for ax, ylabel in zip(axes, ("step time (s)", "peak memory (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("analytic model GFLOP per training step")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"sectional_moe.bench, {report['meta']['date']}, {report['meta']['machine']['cpu_model']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "bench.json", out / "bench.md"
    js.write_text(json.dumps(report, indent=1) + "\n")
    md.write_text(to_markdown(report))
    return js, md
