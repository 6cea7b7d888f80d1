"""Both SLURM paths and requeue-resume, against a REAL SLURM cluster (slurm/local-cluster.sh in CI).

One module fixture drives everything at once (the node has few CPUs, so the jobs share it):

* a 2-job sweep ``python train.py -m hydra/launcher=slurm experts=2,4`` (submitit); while its
  job 0 trains, an external ``scontrol requeue`` kills it (no warning signal, as an admin or a
  node failure would) and it must resume from its own ``last.ckpt``;
* a 2-task ``sbatch --array=0-1 slurm/array.sbatch sweep.txt`` built by ``sectional_moe.launch``;
  its task 0 gets the time-limit warning signal (``scancel --batch --signal=USR2``), so the batch
  script's trap has training save a checkpoint and then requeues the task.

Skipped, with the reason, when no SLURM cluster answers (e.g. a laptop without SLURM).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

from tests.conftest import REPO, TINY

STEPS = 40  # long enough to interrupt after the first checkpoint (step 10) and still be running
RUN = [o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.val_check_interval", "logger"))] + [
    "trainer=cpu", f"trainer.max_steps={STEPS}", "trainer.val_check_interval=10", "logger=[csv,wandb]",
]


def cluster_problem() -> str | None:
    """Why the SLURM tests cannot run here, or None when a usable cluster answers."""
    missing = [t for t in ("sbatch", "sinfo", "sacct", "scontrol", "scancel") if shutil.which(t) is None]
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
needs_cluster = pytest.mark.skipif(PROBLEM is not None, reason=PROBLEM or "")
pytestmark = [pytest.mark.slurm, pytest.mark.slow]


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
    return dict(line.split("|", 1) for line in out.stdout.split() if "|" in line)


def run_dir_of(root: Path, experts: int) -> Path | None:
    """The run directory (under ``root``) whose job had ``experts=<experts>``."""
    for overrides in root.glob("**/.hydra/overrides.yaml"):
        if f"- experts={experts}\n" in overrides.read_text():
            return overrides.parent.parent
    return None


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def logged_train_steps(run_dir: Path) -> Counter:
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return Counter(int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss"))


@dataclass
class ClusterRuns:
    hydra_root: Path
    hydra_proc: subprocess.CompletedProcess
    hydra_requeued_at: int  # step of last.ckpt when job 0 was requeued
    sbatch_root: Path
    array_id: str
    sbatch_signalled_at: int  # step of last.ckpt when task 0 got USR2
    seconds: dict[str, float] = field(default_factory=dict)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> ClusterRuns:
    t0 = time.monotonic()
    root = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "WANDB_MODE": "offline", "SMOE_REPO": str(REPO), "SMOE_PYTHON": sys.executable}

    # --- plain sbatch path: sweep file -> one array
    sb_root = root / "sbatch"
    sweep_file = sb_root / "mission.txt"
    subprocess.run([sys.executable, "-m", "sectional_moe.launch", "overrides", "experts=2,4", "-o", str(sweep_file)],
                   check=True, env=env, capture_output=True)
    submit = subprocess.run(
        ["sbatch", "--parsable", "--array=0-1", f"--chdir={sb_root}", f"--output={sb_root}/slurm-%A_%a.out",
         str(REPO / "slurm" / "array.sbatch"), str(sweep_file), *RUN, f"paths.log_dir={sb_root / 'out'}"],
        env=env, capture_output=True, text=True, check=True)
    array_id = submit.stdout.strip().split(";")[0]

    # --- Hydra + submitit path: one multirun, blocking until every job finished
    hy_root = root / "hydra"
    hy_root.mkdir()
    sweep = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), "-m", "hydra/launcher=slurm", "experts=2,4", *RUN,
         "group=slurmtest", f"paths.log_dir={hy_root / 'out'}"],
        cwd=hy_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def first_checkpoint(base: Path) -> Path | None:
        run_dir = run_dir_of(base, experts=2)
        ckpt = run_dir / "checkpoints" / "last.ckpt" if run_dir else None
        return ckpt if ckpt and ckpt.is_file() else None

    try:
        # interrupt both job-0s once they have a checkpoint, whichever comes first
        hydra_step = sbatch_step = None
        deadline = time.monotonic() + 240
        while (hydra_step is None or sbatch_step is None) and time.monotonic() < deadline:
            if hydra_step is None and (ckpt := first_checkpoint(hy_root)):
                hydra_step = checkpoint_step(ckpt)
                job = json.loads((ckpt.parent.parent / "status.json").read_text())["slurm_job_id"]
                subprocess.run(["scontrol", "requeue", job], check=True)
            if sbatch_step is None and (ckpt := first_checkpoint(sb_root)):
                sbatch_step = checkpoint_step(ckpt)
                subprocess.run(["scancel", "--batch", "--signal=USR2", f"{array_id}_0"], check=True)
            time.sleep(0.3)
        assert hydra_step is not None and sbatch_step is not None, "no job reached its first checkpoint in 240 s"
        out, _ = sweep.communicate(timeout=300)
        hydra_done = time.monotonic() - t0
        wait_for(lambda: set(sacct_states(array_id).values()) == {"COMPLETED"}, 240, f"array {array_id} to complete")
    finally:
        if sweep.poll() is None:
            sweep.kill()
        subprocess.run(["scancel", array_id], capture_output=True)
    return ClusterRuns(hy_root, subprocess.CompletedProcess(sweep.args, sweep.returncode, out), hydra_step,
                       sb_root, array_id, sbatch_step,
                       {"hydra_sweep": hydra_done, "all": time.monotonic() - t0})


@needs_cluster
def test_hydra_sweep_is_one_array_and_every_job_finishes(runs: ClusterRuns) -> None:
    assert runs.hydra_proc.returncode == 0, runs.hydra_proc.stdout[-4000:]
    submissions = list(runs.hydra_root.glob("out/train/multirun/slurmtest/.submitit/*/*_submission.sh"))
    assert len(submissions) == 1, f"expected one sbatch submission for the sweep, got {submissions}"
    assert "#SBATCH --array=0-1%" in submissions[0].read_text()
    array_id = submissions[0].parent.name
    states = wait_for(lambda: (s := sacct_states(array_id)) and len(s) == 2 and s, 30, "accounting of the array")
    assert sorted(states) == [f"{array_id}_0", f"{array_id}_1"]
    for experts in (2, 4):
        run_dir = run_dir_of(runs.hydra_root, experts)
        assert run_dir is not None and (run_dir / "DONE").is_file()
        assert "val/loss" in json.loads((run_dir / "metrics.json").read_text())
    assert "done" in runs.hydra_proc.stdout.split("sweep summary")[-1]


@needs_cluster
def test_external_requeue_resumes_from_own_checkpoint(runs: ClusterRuns) -> None:
    run_dir = run_dir_of(runs.hydra_root, experts=2)
    assert run_dir is not None
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "done" and status["attempt"] == 2, status  # killed once, ran twice
    assert runs.hydra_requeued_at > 0
    log_out = "".join(p.read_text() for p in runs.hydra_root.glob("out/**/.submitit/*_0/*_0_log.*"))
    assert "Restoring states from the checkpoint path at" in log_out and "last.ckpt" in log_out
    # a restart from scratch would re-log (duplicate) every step before the kill; a resume drops
    # the killed attempt's rows from the checkpoint's step on and continues: each step once
    steps = logged_train_steps(run_dir)
    assert max(steps.values()) == 1 and max(steps) == STEPS - 1 and min(steps) == 1, sorted(steps.items())
    # the same W&B run (deterministic id) is continued by the second attempt
    offline = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and len({name.rsplit("-", 1)[1] for name in offline}) == 1, offline


@needs_cluster
def test_sbatch_array_path_and_preemption_signal(runs: ClusterRuns) -> None:
    lines = (runs.sbatch_root / "mission.txt").read_text().splitlines()
    assert lines == ["experts=2", "experts=4"]
    for experts, task in ((2, 0), (4, 1)):
        run_dir = run_dir_of(runs.sbatch_root, experts)
        assert run_dir is not None and (run_dir / "DONE").is_file(), f"task {task} left no finished run"
        assert json.loads((run_dir / "metrics.json").read_text())["val/loss"] > 0
        assert f"task {task} (restart 0): experts={experts}" in (runs.sbatch_root / f"slurm-{runs.array_id}_{task}.out").read_text()
    # task 0: USR2 -> the trap forwarded it -> checkpoint at the next step -> requeued -> resumed
    run_dir = run_dir_of(runs.sbatch_root, experts=2)
    out = (runs.sbatch_root / f"slurm-{runs.array_id}_0.out").read_text()
    assert "preemption checkpoint at step" in out, out[-3000:]
    assert "(restart 1)" in out  # the batch script's banner on the requeued run
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "done" and status["attempt"] == 2, status
    steps = logged_train_steps(run_dir)
    assert max(steps.values()) == 1 and max(steps) == STEPS - 1, sorted(steps.items())
    assert runs.sbatch_signalled_at > 0


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
