"""Both SLURM paths, preemption and requeue-resume, against a REAL SLURM cluster (slurm/local-cluster.sh in CI).

One module fixture drives everything at once (the node has few CPUs, so the jobs share it):

* a 4-job sweep ``python train.py -m hydra/launcher=slurm experts=2,4 routing=topk,hash``
  (submitit, one job array). Once a job has its first checkpoint it is interrupted, each in
  another way: ``scancel`` (it dies: the summary must still come, listing it as failed),
  an external ``scontrol requeue`` (no warning: it must resume from its own ``last.ckpt``),
  ``scancel --signal=USR2`` and ``scancel --signal=TERM`` (checkpoint now, then submitit
  requeues). The same command launched again must submit only the dead job and end all done.
* a 2-task ``sbatch --array=0-1 slurm/array.sbatch sweep.txt`` built by ``sectional_moe.launch``,
  with ``SUBMITIT_PREEMPT_SIGNAL=USR1`` and a ``$(touch ...)`` in the sweep file: task 0 gets USR1
  (``scancel --batch``), task 1 SIGTERM; both checkpoint and the batch script requeues them.
* ``slurm/multinode.sbatch`` as 1 node x 2 CPU tasks with ``trainer=ddp_sim``.

Without a reachable cluster these tests skip with the reason, or fail when ``SMOE_REQUIRE_SLURM=1``
(``.ci/run`` sets it where it starts the local cluster). The tests without a cluster check the
sweep-file splitting, the batch script's requeue rule and the training's signal handling directly.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from tests.conftest import REPO, TINY

STEPS = 150  # ~125 steps still to go after the first checkpoint: time to interrupt a running job
VAL_EVERY = 25
BASE = [o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.val_check_interval", "logger"))] + [
    f"trainer.max_steps={STEPS}", f"trainer.val_check_interval={VAL_EVERY}"]
RUN = BASE + ["trainer=cpu", "logger=[csv,wandb]"]  # the Hydra sweep: W&B too (the same run id across requeues)
RUN_SBATCH = BASE + ["trainer=cpu", "logger=csv"]
REQUIRE_ENV = "SMOE_REQUIRE_SLURM"
from sectional_moe.env import EXIT_PREEMPTED  # noqa: E402 (torch-free)

# how each job of the Hydra sweep is interrupted once it has its first checkpoint
DEAD, REQUEUE, USR2, TERM = ("experts=2", "routing=topk"), ("experts=2", "routing=hash"), ("experts=4", "routing=topk"), ("experts=4", "routing=hash")


def cluster_problem() -> str | None:
    """Why the SLURM tests cannot run here, or None when a usable cluster answers."""
    missing = [t for t in ("sbatch", "sinfo", "sacct", "scontrol", "scancel", "squeue") if shutil.which(t) is None]
    if missing:
        return (f"no SLURM cluster reachable: {', '.join(missing)} not on PATH "
                "(start a local one as root: bash slurm/local-cluster.sh start)")
    try:
        sinfo = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=15)
        sacct = subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "no SLURM cluster reachable: sinfo/sacct timed out (is slurmctld running? bash slurm/local-cluster.sh status)"
    if sinfo.returncode:
        return (f"no SLURM cluster reachable: sinfo failed: {(sinfo.stderr.strip().splitlines() or ['?'])[0]} "
                "(start a local one as root: bash slurm/local-cluster.sh start)")
    states = [s.rstrip("*~#$@") for s in sinfo.stdout.split()]
    if not any(s in ("idle", "mix", "alloc", "comp") for s in states):
        return f"SLURM cluster has no usable node (sinfo states: {states or 'none'})"
    if sacct.returncode:
        return ("SLURM accounting is off (sacct fails: "
                f"{(sacct.stderr.strip().splitlines() or ['?'])[0]}); submitit cannot track jobs without it")
    return None


PROBLEM = cluster_problem()
pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster() -> None:
    """Skip without a cluster (with the reason); fail instead when SMOE_REQUIRE_SLURM=1 demands one."""
    if PROBLEM is None:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 (set by .ci/run where it starts the local cluster) but {PROBLEM}", pytrace=False)
    pytest.skip(PROBLEM)


def wait_for(check: Callable[[], object], timeout: float, what: str, every: float = 0.3) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def sacct_states(job_id: str) -> dict[str, str]:
    """{'7_0': 'COMPLETED', ...}: the current state of each task of an array (or of a job)."""
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "JobID,State"], capture_output=True, text=True)
    return dict(line.split("|", 1) for line in out.stdout.splitlines() if "|" in line)


def run_dir_of(root: Path, *overrides: str) -> Path | None:
    """The run directory (under ``root``) of the job launched with all of ``overrides``."""
    for recorded in root.glob("**/.hydra/overrides.yaml"):
        text = recorded.read_text()
        if all(f"- {o}\n" in text for o in overrides):
            return recorded.parent.parent
    return None


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def logged_train_steps(run_dir: Path) -> Counter:
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return Counter(int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss"))


def assert_resumed_continuously(run_dir: Path) -> None:
    """Killed once and run twice, the second time from the checkpoint: every step logged once.

    A restart from scratch would re-log (duplicate) every step before the interruption; a resume
    drops the interrupted attempt's rows from the checkpoint's step on and continues.
    """
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "done" and status["attempt"] == 2, status
    steps = logged_train_steps(run_dir)
    assert max(steps.values()) == 1 and max(steps) == STEPS - 1 and min(steps) == 1, sorted(steps.items())


def job_logs(sweep_dir: Path, run_dir: Path) -> str:
    """Everything submitit logged for the SLURM job(s) that ran ``run_dir`` (a requeued task keeps
    its folder; a relaunch gets a new one)."""
    texts = []
    for folder in sorted(p for p in sweep_dir.glob(".submitit/*") if p.is_dir()):
        logs = [log.read_text(errors="replace") for log in sorted(folder.glob("*_log.*"))]
        if any(str(run_dir) in text for text in logs):
            texts.extend(logs)
    return "\n".join(texts)


def summary_rows(sweep_dir: Path) -> dict[tuple[str, str], dict]:
    rows = json.loads((sweep_dir / "summary.json").read_text())
    return {key: row for row in rows for key in (DEAD, REQUEUE, USR2, TERM) if all(o in row["job"].split() for o in key)}


@dataclass
class ClusterRuns:
    hydra_root: Path
    sweep_dir: Path
    first: subprocess.CompletedProcess  # the multirun with one job cancelled
    first_summary: dict  # its summary.json rows by job
    dead_job_id: str
    status_before_relaunch: dict[str, dict]
    relaunch: subprocess.CompletedProcess
    interrupted_at: dict[str, int]  # step of last.ckpt when each job was interrupted
    sbatch_root: Path
    sweep_lines: list[str]  # what sectional_moe.launch wrote
    array_id: str
    multinode_root: Path
    multinode_id: str


@pytest.fixture(scope="module")
def runs(cluster: None, tmp_path_factory: pytest.TempPathFactory) -> ClusterRuns:
    root = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "WANDB_MODE": "offline", "SMOE_REPO": str(REPO), "SMOE_PYTHON": sys.executable}

    # --- Hydra + submitit path: one multirun, blocking until every job finished or died
    hy_root = root / "hydra"
    hy_root.mkdir()
    command = [sys.executable, str(REPO / "train.py"), "-m", "hydra/launcher=slurm", "experts=2,4", "routing=topk,hash",
               *RUN, "group=slurmtest", f"paths.log_dir={hy_root / 'out'}"]
    sweep = subprocess.Popen(command, cwd=hy_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sweep_dir = hy_root / "out" / "train" / "multirun" / "slurmtest"

    # --- plain sbatch path: sweep file -> one array; a user edit puts a command substitution in it
    sb_root = root / "sbatch"
    sweep_file = sb_root / "mission.txt"
    subprocess.run([sys.executable, "-m", "sectional_moe.launch", "overrides", "experts=2,4", "-o", str(sweep_file)],
                   check=True, env=env, capture_output=True)
    lines = sweep_file.read_text().splitlines()
    sweep_file.write_text(f"{lines[0]} \"tags=['x$(touch pwned)']\"\n" + "\n".join(lines[1:]) + "\n")
    submit = subprocess.run(
        ["sbatch", "--parsable", "--array=0-1", "--signal=B:USR1@120", f"--chdir={sb_root}", f"--output={sb_root}/slurm-%A_%a.out",
         str(REPO / "slurm" / "array.sbatch"), str(sweep_file), *RUN_SBATCH, f"paths.log_dir={sb_root / 'out'}"],
        env={**env, "SUBMITIT_PREEMPT_SIGNAL": "USR1"}, capture_output=True, text=True, check=True)
    array_id = submit.stdout.strip().split(";")[0]

    # --- one run on "several nodes": 1 node x 2 CPU tasks, DDP with gloo, ranks from srun
    mn_root = root / "multinode"
    mn_root.mkdir()
    submit = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0",
         "--time=10", f"--chdir={mn_root}", f"--output={mn_root}/slurm-%j.out", str(REPO / "slurm" / "multinode.sbatch"),
         "trainer=ddp_sim", *BASE, "logger=csv", f"paths.log_dir={mn_root / 'out'}"],
        env=env, capture_output=True, text=True, check=True)
    multinode_id = submit.stdout.strip().split(";")[0]

    def hydra_job(run_dir: Path) -> str:
        """The task's id as ``<array>_<task>`` (its bare SLURM_JOB_ID may be the array's, i.e. all tasks)."""
        for folder in sweep_dir.glob(".submitit/*_*"):
            if any(str(run_dir) in log.read_text(errors="replace") for log in folder.glob("*_log.out")):
                return folder.name
        raise AssertionError(f"no submitit task logged {run_dir}")

    actions: dict[str, tuple[Path, tuple[str, ...], Callable[[Path], object]]] = {
        "dead": (sweep_dir, DEAD, lambda d: subprocess.run(["scancel", hydra_job(d)], check=True)),
        "requeue": (sweep_dir, REQUEUE, lambda d: subprocess.run(["scontrol", "requeue", hydra_job(d)], check=True)),
        "usr2": (sweep_dir, USR2, lambda d: subprocess.run(["scancel", "--signal=USR2", hydra_job(d)], check=True)),
        "term": (sweep_dir, TERM, lambda d: subprocess.run(["scancel", "--signal=TERM", hydra_job(d)], check=True)),
        "sbatch_usr1": (sb_root, ("experts=2",), lambda d: subprocess.run(
            ["scancel", "--batch", "--signal=USR1", f"{array_id}_0"], check=True)),
        "sbatch_term": (sb_root, ("experts=4",), lambda d: subprocess.run(
            ["scancel", "--signal=TERM", f"{array_id}_1"], check=True)),
    }
    interrupted_at: dict[str, int] = {}
    try:
        deadline = time.monotonic() + 300
        while len(interrupted_at) < len(actions) and time.monotonic() < deadline:
            for name, (base, overrides, act) in actions.items():
                run_dir = None if name in interrupted_at else run_dir_of(base, *overrides)
                ckpt = run_dir / "checkpoints" / "last.ckpt" if run_dir else None
                if ckpt and ckpt.is_file():
                    assert not (run_dir / "DONE").exists(), f"{name}: the job finished before it could be interrupted"
                    interrupted_at[name] = checkpoint_step(ckpt)
                    act(run_dir)
            time.sleep(0.2)
        missing = sorted(set(actions) - set(interrupted_at))
        assert not missing, f"no first checkpoint in 300 s for {missing}"
        out, _ = sweep.communicate(timeout=300)
        first = subprocess.CompletedProcess(command, sweep.returncode, out)
        first_summary = summary_rows(sweep_dir)
        dead_job_id = hydra_job(run_dir_of(sweep_dir, *DEAD))  # the cancelled task of the array
        before = {name: json.loads((run_dir_of(sweep_dir, *key) / "status.json").read_text())
                  for name, key in (("requeue", REQUEUE), ("usr2", USR2), ("term", TERM))}

        # the same command again: only the dead job may run
        relaunch = subprocess.run(command, cwd=hy_root, env=env, capture_output=True, text=True, timeout=300)
        wait_for(lambda: set(sacct_states(array_id).values()) == {"COMPLETED"}, 240, f"array {array_id} to complete")
        wait_for(lambda: set(sacct_states(multinode_id).values()) == {"COMPLETED"}, 240, f"multinode job {multinode_id} to complete")
    finally:
        if sweep.poll() is None:
            sweep.kill()
        subprocess.run(["scancel", array_id, multinode_id], capture_output=True)
    return ClusterRuns(hy_root, sweep_dir, first, first_summary, dead_job_id, before,
                       subprocess.CompletedProcess(command, relaunch.returncode, relaunch.stdout + relaunch.stderr),
                       interrupted_at, sb_root, lines, array_id, mn_root, multinode_id)


# ----------------------------------------------------------------------------------------------
# Hydra + submitit (hydra/launcher=slurm)


def test_hydra_sweep_is_one_array_and_every_job_finishes(runs: ClusterRuns) -> None:
    submissions = sorted(runs.sweep_dir.glob(".submitit/*/*_submission.sh"), key=lambda p: int(p.parent.name))
    assert "#SBATCH --array=0-3%" in submissions[0].read_text(), "the first launch is not one 4-task array"
    array_id = submissions[0].parent.name
    states = wait_for(lambda: (s := sacct_states(array_id)) and len(s) == 4 and s, 30, "accounting of the array")
    assert sorted(states) == [f"{array_id}_{i}" for i in range(4)]
    assert runs.relaunch.returncode == 0, runs.relaunch.stdout[-4000:]
    for key in (DEAD, REQUEUE, USR2, TERM):
        run_dir = run_dir_of(runs.sweep_dir, *key)
        assert run_dir is not None and (run_dir / "DONE").is_file(), key
        assert "val/loss" in json.loads((run_dir / "metrics.json").read_text())
    rows = summary_rows(runs.sweep_dir)
    assert {k: r["state"] for k, r in rows.items()} == dict.fromkeys((DEAD, REQUEUE, USR2, TERM), "done"), rows


def test_dead_job_still_gives_the_summary(runs: ClusterRuns) -> None:
    """scancel of one task: the launcher reports it as failed and the other three as done."""
    assert runs.first.returncode == 1, runs.first.stdout[-4000:]  # the summary's verdict, not a launcher crash
    assert "ended without a result" in runs.first.stdout and "sweep summary" in runs.first.stdout, runs.first.stdout[-4000:]
    rows = runs.first_summary
    assert rows[DEAD]["state"] == "failed" and "CANCELLED" in rows[DEAD]["error"], rows[DEAD]
    assert [rows[k]["state"] for k in (REQUEUE, USR2, TERM)] == ["done"] * 3, rows
    # a cancelled job stays cancelled: its SIGTERM checkpoint did not requeue it
    assert sacct_states(runs.dead_job_id).get(runs.dead_job_id, "").startswith("CANCELLED")


def test_relaunch_submits_only_unfinished_jobs(runs: ClusterRuns) -> None:
    out = runs.relaunch.stdout
    assert out.count("not submitted") == 3, out[-4000:]
    submissions = sorted(runs.sweep_dir.glob(".submitit/*/*_submission.sh"), key=lambda p: int(p.parent.name))
    assert len(submissions) == 2 and "--array" not in submissions[1].read_text(), submissions  # one plain job
    for name, key in (("requeue", REQUEUE), ("usr2", USR2), ("term", TERM)):  # the finished jobs were left alone
        assert json.loads((run_dir_of(runs.sweep_dir, *key) / "status.json").read_text()) == runs.status_before_relaunch[name]
    # the dead job ran again and resumed from the checkpoint its SIGTERM saved
    run_dir = run_dir_of(runs.sweep_dir, *DEAD)
    assert_resumed_continuously(run_dir)
    assert "resuming " in job_logs(runs.sweep_dir, run_dir) and "last.ckpt at step" in job_logs(runs.sweep_dir, run_dir)


def test_external_requeue_resumes_from_own_checkpoint(runs: ClusterRuns) -> None:
    run_dir = run_dir_of(runs.sweep_dir, *REQUEUE)
    assert run_dir is not None and runs.interrupted_at["requeue"] > 0
    assert_resumed_continuously(run_dir)
    logs = job_logs(runs.sweep_dir, run_dir)
    assert "resuming " in logs and "last.ckpt at step" in logs
    # the same W&B run (deterministic id) is continued by the second attempt
    offline = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and len({name.rsplit("-", 1)[1] for name in offline}) == 1, offline


@pytest.mark.parametrize("name, key, sig", [("usr2", USR2, "SIGUSR2"), ("term", TERM, "SIGTERM")], ids=["USR2", "TERM"])
def test_signal_checkpoints_and_submitit_requeues(runs: ClusterRuns, name: str, key: tuple[str, str], sig: str) -> None:
    """SIGUSR2 (time-limit warning) or SIGTERM (preemption with a grace time) to a running task:
    last.ckpt at the next step, submitit requeues the same task, and it resumes from there."""
    run_dir = run_dir_of(runs.sweep_dir, *key)
    assert run_dir is not None
    logs = job_logs(runs.sweep_dir, run_dir)
    assert f"received {sig}: saving a checkpoint after this step" in logs, logs[-3000:]
    assert "preemption checkpoint at step" in logs and "Requeued job" in logs, logs[-3000:]  # submitit requeued it
    assert "resuming " in logs and "last.ckpt at step" in logs
    assert_resumed_continuously(run_dir)
    offline = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and len({n.rsplit("-", 1)[1] for n in offline}) == 1, offline


# ----------------------------------------------------------------------------------------------
# plain sbatch (slurm/array.sbatch, slurm/multinode.sbatch)


def test_sbatch_array_path_with_the_configured_signal(runs: ClusterRuns) -> None:
    assert runs.sweep_lines == ["experts=2", "experts=4"]
    for experts, task in ((2, 0), (4, 1)):
        run_dir = run_dir_of(runs.sbatch_root, f"experts={experts}")
        assert run_dir is not None and (run_dir / "DONE").is_file(), f"task {task} left no finished run"
        assert json.loads((run_dir / "metrics.json").read_text())["val/loss"] > 0
        assert f"task {task} (restart 0): experts={experts}" in (runs.sbatch_root / f"slurm-{runs.array_id}_{task}.out").read_text()
    # task 0: USR1 = $SUBMITIT_PREEMPT_SIGNAL -> the trap passed it on -> checkpoint -> requeued -> resumed
    run_dir = run_dir_of(runs.sbatch_root, "experts=2")
    out = (runs.sbatch_root / f"slurm-{runs.array_id}_0.out").read_text()
    assert "got SIGUSR1: passing SIGUSR1 to the training" in out and "received SIGUSR1" in out, out[-3000:]
    assert "preemption checkpoint at step" in out and f"requeueing {runs.array_id}_0" in out, out[-3000:]
    assert "(restart 1)" in out  # the batch script's banner on the requeued run
    assert_resumed_continuously(run_dir)
    # the sweep file's $(touch pwned) reached train.py as text and ran nowhere
    assert not (runs.sbatch_root / "pwned").exists()
    assert "- tags=['x$(touch pwned)']\n" in (run_dir / ".hydra" / "overrides.yaml").read_text()


def test_sbatch_sigterm_checkpoints_and_requeues(runs: ClusterRuns) -> None:
    """SIGTERM to the training step only (as a preemption with grace time): the training saves
    and exits 143, the job is still RUNNING, so the batch script requeues it; it resumes."""
    out = (runs.sbatch_root / f"slurm-{runs.array_id}_1.out").read_text()
    assert "received SIGTERM" in out and "preemption checkpoint at step" in out, out[-3000:]
    assert f"training stopped for a preemption (exit 143): requeueing {runs.array_id}_1" in out, out[-3000:]
    assert "(restart 1)" in out
    assert_resumed_continuously(run_dir_of(runs.sbatch_root, "experts=4"))


def test_multinode_sbatch_runs_ddp_over_srun_tasks(runs: ClusterRuns) -> None:
    out = (runs.multinode_root / f"slurm-{runs.multinode_id}.out").read_text()
    assert "1 nodes x 2 tasks" in out, out[-3000:]
    # Lightning took both ranks from srun (SLURMEnvironment); it started no process of its own
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in out and "GLOBAL_RANK: 1, MEMBER: 2/2" in out, out[-3000:]
    runs_dirs = list((runs.multinode_root / "out" / "train" / "runs").iterdir())
    assert len(runs_dirs) == 1, runs_dirs
    run_dir = runs_dirs[0]
    assert (run_dir / "DONE").is_file() and json.loads((run_dir / "metrics.json").read_text())["val/loss"] > 0
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "done" and status["attempt"] == 1, status  # one writer: rank 0
    assert "world_size: 2\n" in (run_dir / "csv" / "hparams.yaml").read_text()
    assert max(logged_train_steps(run_dir).values()) == 1


# ----------------------------------------------------------------------------------------------
# without a cluster


def test_slurm_launcher_without_slurm_fails_in_one_line(tmp_path: Path) -> None:
    """No sbatch on PATH: one error line naming the key and the fix, exit 2, nothing submitted."""
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if not (Path(p) / "sbatch").exists())
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "-m", "hydra/launcher=slurm", "experts=2,4",
                           f"paths.log_dir={tmp_path}"], cwd=tmp_path, env={**os.environ, "PATH": path},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "hydra/launcher" in errors[0] and "local-cluster.sh" in errors[0], proc.stderr[-2000:]
    assert not list(tmp_path.glob("**/.submitit/*"))


def test_slurm_launcher_needs_a_device_count(tmp_path: Path) -> None:
    """``trainer.devices=auto`` cannot become ``--ntasks-per-node``: one line, exit 2, nothing submitted."""
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "-m", "hydra/launcher=slurm", "trainer.devices=auto",
                           "experts=2,4", f"paths.log_dir={tmp_path}"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "error: trainer.devices: devices='auto': SLURM needs the number of devices per node; "
        "pass e.g. trainer.devices=4 (one task per device)"]
    assert not list(tmp_path.glob("**/.submitit/*"))


def test_required_cluster_fails_instead_of_skipping() -> None:
    """With SMOE_REQUIRE_SLURM=1 a missing cluster is an error of the run, not a skip; without it, a skip."""
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if not (Path(p) / "sbatch").exists())
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", str(Path(__file__)),
           "-k", "test_hydra_sweep_is_one_array"]
    base = {k: v for k, v in os.environ.items() if k != REQUIRE_ENV} | {"PATH": path}
    procs = {required: subprocess.Popen(cmd, cwd=REPO, env=base | ({REQUIRE_ENV: "1"} if required else {}),
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for required in (True, False)}
    outs = {required: proc.communicate(timeout=120)[0] for required, proc in procs.items()}
    assert procs[True].returncode == 1 and "1 error" in outs[True] and "skipped" not in outs[True], outs[True][-2000:]
    assert f"{REQUIRE_ENV}=1" in outs[True] and "sbatch" in outs[True] and "not on PATH" in outs[True]
    assert procs[False].returncode == 0 and "1 skipped" in outs[False], outs[False][-2000:]


def _fake_commands(bin_dir: Path, **scripts: str) -> dict[str, str]:
    """Executables named after the keys (bash bodies), first on PATH: stand-ins for srun, squeue..."""
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_sweep_file_lines_are_split_never_evaluated(tmp_path: Path) -> None:
    """array.sbatch splits its line like a shell would quote it, but expands and runs nothing."""
    marker = tmp_path / "pwned"
    line = (f"experts=2 \"tags=['x$(touch {marker})']\" 'note=a b' plain=$(touch {marker}) "
            f"tick=`touch {marker}` home=$HOME")
    (tmp_path / "sweep.txt").write_text(f"{line}\nexperts=4 \"unclosed\n")
    record = tmp_path / "srun-args"
    env = _fake_commands(tmp_path / "bin", srun=f'shift; printf "%s\\0" "$@" > {shlex.quote(str(record))}')
    env |= {"SMOE_REPO": str(REPO), "SMOE_PYTHON": sys.executable, "SLURM_ARRAY_JOB_ID": "7", "SLURM_JOB_ID": "8"}
    script = str(REPO / "slurm" / "array.sbatch")

    proc = subprocess.run(["bash", script, "sweep.txt", "extra=1"], cwd=tmp_path, env=env | {"SLURM_ARRAY_TASK_ID": "0"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    args = record.read_bytes().decode().split("\0")[:-1]
    assert args == [sys.executable, "-u", str(REPO / "train.py"), *shlex.split(line), "group=sweep", "extra=1"], args
    assert f"plain=$(touch {marker})" not in args and f"tags=['x$(touch {marker})']" in args
    assert not marker.exists(), "a command substitution in the sweep file was executed"

    record.unlink()
    proc = subprocess.run(["bash", script, "sweep.txt"], cwd=tmp_path, env=env | {"SLURM_ARRAY_TASK_ID": "1"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and not record.exists(), proc.stderr
    assert proc.stderr.strip().startswith("error: sweep.txt line 2: cannot split it into arguments (No closing quotation)"), proc.stderr


@pytest.mark.parametrize("state, sent, requeued", [
    pytest.param("RUNNING", signal.SIGUSR2, True, id="USR2-running"),
    pytest.param("COMPLETING", signal.SIGTERM, False, id="TERM-after-scancel"),
    pytest.param("RUNNING", signal.SIGTERM, True, id="TERM-grace-time")])
def test_batch_script_passes_signals_on_and_requeues_only_running_jobs(tmp_path: Path, state: str, sent: signal.Signals,
                                                                       requeued: bool) -> None:
    """slurm/requeue.sh: USR2 (the #SBATCH default) reaches the training as the configured
    SUBMITIT_PREEMPT_SIGNAL (USR1 here), SIGTERM as SIGTERM; after the training's exit 143 the job
    is requeued only while SLURM lists it RUNNING (after scancel it is COMPLETING: stay cancelled)."""
    log = tmp_path / "log"
    env = _fake_commands(tmp_path / "bin", squeue=f'[ "$3" = 7_0 ] && echo {state}', scontrol=f'echo "scontrol $*" >> {log}')
    training = tmp_path / "training.sh"  # stands in for srun + train.py: exits 143 on the signal it expects
    training.write_text(f"trap 'echo got USR1 >> {log}; exit 143' USR1\ntrap 'echo got TERM >> {log}; exit 143' TERM\n"
                        f"echo ready >> {log}\nfor i in $(seq 300); do sleep 0.1; done\n")
    proc = subprocess.Popen(["bash", "-c", f". {REPO / 'slurm' / 'requeue.sh'}; smoe_run 7_0 bash {training}"],
                            env=env | {"SUBMITIT_PREEMPT_SIGNAL": "USR1", "SLURM_JOB_ID": "8"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: log.exists() and "ready" in log.read_text(), 20, "the stand-in training to start", every=0.05)
    proc.send_signal(sent)
    out, _ = proc.communicate(timeout=30)
    expected = "got USR1" if sent == signal.SIGUSR2 else "got TERM"
    assert expected in log.read_text(), out
    assert ("scontrol requeue 7_0" in log.read_text()) == requeued, (log.read_text(), out)
    assert proc.returncode == (0 if requeued else 143), out


SIGTERM_SCRIPT = """
import os, signal, sys
from pathlib import Path
import lightning.pytorch as pl
from lightning.pytorch.demos.boring_classes import BoringModel
from sectional_moe.callbacks import preemption

state, mode, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
preemption.slurm_job_state = lambda job_id=None: state  # what squeue would say

def fake_submitit(signum, frame):  # submitit's preemption handler: checkpoint(), scontrol requeue, sys.exit(-1)
    (out / "submitit").write_text(signal.Signals(signum).name)
    raise SystemExit(-1)

signal.signal(signal.SIGUSR2, fake_submitit)
checkpointer = preemption.PreemptionCheckpoint(str(out / "run" / "checkpoints" / "last.ckpt"))

class Model(BoringModel):
    def training_step(self, batch, batch_idx):
        if batch_idx == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            if mode == "raise":  # as W&B does once its service got the same SIGTERM
                raise ConnectionResetError("Connection lost")
        return super().training_step(batch, batch_idx)

class DeadServiceLogger(pl.loggers.Logger):  # like WandbLogger once its service got the same SIGTERM
    name, version = "dead", "0"

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        if checkpointer._received:
            raise ConnectionResetError("Connection lost")

class LogsToDeadService(pl.Callback):  # listed first, like the logging callbacks of train.py
    def on_before_optimizer_step(self, trainer, *args):  # mid-step, after the signal
        trainer.loggers[0].log_metrics({"x": 1.0}, step=trainer.global_step)

    def on_train_batch_end(self, *args):
        if checkpointer._received:
            raise ConnectionResetError("Connection lost")

trainer = pl.Trainer(max_steps=20, callbacks=[LogsToDeadService(), checkpointer], logger=DeadServiceLogger(),
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     accelerator="cpu", default_root_dir=str(out))
trainer.fit(Model())
"""


def test_sigterm_saves_at_the_next_step_and_requeues_only_running_jobs(tmp_path: Path) -> None:
    """PreemptionCheckpoint on SIGTERM: last.ckpt at the end of the step it arrived in, exit 143;
    submitit's handler is called (to requeue) only while SLURM lists the job RUNNING, not after a
    scancel (COMPLETING). Logging to a service that got the same SIGTERM (W&B) neither comes first
    nor fails the step; a failure elsewhere before the step ends still leaves as preempted."""
    (tmp_path / "sigterm.py").write_text(SIGTERM_SCRIPT)
    cases = {("RUNNING", "step"): True, ("COMPLETING", "step"): False, ("RUNNING", "raise"): True}
    procs = {}
    for state, mode in cases:
        out = tmp_path / f"{state}-{mode}"
        out.mkdir()
        procs[state, mode] = (out, subprocess.Popen([sys.executable, str(tmp_path / "sigterm.py"), state, mode, str(out)],
                                                    cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for (state, mode), (out, proc) in procs.items():
        log, _ = proc.communicate(timeout=120)
        assert proc.returncode == EXIT_PREEMPTED, (state, mode, log[-3000:])
        ckpt = out / "run" / "checkpoints" / "last.ckpt"
        if mode == "step":
            assert checkpoint_step(ckpt) == 3, log[-3000:]  # the step the signal arrived in, not a later one
        else:
            assert not ckpt.exists() and "training failed after SIGTERM (ConnectionResetError" in log, log[-3000:]
        requeued = cases[state, mode]
        assert (out / "submitit").exists() == requeued and (not requeued or (out / "submitit").read_text() == "SIGTERM")
        status = json.loads((out / "run" / "status.json").read_text())
        assert status["state"] == ("requeued" if requeued else "stopped"), status
        assert status["error"].startswith("SIGTERM " + ("at step 3" if mode == "step" else "before the step ended")), status


def test_launcher_records_dead_and_failed_jobs_and_returns_for_all(tmp_path: Path) -> None:
    """ResilientSlurmLauncher._collect: a job without a result (scancel) or with a FAILED JobReturn
    becomes a COMPLETED(None) return plus ``failed`` + the error in its status.json (what the
    summary reads); a job that recorded its own outcome keeps it; a good result passes through."""
    from hydra.core.utils import JobReturn, JobStatus
    from submitit.core.utils import UncompletedJobError

    from sectional_moe.cluster.launcher import ResilientSlurmLauncher
    from sectional_moe.runs.layout import RunDir

    def write_status(run_dir: Path, state: str) -> None:
        RunDir(run_dir).write_status(state)

    def read_status(run_dir: Path) -> dict:
        return RunDir(run_dir).read_status()

    class FakeJob:
        def __init__(self, job_id: str, outcome: object) -> None:
            self.job_id, self.outcome = job_id, outcome

        def results(self) -> list:
            if isinstance(self.outcome, BaseException):
                raise self.outcome
            return [self.outcome]

    cancelled = UncompletedJobError("Job 5_0 (task: 0) with path /x/5_0_0_result.pkl\nhas not produced any output "
                                    "(state: CANCELLED by 0)\nError stream produced:\n----------\nslurmstepd: CANCELLED")
    failed = JobReturn(status=JobStatus.FAILED, _return_value=ConnectionResetError("Connection lost"))
    good = JobReturn(status=JobStatus.COMPLETED, _return_value=1.5)
    dirs = {name: tmp_path / name for name in ("dead", "failed", "done_then_killed", "good")}
    for name, run_dir in dirs.items():
        write_status(run_dir, "running")
    write_status(dirs["done_then_killed"], "done")
    launcher = ResilientSlurmLauncher()
    rets = {name: launcher._collect(FakeJob(f"5_{i}", outcome), i, ["experts=2"], dirs[name])
            for i, (name, outcome) in enumerate([("dead", cancelled), ("failed", failed),
                                                 ("done_then_killed", cancelled), ("good", good)])}
    assert rets["good"] is good
    for name in ("dead", "failed", "done_then_killed"):
        assert rets[name].status == JobStatus.COMPLETED and rets[name].return_value is None
    dead = read_status(dirs["dead"])
    assert dead["state"] == "failed" and dead["slurm_job_id"] == "5_0"
    assert dead["error"] == ("UncompletedJobError: Job 5_0 (task: 0) with path /x/5_0_0_result.pkl "
                             "has not produced any output (state: CANCELLED by 0)")
    assert read_status(dirs["failed"])["error"] == "ConnectionResetError: Connection lost"
    assert read_status(dirs["done_then_killed"])["state"] == "done"
    assert read_status(dirs["good"])["state"] == "running"  # the job's own business
