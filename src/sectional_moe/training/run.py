"""Training entry point: a composed config in, a trained model, metrics and checkpoints out.

``python train.py ...`` (the thin root script) calls :func:`main`. The steps, in order:

1. validate the whole config (one clear error line and exit 2 on bad input, before any compute);
2. derive the run's identity (directory, W&B id, name, group) from its overrides and seed;
3. skip the run if it already finished (a ``DONE`` marker), resume it if it has a ``last.ckpt``;
4. prepare data, build the model, loggers, callbacks and the Lightning Trainer; fit; test;
5. write ``metrics.json`` and ``DONE``; always close the W&B run.

Imports everything a run needs: models, data, callbacks, runs, tracking, the top-level modules.
Nothing imports this module but the entry points (``train.py``, tests).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from sectional_moe import env
from sectional_moe.callbacks.nan_guard import NonFiniteError
from sectional_moe.callbacks.preemption import cluster_callbacks
from sectional_moe.callbacks.progress import StepProgressBar
from sectional_moe.callbacks.threads import AdaptiveThreads
from sectional_moe.device import choose_precision, compile_rule, resolve_compile, resolve_device_type, resolve_precision, reuse_host_memory
from sectional_moe.errors import ConfigError, RunLockedError, StaleRunError, StorageError
from sectional_moe.models.flops import flops_per_token, param_counts
from sectional_moe.models.spec import ModelSpec, spec_from_config
from sectional_moe.runs.checkpoints import AtomicCheckpointIO, check_compatible, select_resume_checkpoint
from sectional_moe.runs.identity import flatten, identity_of, run_key, run_name
from sectional_moe.runs.layout import RunDir
from sectional_moe.runs.lock import DEFAULT_STALE_AFTER_S, acquire
from sectional_moe.secrets import redact_message, redact_secrets, redact_text, scrub_secrets_in_files
from sectional_moe.tracking.loggers import build_loggers, finish_wandb_run
from sectional_moe.tracking.wandb_ids import derived_wandb_id, run_wandb_id, startup_mode
from sectional_moe.training import startup
from sectional_moe.training.memory import check_memory
from sectional_moe.training.module import LMModule
from sectional_moe.training.validate import validate_config

log = logging.getLogger("sectional_moe")
# Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates; nothing for a user to act on
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")

@dataclass
class RunInfo:
    """Where a run writes and how it is named; all derived from its overrides and seed."""

    run_dir: RunDir
    key: str  # experts=8,routing=hash,seed=0
    name: str  # experts=8,routing=hash
    group: str | None  # one W&B group per sweep
    wandb_id: str
    multirun: bool


def run_info(cfg: DictConfig) -> RunInfo:
    """Identity of the current run from the Hydra runtime (or from the config when composed)."""
    override_dirname, multirun, group = "", False, cfg.get("group")
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        # Hydra resolves ${oc.env:...} in override values: keep secrets out of names, logs and W&B
        override_dirname = redact_text(hc.job.override_dirname or "")
        multirun = hc.mode == RunMode.MULTIRUN
        if multirun:
            group = Path(hc.sweep.dir).name
    key = run_key(override_dirname, cfg.seed)
    return RunInfo(
        run_dir=RunDir(cfg.paths.output_dir),
        key=key,
        name=run_name(override_dirname),
        group=group,
        wandb_id=derived_wandb_id(cfg.task_name, group, key),
        multirun=multirun,
    )


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    kw = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(kw, dict)
    kw["precision"] = resolve_precision(cfg.trainer)
    if isinstance(kw.get("strategy"), dict):  # e.g. conf/trainer/fsdp.yaml: a Strategy object with its wrap policy
        kw["strategy"] = instantiate(cfg.trainer.strategy)
    if kw.get("limit_train_batches") is None:
        kw.pop("limit_train_batches", None)
    kw.pop("flops_budget", None)  # ours: validate_config turned it into max_steps
    return kw


def build_callbacks(cfg: DictConfig, has_logger: bool = True) -> list[pl.Callback]:
    """Instantiate the ``callbacks`` group, minus what the run turned off: logger-only callbacks
    under ``logger=none`` and the progress bar under ``trainer.enable_progress_bar=false``."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None and "_target_" in c]
    if not has_logger:
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.ProgressBar)]
    return callbacks


