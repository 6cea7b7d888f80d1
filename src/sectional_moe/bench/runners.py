"""The two training paths the benchmark times: a bare PyTorch loop and ``trainer.fit``, on synthetic tokens.

Both train the same module, batch and optimiser; the loss is :func:`~sectional_moe.models.loss.lm_loss`
in both, so the difference is only the framework (and, in Lightning, the metrics callbacks). The bare
loop also trains the GPT-2-style :mod:`~sectional_moe.bench.reference` model (mode ``reference``).
Each run is in a :class:`~sectional_moe.bench.cases.Setup` (fp32 or bf16-mixed, eager or compiled);
a compiled run compiles once, in its first round's warm-up, and keeps its module for later rounds.

Imports: torch, lightning, :mod:`sectional_moe.training` (module, optim, compiling), :mod:`sectional_moe.callbacks`,
:mod:`sectional_moe.bench` (cases, probes, reference).
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning.pytorch as pl
import torch

from sectional_moe.bench.cases import DEFAULT_BATCH, SETUP_PRECISIONS, Case, Setup
from sectional_moe.bench.probes import StepMemory, static_bytes
from sectional_moe.bench.reference import ReferenceGPT, reference_loss
from sectional_moe.callbacks import ExpertLoadMonitor, MemoryMonitor, SpeedMonitor, WandbSummary
from sectional_moe.device import sync
from sectional_moe.models.loss import lm_loss
from sectional_moe.models.spec import ModelSpec
from sectional_moe.training.compiling import try_compile
from sectional_moe.training.module import LMModule
from sectional_moe.training.optim import build_optimizer, clip_grad_norm_in_optimizer, lr_multiplier

MODES = ("lightning", "lightning_nocb", "bare")
MODE_LABELS = {"lightning": "Lightning + metrics callbacks", "lightning_nocb": "Lightning, no callbacks",
               "bare": "bare PyTorch loop", "reference": "bare loop, GPT-2-style reference model"}
# conf/optim/adamw.yaml's AdamW (a test keeps them equal) with the 50-step warm-up its
# warmup_steps=auto gives a job of >= 500 steps: at the full lr from step 0, top-k routing on random
# tokens collapses onto a few experts within ~10 steps, a state no job trains in, and the timed steps
# would measure it. Constant after the warm-up (the schedule's shape does not change a step's cost).
OPTIM = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused="auto", schedule="constant",
             warmup_steps=50, min_lr_ratio=0.1, decay_frac=0.2)
GRAD_CLIP = 1.0  # conf/trainer/default.yaml: the bare loop clips exactly as Lightning does


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
    torch.manual_seed(seed)
    return LMModule(spec.to_dict(), dict(OPTIM), max_steps=10**6, compile=compile_model)


def build_reference(spec: ModelSpec, seed: int = 0) -> ReferenceGPT:
    """The GPT-2-style reference at our model's width, depth, heads, context and vocabulary (equal FLOPs, see its module)."""
    torch.manual_seed(seed)
    return ReferenceGPT(spec.vocab_size, spec.d_model, spec.n_layers, spec.n_heads, spec.seq_len)


def autocast_of(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision.startswith("bf16") else contextlib.nullcontext()


@dataclass
class RoundResult:
    """What one round of one (case, mode) measured."""

    step_times: list[float]
    step_mem: int | None = None  # transient bytes of the memory step
    static_mem: int | None = None
    hook_times: list[float] = field(default_factory=list)  # seconds inside metric callbacks, per timed step
    state: Any = None  # what a compiled run keeps for its next round (module, optimiser, compiled model)
    compile_s: float | None = None  # the first compiled step (Dynamo + Inductor + trial step), this round
    compile_error: str | None = None


def run_bare(case: Case, batch: int, warmup: int, steps: int, device: torch.device, precision: str,
             compile_model: bool, measure_memory: bool, reference: bool = False, state: Any = None,
             optim: dict[str, Any] | None = None, observe: Callable[[torch.nn.Module], None] | None = None,
             keep_state: bool = False) -> RoundResult:
    """Plain PyTorch: forward, loss, backward, clip, AdamW step, schedule step, zero_grad.

    ``reference``: train the GPT-2-style :class:`ReferenceGPT` instead of our model (same loop).
    ``optim``: the optimiser and schedule (default :data:`OPTIM`);
    ``observe`` is called with the freshly built model (e.g. to hook its routers); ``keep_state``
    returns an eager run's state too, so the next call trains the same model on.
    ``compile_model``: compile with Inductor before the warm-up (a trial step, excluded from the
    timing); ``state`` is the previous round's (model, optimiser, scheduler, compiled model), reused.
    """
    compile_s = compile_error = None
    if state is None:
        if reference:
            model = build_reference(case.spec).to(device)
            loss_of = reference_loss
        else:
            model = build_module(case.spec, device, False).to(device).model
            loss_of = lambda m, b: lm_loss(m, b).loss  # noqa: E731
        model.train()
        if observe is not None:
            observe(model)
        opt = OPTIM if optim is None else optim
        optimizer = build_optimizer(model, opt, device.type)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(
            s, schedule=opt["schedule"], warmup_steps=int(opt["warmup_steps"]), max_steps=10**6,
            min_lr_ratio=opt["min_lr_ratio"], decay_frac=opt["decay_frac"]))
        compiled = None
        if compile_model:
            probe = make_loader(case.spec, batch, 1, device).dataset[0].unsqueeze(0).repeat(batch, 1).to(device)

            def trial(m: torch.nn.Module) -> torch.Tensor:
                with autocast_of(device, precision):
                    return loss_of(m, probe)

            result = try_compile(model, trial)
            compiled, compile_s, compile_error = result.compiled, result.seconds, result.error
        state = (model, optimizer, scheduler, compiled, loss_of)
    model, optimizer, scheduler, compiled, loss_of = state
    run_model = compiled if compiled is not None else model
    autocast = autocast_of(device, precision)
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
            loss = loss_of(run_model, batch_ids)
        loss.backward()
        clip_grad_norm_in_optimizer(optimizer, GRAD_CLIP)  # as LMModule clips under Lightning
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if memory_step:
            step_mem = mem.stop()
        else:
            ends.append(time.perf_counter())
    times = [b - a for a, b in zip([start, *ends[:-1]], ends)][warmup:]
    keep = state if compile_model or keep_state else None  # eager runs rebuild each round (bounded memory)
    return RoundResult(times, step_mem, static_bytes(model, optimizer), state=keep, compile_s=compile_s,
                       compile_error=compile_error)


