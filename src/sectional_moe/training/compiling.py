"""``torch.compile`` (Inductor) of the training step, with a trial step and a fallback to eager.

:func:`try_compile` compiles a model and runs one trial forward and backward through it, so
every graph (the backward too) is built *before* the compiled model takes over; any failure
(no C++ compiler, an Inductor bug, a graph it cannot lower) leaves the run eager with one warning
line instead of a crash mid-step or pages of compiler output. :func:`inductor_preflight`
compiles a one-line function first, so a machine without a working toolchain fails in seconds.

The compiled model is a wrapper around the same module: parameters, optimiser state and
state-dict keys are untouched, and evaluation can keep calling the eager module.

Imports: torch.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class CompileResult:
    """What one compile attempt gave: the compiled model (None on failure), its cost, the error."""

    compiled: nn.Module | None
    seconds: float
    error: str | None = None


def first_line(err: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` (compiler errors carry pages of output after it)."""
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(err).__name__}: {line[:limit]}"


@functools.lru_cache(maxsize=1)
def inductor_preflight() -> str | None:
    """None if Inductor can build and run a kernel on this machine (cached), else the reason."""
    try:
        fn = torch.compile(lambda x: (x * 2.0 + 1.0).sum(), dynamic=False)
        fn(torch.ones(8))
    except Exception as err:  # noqa: BLE001 - any failure means: stay eager
        return first_line(err)
    return None


def try_compile(model: nn.Module, trial: Callable[[nn.Module], torch.Tensor]) -> CompileResult:
    """Compile ``model`` with Inductor and run ``trial(compiled)`` (a scalar loss) forward and backward.

    The trial's gradients are discarded (``torch.autograd.grad``), so it leaves the parameters'
    ``.grad`` and the optimiser alone. Never raises: a failure returns ``compiled=None`` and the
    error's first line, and resets Dynamo so no half-built state lingers.
    """
    import torch._dynamo

    start = time.perf_counter()
    reason = inductor_preflight()
    if reason is not None:
        return CompileResult(None, time.perf_counter() - start, f"Inductor cannot build kernels here ({reason})")
    from torch._dynamo.utils import counters

    graphs_before = counters["stats"]["unique_graphs"]
    compiled = torch.compile(model, dynamic=False)
    try:
        loss = trial(compiled)
        params = [p for p in model.parameters() if p.requires_grad]
        torch.autograd.grad(loss, params, allow_unused=True)
    except Exception as err:  # noqa: BLE001 - any failure means: stay eager
        torch._dynamo.reset()
        return CompileResult(None, time.perf_counter() - start, first_line(err))
    if counters["stats"]["unique_graphs"] == graphs_before:  # Dynamo silently ran the trial eagerly
        limit = torch._dynamo.config.recompile_limit
        return CompileResult(None, time.perf_counter() - start,
                             f"Dynamo compiled no graph (its limit of {limit} compiled versions per function was reached?)")
    return CompileResult(compiled, time.perf_counter() - start)
