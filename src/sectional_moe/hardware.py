"""Peak FLOP/s of the device a run trains on: the denominator of MFU.

Three sources, in order of precedence (:func:`peak_flops` returns the value and which one won):

1. ``override``: ``hardware.peak_tflops`` from the config (dense TFLOP/s per device);
2. ``table:<name>``: a CUDA device found in :data:`GPU_PEAKS` by its ``torch.cuda.get_device_name()``;
3. ``cpu-probe:<file>``: on CPU, the best rate of a matmul probe at the training dtype
   (:func:`cpu_probe`), cached per machine, thread count and dtype as JSON under
   ``{cache_dir}/hardware/<hostname>-<cpu model hash>.json``.

A CPU probe taken while other processes compete for the cores measures a fraction of the peak and
inflates every MFU computed from it (a loaded probe once gave committed results an MFU of ~0.9).
So each cache entry records the cores other processes kept busy during the probe (from
``/proc/stat``; the 1-minute load average where that is missing, which also counts this process's
own recent work), the usable cores and the thread count it was measured with, and an entry taken
under load (:func:`heavy_load`) is *not trusted*: the
next run probes again and keeps the better of the two measurements (a peak can only be
under-measured), until a probe on a quiet machine settles it.

Anything else (an unknown GPU name, MPS, fp64) is ``unknown`` with no peak: no MFU is logged rather
than a wrong one (ecosystem.md pitfalls P9/P10).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import socket
import time
from pathlib import Path
from typing import NamedTuple

import torch

from sectional_moe.errors import ConfigError
from sectional_moe.files import atomic_write

log = logging.getLogger(__name__)

TFLOPS = 1e12

# Dense peak TFLOP/s per device, from NVIDIA/AMD datasheets and architecture whitepapers.
# Convention: DENSE tensor-core rates (never the 2:4-sparsity figures that datasheets print first,
# which are exactly 2x), with FP32 accumulation, as PyTorch's bf16/fp16 matmuls use;
# "tf32" is the dense TF32 tensor-core rate, "fp32" the plain CUDA-core FP32 rate.
# None = the dtype has no tensor-core path on that device (e.g. bf16 on V100/T4): no MFU.
GPU_PEAKS: dict[str, dict[str, float | None]] = {
    # Blackwell: HGX B200 datasheet (8-GPU totals / 8, sparse figures halved)
    "b200": {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1125.0, "fp32": 75.0},
    # Hopper: H100 datasheet; H200 and GH200 have the H100 SXM compute (more/faster memory only)
    "h100-sxm": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "h100-pcie": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "h100-nvl": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "h200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "h200-nvl": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    # Ada: Ada architecture whitepaper v2.1 and the L4 / L40S datasheets
    "l40s": {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6},
    "l40": {"bf16": 181.0, "fp16": 181.0, "tf32": 90.5, "fp32": 90.5},
    "l4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "rtx-6000-ada": {"bf16": 364.2, "fp16": 364.2, "tf32": 182.1, "fp32": 91.1},
    "rtx-4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},
    # Ampere: A100 datasheet (SXM and PCIe have the same rates; A800 is an export A100); A10, A30
    # and A40 datasheets (AWS's A10G has no NVIDIA datasheet: the A10 figures, as Lightning uses);
    # GA102 whitepaper for the RTX cards (GeForce: half-rate FP32 accumulation)
    "a100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "a10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "a30": {"bf16": 165.0, "fp16": 165.0, "tf32": 82.0, "fp32": 10.3},
    "a40": {"bf16": 149.7, "fp16": 149.7, "tf32": 74.8, "fp32": 37.4},
    "rtx-a6000": {"bf16": 154.8, "fp16": 154.8, "tf32": 77.4, "fp32": 38.7},
    "rtx-3090": {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6},
    # Volta / Turing: no bf16 and no tf32 tensor cores
    "v100-sxm": {"bf16": None, "fp16": 125.0, "tf32": None, "fp32": 15.7},
    "v100-pcie": {"bf16": None, "fp16": 112.0, "tf32": None, "fp32": 14.0},
    "t4": {"bf16": None, "fp16": 65.0, "tf32": None, "fp32": 8.1},
    # AMD (ROCm reports through torch.cuda): MI300X datasheet, dense matrix rates
    "mi300x": {"bf16": 1307.4, "fp16": 1307.4, "tf32": 653.7, "fp32": 163.4},
}

# (pattern on the lower-cased device name, table key); the first match wins, so the more specific
# names come first ("h100 ... nvl" before "h100", "a100" can never match the "a10" rule)
_NAME_PATTERNS: list[tuple[str, str]] = [
    (r"\bb200\b", "b200"),
    (r"\bgh200\b", "h100-sxm"),
    (r"\bh200\b.*\bnvl\b", "h200-nvl"),
    (r"\bh200\b", "h200"),
    (r"\bh[18]00\b.*\bnvl\b", "h100-nvl"),
    (r"\bh[18]00\b.*\bpcie\b", "h100-pcie"),
    (r"\bh[18]00\b", "h100-sxm"),  # 'NVIDIA H100 80GB HBM3' is the SXM part
    (r"\bl40s\b", "l40s"),
    (r"\bl40\b", "l40"),
    (r"\bl4\b", "l4"),
    (r"\brtx 6000 ada\b", "rtx-6000-ada"),
    (r"\brtx 4090\b", "rtx-4090"),
    (r"\ba[18]00\b", "a100"),
    (r"\ba30\b", "a30"),
    (r"\ba40\b", "a40"),
    (r"\ba10g?\b", "a10"),
    (r"\brtx a6000\b", "rtx-a6000"),
    (r"\brtx 3090\b", "rtx-3090"),
    (r"\bv100\b.*\bpcie\b", "v100-pcie"),
    (r"\bv100\b", "v100-sxm"),
    (r"\bt4\b", "t4"),
    (r"\bmi300x\b", "mi300x"),
]

# The CPU probe multiplies (M x K) @ (K x N) with M = K = N = 1024 (2.1 GFLOP): large enough that
# BLAS reaches its sustained rate on any core count (512 was not, at 2 threads), about the size of
# the largest GEMMs of the small-base presets. It runs PROBE_ROUNDS rounds of PROBE_SECONDS each;
# a round's rate is its median matmul, the probe's the best round, so a burst of load costs at
# most a round. With matmuls slower than a round (bf16 emulated without AVX512-BF16/AMX, ~1
# GFLOP/s: 2 s each) the probe stops after PROBE_MAX_SECONDS.
PROBE_SHAPE = (1024, 1024, 1024)
PROBE_SECONDS = 0.3  # timed budget per round
PROBE_ROUNDS = 5
PROBE_MIN_REPS = 1  # matmuls per round at least
PROBE_MAX_SECONDS = 6.0
# load (beyond the probe's own threads) tolerated on the usable cores before a probe is not trusted
LOAD_SLACK = 0.5
# plausible CPU matmul rates per thread (a sanity check only: outside, the probe result is warned about)
PLAUSIBLE_GFLOPS_PER_THREAD = (0.5, 2000.0)


class Peak(NamedTuple):
    """A device's peak: FLOP/s per device (None when unknown) and where the number came from."""

    flops_per_s: float | None
    source: str  # override | table:<name> | cpu-probe:<file> | unknown


