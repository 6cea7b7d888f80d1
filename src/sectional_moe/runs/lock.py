"""One process per run directory: a lock file that names its holder and is taken over when stale.

Two launches of the same command (or a requeued job overlapping a live one) would otherwise write
the same checkpoints, CSV and W&B run at once. :func:`acquire` creates ``RunDir.lock_file``
holding the holder's host, pid (and its start time, so a recycled pid is not mistaken for it),
SLURM job id and restart count; a second process finds it and stops with one line naming the
holder (:class:`~sectional_moe.errors.RunLockedError`).

Shared file systems: the lock is created by writing a private temporary file and hard-linking it
to the lock's name, which is atomic on NFS as on a local disk (``O_EXCL`` is not reliable on old
NFS clients, and ``flock`` locks are not seen across NFS hosts); where hard links are not
supported, ``O_CREAT | O_EXCL`` is the fallback. While the lock is held a daemon thread touches it
every ``stale_after / 4`` seconds (its heartbeat).

A lock is *stale*, and taken over, when its holder

* ran on this host and its pid is gone (or now belongs to a process started at another time);
* was an earlier attempt of this very SLURM job (same job id, another restart count: SLURM
  starts a requeued job only once the previous attempt has ended);
* ran on another host and has not refreshed the lock for ``stale_after`` seconds.

Taking over is serialised by a second, short-lived lock (``<lock>.takeover``), so two processes
that both find the same stale lock cannot both win. A process leaving with ``os._exit`` calls
:func:`release_held` first.

Imports: :mod:`sectional_moe.errors`, :mod:`sectional_moe.env`, :mod:`sectional_moe.runs.layout` (torch-free).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sectional_moe.env import slurm_job_id
from sectional_moe.errors import RunLockedError
from sectional_moe.runs.layout import RunDir

log = logging.getLogger(__name__)

DEFAULT_STALE_AFTER_S = 300.0
TAKEOVER_STALE_S = 60.0  # a takeover guard older than this was left by a process that died mid-takeover
_HELD: dict[str, "RunLock"] = {}  # token -> lock, for release_held() and for telling our own locks apart


def _pid_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, Linux), or None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def holder_info(token: str | None = None) -> dict[str, Any]:
    """What the lock file records about this process."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
            "token": token or uuid.uuid4().hex, "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "slurm_job_id": slurm_job_id(), "slurm_restart": os.environ.get("SLURM_RESTART_COUNT")}


