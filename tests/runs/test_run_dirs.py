"""Run directories, their reuse and what lands in them.

* a finished run directory is reused only by the same config: a changed config is refused with
  the keys that differ, and ``force=true`` starts over after moving the old outputs aside;
* CSV metrics are written next to every W&B run, whatever the logger list;
* the W&B id lives with the run directory.
"""

from __future__ import annotations

import json

import pytest

from sectional_moe.errors import ConfigError
from sectional_moe.training.run import train


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


def test_the_wandb_id_lives_with_the_run_directory(compose, tmp_path, monkeypatch):
    """A restart reads the directory's id; a forced re-run or a fresh directory draws a new one."""
    from sectional_moe.training.run import main
    from sectional_moe.tracking.wandb_files import read_run, run_dirs

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
    from sectional_moe.tracking.wandb_files import read_run, run_dirs

    monkeypatch.setenv("WANDB_MODE", "offline")
    train(compose("logger=[wandb,csv]", output_dir=tmp_path / "a"))
    train(compose("logger=[wandb,csv]", output_dir=tmp_path / "b"))
    import wandb

    wandb.finish()
    ids = [read_run(d)["run"]["id"] for name in ("a", "b") for d in run_dirs(tmp_path / name)]
    assert len(ids) == 2 and ids[0] != ids[1]
