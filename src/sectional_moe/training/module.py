"""The LightningModule: the loss, the optimiser, exact evaluation perplexity, RNG in checkpoints.

The model itself (:mod:`sectional_moe.models`) knows nothing of Lightning; the loss is
:func:`~sectional_moe.models.loss.lm_loss`. This module adds the AdamW + schedule, and exact perplexity: ``exp(sum of token NLL / number of tokens)``
over the whole evaluation set (summed across ranks), never a mean of per-batch perplexities.
Hyper-parameters are saved as plain dicts so checkpoints load with ``torch.load(weights_only=True)``.

Checkpoints also carry every rank's RNG states (:mod:`sectional_moe.training.rng`).
:func:`fsdp_wrap_policy` is the FSDP auto-wrap policy of ``conf/trainer/fsdp.yaml``.

Imports: lightning, torchmetrics, :mod:`sectional_moe.models`, :mod:`sectional_moe.training` (optim, rng).
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics import SumMetric

from sectional_moe.device import CompileRule, compile_rule
from sectional_moe.models import build_model
from sectional_moe.models.blocks import TransformerBlock
from sectional_moe.models.loss import LMLoss, lm_loss
from sectional_moe.models.sectional import SectionalMoEBlock
from sectional_moe.models.spec import ModelSpec
from sectional_moe.training.compiling import try_compile
from sectional_moe.training.optim import build_optimizer, clip_grad_norm_in_optimizer, clips_in_optimizer, decayed_names, lr_multiplier
from sectional_moe.training.rng import RNG_KEY, gather_rng_states, restore_rng_state

log = logging.getLogger(__name__)

BASELINES = ("unigram", "bigram")  # the data module's count baselines, logged as <stage>/<kind>_ppl

def decoder_block_classes() -> set[type[nn.Module]]:
    """The decoder block classes of all families (dense and MoE blocks, sectional blocks)."""
    return {TransformerBlock, SectionalMoEBlock}


def fsdp_wrap_policy() -> Any:
    """FSDP auto-wrap policy: one FSDP unit per decoder block (``conf/trainer/fsdp.yaml``).

    A block's full parameters are then gathered just before it runs and freed after it, so a rank
    holds one block's parameters at a time; the embedding, final norm and (tied) head stay in the
    root unit. Also usable as ``activation_checkpointing_policy`` (recompute each block).
    """
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return ModuleWrapPolicy(decoder_block_classes())


class LMModule(pl.LightningModule):
    """Trains a :class:`~sectional_moe.models.LanguageModel` of any family.

    Args:
        spec: ``ModelSpec.to_dict()`` of the model.
        optim: optimiser and schedule settings (``lr``, ``betas``, ``eps``, ``weight_decay``,
            ``fused``, ``schedule``, ``warmup_steps``, ``min_lr_ratio``, ``decay_frac``).
        max_steps: length of the schedule in optimiser steps.
        compile: ``torch.compile`` (Inductor) the training step: True/``"on"`` from the first
            batch, ``"auto"`` when :class:`~sectional_moe.device.CompileRule` says it pays, False/
            ``"off"`` never. Compilation runs a trial step first and falls back to eager with one
            warning if it fails; validation, test and decoding always run the eager model.
        compile_rule: ``compile=auto``'s rule as a dict (``speedup``, ``compile_s``,
            ``decide_after``; None: the device type's measured defaults).
    """

    def __init__(self, spec: dict[str, Any], optim: dict[str, Any], max_steps: int, compile: bool | str = False,
                 compile_rule: dict[str, Any] | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.spec = ModelSpec.from_dict(spec)
        self.model = build_model(self.spec)
        self.decay_names = decayed_names(self.model)  # before FSDP flattens the shapes that decide it
        self.compile_mode = ("on" if compile else "off") if isinstance(compile, bool) else str(compile)
        if self.compile_mode not in ("on", "off", "auto"):
            raise ValueError(f"compile={compile!r}; use True/'on', False/'off' or 'auto'")
        self._compile_rule_cfg = compile_rule
        # the compiled training model: a plain attribute, not a submodule, so state-dict keys stay the model's
        self.__dict__["_compiled"] = None
        self._compile_pending = self.compile_mode != "off"
        self._step_starts: list[float] = []  # start times of the first training steps (compile=auto)
        self.compile_report: dict[str, Any] = {"mode": self.compile_mode}
        for stage in ("val", "test"):
            setattr(self, f"{stage}_nll", SumMetric())
            setattr(self, f"{stage}_tokens", SumMetric())
            for kind in BASELINES:  # the count baselines, scored on exactly the same blocks as the model
                setattr(self, f"{stage}_{kind}_nll", SumMetric())
        # expert counts (E,) of each block's last training step (None: not routed); read by the expert-load callback
        self.latest_counts: list[torch.Tensor | None] = []
        self._rng_to_restore: dict[str, Any] | None = None  # this rank's RNG state from a resumed checkpoint

    def forward(self, ids: torch.Tensor):
        return self.model(ids)

    def loss(self, batch: torch.Tensor, reduction: str = "mean", model: nn.Module | None = None) -> LMLoss:
        """:func:`~sectional_moe.models.loss.lm_loss` of the model (or ``model``, e.g. its compiled twin) on a batch (B, T+1)."""
        return lm_loss(self.model if model is None else model, batch, reduction=reduction)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        out = self.loss(batch, model=self._compiled)
        if self._is_log_step():
            if out.lb_loss is not None:
                self.log("moe/lb_loss", out.lb_loss.detach())  # unscaled: 1.0 means perfectly balanced
            if out.z_loss is not None:
                self.log("moe/z_loss", out.z_loss.detach())
            if out.drop_frac is not None:
                self.log("moe/drop_frac", out.drop_frac)
        self.latest_counts = [None if a is None else a.counts for a in out.aux]  # detached: no graph kept alive
        self.log("train/loss", out.nll.detach(), prog_bar=True)
        return out.loss

    def _is_log_step(self) -> bool:
        """Will Lightning send this step's on-step values to the loggers?

        Each ``self.log`` costs ~1-2 ms of host time on CPU, and on-step values of other steps are
        overwritten unseen, so the aux metrics are logged only on the steps Lightning flushes
        (its ``should_update_logs`` rule: the step about to complete is a multiple of
        ``log_every_n_steps``), plus the last step so ``callback_metrics`` ends with them.
        The logged values are the same as when logging every step. Outside a Trainer: always.
        """
        trainer = self._trainer
        if trainer is None:
            return True
        step = trainer.global_step + 1
        every = max(1, int(trainer.log_every_n_steps or 1))
        max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        return step % every == 0 or trainer.should_stop or (max_steps is not None and step >= max_steps)

    def _baselines(self) -> dict[str, Any]:
        """The data module's fitted count baselines (``{}`` without one, e.g. a bare loader)."""
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        return datamodule.baselines() if hasattr(datamodule, "baselines") else {}

    def _eval_step(self, batch: torch.Tensor, stage: str) -> None:
        out = self.loss(batch, reduction="sum")
        device = out.nll.device
        getattr(self, f"{stage}_nll").update(out.nll.detach())
        getattr(self, f"{stage}_tokens").update(torch.tensor(float(out.tokens), device=device))
        baselines = self._baselines()
        if baselines:
            blocks = batch.cpu().numpy()
            for kind in BASELINES:
                getattr(self, f"{stage}_{kind}_nll").update(torch.tensor(baselines[kind].nll(blocks), device=device))

    def _eval_epoch_end(self, stage: str) -> None:
        nll, tokens = getattr(self, f"{stage}_nll"), getattr(self, f"{stage}_tokens")
        n_tokens = tokens.compute().clamp_min(1.0)
        mean_nll = nll.compute() / n_tokens
        self.log(f"{stage}/loss", mean_nll, sync_dist=False)
        self.log(f"{stage}/ppl", torch.exp(mean_nll), prog_bar=stage == "val", sync_dist=False)
        for kind in BASELINES:  # summed over the same blocks (and ranks) as the model's NLL
            metric = getattr(self, f"{stage}_{kind}_nll")
            if metric.update_count:
                self.log(f"{stage}/{kind}_ppl", torch.exp(metric.compute() / n_tokens), sync_dist=False)
            metric.reset()
        nll.reset()
        tokens.reset()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # ------------------------------------------------------------------ RNG state in checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[RNG_KEY] = gather_rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get(RNG_KEY) or []
        rank = self.global_rank
        if rank < len(states):
            self._rng_to_restore = states[rank]
        elif states:  # e.g. resumed on more ranks than it was saved from: fresh streams there
            log.warning("checkpoint has RNG states of %d ranks; rank %d keeps its seeded RNG", len(states), rank)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # restored here, not at load time: creating the train iterator draws a worker seed from
        # the global RNG, which the uninterrupted run had done before it saved the checkpoint
        if self._rng_to_restore is not None:
            restore_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        if self._compile_pending:
            self._maybe_compile(batch)

    # ------------------------------------------------------------------ torch.compile of the training step
    def compile_rule(self) -> CompileRule:
        """``compile=auto``'s rule (the configured values, else the device type's defaults)."""
        return compile_rule(self._compile_rule_cfg, self.device.type)

    def _maybe_compile(self, batch: torch.Tensor) -> None:
        """compile=on: compile now. compile=auto: time ``decide_after`` eager steps (start to start,
        so data loading and callbacks count), then compile iff :class:`CompileRule` says it pays."""
        if self.compile_mode == "on":
            self._compile(batch, "compile=true")
            return
        self._step_starts.append(time.perf_counter())
        rule = self.compile_rule()
        if len(self._step_starts) <= rule.decide_after:
            return
        gaps = [b - a for a, b in zip(self._step_starts[1:-1], self._step_starts[2:])]  # the first step is warm-up
        eager_step_s = statistics.median(gaps)
        trainer = self._trainer
        max_steps = trainer.max_steps if trainer is not None and trainer.max_steps and trainer.max_steps > 0 else int(self.hparams.max_steps)
        remaining = max_steps - (trainer.global_step if trainer is not None else 0)
        why = f"compile=auto: {rule.explain(remaining, eager_step_s)}"
        self.compile_report.update(rule=rule.to_dict(), eager_step_s=eager_step_s, remaining_steps=remaining,
                                   predicted_saving_s=rule.saving_s(remaining, eager_step_s))
        if rule.pays(remaining, eager_step_s):
            self._compile(batch, why)
        else:
            self._compile_pending = False
            self.compile_report["decision"] = "eager"
            log.info("%s: training stays eager", why)
            self._log_compile_report()

    def _compile(self, batch: torch.Tensor, why: str) -> None:
        """Compile the model with a trial step on ``batch`` (under the training autocast); on any
        failure keep training eagerly, with one warning line."""
        self._compile_pending = False
        trainer = self._trainer
        context = trainer.precision_plugin.train_step_context() if trainer is not None else contextlib.nullcontext()

        def trial(compiled: nn.Module) -> torch.Tensor:
            with context:
                return self.loss(batch, model=compiled).loss

        result = try_compile(self.model, trial)
        self.compile_report.update(seconds=result.seconds, error=result.error)
        if result.compiled is None:
            self.compile_report["decision"] = "failed"
            log.warning("torch.compile failed after %.0f s, training continues eagerly: %s", result.seconds, result.error)
        else:
            self.__dict__["_compiled"] = result.compiled
            self.compile_report["decision"] = "inductor"
            log.info("%s: training step compiled with Inductor in %.1f s", why, result.seconds)
        self._log_compile_report()

    def _log_compile_report(self) -> None:
        """The compile decision into the run's config (W&B, CSV hparams): ``compile/*``."""
        flat = {f"compile/{k}": v for k, v in self.compile_report.items() if not isinstance(v, dict)}
        flat.update({f"compile/rule/{k}": v for k, v in (self.compile_report.get("rule") or {}).items()})
        for logger in (self.loggers if self._trainer is not None else []):
            try:
                logger.log_hyperparams(flat)
            except Exception as err:  # noqa: BLE001 - a logger refusing a config update must not stop training
                log.warning("could not log the compile decision to %s: %s", type(logger).__name__, err)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip as Lightning does, but inside the fused AdamW where possible, also under bf16-mixed.

        * Norm clipping of a fused AdamW with replicated parameters (one device or DDP) and no
          grad scaler: :func:`~sectional_moe.training.optim.clip_grad_norm_in_optimizer` (the
          same result without a pass over every gradient).
        * Lightning's mixed-precision plugin refuses to clip any optimiser that could unscale
          gradients itself, which is right for fp16's grad scaler but not for bf16, which has none:
          there the base plugin's plain clipping is exact.
        """
        from lightning.pytorch.plugins.precision import Precision
        from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

        optimizer.__dict__.pop("grad_scale", None)  # last step's factor never leaks into this one
        plugin = self.trainer.precision_plugin
        if getattr(plugin, "scaler", None) is not None or not gradient_clip_val:  # fp16 scaler: Lightning's rules
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        replicated = isinstance(self.trainer.strategy, (SingleDeviceStrategy, DDPStrategy))
        if replicated and str(gradient_clip_algorithm or "norm") == "norm" and clips_in_optimizer(optimizer):
            clip_grad_norm_in_optimizer(optimizer, float(gradient_clip_val))
            return
        Precision.clip_gradients(plugin, optimizer, gradient_clip_val, gradient_clip_algorithm)  # type: ignore[arg-type]

    def configure_optimizers(self):
        o = self.hparams.optim
        optimizer = build_optimizer(self.model, o, self.device.type, self.decay_names)
        max_steps = int(self.hparams.max_steps)

        def multiplier(step: int) -> float:
            return lr_multiplier(
                step,
                schedule=o["schedule"],
                warmup_steps=int(o["warmup_steps"]),
                max_steps=max_steps,
                min_lr_ratio=float(o["min_lr_ratio"]),
                decay_frac=float(o.get("decay_frac", 0.2)),
            )

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def perplexity(mean_nll: float) -> float:
    """exp of the mean token NLL (nats), inf if it overflows."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return float("inf")
