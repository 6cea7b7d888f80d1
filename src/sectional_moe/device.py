"""Which device a run uses, in which precision, and the few device operations every part needs.

``auto`` settings are resolved here, once: the device type (CUDA when visible), the precision
(:func:`choose_precision`: bf16-mixed on CUDA and on CPUs whose bf16 matmuls are native and
faster, fp32 elsewhere), when ``torch.compile`` pays off (:class:`CompileRule`) and whether the
host allocator keeps freed memory for the next step (:func:`reuse_host_memory`). Also a device
synchronisation for timing and the autocast context of a precision string.

Imports torch lazily (inside the functions), so configs can be validated without it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple

from sectional_moe.errors import ConfigError

if TYPE_CHECKING:
    import torch


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_device_type(trainer: Mapping[str, Any]) -> str:
    """The device type a run will use: ``cuda`` or ``cpu``."""
    acc = str(trainer.get("accelerator", "auto"))
    if acc in ("gpu", "cuda"):
        return "cuda"
    if acc == "auto":
        return "cuda" if cuda_available() else "cpu"
    return acc


# CPU flags of native bf16 dot products: AVX512-BF16 (vdpbf16ps) and AMX (bf16 tiles)
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# On a CPU with AVX512-BF16 but no AMX, bf16 matmuls are not always faster than fp32 ones (one
# host of this machine kind ran them at 0.55x fp32, another at ~4x): precision=auto then times
# both and takes bf16 only if its matmuls are at least this much faster. The rest of a step
# (norms, softmax, the optimiser) gains little from bf16 and pays the casts.
BF16_MIN_GEMM_SPEEDUP = 1.3
# the race: (M, K, N) of the small presets' FFN projections, rounds of one matmul per dtype
BF16_PROBE_SHAPE = (2048, 256, 768)
BF16_PROBE_ROUNDS = 7


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_native_bf16() -> str | None:
    """Which native bf16 matmul unit this CPU has: ``amx``, ``avx512_bf16`` or None.

    From the kernel's CPU flags, or torch's own CPU capability checks where ``/proc/cpuinfo`` is
    missing (never from the model name).
    """
    import torch

    flags = cpu_flags()
    if "amx_bf16" in flags or torch.cpu._is_amx_tile_supported():
        return "amx"
    if "avx512_bf16" in flags or torch.cpu._is_avx512_bf16_supported():
        return "avx512_bf16"
    return None


@functools.lru_cache(maxsize=1)
def cpu_bf16_gemm_speedup() -> float:
    """bf16 over fp32 matmul rate at :data:`BF16_PROBE_SHAPE` at the current thread count (~0.2 s).

    The two dtypes alternate and each keeps its fastest round, so foreign load slows both alike
    and the ratio stays honest on a shared machine. Measured once per process, so every part of
    a run (memory check, Trainer, logged config) sees the same choice.
    """
    import torch

    M, K, N = BF16_PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(M, K, generator=gen), torch.randn(K, N, generator=gen)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    best = {torch.float32: float("inf"), torch.bfloat16: float("inf")}
    for a, b in ((a32, b32), (a16, b16)):  # warm-up: packing buffers, oneDNN primitives
        torch.mm(a, b)
    for _ in range(BF16_PROBE_ROUNDS):
        for a, b in ((a32, b32), (a16, b16)):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best[a.dtype] = min(best[a.dtype], time.perf_counter() - t0)
    return best[torch.float32] / best[torch.bfloat16]


class PrecisionChoice(NamedTuple):
    """A resolved precision and why it was chosen (logged with the run)."""

    precision: str  # a Lightning precision string
    reason: str


def choose_precision(trainer: Mapping[str, Any]) -> PrecisionChoice:
    """Resolve ``trainer.precision``; ``auto`` picks the fastest correct mode of this machine.

    * CUDA: ``bf16-mixed``;
    * CPU with AMX: ``bf16-mixed``;
    * CPU with AVX512-BF16 only: ``bf16-mixed`` if its bf16 matmuls run at least
      :data:`BF16_MIN_GEMM_SPEEDUP` x fp32 (:func:`cpu_bf16_gemm_speedup`), else ``32-true``;
    * any other CPU: ``32-true`` (bf16 would be emulated, many times slower).

    Under bf16-mixed the weights, optimiser state, loss and router logits stay fp32 (autocast
    casts only matmul inputs). Any explicit value is returned as given.
    """
    p = str(trainer.get("precision", "auto"))
    if p != "auto":
        return PrecisionChoice(p, "configured")
    if resolve_device_type(trainer) == "cuda":
        return PrecisionChoice("bf16-mixed", "auto: CUDA")
    native = cpu_native_bf16()
    if native is None:
        return PrecisionChoice("32-true", "auto: this CPU has no native bf16 (no avx512_bf16 or AMX)")
    if native == "amx":
        return PrecisionChoice("bf16-mixed", "auto: CPU with AMX bf16 tiles")
    speedup = cpu_bf16_gemm_speedup()
    pays = speedup >= BF16_MIN_GEMM_SPEEDUP
    return PrecisionChoice("bf16-mixed" if pays else "32-true",
                           f"auto: CPU with avx512_bf16, bf16 matmuls {speedup:.2f}x fp32 "
                           f"({'>=' if pays else '<'} {BF16_MIN_GEMM_SPEEDUP})")


def resolve_precision(trainer: Mapping[str, Any]) -> str:
    """The Lightning precision a run uses (:func:`choose_precision`)."""
    return choose_precision(trainer).precision


# compile=auto defaults per device type, measured by `python -m sectional_moe.bench` (docs/bench/
# bench.md, "torch.compile"): the compiled step's speed-up over eager and the time the first
# compiled step costs (Dynamo + Inductor, fresh cache; a warm cache recompiles in a fraction)
COMPILE_DEFAULTS: dict[str, dict[str, float]] = {
    "cpu": {"speedup": 1.2, "compile_s": 60.0},
    "cuda": {"speedup": 1.3, "compile_s": 60.0},
}
COMPILE_DECIDE_AFTER = 10  # eager steps timed before compile=auto decides (the first one is warm-up)


@dataclass(frozen=True)
class CompileRule:
    """When ``compile=auto`` switches Inductor on: after ``decide_after`` eager steps, iff

        remaining steps x eager step time x (1 - 1 / speedup)  >=  compile_s

    i.e. the time the compiled steps would save repays the expected compile time. The eager step
    time is measured in the run itself; ``speedup`` and ``compile_s`` are the device type's
    measured defaults (:data:`COMPILE_DEFAULTS`) unless the config's ``compile_rule`` sets them.
    """

    speedup: float
    compile_s: float
    decide_after: int = COMPILE_DECIDE_AFTER

    def saving_s(self, remaining_steps: int, eager_step_s: float) -> float:
        """Seconds the compiled steps would save over the rest of the run."""
        return max(0, remaining_steps) * eager_step_s * (1.0 - 1.0 / self.speedup)

    def pays(self, remaining_steps: int, eager_step_s: float) -> bool:
        return self.saving_s(remaining_steps, eager_step_s) >= self.compile_s

    def explain(self, remaining_steps: int, eager_step_s: float) -> str:
        """The rule with this run's numbers, for the log."""
        saving = self.saving_s(remaining_steps, eager_step_s)
        return (f"{remaining_steps} remaining steps x {eager_step_s:.3f} s eager x (1 - 1/{self.speedup:g}) = {saving:.0f} s "
                f"{'>=' if saving >= self.compile_s else '<'} {self.compile_s:g} s compile")

    def to_dict(self) -> dict[str, float]:
        return {"speedup": self.speedup, "compile_s": self.compile_s, "decide_after": self.decide_after}


