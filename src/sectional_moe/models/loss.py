"""The training loss of every family: next-token NLL plus the weighted router losses.

One function, :func:`lm_loss`, serves the LightningModule, the benchmark's bare loop and
evaluation, so the three can never disagree on what "the loss" is. Router losses are returned
unscaled (1.0 = perfectly balanced for the load-balancing loss) and weighted here by the spec's
``lb_loss_coef`` and ``z_loss_coef`` per routed layer (``aux_loss_reduction=sum``, the default: the
same weight per layer in every family) or shared by all routed layers (``mean``).

Imports: torch, :mod:`sectional_moe.models.lm`, :mod:`sectional_moe.models.routers`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sectional_moe.models.lm import LanguageModel
from sectional_moe.models.routers import LayerAux


@dataclass
class LMLoss:
    """The pieces of one batch's loss (tensors; nothing is synchronised to the host)."""

    loss: torch.Tensor  # what backward sees: nll + lb_coef * lb_loss + z_coef * z_loss
    nll: torch.Tensor  # next-token NLL in nats: mean over target tokens, or their sum
    tokens: int  # target tokens the NLL covers
    lb_loss: torch.Tensor | None  # unscaled, mean over routed layers with a learned router (1.0 = balanced)
    z_loss: torch.Tensor | None
    drop_frac: torch.Tensor | None  # mean over routed layers with a capacity factor
    aux: list[LayerAux | None]  # one entry per block


# CPU cross-entropy works on row chunks of about this many fp32 values (2 MiB: a core's L2), so
# each chunk's upcast, exponentials and gradient stay in cache instead of streaming (N, V) arrays
CE_CHUNK_VALUES = 1 << 19


class _ChunkedNLL(torch.autograd.Function):
    """Token NLL of logits (N, V) in any dtype, in fp32, one cache-sized row chunk at a time.

    The forward also writes the gradient (softmax - one-hot, in the logits' dtype) while each
    chunk is in cache; backward only scales it (not at all for the usual scale 1). Against
    ``F.cross_entropy(logits.float())`` this saves the fp32 copy of bf16 logits, the log-softmax
    output, the one-hot gradient and three full passes over (N, V): on CPU the loss was ~15 % of a
    step of the small models, as much as a transformer layer.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, mean: bool) -> torch.Tensor:
        N, V = logits.shape
        rows = max(1, CE_CHUNK_VALUES // V)
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(logits) if want_grad else None
        in_place = want_grad and logits.dtype == torch.float32  # write log-probs straight into grad
        scratch = None if in_place else torch.empty(min(rows, N), V, dtype=torch.float32, device=logits.device)
        nll = torch.empty(N, dtype=torch.float32, device=logits.device)
        scale = 1.0 / N if mean else 1.0
        for s in range(0, N, rows):
            e = min(N, s + rows)
            logp = grad[s:e] if in_place else scratch[: e - s]  # type: ignore[index]
            torch.log_softmax(logits[s:e], -1, dtype=torch.float32, out=logp)
            t = targets[s:e].unsqueeze(1)
            nll[s:e] = logp.gather(1, t).squeeze(1).neg_()
            if want_grad:  # d nll / d logits = softmax - one-hot
                logp.exp_().scatter_add_(1, t, torch.full_like(t, -1.0, dtype=logp.dtype))
                if scale != 1.0:
                    logp.mul_(scale)
                if not in_place:
                    grad[s:e] = logp  # type: ignore[index]
        ctx.grad = grad
        return nll.mean() if mean else nll.sum()

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad, ctx.grad = ctx.grad, None  # scaled in place: one backward per forward
        if grad is None:
            raise RuntimeError("the chunked NLL's graph was already backpropagated (retain_graph is not supported)")
        if g.device.type == "cpu" and float(g) == 1.0:  # the usual case; reading a CPU scalar costs no sync
            return grad, None, None
        return grad.mul_(g.to(grad.dtype)), None, None


def next_token_nll(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) against targets (B, T), computed in fp32.

    On CPU eager, ``mean``/``sum`` run :class:`_ChunkedNLL` (same values up to fp32 rounding);
    on CUDA, under ``torch.compile`` and for other reductions, ``F.cross_entropy`` (fused there).
    """
    flat_logits, flat_targets = logits.flatten(0, 1), targets.flatten()
    if logits.device.type == "cpu" and reduction in ("mean", "sum") and not torch.compiler.is_compiling():
        return _ChunkedNLL.apply(flat_logits, flat_targets, reduction == "mean")
    return F.cross_entropy(flat_logits.float(), flat_targets, reduction=reduction)


def _mean(values: list[torch.Tensor]) -> torch.Tensor | None:
    return torch.stack(values).mean() if values else None


def lm_loss(model: LanguageModel, batch: torch.Tensor, *, reduction: str = "mean") -> LMLoss:
    """The loss of ``batch`` (B, T+1) token ids: predict tokens 1..T from tokens 0..T-1.

    ``reduction="sum"`` sums the NLL over target tokens (evaluation accumulates exact perplexity
    from sums); the router losses are added only to the mean loss (training).
    """
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits, aux = model(inputs)
    nll = next_token_nll(logits, targets, reduction)
    routed = [a for a in aux if a is not None]
    lbs = [a.lb_loss for a in routed if a.lb_loss is not None]
    zs = [a.z_loss for a in routed if a.z_loss is not None]
    lb, z = _mean(lbs), _mean(zs)
    drop = _mean([a.drop_frac for a in routed if a.drop_frac is not None])
    total = nll
    if reduction == "mean":
        spec = model.spec
        # sum: every routed layer weighs the coefficient, so a family's per-layer weight does not
        # depend on how many of its layers are routed; mean: the layers share it
        layers = 1 if spec.aux_loss_reduction == "mean" else None
        if lb is not None:
            total = total + spec.lb_loss_coef * lb * (layers or len(lbs))
        if z is not None:
            total = total + spec.z_loss_coef * z * (layers or len(zs))
    return LMLoss(loss=total, nll=nll, tokens=targets.numel(), lb_loss=lb, z_loss=z, drop_frac=drop, aux=aux)