#: the per-step hooks of a callback (what the benchmark times and the overhead benchmark gates)
STEP_HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
              "on_before_optimizer_step", "on_before_zero_grad")


class StepTimer(pl.Callback):
    """Batch-end timestamps (device synchronised), the callbacks' hook time per step (from ``hook_sink``,
    reset every step) and, when ``memory_step`` is a batch index, the transient memory of that step,
    which is then not timed. Goes last in the callback list, so a step's time includes every hook."""

    def __init__(self, device: torch.device, memory_step: int | None = None, hook_sink: list[float] | None = None):
        self.device, self.memory_step = device, memory_step
        self.hook_sink = hook_sink if hook_sink is not None else [0.0]
        self.ends: list[float] = []
        self.hooks: list[float] = []
        self.mem = StepMemory(device)
        self.step_mem: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.memory_step is not None and batch_idx == self.memory_step - 1:
            self.mem.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sync(self.device)
        if self.memory_step is not None and batch_idx == self.memory_step - 1:
            self.step_mem = self.mem.stop()
            return
        self.ends.append(time.perf_counter())
        self.hooks.append(self.hook_sink[0])
        self.hook_sink[0] = 0.0


def metric_callbacks() -> list[pl.Callback]:
    """The metrics callbacks whose cost the benchmark measures (as train.py adds them, files off)."""
    return [SpeedMonitor(cache_dir=None), MemoryMonitor(), ExpertLoadMonitor(), WandbSummary()]