def compile_rule(cfg: Mapping[str, Any] | None, device_type: str) -> CompileRule:
    """The :class:`CompileRule` of a run: ``cfg`` is the ``compile_rule`` block (or None), its null
    values filled from :data:`COMPILE_DEFAULTS` for ``device_type``.

    Raises:
        ConfigError: a speed-up <= 1, a negative compile time or a decide_after < 2.
    """
    cfg = cfg or {}
    base = COMPILE_DEFAULTS.get(device_type, COMPILE_DEFAULTS["cuda"])
    speedup = cfg.get("speedup")
    speedup = float(base["speedup"] if speedup is None else speedup)
    compile_s = cfg.get("compile_s")
    compile_s = float(base["compile_s"] if compile_s is None else compile_s)
    decide_after = cfg.get("decide_after")
    decide_after = COMPILE_DECIDE_AFTER if decide_after is None else decide_after
    if not speedup > 1.0:
        raise ConfigError("compile_rule.speedup", f"speedup={speedup:g} must be > 1 (compiled/eager step speed); "
                          "to never compile use compile=false")
    if not compile_s >= 0:
        raise ConfigError("compile_rule.compile_s", f"compile_s={compile_s:g} must be >= 0 seconds")
    if isinstance(decide_after, bool) or not isinstance(decide_after, int) or decide_after < 2:
        raise ConfigError("compile_rule.decide_after", f"decide_after={decide_after!r} must be a whole number >= 2 "
                          "(eager steps timed first; the first is warm-up)")
    return CompileRule(speedup, compile_s, decide_after)


