"""Run identity: the deterministic key, name and group of a run, and what makes two configs "the same run".

A run's output directory and its name are derived from the same key (the command-line overrides
and the seed), never from a timestamp, so two jobs of a sweep never collide and a job restarted
after a crash or a SLURM requeue finds its own directory. The *identity config* (the flat
resolved config minus paths, loggers and other keys that do not change what is computed) is what
a finished run directory is checked against before it is reused.

Imports: :mod:`sectional_moe.secrets` only (torch-free).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Iterable, Mapping

from sectional_moe.secrets import redact_joined_overrides, redact_text

# overrides that change where or how a run is logged, not what it computes
NON_IDENTITY_KEYS = {"seed", "group", "logger", "hydra/launcher", "tags", "resume", "force", "task_name",
                     "threads", "print_config", "memory_check", "run_lock_stale_s"}
NON_IDENTITY_PREFIXES = ("hydra.", "paths.", "logger.", "callbacks.progress", "trainer.enable_progress_bar")
MAX_NAME_LEN = 120


def override_key(override: str) -> str:
    """``+trainer.max_steps=5`` -> ``trainer.max_steps``."""
    return override.split("=", 1)[0].lstrip("+~")


def is_identity_override(override: str) -> bool:
    key = override_key(override)
    return key not in NON_IDENTITY_KEYS and not key.startswith(NON_IDENTITY_PREFIXES)


def safe_name(text: str) -> str:
    """``text`` as a file-system- and W&B-safe name: secrets redacted, odd characters replaced,
    long names shortened with a digest (so they stay unique)."""
    text = redact_joined_overrides(redact_text(text))  # an ${oc.env:...} or +hf_token=... override must not put a secret in a path
    text = re.sub(r"[^A-Za-z0-9=,._+\-\[\]]", "_", text)
    if text.strip(".") == "":  # "", "." and ".." would name the parent directory, not a run of its own
        text = text.replace(".", "_") or "_"
    if len(text) > MAX_NAME_LEN:
        digest = hashlib.sha1(text.encode()).hexdigest()[:8]
        text = f"{text[: MAX_NAME_LEN - 9]}-{digest}"
    return text


def run_name(override_dirname: str) -> str:
    """Human name of a run from its overrides: ``experts=8,routing=hash`` (``default`` if none)."""
    return safe_name(override_dirname) if override_dirname else "default"


def run_key(override_dirname: str, seed: int | str) -> str:
    """Directory name of a run: its overrides plus the seed, e.g. ``experts=8,routing=hash,seed=0``."""
    return safe_name(f"{override_dirname},seed={seed}" if override_dirname else f"seed={seed}")


def sweep_group(group: str | None, task_overrides: Iterable[str]) -> str:
    """W&B group and sweep directory of a multirun: ``group`` if set, else ``sweep-<swept keys>``.

    The name depends only on the override *keys*, because Hydra resolves the sweep directory
    again inside each job, where ``experts=4,8,16`` has become ``experts=4``.
    """
    if group:
        return safe_name(str(group))
    keys = sorted({override_key(o).replace("/", "-") for o in task_overrides if is_identity_override(o)})
    return safe_name("sweep-" + "-".join(keys)) if keys else "sweep"


def is_identity_key(key: str) -> bool:
    """A flat config key (``trainer.max_steps``) that changes what a run computes."""
    if key.startswith("callbacks.nan_guard."):  # its skip policy changes the training
        return True
    # measurement callbacks and the MFU denominator do not change what is computed
    return (key not in NON_IDENTITY_KEYS and not key.startswith(NON_IDENTITY_PREFIXES + ("hardware.", "callbacks."))
            and key not in ("train", "test"))


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become strings so every logger accepts them."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = str(list(value))
        else:
            out[name] = value
    return out


def identity_of(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The identity config of a flat, redacted config: only the keys that change what is computed."""
    return {k: v for k, v in flat.items() if is_identity_key(k)}


def identity_diff(saved: Mapping[str, Any], new: Mapping[str, Any], limit: int = 6) -> list[str]:
    """Keys whose value differs, as ``key: old -> new`` (at most ``limit``, then ``...``)."""
    new = json.loads(json.dumps(dict(new), default=str))  # the same JSON round trip as the saved copy
    keys = sorted(k for k in set(saved) | set(new) if saved.get(k) != new.get(k))
    return [f"{k}: {saved.get(k)!r} -> {new.get(k)!r}" for k in keys[:limit]] + (["..."] if len(keys) > limit else [])


def int_div(a: int, b: int) -> int:
    """``${smoe.div:${size.d_ff},${experts}}``: exact integer division for configs (errors if inexact)."""
    a, b = int(a), int(b)
    if b <= 0 or a % b:
        raise ValueError(f"smoe.div: {a} is not divisible by {b}")
    return a // b
