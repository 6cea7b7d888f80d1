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
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from sectional_moe.training import run as train_mod
from sectional_moe.runs.checkpoints import (
    CorruptCheckpoint, atomic_save, read_stamp, select_resume_checkpoint, verify_checkpoint,
)
from sectional_moe.errors import ConfigError
from sectional_moe.runs.layout import RunDir
from sectional_moe.training.module import LMModule

REPO = Path(__file__).resolve().parents[2]


# ================================================================== helpers used inside subprocess jobs
class FailOnce(pl.Callback):
    """Raise in the job with ``experts`` while ``marker`` exists (and delete it): a one-off crash."""

    def __init__(self, experts: int, marker: str):
        self.experts, self.marker = experts, Path(marker)

    def on_train_start(self, trainer, pl_module) -> None:
        if pl_module.spec.experts == self.experts and self.marker.exists():
            self.marker.unlink()
            raise RuntimeError("injected crash in one sweep job")


class RaiseOOM(pl.Callback):
    """Raise the error a too-large job dies of on a GPU, in the job with ``experts``."""

    def __init__(self, experts: int):
        self.experts = experts

    def on_train_start(self, trainer, pl_module) -> None:
        if pl_module.spec.experts == self.experts:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")


class RngProbe(pl.Callback):
    """Log one draw of each global RNG (torch, numpy, Python) per training step.

    Drawn at batch *end*, after LMModule restored a resumed checkpoint's RNG state at batch start:
    a resumed run must log the very values an uninterrupted run logs.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pl_module.log_dict({"rng/torch": float(torch.rand(())), "rng/numpy": float(np.random.rand()),
                            "rng/python": random.random()})


class SignalAt(pl.Callback):
    """Send this process ``signum`` at the start of optimiser step ``step`` (a SLURM warning, say)."""

    def __init__(self, step: int, signum: int = int(signal.SIGUSR2)):
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


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
    path, state = select_resume_checkpoint("auto", RunDir(tmp_path))
    assert path == str(ckpt.with_name("last.ckpt.prev")) and state["global_step"] == 4
    out = capsys.readouterr().out
    assert "last.ckpt is corrupt" in out and "resuming from the previous checkpoint" in out
    assert ckpt.with_name("last.ckpt.corrupt").is_file() and not ckpt.exists()
    # nothing readable left: a clear error instead of silently starting over
    ckpt.with_name("last.ckpt.prev").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="no readable checkpoint.*resume=never"):
        select_resume_checkpoint("auto", RunDir(tmp_path))


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
    monkeypatch.setattr(train_mod, "finish_wandb_run", lambda exit_code=0, **kw: codes.append(exit_code))
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
    cfg = compose(*NAN_RUN, "+callbacks.poison._target_=tests.runs.test_reliability.PoisonGrad", "+callbacks.poison.step=3")
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
    train_mod.finish_wandb_run(exit_code=1)
    assert calls == [1]


class FakeWandb:
    """Stands in for the ``wandb`` module: records how the run was closed."""

    def __init__(self, can_mark_preempting: bool = True):
        self.calls: list[tuple] = []
        self.run = type("Run", (), {})()
        if can_mark_preempting:
            self.run.mark_preempting = lambda: self.calls.append(("mark_preempting",))

    def finish(self, exit_code=0):
        self.calls.append(("finish", exit_code))


@pytest.mark.parametrize("can_mark", [True, False], ids=["mark_preempting", "older-wandb"])
def test_finish_wandb_preempting_is_not_failed(monkeypatch, can_mark):
    fake = FakeWandb(can_mark)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    train_mod.finish_wandb_run(exit_code=1, preempting=True)
    assert fake.calls == ([("mark_preempting",)] if can_mark else []) + [("finish", 0)]


def test_preempted_run_is_requeued_not_failed(compose, tmp_path, monkeypatch):
    """A real PreemptionCheckpoint: SIGUSR2 at step 3 -> last.ckpt at step 4 -> SystemExit(EXIT_PREEMPTED);
    main() then closes W&B as preempting (not failed) and the status says requeued."""
    from sectional_moe.env import EXIT_PREEMPTED

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = compose(*NAN_RUN, "+callbacks.preempt._target_=sectional_moe.callbacks.preemption.PreemptionCheckpoint",
                  "+callbacks.signal._target_=tests.runs.test_reliability.SignalAt", "+callbacks.signal.step=3")
    previous = signal.getsignal(signal.SIGUSR2)
    try:
        with pytest.raises(SystemExit) as exc:
            train_mod.main(cfg)
    finally:  # the callback's teardown does not run when training is interrupted
        signal.signal(signal.SIGUSR2, previous)
    assert exc.value.code == EXIT_PREEMPTED
    assert fake.calls == [("mark_preempting",), ("finish", 0)]
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "requeued" and "at step 4" in status["error"], status  # the callback's message, kept
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


@pytest.mark.parametrize("in_slurm,state", [(True, "requeued"), (False, "interrupted")], ids=["slurm", "no-slurm"])
def test_preemption_exit_without_callback_status_still_requeued(compose, tmp_path, monkeypatch, in_slurm, state):
    from sectional_moe.env import EXIT_PREEMPTED

    def preempted(cfg, **kwargs):
        raise SystemExit(EXIT_PREEMPTED)

    if in_slurm:
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
    else:
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setattr(train_mod, "train", preempted)
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with pytest.raises(SystemExit):
        train_mod.main(compose())
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == state
    assert fake.calls[-1] == ("finish", 0)


# ================================================================== status files
def test_status_is_written_by_rank_zero_only(compose, tmp_path, monkeypatch, capsys, wandb_exit_codes):
    from sectional_moe.runs.layout import RunDir

    def write_status(run_dir, state, error=None, **extra):
        RunDir(run_dir).write_status(state, error, **extra)

    monkeypatch.setenv("RANK", "1")
    write_status(tmp_path / "r1", "running")
    assert not (tmp_path / "r1").exists()
    with pytest.raises(SystemExit):  # a config error, as every rank of a DDP job meets it
        train_mod.main(compose("experts=3"))
    assert "error: experts:" in capsys.readouterr().err
    assert not (tmp_path / "run" / "status.json").exists()
    monkeypatch.setenv("RANK", "0")
    write_status(tmp_path / "r0", "failed", "boom")
    assert json.loads((tmp_path / "r0" / "status.json").read_text())["error"] == "boom"


def _hammer_status(run_dir: str, n: int) -> None:
    from sectional_moe.runs.layout import RunDir

    def write_status(run_dir, state, error=None, **extra):
        RunDir(run_dir).write_status(state, error, **extra)

    for i in range(n):
        write_status(Path(run_dir), "running" if i % 2 else "failed", f"writer {os.getpid()}")


def test_concurrent_status_writers_never_collide(tmp_path):
    """Two processes (two ranks, or an old and a requeued attempt) writing one status.json: with a
    shared temp file one would rename the other's away and crash with FileNotFoundError."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_hammer_status, args=(str(tmp_path), 400)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert json.loads((tmp_path / "status.json").read_text())["state"] in ("running", "failed")
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # no temp file left behind


