"""Collect a sweep into one tidy table: one row per run, whatever the source.

Three sources, one table (:func:`collect`):

* **run directories** (``outputs/<task>/multirun/<group>/<run_key>/`` or ``.../runs/<run_key>/``):
  ``status.json`` + ``DONE`` (state), ``csv/hparams.yaml`` (the flat logged config with the derived
  params/FLOPs; ``.hydra/config.yaml`` when the job failed before logging), ``csv/metrics.csv``
  (the time series), ``metrics.json`` (final metrics, a fallback); jobs a sweep's ``summary.json``
  lists but that never created a directory become ``not started`` rows;
* **offline W&B runs**: every ``run-<id>.wandb`` file below a directory, read with
  :func:`sectional_moe.wandb_files.read_run` (several files of one id, i.e. a resumed offline run,
  are merged in start order);
* **the W&B public API**: ``wandb:ENTITY/PROJECT[/GROUP]`` (needs network and an API key).

Every source is first turned into a :class:`RunRecord` (flat config, time-series rows, final
metrics, state), and a single function (:func:`tidy_row`) derives the table's columns from it.
Derived figures (best/final ppl, steady-state tokens/s, MFU, peak memory, expert load) are computed
from the *time series*, which the CSV logger and W&B receive identically, so the sources agree
to the last bit on finished runs; summary keys are only a fallback when no history exists.

Runs are never dropped: failed, unfinished and not-started runs are rows with their ``state``
(``done | failed | unfinished | running | not started``) and ``error``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from sectional_moe import runs as run_ids

log = logging.getLogger(__name__)

STATES = ("done", "failed", "unfinished", "running", "not started")

#: Columns of the tidy table, in display order (units in the names or in :data:`COLUMN_DOCS`).
ID_COLUMNS = ("run", "run_id", "group", "task_name", "state", "error")
CONFIG_COLUMNS = ("family", "size", "experts", "routing", "top_k", "seq_reduction", "seq_reduction_setting", "pre_expert",
                  "seq_pool", "expert_attention", "merge_proj", "sectional_every", "seed", "d_model", "n_layers", "seq_len",
                  "vocab_size", "batch_tokens", "max_steps", "lr")
#: Config columns that are a function of others, so never a grouping key: r is E when the setting
#: is "experts" (seq_reduction_setting carries the choice), and seeds/E are what a group spans.
DERIVED_CONFIG_COLUMNS = ("seq_reduction",)
METRIC_COLUMNS = (
    "params_total", "params_active", "params_non_embedding", "flops_per_token", "tokens", "compute_flops",
    "train_loss_final", "val_loss_final", "val_ppl_final", "val_loss_best", "val_ppl_best", "test_loss", "test_ppl",
    "tokens_per_s", "step_time_s", "tflops_per_s_per_device", "mfu", "steady_windows", "peak_mem_gib", "mem_kind",
    "load_cv", "load_max_over_mean", "dead_experts", "expert_frac_min", "expert_frac_max", "expert_frac",
    "unigram_val_ppl", "bigram_val_ppl",
)
SOURCE_COLUMNS = ("source", "path")
TABLE_COLUMNS = ID_COLUMNS + CONFIG_COLUMNS + METRIC_COLUMNS + SOURCE_COLUMNS

#: Columns that legitimately differ between sources of the same run (where it was read from, and
#: the error text: status.json has the exception, a W&B run only its exit code).
SOURCE_SPECIFIC = ("source", "path", "error")

INT_COLUMNS = ("experts", "top_k", "seq_reduction", "sectional_every", "seed", "d_model", "n_layers", "seq_len", "vocab_size",
               "batch_tokens", "max_steps", "steady_windows")
STR_COLUMNS = ("run", "run_id", "group", "task_name", "state", "error", "family", "size", "routing", "seq_reduction_setting",
               "seq_pool", "mem_kind", "expert_frac", "source", "path")
BOOL_COLUMNS = ("pre_expert", "expert_attention", "merge_proj")

COLUMN_DOCS: dict[str, str] = {
    "run": "run name (its overrides without the seed)",
    "run_id": "W&B run id (the run directory's wandb_id file; else derived from task, group, run key); joins the sources",
    "state": "done | failed | unfinished (killed before recording an outcome) | running | not started",
    "experts": "E (token-MoE experts, or sections of d_model); empty for dense",
    "routing": "topk | hash | segment_fixed; 'none' for dense",
    "seq_reduction": "r, sequence shortening of sectional layers (sectional only)",
    "seq_reduction_setting": "model.seq_reduction as configured: 'experts' (r = E) or a fixed integer (sectional only)",
    "pre_expert, seq_pool, expert_attention, merge_proj, sectional_every": "the sectional switches (model.*; sectional only)",
    "batch_tokens": "tokens per optimiser step, all devices",
    "params_total": "all parameters, tied head counted once",
    "params_active": "FLOP-equivalent active non-embedding parameters (N_a, see sectional_moe.flops)",
    "flops_per_token": "training matmul FLOPs per token (3 x forward, PaLM convention, no recompute)",
    "tokens": "trained tokens D (all ranks)",
    "compute_flops": "training compute C = tokens x flops_per_token (FLOPs)",
    "val_ppl_best": "lowest validation perplexity; *_final: the last evaluation",
    "tokens_per_s": "steady-state global training tokens/s (first logging window(s) excluded, validation excluded)",
    "step_time_s": "steady-state seconds per optimiser step",
    "mfu": "steady-state model FLOPs utilisation (fraction of the device peak)",
    "steady_windows": "logging windows the steady-state figures average (0: only warm-up windows existed)",
    "peak_mem_gib": "peak memory in GiB: CUDA max reserved, or CPU process peak RSS (see mem_kind)",
    "load_cv": "expert-load coefficient of variation, last logging window, mean over routed layers",
    "load_max_over_mean": "max expert load / mean load, last window, worst routed layer",
    "expert_frac": "share of assignments per expert (last window, mean over layers), comma separated",
    "unigram_val_ppl": "validation perplexity of a unigram model of the train tokens (data/unigram_ppl_validation)",
    "bigram_val_ppl": "validation perplexity of a smoothed bigram model (data/bigram_ppl_validation)",
}


# ============================================================================================
# The intermediate record
# ============================================================================================
@dataclass
class RunRecord:
    """What every source yields for one run, before derivation."""

    run_id: str
    name: str
    group: str | None
    state: str
    error: str | None = None
    config: dict[str, Any] = field(default_factory=dict)  # the flat logged config
    history: list[dict[str, Any]] = field(default_factory=list)  # logged rows, in write order
    final: dict[str, Any] = field(default_factory=dict)  # metrics.json or the W&B summary (fallback)
    source: str = "runs"  # runs | wandb-offline | wandb-api
    path: str = ""


# ============================================================================================
# Small helpers
# ============================================================================================
def _first(mapping: Mapping[str, Any], *keys: str) -> Any:
    """First key of ``keys`` whose value is present and not None."""
    for key in keys:
        value = mapping.get(key)
        if value is not None and value != "":
            return value
    return None


def _num(value: Any) -> float | None:
    """A float from a logged value (CSV strings, ints, bools), or None when not a finite number."""
    if value is None or isinstance(value, (dict, list)):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _int(value: Any) -> int | None:
    x = _num(value)
    return None if x is None else int(round(x))


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _series(history: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    """Finite values of ``key`` over the history rows, in order."""
    out = []
    for row in history:
        x = _num(row.get(key))
        if x is not None:
            out.append(x)
    return out


def _last(history: Sequence[Mapping[str, Any]], key: str) -> float | None:
    values = _series(history, key)
    return values[-1] if values else None


# ============================================================================================
# Derivation: record -> tidy row
# ============================================================================================
def steady_state(history: Sequence[Mapping[str, Any]], warmup_windows: int = 1) -> dict[str, float | int | None]:
    """Time-weighted steady-state throughput from the logged ``perf/`` windows.

    The same definition as :meth:`SpeedMonitor.summary`: total tokens / total time over the windows
    after the first ``warmup_windows``. Each window row carries the cumulative ``perf/tokens`` and
    its own rate, so its duration is (tokens in the window) / rate. MFU and TFLOP/s are rates
    proportional to tokens/s, so their time-weighted mean is the ratio of totals too. When only
    warm-up windows exist all windows are used and ``steady_windows`` is 0 (flagged, not hidden).
    """
    windows = []
    prev_tokens = 0.0
    for row in history:
        tps = _num(row.get("perf/tokens_per_s"))
        tokens = _num(row.get("perf/tokens"))
        if tps is None or tokens is None or tps <= 0:
            continue
        delta = tokens - prev_tokens
        prev_tokens = tokens
        if delta <= 0:  # a restart re-logged the counter; the window length is unknown
            continue
        windows.append({"tokens": delta, "time": delta / tps, "step_time": _num(row.get("perf/step_time_s")),
                        "mfu": _num(row.get("perf/mfu")), "tflops": _num(row.get("perf/tflops_per_s_per_device"))})
    if not windows:
        return {"tokens_per_s": None, "step_time_s": None, "mfu": None, "tflops_per_s_per_device": None, "steady_windows": None}
    steady = windows[warmup_windows:] or windows
    n_steady = len(windows) - warmup_windows if len(windows) > warmup_windows else 0
    time = sum(w["time"] for w in steady)
    out: dict[str, float | int | None] = {"tokens_per_s": sum(w["tokens"] for w in steady) / time, "steady_windows": n_steady}
    steps = [w["time"] / w["step_time"] for w in steady if w["step_time"]]
    out["step_time_s"] = time / sum(steps) if len(steps) == len(steady) and sum(steps) > 0 else None
    for key, col in (("mfu", "mfu"), ("tflops", "tflops_per_s_per_device")):
        vals = [w[key] for w in steady]
        out[col] = sum(v * w["time"] for v, w in zip(vals, steady)) / time if all(v is not None for v in vals) else None
    return out


def expert_load(history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Expert-load statistics of the last logging window that has them (``moe/`` keys)."""
    out: dict[str, Any] = {"load_cv": _last(history, "moe/load_cv"),
                           "load_max_over_mean": _last(history, "moe/load_max_over_mean"),
                           "dead_experts": _last(history, "moe/dead_experts"),
                           "expert_frac_min": None, "expert_frac_max": None, "expert_frac": None}
    pattern = re.compile(r"^moe/expert(\d+)/frac$")
    for row in reversed(history):
        fracs = {int(m.group(1)): _num(v) for k, v in row.items() if (m := pattern.match(k)) and _num(v) is not None}
        if fracs:
            values = [fracs[i] for i in sorted(fracs)]
            out.update(expert_frac_min=min(values), expert_frac_max=max(values),
                       expert_frac=",".join(f"{v:.6g}" for v in values))
            break
    return out


