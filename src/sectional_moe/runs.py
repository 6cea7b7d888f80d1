"""Run identity: deterministic directories, W&B ids, names and groups.

A run's output directory and its name are derived from the same key (the command-line
overrides and the seed), never from a timestamp, so two jobs of a sweep never collide and a job
restarted after a crash or a SLURM requeue finds its own directory. Its W&B id is drawn once and
kept in that directory (``wandb_id``), so the restarted job continues the same W&B run.

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


def is_identity_key(key: str) -> bool:
    """A flat config key (``trainer.max_steps``) that changes what a run computes."""
    if key.startswith("callbacks.nan_guard."):  # its skip policy changes the training
        return True
    # measurement callbacks and the MFU denominator do not change what is computed
    return (key not in NON_IDENTITY_KEYS and not key.startswith(NON_IDENTITY_PREFIXES + ("hardware.", "callbacks."))
            and key not in ("train", "test"))


IDENTITY_FILE = "run_config.json"  # the identity config of a finished run, next to its DONE marker
WANDB_ID_FILE = "wandb_id"  # the W&B run id of this directory, drawn once and reused by every restart
ARCHIVED = ("checkpoints", "csv", "wandb", "metrics.json", "status.json", "DONE", IDENTITY_FILE, "expert_load.json",
            WANDB_ID_FILE)


def record_identity_config(run_dir: Path, identity: dict) -> None:
    """Write the identity config of a finished run (compared when the directory is reused)."""
    import json

    tmp = Path(run_dir) / f".{IDENTITY_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(identity, indent=1, sort_keys=True, default=str))
    os.replace(tmp, Path(run_dir) / IDENTITY_FILE)


def changed_identity_keys(run_dir: Path, identity: dict, limit: int = 6) -> list[str]:
    """Keys whose value differs between ``identity`` and the finished run in ``run_dir``, as
    ``key: old -> new`` (at most ``limit``); [] if equal or if the run recorded no config."""
    import json

    try:
        saved = json.loads((Path(run_dir) / IDENTITY_FILE).read_text())
    except (OSError, ValueError):
        return []  # a run from before this check: nothing to compare against
    new = json.loads(json.dumps(identity, default=str))  # the same JSON round trip as the saved copy
    keys = sorted(k for k in set(saved) | set(new) if saved.get(k) != new.get(k))
    return [f"{k}: {saved.get(k)!r} -> {new.get(k)!r}" for k in keys[:limit]] + (["..."] if len(keys) > limit else [])


def archive_outputs(run_dir: Path) -> Path | None:
    """Move a run directory's previous outputs into ``replaced/<n>/`` (``force=true``); the
    Hydra config and log of the current launch stay. Returns the archive, or None if nothing moved."""
    run_dir = Path(run_dir)
    present = [run_dir / name for name in ARCHIVED if (run_dir / name).exists()]
    if not present:
        return None
    n = 0
    while (run_dir / "replaced" / str(n)).exists():
        n += 1
    dest = run_dir / "replaced" / str(n)
    dest.mkdir(parents=True)
    for path in present:
        os.replace(path, dest / path.name)
    return dest


def wandb_run_id(task_name: str, group: str | None, key: str) -> str:
    """The id derived from the run key alone: what runs made before :func:`run_dir_wandb_id`
    used, and the fallback a report uses for a directory without a ``wandb_id`` file."""
    return hashlib.sha1(f"{task_name}|{group or ''}|{key}".encode()).hexdigest()[:16]


def recorded_wandb_id(run_dir: Path) -> str | None:
    """The W&B id a run directory recorded, if any."""
    try:
        return (Path(run_dir) / WANDB_ID_FILE).read_text().strip() or None
    except OSError:
        return None


def run_dir_wandb_id(run_dir: Path, key_id: str, *, create: bool = True) -> str:
    """The W&B id of the run in ``run_dir``: read from its ``wandb_id`` file, else drawn now and
    written there (when ``create``; rank 0).

    The id lives as long as the directory: a restart, requeue or resume continues the same W&B
    run, while the same overrides in another checkout, by another user of the W&B project, or
    after the outputs were deleted (or moved aside by ``force=true``) start a new one, which an
    id derived from the overrides alone could not tell apart.
    """
    found = recorded_wandb_id(run_dir)
    if found or not create:
        return found or key_id
    import uuid

    new = hashlib.sha1(f"{key_id}|{uuid.uuid4()}".encode()).hexdigest()[:16]
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(run_dir) / f".{WANDB_ID_FILE}.{os.getpid()}.tmp"
    tmp.write_text(new + "\n")
    os.replace(tmp, Path(run_dir) / WANDB_ID_FILE)
    return new


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