def logged_config(cfg: DictConfig, spec: ModelSpec, extra: dict[str, Any]) -> dict[str, Any]:
    """Flat resolved config plus the whole spec (``spec.*``) and derived quantities, as W&B and CSV receive it.

    Dense runs log ``experts`` and ``routing`` as null so dashboards never mix them with MoE runs.
    """
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    if spec.family == "dense":
        container["experts"] = None
        container["routing"] = None
    flat = flatten(container)
    flat.update(flatten({"spec": spec.to_dict()}))  # the whole model spec: the report rebuilds it with ModelSpec.from_dict
    flat.update(
        {
            "family": spec.family,
            "size": spec.size,
            "routing_name": spec.routing,
            "seq_reduction_resolved": spec.seq_reduction if spec.family == "sectional" else None,
            "data_name": cfg.data.get("name", cfg.data.get("source")),
        }
    )
    flat.update(extra)
    return flat


def identity_config(cfg: DictConfig) -> dict[str, Any]:
    """The flat resolved config minus what does not change the computation (paths, loggers, force,
    resume, ...): what a finished run directory is checked against before it is reused."""
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    return identity_of(redact_secrets(flatten(container)))


def derived_quantities(spec: ModelSpec, cfg: DictConfig, world_size: int) -> dict[str, Any]:
    p = param_counts(spec)
    tokens_per_step = int(cfg.data.batch_size) * spec.seq_len * world_size * int(cfg.trainer.accumulate_grad_batches)
    return {
        "params/total": p["total"],
        "params/active": p["active"],  # what a token reads (MoE papers' sense)
        "params/flop_equivalent": p["flop_equivalent"],  # 6 x this + attention = training FLOPs per token
        "params/embedding": p["embedding"],
        "params/non_embedding": p["non_embedding"],
        "flops/per_token": flops_per_token(spec, training=True),
        "flops/per_token_forward": flops_per_token(spec, training=False),
        "global_batch_tokens": tokens_per_step,
        "world_size": world_size,
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def cluster_plugins() -> list[Any]:
    """Trainer plugins: under SLURM, Lightning's SLURM environment with auto-requeue off.

    Ranks, world size and the master address then come from SLURM (``srun`` started the
    processes; Lightning never re-launches the script). Requeueing stays with the launcher
    (:mod:`sectional_moe.callbacks.preemption`).
    """
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if env.in_slurm_job() and SLURMEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=False)]
    return []


def lock_run(rd: RunDir, cfg: DictConfig, held: contextlib.ExitStack) -> None:
    """Hold the run directory's lock until ``held`` closes (rank 0; the other ranks share its run)."""
    if env.is_rank_zero():
        held.enter_context(acquire(rd, float(cfg.get("run_lock_stale_s") or DEFAULT_STALE_AFTER_S)))


