"""An Optuna hyper-parameter search as a Hydra sweeper (``hydra/sweeper=optuna``, ``hparams_search=...``).

Why our own and not ``hydra-optuna-sweeper``: that plugin (1.3.0, the latest) requires optuna < 3,
which resolves here to optuna 2.10.1 (2021); beside SQLAlchemy 2.x its RDB storage fails on
start-up (``assert version is not None`` in ``get_current_version``, checked 2026-12-07), so a
search could only live in memory: not resumable after a crash or a requeue, and not shared by
parallel jobs. This sweeper drives a current Optuna (``pip install -e '.[tune]'``) through the
same config keys, so an ``hparams_search`` file reads as lightning-hydra-template users expect::

    hydra:
      sweeper:
        direction: minimize          # train.py returns the best validation loss
        n_trials: 12
        storage: sqlite:///...       # resumable: a re-launch continues the same study
        params:
          optim.lr: tag(log, interval(1e-3, 3e-2))
          optim.warmup_steps: choice(20, 50, 100)

Parameters use Hydra's override grammar: ``choice(...)`` or a comma list (categorical),
``range(start, stop, step)`` (integers or a float grid), ``interval(a, b)`` (uniform), and
``tag(log, interval(a, b))`` (log-uniform). A trial's run directory comes from its overrides like
any sweep job, so a trial that repeats earlier values finds its run finished and costs nothing;
failed jobs (``train.py`` returns None) are recorded as failed trials. The best parameters and
every trial go to ``<sweep dir>/optimization_results.yaml``.

Imports: hydra, optuna (on use), :mod:`sectional_moe.errors`, :mod:`sectional_moe.files` (torch-free).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from sectional_moe.errors import ConfigError
from sectional_moe.files import atomic_write

log = logging.getLogger(__name__)

RESULTS_FILE = "optimization_results.yaml"
DIRECTIONS = ("minimize", "maximize")
SAMPLERS = ("tpe", "random", "grid")


@dataclass(frozen=True)
class SearchParam:
    """One searched key: a categorical list, an integer/float range, or an interval (log or not)."""

    key: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    integer: bool = False

    def distribution(self) -> Any:
        import optuna

        if self.choices is not None:
            return optuna.distributions.CategoricalDistribution(list(self.choices))
        if self.integer:
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return optuna.distributions.FloatDistribution(float(self.low), float(self.high), step=self.step, log=self.log)


def parse_param(key: str, value: str) -> SearchParam:
    """A ``hydra.sweeper.params`` entry in Hydra's override grammar -> :class:`SearchParam`.

    Raises:
        ConfigError: the value is not a choice, range, interval or comma list.
    """
    (override,) = OverridesParser.create().parse_overrides([f"{key}={value}"])
    return _param_of(override)


def _param_of(override: Override) -> SearchParam:
    key = override.get_key_element()
    value = override.value()
    if override.is_sweep_override():
        log_scale = "log" in (getattr(value, "tags", None) or set())
        if isinstance(value, ChoiceSweep):
            return SearchParam(key, choices=tuple(value.list))
        if isinstance(value, RangeSweep):
            start, stop, step = value.start, value.stop, value.step
            if all(isinstance(v, int) for v in (start, stop, step)):  # range() excludes stop
                return SearchParam(key, low=start, high=stop - step, step=step, integer=True, log=log_scale)
            return SearchParam(key, choices=tuple(override.sweep_iterator()))
        if isinstance(value, IntervalSweep):
            integer = isinstance(value.start, int) and isinstance(value.end, int)
            return SearchParam(key, low=value.start, high=value.end, log=log_scale, integer=integer)
    raise ConfigError(f"hydra.sweeper.params.{key}", f"{override.input_line!r} is not a search space; use choice(a, b), "
                      "a comma list, range(start, stop, step), interval(low, high) or tag(log, interval(low, high))")


def _sampler(name: str, seed: int | None, space: Sequence[SearchParam]) -> Any:
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if any(p.choices is None for p in space):
        raise ConfigError("hydra.sweeper.sampler", "sampler=grid needs every searched key as a list or choice(...), not an interval")
    return optuna.samplers.GridSampler({p.key: list(p.choices or ()) for p in space}, seed=seed)


class OptunaSweeper(Sweeper):
    """Hydra sweeper that asks Optuna for each batch of trials and launches them (module docstring).

    Args:
        direction: minimize | maximize the value ``train.py`` returns (the best validation loss).
        n_trials: trials in all, counting the ones a resumed study already finished.
        n_jobs: trials launched per batch (the launcher runs them; locally one after another).
        sampler: tpe | random | grid.
        seed: the sampler's seed.
        storage: an Optuna storage URL (``sqlite:///path.db``) to resume and share the study; None = memory.
        study_name: the study's name in the storage (default: the sweep directory's name).
        params: searched keys -> Hydra override grammar.
    """

    def __init__(self, direction: str = "minimize", n_trials: int = 20, n_jobs: int = 1, sampler: str = "tpe",
                 seed: int | None = 0, storage: str | None = None, study_name: str | None = None,
                 params: Mapping[str, Any] | None = None) -> None:
        if direction not in DIRECTIONS:
            raise ConfigError("hydra.sweeper.direction", f"direction={direction!r}; use minimize or maximize")
        if sampler not in SAMPLERS:
            raise ConfigError("hydra.sweeper.sampler", f"sampler={sampler!r}; use one of {', '.join(SAMPLERS)}")
        for key, value in (("n_trials", n_trials), ("n_jobs", n_jobs)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"hydra.sweeper.{key}", f"{key}={value!r} must be a whole number >= 1")
        self.direction, self.n_trials, self.n_jobs, self.sampler_name = direction, n_trials, n_jobs, sampler
        self.seed, self.storage, self.study_name = seed, storage, study_name
        self.params = {str(k): str(v) for k, v in (params or {}).items()}
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context, task_function=task_function,
                                                                config=config)

    def search_space(self, arguments: Sequence[str]) -> tuple[list[SearchParam], list[str]]:
        """The searched keys (``params`` plus sweep overrides on the command line) and the fixed overrides."""
        parser = OverridesParser.create()
        space = [parse_param(k, v) for k, v in self.params.items()]
        fixed = []
        for override in parser.parse_overrides(list(arguments)):
            if override.is_sweep_override():
                space.append(_param_of(override))
            else:
                fixed.append(override.input_line)
        if not space:
            raise ConfigError("hydra.sweeper.params", "nothing to search: give hydra.sweeper.params (e.g. hparams_search=lr_optuna) "
                              "or a sweep override such as optim.lr=choice(2e-3,5e-3)")
        return space, fixed

    def sweep(self, arguments: list[str]) -> list[Any]:
        import optuna

        assert self.config is not None and self.launcher is not None
        space, fixed = self.search_space(arguments)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        if not any(o.lstrip("+").startswith("group=") for o in fixed):
            # a job resolves its sweep directory from its own overrides, which now hold the searched
            # keys too: naming the group keeps every trial in this sweep's directory and W&B group
            fixed.append(f"group={sweep_dir.name}")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(study_name=self.study_name or sweep_dir.name, storage=self.storage,
                                    sampler=_sampler(self.sampler_name, self.seed, space), direction=self.direction,
                                    load_if_exists=True)
        distributions = {p.key: p.distribution() for p in space}
        done = sum(t.state.is_finished() for t in study.trials)
        if done:
            log.info("resuming study %s: %d of %d trials already finished", study.study_name, done, self.n_trials)
        returns: list[Any] = []
        job_idx = done
        while done < self.n_trials:
            trials = [study.ask(distributions) for _ in range(min(self.n_jobs, self.n_trials - done))]
            batch = [[*fixed, *(f"{k}={_literal(v)}" for k, v in t.params.items())] for t in trials]
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=job_idx)
            for trial, result in zip(trials, results):
                value = _objective(result)
                if value is None:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                else:
                    study.tell(trial, value)
            returns.append(results)
            done += len(trials)
            job_idx += len(trials)
        self._write_results(study, sweep_dir, fixed)
        return returns

    def _write_results(self, study: Any, sweep_dir: Path, fixed: list[str]) -> None:
        complete = [t for t in study.trials if t.value is not None]
        results: dict[str, Any] = {"name": "optuna", "study": study.study_name, "direction": self.direction,
                                   "sampler": self.sampler_name, "fixed_overrides": fixed,
                                   "trials": [{"number": t.number, "state": t.state.name, "params": t.params, "value": t.value}
                                              for t in study.trials]}
        if complete:
            results["best_params"] = study.best_params
            results["best_value"] = float(study.best_value)
            log.info("best parameters %s, value %.6g", study.best_params, study.best_value)
        atomic_write(sweep_dir / RESULTS_FILE, yaml.safe_dump(results, sort_keys=False))


def _objective(result: Any) -> float | None:
    """A job's return value as a finite float, or None (failed, skipped or non-finite)."""
    try:
        value = result.return_value
    except Exception:  # noqa: BLE001 - a job that raised: a failed trial, the search goes on
        return None
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _literal(value: Any) -> str:
    """A sampled value as override text that Hydra parses back to the same value."""
    if isinstance(value, float):
        return repr(value)
    return str(value)
