"""The SLURM launcher of ``hydra/launcher=slurm``: hydra-submitit-launcher's, safe to re-launch.

It differs from the plugin's ``SlurmLauncher`` (hydra-submitit-launcher 1.2) in two ways:

* **A dead job does not take the sweep down with it.** The plugin collects results with
  ``[j.results()[0] for j in jobs]``: the first job that died without a result (``scancel``, OOM
  kill, node failure) raises, and the other jobs' results and the sweep summary
  (:class:`sectional_moe.cluster.sweeps.SweepSummary`) are lost. Here each job is collected on its own; a
  dead job gets ``failed`` and submitit's error in its ``status.json``, and the summary lists it.
* **Finished jobs are not submitted again.** A job whose run directory
  (``hydra.sweep.dir``/``hydra.sweep.subdir``, as the job itself computes it) holds a ``DONE``
  marker is reported as done without a SLURM job, so launching the same multirun again only
  runs what did not finish (``force=true`` submits everything).

On the job side (:meth:`__call__`, in the SLURM task) the project's resolvers are registered
before Hydra resolves the job's config. :class:`LocalLauncher` (``hydra/launcher=local``) is the
plugin's submitit-local launcher with that same job-side registration.

Hydra only instantiates launchers that live in the ``hydra_plugins`` package, so
``conf/hydra/launcher/slurm.yaml`` names ``hydra_plugins.sectional_moe_launcher.ResilientSlurmLauncher``,
a subclass of this one with nothing added.

Imports: hydra, the submitit plugin, :mod:`sectional_moe.runs`, :mod:`sectional_moe.resolvers`
(torch-free: Hydra imports every plugin at start-up).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher as _SubmititLocalLauncher
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import DictConfig, OmegaConf, open_dict

from sectional_moe import resolvers
from sectional_moe.runs.layout import RunDir

log = logging.getLogger(__name__)


def short_error(error: BaseException) -> str:
    """One line for a status file from submitit's error: its message without the job's stderr
    (``UncompletedJobError``), or the first and the last line of the job's traceback (``FailedJobError``)."""
    text = str(error).split("Error stream produced:")[0]  # submitit appends the job's stderr after this
    lines = [line.strip() for line in text.splitlines() if line.strip().strip("-")]
    if not lines:
        return type(error).__name__
    if any(line.startswith("Traceback") for line in lines):
        return f"{type(error).__name__}: {lines[0]} ... {lines[-1]}"
    return f"{type(error).__name__}: {' '.join(lines)}"


