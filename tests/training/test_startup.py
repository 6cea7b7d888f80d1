"""First-run experience (issue 19): threads that fit a shared machine, schedules that follow
``max_steps``, progress in steps, the printed config, one copy of each Lightning message."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from sectional_moe import hardware
from sectional_moe.callbacks.progress import StepProgressBar
from sectional_moe.callbacks.threads import AdaptiveThreads
from sectional_moe.training import run as train_mod
from sectional_moe.training import startup
from sectional_moe.training.validate import validate_config


# ------------------------------------------------------------------------------- threads
@pytest.mark.parametrize("foreign,cores,threads", [(0.0, 2, 2), (0.2, 2, 2), (0.9, 2, 1), (1.0, 2, 1), (2.0, 2, 1),
                                                   (3.5, 8, 5), (0.0, 1, 1)])
def test_one_thread_per_idle_core(foreign, cores, threads):
    assert hardware.threads_for_load(foreign, cores) == threads


def test_auto_threads_leaves_an_explicit_omp_num_threads_alone(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert hardware.auto_threads() == (3, "OMP_NUM_THREADS=3")
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(hardware, "usable_cores", lambda: 2)

    class Busy:  # another process keeps one core busy while we measure
        def sample(self):
            return 1.0

    monkeypatch.setattr(hardware, "CpuLoadMeter", Busy)
    n, why = hardware.auto_threads(sample_s=0.01)
    assert n == 1 and "1.0 of 2 cores busy with other work" in why
    assert startup.choose_threads(4, "cpu") == (4, "threads=4") and startup.choose_threads("auto", "cuda")[0] is None


def test_the_load_meter_counts_other_processes_not_this_one():
    meter = hardware.CpuLoadMeter()
    end = time.monotonic() + 0.4
    while time.monotonic() < end:  # this process keeps one core busy
        pass
    foreign = meter.sample()
    assert foreign is not None and foreign < hardware.usable_cores()


def test_adaptive_threads_follow_the_load(monkeypatch):
    loads = iter([1.0, 0.0])

    class Meter:
        def sample(self):
            return next(loads)

    monkeypatch.setattr("sectional_moe.callbacks.threads.usable_cores", lambda: 2)
    cb = AdaptiveThreads(check_every_s=0.0, max_threads=2)
    cb._meter = Meter()
    trainer = type("T", (), {"global_step": 5})()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        cb.on_train_batch_end(trainer, None, None, None, 0)
        assert torch.get_num_threads() == 1
        cb.on_train_batch_end(trainer, None, None, None, 0)
        assert torch.get_num_threads() == 2
        assert [c[1] for c in cb.changes] == [1, 2]
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------- schedules follow max_steps
@pytest.mark.parametrize("max_steps,vci,warmup,log_every,limit_val", [(20, 5, 2, 1, 3), (800, 200, 50, 10, 100), (100, 25, 10, 5, 13)])
def test_auto_intervals_and_validation_size_follow_max_steps(compose, max_steps, vci, warmup, log_every, limit_val):
    cfg = compose(f"trainer.max_steps={max_steps}", "trainer.val_check_interval=auto", "optim.warmup_steps=auto",
                  "trainer.log_every_n_steps=auto", "trainer.limit_val_batches=auto", "data.batch_size=16", tiny=False)
    validate_config(cfg)
    t = cfg.trainer
    assert (t.val_check_interval, cfg.optim.warmup_steps, t.log_every_n_steps, t.limit_val_batches) == (vci, warmup, log_every, limit_val)


def test_a_preset_shortened_by_max_steps_keeps_a_valid_schedule(compose):
    cfg = compose("experiment=quick", "trainer.max_steps=100", tiny=False)
    validate_config(cfg)
    assert cfg.trainer.val_check_interval == 25 and cfg.optim.warmup_steps == 5


# ------------------------------------------------------------------------------- progress in steps
def test_progress_counts_steps_of_max_steps_and_prints_lines_off_a_terminal(compose, capsys, monkeypatch):
    bars: list[StepProgressBar] = []
    real = StepProgressBar.__init__

    def keep(self, *a, **k):
        real(self, *a, **k)
        bars.append(self)

    monkeypatch.setattr(StepProgressBar, "__init__", keep)
    train_mod.train(compose("trainer.enable_progress_bar=true", "callbacks.progress.plain=true"))
    (bar,) = bars
    assert [line.split("  ")[0] for line in bar.lines] == ["step 6/12 (50%)", "step 12/12 (100%)"]
    out = capsys.readouterr().out
    assert "step 6/12 (50%)" in out and "val/ppl" in bar.lines[0] and "eta" in bar.lines[0]

    bars.clear()
    train_mod.train(compose("trainer.enable_progress_bar=true", "callbacks.progress.plain=false", "force=true"))
    (bar,) = bars
    assert bar.train_progress_bar.total == 12 and bar.train_progress_bar.n == 12 and not bar.lines


# ------------------------------------------------------------------------------- printed config, quiet output
def test_the_resolved_config_is_printed_at_start_with_secrets_redacted(compose, capsys, monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-SECRET-5f3a9c2e7d")
    cfg = compose("print_config=true", "+notes=${oc.env:MY_SERVICE_TOKEN}", "+hf_token=abc", "trainer.max_steps=4",
                  "trainer.val_check_interval=2", "optim.warmup_steps=1")
    train_mod.train(cfg)
    out = capsys.readouterr().out
    printed = out[out.index("config (resolved"):]
    assert "val_check_interval: 2" in printed and "max_steps: 4" in printed and "family: sectional" in printed
    assert "tok-SECRET" not in out and "hf_token: '***REDACTED***'" in printed
    assert startup.print_config_enabled("auto", multirun=False) and not startup.print_config_enabled("auto", multirun=True)
    assert not startup.print_config_enabled(False, multirun=False)


def test_lightning_messages_appear_once_and_hints_not_at_all(caplog):
    import lightning  # noqa: F401 - installs its own console handler on import

    logging.getLogger().addHandler(logging.NullHandler())  # Hydra's handlers, in a real run
    startup.quiet_output(multirun=False)
    assert not [h for h in logging.getLogger("lightning").handlers if type(h) is logging.StreamHandler]
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO):
        rank_zero.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](https://x)")
        rank_zero.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]
    startup.quiet_output(multirun=True)
    assert logging.getLogger("lightning.pytorch").level == logging.WARNING
    startup.quiet_output(multirun=False)


# ------------------------------------------------------------------------------- shell completion
def test_shell_completion_installs_and_answers(tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    script = subprocess.run([sys.executable, str(REPO / "train.py"), "-sc", "install=bash"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert script.returncode == 0 and "hydra_bash_completion" in script.stdout, script.stderr[-1000:]
    # COMP_LINE as the shell sends it for `python train.py exp<TAB>` typed in the checkout; not the
    # absolute path, which Hydra's completion misparses when it holds "-c" (a clone in /tmp/ci-clone)
    query = subprocess.run([sys.executable, str(REPO / "train.py"), "-sc", "query=bash"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120, env={**os.environ, "COMP_LINE": "python train.py exp"})
    assert query.returncode == 0 and "experts=" in query.stdout.split() and "experiment=" in query.stdout.split(), query.stdout
