"""Training-speed benchmark: every family side by side, as ratios measured in one run.

``python -m sectional_moe.bench`` (``--help`` for every flag; ``--quick`` for a smoke run) trains
each configuration on synthetic tokens and reports, per configuration:

* training tokens/s and step time (median of the timed steps; warm-up steps excluded);
* achieved *model* FLOP/s: ``flops_per_token(spec)`` (analytic, PaLM convention) x tokens/s;
* the fraction of the machine's matmul peak *at the model's own GEMM shapes*, measured here: the
  forward, input-gradient and weight-gradient GEMMs of every projection of the model (batched over
  experts/sections where the model batches them), timed alone; their FLOPs / their best time is the
  rate this machine reaches on exactly that work (attention scores, norms and the optimiser are
  what the model adds on top). The generic 512^3 probe of :mod:`sectional_moe.hardware` is
  reported too;
* peak memory of a training step: parameters + optimiser state + the step's transient peak
  (CPU: resident-set high-water mark, reset through ``/proc/self/clear_refs`` after
  ``malloc_trim``; CUDA: ``max_memory_allocated``), measured on an extra untimed step;
* every ratio to ``dense`` at the same preset (tokens/s and model FLOP/s).

The framework's own cost is measured on a few *overhead cases* (dense, sectional and token-MoE):
the same model, batch and optimiser trained by a bare PyTorch loop, by Lightning without callbacks
and by Lightning with the metrics callbacks (SpeedMonitor, MemoryMonitor, ExpertLoadMonitor,
WandbSummary); the time spent inside those callbacks' hooks is also summed directly, which is far
less noisy than the difference of two step times.

The machine may be shared, so the configurations run *round-robin*: every round runs a few steps
of each (in a rotated order), and the statistics pool the timed steps of all rounds; a burst of
foreign load then hits every configuration alike instead of one. Each round builds the model
afresh from the same seed (memory stays bounded to one model) and re-warms.

Outputs ``bench.json`` and ``bench.md`` (default ``docs/bench/``) and prints the Markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as _dt
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from omegaconf import OmegaConf

from sectional_moe.flops import flops_per_token
from sectional_moe.hardware import cpu_model, measure_matmul_flops
from sectional_moe.optim import build_optimizer, lr_multiplier
from sectional_moe.spec import ModelSpec, spec_from_config

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
SCHEMA_VERSION = 1
MIB = 1024**2

# family-routing combinations benchmarked (dense has no experts)
FAMILY_ROUTINGS: tuple[tuple[str, str | None], ...] = (
    ("dense", None), ("moe", "topk"), ("moe", "hash"),
    ("sectional", "segment_fixed"), ("sectional", "topk"), ("sectional", "hash"),
)
MODES = ("lightning", "lightning_nocb", "bare")
MODE_LABELS = {"lightning": "Lightning + metrics callbacks", "lightning_nocb": "Lightning, no callbacks", "bare": "bare PyTorch loop"}
# per-preset batch size (sequences per step) unless --batch-size is given
DEFAULT_BATCH = {"nano": 2, "tiny": 8, "small": 4, "base": 8, "medium": 8, "large": 4}
OPTIM = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused="auto", schedule="constant",
             warmup_steps=0, min_lr_ratio=0.1, decay_frac=0.2)
GRAD_CLIP = 1.0  # conf/trainer/default.yaml: the bare loop clips exactly as Lightning does


# ----------------------------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One model configuration: a size preset, a family/routing and E."""

    preset: str
    family: str
    routing: str | None
    experts: int | None
    spec: ModelSpec = field(compare=False, hash=False)
    size_overrides: tuple[tuple[str, int], ...] = ()  # scaling sweeps: (("seq_len", 512), ...)

    @property
    def group(self) -> str:
        """Preset plus any swept size keys: the unit inside which ratios to dense are taken."""
        if not self.size_overrides:
            return self.preset
        return self.preset + "@" + ",".join(f"{k}={v}" for k, v in self.size_overrides)

    @property
    def name(self) -> str:
        if self.family == "dense":
            return f"{self.group}/dense"
        return f"{self.group}/{self.family}-{self.routing}-E{self.experts}"

    @property
    def label(self) -> str:
        """Short label without the preset (table rows)."""
        return self.name.split("/", 1)[1]


def load_size(preset: str) -> dict[str, Any]:
    """The ``conf/size/<preset>.yaml`` preset as a plain dict (the one ``train.py`` uses)."""
    path = CONF / "size" / f"{preset}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONF / "size").glob("*.yaml"))
        raise SystemExit(f"error: unknown size preset {preset!r}; use one of {known}")
    return dict(OmegaConf.to_container(OmegaConf.load(path), resolve=True))  # type: ignore[arg-type]


