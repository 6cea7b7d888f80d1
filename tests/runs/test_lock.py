"""The run-directory lock (issue 19, fault 4): one holder, named when refused; stale locks taken over.

Fast unit tests of :mod:`sectional_moe.runs.lock`; the end-to-end "same command twice at once"
test is ``tests/training/test_faults.py::test_the_same_command_twice_at_once``.
"""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time

import pytest

from sectional_moe.errors import RunLockedError
from sectional_moe.runs import lock as lock_mod
from sectional_moe.runs.layout import RunDir
from sectional_moe.runs.lock import acquire, read_holder, release_held


def _write_holder(run: RunDir, **fields) -> None:
    info = {"host": socket.gethostname(), "pid": 1, "pid_start": None, "token": "f" * 32, "since": "2026-12-01T00:00:00",
            "slurm_job_id": None, "slurm_restart": None, **fields}
    run.path.mkdir(parents=True, exist_ok=True)
    run.lock_file.write_text(json.dumps(info))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_acquire_names_the_holder_and_release_frees_it(tmp_path):
    run = RunDir(tmp_path / "run")
    held = acquire(run)
    holder = read_holder(run.lock_file)
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    _write_holder(RunDir(tmp_path / "other"), host="gpu-node-7", pid=4321)
    with pytest.raises(RunLockedError) as err:
        acquire(RunDir(tmp_path / "other"))
    assert err.value.key == "hydra.run.dir"
    assert "in use by pid 4321 on host gpu-node-7" in str(err.value) and "\n" not in str(err.value)
    held.release()
    assert not run.lock_file.exists()
    acquire(run).release()  # free again


def _race(path: str, barrier, results) -> None:
    barrier.wait()
    try:
        lk = acquire(RunDir(path))
    except RunLockedError:
        results.put("refused")
        return
    results.put("held")
    time.sleep(0.5)  # hold it while the other one tries
    lk.release()


def test_two_processes_racing_for_one_directory_get_one_lock(tmp_path):
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path / "run"), barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert outcomes == ["held", "refused", "refused", "refused"]
    assert not (tmp_path / "run" / RunDir.LOCK).exists()
    assert [p.name for p in (tmp_path / "run").iterdir()] == []  # no temporary link files left


def test_a_dead_process_lock_on_this_host_is_taken_over(tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    pid = _dead_pid()
    _write_holder(run, pid=pid)
    lk = acquire(run)
    assert read_holder(run.lock_file)["pid"] == os.getpid()
    assert f"pid {pid} is gone" in capsys.readouterr().out
    lk.release()


def test_a_recycled_pid_is_not_mistaken_for_the_holder(tmp_path):
    run = RunDir(tmp_path / "run")
    _write_holder(run, pid=os.getppid(), pid_start="1")  # a live pid, but started at another time
    acquire(run).release()


def test_a_live_process_on_this_host_keeps_its_lock(tmp_path):
    run = RunDir(tmp_path / "run")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _write_holder(run, pid=sleeper.pid, pid_start=lock_mod._pid_start(sleeper.pid))
        with pytest.raises(RunLockedError, match=f"pid {sleeper.pid} on host {socket.gethostname()}"):
            acquire(run)
    finally:
        sleeper.kill()
        sleeper.wait()
    acquire(run).release()  # gone now: taken over


def test_another_hosts_lock_is_taken_over_only_once_its_heartbeat_is_stale(tmp_path):
    run = RunDir(tmp_path / "run")
    _write_holder(run, host="node-a", pid=99)
    with pytest.raises(RunLockedError, match="node-a"):
        acquire(run, stale_after=60)
    old = time.time() - 120
    os.utime(run.lock_file, (old, old))  # the holder stopped refreshing it two minutes ago
    lk = acquire(run, stale_after=60)
    assert read_holder(run.lock_file)["host"] == socket.gethostname()
    lk.release()


def test_an_earlier_attempt_of_the_same_slurm_job_is_taken_over_at_once(tmp_path, monkeypatch):
    """A requeued job lands on another node while the lock of its killed attempt is fresh."""
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    run = RunDir(tmp_path / "run")
    _write_holder(run, host="node-a", pid=99, slurm_job_id="777", slurm_restart=None)
    acquire(run, stale_after=3600).release()
    _write_holder(run, host="node-a", pid=99, slurm_job_id="778", slurm_restart=None)  # another job: live
    with pytest.raises(RunLockedError, match="SLURM job 778"):
        acquire(run, stale_after=3600)


def test_the_heartbeat_keeps_a_held_lock_fresh(tmp_path):
    run = RunDir(tmp_path / "run")
    lk = acquire(run, stale_after=2)  # heartbeat every 0.5 s
    old = time.time() - 100
    os.utime(run.lock_file, (old, old))
    time.sleep(1.2)
    assert time.time() - run.lock_file.stat().st_mtime < 2
    lk.release()


def test_a_nested_acquire_in_the_holding_process_does_not_release_it(tmp_path):
    run = RunDir(tmp_path / "run")
    outer = acquire(run)
    inner = acquire(run)
    inner.release()
    assert read_holder(run.lock_file)["token"] == outer.info["token"]
    release_held()
    assert not run.lock_file.exists()


def test_without_hard_links_the_lock_falls_back_to_exclusive_create(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(lock_mod.os, "link", no_links)
    run = RunDir(tmp_path / "run")
    lk = acquire(run)
    assert read_holder(run.lock_file)["pid"] == os.getpid()
    other = lock_mod.holder_info()
    assert lock_mod._create(run.lock_file, other) is False  # exclusive: a second creator loses
    assert read_holder(run.lock_file)["token"] == lk.info["token"]
    lk.release()
    assert lock_mod._create(run.lock_file, other) is True
    assert [p.name for p in run.path.iterdir()] == [RunDir.LOCK]  # no temporary file left


def test_release_never_removes_another_holders_lock(tmp_path):
    run = RunDir(tmp_path / "run")
    lk = acquire(run)
    _write_holder(run, host="node-b", pid=5)  # someone broke our lock and took it
    lk.release()
    assert read_holder(run.lock_file)["host"] == "node-b"
