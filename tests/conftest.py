"""Shared fixtures: configs composed in-process with ``hydra.compose`` (lightning-hydra-template style).

Tests never touch the network: W&B is offline or off, HF datasets/hub are offline, and the
tokenizer/dataset cache lives in one temporary directory per test session (so the tokenizer is
trained once per session, not once per test).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

_SESSION_CACHE = Path(tempfile.mkdtemp(prefix="smoe-test-cache-"))
os.environ.setdefault("SECTIONAL_MOE_CACHE", str(_SESSION_CACHE))
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_SILENT"] = "true"
os.environ.pop("WANDB_API_KEY", None)  # a developer's key must never make a test go online
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests use tiny tensors: one intra-op thread is as fast as two there, makes float reductions
# reproducible, and avoids OpenMP spin-waits collapsing throughput when processes share the cores
# (subprocesses inherit it). SMOE_TEST_THREADS=2 to override.
os.environ["OMP_NUM_THREADS"] = os.environ.get("SMOE_TEST_THREADS", "1")

# the fastest run that still exercises everything: nano model, 512-token vocabulary, few steps
TINY = [
    "size=nano",
    "data.vocab_size=512",
    "data.batch_size=8",
    "trainer.max_steps=12",
    "trainer.val_check_interval=6",
    "trainer.limit_val_batches=3",
    "trainer.limit_test_batches=3",
    "trainer.log_every_n_steps=2",
    "trainer.enable_progress_bar=false",
    "optim.warmup_steps=2",
    "logger=none",
]


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture
def compose(tmp_path: Path) -> Callable[..., "DictConfig"]:  # noqa: F821
    """compose(*overrides, tiny=True) -> the composed train config, writing into tmp_path/run."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sectional_moe import resolvers

    resolvers.register()

    def _compose(*overrides: str, tiny: bool = True, output_dir: Path | None = None):
        GlobalHydra.instance().clear()
        out = output_dir or tmp_path / "run"
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return hydra_compose(
                config_name="train",
                overrides=[*(TINY if tiny else []), f"paths.output_dir={out}", *overrides],
            )

    yield _compose
    GlobalHydra.instance().clear()


def run_train_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python train.py ARGS`` as a user would (a real subprocess)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=full_env,
        capture_output=True, text=True, timeout=timeout,
    )
