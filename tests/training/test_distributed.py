"""DDP on CPU: 2 gloo processes started from outside (torchrun), as srun starts them on a cluster.

One end-to-end run proves: both ranks train (Lightning initialises a world of 2), the run directory
gets exactly one writer (train.log, status.json, CSV rows, metrics.json come from rank 0 only),
the global token counter equals what the two ranks really consumed (tallied on each rank by a
probe callback and checked against the sampler's shards), val/test losses equal a single-process
evaluation of the same blocks, and the checkpoint holds each rank's RNG state.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

# not from tests.conftest: the ranks import this module for TokenTally, and conftest's import-time
# setup (a fresh cache directory) has no business in them
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

WORLD = 2
BATCH = 8  # data.batch_size in TINY
STEPS = 12  # trainer.max_steps in TINY
EVAL_BATCHES = 3  # trainer.limit_val_batches and limit_test_batches in TINY: batches per rank


def fingerprint(block: torch.Tensor) -> str:
    """A short digest of one (seq_len + 1,) block of token ids."""
    return hashlib.sha1(block.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


class TokenTally(pl.Callback):
    """On every rank: count the target tokens of each training batch this rank really received and
    fingerprint its blocks; at the end write ``<out_dir>/tally-rank<r>.json``. Independent of the
    throughput callback, which counts one rank's batches and multiplies by the world size."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.tokens, self.blocks = 0, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.tokens += int(batch[:, 1:].numel())
        self.blocks += [fingerprint(row) for row in batch.cpu()]

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"tally-rank{trainer.global_rank}.json").write_text(json.dumps({"tokens": self.tokens, "blocks": self.blocks}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One torchrun of 2 ranks with trainer=ddp_sim; -> (run dir, combined output of both ranks)."""
    from tests.conftest import TINY

    root = tmp_path_factory.mktemp("ddp")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        str(REPO / "train.py"), "trainer=ddp_sim", *TINY, "logger=csv", f"paths.log_dir={root / 'out'}",
        "+callbacks.tally._target_=tests.training.test_distributed.TokenTally", f"+callbacks.tally.out_dir={root / 'tally'}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
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


def _train_config():
    """The DDP run's config as composed for it (same overrides), for rebuilding its data here."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tests.conftest import CONF, TINY

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name="train", overrides=[*TINY, "trainer=ddp_sim"])
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def data(ddp_run: tuple[Path, str]):
    """The run's data module, rebuilt in this single process (same corpus, tokenizer cache and seed)."""
    from omegaconf import OmegaConf

    from sectional_moe.data import LMDataModule
    from sectional_moe.models.spec import spec_from_config

    cfg = _train_config()
    dm = LMDataModule(**OmegaConf.to_container(cfg.data, resolve=True), seq_len=spec_from_config(cfg).seq_len,
                      cache_dir=cfg.paths.cache_dir, seed=cfg.seed)
    dm.prepare_data()
    return dm


def _shard(dataset_len: int, rank: int, *, shuffle: bool, seed: int = 0) -> list[int]:
    from sectional_moe.data.sampler import ShardedSampler

    return ShardedSampler(dataset_len, shuffle=shuffle, seed=seed, rank=rank, world_size=WORLD).shard(0).tolist()


def test_global_token_count_is_what_the_ranks_consumed(ddp_run: tuple[Path, str], data) -> None:
    run_dir, _ = ddp_run
    tallies = [json.loads((run_dir.parents[3] / "tally" / f"tally-rank{r}.json").read_text()) for r in range(WORLD)]
    with (run_dir / "csv" / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("perf/tokens")]
    logged = float(max(rows, key=lambda r: int(r["step"]))["perf/tokens"])
    assert logged == sum(t["tokens"] for t in tallies)  # the global counter: both ranks' real batches
    # each rank trained its own shard of the sampler's epoch order, batch by batch: nothing shared, nothing skipped
    train = data.train_dataloader().dataset
    for rank, tally in enumerate(tallies):
        expected = [fingerprint(train[i]) for i in _shard(len(train), rank, shuffle=True, seed=data.seed)[: STEPS * BATCH]]
        assert tally["blocks"] == expected, f"rank {rank} did not train its sampler shard"
    assert not set(tallies[0]["blocks"]) & set(tallies[1]["blocks"])


def _single_process_loss(module, dataset, eval_batch_size: int) -> float:
    """Mean token NLL over exactly the blocks the DDP ranks evaluated (EVAL_BATCHES batches each)."""
    indices = [i for rank in range(WORLD) for i in _shard(len(dataset), rank, shuffle=False)[: EVAL_BATCHES * eval_batch_size]]
    batch = torch.stack([dataset[i] for i in indices])
    with torch.no_grad():
        nll = module.loss(batch, reduction="sum").nll
    return float(nll) / batch[:, 1:].numel()


def test_eval_losses_equal_a_single_process_evaluation(ddp_run: tuple[Path, str], data) -> None:
    from sectional_moe.training.module import LMModule

    run_dir, _ = ddp_run
    metrics = json.loads((run_dir / "metrics.json").read_text())

    def load(path: Path) -> LMModule:
        state = torch.load(path, weights_only=True)
        hp = state["hyper_parameters"]
        module = LMModule(hp["spec"], hp["optim"], hp["max_steps"])
        module.load_state_dict(state["state_dict"])
        return module.eval()

    ckpts = run_dir / "checkpoints"
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == STEPS  # the weights of the last validation
    val = _single_process_loss(load(ckpts / "last.ckpt"), data.val_dataloader().dataset, data.eval_batch_size)
    assert metrics["val/loss"] == pytest.approx(val, rel=1e-5)
    (best,) = ckpts.glob("best-step*.ckpt")  # trainer.test(ckpt_path="best")
    test = _single_process_loss(load(best), data.test_dataloader().dataset, data.eval_batch_size)
    assert metrics["test/loss"] == pytest.approx(test, rel=1e-5)


def test_checkpoint_holds_each_ranks_rng_state(ddp_run: tuple[Path, str]) -> None:
    from sectional_moe.training.rng import RNG_KEY

    states = torch.load(ddp_run[0] / "checkpoints" / "last.ckpt", weights_only=True)[RNG_KEY]
    assert len(states) == WORLD
    assert all(s["torch"].dtype == torch.uint8 and len(s["python"]["state"]) == 625 for s in states)