def train(cfg: DictConfig, *, held: contextlib.ExitStack | None = None, record: dict[str, str] | None = None) -> dict[str, float]:
    """Run one training job described by a composed config; return its final metrics.

    ``held``: the run-directory lock and signal handlers stay in it (``main`` closes it after
    recording the outcome); None = released when this returns. ``record``: Hydra's record of
    the launch (``startup.hydra_record``), written once the run is accepted.
    """
    if held is None:
        with contextlib.ExitStack() as own:
            return train(cfg, held=own, record=record)
    torch.set_flush_denormal(True)  # denormal gradients made CPU matmuls 3.7x slower (environment.md 6.2)
    startup.register_run_secrets(cfg)
    multirun = startup.is_multirun()
    startup.quiet_output(multirun)
    record = startup.hydra_record(cfg) if record is None else record
    spec = validate_config(cfg)
    run = run_info(cfg)
    rd = run.run_dir
    out = rd.path
    force = bool(cfg.get("force", False))
    if rd.is_done() and not force:
        changed = rd.changed_identity(identity_config(cfg))
        if changed:
            raise StaleRunError("force", f"{out} holds a finished run whose config differs in {', '.join(changed)}; pass "
                              "force=true to re-run it there (the old outputs move to replaced/), or set another task_name or group")
        log.info("run %s already finished (%s); nothing to do (force=true re-runs it)", run.key, rd.done_marker)
        return rd.done_metrics()
    lock_run(rd, cfg, held)  # a second launch of the same run stops here, having changed nothing
    if rd.is_done() and not force:  # it finished while we waited for the lock
        return rd.done_metrics()
    if env.is_rank_zero():
        rd.write_hydra_record(record)
        if multirun:
            scrub_secrets_in_files(Path(HydraConfig.get().sweep.dir))  # multirun.yaml holds the command line
    held.enter_context(startup.terminate_on_sigterm())
    device, precision_choice = resolve_device_type(cfg.trainer), choose_precision(cfg.trainer)
    precision = precision_choice.precision
    log.info("precision: %s (%s)", precision, precision_choice.reason)
    compile_rule(cfg.get("compile_rule"), device)  # a bad compile_rule value stops here, before any compute
    if startup.print_config_enabled(cfg.get("print_config", "auto"), multirun) and env.is_rank_zero():
        print(f"config (resolved; print_config=false hides this):\n{startup.config_text(cfg)}\n", flush=True)
    if cfg.get("memory_check", True):
        fsdp = "fsdp" in str(cfg.trainer.get("strategy", "")).lower()
        nodes = int(cfg.trainer.get("num_nodes", 1) or 1)
        world = (int(cfg.trainer.devices) if str(cfg.trainer.devices).isdigit() else 1) * nodes
        check_memory(cfg, spec, device, precision, shard=world if fsdp else 1)
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if wandb_cfg is not None and env.is_rank_zero():
        mode, note = startup_mode(str(wandb_cfg.get("mode", "auto")), float(wandb_cfg.get("startup_timeout_s") or 5))
        if note:
            print(f"warning: logger.wandb: {note}", file=sys.stderr, flush=True)
            log.warning("%s", note)
        with open_dict(cfg):
            cfg.logger.wandb.mode = mode
    threads, why = startup.choose_threads(cfg.get("threads", "auto"), device)
    if threads is not None:
        torch.set_num_threads(threads)
        log.info("CPU threads: %d (%s)", threads, why)
    host_malloc = reuse_host_memory(cfg.get("malloc_reuse", "auto"), device)
    log.info("host malloc reuse: %s (%s)", "on" if host_malloc.applied else "off", host_malloc.reason)
    if force and env.is_rank_zero():
        moved = rd.archive_outputs()  # force starts over; the finished work is kept, not deleted
        if moved:
            log.info("force=true: the previous outputs of %s moved to %s", run.key, moved)
    env.quiet_non_zero_ranks()  # every rank runs the app in this run dir; only rank 0 writes train.log
    rd.write_status("running")

    # the checkpoint is verified (and a corrupt last.ckpt replaced by the previous one) before any compute
    ckpt_path, ckpt_state = select_resume_checkpoint("never" if force else cfg.get("resume", "auto"), rd)
    if ckpt_state is not None:  # model shape now; the vocabulary once the tokenizer is known
        saved_vocab = (ckpt_state.get("hyper_parameters") or {}).get("spec", {}).get("vocab_size")
        check_compatible(ckpt_state, {**spec.to_dict(), "vocab_size": saved_vocab}, str(ckpt_path))

    pl.seed_everything(cfg.seed, workers=True)
    from sectional_moe.data import LMDataModule  # imported here: keeps `--help` and config errors fast

    data_kw = OmegaConf.to_container(cfg.data, resolve=True)
    assert isinstance(data_kw, dict)
    dm = LMDataModule(**data_kw, seq_len=spec.seq_len, cache_dir=cfg.paths.cache_dir, seed=cfg.seed)
    dm.prepare_data()
    spec = spec_from_config(cfg, vocab_size=dm.vocab_size)

    checkpoint_io = AtomicCheckpointIO()
    resume_step = None
    if ckpt_state is not None:
        check_compatible(ckpt_state, spec.to_dict(), str(ckpt_path))
        resume_step = int(ckpt_state.get("global_step", 0))
        checkpoint_io.preload(str(ckpt_path), ckpt_state)  # Lightning gets the verified copy, no second read
        if env.is_rank_zero():  # also in a sweep job, where Lightning's own "Restoring states" is silenced
            print(f"resuming {run.name} from {ckpt_path} at step {resume_step}", flush=True)
        ckpt_state = None
    module = LMModule(spec.to_dict(), OmegaConf.to_container(cfg.optim, resolve=True), int(cfg.trainer.max_steps), resolve_compile(cfg),
                      compile_rule=OmegaConf.to_container(cfg.compile_rule, resolve=True) if cfg.get("compile_rule") else None)
    # a run that starts from scratch gets a new W&B id (a killed attempt's W&B run is not continued)
    # and a CSV without the killed attempt's rows; a resumed run keeps both up to its checkpoint
    wandb_id = run_wandb_id(rd, run.wandb_id, create=env.is_rank_zero() and "wandb" in (cfg.get("logger") or {}),
                            renew=ckpt_path is None)
    loggers = build_loggers(
        cfg.get("logger") or {}, run_dir=out, name=run.name, group=run.group, wandb_id=wandb_id,
        tags=[redact_text(str(t)) for t in cfg.get("tags") or []], resume_step=resume_step if resume_step is not None else 0,
        quiet=multirun,
    )
    callbacks = build_callbacks(cfg, has_logger=bool(loggers)) + cluster_callbacks()
    for cb in callbacks:
        if isinstance(cb, StepProgressBar) and multirun:
            cb.prefix = run.name
    if device == "cpu" and cfg.get("threads", "auto") == "auto" and threads is not None and "OMP_NUM_THREADS" not in why:
        callbacks.append(AdaptiveThreads())
    tkw = trainer_kwargs(cfg)
    tkw.setdefault("enable_model_summary", not multirun)
    plugins = tkw.pop("plugins", None) or []
    trainer = pl.Trainer(
        **tkw,
        plugins=[*(plugins if isinstance(plugins, list) else [plugins]), checkpoint_io, *cluster_plugins()],
        logger=loggers or False,
        callbacks=callbacks,
        default_root_dir=str(out),
        max_epochs=-1,
        check_val_every_n_epoch=None,  # validate every val_check_interval optimiser steps
        use_distributed_sampler=False,  # our sampler shards by rank and resumes exactly
        enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks),
    )
    if loggers:
        derived = derived_quantities(spec, cfg, trainer.world_size)
        derived.update({f"data/{k}": v for k, v in dm.describe().items()})
        derived.update({"precision/resolved": precision, "precision/reason": precision_choice.reason})  # what trainer.precision=auto chose
        derived.update({"host/malloc_reuse": host_malloc.applied, "host/malloc_reason": host_malloc.reason})  # what malloc_reuse=auto chose
        for lg in loggers:
            lg.log_hyperparams(redact_secrets(logged_config(cfg, spec, derived)))
    log.info("run %s -> %s (family=%s, %.2fM params, resume from %s)", run.name, out, spec.family,
             param_counts(spec)["total"] / 1e6, ckpt_path or "scratch")

    metrics: dict[str, float] = {}
    if cfg.get("train", True):
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
        metrics.update(_scalar_metrics(trainer.callback_metrics))
        best = getattr(trainer.checkpoint_callback, "best_model_score", None)
        if best is not None:
            metrics["val/loss_best"] = float(best)
            metrics["val/ppl_best"] = math.exp(float(best))
    if cfg.get("test", True):
        has_best = bool(getattr(trainer.checkpoint_callback, "best_model_path", ""))
        trainer.test(module, datamodule=dm, ckpt_path="best" if has_best else None, verbose=False, weights_only=True)
        metrics.update({k: v for k, v in _scalar_metrics(trainer.callback_metrics).items() if k.startswith("test/")})
    if trainer.is_global_zero:
        rd.mark_done(metrics, identity_config(cfg))
        print(_summary_line(run.name, metrics), flush=True)
    return metrics


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if (not hasattr(v, "numel") or v.numel() == 1)}