def _peak_memory(history: Sequence[Mapping[str, Any]], final: Mapping[str, Any]) -> tuple[float | None, str | None]:
    for key, kind in (("mem/max_reserved_gib", "cuda_reserved"), ("mem/peak_rss_gib", "cpu_peak_rss")):
        values = _series(history, key)
        if values:
            return max(values), kind
    for key, kind in (("summary/mem_max_reserved_gib", "cuda_reserved"), ("summary/mem_peak_rss_gib", "cpu_peak_rss")):
        if _num(final.get(key)) is not None:
            return _num(final.get(key)), kind
    return None, None


def _bool(value: Any) -> bool | None:
    """A logged boolean (YAML/W&B bools, or their text) as a bool, None when absent."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    x = _num(value)
    return None if x is None else bool(x)


def _seq_reduction_setting(c: Mapping[str, Any]) -> str | None:
    """``model.seq_reduction`` as configured: "experts" or the integer as text."""
    raw = c.get("model.seq_reduction")
    if raw is None or raw == "":
        return None
    return "experts" if raw == "experts" else str(_int(raw))


def _seq_reduction(c: Mapping[str, Any], experts: int | None) -> int | None:
    """r of a sectional run: the resolved value if logged, else ``model.seq_reduction`` ("experts" -> E)."""
    resolved = _int(_first(c, "seq_reduction_resolved", "spec.seq_reduction"))
    if resolved is not None:
        return resolved
    raw = c.get("model.seq_reduction")
    return experts if raw == "experts" else _int(raw)


def tidy_row(rec: RunRecord) -> dict[str, Any]:
    """The table row of one run: config columns, derived metrics, state (see :data:`COLUMN_DOCS`)."""
    c, h, f = rec.config, rec.history, rec.final
    family = _first(c, "family", "model.family")
    experts = None if family == "dense" else _int(_first(c, "experts", "spec.experts"))
    routing = "none" if family == "dense" else _first(c, "routing_name", "routing.name", "spec.routing")
    sectional = family == "sectional"  # the sectional switches exist only in conf/model/sectional.yaml
    row: dict[str, Any] = {
        "run": rec.name, "run_id": rec.run_id, "group": rec.group, "task_name": _first(c, "task_name"),
        "state": rec.state, "error": rec.error,
        "family": family, "size": _first(c, "size.name", "spec.size", "size") if not isinstance(c.get("size"), str) else c["size"],
        "experts": experts, "routing": routing,
        "top_k": _int(_first(c, "routing.top_k")) if routing == "topk" else None,
        "seq_reduction": _seq_reduction(c, experts) if sectional else None,
        "seq_reduction_setting": _seq_reduction_setting(c) if sectional else None,
        "pre_expert": _bool(c.get("model.pre_expert")) if sectional else None,
        "seq_pool": _first(c, "model.seq_pool") if sectional else None,
        "expert_attention": _bool(c.get("model.expert_attention")) if sectional else None,
        "merge_proj": _bool(c.get("model.merge_proj")) if sectional else None,
        "sectional_every": _int(c.get("model.sectional_every")) if sectional else None,
        "seed": _int(c.get("seed")),
        "d_model": _int(_first(c, "size.d_model", "spec.d_model")), "n_layers": _int(_first(c, "size.n_layers", "spec.n_layers")),
        "seq_len": _int(_first(c, "size.seq_len", "spec.seq_len")),
        "vocab_size": _int(_first(c, "data/vocab_size", "spec.vocab_size", "data.vocab_size")),
        "batch_tokens": _int(c.get("global_batch_tokens")), "max_steps": _int(_first(c, "trainer.max_steps", "max_steps")),
        "lr": _num(_first(c, "optim.lr")),
        "params_total": _num(_first(c, "params/total") or f.get("summary/params_total")),
        "params_active": _num(_first(c, "params/active") or f.get("summary/params_active")),
        "params_non_embedding": _num(_first(c, "params/non_embedding") or f.get("summary/params_non_embedding")),
        "flops_per_token": _num(_first(c, "flops/per_token") or f.get("summary/flops_per_token")),
        "unigram_val_ppl": _num(c.get("data/unigram_ppl_validation")),
        "bigram_val_ppl": _num(c.get("data/bigram_ppl_validation")),
    }
    row["tokens"] = _last(h, "perf/tokens") or _num(_first(f, "perf/tokens", "summary/tokens"))
    row["compute_flops"] = _last(h, "perf/flops") or _num(_first(f, "perf/flops", "summary/flops"))
    if row["compute_flops"] is None and row["tokens"] and row["flops_per_token"]:
        row["compute_flops"] = row["tokens"] * row["flops_per_token"]
    val_loss, val_ppl = _series(h, "val/loss"), _series(h, "val/ppl")
    row["train_loss_final"] = _last(h, "train/loss") or _num(f.get("train/loss"))
    row["val_loss_final"] = val_loss[-1] if val_loss else _num(_first(f, "val/loss", "summary/val_loss_final"))
    row["val_ppl_final"] = val_ppl[-1] if val_ppl else _num(_first(f, "val/ppl", "summary/val_ppl_final"))
    row["val_loss_best"] = min(val_loss) if val_loss else _num(_first(f, "val/loss_best", "summary/val_loss_best"))
    row["val_ppl_best"] = min(val_ppl) if val_ppl else _num(_first(f, "val/ppl_best", "summary/val_ppl_best"))
    row["test_loss"] = _last(h, "test/loss") or _num(_first(f, "test/loss", "summary/test_loss"))
    row["test_ppl"] = _last(h, "test/ppl") or _num(_first(f, "test/ppl", "summary/test_ppl"))
    warmup = _int(c.get("callbacks.speed.warmup_windows"))
    perf = steady_state(h, 1 if warmup is None else warmup)
    if perf["tokens_per_s"] is None:  # no history: the W&B summary's steady-state figures
        perf = {"tokens_per_s": _num(f.get("summary/tokens_per_s")), "step_time_s": _num(f.get("summary/step_time_s")),
                "mfu": _num(f.get("summary/mfu")), "tflops_per_s_per_device": _num(f.get("summary/tflops_per_s_per_device")),
                "steady_windows": _int(f.get("summary/steady_windows"))}
    row.update(perf)
    row["peak_mem_gib"], row["mem_kind"] = _peak_memory(h, f)
    row.update(expert_load(h))
    row["source"], row["path"] = rec.source, rec.path
    return row


def to_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Rows -> the tidy DataFrame with fixed columns and dtypes (so sources compare equal)."""
    df = pd.DataFrame(list(rows))
    for col in TABLE_COLUMNS:
        if col not in df.columns:
            df[col] = None
    df = df[list(TABLE_COLUMNS)]
    for col in TABLE_COLUMNS:
        if col in INT_COLUMNS:
            df[col] = pd.array([_int(v) for v in df[col]], dtype="Int64")
        elif col in BOOL_COLUMNS:
            df[col] = pd.array([_bool(v) for v in df[col]], dtype="boolean")
        elif col in STR_COLUMNS:
            df[col] = pd.Series([None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in df[col]],
                                dtype=object, index=df.index)
        else:
            df[col] = pd.to_numeric(pd.Series([_num(v) for v in df[col]], index=df.index, dtype=object), errors="coerce").astype(float)
    order = {s: i for i, s in enumerate(STATES)}
    df["_state_order"] = df["state"].map(lambda s: order.get(s, len(order)))
    df = df.sort_values(["_state_order", "family", "size", "routing", "experts", "seed", "run"], na_position="first", kind="stable")
    return df.drop(columns="_state_order").reset_index(drop=True)


