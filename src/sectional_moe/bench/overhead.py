"""``python -m sectional_moe.bench.overhead``: what the metrics callbacks cost a training step, with
callbacks on and off interleaved inside one ``trainer.fit``.

The main benchmark pairs two separate fits (callbacks on, callbacks off) per round; their difference
carries every fit's own start-up and heap state, and at 60 rounds its 95 % interval was still
±2.6-3.0 %. Here one fit per case trains ``warmup + 2 * pairs * block`` steps with the metrics
callbacks (SpeedMonitor, MemoryMonitor, ExpertLoadMonitor, WandbSummary) attached, and a gate
lets their per-step hooks run in *on* blocks and skips them in *off* blocks of ``block`` steps,
in the order on, off, off, on, on, off, ... (ABBA: a linear drift cancels within every two
pairs). ``log_every_n_steps = block`` and the warm-up is one block, so every block holds exactly
one logging step at the same place, where the callbacks do most of their work. Per pair of
adjacent blocks: mean step time with callbacks / without - 1 (the mean, not the median: the
logging step must count); over pairs: the mean and its Student-t 95 % interval. Fits are added
(``pairs`` pairs each, a fresh model each) until every case's half-width is below ``--ci`` or the
budget is spent. The callbacks' hook time is also summed directly (what the gate removes).

Writes ``overhead.json`` and ``overhead.md`` (``--out``). Imports: torch, lightning,
:mod:`sectional_moe.bench` (cases, report, runners), :mod:`sectional_moe.device`,
:mod:`sectional_moe.files`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable, Sequence

import lightning.pytorch as pl
import torch

from sectional_moe.bench.cases import DEFAULT_BATCH, Case, build_cases, parse_combos
from sectional_moe.bench.report import check_positive, paired_delta, print_and_write, run_conditions, run_meta, run_start
from sectional_moe.bench.runners import StepTimer, build_module, lightning_trainer, make_loader, metric_callbacks, quiet_lightning, timed_hooks
from sectional_moe.device import reuse_host_memory
from sectional_moe.files import REPO_ROOT

DEFAULT_CASES = ("dense", "sectional-segment_fixed-E8", "moe-topk-E8")  # the main benchmark's overhead cases
TARGET = 0.02  # issue 17: callbacks on vs off <= 2 %, with noise below 2 %


def block_is_on(block: int) -> bool:
    """ABBA order of blocks: on, off, off, on, on, off, off, on, ..."""
    return block % 4 in (0, 3)


class Gate(pl.Callback):
    """Opens or closes the metrics callbacks' per-step hooks for a whole step; first in the list."""

    def __init__(self, warmup: int, block: int):
        self.warmup, self.block = warmup, block
        self.open = True
        self.states: list[bool] = []  # per step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.open = batch_idx < self.warmup or block_is_on((batch_idx - self.warmup) // self.block)
        self.states.append(self.open)


def interleaved_fit(case: Case, batch: int, pairs: int, block: int, device: torch.device, precision: str,
                    seed: int = 0) -> dict[str, Any]:
    """One fit of one block of warm-up + ``pairs`` (on, off) block pairs; per pair, the step-time
    change with callbacks (mean of each block's steps) and the hook time of the on block."""
    warmup = block
    total = warmup + 2 * pairs * block
    module = build_module(case.spec, device, False, seed=seed)
    gate, sink = Gate(warmup, block), [0.0]
    callbacks = metric_callbacks()
    for cb in callbacks:
        timed_hooks(cb, sink, gate=lambda: gate.open)
    timer = StepTimer(device, None, sink)
    trainer = lightning_trainer(device, precision, total, [gate, *callbacks, timer], log_every=block)
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=make_loader(case.spec, batch, total, device))
    wall = time.perf_counter() - t0
    # step i (i >= 1) runs from end i-1 to end i; step 0 (no start stamp) is in the warm-up
    times = [b - a for a, b in zip(timer.ends[:-1], timer.ends[1:])][warmup - 1:]
    states, hooks = gate.states[warmup:], timer.hooks[warmup:]
    blocks = [(times[i:i + block], states[i], hooks[i:i + block]) for i in range(0, len(times), block)]
    assert all(len(set(states[i:i + block])) == 1 for i in range(0, len(states), block)), "the gate switched inside a block"
    on_means, off_means, on_hooks = [], [], []
    for first, second in zip(blocks[0::2], blocks[1::2]):
        on, off = (first, second) if first[1] else (second, first)
        on_means.append(statistics.fmean(on[0]))
        off_means.append(statistics.fmean(off[0]))
        on_hooks.append(statistics.fmean(on[2]))
    return {"on_block_means_s": on_means, "off_block_means_s": off_means, "on_hook_s_per_step": on_hooks, "wall_s": wall}