def _create(path: Path, info: dict[str, Any]) -> bool:
    """Create ``path`` holding ``info`` if it does not exist (atomically, also on NFS); False if it exists."""
    data = json.dumps(info, indent=1).encode()
    tmp = path.with_name(f".{path.name}.{info['host']}.{info['pid']}.{info['token'][:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:
        try:  # NFS may report an error for a link that was made: the link count tells
            if os.stat(tmp).st_nlink == 2:
                return True
        except OSError:
            pass
        try:  # no hard links on this file system
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def read_holder(path: Path) -> dict[str, Any] | None:
    """The lock's recorded holder, or None if there is no (readable) lock."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def stale_reason(holder: dict[str, Any], age_s: float, stale_after: float) -> str | None:
    """Why the lock of ``holder`` (last refreshed ``age_s`` ago) may be taken over, or None if it is live."""
    here = socket.gethostname()
    pid = holder.get("pid")
    if holder.get("token") in _HELD:
        return None  # held by this very process (acquire() hands out a nested handle)
    if holder.get("slurm_job_id") and holder.get("slurm_job_id") == slurm_job_id() \
            and holder.get("slurm_restart") != os.environ.get("SLURM_RESTART_COUNT"):
        return f"it was an earlier attempt of SLURM job {holder['slurm_job_id']}"
    if holder.get("host") == here and isinstance(pid, int):
        if pid == os.getpid():
            return "it was left by an earlier job of this process"
        if not _pid_alive(pid):
            return f"pid {pid} is gone"
        start = _pid_start(pid)
        if holder.get("pid_start") and start and start != holder["pid_start"]:
            return f"pid {pid} now belongs to another process"
        return None
    if age_s > stale_after:
        return f"its holder on {holder.get('host')} has not refreshed it for {age_s:.0f} s (> {stale_after:g} s)"
    return None


def _age(path: Path) -> float:
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except OSError:
        return 0.0


@dataclass
class RunLock:
    """A held run-directory lock; :meth:`release` it (or use it as a context manager)."""

    path: Path
    info: dict[str, Any]
    heartbeat_s: float
    _nested: bool = False
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder = read_holder(self.path)
            if holder is None or holder.get("token") != self.info["token"]:
                log.warning("the run lock %s was removed or taken over by another process (%s)", self.path,
                            f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "no holder")
                return
            try:
                os.utime(self.path)
            except OSError:
                pass

    def nested(self) -> "RunLock":
        """A handle on this held lock whose release does nothing (the outer holder releases it)."""
        return RunLock(self.path, self.info, self.heartbeat_s, _nested=True)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still ours."""
        if self._nested:
            return
        self._stop.set()
        _HELD.pop(self.info["token"], None)
        holder = read_holder(self.path)
        if holder is not None and holder.get("token") == self.info["token"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _take_over(path: Path, holder: dict[str, Any]) -> None:
    """Remove the stale lock of ``holder`` unless another process replaced it meanwhile."""
    guard = path.with_name(path.name + ".takeover")
    if _age(guard) > TAKEOVER_STALE_S:
        guard.unlink(missing_ok=True)
    if not _create(guard, holder_info()):
        return  # another process is taking over right now; the caller looks again
    try:
        current = read_holder(path)
        if current is not None and current.get("token") == holder.get("token"):
            path.unlink(missing_ok=True)
    finally:
        guard.unlink(missing_ok=True)


def describe(holder: dict[str, Any]) -> str:
    """``pid 1234 on host gpu07 (since 2026-12-01T10:00:00, SLURM job 55_3)``."""
    extra = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since')}{extra})"


def acquire(run: RunDir, stale_after: float = DEFAULT_STALE_AFTER_S, attempts: int = 5) -> RunLock:
    """Lock ``run`` for this process, taking over a stale lock; returns the held lock.

    Raises:
        RunLockedError: a live process holds it (the message names its host and pid).
    """
    path = run.lock_file
    path.parent.mkdir(parents=True, exist_ok=True)
    info = holder_info()
    for _ in range(attempts):
        if _create(path, info):
            lock = RunLock(path, info, heartbeat_s=max(0.5, stale_after / 4))
            _HELD[info["token"]] = lock
            lock.start_heartbeat()
            return lock
        holder = read_holder(path)
        if holder is None:
            if path.exists() and _age(path) > 5:  # an unreadable lock file nobody writes any more
                path.unlink(missing_ok=True)
            time.sleep(0.05)
            continue
        if holder.get("token") in _HELD:  # this process holds it already: a nested acquire
            return _HELD[holder["token"]].nested()
        why = stale_reason(holder, _age(path), stale_after)
        if why is None:
            raise RunLockedError("hydra.run.dir", f"{run.path} is in use by {describe(holder)}; wait for that run to end "
                                 f"(a lock whose process is gone is taken over), or give this run another directory (task_name=..., seed=...)")
        log.warning("taking over the lock of %s: %s", run.path, why)
        print(f"warning: {run.path} was locked by {describe(holder)}, but {why}; taking it over", flush=True)
        _take_over(path, holder)
    holder = read_holder(path) or {}
    raise RunLockedError("hydra.run.dir", f"{run.path} is in use by {describe(holder)}; wait for that run to end, or give this run "
                         "another directory (task_name=..., seed=...)")


def release_held() -> None:
    """Release every lock this process holds (before an ``os._exit``, which skips ``finally``)."""
    for lock in list(_HELD.values()):
        lock.release()
