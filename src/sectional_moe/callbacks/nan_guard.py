"""Stop (or skip) on a non-finite training loss or gradient, before it reaches the weights.

Checked between ``backward`` and ``optimizer.step``: the loss seen by ``on_before_backward`` and
every gradient in ``on_before_optimizer_step``. So when the guard fires, the weights are still
those of the previous step and no checkpoint of NaN weights is ever written.

Policies (``callbacks.nan_guard.policy``):

* ``stop`` (default): raise :class:`NonFiniteError` naming the step and the metric (the loss, or
  the first parameter whose gradient is not finite). ``train.py`` prints it as one line, marks
  ``status.json`` and the W&B run failed and exits 1; ``last.ckpt`` stays the last good state.
* ``skip``: drop that batch's update (gradients set to None, so AdamW leaves weights and moments
  untouched) and go on; after ``max_skips`` skipped batches, stop as above.

Host syncs: on CPU, or with ``policy=skip`` (which must decide before the step), the check reads
one boolean per optimiser step. On an accelerator with ``policy=stop`` it keeps a device-side
"first bad step" register instead and reads it only every ``sync_every_n_steps`` steps (default:
``trainer.log_every_n_steps``), before every checkpoint save and at the end of training. Weights
after a bad step are then NaN until the next sync, but the reported step is exact and no NaN
checkpoint is written (the save is aborted by the check in ``on_save_checkpoint``).

Under fp16 mixed precision (a ``GradScaler``) infinite gradients are expected and handled by the
scaler, so only the loss is checked there.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning.pytorch as pl
import torch

log = logging.getLogger(__name__)

POLICIES = ("stop", "skip")
_LOSS, _GRAD = 1, 2  # codes of the device-side "what was bad" register


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient (or skipped too many batches).

    Attributes:
        step: the optimiser step (``trainer.global_step`` before the update; the ``step`` column
            of the metrics under which that batch's ``train/loss`` is logged).
        metric: what was not finite, e.g. ``train/loss`` or ``grad/model.layers.0.attn.wq.weight``.
    """

    def __init__(self, message: str, step: int, metric: str):
        super().__init__(message)
        self.step, self.metric = step, metric


