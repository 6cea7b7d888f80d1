"""The Optuna sweeper: search spaces in Hydra's grammar, a resumable study, failed trials, the results file."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from omegaconf import OmegaConf

optuna = pytest.importorskip("optuna", reason="optuna is in the dev/tune extras: pip install -e '.[tune]'")

from sectional_moe.cluster.optuna_sweeper import RESULTS_FILE, OptunaSweeper, parse_param  # noqa: E402
from sectional_moe.errors import ConfigError  # noqa: E402


def test_hydra_grammar_becomes_optuna_distributions():
    lr = parse_param("optim.lr", "tag(log, interval(1e-3, 3e-2))")
    assert lr.distribution() == optuna.distributions.FloatDistribution(1e-3, 3e-2, log=True)
    assert parse_param("x", "interval(0.1, 0.9)").distribution() == optuna.distributions.FloatDistribution(0.1, 0.9)
    assert parse_param("n", "range(2, 10, 2)").distribution() == optuna.distributions.IntDistribution(2, 8, step=2)
    assert parse_param("w", "choice(0.05, 0.1)").distribution() == optuna.distributions.CategoricalDistribution([0.05, 0.1])
    assert parse_param("e", "4,8,16").choices == (4, 8, 16)
    with pytest.raises(ConfigError, match="hydra.sweeper.params.optim.lr: 'optim.lr=0.003' is not a search space"):
        parse_param("optim.lr", "0.003")


@pytest.mark.parametrize("kw,key", [(dict(direction="up"), "direction"), (dict(sampler="cmaes"), "sampler"),
                                    (dict(n_trials=0), "n_trials")])
def test_bad_sweeper_settings_are_one_line_errors(kw, key):
    with pytest.raises(ConfigError, match=f"hydra.sweeper.{key}"):
        OptunaSweeper(**kw)


class FakeLauncher:
    """Stands in for the launcher: the 'loss' of a job is (log10(lr) + 2.3)^2, one job fails."""

    def __init__(self) -> None:
        self.jobs: list[list[str]] = []

    def launch(self, batch, initial_job_idx):
        out = []
        for overrides in batch:
            self.jobs.append(list(overrides))
            lr = float(next(o for o in overrides if o.startswith("optim.lr=")).split("=", 1)[1])
            value = None if len(self.jobs) == 2 else (__import__("math").log10(lr) + 2.3) ** 2
            out.append(SimpleNamespace(return_value=value))
        return out


def _sweeper(tmp_path: Path, **kw) -> tuple[OptunaSweeper, FakeLauncher]:
    sweeper = OptunaSweeper(params={"optim.lr": "tag(log, interval(1e-3, 3e-2))"}, **kw)
    sweeper.config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep-x")}}})
    sweeper.launcher = FakeLauncher()
    sweeper.validate_batch_is_legal = lambda batch: None  # no Hydra config loader here
    return sweeper, sweeper.launcher


def test_a_study_runs_its_trials_records_failures_and_resumes_from_its_storage(tmp_path):
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    sweeper, launcher = _sweeper(tmp_path, n_trials=4, n_jobs=2, storage=storage)
    sweeper.sweep(["model=dense"])
    assert len(launcher.jobs) == 4
    assert all("model=dense" in job and "group=sweep-x" in job for job in launcher.jobs)  # every trial in this sweep's group
    results = yaml.safe_load((tmp_path / "sweep-x" / RESULTS_FILE).read_text())
    states = [t["state"] for t in results["trials"]]
    assert states.count("FAIL") == 1 and states.count("COMPLETE") == 3
    assert results["best_value"] == min(t["value"] for t in results["trials"] if t["value"] is not None)
    # the same command again with a larger budget: only the new trials run
    again, launcher2 = _sweeper(tmp_path, n_trials=6, n_jobs=2, storage=storage)
    again.sweep(["model=dense"])
    assert len(launcher2.jobs) == 2
    assert len(yaml.safe_load((tmp_path / "sweep-x" / RESULTS_FILE).read_text())["trials"]) == 6


def test_a_sweep_override_on_the_command_line_joins_the_search_space(tmp_path):
    sweeper, launcher = _sweeper(tmp_path, n_trials=3, sampler="random")
    sweeper.sweep(["optim.warmup_steps=choice(0.05, 0.1)"])
    assert all(any(o.startswith("optim.warmup_steps=") for o in job) for job in launcher.jobs)


@pytest.mark.slow
def test_hparams_search_runs_through_hydra_and_every_trial_lands_in_one_sweep(tmp_path):
    """The real thing: `train.py -m hparams_search=lr_optuna` finds our sweeper plugin, each trial is
    a run directory of the sweep (one group), the summary lists them, the study is resumable."""
    from tests.conftest import run_train_cli

    args = ["-m", "hparams_search=lr_optuna", "hydra.sweeper.n_trials=2", "size=nano", "data.vocab_size=512",
            "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
            "logger=csv", "model=dense", "trainer.enable_progress_bar=false", f"paths.log_dir={tmp_path}"]
    proc = run_train_cli(*args, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "train" / "multirun").iterdir()
    results = yaml.safe_load((sweep / RESULTS_FILE).read_text())
    assert [t["state"] for t in results["trials"]] == ["COMPLETE", "COMPLETE"] and "best_params" in results
    runs = [d for d in sweep.iterdir() if (d / "DONE").is_file()]
    assert len(runs) == 2 and proc.stdout.count("  done") == 2
    assert (tmp_path / "train" / "optuna.db").is_file()  # hparams_search=lr_optuna keeps its study in SQLite
