"""Issue 19's fault table, one test (or more) per fault, each asserting what now happens.

| # | fault | test |
|---|---|---|
| 1, 2 | a secret pasted into an override / an override whose key names a secret | test_sigterm_then_resume_then_refused_rerun (its command carries them) |
| 3 | a finished run re-run with a changed key | test_a_refused_rerun_changes_no_file, test_sigterm_then_resume_then_refused_rerun |
| 4 | the same command twice at once | test_the_same_command_twice_at_once (+ tests/runs/test_lock.py) |
| 5 | disk full / file-size limit while checkpointing | test_disk_full_while_checkpointing, test_file_size_limit_while_checkpointing |
| 6 | SIGTERM or Ctrl-C outside SLURM | test_sigterm_then_resume_then_refused_rerun, test_ctrl_c_saves_and_exits_130, test_sigterm_before_training |
| 7 | ``compile=maybe`` | test_bad_input.py CONFIG_CASES (strict-bool-*), test_every_boolean_key_is_strict |
| 8 | a model that cannot fit | test_bad_input.py CONFIG_CASES (model-cannot-fit), test_memory_check_can_be_overridden |
| 9 | a binary or Latin-1 data file | tests/data/test_textfiles.py |
| 10 | WANDB_API_KEY malformed / no network | tests/tracking/test_wandb_startup.py, test_malformed_wandb_key_goes_offline_and_says_so |
| 11 | ``seed=-1``, ``trainer.devices=0`` | test_bad_input.py CONFIG_CASES (seed-*, devices-*) |
| 12 | ``task_name=../../X`` | test_bad_input.py CONFIG_CASES + test_cli_prints_one_line_and_exits_2[task-name-traversal] |
| 13 | Hydra-level errors | test_bad_input.py test_cli_prints_one_line_and_exits_2 (unknown-key, typo, unicode) |
| 14 | kill before the first checkpoint, then rerun | test_crash_before_the_first_checkpoint_leaves_no_duplicate_steps |
"""

from __future__ import annotations

import builtins
import csv
import errno
import io
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest

from sectional_moe.runs import checkpoints
from sectional_moe.runs.checkpoints import verify_checkpoint
from sectional_moe.training import run as train_mod
from tests.conftest import REPO
from tests.training.test_bad_input import expect_one_line, no_compute  # noqa: F401 - fixture

# ------------------------------------------------------------------------------- helpers
TINY_CLI = ["size=nano", "data.vocab_size=512", "data.batch_size=8", "trainer=cpu", "trainer.val_check_interval=4",
            "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "trainer.log_every_n_steps=1",
            "optim.warmup_steps=2", "trainer.enable_progress_bar=false"]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", **extra}


