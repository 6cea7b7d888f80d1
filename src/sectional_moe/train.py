"""Training entry point: a composed config in, a trained model, metrics and checkpoints out.

``python train.py ...`` (the thin root script) calls :func:`main`. The steps, in order:

1. validate the whole config (one clear error line and exit 2 on bad input, before any compute);
2. derive the run's identity (directory, W&B id, name, group) from its overrides and seed;
3. skip the run if it already finished (a ``DONE`` marker), resume it if it has a ``last.ckpt``;
4. prepare data, build the model, loggers, callbacks and the Lightning Trainer; fit; test;
5. write ``metrics.json`` and ``DONE``; always close the W&B run.
"""

from __future__ import annotations

import json
import logging
import math
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
from omegaconf import DictConfig, OmegaConf

from sectional_moe import runs
from sectional_moe.callbacks.nan_guard import NonFiniteError
from sectional_moe.checkpointing import AtomicCheckpointIO, check_compatible, select_resume_checkpoint
from sectional_moe.config import resolve_compile, resolve_precision, validate_config
from sectional_moe.errors import ConfigError, StaleRunError
from sectional_moe.flops import flops_per_token, param_counts
from sectional_moe.lit import LMModule
from sectional_moe.loggers import build_loggers, finish_wandb_run, flatten, redact_secrets, redact_text, scrub_secrets_in_files
from sectional_moe.spec import ModelSpec, spec_from_config
from sectional_moe.sweeps import write_status
from sectional_moe import slurm as cluster  # rank awareness, SLURM plugin, preemption checkpoint; registers launcher resolvers

log = logging.getLogger("sectional_moe")
# Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates; nothing for a user to act on
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")

DONE_MARKER = "DONE"
METRICS_FILE = "metrics.json"


@dataclass
class RunInfo:
    """Where a run writes and how it is named; all derived from its overrides and seed."""

    output_dir: Path
    key: str  # experts=8,routing=hash,seed=0
    name: str  # experts=8,routing=hash
    group: str | None  # one W&B group per sweep
    wandb_id: str
    multirun: bool