def make_spec(preset: str, family: str, routing: str | None, experts: int | None, vocab_size: int,
              size_overrides: dict[str, int] | None = None) -> ModelSpec:
    """Spec of a configuration, composed exactly as ``train.py`` composes it (size + model + routing).

    ``size_overrides`` replace preset keys (sweeps); a new ``d_model`` scales ``d_ff`` with it, so the
    FFN keeps the preset's width ratio.
    """
    model = dict(OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{family}.yaml"), resolve=True))  # type: ignore[arg-type]
    model.pop("defaults", None)
    routing_cfg: dict[str, Any] = {"name": None}
    if routing is not None:
        routing_cfg = dict(OmegaConf.to_container(OmegaConf.load(CONF / "routing" / f"{routing}.yaml"), resolve=True))  # type: ignore[arg-type]
    size = load_size(preset)
    for key, value in (size_overrides or {}).items():
        if key == "d_model":
            size["d_ff"] = int(round(size["d_ff"] * value / size["d_model"]))
        size[key] = value
    cfg = {"size": size, "model": model, "routing": routing_cfg, "experts": experts,
           "data": {"vocab_size": vocab_size}}
    return spec_from_config(cfg, vocab_size=vocab_size)


def build_cases(presets: Sequence[str], experts: Sequence[int], combos: Sequence[tuple[str, str | None]],
                vocab_size: int, seq_lens: Sequence[int] = (), d_models: Sequence[int] = ()) -> list[Case]:
    """Every (preset, seq_len, d_model, family/routing, E) combination (``seq_lens``/``d_models``
    empty: the preset's own); configurations a size cannot hold are skipped with a message."""
    cases = []
    for preset in presets:
        for seq_len in (seq_lens or [None]):
            for d_model in (d_models or [None]):
                over = tuple((k, v) for k, v in (("seq_len", seq_len), ("d_model", d_model)) if v is not None)
                for family, routing in combos:
                    for e in ([None] if family == "dense" else experts):
                        try:
                            spec = make_spec(preset, family, routing, e, vocab_size, dict(over))
                        except Exception as err:  # noqa: BLE001 - e.g. E not dividing the preset's heads
                            print(f"skip {preset}{dict(over) or ''}/{family}-{routing}-E{e}: {err}", file=sys.stderr)
                            continue
                        cases.append(Case(preset, family, routing, e, spec, over))
    return cases


# ----------------------------------------------------------------------------------------------
# the model's GEMM shapes and the machine's rate on them
# ----------------------------------------------------------------------------------------------
def gemm_shapes(spec: ModelSpec, batch: int) -> list[tuple[int, int, int, int]]:
    """Forward projections of one training step as (G, M, K, N): G independent (M, K) @ (K, N).

    G > 1 for experts/sections (run batched). Routed experts assume balanced routing (every expert
    gets its share of the rows). Attention scores (inside SDPA) are not projections: not listed.
    """
    D, T, V = spec.d_model, spec.seq_len, spec.vocab_size
    N = batch * T
    kv = spec.n_kv_heads * spec.head_dim
    shapes: list[tuple[int, int, int, int]] = []

    def dense_layer(rows: int, ffn: bool = True) -> None:
        shapes.extend([(1, rows, D, D), (1, rows, D, 2 * kv), (1, rows, D, D)])
        if ffn:
            shapes.extend([(1, rows, D, 2 * spec.d_ff), (1, rows, spec.d_ff, D)])

    for layer in range(spec.n_layers):
        if spec.family == "dense" or (spec.family == "sectional" and not spec.is_sectional_layer(layer)):
            dense_layer(N)
            continue
        E, Fh = spec.n_experts, spec.resolved_expert_d_ff
        if spec.family == "moe":
            dense_layer(N, ffn=False)
            k = spec.top_k if spec.routing == "topk" else 1
            per_expert = max(1, N * k // E)
            shapes.extend([(E, per_expert, D, 2 * Fh), (E, per_expert, Fh, D)])
            if spec.routing == "topk":
                shapes.append((1, N, D, E))
            if spec.shared_expert:
                shapes.extend([(1, N, D, 2 * Fh), (1, N, Fh, D)])
            continue
        r, S = spec.seq_reduction, spec.section_dim
        Ns = N // r
        if r > 1 and spec.seq_pool == "linear":
            shapes.append((1, Ns, r * D, D))
        if spec.pre_expert:
            dense_layer(Ns)
        if spec.expert_attention:
            hc, khc = spec.section_heads * spec.section_head_dim, spec.section_kv_heads * spec.section_head_dim
            shapes.extend([(E, Ns, S, hc), (E, Ns, S, 2 * khc), (E, Ns, hc, S)])
        k = spec.top_k if spec.routing == "topk" else 1
        shapes.extend([(E, Ns * k, S, 2 * Fh), (E, Ns * k, Fh, S)])  # dedicated: k = 1, Ns rows each
        if spec.routing == "topk":
            shapes.append((1, E * Ns, S, E))
        if spec.merge_proj:
            shapes.append((1, Ns, D, D))
    shapes.append((1, N, D, V))  # LM head
    return shapes


def training_gemms(shapes: Sequence[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Each forward GEMM (G, M, K, N) plus its backward pair: input gradient (M, N) @ (N, K) and
    weight gradient (K, M) @ (M, N)."""
    out = []
    for g, m, k, n in shapes:
        out.extend([(g, m, k, n), (g, m, n, k), (g, k, m, n)])
    return out


class GemmProbe:
    """Times a model's training GEMMs alone; ``rate()`` is their FLOPs / their best total time."""

    def __init__(self, shapes: Sequence[tuple[int, int, int, int]], device: torch.device, dtype: torch.dtype):
        # distinct shapes with their multiplicity, so repeated layers are timed once and weighted
        self.counts: dict[tuple[int, int, int, int], int] = {}
        for s in shapes:
            self.counts[s] = self.counts.get(s, 0) + 1
        self.device, self.dtype = device, dtype
        self.flops = sum(2.0 * g * m * k * n * c for (g, m, k, n), c in self.counts.items())
        self.best: dict[tuple[int, int, int, int], float] = {}

    def run(self, reps: int = 2) -> None:
        """Time every distinct shape ``reps`` times (after one untimed call) and keep the best."""
        gen = torch.Generator().manual_seed(0)
        for shape in self.counts:
            g, m, k, n = shape
            a = torch.randn(g, m, k, generator=gen).to(self.device, self.dtype)
            b = torch.randn(g, k, n, generator=gen).to(self.device, self.dtype)
            mm: Callable[[], torch.Tensor] = (lambda: torch.mm(a[0], b[0])) if g == 1 else (lambda: torch.bmm(a, b))
            mm()
            for _ in range(reps):
                sync(self.device)
                t0 = time.perf_counter()
                mm()
                sync(self.device)
                dt = time.perf_counter() - t0
                self.best[shape] = min(self.best.get(shape, math.inf), dt)
            del a, b

    def rate(self) -> float | None:
        """FLOP/s of the whole GEMM mix at each shape's best time (None before ``run``)."""
        if len(self.best) < len(self.counts):
            return None
        return self.flops / sum(self.best[s] * c for s, c in self.counts.items())


# ----------------------------------------------------------------------------------------------
# devices, memory, machine facts
# ----------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class StepMemory:
    """Transient peak memory of one step: device high-water mark minus the level before it.

    CPU: freed heap pages are handed back (``malloc_trim``) and the kernel's RSS high-water mark is
    reset (``/proc/self/clear_refs`` = 5, Linux), so VmHWM - VmRSS covers exactly this step.
    Elsewhere on CPU nothing is measured (None). CUDA: the allocator's peak counters.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.base: int | None = None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        self.base = None
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
        except (OSError, AttributeError):
            return
        self.base = _proc_status_bytes("VmRSS")

    def stop(self) -> int | None:
        """Bytes above the starting level at the step's peak (None when it cannot be measured)."""
        if self.base is None:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return max(0, torch.cuda.max_memory_allocated(self.device) - self.base)
        hwm = _proc_status_bytes("VmHWM")
        return None if hwm is None else max(0, hwm - self.base)


def static_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Parameters plus optimiser state (gradients are transient: zero_grad sets them to None)."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    for state in optimizer.state.values():
        n += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    return n


def git_commit(repo: Path = REPO) -> str | None:
    """HEAD's commit read from ``.git`` files (no git process), or None outside a checkout."""
    git = repo / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(None, 1)[1]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        packed = git / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0]
    except OSError:
        pass
    return None


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_model": cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(), "hostname": platform.node(),
        "load_avg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_count"] = torch.cuda.device_count()
    return info


# ----------------------------------------------------------------------------------------------
# data and the two training paths
# ----------------------------------------------------------------------------------------------
class SyntheticBlocks(torch.utils.data.Dataset):
    """Random token blocks (T+1,) int64 from a fixed seed: the shape the real data module yields."""

    def __init__(self, n: int, seq_len: int, vocab_size: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.blocks = torch.randint(0, vocab_size, (n, seq_len + 1), generator=gen)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.blocks[i]


def make_loader(spec: ModelSpec, batch: int, steps: int, device: torch.device) -> torch.utils.data.DataLoader:
    """Synthetic (B, T+1) batches through a DataLoader, pinned on CUDA like the real data module."""
    ds = SyntheticBlocks(batch * steps, spec.seq_len, spec.vocab_size)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, drop_last=True,
                                       pin_memory=device.type == "cuda", num_workers=0)


def build_module(spec: ModelSpec, device: torch.device, compile_model: bool, seed: int = 0):
    """A fresh LMModule (same seed -> same weights in every mode and round)."""
    from sectional_moe.lit import LMModule

    torch.manual_seed(seed)
    return LMModule(spec.to_dict(), dict(OPTIM), max_steps=10**6, compile=compile_model)


def lm_loss(module, batch: torch.Tensor) -> torch.Tensor:
    """The training loss of ``LMModule.training_step`` without its logging: NLL + weighted router losses."""
    loss, aux = module._nll(batch)
    routed = [a for a in aux if "lb_loss" in a]
    if routed:
        lb = torch.stack([a["lb_loss"] for a in routed]).mean()
        z = torch.stack([a["z_loss"] for a in routed]).mean()
        loss = loss + module.lb_coef * lb + module.z_coef * z
    return loss


@dataclass
class RoundResult:
    """What one round of one (case, mode) measured."""

    step_times: list[float]
    step_mem: int | None = None  # transient bytes of the memory step
    static_mem: int | None = None
    hook_times: list[float] = field(default_factory=list)  # seconds inside metric callbacks, per timed step


def run_bare(case: Case, batch: int, warmup: int, steps: int, device: torch.device, precision: str,
             compile_model: bool, measure_memory: bool) -> RoundResult:
    """Plain PyTorch: forward, loss, backward, clip, AdamW step, schedule step, zero_grad."""
    module = build_module(case.spec, device, compile_model).to(device)
    model = module.model
    model.train()
    optimizer = build_optimizer(model, OPTIM, device.type)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(
        s, schedule=OPTIM["schedule"], warmup_steps=0, max_steps=10**6, min_lr_ratio=OPTIM["min_lr_ratio"]))
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision.startswith("bf16")
                else contextlib.nullcontext())
    total = warmup + steps + (1 if measure_memory else 0)
    loader = make_loader(case.spec, batch, total, device)
    ends: list[float] = []
    mem = StepMemory(device)
    step_mem = None
    start = time.perf_counter()
    for i, batch_ids in enumerate(loader):
        memory_step = measure_memory and i == total - 1
        if memory_step:
            mem.start()
        batch_ids = batch_ids.to(device, non_blocking=True)
        with autocast:
            loss = lm_loss(module, batch_ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if memory_step:
            step_mem = mem.stop()
        else:
            ends.append(time.perf_counter())
    times = [b - a for a, b in zip([start, *ends[:-1]], ends)][warmup:]
    return RoundResult(times, step_mem, static_bytes(model, optimizer))


def _timed_hooks(callback: Any, sink: list[float]) -> None:
    """Wrap a callback's per-step hooks so the time spent in them is added to ``sink[0]``.

    Lightning looks hooks up with ``getattr`` on the instance, so instance attributes win.
    """
    for name in ("on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
                 "on_before_optimizer_step", "on_before_zero_grad"):
        original = getattr(callback, name)

        def timed(*args, __original=original, **kwargs):
            t0 = time.perf_counter()
            try:
                return __original(*args, **kwargs)
            finally:
                sink[0] += time.perf_counter() - t0

        setattr(callback, name, timed)


def run_lightning(case: Case, batch: int, warmup: int, steps: int, device: torch.device, precision: str,
                  compile_model: bool, measure_memory: bool, callbacks_on: bool, log_every: int) -> RoundResult:
    """``trainer.fit`` of the same module, batch and optimiser (``configure_optimizers``), with or
    without the metrics callbacks; a last-in-list timer callback stamps every batch end."""
    import lightning.pytorch as pl

    from sectional_moe.callbacks import ExpertLoadMonitor, MemoryMonitor, SpeedMonitor, WandbSummary

    module = build_module(case.spec, device, compile_model)
    total = warmup + steps + (1 if measure_memory else 0)
    hook_sink = [0.0]
    metric_cbs: list[pl.Callback] = []
    if callbacks_on:
        metric_cbs = [SpeedMonitor(cache_dir=None), MemoryMonitor(), ExpertLoadMonitor(), WandbSummary()]
        for cb in metric_cbs:
            _timed_hooks(cb, hook_sink)

    class Timer(pl.Callback):
        """Batch-end timestamps (device synchronised) and the memory of the last step."""

        def __init__(self) -> None:
            self.ends: list[float] = []
            self.hooks: list[float] = []
            self.mem = StepMemory(device)
            self.step_mem: int | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if measure_memory and batch_idx == total - 1:
                self.mem.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            sync(device)
            if measure_memory and batch_idx == total - 1:
                self.step_mem = self.mem.stop()
                return
            self.ends.append(time.perf_counter())
            self.hooks.append(hook_sink[0])
            hook_sink[0] = 0.0

    timer = Timer()
    trainer = pl.Trainer(
        accelerator=device.type if device.type != "cuda" else "gpu", devices=1, precision=precision,  # type: ignore[arg-type]
        max_steps=total, max_epochs=-1, logger=False, callbacks=[*metric_cbs, timer],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=GRAD_CLIP,
        log_every_n_steps=log_every, check_val_every_n_epoch=None, val_check_interval=10**9,
        default_root_dir=tempfile.mkdtemp(prefix="smoe-bench-"),  # callback files (expert_load.json) stay out of the cwd
    )
    trainer.fit(module, train_dataloaders=make_loader(case.spec, batch, total, device))
    ends = timer.ends
    times = [b - a for a, b in zip(ends[:-1], ends[1:])][max(0, warmup - 1):]
    hooks = timer.hooks[1:][max(0, warmup - 1):]
    optimizer = trainer.optimizers[0]
    result = RoundResult(times, timer.step_mem, static_bytes(module.model, optimizer), hooks if callbacks_on else [])
    del trainer
    return result


# ----------------------------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------------------------
@dataclass
class Runner:
    """A (case, mode) pair and everything its rounds measured."""

    case: Case
    mode: str
    batch: int
    times: list[float] = field(default_factory=list)
    round_medians: list[float] = field(default_factory=list)  # median step time of each round
    hooks: list[float] = field(default_factory=list)
    step_mem: list[int] = field(default_factory=list)
    static_mem: int | None = None

    @property
    def key(self) -> str:
        return f"{self.case.name}:{self.mode}"


def median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def quartiles(xs: Sequence[float]) -> tuple[float, float] | None:
    if len(xs) < 2:
        return None
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


@dataclass
class BenchSettings:
    presets: list[str]
    experts: list[int]
    combos: list[tuple[str, str | None]]
    overhead: list[str]  # case labels (without preset) that also run bare and Lightning-without-callbacks
    batch: int | None
    rounds: int
    warmup: int
    steps: int
    vocab_size: int
    device: str
    precision: str
    compile: bool
    log_every: int
    probe_reps: int
    threads: int | None
    seq_lens: list[int]
    d_models: list[int]
    plot: bool
    stat: str  # best_round | median: which step time the figures and ratios use
    out: Path | None
    quick: bool
    command: str

    def batch_for(self, preset: str) -> int:
        return self.batch or DEFAULT_BATCH.get(preset, 4)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_benchmark(settings: BenchSettings, progress: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Measure every configuration round-robin; return the JSON-ready report (also written if ``out``)."""
    log = progress or (lambda msg: None)
    import lightning.pytorch  # noqa: F401  (imported first: it resets its loggers' levels on import)

    device = resolve_device(settings.device)
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


def step_time(times: Sequence[float], round_medians: Sequence[float], stat: str) -> float | None:
    """The step time every figure uses: ``median`` of all timed steps pooled, or ``best_round``: the
    lowest of the per-round medians. On a shared machine foreign load only ever slows a round
    down, so the least-disturbed round is the estimate of the machine's own speed."""
    if stat == "best_round":
        return min(round_medians) if round_medians else None
    return median(times)


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


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def parse_combos(items: Sequence[str]) -> list[tuple[str, str | None]]:
    """``dense moe-topk sectional-hash`` -> [(family, routing)], validated against the known pairs."""
    known = {(f if r is None else f"{f}-{r}"): (f, r) for f, r in FAMILY_ROUTINGS}
    out = []
    for item in items:
        if item not in known:
            raise SystemExit(f"error: unknown configuration {item!r}; use any of {sorted(known)}")
        out.append(known[item])
    return out


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
    p.add_argument("--out", default=str(REPO / "docs" / "bench"), help="output directory ('' = write nothing)")
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
    device = resolve_device(a.device)
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
