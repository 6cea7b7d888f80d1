"""Training on the embedded Shakespeare corpus, in-process and through the real command line.

* a small model's validation loss falls well below the unigram baseline;
* every family x routing trains (its validation loss falls from the untrained value);
* the same seed and config give the same loss curve;
* one real ``python train.py`` run writes checkpoints, CSV metrics and an offline W&B run whose
  logged metrics are read back from the run files.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from sectional_moe.training.run import train
from sectional_moe.tracking.wandb_files import read_run, run_dirs
from tests.conftest import run_train_cli

# long enough to learn more than unigram statistics, short enough for CI (nano, 512-token vocab)
LEARN = [
    "data.batch_size=16",
    "trainer.max_steps=120",
    "trainer.val_check_interval=60",
    "trainer.limit_val_batches=12",
    "trainer.limit_test_batches=12",
    "optim.warmup_steps=10",
    "optim.lr=1e-2",
]


def _csv_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "csv" / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _series(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def test_dense_model_beats_the_unigram_baseline_by_a_wide_margin(compose, tmp_path):
    from sectional_moe.data import LMDataModule

    cfg = compose("model=dense", *LEARN)
    metrics = train(cfg)
    dm = LMDataModule(**{k: v for k, v in cfg.data.items()}, seq_len=cfg.size.seq_len, cache_dir=cfg.paths.cache_dir)
    dm.prepare_data()
    unigram = dm.unigram_ppl("validation")
    assert 100 < unigram < 400  # add-one unigram at vocab 512 (a sanity bound on the baseline itself)
    assert metrics["val/ppl"] < 0.6 * unigram, (metrics["val/ppl"], unigram)
    assert math.isfinite(metrics["test/ppl"]) and metrics["test/ppl"] < 0.6 * unigram


@pytest.mark.parametrize(
    "family,routing",
    [("moe", "topk"), ("moe", "hash"), ("sectional", "segment_fixed"), ("sectional", "topk"), ("sectional", "hash")],
)
def test_each_family_and_routing_learns(compose, family, routing):
    cfg = compose(f"model={family}", f"routing={routing}", "experts=4", "logger=csv",
                  "trainer.max_steps=40", "trainer.val_check_interval=40", "trainer.limit_val_batches=6",
                  "trainer.log_every_n_steps=1", "optim.warmup_steps=4", "optim.lr=1e-2")
    metrics = train(cfg)
    losses = _series(_csv_rows(Path(cfg.paths.output_dir)), "train/loss")
    assert len(losses) == 40
    untrained = math.log(512)  # ~uniform prediction at std-0.02 init
    assert losses[0] == pytest.approx(untrained, abs=0.3)
    assert sum(losses[-5:]) / 5 < untrained - 1.0, losses[-5:]
    assert metrics["val/loss"] < untrained - 1.0


def test_same_seed_same_config_same_loss_curve(compose, tmp_path):
    curves = []
    for i in range(2):
        cfg = compose("logger=csv", "trainer.log_every_n_steps=1", "seed=3", output_dir=tmp_path / f"run{i}")
        train(cfg)
        curves.append(_series(_csv_rows(tmp_path / f"run{i}"), "train/loss"))
    assert len(curves[0]) == 12
    assert curves[0] == curves[1]
    cfg = compose("logger=csv", "trainer.log_every_n_steps=1", "seed=4", output_dir=tmp_path / "other")
    train(cfg)
    assert _series(_csv_rows(tmp_path / "other"), "train/loss") != curves[0]  # the seed matters


def test_cli_run_writes_checkpoints_csv_and_a_readable_offline_wandb_run(tmp_path):
    run_dir = tmp_path / "cli-run"
    proc = run_train_cli(
        "size=nano", "data.vocab_size=512", "data.batch_size=8", "trainer.max_steps=10",
        "trainer.val_check_interval=5", "trainer.limit_val_batches=3", "trainer.limit_test_batches=3",
        "trainer.log_every_n_steps=2", "trainer.enable_progress_bar=false", "optim.warmup_steps=2",
        "experts=2", "routing=topk", f"hydra.run.dir={run_dir}",
        cwd=tmp_path, env={"WANDB_MODE": "offline"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final:" in proc.stdout and "test/ppl=" in proc.stdout and "baselines val ppl: unigram=" in proc.stdout and " bigram=" in proc.stdout

    # every output lands in the run directory, none in the working directory
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "checkpoints").glob("best-step*.ckpt"))
    assert (run_dir / "DONE").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    assert json.loads((run_dir / "status.json").read_text())["state"] == "done"
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "wandb").exists()

    rows = _csv_rows(run_dir)
    assert len(_series(rows, "train/loss")) == 5  # steps 2, 4, ..., 10
    val_csv = _series(rows, "val/loss")
    assert len(val_csv) == 2

    (wandb_dir,) = run_dirs(run_dir)  # <run dir>/wandb/offline-run-*
    run = read_run(wandb_dir)
    assert run["run"]["name"].startswith("data.batch_size=8,data.vocab_size=512,experts=2,")  # from the overrides
    assert run["run"]["name"] in proc.stdout and "routing=topk" in run["run"]["name"]
    # logged config: flat, with the family/routing keys dashboards group by, and derived quantities
    assert run["config"]["family"] == "sectional" and run["config"]["routing.name"] == "topk"
    assert run["config"]["experts"] == 2 and run["config"]["size.name"] == "nano"
    assert run["config"]["params/total"] > run["config"]["params/active"] > 0
    # derived run-config keys, against the model the checkpoint holds
    import torch

    from sectional_moe.models.flops import flops_per_token, param_counts
    from sectional_moe.models.spec import ModelSpec

    spec = ModelSpec.from_dict(torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]["spec"])
    config = run["config"]
    assert config["device_name"] == ("cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name())
    assert config["world_size"] == 1
    assert config["global_batch_tokens"] == 8 * spec.seq_len * config["trainer.accumulate_grad_batches"] == 8 * 64
    assert config["flops/per_token"] == pytest.approx(flops_per_token(spec, training=True))
    assert config["params/active"] == pytest.approx(param_counts(spec)["active"])
    history = run["history"]
    wandb_val = [row["val/loss"] for row in history if "val/loss" in row]
    assert wandb_val == pytest.approx(val_csv)  # W&B and CSV hold the same numbers
    assert any("moe/lb_loss" in row for row in history) and any("perf/tokens_per_s" in row for row in history)
    assert run["summary"]["test/ppl"] == pytest.approx(json.loads((run_dir / "metrics.json").read_text())["test/ppl"])
    assert run["exit_code"] == 0


def test_a_job_never_attaches_to_the_wandb_service_of_the_process_that_launched_it():
    """An inherited ``WANDB_SERVICE`` (the launcher's, pytest's, a notebook's) is dropped; our own is kept."""
    import os

    from sectional_moe.tracking.loggers import detach_inherited_wandb_service

    parent = {"WANDB_SERVICE": f"3-{os.getppid()}-unix-/tmp/wandb-core.sock", "OTHER": "x"}
    assert detach_inherited_wandb_service(parent) and parent == {"OTHER": "x"}
    garbled = {"WANDB_SERVICE": "not-a-token"}
    assert detach_inherited_wandb_service(garbled) and garbled == {}
    own = {"WANDB_SERVICE": f"3-{os.getpid()}-tcp-localhost-4242"}
    assert not detach_inherited_wandb_service(own) and own["WANDB_SERVICE"].endswith("4242")
    assert not detach_inherited_wandb_service({})