def resolve_compile(cfg: Mapping[str, Any]) -> str:
    """``compile``: ``on`` (true), ``off`` (false) or ``auto`` (decided during the run by :class:`CompileRule`)."""
    value = cfg.get("compile", "auto")
    if value == "auto":
        return "auto"
    return "on" if bool(value) else "off"


def pick_device(name: str = "auto") -> "torch.device":
    """``auto`` -> cuda if available, else cpu; or the named device."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", f"device={name} but no CUDA device is visible; use device=cpu or device=auto")
    return torch.device(name)


def autocast(device: "torch.device", precision: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast for ``bf16-mixed`` (and for ``auto`` where :func:`choose_precision` picks it), otherwise full precision."""
    import torch

    if precision == "auto":
        precision = resolve_precision({"accelerator": device.type, "precision": "auto"})
    if precision.startswith("bf16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision not in ("32-true", "32"):
        raise ConfigError("precision", f"precision={precision!r}; use auto, 32-true or bf16-mixed")
    return contextlib.nullcontext()


def sync(device: "torch.device") -> None:
    """Wait for the device's queued work (timing); a no-op on CPU."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


# glibc's mallopt parameters (<malloc.h>)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: blocks up to this size come from the process heap and stay there when freed
HOST_MALLOC_KEEP_BYTES = 1 << 30
#: a user's own allocator settings, which ``malloc_reuse=auto`` leaves alone
HOST_MALLOC_USER_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")


class HostMallocChoice(NamedTuple):
    applied: bool
    reason: str


@functools.cache
def _set_glibc_thresholds(keep_bytes: int) -> bool:
    """Raise glibc's mmap and trim thresholds once per process; False if mallopt refuses."""
    libc = ctypes.CDLL(None)  # the C library this process already uses
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, keep_bytes)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, keep_bytes))


def reuse_host_memory(value: Any, device_type: str) -> HostMallocChoice:
    """``malloc_reuse``: let glibc keep freed host memory in the process for the next training step.

    A CPU step frees and allocates the same large buffers every step (activations, logits,
    gradients: MBs to tens of MBs each). glibc serves blocks above its mmap threshold (adaptive,
    32 MiB at most) from fresh ``mmap`` pages and hands free heap tops back to the OS, so every step
    page-faults the same memory in again. Raising both thresholds to :data:`HOST_MALLOC_KEEP_BYTES`
    makes those blocks reusable (``python -m sectional_moe.bench.allocator`` measures the gain per
    job shape: ``docs/bench/allocator.md``). The cost is host memory: kept blocks fragment the heap,
    so the peak RSS can be higher (up to +29 % in that benchmark), and memory goes back to the OS
    only when the process exits; ``malloc_reuse=false`` where host RAM is what limits a run.

    ``auto``: on for CPU runs with glibc unless the user set their own allocator (one of
    :data:`HOST_MALLOC_USER_ENV`: ``LD_PRELOAD`` of jemalloc/tcmalloc, glibc's ``MALLOC_*_`` /
    ``GLIBC_TUNABLES``); off on GPU runs (the CUDA caching allocator already reuses device memory).
    ``true`` applies it wherever glibc is found; ``false`` leaves malloc alone.
    """
    if value is False or (value == "auto" and device_type != "cpu"):
        return HostMallocChoice(False, "malloc_reuse=false" if value is False else f"{device_type} run")
    if value == "auto":
        user = [k for k in HOST_MALLOC_USER_ENV if os.environ.get(k)]
        if user:
            return HostMallocChoice(False, f"left to the user's allocator settings ({', '.join(user)})")
    if platform.libc_ver()[0] != "glibc":
        return HostMallocChoice(False, f"not glibc ({platform.system()} {platform.libc_ver()[0] or 'libc'}): nothing to tune")
    if not _set_glibc_thresholds(HOST_MALLOC_KEEP_BYTES):
        return HostMallocChoice(False, "glibc's mallopt refused the thresholds")
    return HostMallocChoice(True, f"glibc keeps freed blocks up to {HOST_MALLOC_KEEP_BYTES >> 20} MiB (mmap and trim thresholds)")