def run(cases: Sequence[Case], batch: int, pairs: int, block: int, ci: float, max_s: float, device: torch.device,
        precision: str, log: Callable[[str], None] = print) -> tuple[list[dict[str, Any]], str]:
    """Fits of every case (round-robin, a new seed per fit) until every 95 % half-width is below ``ci``
    (at least two fits) or ``max_s`` seconds have passed. Returns the rows and why it stopped."""
    pooled: dict[str, dict[str, list[float]]] = {c.label: {"on": [], "off": [], "hook": [], "wall": []} for c in cases}
    started, fit = time.perf_counter(), 0
    while True:
        widths = {}
        for c in cases:
            stats = paired_delta(pooled[c.label]["on"], pooled[c.label]["off"])
            widths[c.label] = stats[2] if stats else float("inf")
        if fit >= 2 and max(widths.values()) < ci:
            why = f"{fit} fits: every 95 % half-width below {ci:.1%}"
            break
        if fit >= 1 and time.perf_counter() - started > max_s:
            why = f"{fit} fits, {time.perf_counter() - started:.0f} s: budget spent, widest 95 % half-width {max(widths.values()):.2%} (target {ci:.1%})"
            break
        for c in cases:
            res = interleaved_fit(c, batch, pairs, block, device, precision, seed=fit)
            pooled[c.label]["on"] += res["on_block_means_s"]
            pooled[c.label]["off"] += res["off_block_means_s"]
            pooled[c.label]["hook"] += res["on_hook_s_per_step"]
            pooled[c.label]["wall"].append(res["wall_s"])
        fit += 1
        log(f"fit {fit}: " + ", ".join(f"{label} ±{w:.2%}" if w != float("inf") else f"{label} –" for label, w in widths.items())
            + " before it")
    rows = []
    for c in cases:
        p = pooled[c.label]
        deltas, mean, half = paired_delta(p["on"], p["off"])  # type: ignore[misc]
        off_step = statistics.fmean(p["off"])
        rows.append({"case": c.name, "label": c.label, "pairs": len(deltas), "block_steps": block, "batch": batch,
                     "seq_len": c.spec.seq_len, "off_step_s": off_step, "on_step_s": statistics.fmean(p["on"]),
                     "callbacks_delta": mean, "callbacks_delta_ci95": [mean - half, mean + half], "ci95_halfwidth": half,
                     "hook_s_per_step": statistics.fmean(p["hook"]), "hook_frac_of_step": statistics.fmean(p["hook"]) / off_step,
                     "deltas": deltas, "fit_wall_s": p["wall"],
                     # the target: the measured cost <= 2 % and the noise (half-width) below 2 %
                     "met": mean <= TARGET and half < TARGET,
                     # stricter: the whole interval at or below 2 % (a cost above 2 % is excluded)
                     "excludes_above_target": mean + half <= TARGET})
    return rows, why