def quiet_lightning() -> None:
    """Silence Lightning's per-fit banners and its few-workers warning: a benchmark runs many short fits."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def lightning_trainer(device: torch.device, precision: str, max_steps: int, callbacks: list[pl.Callback],
                      log_every: int) -> pl.Trainer:
    """The benchmark's Trainer: as train.py's (clipping, precision), no logger, checkpoints, validation or bar."""
    return pl.Trainer(
        accelerator=device.type if device.type != "cuda" else "gpu", devices=1, precision=precision,  # type: ignore[arg-type]
        max_steps=max_steps, max_epochs=-1, logger=False, callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=GRAD_CLIP,
        log_every_n_steps=log_every, check_val_every_n_epoch=None, val_check_interval=10**9,
        default_root_dir=tempfile.mkdtemp(prefix="smoe-bench-"),  # callback files (expert_load.json) stay out of the cwd
    )


def timed_hooks(callback: Any, sink: list[float], gate: Callable[[], bool] | None = None) -> None:
    """Wrap a callback's per-step hooks so the time spent in them is added to ``sink[0]``; with a
    ``gate``, a hook runs only while ``gate()`` is true (the overhead benchmark's off blocks).

    Lightning looks hooks up with ``getattr`` on the instance, so instance attributes win.
    """
    for name in STEP_HOOKS:
        original = getattr(callback, name)

        def timed(*args, __original=original, **kwargs):
            if gate is not None and not gate():
                return None
            t0 = time.perf_counter()
            try:
                return __original(*args, **kwargs)
            finally:
                sink[0] += time.perf_counter() - t0

        setattr(callback, name, timed)


def run_lightning(case: Case, batch: int, warmup: int, steps: int, device: torch.device, precision: str,
                  compile_model: bool, measure_memory: bool, callbacks_on: bool, log_every: int,
                  state: Any = None) -> RoundResult:
    """``trainer.fit`` of the same module, batch and optimiser (``configure_optimizers``), with or
    without the metrics callbacks; a last-in-list timer callback stamps every batch end.

    ``compile_model``: LMModule compiles at the first batch (inside the untimed warm-up); the
    module is returned as ``state`` and refitted in later rounds without compiling again.
    """
    fresh = state is None
    module = build_module(case.spec, device, compile_model) if fresh else state
    total = warmup + steps + (1 if measure_memory else 0)
    hook_sink = [0.0]
    metric_cbs: list[pl.Callback] = []
    if callbacks_on:
        metric_cbs = metric_callbacks()
        for cb in metric_cbs:
            timed_hooks(cb, hook_sink)

    timer = StepTimer(device, total if measure_memory else None, hook_sink)
    trainer = lightning_trainer(device, precision, total, [*metric_cbs, timer], log_every)
    trainer.fit(module, train_dataloaders=make_loader(case.spec, batch, total, device))
    ends = timer.ends
    times = [b - a for a, b in zip(ends[:-1], ends[1:])][max(0, warmup - 1):]
    hooks = timer.hooks[1:][max(0, warmup - 1):]
    optimizer = trainer.optimizers[0]
    result = RoundResult(times, timer.step_mem, static_bytes(module.model, optimizer), hooks if callbacks_on else [],
                         state=module if compile_model else None)
    if compile_model and fresh:
        result.compile_s = module.compile_report.get("seconds")
        result.compile_error = module.compile_report.get("error")
    del trainer
    return result


@dataclass
class Runner:
    """A (case, mode, setup) triple and everything its rounds measured."""

    case: Case
    mode: str  # lightning | lightning_nocb | bare | reference
    batch: int
    setup: Setup = Setup("fp32")
    times: list[float] = field(default_factory=list)
    round_medians: list[float] = field(default_factory=list)  # median step time of each round
    hooks: list[float] = field(default_factory=list)
    step_mem: list[int] = field(default_factory=list)
    static_mem: int | None = None
    state: Any = None  # a compiled run's module (or bare-loop state), kept across rounds
    compile_s: float | None = None
    compile_error: str | None = None

    @property
    def key(self) -> str:
        return f"{self.case.name}:{self.mode}:{self.setup.name}"

    def run_round(self, settings: "BenchSettings", device: torch.device) -> RoundResult:
        """One round: warm-up + timed steps (+ a memory step), recorded into this runner."""
        kw = dict(batch=self.batch, warmup=settings.warmup, steps=settings.steps, device=device,
                  precision=self.setup.precision, compile_model=self.setup.compile, measure_memory=True, state=self.state)
        if self.mode in ("bare", "reference"):
            res = run_bare(self.case, **kw, reference=self.mode == "reference")
        else:
            res = run_lightning(self.case, **kw, callbacks_on=self.mode in ("lightning", "overhead_cb"), log_every=settings.log_every)
        self.times.extend(res.step_times)
        if res.step_times:
            self.round_medians.append(statistics.median(res.step_times))
        self.hooks.extend(res.hook_times)
        if res.step_mem is not None:
            self.step_mem.append(res.step_mem)
        self.static_mem = res.static_mem
        self.state = res.state
        if res.compile_s is not None:
            self.compile_s, self.compile_error = res.compile_s, res.compile_error
        return res


def median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def quartiles(xs: Sequence[float]) -> tuple[float, float] | None:
    if len(xs) < 2:
        return None
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


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
    precision: str  # the main setup's precision (the E sweep and the overhead cases run in it)
    compile: bool  # the main setup's compile
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
    setups: list[Setup] = field(default_factory=list)  # side by side per family (at side_experts) and at the study shape
    side_experts: int = 8  # E of the side-by-side table
    study: bool = True  # also the studies' job shape (conf/experiment/study_cpu.yaml)
    reference: bool = True  # our dense model against the GPT-2-style reference (bare loops)
    overhead_rounds: int = 0  # extra interleaved rounds of the overhead cases only (callbacks on vs off)
    overhead_steps: int = 8  # timed steps per overhead round
    overhead_ci: float | None = None  # more overhead rounds until every 95 % half-width is below this (None: fixed)
    overhead_max_rounds: int = 200
    overhead_max_s: float = 3600.0
    malloc_reuse: bool | str = "auto"  # train.py's malloc_reuse for the benchmark process

    @property
    def main_setup(self) -> Setup:
        return Setup(next(k for k, v in SETUP_PRECISIONS.items() if v == self.precision) + ("+compile" if self.compile else ""))

    def batch_for(self, preset: str) -> int:
        return self.batch or DEFAULT_BATCH.get(preset, 4)

    def batch_of(self, case: Case) -> int:
        """A case's own batch (study and reference shapes), else the preset's."""
        return case.batch or self.batch_for(case.preset)


def step_time(times: Sequence[float], round_medians: Sequence[float], stat: str) -> float | None:
    """The step time every figure uses: ``median`` of all timed steps pooled, or ``best_round``: the
    lowest of the per-round medians. On a shared machine foreign load only ever slows a round
    down, so the least-disturbed round is the estimate of the machine's own speed."""
    if stat == "best_round":
        return min(round_medians) if round_medians else None
    return median(times)
