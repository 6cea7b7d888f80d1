"""Run directories, their reuse and what lands in them; the optimiser's schedules; eval perplexity.

* a finished run directory is reused only by the same config: a changed config is refused with
  the keys that differ, and ``force=true`` starts over after moving the old outputs aside;
* CSV metrics are written next to every W&B run, whatever the logger list;
* the learning-rate schedules have the documented values;
* ``val/ppl`` is the exp of the token-weighted mean NLL, not a mean of per-batch perplexities.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sectional_moe.errors import ConfigError
from sectional_moe.optim import lr_multiplier
from sectional_moe.train import train


def test_a_finished_run_is_skipped_by_the_same_config_and_refused_by_another(compose, tmp_path):
    out = tmp_path / "run"
    first = train(compose("logger=csv"))
    assert (out / "DONE").is_file() and (out / "run_config.json").is_file()
    assert train(compose("logger=csv")) == first  # same config: nothing to do, the old metrics
    with pytest.raises(ConfigError) as err:
        train(compose("logger=csv", "optim.lr=0.02"))  # a yaml edit the directory name does not show
    assert err.value.key == "force" and "optim.lr: 0.003 -> 0.02" in str(err.value)
    assert "force=true" in str(err.value)
    assert json.loads((out / "status.json").read_text())["state"] == "done"
    # paths, loggers and the MFU denominator do not change what a run computes
    assert train(compose("logger=none", "hardware.peak_tflops=1.0")) == first


def test_force_moves_the_old_outputs_aside_and_trains_from_scratch(compose, tmp_path):
    out = tmp_path / "run"
    train(compose("logger=csv", "trainer.log_every_n_steps=1"))
    old_rows = (out / "csv" / "metrics.csv").read_text()
    train(compose("logger=csv", "trainer.log_every_n_steps=1", "optim.lr=0.02", "force=true"))
    archived = out / "replaced" / "0"
    assert (archived / "DONE").is_file() and (archived / "csv" / "metrics.csv").read_text() == old_rows
    assert list((archived / "checkpoints").glob("*.ckpt"))
    new_rows = (out / "csv" / "metrics.csv").read_text().splitlines()
    assert len([r for r in new_rows[1:] if r.split(",")[0]]) >= 12  # a full fresh curve, not an append
    assert json.loads((out / "run_config.json").read_text())["optim.lr"] == 0.02


def test_csv_metrics_sit_next_to_a_wandb_only_run(compose, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    train(compose("logger=wandb", "logger.wandb.mode=disabled"))
    assert (tmp_path / "run" / "csv" / "metrics.csv").is_file()


@pytest.mark.parametrize("schedule,step,expected", [
    ("cosine", 0, 0.1), ("cosine", 9, 1.0), ("cosine", 10, 1.0), ("cosine", 55, 0.1 + 0.9 * 0.5), ("cosine", 100, 0.1),
    ("wsd", 9, 1.0), ("wsd", 79, 1.0), ("wsd", 80, 1.0), ("wsd", 90, 1.0 - 0.9 * 0.5), ("wsd", 100, 0.1),
    ("constant", 0, 0.1), ("constant", 99, 1.0),
])
def test_learning_rate_schedules(schedule, step, expected):
    # warmup 10 steps, 100 steps in all, floor 0.1; wsd cools down over the last 20 %
    got = lr_multiplier(step, schedule=schedule, warmup_steps=10, max_steps=100, min_lr_ratio=0.1, decay_frac=0.2)
    assert got == pytest.approx(expected, abs=1e-12)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_multiplier(0, schedule="linear", warmup_steps=0, max_steps=10, min_lr_ratio=0.1)


def test_validation_perplexity_weights_every_token_equally():
    """Two batches with different token counts: exp(sum NLL / sum tokens), not the mean of two ppls."""
    from sectional_moe.lit import LMModule
    from sectional_moe.spec import ModelSpec

    spec = ModelSpec(family="dense", routing=None, experts=None, vocab_size=50, d_model=16, n_layers=1, n_heads=2,
                     n_kv_heads=1, d_ff=32, seq_len=8).validate()
    module = LMModule(spec.to_dict(), {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0,
                                       "schedule": "constant", "warmup_steps": 0, "min_lr_ratio": 0.1}, max_steps=1)
    logged: dict[str, torch.Tensor] = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, value)  # type: ignore[method-assign]
    torch.manual_seed(0)
    batches = [torch.randint(0, 50, (3, 9)), torch.randint(0, 50, (1, 5))]  # 24 and 4 target tokens
    sums, counts = [], []
    for b in batches:
        module.validation_step(b, 0)
        nll, _ = module._nll(b, reduction="sum")
        sums.append(nll.item())
        counts.append(b[:, 1:].numel())
    module.on_validation_epoch_end()
    mean_nll = sum(sums) / sum(counts)
    assert logged["val/loss"].item() == pytest.approx(mean_nll, rel=1e-6)
    assert logged["val/ppl"].item() == pytest.approx(math.exp(mean_nll), rel=1e-6)
    per_batch_mean = sum(math.exp(s / c) for s, c in zip(sums, counts)) / 2
    assert abs(logged["val/ppl"].item() - per_batch_mean) > 1e-3  # the two definitions differ here


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bf16 autocast on GPU)")
def test_every_family_trains_a_step_under_cuda_bf16_autocast():
    from sectional_moe.models import ModelSpec, build_model

    for family, routing in (("dense", None), ("moe", "topk"), ("sectional", "segment_fixed"), ("sectional", "topk")):
        spec = ModelSpec(family=family, routing=routing, experts=None if family == "dense" else 4, vocab_size=97,
                         d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, seq_len=32).validate()
        model = build_model(spec).cuda()
        ids = torch.randint(0, 97, (2, 32), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, _ = model(ids)
        logits.float().logsumexp(-1).mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_the_wandb_id_lives_with_the_run_directory(compose, tmp_path, monkeypatch):
    """A restart reads the directory's id; a forced re-run or a fresh directory draws a new one."""
    from sectional_moe.train import main
    from sectional_moe.wandb_files import read_run, run_dirs

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    main(compose("logger=[wandb,csv]"))  # main() closes each W&B run, as every real job does
    first = (out / "wandb_id").read_text().strip()
    (out / "DONE").unlink()  # as if killed after the last checkpoint: the restart resumes it
    main(compose("logger=[wandb,csv]"))
    assert (out / "wandb_id").read_text().strip() == first
    attempts = run_dirs(out)
    assert len(attempts) == 2 and {read_run(d)["run"]["id"] for d in attempts} == {first}  # one W&B run, two attempts
    main(compose("logger=[wandb,csv]", "force=true"))
    second = (out / "wandb_id").read_text().strip()
    assert second != first and (out / "replaced" / "0" / "wandb_id").read_text().strip() == first
    assert [read_run(d)["run"]["id"] for d in run_dirs(out)] == [second]  # the old W&B files moved aside too
    main(compose("logger=[wandb,csv]", output_dir=tmp_path / "elsewhere"))
    assert (tmp_path / "elsewhere" / "wandb_id").read_text().strip() not in (first, second)


def test_a_wandb_run_left_open_in_the_process_is_not_reused(compose, tmp_path, monkeypatch):
    """train() called twice in one process without closing W&B: each run still gets its own W&B run."""
    from sectional_moe.wandb_files import read_run, run_dirs

    monkeypatch.setenv("WANDB_MODE", "offline")
    train(compose("logger=[wandb,csv]", output_dir=tmp_path / "a"))
    train(compose("logger=[wandb,csv]", output_dir=tmp_path / "b"))
    import wandb

    wandb.finish()
    ids = [read_run(d)["run"]["id"] for name in ("a", "b") for d in run_dirs(tmp_path / name)]
    assert len(ids) == 2 and ids[0] != ids[1]
