"""Crash safety, the NaN guard, sweep fault isolation and secret hygiene.

In-process: checkpoint integrity and fallback, the NaN guard (NaN injected by patching the training
step or by a gradient-poisoning callback). Real ``python train.py`` subprocesses: a ``kill -9`` in the
middle of training followed by the same command (the loss curve must continue exactly as an
uninterrupted reference run's), and a 3-job multirun with one crashing and one misconfigured job,
launched twice. Fake secrets are set in the environment of those subprocesses and the run
directories are then searched for them byte by byte.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from sectional_moe import train as train_mod
from sectional_moe.checkpointing import (
    CorruptCheckpoint, atomic_save, read_stamp, select_resume_checkpoint, verify_checkpoint,
)
from sectional_moe.errors import ConfigError
from sectional_moe.lit import LMModule

REPO = Path(__file__).resolve().parents[1]


# ================================================================== helpers used inside subprocess jobs
class FailOnce(pl.Callback):
    """Raise in the job with ``experts`` while ``marker`` exists (and delete it): a one-off crash."""

    def __init__(self, experts: int, marker: str):
        self.experts, self.marker = experts, Path(marker)

    def on_train_start(self, trainer, pl_module) -> None:
        if pl_module.spec.experts == self.experts and self.marker.exists():
            self.marker.unlink()
            raise RuntimeError("injected crash in one sweep job")


class PoisonGrad(pl.Callback):
    """Put an Inf into one gradient at optimiser step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step == self.step:
            p = next(p for p in pl_module.parameters() if p.grad is not None)
            p.grad.view(-1)[0] = float("inf")


# ================================================================== checkpoint files
def _state(step: int = 7) -> dict:
    return {"state_dict": {"w": torch.arange(1000, dtype=torch.float32)}, "global_step": step}