def _steps(run: Path) -> list[int]:
    with (run / "csv" / "metrics.csv").open(newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def _wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended (rc {proc.returncode}) before {what}: {proc.stdout.read() if proc.stdout else ''}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _max_step(run: Path) -> int:
    try:
        return max(_steps(run), default=-1)
    except (OSError, ValueError, KeyError):
        return -1


class RaiseAt(pl.Callback):
    """Raise at the start of optimiser step ``step`` (a crash, or a kill, before any checkpoint)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("killed before the first checkpoint (injected)")


class SignalAt(pl.Callback):
    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


# ------------------------------------------------------------------------------- faults 1, 2, 3, 6, 14 (real CLI)
KEY = "0123456789abcdef0123456789abcdef01234567"  # the user's W&B key, pasted into an override
TOKEN, SHORT = "hf_Zq7xQ9wAbCdEfGh", "Zq7xQ9w"  # under secret-named keys; SHORT is below the 8 characters free text needs


def _no_secret_anywhere(run: Path, *texts: str) -> None:
    """Not in .hydra/, train.log, the run name or directory, the W&B run file (which records the
    command line and run metadata), the CSV hparams, the status, the console."""
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and (run / ".hydra" / "overrides.yaml").is_file()
    hits = [(str(p.relative_to(run)), s) for p in files for s in (KEY, TOKEN, SHORT) if s.encode() in p.read_bytes()]
    assert hits == []
    assert not any(s in t for s in (KEY, TOKEN, SHORT) for t in texts)
    assert not any(s in str(p) for p in files for s in (KEY, TOKEN, SHORT))  # names and directories
    overrides = (run / ".hydra" / "overrides.yaml").read_text()
    assert "+hf_token=***REDACTED***" in overrides and "+db_password=***REDACTED***" in overrides


def test_sigterm_then_resume_then_refused_rerun(tmp_path):
    """SIGTERM mid-run: last.ckpt at the next step, status interrupted, exit 143. The same command
    resumes in the same W&B run and leaves every step once in the CSV. A re-run of the finished run
    with a changed key is refused and changes no file of it (Hydra no longer rewrites .hydra/).
    The command carries secrets: pasted (``+notes=$WANDB_API_KEY``) and under secret-named keys;
    none of them is found anywhere afterwards (faults 1 and 2)."""
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "train.py"), *TINY_CLI, "trainer.max_steps=16", "logger=[wandb,csv]",
           "logger.wandb.mode=offline", f"+notes={KEY}", f"+hf_token={TOKEN}", f"+db_password={SHORT}", f"hydra.run.dir={run}"]
    env = _env(WANDB_API_KEY=KEY)
    victim = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: _max_step(run) >= 5, 400, victim, "step 5")
        victim.send_signal(signal.SIGTERM)
        out, _ = victim.communicate(timeout=120)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == 143, out[-3000:]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted" and "SIGTERM at step" in status["error"], status
    saved = verify_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"]
    assert saved >= 6 and f"SIGTERM at step {saved}" in status["error"]
    first_id = (run / "wandb_id").read_text().strip()
    assert "Traceback" not in out

    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run / "wandb_id").read_text().strip() == first_id  # the same W&B run continues
    assert sorted({p.name.rsplit("-", 1)[-1] for p in (run / "wandb").glob("offline-run-*")}) == [first_id]
    assert _steps(run) == list(range(16))  # every step once
    assert json.loads((run / "status.json").read_text())["state"] == "done"

    before = _snapshot(run)
    refused = subprocess.run([*cmd, "optim.lr=1e-3"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, refused.stderr[-3000:]
    lines = [ln for ln in refused.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "differs in optim.lr" in lines[0] and "force=true" in lines[0], refused.stderr[-2000:]
    assert _snapshot(run) == before  # not one byte, not one mtime
    _no_secret_anywhere(run, out, again.stdout, again.stderr, refused.stdout, refused.stderr)


def test_a_refused_rerun_changes_no_file(compose, capsys, tmp_path):
    train_mod.main(compose("logger=csv"))
    run = tmp_path / "run"
    before = _snapshot(run)
    for changed in (["optim.lr=1e-3"], ["experts=3"]):  # a different config; an invalid one
        line = expect_one_line(capsys, lambda: train_mod.main(compose("logger=csv", *changed)))
        assert line.startswith(("error: force: ", "error: experts: ")), line
    assert _snapshot(run) == before
    assert json.loads((run / "status.json").read_text())["state"] == "done"


def test_crash_before_the_first_checkpoint_leaves_no_duplicate_steps(compose, tmp_path, monkeypatch):
    """Killed at step 3 (no checkpoint yet): the rerun starts from scratch, drops the dead attempt's
    CSV rows and gets a new W&B id; every step appears once."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    crash = compose("logger=[csv,wandb]", "logger.wandb.mode=offline", "trainer.log_every_n_steps=1",
                    "+callbacks.crash._target_=tests.training.test_faults.RaiseAt", "+callbacks.crash.step=3")
    with pytest.raises(RuntimeError, match="injected"):
        train_mod.main(crash)
    run = tmp_path / "run"
    assert _steps(run) == [0, 1, 2] and not (run / "checkpoints" / "last.ckpt").exists()
    dead_id = (run / "wandb_id").read_text().strip()
    train_mod.main(compose("logger=[csv,wandb]", "logger.wandb.mode=offline", "trainer.log_every_n_steps=1"))
    assert _steps(run) == list(range(12))
    new_id = (run / "wandb_id").read_text().strip()
    assert new_id != dead_id  # a run that restarts from scratch is a new W&B run


