"""The OmegaConf resolvers our configs use, registered by :func:`register` (never on import).

========================  ========================================================  ==================================
resolver                  value                                                     used in
========================  ========================================================  ==================================
``smoe.run_key``          run directory name: overrides + seed                      conf/hydra/default.yaml
``smoe.run_name``         run name: overrides                                       (configs that name a run)
``smoe.group``            sweep directory and W&B group                             conf/hydra/default.yaml
``smoe.div``              exact integer division                                    size/model presets
``smoe.slurm_tasks``      SLURM tasks per node = trainer devices                    conf/hydra/launcher/slurm.yaml
``smoe.slurm_gpus``       GPUs per node when the trainer uses GPUs                  conf/hydra/launcher/*.yaml
========================  ========================================================  ==================================

The entry points call :func:`register` before Hydra composes a config: ``train.py``,
``evaluate.py``, the launchers' job side, the studies' composer and the test fixtures.

Imports: :mod:`sectional_moe.runs.identity`, :mod:`sectional_moe.errors` (torch-free).
"""

from __future__ import annotations

import sys
from typing import Any

from omegaconf import OmegaConf

from sectional_moe.errors import ConfigError
from sectional_moe.runs.identity import int_div, run_key, run_name, sweep_group


def slurm_tasks_per_node(devices: Any) -> int:
    """``hydra.launcher.tasks_per_node``: one SLURM task (process) per device of the trainer.

    A count SLURM cannot use (``auto``, ``-1``) is a user error met while Hydra builds the
    launcher, where a raised error would come out as a long OmegaConf traceback; so this prints
    the one-line error and exits 2 itself (SystemExit passes through OmegaConf and Hydra).
    """
    if isinstance(devices, (list, tuple)) or (hasattr(devices, "__len__") and not isinstance(devices, str)):
        return len(devices)  # an explicit device list, e.g. [0, 1]
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        err = ConfigError("trainer.devices", f"devices={devices!r}: SLURM needs the number of devices per node; "
                          "pass e.g. trainer.devices=4 (one task per device)")
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    return devices


def slurm_gpus_per_node(accelerator: Any, devices: Any) -> int | None:
    """``hydra.launcher.gpus_per_node``: the trainer's devices when it trains on GPUs, else none."""
    if str(accelerator) in ("gpu", "cuda"):
        return slurm_tasks_per_node(devices)
    return None


RESOLVERS = {
    "smoe.run_key": run_key,
    "smoe.run_name": run_name,
    "smoe.group": sweep_group,
    "smoe.div": int_div,
    "smoe.slurm_tasks": slurm_tasks_per_node,
    "smoe.slurm_gpus": slurm_gpus_per_node,
}


def register() -> None:
    """Register every resolver of :data:`RESOLVERS` (idempotent)."""
    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