def test_atomic_save_stamps_and_verifies(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    atomic_save(_state(), path)
    assert read_stamp(path) is not None
    assert verify_checkpoint(path)["global_step"] == 7
    assert torch.load(path, weights_only=True)["global_step"] == 7  # still a plain torch checkpoint
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temp file left


def test_truncated_and_bit_flipped_checkpoints_are_detected(tmp_path):
    path = tmp_path / "a.ckpt"
    atomic_save(_state(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CorruptCheckpoint):
        verify_checkpoint(path)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # inside tensor bytes: torch.load alone would not notice
    path.write_bytes(bytes(flipped))
    torch.load(path, weights_only=True)  # loads fine...
    with pytest.raises(CorruptCheckpoint, match="CRC-32 mismatch"):
        verify_checkpoint(path)  # ...but the stamp catches it


def test_interrupted_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_save(_state(1), path)

    def dies_halfway(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # e.g. a signal in the middle of the write

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        atomic_save(_state(2), path)
    monkeypatch.undo()
    assert verify_checkpoint(path)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_corrupt_last_falls_back_to_previous(tmp_path, capsys):
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    atomic_save(_state(4), ckpt)
    atomic_save(_state(8), ckpt)  # the step-4 file survives as last.ckpt.prev
    assert verify_checkpoint(ckpt.with_name("last.ckpt.prev"))["global_step"] == 4
    ckpt.write_bytes(ckpt.read_bytes()[:5000])  # truncated by a full disk, say
    path, state = select_resume_checkpoint("auto", tmp_path)
    assert path == str(ckpt.with_name("last.ckpt.prev")) and state["global_step"] == 4
    out = capsys.readouterr().out
    assert "last.ckpt is corrupt" in out and "resuming from the previous checkpoint" in out
    assert ckpt.with_name("last.ckpt.corrupt").is_file() and not ckpt.exists()
    # nothing readable left: a clear error instead of silently starting over
    ckpt.with_name("last.ckpt.prev").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="no readable checkpoint.*resume=never"):
        select_resume_checkpoint("auto", tmp_path)


# ================================================================== NaN / Inf guard (in-process)
NAN_RUN = ["trainer=cpu", "trainer.max_steps=8", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
           "optim.warmup_steps=1", "logger=csv", "test=false"]


def _poison_loss(monkeypatch, steps: set[int]) -> None:
    original = LMModule.training_step

    def poisoned(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if self.global_step in steps else loss

    monkeypatch.setattr(LMModule, "training_step", poisoned)


def _finite_weights(ckpt: Path) -> tuple[int, bool]:
    state = torch.load(ckpt, weights_only=True)
    return state["global_step"], all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


@pytest.fixture
def wandb_exit_codes(monkeypatch):
    codes: list[int] = []
    monkeypatch.setattr(train_mod, "_finish_wandb", lambda exit_code=0: codes.append(exit_code))
    return codes


def test_nan_loss_stops_with_step_and_metric(compose, capsys, tmp_path, monkeypatch, wandb_exit_codes):
    _poison_loss(monkeypatch, {5})
    cfg = compose(*NAN_RUN)
    with pytest.raises(SystemExit) as exc:
        train_mod.main(cfg)
    assert exc.value.code == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1
    assert "non-finite train/loss (nan) at step 5" in lines[0] and "stopped before the update" in lines[0]
    run = tmp_path / "run"
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and status["step"] == 5 and status["metric"] == "train/loss"
    assert wandb_exit_codes == [1]  # the W&B run is closed as failed
    step, finite = _finite_weights(run / "checkpoints" / "last.ckpt")
    assert step == 4 and finite  # the last good checkpoint, untouched
    assert not (run / "DONE").exists()
    # same numbering as the metrics: steps 0-4 were logged, step 5 never completed
    assert max(s for s, _ in _curve(run)) == 4


def test_inf_gradient_names_the_parameter(compose, capsys, monkeypatch, wandb_exit_codes):
    cfg = compose(*NAN_RUN, "+callbacks.poison._target_=tests.test_reliability.PoisonGrad", "+callbacks.poison.step=3")
    with pytest.raises(SystemExit):
        train_mod.main(cfg)
    err = capsys.readouterr().err
    assert re.search(r"non-finite grad/model\.\S+ \(inf\) at step 3", err), err


def test_skip_policy_skips_up_to_max_skips(compose, monkeypatch, tmp_path, wandb_exit_codes):
    _poison_loss(monkeypatch, {3, 5})
    cfg = compose(*NAN_RUN, "callbacks.nan_guard.policy=skip", "callbacks.nan_guard.max_skips=2")
    train_mod.main(cfg)  # two skips allowed: the run finishes
    run = tmp_path / "run"
    assert (run / "DONE").is_file() and wandb_exit_codes == [0]
    step, finite = _finite_weights(run / "checkpoints" / "last.ckpt")
    assert step == 8 and finite


def test_skip_policy_stops_after_max_skips(compose, capsys, monkeypatch, wandb_exit_codes):
    _poison_loss(monkeypatch, {2, 3, 6})
    cfg = compose(*NAN_RUN, "callbacks.nan_guard.policy=skip", "callbacks.nan_guard.max_skips=2")
    with pytest.raises(SystemExit) as exc:
        train_mod.main(cfg)
    assert exc.value.code == 1
    assert "at step 6" in capsys.readouterr().err and wandb_exit_codes == [1]


def test_device_flag_mode_reports_the_exact_step_and_writes_no_nan_checkpoint(compose, capsys, monkeypatch, tmp_path, wandb_exit_codes):
    """The accelerator path (no per-step host sync), forced on CPU: sync only every 4 steps."""
    from sectional_moe.callbacks.nan_guard import NanGuard

    start = NanGuard.on_train_start

    def device_mode(self, trainer, pl_module):
        start(self, trainer, pl_module)
        self._host_check = False

    monkeypatch.setattr(NanGuard, "on_train_start", device_mode)
    _poison_loss(monkeypatch, {5})
    cfg = compose(*NAN_RUN, "callbacks.nan_guard.sync_every_n_steps=4")
    with pytest.raises(SystemExit):
        train_mod.main(cfg)
    assert "non-finite train/loss at step 5" in capsys.readouterr().err
    step, finite = _finite_weights(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert step == 4 and finite  # the step-6 checkpoint (NaN weights) was refused


def test_finish_wandb_marks_failed(monkeypatch):
    calls = []

    class FakeWandb:
        run = object()

        @staticmethod
        def finish(exit_code=0):
            calls.append(exit_code)

    monkeypatch.setitem(sys.modules, "wandb", FakeWandb)
    train_mod._finish_wandb(exit_code=1)
    assert calls == [1]


# ================================================================== kill -9 and resume (subprocesses)
SECRETS = {"WANDB_API_KEY": "fakekey-0123456789abcdef0123456789abcdef", "MY_SERVICE_TOKEN": "tok-SECRET-5f3a9c2e7d",
           "DB_PASSWORD": "hunter2-but-longer"}
KILL_RUN = ["size=nano", "data.vocab_size=512", "data.batch_size=8", "trainer=cpu", "trainer.deterministic=true",
            "trainer.max_steps=20", "trainer.val_check_interval=4", "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1", "trainer.log_every_n_steps=1", "optim.warmup_steps=2",
            "trainer.enable_progress_bar=false"]


def _env() -> dict:
    return {**os.environ, **SECRETS, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}


def _curve(run: Path, metric: str = "train/loss") -> list[tuple[int, str]]:
    rows = list(csv.DictReader(open(run / "csv" / "metrics.csv")))
    return [(int(r["step"]), r[metric]) for r in rows if r.get(metric)]


def _max_logged_step(run: Path) -> int:
    try:
        return max((s for s, _ in _curve(run)), default=-1)
    except (OSError, ValueError, KeyError):
        return -1


def test_kill_9_then_same_command_continues_the_exact_loss_curve(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    cmd = [sys.executable, str(REPO / "train.py"), *KILL_RUN, "logger=csv", f"hydra.run.dir={run_dir}"]
    ref_cmd = [sys.executable, str(REPO / "train.py"), *KILL_RUN, "logger=[csv,wandb]", "logger.wandb.mode=offline",
               "+notes=${oc.env:MY_SERVICE_TOKEN}", f"hydra.run.dir={ref_dir}"]
    ref = subprocess.Popen(ref_cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 400
        while _max_logged_step(run_dir) < 9:  # past the step-8 checkpoint, well before the end (20)
            assert victim.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "training never got to step 9"
            time.sleep(0.01)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    except BaseException:
        ref.kill()
        raise
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == -signal.SIGKILL
    killed_at = _max_logged_step(run_dir)
    assert not (run_dir / "DONE").exists()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "running"  # what a sweep summary reports as "unfinished"
    saved_step = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 8 <= saved_step <= killed_at

    try:
        again = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=400)
        out, _ = ref.communicate(timeout=400)
    finally:
        if ref.poll() is None:
            ref.kill()
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resume from {run_dir}/checkpoints/last.ckpt" in (run_dir / "train.log").read_text()
    assert ref.returncode == 0, out[-3000:]

    resumed, reference = _curve(run_dir), _curve(ref_dir)
    assert [s for s, _ in reference] == list(range(20))
    assert resumed == reference  # every step once, bit-identical losses across the kill
    assert _curve(run_dir, "val/loss") == _curve(ref_dir, "val/loss")
    assert json.loads((run_dir / "status.json").read_text())["attempt"] == 2

    # ---- secret hygiene, on the same runs: nothing anywhere in the run directories
    hits = [(p, name) for d in (ref_dir, run_dir) for p in d.rglob("*") if p.is_file()
            for name, value in SECRETS.items() if value.encode() in p.read_bytes()]
    assert not hits, hits
    assert (ref_dir / "wandb").is_dir() and list(ref_dir.rglob("*.ckpt"))  # W&B files and checkpoints were searched
    assert "***REDACTED***" in (ref_dir / "csv" / "hparams.yaml").read_text()  # notes=${oc.env:...} was redacted


# ================================================================== sweep fault isolation
def _summary_states(table: str) -> dict[str, str]:
    """{"1": "done", ...} from the sweep summary table (one line per job, ``experts=E ...  state  error``)."""
    return {m.group(1): m.group(2) for m in re.finditer(r"^experts=(\d) .*?\s{2,}(done|failed|unfinished)\b", table, re.M)}


def test_multirun_isolates_failures_and_reruns_only_unfinished_jobs(tmp_path):
    from tests.conftest import run_train_cli

    marker = tmp_path / "crash-once"
    marker.touch()
    args = ["-m", "experts=1,2,3", "size=nano", "data.vocab_size=512", "data.batch_size=8", "trainer=cpu",
            "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1", "optim.warmup_steps=1", "logger=csv", "trainer.enable_progress_bar=false",
            "group=isolation", f"paths.log_dir={tmp_path / 'out'}",
            "+callbacks.flaky._target_=tests.test_reliability.FailOnce", "+callbacks.flaky.experts=2",
            f"+callbacks.flaky.marker={marker}"]
    env = {**SECRETS, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    first = run_train_cli(*args, cwd=tmp_path, env=env, timeout=500)
    assert first.returncode == 1, first.stderr[-3000:]
    table = first.stdout[first.stdout.index("sweep summary"):]
    rows = _summary_states(table)
    assert rows == {"1": "done", "2": "failed", "3": "failed"}, table
    assert "RuntimeError: injected crash in one sweep job" in table
    assert "experts: d_model=64 is not divisible by experts=3" in table
    assert "2 of 3 jobs did not finish" in first.stderr

    sweep = tmp_path / "out" / "train" / "multirun" / "isolation"
    job = {r["job"].split()[0][-1]: Path(r["dir"]) for r in json.loads((sweep / "summary.json").read_text())}
    done_before = (job["1"] / "DONE").stat().st_mtime_ns

    second = run_train_cli(*args, cwd=tmp_path, env=env, timeout=500)  # the very same command
    assert second.returncode == 1, second.stderr[-3000:]  # experts=3 is still misconfigured
    table = second.stdout[second.stdout.index("sweep summary"):]
    rows = _summary_states(table)
    assert rows == {"1": "done", "2": "done", "3": "failed"}, table
    assert (job["1"] / "DONE").stat().st_mtime_ns == done_before  # not re-run
    status = {e: json.loads((job[e] / "status.json").read_text()) for e in "123"}
    assert status["1"]["attempt"] == 1 and status["2"]["attempt"] == 2  # 1 skipped, 2 trained again
    assert status["3"]["state"] == "failed" and status["3"]["error"].startswith("experts: ")  # refused before training
    assert json.loads((sweep / "summary.json").read_text())[1]["state"] == "done"


# ================================================================== static hygiene
CODE = [*sorted((REPO / "src").rglob("*.py")), REPO / "train.py", REPO / "evaluate.py"]


def test_every_torch_load_is_weights_only():
    calls = []
    for path in CODE:
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            depth, end = 0, m.end() - 1
            for end in range(m.end() - 1, len(text)):  # to the matching parenthesis
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            call = text[m.start(): end + 1]
            calls.append((path.name, call))
            assert "weights_only=True" in call, f"{path}: {call}"
    assert len(calls) >= 2  # the checkpoint verifier and evaluate.py at least


def test_no_config_value_is_ever_executed():
    # argv-list subprocesses (e.g. studies.py launching train.py) are fine: no shell parses anything
    pattern = re.compile(r"\b(os\.system|os\.popen|shell=True|pickle\.loads?|eval\(|exec\(|runpy\.|"
                         r"importlib\.import_module|__import__)")
    offenders = [(p.relative_to(REPO), ln.strip()) for p in CODE for ln in p.read_text().splitlines()
                 if pattern.search(ln) and not ln.strip().startswith("#") and ".eval()" not in ln]
    assert not offenders, offenders
