"""Measuring the machine and the model: FLOPs actually executed, the rate at the model's own GEMM shapes, memory.

* :func:`measure_flops` — ``FlopCounterMode`` over a real forward/backward, to check the analytic
  counts of :mod:`sectional_moe.models.flops` (it misses two ops we use on CPU, the fused CPU SDPA
  kernel and ``grouped_mm``; their formulas are registered here, with torch's own conventions);
* :class:`GemmProbe` — the model's training GEMMs timed alone: the matmul rate this machine
  reaches on exactly that work;
* :class:`StepMemory` — the transient peak memory of one step; machine facts for the report.

Imports: torch, :mod:`sectional_moe.models`, :mod:`sectional_moe.hardware`, :mod:`sectional_moe.device`.
"""

from __future__ import annotations

import ctypes
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils import flop_counter as fc

from sectional_moe.device import sync
from sectional_moe.files import REPO_ROOT
from sectional_moe.hardware import cpu_model
from sectional_moe.models.flops import model_matmuls
from sectional_moe.models.spec import ModelSpec

MIB = 1024**2
aten = torch.ops.aten


def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return fc.sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _grouped_mm(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """2 FLOPs per multiply-add: 2D x 3D (M, K) @ (G, K, N) -> 2MKN; 2D x 2D (K, M) @ (M, N) with
    groups along M (the weight gradient) -> 2KMN as well; 3D x 3D batched -> 2GMKN."""
    if len(a_shape) == 2 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    if len(a_shape) == 3 and len(b_shape) == 2:  # (G, M, K) @ (K*, N) with groups along b
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[1] // max(1, b_shape[0] // a_shape[2])
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[-1]


CUSTOM_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward,
    aten._grouped_mm: _grouped_mm,
}


def measure_flops(model: torch.nn.Module, ids: torch.Tensor, training: bool = True) -> int:
    """Matmul FLOPs of one forward (and backward if ``training``) of ``model`` on ``ids``."""
    counter = fc.FlopCounterMode(display=False, custom_mapping=CUSTOM_FORMULAS)
    with counter:
        logits, _ = model(ids)
        if training:
            logits.float().logsumexp(-1).mean().backward()
    return counter.get_total_flops()


def training_gemms(shapes: Sequence[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Each forward GEMM (G, M, K, N) plus its backward pair: input gradient (M, N) @ (N, K) and
    weight gradient (K, M) @ (M, N)."""
    out = []
    for g, m, k, n in shapes:
        out.extend([(g, m, k, n), (g, m, n, k), (g, k, m, n)])
    return out


def gemm_shapes(spec: ModelSpec, batch: int) -> list[tuple[int, int, int, int]]:
    """The weight projections of one forward pass as (G, M, K, N): G independent (M, K) @ (K, N).

    From :func:`~sectional_moe.models.flops.model_matmuls` (the same list the analytic FLOPs sum),
    minus the score/value products inside attention; routed experts get a balanced share of rows.
    """
    return [(m.groups, max(1, int(m.M)), m.K, m.N) for m in model_matmuls(spec, batch) if not m.inside_attention]


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
            mm: Callable[[], torch.Tensor] = (lambda a=a, b=b: torch.mm(a[0], b[0])) if g == 1 else (lambda a=a, b=b: torch.bmm(a, b))
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


def git_commit(repo: Path = REPO_ROOT) -> str | None:
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
