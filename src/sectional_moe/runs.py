"""Run identity: deterministic directories, W&B ids, names and groups.

A run's output directory, its W&B id and its name are all derived from the same key (the
command-line overrides and the seed), never from a timestamp. So two jobs of a sweep never
collide, and a job restarted after a crash or a SLURM requeue finds its own checkpoint and
continues the same W&B run.

The OmegaConf resolvers used by ``conf/hydra/default.yaml`` are registered on import.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Iterable

from omegaconf import OmegaConf

# overrides that change where or how a run is logged, not what it computes
NON_IDENTITY_KEYS = {"seed", "group", "logger", "hydra/launcher", "tags", "resume", "force", "task_name"}
NON_IDENTITY_PREFIXES = ("hydra.", "paths.", "logger.", "callbacks.progress", "trainer.enable_progress_bar")
MAX_NAME_LEN = 120


def override_key(override: str) -> str:
    """``+trainer.max_steps=5`` -> ``trainer.max_steps``."""
    return override.split("=", 1)[0].lstrip("+~")


def is_identity_override(override: str) -> bool:
    key = override_key(override)
    return key not in NON_IDENTITY_KEYS and not key.startswith(NON_IDENTITY_PREFIXES)


def _safe(text: str) -> str:
    from sectional_moe.loggers import redact_text  # at call time: loggers imports this module

    text = redact_text(text)  # an ${oc.env:...} override must not put a secret in a path
    text = re.sub(r"[^A-Za-z0-9=,._+\-\[\]]", "_", text)
    if len(text) > MAX_NAME_LEN:  # keep it readable and unique
        digest = hashlib.sha1(text.encode()).hexdigest()[:8]
        text = f"{text[: MAX_NAME_LEN - 9]}-{digest}"
    return text


def run_name(override_dirname: str) -> str:
    """Human name of a run from its overrides: ``experts=8,routing=hash`` (``default`` if none)."""
    return _safe(override_dirname) if override_dirname else "default"


def run_key(override_dirname: str, seed: int | str) -> str:
    """Directory name of a run: its overrides plus the seed, e.g. ``experts=8,routing=hash,seed=0``."""
    return _safe(f"{override_dirname},seed={seed}" if override_dirname else f"seed={seed}")


def sweep_group(group: str | None, task_overrides: Iterable[str]) -> str:
    """W&B group and sweep directory of a multirun: ``group`` if set, else ``sweep-<swept keys>``.

    The name depends only on the override *keys*, because Hydra resolves the sweep directory
    again inside each job, where ``experts=4,8,16`` has become ``experts=4``.
    """
    if group:
        return _safe(str(group))
    keys = sorted({override_key(o).replace("/", "-") for o in task_overrides if is_identity_override(o)})
    return _safe("sweep-" + "-".join(keys)) if keys else "sweep"


def wandb_run_id(task_name: str, group: str | None, key: str) -> str:
    """Deterministic W&B id: the same run key always resumes the same W&B run."""
    return hashlib.sha1(f"{task_name}|{group or ''}|{key}".encode()).hexdigest()[:16]


def wandb_api_key_configured() -> bool:
    """True if W&B has an API key: ``WANDB_API_KEY`` or a netrc entry for api.wandb.ai."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def resolve_wandb_mode(mode: str) -> str:
    """``auto`` -> ``online`` with an API key, else ``offline`` (sync later with ``wandb sync``)."""
    if mode == "auto":
        return "online" if wandb_api_key_configured() else "offline"
    return mode


def int_div(a: int, b: int) -> int:
    """``${smoe.div:${size.d_ff},${experts}}``: exact integer division for configs (errors if inexact)."""
    a, b = int(a), int(b)
    if b <= 0 or a % b:
        raise ValueError(f"smoe.div: {a} is not divisible by {b}")
    return a // b


def register_resolvers() -> None:
    for name, fn in (("smoe.run_key", run_key), ("smoe.run_name", run_name), ("smoe.group", sweep_group),
                     ("smoe.div", int_div)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()