class ResilientSlurmLauncher(SlurmLauncher):
    """``SlurmLauncher`` that collects every job on its own and skips finished ones (see module doc)."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Submit the unfinished jobs of this batch as one job array; one JobReturn per job, in order."""
        assert self.config is not None and self.hydra_context is not None, "setup() was not called"
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            sweep_dir.chmod(int(str(self.config.hydra.sweep.mode), 8))
        log.info("Submitit 'slurm' sweep output dir : %s", sweep_dir)

        returns: dict[int, JobReturn] = {}
        pending: list[tuple[int, list[str], Path | None]] = []
        for job_num, overrides in enumerate(job_overrides, start=initial_job_idx):
            overrides = list(overrides)
            sweep_config, run_dir = self._job_config(overrides, job_num)
            finished = run_dir is not None and RunDir(run_dir).is_done()
            if finished and not OmegaConf.select(sweep_config, "force", default=False):
                log.info("\t#%d : %s  (finished: %s holds %s; not submitted)", job_num, " ".join(filter_overrides(overrides)),
                         run_dir, RunDir.DONE)
                returns[job_num] = self._finished_return(overrides, sweep_config, run_dir)
            else:
                log.info("\t#%d : %s", job_num, " ".join(filter_overrides(overrides)))
                pending.append((job_num, overrides, run_dir))

        if pending:
            state = Singleton.get_state()
            jobs = self._executor().map_array(
                self, [o for _, o, _ in pending], ["hydra.sweep.dir"] * len(pending), [n for n, _, _ in pending],
                [f"job_id_for_{n}" for n, _, _ in pending], [state] * len(pending))
            for (job_num, overrides, run_dir), job in zip(pending, jobs):
                returns[job_num] = self._collect(job, job_num, overrides, run_dir)
        return [returns[n] for n in sorted(returns)]

    def _executor(self) -> Any:
        """A submitit SLURM executor with this launcher's parameters (the plugin's mapping)."""
        import submitit  # lazy: Hydra imports every plugin at start-up

        params = dict(self.params)
        executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                                         slurm_max_num_timeout=params.pop("max_num_timeout", 0))
        shared = set(OmegaConf.structured(BaseQueueConf).keys())  # keys without the slurm_ prefix
        executor.update_parameters(**{k if k in shared else f"slurm_{k}": v for k, v in params.items()})
        return executor

    def _job_config(self, overrides: list[str], job_num: int) -> tuple[DictConfig | None, Path | None]:
        """A job's config and run directory, computed as hydra's ``run_job`` will in the job.

        None for the directory when it cannot be known before submission (e.g. a subdir that uses
        ``${hydra.job.id}``, the SLURM job id): such a job is always submitted.
        """
        assert self.config is not None and self.hydra_context is not None
        previous = HydraConfig.instance().cfg
        try:
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            with open_dict(sweep_config.hydra.job):
                sweep_config.hydra.job.num = job_num
            HydraConfig.instance().set_config(sweep_config)  # ${hydra:...} in the paths resolves per job, as in run_job
            run_dir = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
            return sweep_config, run_dir.absolute()
        except Exception as err:  # noqa: BLE001 - only the DONE shortcut is lost; the job itself reports real errors
            log.debug("run directory of job #%d not known before submission: %s", job_num, err)
            return None, None
        finally:
            HydraConfig.instance().cfg = previous

    def _finished_return(self, overrides: list[str], sweep_config: DictConfig | None, run_dir: Path) -> JobReturn:
        """What the job would return if it ran: train.main's value, read from its DONE marker."""
        metrics = RunDir(run_dir).done_metrics()
        value = metrics.get("val/loss_best", metrics.get("val/loss"))
        task_cfg = None
        if sweep_config is not None:
            task_cfg = OmegaConf.masked_copy(sweep_config, [k for k in sweep_config if k != "hydra"])
        return JobReturn(overrides=overrides, cfg=task_cfg, working_dir=str(run_dir),
                         task_name=str(self.config.hydra.job.name) if self.config else None,
                         status=JobStatus.COMPLETED, _return_value=value)

    def _collect(self, job: Any, job_num: int, overrides: list[str], run_dir: Path | None) -> JobReturn:
        """The job's own JobReturn; for a job that failed outside train.main or died without a
        result, a failure recorded in its run directory instead.

        That JobReturn is COMPLETED with value None, as train.main returns for a job that failed
        inside: Hydra's basic sweeper re-raises the error of a FAILED JobReturn before any callback
        runs, which would lose the sweep summary again. The failure itself is in the job's
        ``status.json``, which the summary reads (and it makes the multirun exit 1).
        """
        try:
            ret = job.results()[0]
        except Exception as err:  # noqa: BLE001 - UncompletedJobError (no result), FailedJobError (raised in the job)
            log.error("job #%d (%s, SLURM job %s) ended without a result: %s", job_num, " ".join(overrides), job.job_id, err)
            error = short_error(err)
        else:
            if ret.status != JobStatus.FAILED:
                return ret
            err = ret._return_value  # the exception Hydra's run_job caught
            log.error("job #%d (%s, SLURM job %s) failed: %r", job_num, " ".join(overrides), job.job_id, err)
            error = f"{type(err).__name__}: {err}"
        if run_dir is not None:
            self._record_failure(run_dir, error, job.job_id)
        return JobReturn(overrides=overrides, working_dir=str(run_dir) if run_dir else None,
                         task_name=str(self.config.hydra.job.name) if self.config else None,
                         status=JobStatus.COMPLETED, _return_value=None)

    @staticmethod
    def _record_failure(run_dir: Path, error: str, job_id: str) -> None:
        """Mark the run failed, unless the job itself recorded an outcome (done, or its own error)."""
        run = RunDir(run_dir)
        if (run.read_status() or {}).get("state") in ("done", "failed"):
            return
        run.write_status("failed", error, slurm_job_id=job_id)

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        """The job side (in the SLURM task): register our resolvers, then the plugin's job."""
        resolvers.register()
        return super().__call__(*args, **kwargs)


class LocalLauncher(_SubmititLocalLauncher):
    """The plugin's submitit-local launcher (``hydra/launcher=local``) whose jobs register our resolvers."""

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        resolvers.register()
        return super().__call__(*args, **kwargs)
