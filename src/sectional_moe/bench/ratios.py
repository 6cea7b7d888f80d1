"""``python -m sectional_moe.bench.ratios``: issue 17's two speed ratios, both models interleaved in fresh processes.

* **our dense model vs the GPT-2-style reference** (:mod:`~sectional_moe.bench.reference`, equal
  FLOPs per token) at the reference shape, bare loops, fp32 and bf16-mixed: tokens/s ratio, target
  >= 1.0;
* **token MoE top-k vs dense** at the benchmark's default shape (small preset, batch 4 x 256,
  vocabulary 8192), bare loops, fp32 eager: model-FLOP-rate ratio (``flops_per_token`` x
  tokens/s), target >= 0.85 at E = 16 (E = 8 alongside); and E = 16 again with both models compiled
  (Inductor), as ``compile=auto`` trains a run long enough to repay the compile time.

Each comparison runs in ``--rounds`` fresh processes (:func:`~sectional_moe.bench.fresh.run_in_fresh_process`),
each training *both* models: a few warm-up steps each, then blocks of steps in ABBA order, each
model training on where its last block stopped; which side starts alternates between processes.
Sharing a process makes the two sides share its state (heap, thread placement, clock), which moves
step times by up to ±10 % from one process to the next; in separate processes that variation went
straight into the ratio. A process's ratio comes from each side's median step; the report gives
the geometric mean over processes with its 95 % interval and a verdict against the target: *met*
when the whole interval clears it, *not met* when the whole interval falls short, otherwise *not
distinguishable* from the target.

The optimiser is the jobs' own (``conf/optim/adamw.yaml``, with the 50-step warm-up that
``warmup_steps=auto`` gives any run of 500 steps or more), so the timed steps see the router of a
job's first steps: near-balanced expert load. At lr = 3e-3 from the first step (the main
benchmark's optimiser until it got the same warm-up) top-k routing on random tokens collapses onto
a few experts within a few steps (10-13 of 16 experts empty by step 11); a job never trains there.
The report gives the expert load the timed steps saw (max / mean assignments per expert, empty
experts).

Writes ``ratios.json`` and ``ratios.md`` (``--out``). Imports: torch and lightning (in the
children), omegaconf, :mod:`sectional_moe.bench` (cases, fresh, report, runners),
:mod:`sectional_moe.device`, :mod:`sectional_moe.files`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from omegaconf import OmegaConf

from sectional_moe.bench import fresh
from sectional_moe.bench.cases import Case, make_spec, reference_case
from sectional_moe.bench.report import check_positive, print_and_write, ratio_interval, run_conditions, run_meta, run_start
from sectional_moe.files import CONF_DIR, REPO_ROOT

JOB_WARMUP_STEPS = 50  # what warmup_steps=auto resolves to for any run of >= 500 steps
ROUTED_SHAPE = {"preset": "small", "batch": 4, "vocab": 8192}  # the main benchmark's default shape


@dataclass(frozen=True)
class SideSpec:
    """One side: our model (a family/routing/E at a shape) or the GPT-2-style reference, in a precision."""

    shape: str  # "reference" (issue 17's reference shape) | "routed" (:data:`ROUTED_SHAPE`)
    family: str = "dense"
    routing: str | None = None
    experts: int | None = None
    reference: bool = False  # train the GPT-2-style model instead of ours
    precision: str = "32-true"
    compile: bool = False  # Inductor, as compile=auto turns it on for a run long enough to repay it
    batch: int | None = None  # sequences per step of a routed side (None: :data:`ROUTED_SHAPE`'s)

    @property
    def label(self) -> str:
        model = "GPT-2-style reference" if self.reference else (
            "dense" if self.family == "dense" else f"{self.family}-{self.routing}-E{self.experts}")
        return f"{model} ({'bf16-mixed' if self.precision.startswith('bf16') else 'fp32'}{' + compile' if self.compile else ''})"


@dataclass(frozen=True)
class Comparison:
    """a / b of ``metric`` (``tokens_per_s`` or ``model_flops_per_s``), held against ``target``."""

    name: str
    a: SideSpec
    b: SideSpec
    metric: str
    target: float


def comparisons(quick: bool = False, routed_batch: int | None = None, only: str | None = None) -> list[Comparison]:
    """The issue-17 ratios (``quick``: one tiny comparison, a smoke test of the same path);
    ``routed_batch`` trains the token-MoE comparisons at that many sequences per step; ``only``
    keeps the comparisons whose name contains it."""
    if quick:
        out = [Comparison("our dense vs GPT-2-style reference, fp32 (quick shape)", SideSpec("reference"),
                          SideSpec("reference", reference=True), "tokens_per_s", 1.0)]
    else:
        out = []
        for precision, name in (("32-true", "fp32"), ("bf16-mixed", "bf16-mixed")):
            out.append(Comparison(f"our dense vs GPT-2-style reference, {name}", SideSpec("reference", precision=precision),
                                  SideSpec("reference", reference=True, precision=precision), "tokens_per_s", 1.0))
        at = f", batch {routed_batch}" if routed_batch else ""
        for experts in (16, 8):
            out.append(Comparison(f"token MoE top-k E = {experts} vs dense, fp32{at}",
                                  SideSpec("routed", "moe", "topk", experts, batch=routed_batch),
                                  SideSpec("routed", batch=routed_batch), "model_flops_per_s", 0.85))
        # what a long job runs: compile=auto compiles both once the run repays the compile time
        out.append(Comparison(f"token MoE top-k E = 16 vs dense, fp32 + compile{at}",
                              SideSpec("routed", "moe", "topk", 16, compile=True, batch=routed_batch),
                              SideSpec("routed", compile=True, batch=routed_batch), "model_flops_per_s", 0.85))
    kept = [c for c in out if only is None or only in c.name]
    if not kept:
        raise SystemExit(f"error: --only {only!r} matches none of {[c.name for c in out]}")
    return kept


def case_of(side: SideSpec, quick: bool) -> Case:
    """The model configuration a side trains."""
    if side.shape == "reference":
        return reference_case(quick)
    s = {"preset": "nano", "batch": 2, "vocab": 512} if quick else ROUTED_SHAPE
    spec = make_spec(s["preset"], side.family, side.routing, side.experts, s["vocab"])
    return Case(s["preset"], side.family, side.routing, side.experts, spec, batch=side.batch or s["batch"], tag="routed")


def job_optim() -> dict[str, Any]:
    """``conf/optim/adamw.yaml`` with ``warmup_steps=auto`` resolved as for a run of >= 500 steps."""
    cfg = dict(OmegaConf.to_container(OmegaConf.load(CONF_DIR / "optim" / "adamw.yaml"), resolve=True))  # type: ignore[arg-type]
    if cfg.get("warmup_steps") == "auto":
        cfg["warmup_steps"] = JOB_WARMUP_STEPS
    return cfg


def block_is_a(block: int, a_first: bool) -> bool:
    """ABBA order of the blocks of a process: a, b, b, a, a, b, ... (or b first)."""
    return (block % 4 in (0, 3)) == a_first


def train_pair(a: SideSpec, b: SideSpec, quick: bool, warmup: int, pairs: int, block: int, threads: int | None,
               a_first: bool = True) -> dict[str, Any]:
    """Both sides of a comparison in one fresh process, set up as ``train.py`` sets a job up
    (malloc_reuse auto, flush denormals): ``warmup`` untimed steps each, then ``2 * pairs`` blocks of
    ``block`` steps in ABBA order, each side training its own model on. Returns each side's timed
    step times, the analytic FLOPs and tokens of its step, and the expert load its timed steps saw."""
    from sectional_moe.device import reuse_host_memory

    reuse_host_memory("auto", "cpu")
    import torch

    from sectional_moe.bench.runners import run_bare
    from sectional_moe.models.flops import flops_per_token
    from sectional_moe.models.routers import Router

    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    sides = {"a": a, "b": b}
    cases = {key: case_of(side, quick) for key, side in sides.items()}
    optim = job_optim()
    counts: dict[str, list[list[float]]] = {"a": [], "b": []}
    recording = {"on": False}
    states: dict[str, Any] = {}
    times: dict[str, list[float]] = {"a": [], "b": []}
    errors: dict[str, str | None] = {}

    def hook_routers(key: str) -> Callable[[torch.nn.Module], None]:
        def hook(model: torch.nn.Module) -> None:
            for module in model.modules():
                if isinstance(module, Router):
                    module.register_forward_hook(
                        lambda m, inp, out: counts[key].append(out.counts.tolist()) if recording["on"] and out.counts is not None else None)
        return hook

    def train(key: str, steps: int) -> list[float]:
        side, case = sides[key], cases[key]
        res = run_bare(case, case.batch or 8, 0, steps, torch.device("cpu"), side.precision, side.compile, False,
                       reference=side.reference, state=states.get(key), optim=optim,
                       observe=None if side.compile else hook_routers(key),  # a hook's .tolist() would break the graph
                       keep_state=True)
        if key not in states:
            errors[key] = res.compile_error
        states[key] = res.state
        return res.step_times

    for key in ("a", "b") if a_first else ("b", "a"):
        train(key, warmup)
    recording["on"] = True
    for blk in range(2 * pairs):
        key = "a" if block_is_a(blk, a_first) else "b"
        times[key] += train(key, block)
    out: dict[str, Any] = {"threads": torch.get_num_threads()}
    for key, case in cases.items():
        tokens = (case.batch or 8) * case.spec.seq_len
        load = None
        if counts[key]:
            load = {"max_over_mean": statistics.fmean(max(c) / (sum(c) / len(c)) for c in counts[key]),
                    "empty_experts": statistics.fmean(sum(1 for x in c if x == 0) for c in counts[key])}
        out[key] = {"step_times": times[key], "flops_per_step": flops_per_token(case.spec) * tokens,
                    "tokens_per_step": tokens, "load": load, "compile_error": errors.get(key)}
    return out


def rate(result: dict[str, Any], metric: str) -> float:
    """A side's tokens/s or model FLOP/s from its median step time."""
    per_step = result["tokens_per_step"] if metric == "tokens_per_s" else result["flops_per_step"]
    return per_step / statistics.median(result["step_times"])