def test_status_error_is_redacted(tmp_path, monkeypatch):
    from sectional_moe.runs.layout import RunDir

    def write_status(run_dir, state, error=None, **extra):
        RunDir(run_dir).write_status(state, error, **extra)

    monkeypatch.setenv("MY_SERVICE_TOKEN", SECRETS["MY_SERVICE_TOKEN"])
    write_status(tmp_path, "failed", f"bad value {SECRETS['MY_SERVICE_TOKEN']}", traceback=f"... {SECRETS['MY_SERVICE_TOKEN']}")
    assert SECRETS["MY_SERVICE_TOKEN"] not in (tmp_path / "status.json").read_text()


# ================================================================== RNG state in checkpoints
def _draws() -> tuple:
    return torch.rand(4).tolist(), np.random.rand(4).tolist(), [random.random() for _ in range(4)], np.random.randn()


def test_rng_states_round_trip_through_a_weights_only_checkpoint(compose, tmp_path):
    from sectional_moe.training.rng import RNG_KEY
    from sectional_moe.models.spec import spec_from_config

    cfg = compose()
    module = LMModule(spec_from_config(cfg).to_dict(), dict(cfg.optim), 10)
    pl.seed_everything(123)
    np.random.randn()  # leaves a cached Gaussian in numpy's state: it must survive too
    ckpt = {}
    module.on_save_checkpoint(ckpt)
    expected = _draws()
    atomic_save({"state_dict": {}, **ckpt}, tmp_path / "last.ckpt")

    loaded = torch.load(tmp_path / "last.ckpt", weights_only=True)  # plain tensors and lists only
    assert len(loaded[RNG_KEY]) == 1  # one state per rank
    pl.seed_everything(7)  # a fresh process would be seeded like this
    resumed = LMModule(spec_from_config(cfg).to_dict(), dict(cfg.optim), 10)
    resumed.on_load_checkpoint(loaded)
    torch.rand(3)  # what Lightning draws between the load and the first batch (the loader's seed)
    resumed.on_train_batch_start(None, 0)
    assert _draws() == expected
    resumed.on_train_batch_start(None, 1)  # applied once, not at every batch
    assert _draws() != expected


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