# ------------------------------------------------------------------------------- fault 4
class WaitFor(pl.Callback):
    """Hold training at step ``step`` until ``marker`` exists (a run that is still going)."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, Path(marker)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        deadline = time.time() + 300
        while trainer.global_step == self.step and not self.marker.exists() and time.time() < deadline:
            time.sleep(0.05)


def test_the_same_command_twice_at_once(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "go-on"
    cmd = [sys.executable, str(REPO / "train.py"), *TINY_CLI, "trainer.max_steps=8", "logger=csv", f"hydra.run.dir={run}",
           "+callbacks.hold._target_=tests.training.test_faults.WaitFor", "+callbacks.hold.step=3", f"+callbacks.hold.marker={marker}"]
    first = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: _max_step(run) >= 1, 400, first, "the first run's training")
        started = time.time()
        second = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
        took = time.time() - started
        marker.touch()
        out, _ = first.communicate(timeout=400)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2, second.stderr[-3000:]
    lines = [ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and f"in use by pid {first.pid} on host" in lines[0], second.stderr[-2000:]
    assert "Traceback" not in second.stderr and took < 60
    assert first.returncode == 0, out[-3000:]
    assert _steps(run) == list(range(8)) and json.loads((run / "status.json").read_text())["attempt"] == 1
    assert not (run / ".run.lock").exists()


# ------------------------------------------------------------------------------- fault 5
class FullDisk:
    """``open`` for the checkpoint writer whose writes fail with ENOSPC once ``active``."""

    active = False

    class File(io.FileIO):
        def write(self, b) -> int:  # noqa: ANN001
            raise OSError(errno.ENOSPC, "No space left on device")

    @classmethod
    def open(cls, file, mode="r", *args, **kwargs):  # noqa: ANN001
        if cls.active and "w" in mode and "b" in mode:
            return cls.File(file, "wb")
        return builtins.open(file, mode, *args, **kwargs)


class FillDiskAt(pl.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            FullDisk.active = True


class FileSizeLimitAt(pl.Callback):
    """Lower RLIMIT_FSIZE below a checkpoint's size at ``step`` (the OS then refuses with EFBIG)."""

    saved: tuple[int, int] | None = None

    def __init__(self, step: int, limit: int = 200_000):
        self.step, self.limit = step, limit

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            FileSizeLimitAt.saved = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, FileSizeLimitAt.saved[1]))


def _checkpoint_failure(compose, capsys, tmp_path, callback: str, fragment: str) -> None:
    cfg = compose("logger=csv", "trainer.log_every_n_steps=1", f"+callbacks.fault._target_=tests.training.test_faults.{callback}",
                  "+callbacks.fault.step=7")
    line = expect_one_line(capsys, lambda: train_mod.main(cfg), code=1)
    ckpts = tmp_path / "run" / "checkpoints"
    assert line.startswith("error: checkpoint: ") and fragment in line and str(ckpts) in line, line
    assert "run the same command to resume" in line
    assert verify_checkpoint(ckpts / "last.ckpt")["global_step"] == 6  # the previous one, intact
    assert not [p for p in ckpts.iterdir() if p.name.endswith(".tmp")]
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "failed"


def test_disk_full_while_checkpointing(compose, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "open", FullDisk.open, raising=False)
    try:
        _checkpoint_failure(compose, capsys, tmp_path, "FillDiskAt", "no space left on")
    finally:
        FullDisk.active = False
    train_mod.main(compose("logger=csv", "trainer.log_every_n_steps=1"))  # room again: resumes from step 6
    assert verify_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 12
    assert _steps(tmp_path / "run") == list(range(12))


def test_file_size_limit_while_checkpointing(compose, capsys, tmp_path):
    try:
        _checkpoint_failure(compose, capsys, tmp_path, "FileSizeLimitAt", "the file-size limit (ulimit -f) was reached")
    finally:
        if FileSizeLimitAt.saved is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, FileSizeLimitAt.saved)