def verdict(low: float, high: float, target: float) -> str:
    """*met* if the whole 95 % interval clears ``target``, *not met* if it falls short, else undecided."""
    if low >= target:
        return "met"
    if high < target:
        return "not met"
    return "not distinguishable from the target"


def run(rounds: int, warmup: int, pairs: int, block: int, threads: int | None, quick: bool = False,
        log: Any = print, routed_batch: int | None = None, only: str | None = None,
        argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Every comparison, ``rounds`` fresh processes each (which side starts alternates); the JSON-ready
    report (``argv``: the command-line arguments it records, None for the process's own)."""
    comps = comparisons(quick, routed_batch, only)
    start = run_start()
    results: list[list[dict[str, Any]]] = [[] for _ in comps]
    for rnd in range(rounds):
        t0 = time.perf_counter()
        for i, comp in enumerate(comps):
            results[i].append(fresh.run_in_fresh_process(train_pair, (comp.a, comp.b, quick, warmup, pairs, block, threads, rnd % 2 == 0)))
        log(f"round {rnd + 1}/{rounds}: {time.perf_counter() - t0:.1f}s")
    rows = []
    for comp, res in zip(comps, results):
        ratios = [rate(r["a"], comp.metric) / rate(r["b"], comp.metric) for r in res]
        case = case_of(comp.a, quick)
        loads = [r["a"]["load"] for r in res if r["a"]["load"]]
        row: dict[str, Any] = {
            "comparison": comp.name, "a": comp.a.label, "b": comp.b.label, "metric": comp.metric, "target": comp.target,
            "shape": f"{case.preset} {case.batch} x {case.spec.seq_len}", "round_ratios": ratios,
            "a_median_step_s": statistics.median(statistics.median(r["a"]["step_times"]) for r in res),
            "b_median_step_s": statistics.median(statistics.median(r["b"]["step_times"]) for r in res),
            "a_load": {k: statistics.fmean(x[k] for x in loads) for k in loads[0]} if loads else None,
            "threads": res[0]["threads"],
            "compile_errors": sorted({r[k]["compile_error"] for r in res for k in ("a", "b") if r[k].get("compile_error")}),
        }
        interval = ratio_interval(ratios)
        if interval is not None:
            mean, low, high = interval
            row.update(ratio=mean, ratio_ci95=[low, high], verdict=verdict(low, high, comp.target))
        else:
            row.update(ratio=ratios[0], ratio_ci95=None, verdict="n/a (1 round)")
        rows.append(row)
    optim = {k: v for k, v in job_optim().items() if k in ("lr", "schedule", "warmup_steps")}
    return {"meta": run_meta(start, "sectional_moe.bench.ratios", argv, rounds=rounds, warmup=warmup, pairs=pairs,
                             block=block, optim=optim),
            "results": rows}


def to_markdown(report: dict[str, Any]) -> str:
    m = report["meta"]
    threads = sorted({r["threads"] for r in report["results"]})
    command, load = run_conditions(m)
    lines = [
        "# Speed ratios, both models interleaved in each fresh process", "",
        (f"{command}, {'/'.join(map(str, threads))} torch "
         f"thread(s), bare training loops (eager unless marked + compile); per comparison {m['rounds']} fresh processes, each training both "
         f"models: {m['warmup']} warm-up steps each, then {2 * m['pairs']} blocks of {m['block']} steps in ABBA order "
         f"(which side starts alternates between processes); a process's ratio from each side's median step; optimiser as the jobs' "
         f"(lr {m['optim']['lr']}, {m['optim']['schedule']}, {m['optim']['warmup_steps']} warm-up steps); "
         f"{load}."), "",
        "| comparison | shape | a ms/step | b ms/step | ratio a/b (geometric mean) | 95 % CI | target | verdict | expert load of a (max/mean, empty) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        ci = r["ratio_ci95"]
        load = r["a_load"]
        load_s = f"{load['max_over_mean']:.2f}, {load['empty_experts']:.1f}" if load else "–"
        failed = f" (compile failed, ran eager: {'; '.join(r['compile_errors'])})" if r.get("compile_errors") else ""
        lines.append(f"| {r['comparison']}{failed} ({r['metric']}) | {r['shape']} | {1e3 * r['a_median_step_s']:.1f} | "
                     f"{1e3 * r['b_median_step_s']:.1f} | {r['ratio']:.3f} | "
                     f"{f'[{ci[0]:.3f}, {ci[1]:.3f}]' if ci else 'n/a'} | >= {r['target']} | {r['verdict']} | {load_s} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sectional_moe.bench.ratios", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rounds", type=int, default=8, help="fresh processes per comparison")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side and process")
    p.add_argument("--pairs", type=int, default=6, help="ABBA block pairs per process")
    p.add_argument("--block", type=int, default=3, help="steps per block")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads per side (default: torch's, as a job)")
    p.add_argument("--out", default=str(REPO_ROOT / "docs" / "bench"), help="output directory ('' = write nothing)")
    p.add_argument("--quick", action="store_true", help="smoke run: one comparison at the quick reference shape")
    p.add_argument("--routed-batch", type=int, default=None,
                   help=f"sequences per step of the token-MoE comparisons (default {ROUTED_SHAPE['batch']}, the main benchmark's)")
    p.add_argument("--only", default=None, help="run only the comparisons whose name contains this, e.g. 'E = 16'")
    a = p.parse_args(argv)
    check_positive(p, a, "rounds", "pairs", "block", "threads", "routed_batch")
    if a.warmup < 0:
        p.error("--warmup must be >= 0")
    report = run(a.rounds, a.warmup, a.pairs, a.block, a.threads, quick=a.quick, routed_batch=a.routed_batch, only=a.only,
                 argv=argv)
    print_and_write(report, to_markdown(report), a.out, "ratios")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
