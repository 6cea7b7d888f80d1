"""Lightning callbacks: metrics (throughput, MFU, memory, expert load), run safety (NaN guard,
preemption and interrupts), progress in steps (``progress``) and threads that follow the load (``threads``)."""

from sectional_moe.callbacks.expert_load import ExpertLoadMonitor

__all__ = ["ExpertLoadMonitor"]

from sectional_moe.callbacks.memory import MemoryMonitor  # noqa: E402
from sectional_moe.callbacks.throughput import SpeedMonitor  # noqa: E402
from sectional_moe.callbacks.wandb_summary import WandbSummary  # noqa: E402

__all__ += ["MemoryMonitor", "SpeedMonitor", "WandbSummary"]

from sectional_moe.callbacks.nan_guard import NanGuard, NonFiniteError  # noqa: E402

__all__ += ["NanGuard", "NonFiniteError"]
