"""A run's start-up chores, before any data or model: secrets, Hydra's record, threads, quiet output,
the printed config, and SIGTERM before training.

* :func:`register_run_secrets`: the values of secret-named keys (``+hf_token=...`` on the command
  line, ``api_key`` in ``conf/local``) become secrets redacted everywhere, log records are redacted
  as they are made, and ``sys.argv`` (which W&B records as the run's command line) is redacted.
* :func:`hydra_record`: the texts Hydra would have written to ``.hydra/`` (``hydra.output_subdir``
  is null); ``train`` writes them once the run is accepted, so a refused launch changes nothing.
* :func:`choose_threads`: ``threads=auto`` on CPU = one thread per idle core, measured now.
* :func:`quiet_output`: Lightning's messages once (not twice), no ``srun``/litlogger hints; in a
  sweep job also no model summary and no Lightning info lines.
* :func:`config_text`: the resolved config as printed at start (``print_config``).
* :func:`terminate_on_sigterm`: outside SLURM, SIGTERM before training raises
  :class:`Terminated` (status ``interrupted``, exit 143) instead of killing the process silently.

Imports: omegaconf, hydra, :mod:`sectional_moe.secrets`, :mod:`sectional_moe.runs.identity`,
:mod:`sectional_moe.hardware`, :mod:`sectional_moe.env`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import sys
import warnings
from typing import Any, Iterator

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sectional_moe import env
from sectional_moe.runs.identity import flatten
from sectional_moe.secrets import (
    REDACTED, is_secret_key, redact_argv, redact_log_records, redact_text, register_config_secrets, register_override_secrets,
)

log = logging.getLogger("sectional_moe")

EXIT_SIGTERM = 143  # 128 + SIGTERM
EXIT_SIGINT = 130  # 128 + SIGINT

#: messages that say nothing actionable to a user of this framework
NOISE = (r".*isinstance\(treespec, LeafSpec\).*",  # Lightning 2.6 x torch 2.13 deprecation
         r".*The `srun` command is available on your system but is not used.*",
         r".*litlogger.*", r".*The anonymous setting has no effect.*")


class Terminated(BaseException):
    """SIGTERM received before training started (outside SLURM): the run stops as ``interrupted``."""

    exit_code = EXIT_SIGTERM


def register_run_secrets(cfg: DictConfig) -> None:
    """Secret-named values of the command line and the config become secrets from now on."""
    if HydraConfig.initialized():
        register_override_secrets(str(o) for o in HydraConfig.get().overrides.task)
    container = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    register_config_secrets(flatten(container))
    redact_log_records()
    if env.is_rank_zero():
        redact_argv(sys.argv)  # W&B records sys.argv as the run's command line


def hydra_record(cfg: DictConfig) -> dict[str, str]:
    """``.hydra/{config,hydra,overrides}.yaml`` as Hydra writes them (unresolved), or {} outside Hydra."""
    if not HydraConfig.initialized():
        return {}
    hydra_cfg = HydraConfig.instance().cfg
    assert hydra_cfg is not None
    return {"config.yaml": OmegaConf.to_yaml(cfg), "hydra.yaml": OmegaConf.to_yaml(hydra_cfg),
            "overrides.yaml": OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task)}


def is_multirun() -> bool:
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def choose_threads(value: Any, device: str) -> tuple[int | None, str]:
    """Intra-op threads for this run: None (leave torch's default) on GPU; N as given; on CPU with
    ``auto``, one per core that other processes leave idle (``OMP_NUM_THREADS`` wins)."""
    if device != "cpu":
        return None, "GPU run"
    if value != "auto":
        return int(value), f"threads={value}"
    from sectional_moe.hardware import auto_threads

    return auto_threads()


class _DropNoise(logging.Filter):
    """Drops log records matching :data:`NOISE` (Lightning logs its litlogger tip, it does not warn it)."""

    def __init__(self) -> None:
        super().__init__()
        self.patterns = [re.compile(p, re.DOTALL) for p in NOISE]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.match(message) for p in self.patterns)


def quiet_output(multirun: bool) -> None:
    """Each Lightning message once, no hints that do not apply; in a sweep job only warnings."""
    for pattern in NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    noise = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropNoise) for f in noise.filters):
        noise.addFilter(_DropNoise())
    root_has_handlers = logging.getLogger().hasHandlers()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        if root_has_handlers:  # Hydra's handlers print and file the record: Lightning's own console is a duplicate
            for handler in list(lg.handlers):
                if type(handler) is logging.StreamHandler:
                    lg.removeHandler(handler)
            lg.propagate = True
        lg.setLevel(logging.WARNING if multirun else logging.INFO)


def print_config_enabled(value: Any, multirun: bool) -> bool:
    return (not multirun) if value == "auto" else bool(value)


def _redacted(node: Any, key: str = "") -> Any:
    if isinstance(node, dict):
        return {k: _redacted(v, str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_redacted(v, key) for v in node]
    if isinstance(node, str):
        return REDACTED if node and is_secret_key(key) else redact_text(node)
    return node


def config_text(cfg: DictConfig) -> str:
    """The resolved config (secrets redacted), as printed at start."""
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    return OmegaConf.to_yaml(OmegaConf.create(_redacted(container))).rstrip()


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Outside SLURM: SIGTERM raises :class:`Terminated` until the block ends (SLURM jobs keep
    their own handling: ``callbacks.preemption``). Training replaces the handler with its own
    (checkpoint first, then stop)."""
    if env.in_slurm_job() or signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