# ------------------------------------------------------------------------------- fault 6 (in-process)
def test_ctrl_c_saves_and_exits_130(compose, capsys, tmp_path):
    cfg = compose("logger=csv", "trainer.log_every_n_steps=1", "+callbacks.sig._target_=tests.training.test_faults.SignalAt",
                  "+callbacks.sig.step=3",
                  f"+callbacks.sig.signum={int(signal.SIGINT)}")
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as exc:
        train_mod.main(cfg)
    assert exc.value.code == 130
    assert signal.getsignal(signal.SIGINT) == before  # handlers restored
    run = tmp_path / "run"
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted" and status["error"].startswith("SIGINT (Ctrl-C) at step 4"), status
    assert verify_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 4
    assert "Ctrl-C: saving a checkpoint after this step" in capsys.readouterr().err
    train_mod.main(compose("logger=csv", "trainer.log_every_n_steps=1"))
    assert _steps(run) == list(range(12))


def test_sigterm_before_training_is_interrupted_not_running(compose, capsys, tmp_path, monkeypatch):
    """A cluster's SIGTERM while the data is prepared: one line, status interrupted, exit 143."""
    from sectional_moe.data import LMDataModule

    def prepare(self):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)

    monkeypatch.setattr(LMDataModule, "prepare_data", prepare)
    with pytest.raises(SystemExit) as exc:
        train_mod.main(compose("logger=csv"))
    assert exc.value.code == 143
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "interrupted"
    assert "interrupted (SIGTERM)" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None) or callable(signal.getsignal(signal.SIGTERM))


# ------------------------------------------------------------------------------- fault 7
def test_every_boolean_key_is_strict():
    """Every key that is a boolean in any option of any config group is in STRICT_BOOLS."""
    from omegaconf import OmegaConf

    from sectional_moe.runs.identity import flatten
    from sectional_moe.studies.runner import config_composer
    from sectional_moe.training.validate import STRICT_BOOLS

    conf = REPO / "conf"
    found: set[str] = set()
    with config_composer() as compose_cfg:
        for group in ("size", "model", "data", "optim", "trainer", "logger", "callbacks", "debug", "experiment", "routing"):
            for option in sorted(p.stem for p in (conf / group).glob("*.yaml")):
                extra = ["data.train_files=[a]", "data.val_files=[a]"] if option == "text_files" else []
                flat = flatten(OmegaConf.to_container(compose_cfg([f"{group}={option}", *extra]), resolve=False))
                found |= {k for k, v in flat.items() if isinstance(v, bool)}
    assert found and found <= set(STRICT_BOOLS), sorted(found - set(STRICT_BOOLS))


# ------------------------------------------------------------------------------- fault 8
def test_memory_check_can_be_overridden(compose, no_compute):
    cfg = compose("size.d_model=16384", "size.n_layers=48", "memory_check=false")
    with pytest.raises(AssertionError, match="compute started"):  # past every check, at the model: the tripwire
        train_mod.train(cfg)


# ------------------------------------------------------------------------------- fault 10 (in the run)
def test_malformed_wandb_key_goes_offline_and_says_so(compose, capsys, no_compute, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "not-a-key")
    cfg = compose("logger=[wandb,csv]")
    started = time.time()
    with pytest.raises(AssertionError, match="compute started"):
        train_mod.train(cfg)
    assert time.time() - started < 30
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("warning: logger.wandb:")]
    assert len(lines) == 1 and "offline for this run" in lines[0] and "malformed" in lines[0], err
    assert cfg.logger.wandb.mode == "offline"


def test_wandb_online_with_a_malformed_key_refuses_to_start(compose, capsys, no_compute, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", "not-a-key")
    line = expect_one_line(capsys, lambda: train_mod.main(compose("logger=[wandb,csv]", "logger.wandb.mode=online")))
    assert line.startswith("error: logger.wandb.mode: mode=online but the API key in WANDB_API_KEY is malformed")
    assert "logger.wandb.mode=offline" in line