def _summary_line(name: str, metrics: dict[str, float]) -> str:
    """``final: [run] val/ppl=... test/ppl=...  baselines val ppl: unigram=... bigram=...`` (the
    baselines scored on the same validation blocks as the model)."""
    parts = [f"[{name}]"]
    for key in ("val/ppl", "val/ppl_best", "test/ppl"):
        if key in metrics:
            parts.append(f"{key}={metrics[key]:.2f}")
    if "val/unigram_ppl" in metrics and "val/bigram_ppl" in metrics:
        parts.append(f"baselines val ppl: unigram={metrics['val/unigram_ppl']:.1f} bigram={metrics['val/bigram_ppl']:.1f}")
    return "final: " + "  ".join(parts)


def _record_failure(rd: RunDir, cfg: DictConfig, held: contextlib.ExitStack, record: dict[str, str],
                    state: str, error: str, **extra: Any) -> None:
    """Record a job's outcome, unless that would touch a directory that is not ours to write: a
    finished run's (a refused launch changes none of its files) or one another process holds."""
    if rd.is_done():
        return
    try:
        lock_run(rd, cfg, held)
    except RunLockedError:
        return
    if env.is_rank_zero() and record and not rd.hydra_overrides.is_file():
        rd.write_hydra_record(record)  # the sweep summary finds a failed job by its recorded overrides
    rd.write_status(state, error, **extra)


