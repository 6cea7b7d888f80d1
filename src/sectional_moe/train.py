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
from sectional_moe.config import resolve_compile, resolve_precision, validate_config
from sectional_moe.errors import ConfigError
from sectional_moe.flops import flops_per_token, param_counts
from sectional_moe.lit import LMModule
from sectional_moe.loggers import build_loggers, flatten
from sectional_moe.spec import ModelSpec, spec_from_config
from sectional_moe.sweeps import write_status

log = logging.getLogger("sectional_moe")

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
        override_dirname = hc.job.override_dirname or ""
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


def find_resume_checkpoint(cfg: DictConfig, output_dir: Path) -> str | None:
    """``resume=auto``: the run directory's last.ckpt if any; a path: that file; ``never``: None."""
    if cfg.get("resume") in (None, "never"):
        return None
    if cfg.resume != "auto":
        return str(cfg.resume)
    last = output_dir / "checkpoints" / "last.ckpt"
    return str(last) if last.is_file() else None


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    kw = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(kw, dict)
    kw["precision"] = resolve_precision(cfg.trainer)
    if kw.get("limit_train_batches") is None:
        kw.pop("limit_train_batches", None)
    return kw


def build_callbacks(cfg: DictConfig, has_logger: bool = True) -> list[pl.Callback]:
    """Instantiate the ``callbacks`` group; logger-only callbacks are dropped under ``logger=none``."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None and "_target_" in c]
    if not has_logger:
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
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
    spec = validate_config(cfg)
    run = run_info(cfg)
    out = run.output_dir
    done = out / DONE_MARKER
    if done.is_file() and not cfg.get("force", False):
        log.info("run %s already finished (%s); nothing to do (force=true re-runs it)", run.key, done)
        return json.loads(done.read_text())
    write_status(out, "running")

    pl.seed_everything(cfg.seed, workers=True)
    from sectional_moe.data import LMDataModule  # imported here: keeps `--help` and config errors fast

    data_kw = OmegaConf.to_container(cfg.data, resolve=True)
    assert isinstance(data_kw, dict)
    dm = LMDataModule(**data_kw, seq_len=spec.seq_len, cache_dir=cfg.paths.cache_dir, seed=cfg.seed)
    dm.prepare_data()
    spec = spec_from_config(cfg, vocab_size=dm.vocab_size)

    ckpt_path = find_resume_checkpoint(cfg, out)
    resume_step = _checkpoint_step(ckpt_path)
    module = LMModule(spec.to_dict(), OmegaConf.to_container(cfg.optim, resolve=True), int(cfg.trainer.max_steps), resolve_compile(cfg))
    loggers = build_loggers(
        cfg.get("logger") or {}, run_dir=out, name=run.name, group=run.group, wandb_id=run.wandb_id,
        tags=list(cfg.get("tags") or []), resume_step=resume_step,
    )
    callbacks = build_callbacks(cfg, has_logger=bool(loggers))
    trainer = pl.Trainer(
        **trainer_kwargs(cfg),
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
            lg.log_hyperparams(logged_config(cfg, spec, derived))
    log.info("run %s -> %s (family=%s, %.2fM params, resume from %s)", run.name, out, spec.family,
             param_counts(spec)["total"] / 1e6, ckpt_path or "scratch")

    metrics: dict[str, float] = {}
    if cfg.get("train", True):
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        metrics.update(_scalar_metrics(trainer.callback_metrics))
        best = getattr(trainer.checkpoint_callback, "best_model_score", None)
        if best is not None:
            metrics["val/loss_best"] = float(best)
            metrics["val/ppl_best"] = math.exp(float(best))
    if cfg.get("test", True):
        has_best = bool(getattr(trainer.checkpoint_callback, "best_model_path", ""))
        trainer.test(module, datamodule=dm, ckpt_path="best" if has_best else None, verbose=False)
        metrics.update({k: v for k, v in _scalar_metrics(trainer.callback_metrics).items() if k.startswith("test/")})
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=1, sort_keys=True))
        done.write_text(json.dumps(metrics))
        write_status(out, "done")
        print(_summary_line(run.name, metrics, dm), flush=True)
    return metrics


def _checkpoint_step(ckpt_path: str | None) -> int | None:
    if not ckpt_path:
        return None
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    return int(state.get("global_step", 0))


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if (not hasattr(v, "numel") or v.numel() == 1)}


def _summary_line(name: str, metrics: dict[str, float], dm: Any) -> str:
    parts = [f"[{name}]"]
    for key in ("val/ppl", "val/ppl_best", "test/ppl"):
        if key in metrics:
            parts.append(f"{key}={metrics[key]:.2f}")
    try:
        parts.append(f"unigram baseline val ppl={dm.unigram_ppl('validation'):.1f}")
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
    try:
        metrics = train(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        write_status(run_dir, "failed", str(err))
        if multirun:
            return None
        sys.exit(2)
    except Exception as err:  # noqa: BLE001 - isolate sweep jobs; single runs re-raise below
        write_status(run_dir, "failed", f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        if multirun:
            log.exception("job failed; the sweep continues")
            return None
        raise
    finally:
        _finish_wandb()
    return metrics.get("val/loss_best", metrics.get("val/loss"))


def _finish_wandb() -> None:
    """Close the W&B run so the next job of an in-process multirun starts its own (pitfall P2)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()