def to_markdown(report: dict[str, Any]) -> str:
    m = report["meta"]
    command, load = run_conditions(m)
    lines = [
        "# Metrics callbacks on vs off, interleaved in one fit", "",
        (f"{command}, {m['threads']} torch thread(s), "
         f"{m['precision']} eager, Lightning with SpeedMonitor, MemoryMonitor, ExpertLoadMonitor and WandbSummary gated "
         f"per block of {m['block']} steps (ABBA), log_every_n_steps = {m['block']}; malloc_reuse {m['malloc_reuse']}; "
         f"{load}; stopped: {m['stop']}."), "",
        "| config | batch x seq | block pairs | step ms (off) | callbacks on vs off | 95 % CI | hook time / step | "
        "target: on vs off <= 2 %, half-width < 2 % | interval excludes > 2 % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lo, hi = r["callbacks_delta_ci95"]
        lines.append(f"| {r['case']} | {r['batch']} x {r['seq_len']} | {r['pairs']} | {1e3 * r['off_step_s']:.1f} | "
                     f"{100 * r['callbacks_delta']:+.2f} % | [{100 * lo:+.2f}, {100 * hi:+.2f}] % | "
                     f"{100 * r['hook_frac_of_step']:.2f} % | {'met' if r['met'] else '**not met**'} | "
                     f"{'yes' if r['excludes_above_target'] else 'no'} |")
    lines += ["", "*met*: the measured change is at most 2 % and its 95 % half-width below 2 % (issue 17's target); "
              "*interval excludes > 2 %*: the interval's upper end is at most 2 % as well."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sectional_moe.bench.overhead", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="small", help="conf/size preset")
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CASES), help="case labels (as the main benchmark's --overhead)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: the main benchmark's for the preset)")
    p.add_argument("--pairs", type=int, default=10, help="(on, off) block pairs per fit")
    p.add_argument("--block", type=int, default=8, help="steps per block (and log_every_n_steps)")
    p.add_argument("--ci", type=float, default=0.01, help="stop once every 95 %% half-width is below this")
    p.add_argument("--max-s", type=float, default=1800.0, help="time budget in seconds")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--out", default=str(REPO_ROOT / "docs" / "bench"), help="output directory ('' = write nothing)")
    p.add_argument("--quick", action="store_true", help="smoke run: nano preset, dense and E = 4, 2 pairs of 2-step blocks")
    a = p.parse_args(argv)
    if not 0 < a.ci < 1:
        p.error(f"--ci {a.ci}: give the 95 % half-width as a fraction in (0, 1), e.g. 0.01")
    check_positive(p, a, "pairs", "block", "threads", "batch_size")
    preset, labels, pairs, block, vocab = a.preset, a.configs, a.pairs, a.block, a.vocab_size
    if a.quick:
        preset, labels, pairs, block, vocab = "nano", ["dense", "moe-topk-E4"], 2, 2, 512
    combos = parse_combos(sorted({label.rsplit("-E", 1)[0] for label in labels}))
    experts = sorted({int(label.rsplit("-E", 1)[1]) for label in labels if "-E" in label}) or [4]
    cases = [c for c in build_cases([preset], experts, combos, vocab) if c.label in labels]
    missing = set(labels) - {c.label for c in cases}
    if missing:
        p.error(f"unknown or impossible configuration(s) {sorted(missing)} at preset {preset}")
    batch = a.batch_size or DEFAULT_BATCH.get(preset, 4)

    quiet_lightning()
    device = torch.device("cpu")
    host = reuse_host_memory("auto", device.type)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    start = run_start()
    rows, why = run(cases, batch, pairs, block, a.ci, a.max_s, device, "32-true")
    report = {"meta": run_meta(start, "sectional_moe.bench.overhead", argv, threads=torch.get_num_threads(), precision="fp32",
                               block=block, pairs_per_fit=pairs, ci_target=a.ci, stop=why,
                               malloc_reuse="on" if host.applied else "off"),
              "results": rows}
    print_and_write(report, to_markdown(report), a.out, "overhead")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