# ============================================================================================
# Source 1: run directories
# ============================================================================================
def _read_csv_history(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return [{k: v for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]


def _read_yaml(path: Path) -> dict[str, Any] | None:
    import yaml  # PyYAML comes with hydra/omegaconf

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _hydra_config(run_dir: Path) -> dict[str, Any]:
    """The job's composed config, flattened like the logged one (for jobs that failed before logging)."""
    from omegaconf import OmegaConf

    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    flat = _flatten(cfg) if isinstance(cfg, dict) else {}
    flat.setdefault("family", flat.get("model.family"))
    flat.setdefault("routing_name", flat.get("routing.name"))
    if isinstance(flat.get("size"), dict) or "size.name" in flat:
        flat["size"] = flat.get("size.name")
    return flat


def is_run_dir(path: Path) -> bool:
    return (path / "status.json").is_file() or (path / ".hydra" / "config.yaml").is_file() or (path / "DONE").is_file()


def find_run_dirs(root: Path) -> list[Path]:
    """Run directories below ``root`` (or ``root`` itself); ``wandb``/``checkpoints`` are not searched."""
    root = Path(root)
    if is_run_dir(root):
        return [root]
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if here != root and is_run_dir(here):
            found.append(here)
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if d not in ("wandb", "checkpoints", "csv", ".hydra", "report"))
    return sorted(found)


_SEED_SUFFIX = re.compile(r"(^|,)seed=[^,]*$")


def read_run_dir(run_dir: Path) -> RunRecord:
    """One run directory as a :class:`RunRecord` (state from ``DONE``/``status.json``)."""
    from sectional_moe.sweeps import read_status

    status = read_status(run_dir) or {}
    done = (run_dir / "DONE").is_file()
    state = "done" if done else {"running": "unfinished", "failed": "failed", "done": "done"}.get(status.get("state"), "unfinished")
    config = _read_yaml(run_dir / "csv" / "hparams.yaml") or {}
    csv_name = "csv"
    if not config:  # failed before the loggers were built, or logger=none
        config = _hydra_config(run_dir)
    else:
        csv_name = str(config.get("logger.csv.name") or "csv")
        config = {**config, **{k: v for k, v in _flatten({k: v for k, v in config.items() if isinstance(v, dict)}).items()}}
    history = _read_csv_history(run_dir / csv_name / "metrics.csv")
    try:
        final = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        final = {}
    key = run_dir.name
    group = run_dir.parent.name if run_dir.parent.parent.name == "multirun" else config.get("group")
    task = config.get("task_name") or (run_dir.parent.parent.parent.name if run_dir.parent.parent.name == "multirun" else run_dir.parent.parent.name)
    config.setdefault("task_name", task)
    # the name W&B got: run_name(override_dirname), which Hydra records in hydra.yaml (a long key is
    # shortened with a digest, so stripping ",seed=N" from the directory name is only a fallback)
    hydra_job = ((_read_yaml(run_dir / ".hydra" / "hydra.yaml") or {}).get("hydra") or {}).get("job") or {}
    override_dirname = hydra_job.get("override_dirname")
    name = run_ids.run_name(str(override_dirname)) if override_dirname is not None else (_SEED_SUFFIX.sub("", key) or "default")
    error = status.get("error") if state != "done" else None
    if state == "unfinished" and not status:
        error = "no status.json (never started, or an old run)"
    run_id = run_ids.recorded_wandb_id(run_dir) or run_ids.wandb_run_id(str(task), group, key)
    return RunRecord(run_id=run_id, name=name, group=group, state=state, error=error,
                     config=config, history=history, final=final, source="runs", path=str(run_dir))


def _not_started(root: Path, found: Sequence[Path]) -> list[RunRecord]:
    """Jobs listed in a sweep's ``summary.json`` that have no run directory in that sweep.

    ``summary.json`` records each job's directory as Hydra saw it, i.e. relative to wherever the
    sweep was launched (or absolute on the launching machine). A sweep read from another working
    directory, or copied elsewhere, would then list its finished runs again as "not started", so
    a job is matched by its run-directory *name* inside the directory that holds the summary.
    """
    names_by_sweep: dict[Path, set[str]] = {}
    for d in found:
        names_by_sweep.setdefault(d.parent.resolve(), set()).add(d.name)
    out = []
    for summary in sorted(Path(root).rglob("summary.json")):
        try:
            jobs = json.loads(summary.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(jobs, list):
            continue
        sweep_dir = summary.parent
        present = names_by_sweep.get(sweep_dir.resolve(), set())
        for job in jobs:
            if not isinstance(job, dict) or not job.get("dir"):
                continue
            name = Path(str(job["dir"])).name
            run_dir = sweep_dir / name
            if name in present or run_dir.exists():
                continue
            overrides = dict(o.split("=", 1) for o in str(job.get("job", "")).split() if "=" in o)
            config = {"experts": overrides.get("experts"), "routing_name": overrides.get("routing"),
                      "family": overrides.get("model"), "size": overrides.get("size"), "seed": overrides.get("seed")}
            group = sweep_dir.name
            out.append(RunRecord(run_id=run_ids.wandb_run_id(str(sweep_dir.parent.parent.name), group, name),
                                 name=_SEED_SUFFIX.sub("", name), group=group, state="not started",
                                 error=job.get("error"), config=config, source="runs", path=str(run_dir)))
    return out


def iter_run_dirs(root: Path) -> tuple[int, Iterator[RunRecord]]:
    dirs = find_run_dirs(root)
    extra = _not_started(root, dirs)

    def gen() -> Iterator[RunRecord]:
        for d in dirs:
            yield read_run_dir(d)
        yield from extra

    return len(dirs) + len(extra), gen()


# ============================================================================================
# Source 2: offline W&B run files
# ============================================================================================
REPORT_CONFIG_FLAG = "sectional_moe_report"  # set in the config of our own summary runs (skipped)


def _wandb_state(exit_code: int | None, summary: Mapping[str, Any], history: Sequence[Mapping[str, Any]],
                 config: Mapping[str, Any]) -> tuple[str, str | None]:
    """State of a W&B run from its exit record and what it logged.

    train.py finishes the W&B run with ``exit_code=1`` when the job fails (``loggers.finish_wandb_run``), so a
    non-zero exit code means failed. A run that exited 0 but lacks the final metrics its config
    asked for (test if ``test``, else validation if ``train``) is reported as failed too: runs
    written before train.py passed the exit code closed with 0 whatever happened. An explicit
    ``run/state`` summary key (``run/error``) wins if a future train.py writes one.
    """
    if summary.get("run/state"):
        return str(summary["run/state"]), summary.get("run/error")
    if exit_code is None:
        return "unfinished", "no exit record (still running, or killed)"
    if exit_code != 0:
        return "failed", f"W&B exit code {exit_code}"
    needs = "test/loss" if config.get("test", True) not in (False, "false") else ("val/loss" if config.get("train", True) not in (False, "false") else None)
    summary_key = {"test/loss": "summary/test_loss", "val/loss": "summary/val_loss_final"}.get(needs or "", "")
    if needs and not _series(history, needs) and _num(summary.get(summary_key)) is None:
        return "failed", f"the W&B run closed without {needs} (the job failed; see its status.json/train.log)"
    return "done", None


def _run_file_started(path: Path) -> str:
    found = re.search(r"run-(\d{8}_\d{6})-", path.parent.name)
    return found.group(1) if found else path.parent.name


def find_wandb_files(root: Path) -> dict[str, list[Path]]:
    """``run-<id>.wandb`` files below ``root`` grouped by run id, each group in start order."""
    groups: dict[str, list[Path]] = {}
    for path in sorted(Path(root).rglob("run-*.wandb")):
        if path.parent.is_symlink() or path.parent.name == "latest-run":
            continue
        run_id = path.stem[len("run-"):]
        groups.setdefault(run_id, []).append(path)
    return {k: sorted(v, key=_run_file_started) for k, v in groups.items()}


def read_wandb_files(files: Sequence[Path]) -> RunRecord | None:
    """Merge the run files of one id (a resumed offline run writes one file per attempt)."""
    from sectional_moe.wandb_files import read_run

    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    exit_code: int | None = None
    for path in files:
        data = read_run(path)
        config.update(data["config"])
        summary.update(data["summary"])
        history.extend(data["history"])
        info = {**info, **{k: v for k, v in data["run"].items() if v}}
        exit_code = data["exit_code"]
    if config.get(REPORT_CONFIG_FLAG):
        return None
    config = {**config, **_flatten({k: v for k, v in config.items() if isinstance(v, dict) and k != "_wandb"})}
    state, error = _wandb_state(exit_code, summary, history, config)
    return RunRecord(run_id=str(info.get("id") or files[0].stem[4:]), name=str(info.get("name") or ""), group=info.get("group") or None,
                     state=state, error=error, config=config, history=history, final=summary, source="wandb-offline",
                     path=str(files[-1].parent))


def iter_wandb_dir(root: Path) -> tuple[int, Iterator[RunRecord]]:
    groups = find_wandb_files(root)

    def gen() -> Iterator[RunRecord]:
        for files in groups.values():
            rec = read_wandb_files(files)
            if rec is not None:
                yield rec

    return len(groups), gen()


# ============================================================================================
# Source 3: the W&B public API
# ============================================================================================
API_STATES = {"finished": "done", "crashed": "failed", "failed": "failed", "killed": "failed", "running": "running", "pending": "running"}


def parse_wandb_source(source: str) -> tuple[str, str, str | None]:
    """``wandb:ENTITY/PROJECT[/GROUP]`` -> (entity, project, group or None)."""
    parts = source.split(":", 1)[1].strip("/").split("/", 2)
    if len(parts) < 2 or not all(parts[:2]):
        raise ValueError(f"{source!r}: use wandb:ENTITY/PROJECT or wandb:ENTITY/PROJECT/GROUP")
    return parts[0], parts[1], parts[2] if len(parts) == 3 and parts[2] else None


def record_from_api_run(run: Any) -> RunRecord | None:
    """A :class:`RunRecord` from a ``wandb.apis.public.Run`` (or anything with the same attributes)."""
    config = dict(run.config)
    if config.get(REPORT_CONFIG_FLAG) or getattr(run, "job_type", None) == "report":
        return None
    summary = getattr(run.summary, "_json_dict", None) or dict(run.summary)
    history = [dict(r) for r in run.scan_history()]  # every row, unsampled (run.history samples)
    config = {**config, **_flatten({k: v for k, v in config.items() if isinstance(v, dict) and k != "_wandb"})}
    state = API_STATES.get(str(run.state), str(run.state))
    error = None if state == "done" else f"W&B state {run.state}"
    if state == "done":
        state, error = _wandb_state(0, summary, history, config)
    return RunRecord(run_id=str(run.id), name=str(run.name), group=getattr(run, "group", None) or None, state=state, error=error,
                     config=config, history=history, final=summary, source="wandb-api", path=str(getattr(run, "url", "")))


def iter_wandb_api(source: str, api: Any = None) -> tuple[int, Iterator[RunRecord]]:
    entity, project, group = parse_wandb_source(source)
    if api is None:
        import wandb

        api = wandb.Api(timeout=60)
    found = list(api.runs(f"{entity}/{project}", filters={"group": group} if group else None))

    def gen() -> Iterator[RunRecord]:
        for run in found:
            rec = record_from_api_run(run)
            if rec is not None:
                yield rec

    return len(found), gen()


# ============================================================================================
# Entry point
# ============================================================================================
def detect_kind(source: str | Path) -> str:
    """``wandb-api`` for ``wandb:...``, ``runs`` if run directories exist below, else ``wandb-offline``."""
    if str(source).startswith("wandb:"):
        return "wandb-api"
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{source}: no such directory")
    if find_run_dirs(path):
        return "runs"
    if find_wandb_files(path):
        return "wandb-offline"
    raise FileNotFoundError(f"{source}: no run directories (status.json / .hydra) and no run-*.wandb files below it")


def collect(source: str | Path, *, kind: str = "auto", progress: bool = False, api: Any = None,
            on_record: Callable[[RunRecord], None] | None = None) -> pd.DataFrame:
    """The tidy table of every run under ``source`` (see the module docstring).

    Args:
        source: a directory (a sweep, a task's outputs, a folder of W&B runs) or ``wandb:ENTITY/PROJECT[/GROUP]``.
        kind: ``auto`` | ``runs`` | ``wandb-offline`` | ``wandb-api`` (a sweep directory holds both
            run directories and W&B files; ``auto`` prefers the run directories).
        progress: show a tqdm bar while reading runs.
        api: a ``wandb.Api`` to use (tests pass a stand-in).
    """
    kind = detect_kind(source) if kind == "auto" else kind
    if kind == "runs":
        total, records = iter_run_dirs(Path(source))
    elif kind == "wandb-offline":
        total, records = iter_wandb_dir(Path(source))
    elif kind == "wandb-api":
        total, records = iter_wandb_api(str(source), api=api)
    else:
        raise ValueError(f"kind={kind!r}: use auto, runs, wandb-offline or wandb-api")
    from tqdm.auto import tqdm

    rows = []
    for rec in tqdm(records, total=total, desc=f"collecting ({kind})", unit="run", disable=not progress, leave=False):
        if on_record is not None:
            on_record(rec)
        rows.append(tidy_row(rec))
    return to_frame(rows)


def comparable(df: pd.DataFrame) -> pd.DataFrame:
    """The table without source-specific columns, indexed by run id (to compare two sources)."""
    return df.drop(columns=[c for c in SOURCE_SPECIFIC if c in df.columns]).set_index("run_id").sort_index()


def expert_fractions(value: Any) -> np.ndarray:
    """The ``expert_frac`` column (comma-separated) back to an array (empty if missing)."""
    if not isinstance(value, str) or not value:
        return np.array([])
    return np.array([float(x) for x in value.split(",")])
