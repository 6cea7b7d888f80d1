"""Start-up validation of a composed config: every key a user can get wrong, checked once.

:func:`validate_config` runs before any data is loaded or model built, and raises
:class:`~sectional_moe.errors.ConfigError` naming the key, the bad value and the fix. Data errors
(missing files, empty or too-short corpora, an uncached hub dataset offline) are raised by the
data module's ``prepare_data`` as :class:`~sectional_moe.errors.DataError`, still before training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from sectional_moe.errors import ConfigError
from sectional_moe.optim import SCHEDULES
from sectional_moe.spec import ModelSpec, spec_from_config

MAX_PEAK_TFLOPS = 100_000  # dense TFLOP/s of one device; anything above is a unit mistake
NAN_POLICIES = ("stop", "skip")
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")
WANDB_MODES = ("auto", "online", "offline", "disabled")
# strategies Lightning runs on CUDA GPUs only (it refuses them on CPU, but only once the Trainer exists)
CUDA_ONLY_STRATEGIES = ("fsdp", "deepspeed")


def _positive(value: Any, key: str, kind: type = int, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(key, f"{key.rsplit('.', 1)[-1]}={value!r} must be a {'number' if kind is float else 'whole number'} {bound}")


def resolve_device_type(trainer: Mapping[str, Any]) -> str:
    """The device type a run will use: ``cuda`` or ``cpu``."""
    acc = str(trainer.get("accelerator", "auto"))
    if acc in ("gpu", "cuda"):
        return "cuda"
    if acc == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return acc


def resolve_precision(trainer: Mapping[str, Any]) -> str:
    """``auto`` -> ``bf16-mixed`` on CUDA, ``32-true`` on CPU."""
    p = str(trainer.get("precision", "auto"))
    if p == "auto":
        return "bf16-mixed" if resolve_device_type(trainer) == "cuda" else "32-true"
    return p


def resolve_compile(cfg: Mapping[str, Any]) -> bool:
    value = cfg.get("compile", "auto")
    if value == "auto":
        return resolve_device_type(cfg["trainer"]) == "cuda"
    return bool(value)


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
    elif check_device and not torch.cuda.is_available():
        why = "no CUDA device is visible"
    else:
        return
    raise ConfigError("trainer.strategy", f"strategy={name} shards the model over CUDA GPUs but {why}; "
                      "use trainer=ddp_sim on CPU (DDP over gloo), or run it on a GPU node")


def check_devices(trainer: Mapping[str, Any]) -> None:
    """On CUDA, ``trainer.devices`` (GPUs per node: a count or a list of indices) must exist here.

    Raises:
        ConfigError: ``trainer.devices`` asks for more GPUs, or a higher index, than are visible.
    """
    if resolve_device_type(trainer) != "cuda" or not torch.cuda.is_available():
        return
    visible = torch.cuda.device_count()
    devices = trainer.get("devices", "auto")
    if isinstance(devices, str) and "," in devices:  # Lightning's "0,1" index list
        devices = [int(d) for d in devices.split(",") if d.strip()]
    elif isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, bool):
        return
    if isinstance(devices, int):
        too_many = devices > visible  # -1 (all) and 0 are Lightning's to judge
    elif isinstance(devices, (list, tuple)) or (hasattr(devices, "__len__") and not isinstance(devices, str)):
        too_many = any(int(d) >= visible for d in devices)
    else:  # "auto"
        return
    if too_many:
        raise ConfigError("trainer.devices", f"devices={devices!r} but only {visible} CUDA device(s) are visible on this node; "
                          f"use trainer.devices<={visible} (devices counts GPUs per node; trainer.num_nodes scales out)")


def resolve_auto_schedule(cfg: Mapping[str, Any]) -> None:
    """Replace ``auto`` in ``optim.warmup_steps`` and ``trainer.val_check_interval`` by numbers
    derived from ``trainer.max_steps``, in place, so that the logged config holds what ran.

    ``auto`` warmup is min(50, max_steps // 10); ``auto`` validation runs 4 times per run. Both
    scale with ``max_steps``, so ``trainer.max_steps=20`` alone gives a sensible short run.
    """
    optim, trainer = cfg["optim"], cfg["trainer"]
    max_steps = int(trainer["max_steps"])
    if optim.get("warmup_steps") == "auto":
        optim["warmup_steps"] = min(50, max_steps // 10)
    if trainer.get("val_check_interval") == "auto":
        trainer["val_check_interval"] = max(1, max_steps // 4)


def validate_config(cfg: Mapping[str, Any], *, check_device: bool = True) -> ModelSpec:
    """Check the whole config; return the model spec (with ``data.vocab_size`` as a provisional
    vocabulary, replaced by the tokenizer's real size once data is prepared)."""
    data, optim, trainer = cfg["data"], cfg["optim"], cfg["trainer"]
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

    max_steps = trainer.get("max_steps")
    _positive(max_steps, "trainer.max_steps")
    resolve_auto_schedule(cfg)
    _positive(optim.get("warmup_steps"), "optim.warmup_steps", int, allow_zero=True)
    if optim["warmup_steps"] >= max_steps and not trainer.get("fast_dev_run"):
        raise ConfigError("optim.warmup_steps", f"warmup_steps={optim['warmup_steps']} >= trainer.max_steps={max_steps}; shorten the warmup")
    vci = trainer.get("val_check_interval")
    _positive(vci, "trainer.val_check_interval")
    if vci > max_steps and not trainer.get("fast_dev_run"):
        raise ConfigError("trainer.val_check_interval", f"val_check_interval={vci} > max_steps={max_steps}: no validation would run; use val_check_interval<={max_steps}")
    _positive(trainer.get("gradient_clip_val") or 0, "trainer.gradient_clip_val", float, allow_zero=True)
    _positive(trainer.get("accumulate_grad_batches"), "trainer.accumulate_grad_batches")

    precision = str(trainer.get("precision", "auto"))
    if precision not in PRECISIONS:
        raise ConfigError("trainer.precision", f"precision={precision!r}; use one of {', '.join(PRECISIONS)}")
    device = resolve_device_type(trainer)
    check_strategy(trainer, check_device=check_device)  # first: "fsdp needs GPUs" is the fix to show, not "no GPU"
    if check_device and device == "cuda" and not torch.cuda.is_available():  # off when planning GPU jobs on a laptop
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


# --------------------------------------------------------------------------------- command line
# Hydra flags whose next argument is a value, not an override
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--info", "--experimental-rerun"}
# flags that add config sources we cannot see from conf/: the check then steps aside
_EXTRA_SEARCH_PATH = {"--config-dir", "-cd", "--config-path", "-cp"}


def check_cli_overrides(argv: list[str], conf_dir: str | Path) -> None:
    """Name an unknown config-group option (``routing=foo``, ``size=huge``) in one line.

    Hydra's own error for these is a multi-line search-path dump. Only groups that are folders of
    ``conf_dir`` are checked (``hydra/*`` plugins and ``+group`` additions are left to Hydra).

    Raises:
        ConfigError: ``group: group=option is not an option; use one of ...``.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    conf_dir = Path(conf_dir)
    args, skip_next = [], False
    for arg in argv:
        if skip_next:
            skip_next = False
            continue
        if arg.split("=", 1)[0] in _EXTRA_SEARCH_PATH or arg.startswith("hydra.searchpath"):
            return
        if arg.startswith("-"):
            skip_next = arg in _FLAGS_WITH_VALUE and "=" not in arg
            continue
        args.append(arg)
    parser = OverridesParser.create()
    for arg in args:
        try:
            (override,) = parser.parse_overrides([arg])
        except Exception:  # noqa: BLE001 - a syntax error is Hydra's to report
            continue
        group = override.key_or_group
        if override.is_delete() or override.is_add() or group.startswith("hydra") or not (conf_dir / group).is_dir():
            continue
        if override.is_sweep_override():
            values: list[Any] = list(override.sweep_string_iterator())
        else:
            value = override.value()
            values = list(value) if isinstance(value, list) else [value]
        options = sorted(str(p.relative_to(conf_dir / group).with_suffix("")) for p in (conf_dir / group).rglob("*.yaml"))
        for value in values:
            if value is None or str(value) == "null":
                continue
            if not (conf_dir / group / f"{value}.yaml").is_file():
                raise ConfigError(group, f"{group}={value} is not an option; use one of {', '.join(options) or '(none: conf/' + group + '/ is empty)'}")


def check_launcher(launcher: Mapping[str, Any] | None) -> None:
    """A SLURM launcher needs ``sbatch``: refuse to start a multirun without it (before any job).

    Raises:
        ConfigError: ``hydra/launcher: ...`` when the launcher submits to SLURM and ``sbatch`` is
            not on PATH (not a SLURM login node).
    """
    import shutil

    target = str((launcher or {}).get("_target_", ""))
    if "slurm" not in target.lower():
        return
    assert launcher is not None
    launcher.get("tasks_per_node")  # resolves ${smoe.slurm_tasks:...}: a config error comes before "no SLURM here"
    if shutil.which("sbatch") is None:
        raise ConfigError("hydra/launcher", f"{target.rsplit('.', 1)[-1]} submits jobs with sbatch, which is not on PATH (no SLURM here); "
                          "run on a SLURM login node, start a local cluster (as root: bash slurm/local-cluster.sh start), "
                          "or drop hydra/launcher=... to run the jobs locally")