def run_info(cfg: DictConfig) -> RunInfo:
    """Identity of the current run from the Hydra runtime (or from the config when composed)."""
    output_dir = Path(cfg.paths.output_dir)
    override_dirname, multirun, group = "", False, cfg.get("group")
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        # Hydra resolves ${oc.env:...} in override values: keep secrets out of names, logs and W&B
        override_dirname = redact_text(hc.job.override_dirname or "")
        multirun = hc.mode == RunMode.MULTIRUN
        if multirun:
            group = Path(hc.sweep.dir).name
    key = runs.run_key(override_dirname, cfg.seed)
    return RunInfo(
        output_dir=output_dir,
        key=key,
        name=runs.run_name(override_dirname),
        group=group,
        wandb_id=runs.wandb_run_id(cfg.task_name, group, key),
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
    """Flat resolved config plus derived quantities, as W&B and CSV receive it.

    Dense runs log ``experts`` and ``routing`` as null so dashboards never mix them with MoE runs.
    """
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    if spec.family == "dense":
        container["experts"] = None
        container["routing"] = None
    flat = flatten(container)
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
    flat = redact_secrets(flatten(container))
    return {k: v for k, v in flat.items() if runs.is_identity_key(k)}


def derived_quantities(spec: ModelSpec, cfg: DictConfig, world_size: int) -> dict[str, Any]:
    p = param_counts(spec)
    tokens_per_step = int(cfg.data.batch_size) * spec.seq_len * world_size * int(cfg.trainer.accumulate_grad_batches)
    return {
        "params/total": p["total"],
        "params/active": p["active"],
        "params/embedding": p["embedding"],
        "params/non_embedding": p["non_embedding"],
        "flops/per_token": flops_per_token(spec, training=True),
        "flops/per_token_forward": flops_per_token(spec, training=False),
        "global_batch_tokens": tokens_per_step,
        "world_size": world_size,
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one training job described by a composed config; return its final metrics."""
    torch.set_flush_denormal(True)  # denormal gradients made CPU matmuls 3.7x slower (environment.md 6.2)
    if cluster.is_rank_zero():
        # Hydra saved the command line and config before we ran: scrub them before anything can
        # fail, so that not even a config error leaves a secret in .hydra/ or the sweep's multirun.yaml
        scrub_secrets_in_files(Path(cfg.paths.output_dir) / ".hydra")
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            scrub_secrets_in_files(Path(HydraConfig.get().sweep.dir))
    spec = validate_config(cfg)
    run = run_info(cfg)
    out = run.output_dir
    done = out / DONE_MARKER
    force = bool(cfg.get("force", False))
    if done.is_file() and not force:
        changed = runs.changed_identity_keys(out, identity_config(cfg))
        if changed:
            raise StaleRunError("force", f"{out} holds a finished run whose config differs in {', '.join(changed)}; pass "
                              "force=true to re-run it there (the old outputs move to replaced/), or set another task_name or group")
        log.info("run %s already finished (%s); nothing to do (force=true re-runs it)", run.key, done)
        return json.loads(done.read_text())
    if force and cluster.is_rank_zero():
        moved = runs.archive_outputs(out)  # force starts over; the finished work is kept, not deleted
        if moved:
            log.info("force=true: the previous outputs of %s moved to %s", run.key, moved)
    cluster.quiet_non_zero_ranks()  # every rank runs the app in this run dir; only rank 0 writes train.log
    if cluster.is_rank_zero():
        write_status(out, "running")

    # the checkpoint is verified (and a corrupt last.ckpt replaced by the previous one) before any compute
    ckpt_path, ckpt_state = select_resume_checkpoint("never" if force else cfg.get("resume", "auto"), out)
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
        ckpt_state = None
    module = LMModule(spec.to_dict(), OmegaConf.to_container(cfg.optim, resolve=True), int(cfg.trainer.max_steps), resolve_compile(cfg))
    wandb_id = runs.run_dir_wandb_id(out, run.wandb_id, create=cluster.is_rank_zero() and "wandb" in (cfg.get("logger") or {}))
    loggers = build_loggers(
        cfg.get("logger") or {}, run_dir=out, name=run.name, group=run.group, wandb_id=wandb_id,
        tags=list(cfg.get("tags") or []), resume_step=resume_step,
    )
    callbacks = build_callbacks(cfg, has_logger=bool(loggers)) + cluster.cluster_callbacks()
    tkw = trainer_kwargs(cfg)
    plugins = tkw.pop("plugins", None) or []
    trainer = pl.Trainer(
        **tkw,
        plugins=[*(plugins if isinstance(plugins, list) else [plugins]), checkpoint_io, *cluster.cluster_plugins()],
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
        out.mkdir(parents=True, exist_ok=True)
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=1, sort_keys=True))
        runs.record_identity_config(out, identity_config(cfg))
        done.write_text(json.dumps(metrics))
        write_status(out, "done")
        print(_summary_line(run.name, metrics, dm), flush=True)
    return metrics


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if (not hasattr(v, "numel") or v.numel() == 1)}


def _summary_line(name: str, metrics: dict[str, float], dm: Any) -> str:
    parts = [f"[{name}]"]
    for key in ("val/ppl", "val/ppl_best", "test/ppl"):
        if key in metrics:
            parts.append(f"{key}={metrics[key]:.2f}")
    try:
        parts.append(f"baselines val ppl: unigram={dm.unigram_ppl('validation'):.1f} bigram={dm.bigram_ppl('validation'):.1f}")
    except Exception:  # the baseline is informative only
        pass
    return "final: " + "  ".join(parts)


def main(cfg: DictConfig) -> float | None:
    """Hydra entry point. Returns the best validation loss (for Hydra sweepers).

    A single run exits 2 with one line on a config error and re-raises anything else. A multirun
    job records its error in ``status.json`` and returns None, so the other jobs still run; the
    sweep summary (sectional_moe.sweeps) reports it and makes the multirun exit non-zero.
    """
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    run_dir = Path(cfg.paths.output_dir)
    failed, preempted = True, False
    try:
        metrics = train(cfg)
        failed = False
    except SystemExit as err:
        if err.code == cluster.EXIT_PREEMPTED:  # PreemptionCheckpoint saved last.ckpt; the job is requeued
            preempted = True
            from sectional_moe.sweeps import read_status

            if (read_status(run_dir) or {}).get("state") != "requeued":  # keep the callback's "at step N"
                write_status(run_dir, "requeued", "preempted; resumes from checkpoints/last.ckpt")
        raise
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        if not isinstance(err, StaleRunError):  # the finished run it refused to reuse stays "done"
            write_status(run_dir, "failed", str(err))
        if multirun:
            return None
        sys.exit(2)
    except NonFiniteError as err:  # one line, no traceback: the message says where and what
        print(f"error: {err}", file=sys.stderr, flush=True)
        log.error("%s", err)
        write_status(run_dir, "failed", str(err), step=err.step, metric=err.metric)
        if multirun:
            return None
        sys.exit(1)
    except Exception as err:  # noqa: BLE001 - isolate sweep jobs; single runs re-raise below
        write_status(run_dir, "failed", f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        if multirun:
            log.exception("job failed; the sweep continues")
            return None
        raise
    finally:
        finish_wandb_run(exit_code=1 if failed else 0, preempting=preempted)  # preempted: closed as preempting, never failed
    return metrics.get("val/loss_best", metrics.get("val/loss"))


CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def check_cli_or_exit(argv: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Before Hydra composes anything: an unknown group option (``routing=foo``) -> one line, exit 2."""
    from sectional_moe.config import check_cli_overrides

    try:
        check_cli_overrides(argv, conf_dir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