def _state_dicts_equal(a: Path, b: Path, key: str = "state_dict") -> list[str]:
    """Names whose tensors differ (not bit-identical) between two checkpoints' ``key`` dicts."""
    sa, sb = torch.load(a, weights_only=True)[key], torch.load(b, weights_only=True)[key]
    assert sa.keys() == sb.keys()
    return [k for k in sa if not torch.equal(sa[k], sb[k])]


def test_kill_9_then_same_command_continues_the_exact_loss_curve(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    probe = "+callbacks.rng_probe._target_=tests.runs.test_reliability.RngProbe"  # RNG streams must continue too
    cmd = [sys.executable, str(REPO / "train.py"), *KILL_RUN, probe, "logger=csv", f"hydra.run.dir={run_dir}"]
    ref_cmd = [sys.executable, str(REPO / "train.py"), *KILL_RUN, probe, "logger=[csv,wandb]", "logger.wandb.mode=offline",
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
    for rng in ("rng/torch", "rng/numpy", "rng/python"):  # restored from the checkpoint, not re-seeded
        assert _curve(run_dir, rng) == _curve(ref_dir, rng), rng
    assert json.loads((run_dir / "status.json").read_text())["attempt"] == 2
    # the same final model, bit for bit (and the same AdamW moments), as the uninterrupted run
    last, ref_last = run_dir / "checkpoints" / "last.ckpt", ref_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == torch.load(ref_last, weights_only=True)["global_step"] == 20
    assert _state_dicts_equal(last, ref_last) == []
    opt, ref_opt = (torch.load(p, weights_only=True)["optimizer_states"][0]["state"] for p in (last, ref_last))
    assert opt.keys() == ref_opt.keys() and all(torch.equal(opt[i][k], ref_opt[i][k]) for i in opt for k in opt[i])

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
    args = ["-m", "experts=1,2,3,4", "size=nano", "data.vocab_size=512", "data.batch_size=8", "trainer=cpu",
            "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1", "optim.warmup_steps=1", "logger=csv", "trainer.enable_progress_bar=false",
            "group=isolation", f"paths.log_dir={tmp_path / 'out'}",
            "+callbacks.flaky._target_=tests.runs.test_reliability.FailOnce", "+callbacks.flaky.experts=2",
            f"+callbacks.flaky.marker={marker}",
            "+callbacks.oom._target_=tests.runs.test_reliability.RaiseOOM", "+callbacks.oom.experts=4"]
    env = {**SECRETS, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    first = run_train_cli(*args, cwd=tmp_path, env=env, timeout=500)
    assert first.returncode == 1, first.stderr[-3000:]
    table = first.stdout[first.stdout.index("sweep summary"):]
    rows = _summary_states(table)
    assert rows == {"1": "done", "2": "failed", "3": "failed", "4": "failed"}, table
    assert "RuntimeError: injected crash in one sweep job" in table
    assert "experts: d_model=64 is not divisible by experts=3" in table
    assert "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB" in table
    assert "3 of 4 jobs did not finish" in first.stderr

    sweep = tmp_path / "out" / "train" / "multirun" / "isolation"
    job = {r["job"].split()[0][-1]: Path(r["dir"]) for r in json.loads((sweep / "summary.json").read_text())}
    done_before = (job["1"] / "DONE").stat().st_mtime_ns

    second = run_train_cli(*args, cwd=tmp_path, env=env, timeout=500)  # the very same command
    assert second.returncode == 1, second.stderr[-3000:]  # experts=3 is still misconfigured
    table = second.stdout[second.stdout.index("sweep summary"):]
    rows = _summary_states(table)
    assert rows == {"1": "done", "2": "done", "3": "failed", "4": "failed"}, table
    assert (job["1"] / "DONE").stat().st_mtime_ns == done_before  # not re-run
    status = {e: json.loads((job[e] / "status.json").read_text()) for e in "1234"}
    assert status["1"]["attempt"] == 1 and status["2"]["attempt"] == 2  # 1 skipped, 2 trained again
    assert status["3"]["state"] == "failed" and status["3"]["error"].startswith("experts: ")  # refused before training
    assert status["4"]["state"] == "failed" and status["4"]["error"].startswith("OutOfMemoryError: ")
    assert json.loads((sweep / "summary.json").read_text())[1]["state"] == "done"


def test_multirun_summary_and_saved_configs_never_hold_a_secret(tmp_path):
    """A secret in the overrides, both as ${oc.env:...} and pasted literally, in a sweep whose jobs
    fail validation (so they stop before the usual scrub point): nothing in the sweep directory,
    the summary or the console holds it, and the jobs are still matched to their directories."""
    from tests.conftest import run_train_cli

    env = {**SECRETS, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    # each job fails on another key (experts=3: experts; experts=4: optim.lr), so the sweep starts (an error
    # every job shares would be reported once, before any job: test_sweep_wide_error_is_reported_once)
    args = ["-m", "experts=3,4", "optim.lr=-1", "+notes=${oc.env:MY_SERVICE_TOKEN}", f"+pasted={SECRETS['DB_PASSWORD']}", "size=nano",
            "logger=none", "group=secrets", f"paths.log_dir={tmp_path / 'out'}"]
    proc = run_train_cli(*args, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("sweep summary"):]
    assert re.findall(r"\s{2,}(failed|done|not started|unfinished)\s", table) == ["failed", "failed"], table
    assert "d_model=64 is not divisible by experts=3" in table and "optim.lr: lr=-1 must be a number > 0" in table
    # Hydra itself echoes the literal command line when it launches the jobs; the resolved value never appears
    assert SECRETS["MY_SERVICE_TOKEN"] not in proc.stdout + proc.stderr
    assert SECRETS["DB_PASSWORD"] not in table
    sweep = tmp_path / "out" / "train" / "multirun" / "secrets"
    files = [p for p in sweep.rglob("*") if p.is_file()]
    assert {"multirun.yaml", "summary.json", "overrides.yaml", "status.json"} <= {p.name for p in files}
    hits = [(p, name) for p in files for name, value in SECRETS.items() if value.encode() in p.read_bytes()]
    assert not hits, hits
    assert "***REDACTED***" in (sweep / "multirun.yaml").read_text()


# ================================================================== nothing a file or a config holds is executed
class _Payload:
    """Unpickling this runs code: it writes ``marker``. A weights_only load must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "executed"))


def test_a_checkpoint_carrying_code_is_refused_by_every_loader_and_its_code_never_runs(compose, tmp_path, monkeypatch):
    from sectional_moe.evaluation.evaluate import load_checkpoint
    from sectional_moe.errors import CheckpointError
    from sectional_moe.runs.checkpoints import AtomicCheckpointIO, CorruptCheckpoint, verify_checkpoint

    marker = tmp_path / "pwned"
    evil = tmp_path / "run" / "checkpoints" / "last.ckpt"
    atomic_save({"state_dict": {}, "payload": _Payload(marker), "global_step": 1}, evil)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("weights_only")) or real_load(*a, **k))

    with pytest.raises(CorruptCheckpoint):
        verify_checkpoint(evil)
    with pytest.raises(ConfigError, match="unreadable"):
        AtomicCheckpointIO().load_checkpoint(evil, weights_only=False)  # asking for a full unpickle changes nothing
    with pytest.raises(CheckpointError):
        load_checkpoint(evil)
    with pytest.raises(ConfigError, match="resume"):  # the training's resume path, before any compute
        train_mod.train(compose(f"resume={evil}"))
    assert loads and all(w is True for w in loads), loads
    assert not marker.exists()


def test_no_config_value_is_ever_executed(compose, tmp_path):
    """Shell and Python payloads in string values reach names, files and logs as text only."""
    marker = tmp_path / "pwned"
    payloads = [f"$(touch {marker})", f"`touch {marker}`", f'__import__("os").system("touch {marker}")', f"; touch {marker}"]
    cfg = compose("trainer.max_steps=2", "trainer.val_check_interval=2", "optim.warmup_steps=0", "logger=csv",
                  *(f"+notes{i}='{p}'" for i, p in enumerate(payloads)), f"tags=[\"{payloads[0]}\"]", f"group='{payloads[1]}'")
    metrics = train_mod.train(cfg)
    assert metrics and not marker.exists()
    hparams = (tmp_path / "run" / "csv" / "hparams.yaml").read_text()
    assert "touch" in hparams  # logged verbatim, as text