def lookup_gpu(device_name: str) -> str | None:
    """Table key of a CUDA device name (``'NVIDIA A100-SXM4-80GB'`` -> ``'a100'``), None if unknown."""
    name = device_name.lower().replace("_", " ")
    for pattern, key in _NAME_PATTERNS:
        if re.search(pattern, name):
            return key
    return None


def matmul_dtype(precision: str) -> str:
    """The dtype matmuls run in under a Lightning ``precision`` string: bf16 | fp16 | tf32 | fp32 | fp64.

    fp32 becomes tf32 when PyTorch allows TF32 matmuls (``torch.set_float32_matmul_precision``
    other than ``"highest"``), as the tensor cores then run them.
    """
    p = str(precision)
    if p.startswith("bf16"):
        return "bf16"
    if p.startswith("16"):
        return "fp16"
    if p.startswith("64"):
        return "fp64"
    return "tf32" if torch.get_float32_matmul_precision() != "highest" else "fp32"


def gpu_peak(device_name: str, dtype: str) -> Peak:
    """Peak of a CUDA device from :data:`GPU_PEAKS`; ``unknown`` for an unlisted device or dtype."""
    key = lookup_gpu(device_name)
    if key is None:
        return Peak(None, "unknown")
    row = GPU_PEAKS[key]
    tflops = row.get(dtype)
    if tflops is None and dtype == "tf32":  # no TF32 tensor cores: fp32 matmuls run on CUDA cores
        tflops = row.get("fp32")
    return Peak(tflops * TFLOPS, f"table:{key}") if tflops else Peak(None, "unknown")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def probe_cache_file(cache_dir: str | os.PathLike) -> Path:
    """``{cache_dir}/hardware/<hostname>-<cpu model hash>.json``."""
    digest = hashlib.sha1(cpu_model().encode()).hexdigest()[:10]
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"
    return Path(cache_dir) / "hardware" / f"{host}-{digest}.json"


