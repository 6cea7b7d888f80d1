"""The LightningModule: next-token loss, router aux losses, optimiser and evaluation glue.

The model itself (:mod:`sectional_moe.models`) knows nothing of Lightning. This module adds the
loss, the AdamW + schedule, and exact perplexity: ``exp(sum of token NLL / number of tokens)``
over the whole evaluation set (summed across ranks), never a mean of per-batch perplexities.
Hyper-parameters are saved as plain dicts so checkpoints load with ``torch.load(weights_only=True)``.

Checkpoints also carry every rank's RNG states (torch CPU and CUDA, numpy, Python), stored as
tensors and plain lists for the same reason; a resumed rank continues its own random streams.
:func:`fsdp_wrap_policy` is the FSDP auto-wrap policy of ``conf/trainer/fsdp.yaml``.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Any, Mapping

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import SumMetric

from sectional_moe.models import build_model
from sectional_moe.optim import build_optimizer, decayed_names, lr_multiplier
from sectional_moe.spec import ModelSpec

log = logging.getLogger(__name__)

RNG_KEY = "rng_states"  # checkpoint key: a list with one capture_rng_state() per rank, by rank


def capture_rng_state() -> dict[str, Any]:
    """This process's torch (CPU and each CUDA device), numpy and Python RNG states.

    Tensors, ints, floats and lists only, so a checkpoint holding them loads with
    ``torch.load(weights_only=True)`` (numpy's and Python's own state tuples would not).
    CUDA states are read only if CUDA is in use: reading them would create a context otherwise.
    """
    _, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    version, internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "state": list(internal), "gauss": py_gauss},
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states only for the devices that exist here)."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = list(state.get("cuda") or [])
    if cuda and torch.cuda.is_available():
        for index, cuda_state in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), index)
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's :func:`capture_rng_state`, indexed by rank (a collective under DDP/FSDP:
    Lightning assembles a checkpoint on all ranks, so all of them get here together)."""
    mine = capture_rng_state()
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


def decoder_block_classes() -> set[type[nn.Module]]:
    """The decoder block classes of all families (dense and MoE blocks, sectional blocks)."""
    from sectional_moe.models.blocks import TransformerBlock
    from sectional_moe.models.sectional import SectionalMoEBlock

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
        compile: wrap the model in ``torch.compile`` (in place, state-dict keys unchanged).
    """

    def __init__(self, spec: dict[str, Any], optim: dict[str, Any], max_steps: int, compile: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.spec = ModelSpec.from_dict(spec)
        self.model = build_model(self.spec)
        self.decay_names = decayed_names(self.model)  # before FSDP flattens the shapes that decide it
        if compile:
            self.model.compile()
        self.lb_coef, self.z_coef = self.spec.lb_loss_coef, self.spec.z_loss_coef
        for stage in ("val", "test"):
            setattr(self, f"{stage}_nll", SumMetric())
            setattr(self, f"{stage}_tokens", SumMetric())
        self.latest_aux: list[dict[str, torch.Tensor]] = []  # read by the expert-load callback
        self._rng_to_restore: dict[str, Any] | None = None  # this rank's RNG state from a resumed checkpoint

    def forward(self, ids: torch.Tensor):
        return self.model(ids)

    def _nll(self, batch: torch.Tensor, reduction: str = "mean") -> tuple[torch.Tensor, list[dict]]:
        """batch (B, T+1) token ids -> next-token NLL of positions 1..T, per-block aux."""
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits, aux = self.model(inputs)
        nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)
        return nll, aux

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss, aux = self._nll(batch)
        total = loss
        routed = [a for a in aux if "lb_loss" in a]
        if routed:
            lb = torch.stack([a["lb_loss"] for a in routed]).mean()
            z = torch.stack([a["z_loss"] for a in routed]).mean()
            total = total + self.lb_coef * lb + self.z_coef * z
            if self._is_log_step():
                self.log("moe/lb_loss", lb.detach())  # unscaled: 1.0 means perfectly balanced
                self.log("moe/z_loss", z.detach())
        drops = [a["drop_frac"] for a in aux if "drop_frac" in a]
        if drops and self._is_log_step():
            self.log("moe/drop_frac", torch.stack(drops).mean())
        self.latest_aux = [{k: v for k, v in a.items() if k == "counts"} for a in aux]
        self.log("train/loss", loss.detach(), prog_bar=True)
        return total

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

    def _eval_step(self, batch: torch.Tensor, stage: str) -> None:
        nll, _ = self._nll(batch, reduction="sum")
        getattr(self, f"{stage}_nll").update(nll.detach())
        getattr(self, f"{stage}_tokens").update(torch.tensor(float(batch[:, 1:].numel()), device=nll.device))

    def _eval_epoch_end(self, stage: str) -> None:
        nll, tokens = getattr(self, f"{stage}_nll"), getattr(self, f"{stage}_tokens")
        mean_nll = nll.compute() / tokens.compute().clamp_min(1.0)
        nll.reset()
        tokens.reset()
        self.log(f"{stage}/loss", mean_nll, sync_dist=False)
        self.log(f"{stage}/ppl", torch.exp(mean_nll), prog_bar=stage == "val", sync_dist=False)

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
