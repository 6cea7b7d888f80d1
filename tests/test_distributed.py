"""DDP on CPU: 2 gloo processes started from outside (torchrun), as srun starts them on a cluster.

One end-to-end run proves: both ranks train (Lightning initialises a world of 2), the run directory
gets exactly one writer (train.log, status.json, CSV rows, metrics.json come from rank 0 only),
and the throughput counters are global (summed over both ranks), not rank 0's share.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY

pytestmark = pytest.mark.slow

WORLD = 2
BATCH = 8  # data.batch_size in TINY
STEPS = 12  # trainer.max_steps in TINY


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One torchrun of 2 ranks with trainer=ddp_sim; -> (run dir, combined output of both ranks)."""
    root = tmp_path_factory.mktemp("ddp")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        str(REPO / "train.py"), "trainer=ddp_sim", *TINY, "logger=csv", f"paths.log_dir={root / 'out'}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=420)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    runs = [p for p in (root / "out" / "train" / "runs").iterdir() if p.is_dir()]
    assert len(runs) == 1, f"both ranks must share one run directory, got {runs}"
    return runs[0], output


def test_both_ranks_train_in_one_world(ddp_run: tuple[Path, str]) -> None:
    _, output = ddp_run
    for rank in range(WORLD):
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/{WORLD}" in output


def test_only_rank_zero_writes(ddp_run: tuple[Path, str]) -> None:
    run_dir, output = ddp_run
    marker = f"-> {run_dir}"  # the run's start line; every rank logs it to its console
    assert sum(marker in line for line in output.splitlines()) == WORLD
    train_log = (run_dir / "train.log").read_text()
    assert sum(marker in line for line in train_log.splitlines()) == 1, "a rank other than 0 appended to train.log"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "done" and status["attempt"] == 1, f"status written by more than one rank: {status}"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "val/loss" in metrics and "test/loss" in metrics
    # a second writer would duplicate every logged row
    with (run_dir / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    train_steps = Counter(r["step"] for r in rows if r.get("train/loss"))
    assert train_steps and max(train_steps.values()) == 1, train_steps


def test_throughput_is_summed_over_ranks(ddp_run: tuple[Path, str]) -> None:
    run_dir, _ = ddp_run
    seq_len = int(next(line.split(":")[1] for line in (run_dir / ".hydra" / "config.yaml").read_text().splitlines()
                       if line.strip().startswith("seq_len:")))
    with (run_dir / "csv" / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("perf/tokens_per_s")]
    assert rows
    last = max(rows, key=lambda r: int(r["step"]))
    # cumulative trained tokens over both ranks after all steps
    assert float(last["perf/tokens"]) == STEPS * BATCH * seq_len * WORLD
    for r in rows:  # global rate = per-device rate x world size (each rank trains a batch per step)
        assert float(r["perf/tokens_per_s"]) == pytest.approx(WORLD * float(r["perf/tokens_per_s_per_device"]))