_TORCH_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def measure_matmul_flops(dtype: str, shape: tuple[int, int, int] = PROBE_SHAPE, seconds: float = PROBE_SECONDS,
                         min_reps: int = PROBE_MIN_REPS, rounds: int = PROBE_ROUNDS,
                         max_seconds: float = PROBE_MAX_SECONDS) -> float:
    """Best-round FLOP/s of CPU matmuls of ``shape`` (M, K, N) in ``dtype`` (see PROBE_SHAPE)."""
    M, K, N = shape
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(M, K, generator=gen).to(_TORCH_DTYPES[dtype])
    b = torch.randn(K, N, generator=gen).to(_TORCH_DTYPES[dtype])
    torch.mm(a, b)  # warm-up: thread pool start, packing buffers
    best, probe_start = float("inf"), time.perf_counter()
    for _ in range(max(1, rounds)):
        times, start = [], time.perf_counter()
        while len(times) < min_reps or time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
        best = min(best, sorted(times)[len(times) // 2])  # the round's median matmul
        if time.perf_counter() - probe_start > max_seconds:
            break
    return 2.0 * M * K * N / best


def usable_cores() -> int:
    """CPUs this process may run on (affinity / cgroup cpuset, as SLURM sets), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_times(cores: set[int] | None) -> tuple[float, float] | None:
    """(busy, total) jiffies of the CPUs in ``cores`` (all if None) from ``/proc/stat``; steal counts as busy."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    busy = total = 0.0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or not fields:
            continue
        if cores is not None and int(name[3:]) not in cores:
            continue
        values = [float(v) for v in fields[:8]] + [0.0] * max(0, 8 - len(fields))
        idle = values[3] + values[4]  # idle + iowait
        total += sum(values[:8])
        busy += sum(values[:8]) - idle
    return (busy, total) if total > 0 else None


def _self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuLoadMeter:
    """Cores kept busy by *other* processes between two :meth:`sample` calls: the busy time of this
    process's CPUs (``/proc/stat``) minus this process's own CPU time (threads included)."""

    def __init__(self) -> None:
        try:
            self.cores: set[int] | None = set(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            self.cores = None
        self._last = self._read()

    def _read(self) -> tuple[float, float, float, float] | None:
        times = _cpu_times(self.cores)
        if times is None:
            return None
        return times[0], times[1], _self_cpu_s(), time.monotonic()

    def sample(self) -> float | None:
        """Foreign busy cores since the previous sample (None where /proc/stat is missing)."""
        now = self._read()
        last, self._last = self._last, now
        if now is None or last is None or now[1] <= last[1]:
            return None
        ncpu = len(self.cores) if self.cores else (os.cpu_count() or 1)
        busy_cores = (now[0] - last[0]) / (now[1] - last[1]) * ncpu
        own_cores = (now[2] - last[2]) / max(1e-6, now[3] - last[3])
        return max(0.0, busy_cores - own_cores)


def threads_for_load(foreign_busy: float, cores: int, slack: float = 0.75) -> int:
    """Intra-op threads for ``cores`` cores of which ``foreign_busy`` are kept busy by other
    processes: one per idle core (a core counts as idle while less than ``1 - slack`` of it is
    busy: a quarter at start-up; while our own threads compete for the cores, a foreign process
    gets less than it wants, so the in-run check uses a smaller slack).

    OpenMP threads spin-wait for each other at every parallel region: a thread that shares its core
    with a foreign process stalls all the others, so a 2-thread step on a 2-core machine with one
    foreign job runs slower than a 1-thread step (README, Performance).
    """
    return max(1, min(cores, int(cores - foreign_busy + slack)))


def auto_threads(sample_s: float = 0.5) -> tuple[int, str]:
    """Threads for a CPU run started now, measured over ``sample_s`` seconds, and a note saying why.

    ``OMP_NUM_THREADS`` in the environment wins (a launcher or the user chose).
    """
    cores = usable_cores()
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env), f"OMP_NUM_THREADS={env}"
    meter = CpuLoadMeter()
    time.sleep(sample_s)
    busy = meter.sample()
    if busy is None:
        load = load_average()
        busy = 0.0 if load is None else load
        source = "load average"
    else:
        source = f"measured over {sample_s:g} s"
    n = threads_for_load(busy, cores)
    return n, f"auto: {busy:.1f} of {cores} cores busy with other work ({source})"


def load_average() -> float | None:
    """The 1-minute load average (runnable processes), None where the OS has none (Windows)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def heavy_load(load: float | None, cores: int, threads: int) -> bool:
    """Would a probe with ``threads`` threads share its cores with other work?

    True when the load average exceeds the cores the probe leaves idle (+ :data:`LOAD_SLACK`). The
    1-minute average also counts this process's own recent work (e.g. tokenising data), so it can
    flag a quiet machine as loaded: the cost is one more probe, never a wrong peak.
    An unknown load (no ``getloadavg``) is not heavy: nothing better can be done.
    """
    return load is not None and load > max(0, cores - threads) + LOAD_SLACK


def _trusted(entry: dict, threads: int) -> bool:
    """A cache entry measured with this probe, at this thread count, on a quiet machine."""
    return (entry.get("shape") == list(PROBE_SHAPE) and entry.get("threads") == threads
            and "loadavg_1m" in entry and entry.get("under_load") is False)


def cpu_probe(dtype: str, cache_dir: str | os.PathLike | None) -> Peak:
    """Measured CPU peak for ``dtype`` at the current thread count, cached per machine.

    The cache holds one entry per ``<dtype>@<threads>threads``, so changing ``torch.set_num_threads``
    or the precision probes again once. An entry is reused only if it is trusted (:func:`_trusted`:
    same probe shape and thread count, recorded on a quiet machine); otherwise the probe runs again
    and the entry keeps the best of the old and new rates. Without a ``cache_dir`` the probe runs
    and is not stored.
    """
    if dtype not in _TORCH_DTYPES:
        return Peak(None, "unknown")
    dtype = "fp32" if dtype == "tf32" else dtype  # CPUs have no TF32
    threads = torch.get_num_threads()
    entry = f"{dtype}@{threads}threads"
    path = probe_cache_file(cache_dir) if cache_dir is not None else None
    cached: dict = {}
    old: dict = {}
    if path is not None and path.is_file():
        try:
            cached = json.loads(path.read_text())
        except (OSError, ValueError):
            cached = {}  # a corrupt cache is re-measured, never trusted
        old = cached.get("probes", {}).get(entry) or {}
        if _trusted(old, threads):
            return Peak(float(old["flops_per_s"]), f"cpu-probe:{path}")
    cores, load = usable_cores(), load_average()
    meter = CpuLoadMeter()
    flops = measure_matmul_flops(dtype)
    foreign = meter.sample()
    # the load average also counts this process's own recent work (a first run's tokenising, the
    # pip install before it); the other processes' CPU time during the probe is the better witness
    loaded = heavy_load(load if foreign is None else foreign, cores, threads)
    comparable = old.get("shape") == list(PROBE_SHAPE) and old.get("threads") == threads
    kept = max(flops, float(old["flops_per_s"])) if comparable and "flops_per_s" in old else flops
    _log_probe(dtype, flops, kept, threads, cores, load, loaded)
    if path is None:
        return Peak(kept, "cpu-probe:uncached")
    cached.setdefault("cpu_model", cpu_model())
    cached.setdefault("hostname", socket.gethostname())
    cached.setdefault("probes", {})[entry] = {
        "flops_per_s": kept, "last_probe_flops_per_s": flops, "shape": list(PROBE_SHAPE), "threads": threads,
        "cores": cores, "loadavg_1m": load, "foreign_busy_cores": foreign, "under_load": loaded, "torch": torch.__version__,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic_write(path, json.dumps(cached, indent=1, sort_keys=True))  # concurrent jobs read it
    return Peak(kept, f"cpu-probe:{path}")


def _log_probe(dtype: str, flops: float, kept: float, threads: int, cores: int, load: float | None, loaded: bool) -> None:
    """One line per probe, a warning when the number is suspect (loaded machine, implausible rate)."""
    lo, hi = PLAUSIBLE_GFLOPS_PER_THREAD
    per_thread = flops / 1e9 / max(1, threads)
    msg = (f"CPU peak probe: {flops / 1e9:.1f} GFLOP/s {dtype} ({per_thread:.1f} per thread) at {threads} threads on "
           f"{cores} cores, load average {'n/a' if load is None else f'{load:.2f}'}; MFU denominator {kept / 1e9:.1f} GFLOP/s")
    if loaded:
        log.warning("%s. The machine is busy: the probe may under-measure the peak (MFU overstated); "
                    "it is not trusted and runs again next time (or set hardware.peak_tflops).", msg)
    elif not lo <= per_thread <= hi:
        log.warning("%s. Implausible per-thread rate (expected %.1f-%.0f GFLOP/s); set hardware.peak_tflops "
                    "if MFU looks wrong.", msg, lo, hi)
    else:
        log.info(msg)


def peak_flops(device: torch.device | str, precision: str = "32-true", *, override_tflops: float | None = None,
               cache_dir: str | os.PathLike | None = None, device_name: str | None = None) -> Peak:
    """Peak FLOP/s per device for MFU and its source (see the module docstring).

    Args:
        device: the training device (``trainer.strategy.root_device``).
        precision: Lightning precision string; picks the bf16 / fp16 / tf32 / fp32 column.
        override_tflops: ``hardware.peak_tflops``; wins over everything when set.
        cache_dir: where the CPU probe is cached (``paths.cache_dir``).
        device_name: CUDA device name; default ``torch.cuda.get_device_name(device)``.
    """
    if override_tflops is not None:
        if isinstance(override_tflops, bool) or not isinstance(override_tflops, (int, float)) or override_tflops <= 0:
            raise ConfigError("hardware.peak_tflops", f"peak_tflops={override_tflops!r} must be a number > 0 "
                              "(dense TFLOP/s per device), or null to use the table / CPU probe")
        return Peak(float(override_tflops) * TFLOPS, "override")
    device = torch.device(device)
    dtype = matmul_dtype(precision)
    if device.type == "cuda":
        name = device_name if device_name is not None else torch.cuda.get_device_name(device)
        return gpu_peak(name, dtype)
    if device.type == "cpu":
        return cpu_probe(dtype, cache_dir)
    return Peak(None, "unknown")
