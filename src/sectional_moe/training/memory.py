"""Will the run fit? An estimate of a training run's peak memory per rank, checked before anything is allocated.

A model that cannot fit (``size=large`` on a small CPU node, a typo making ``d_model`` 16384)
would otherwise allocate for minutes, push the machine into swap and ignore signals while it
does. :func:`check_memory` compares :func:`estimate` against the memory free on the device and
refuses with one line giving the estimate, its parts and what to lower (``memory_check=false``
skips it).

The estimate, per rank, in bytes (an approximation of what PyTorch keeps alive at the peak of a
training step, no activation checkpointing):

* parameters, gradients and AdamW's two moments: 4 + 4 + 8 bytes per parameter (fp32 master
  weights; bf16-mixed adds a 2-byte working copy), divided by the world size under FSDP;
* activations: for every weight matmul of the forward pass (``models.flops.model_matmuls``) its
  input and output rows are kept for the backward pass, plus the residual stream and norms
  (4 rows of ``d_model`` per layer and position); attention runs fused (no T x T scores kept);
* the LM head: logits, their log-softmax and their gradient (3 x batch x seq_len x vocab; 2 x on
  CPU, where ``models.loss`` computes the loss chunk by chunk and keeps no log-softmax);
* a fixed runtime overhead (the framework, the data, allocator slack).

Measured against the peak resident memory of CPU runs (``tests/training/test_memory.py``) it is
within a factor of 2; it is meant to catch runs that are off by far more than that.

Imports: :mod:`sectional_moe.models` (spec, flops), :mod:`sectional_moe.errors` (torch only to ask CUDA).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from sectional_moe.errors import ConfigError
from sectional_moe.models.flops import model_matmuls, param_counts
from sectional_moe.models.spec import ModelSpec

GIB = 2**30
RUNTIME_OVERHEAD = {"cpu": 0.6 * GIB, "cuda": 1.0 * GIB}  # framework, data, allocator slack
#: refuse when the estimate exceeds this share of the free memory (the estimate is approximate;
#: a run that needs 95 % of the machine is not one to start unattended either)
MAX_SHARE = 0.9


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak bytes per rank, by part."""

    params: float
    grads: float
    optimizer: float
    activations: float
    head: float
    overhead: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.head + self.overhead

    def describe(self) -> str:
        parts = (("parameters", self.params), ("gradients", self.grads), ("AdamW state", self.optimizer),
                 ("activations", self.activations), ("logits", self.head))
        return ", ".join(f"{name} {value / GIB:.2f}" for name, value in parts)


def estimate(spec: ModelSpec, batch_size: int, *, precision: str = "32-true", shard: int = 1, device: str = "cpu") -> MemoryEstimate:
    """Estimated peak memory of one training step on one rank (see the module docstring).

    ``shard``: the number of ranks parameters, gradients and optimizer state are sharded over
    (FSDP); 1 otherwise.
    """
    n = param_counts(spec)["total"]
    mixed = str(precision).startswith(("bf16-mixed", "16-mixed"))
    half = str(precision).startswith(("bf16-true", "16-true"))
    weight_bytes = 2.0 if half else (6.0 if mixed else 4.0)  # mixed: fp32 master + a 16-bit working copy
    grad_bytes = 2.0 if half else 4.0
    act_bytes = 2.0 if (mixed or half) else 4.0
    shard = max(1, int(shard))
    activations = 0.0
    for m in model_matmuls(spec, batch=batch_size):
        if m.inside_attention or m.name == "lm_head":
            continue
        activations += m.groups * m.M * (m.K + m.N)
    activations += 4 * spec.n_layers * batch_size * spec.seq_len * spec.d_model
    copies = 2 if device == "cpu" else 3  # logits + gradient (+ log-softmax, except the chunked CPU loss)
    head = copies * batch_size * spec.seq_len * spec.vocab_size * 4.0
    return MemoryEstimate(params=n * weight_bytes / shard, grads=n * grad_bytes / shard, optimizer=n * 8.0 / shard,
                          activations=activations * act_bytes, head=head, overhead=RUNTIME_OVERHEAD.get(device, GIB))


def _meminfo_available() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> float | None:
    """Room left under this process's cgroup (v2) memory limit, None if it has none."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                base = Path("/sys/fs/cgroup") / line.split("::", 1)[1].lstrip("/")
                limit = (base / "memory.max").read_text().strip()
                if limit == "max":
                    return None
                return float(limit) - float((base / "memory.current").read_text().strip())
    except (OSError, ValueError):
        pass
    return None


def free_memory(device: str, local_rank: int = 0) -> tuple[float | None, str]:
    """Bytes this rank may still allocate on ``device`` and what that figure is."""
    if device == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(local_rank % max(1, torch.cuda.device_count()))
        return float(free), f"free on cuda:{local_rank}"
    candidates = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    if not candidates:
        return None, "unknown"
    return min(candidates), "available RAM"


def ranks_per_node(trainer: Mapping[str, Any], device: str) -> int:
    """Processes sharing one node's memory: on CPU every rank of the node shares the RAM."""
    devices = str(trainer.get("devices", 1))
    return int(devices) if device == "cpu" and devices.isdigit() and int(devices) > 1 else 1


def check_memory(cfg: Mapping[str, Any], spec: ModelSpec, device: str, precision: str, *, world_size: int = 1,
                 shard: int = 1, free: float | None = None) -> MemoryEstimate:
    """Refuse a run whose estimated peak memory exceeds what the device has free.

    Raises:
        ConfigError: ``memory_check: the run needs about 212.4 GiB per rank (...) but 21.3 GiB are
            available RAM; lower ... or set memory_check=false``.
    """
    batch = int(cfg["data"]["batch_size"])
    est = estimate(spec, batch, precision=precision, shard=shard, device=device)
    per_node = ranks_per_node(cfg["trainer"], device)
    need = est.total * per_node
    if free is None:
        free, what = free_memory(device, int(os.environ.get("LOCAL_RANK", "0") or 0))
    else:
        what = "free"
    if free is None or need <= MAX_SHARE * free:
        return est
    ranks = f" x {per_node} ranks on this node" if per_node > 1 else ""
    raise ConfigError("memory_check", f"the run needs about {est.total / GIB:.1f} GiB per rank{ranks} ({est.describe()} GiB, "
                      f"at batch {batch} x {spec.seq_len}) but {free / GIB:.1f} GiB are {what}; lower data.batch_size, "
                      "size.seq_len or the size preset (or use bf16 on GPU, or FSDP over more GPUs), or set memory_check=false "
                      "if you know it fits")
