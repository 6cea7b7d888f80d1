"""The state of a run as ``status.json`` records it: running -> done | failed | requeued | stopped.

Written atomically by rank 0 only (every rank of a DDP job runs the same failure paths, and a
second writer would race the first and bump ``attempt`` twice); secrets in error texts are
redacted. :class:`~sectional_moe.runs.layout.RunDir` names the file and calls these functions.

Imports: :mod:`sectional_moe.env`, :mod:`sectional_moe.files`, :mod:`sectional_moe.secrets` (torch-free).
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from sectional_moe.env import is_rank_zero, slurm_job_id
from sectional_moe.files import atomic_write
from sectional_moe.secrets import redact_text

#: states a job records; a report adds "unfinished" (killed while running) and "not started"
STATES = ("running", "done", "failed", "requeued", "stopped", "interrupted")


def write_status_file(path: Path, state: str, error: str | None = None, **extra: Any) -> None:
    """Record a job's state in ``path`` (rank 0 only; see the module docstring)."""
    if not is_rank_zero():
        return
    previous = read_status_file(path) or {}
    if error is not None:
        error = redact_text(error)
    extra = {k: redact_text(v) if isinstance(v, str) else v for k, v in extra.items()}
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    status = {
        "state": state,
        "error": error,
        "updated": now,
        "started": previous.get("started") if state != "running" else now,
        "attempt": previous.get("attempt", 0) + (1 if state == "running" else 0),
        "host": socket.gethostname(),
        "slurm_job_id": slurm_job_id(),
        **extra,
    }
    atomic_write(path, json.dumps(status, indent=1))


def read_status_file(path: Path) -> dict[str, Any] | None:
    """The job's last recorded status, or None if there is none (or it cannot be read)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