class NanGuard(pl.Callback):
    """Guard training against NaN/Inf losses and gradients.

    Args:
        policy: ``stop`` or ``skip`` (see the module docstring).
        max_skips: with ``skip``, how many batches may be skipped before the run stops.
        check_grads: also check gradients (the loss is always checked).
        sync_every_n_steps: accelerator + ``stop`` only: read the device flag every N steps;
            None = ``trainer.log_every_n_steps``.
    """

    def __init__(self, policy: str = "stop", max_skips: int = 10, check_grads: bool = True,
                 sync_every_n_steps: int | None = None):
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r}; use one of {POLICIES}")
        self.policy, self.max_skips, self.check_grads = policy, int(max_skips), bool(check_grads)
        self.sync_every_n_steps = sync_every_n_steps
        self.skipped = 0
        self._host_check = True
        self._loss_bad: torch.Tensor | None = None  # OR over the micro-batches of this step
        self._loss_value: torch.Tensor | None = None
        self._first_bad_step: torch.Tensor | None = None  # device mode: -1 or the first bad step
        self._first_bad_what: torch.Tensor | None = None

    # ------------------------------------------------------------------------------ setup
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # CPU: .item() costs nothing; skip: the decision is needed before optimizer.step
        self._host_check = pl_module.device.type == "cpu" or self.policy == "skip"
        if self.sync_every_n_steps is None:
            self.sync_every_n_steps = max(1, int(trainer.log_every_n_steps or 1))
        self._first_bad_step = torch.full((), -1, dtype=torch.long, device=pl_module.device)
        self._first_bad_what = torch.zeros((), dtype=torch.long, device=pl_module.device)

    def _uses_grad_scaler(self, trainer: pl.Trainer) -> bool:
        return getattr(trainer.precision_plugin, "scaler", None) is not None

    # ------------------------------------------------------------------------------ checks
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        loss = loss.detach()
        bad = ~torch.isfinite(loss).all()
        if self._loss_bad is None:
            self._loss_bad, self._loss_value = bad, loss
        else:
            self._loss_value = torch.where(self._loss_bad, self._loss_value, loss)  # keep the first bad value
            self._loss_bad = self._loss_bad | bad

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        step = int(trainer.global_step)
        loss_bad, loss_value = self._loss_bad, self._loss_value
        self._loss_bad = self._loss_value = None
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        grad_bad = None
        if self.check_grads and grads and not self._uses_grad_scaler(trainer):
            # one fused pass: a norm is non-finite iff some element is
            grad_bad = ~torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()
        if loss_bad is None and grad_bad is None:
            return
        if not self._host_check:
            self._record_on_device(step, loss_bad, grad_bad)
            return
        loss_is_bad = bool(loss_bad) if loss_bad is not None else False
        grad_is_bad = bool(grad_bad) if grad_bad is not None else False
        if not (loss_is_bad or grad_is_bad):
            return
        if loss_is_bad:
            metric, value = "train/loss", float(loss_value.float().reshape(-1)[0]) if loss_value is not None else math.nan
        else:
            metric, value = self._first_bad_grad(pl_module)
        if self.policy == "skip" and self.skipped < self.max_skips:
            self.skipped += 1
            optimizer.zero_grad(set_to_none=True)  # AdamW skips parameters without a gradient
            log.warning("nan_guard: non-finite %s (%s) at step %d: batch skipped (%d of max_skips=%d)",
                        metric, value, step, self.skipped, self.max_skips)
            return
        self._stop(trainer, step, metric, value)

    def _record_on_device(self, step: int, loss_bad: torch.Tensor | None, grad_bad: torch.Tensor | None) -> None:
        assert self._first_bad_step is not None and self._first_bad_what is not None
        dev = self._first_bad_step.device
        false = torch.zeros((), dtype=torch.bool, device=dev)
        lb = loss_bad.to(dev) if loss_bad is not None else false
        gb = grad_bad.to(dev) if grad_bad is not None else false
        first = (lb | gb) & (self._first_bad_step < 0)
        what = torch.where(lb, torch.full((), _LOSS, device=dev), torch.full((), _GRAD, device=dev))
        self._first_bad_step = torch.where(first, torch.full((), step, device=dev), self._first_bad_step)
        self._first_bad_what = torch.where(first, what, self._first_bad_what)

    def _sync(self, trainer: pl.Trainer) -> None:
        """Device mode: raise if a bad step was recorded since the start (one host read)."""
        if self._host_check or self._first_bad_step is None:
            return
        step = int(self._first_bad_step)
        if step >= 0:
            metric = "train/loss" if int(self._first_bad_what) == _LOSS else "gradient"
            self._stop(trainer, step, metric, None, weights_clean=False)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._host_check and self.sync_every_n_steps and trainer.global_step % self.sync_every_n_steps == 0:
            self._sync(trainer)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # runs while the checkpoint is being assembled, before the file is written: raising
        # here guarantees that no checkpoint of NaN weights reaches the disk
        self._sync(trainer)
        checkpoint.setdefault("nan_guard", {})["skipped"] = self.skipped

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.skipped = int((checkpoint.get("nan_guard") or {}).get("skipped", 0))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(trainer)

    # ------------------------------------------------------------------------------ reporting
    @staticmethod
    def _first_bad_grad(pl_module: pl.LightningModule) -> tuple[str, float]:
        for name, p in pl_module.named_parameters():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                bad = p.grad[~torch.isfinite(p.grad)].reshape(-1)[0]
                return f"grad/{name}", float(bad)
        return "gradient", math.nan

    def _stop(self, trainer: pl.Trainer, step: int, metric: str, value: float | None, weights_clean: bool = True) -> None:
        ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
        what = f"non-finite {metric}" + (f" ({value})" if value is not None else "")
        if self.policy == "skip":
            what += f" after {self.skipped} skipped batches (max_skips={self.max_skips})"
        state = "stopped before the update; " if weights_clean else ""
        raise NonFiniteError(
            f"nan_guard: {what} at step {step}; {state}last good checkpoint: {ckpt}. "
            "Lower optim.lr or raise optim.warmup_steps, or set callbacks.nan_guard.policy=skip",
            step=step, metric=metric,
        )