def main(cfg: DictConfig) -> float | None:
    """Hydra entry point. Returns the best validation loss (for Hydra sweepers).

    A single run exits 2 with one line on a config error, 1 on a full disk or a non-finite loss,
    143/130 after SIGTERM/Ctrl-C (``last.ckpt`` saved, status ``interrupted``) and re-raises
    anything else. A multirun job records its error in ``status.json`` and returns None, so the
    other jobs still run; the sweep summary (sectional_moe.cluster.sweeps) reports it and makes
    the multirun exit non-zero. A launch refused because the directory holds a finished run of
    another config, or is in use by a live process, writes nothing at all.
    """
    multirun = startup.is_multirun()
    rd = RunDir(cfg.paths.output_dir)
    failed, preempted = True, False
    held = contextlib.ExitStack()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    startup.register_run_secrets(cfg)
    record = startup.hydra_record(cfg) if env.is_rank_zero() else {}

    def refuse(err: ConfigError, code: int) -> None:
        print(f"error: {redact_message(str(err))}", file=sys.stderr, flush=True)
        if not multirun:
            sys.exit(code)

    try:
        metrics = train(cfg, held=held, record=record)
        failed = False
    except SIGTERMException as err:  # Lightning's own SIGTERM handling (code None: it would exit 0)
        _record_failure(rd, cfg, held, record, "interrupted", "SIGTERM; the same command resumes from the last checkpoint")
        print("interrupted (SIGTERM); the same command resumes from the last checkpoint", file=sys.stderr, flush=True)
        preempted = True
        sys.exit(startup.EXIT_SIGTERM)
    except SystemExit as err:
        if err.code in (env.EXIT_PREEMPTED, startup.EXIT_SIGINT):  # a checkpoint was saved at the signal
            preempted = True
            state = (rd.read_status() or {}).get("state")
            if state not in ("requeued", "stopped", "interrupted"):  # keep the callback's "at step N"
                rd.write_status("requeued" if env.in_slurm_job() else "interrupted",
                                "preempted; resumes from checkpoints/last.ckpt" if env.in_slurm_job() else "stopped by a signal")
        raise
    except (startup.Terminated, KeyboardInterrupt) as err:  # before training, or a second Ctrl-C
        code = startup.EXIT_SIGINT if isinstance(err, KeyboardInterrupt) else startup.EXIT_SIGTERM
        what = "SIGTERM" if code == startup.EXIT_SIGTERM else "Ctrl-C"
        _record_failure(rd, cfg, held, record, "interrupted", f"{what} before a checkpoint could be saved; the same command "
                        "resumes from the last checkpoint, if any")
        print(f"interrupted ({what}); the same command resumes from {rd.last_checkpoint} if it exists", file=sys.stderr, flush=True)
        preempted = True
        sys.exit(code)
    except (RunLockedError, StaleRunError) as err:  # not our directory to write: nothing is written
        refuse(err, 2)
        return None
    except StorageError as err:  # disk full: the previous checkpoint is intact
        _record_failure(rd, cfg, held, record, "failed", str(err))
        refuse(err, 1)
        return None
    except ConfigError as err:
        _record_failure(rd, cfg, held, record, "failed", str(err))
        refuse(err, 2)
        return None
    except NonFiniteError as err:  # one line, no traceback: the message says where and what
        log.error("%s", err)
        _record_failure(rd, cfg, held, record, "failed", str(err), step=err.step, metric=err.metric)
        refuse(err, 1)
        return None
    except Exception as err:  # noqa: BLE001 - isolate sweep jobs; single runs re-raise below
        _record_failure(rd, cfg, held, record, "failed", f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        if multirun:
            log.exception("job failed; the sweep continues")
            return None
        raise
    finally:
        finish_wandb_run(exit_code=1 if failed else 0, preempting=preempted)  # preempted: closed as preempting, never failed
        held.close()  # releases the run lock last: nothing else writes into the directory after it
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)
    return metrics.get("val/loss_best", metrics.get("val/loss"))
