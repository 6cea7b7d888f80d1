"""The tidy run table: one row per run, whatever the source (see :mod:`sectional_moe.report.sources`).

Three sources, one table (:func:`~sectional_moe.report.sources.collect`):

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
The architecture columns come from the run's whole logged spec (``spec.*``), rebuilt with
:meth:`ModelSpec.from_dict <sectional_moe.models.spec.ModelSpec.from_dict>`.
Derived figures (best/final ppl, steady-state tokens/s, MFU, peak memory, expert load) are computed
from the *time series*, which the CSV logger and W&B receive identically, so the sources agree
to the last bit on finished runs; summary keys are only a fallback when no history exists.

Runs are never dropped: failed, unfinished and not-started runs are rows with their ``state``
(``done | failed | unfinished | running | not started``) and ``error``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from sectional_moe.models.spec import ModelSpec

log = logging.getLogger(__name__)

STATES = ("done", "failed", "unfinished", "running", "not started")

#: Columns of the tidy table, in display order (units in the names or in :data:`COLUMN_DOCS`).
ID_COLUMNS = ("run", "run_id", "group", "task_name", "state", "error")
CONFIG_COLUMNS = ("family", "size", "experts", "routing", "top_k", "expert_d_ff", "capacity_factor", "shared_expert",
                  "seq_reduction", "seq_reduction_setting", "pre_expert", "pre_expert_resolution", "seq_pool",
                  "expert_attention", "merge_proj", "sectional_every", "seed", "d_model", "n_layers", "d_ff", "seq_len",
                  "vocab_size", "batch_tokens", "max_steps", "lr")
#: Config columns that are a function of others, so never a grouping key: r is E when the setting
#: is "experts" (seq_reduction_setting carries the choice), and seeds/E are what a group spans.
DERIVED_CONFIG_COLUMNS = ("seq_reduction",)
METRIC_COLUMNS = (
    "params_total", "params_active", "params_flop_equivalent", "params_non_embedding", "flops_per_token", "tokens", "compute_flops",
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

INT_COLUMNS = ("experts", "top_k", "expert_d_ff", "d_ff", "seq_reduction", "sectional_every", "seed", "d_model", "n_layers", "seq_len", "vocab_size",
               "batch_tokens", "max_steps", "steady_windows")
STR_COLUMNS = ("run", "run_id", "group", "task_name", "state", "error", "family", "size", "routing", "seq_reduction_setting",
               "pre_expert_resolution", "seq_pool", "mem_kind", "expert_frac", "source", "path")
BOOL_COLUMNS = ("pre_expert", "expert_attention", "merge_proj", "shared_expert")

COLUMN_DOCS: dict[str, str] = {
    "run": "run name (its overrides without the seed)",
    "run_id": "W&B run id (the run directory's wandb_id file; else derived from task, group, run key); joins the sources",
    "state": "done | failed | unfinished (killed before recording an outcome) | running | not started",
    "experts": "E (token-MoE experts, or sections of d_model); empty for dense",
    "routing": "topk | hash | segment_fixed; 'none' for dense",
    "seq_reduction": "r, sequence shortening of sectional layers (sectional only)",
    "seq_reduction_setting": "model.seq_reduction as configured: 'experts' (r = E) or a fixed integer (sectional only)",
    "pre_expert, pre_expert_resolution, seq_pool, expert_attention, merge_proj, sectional_every": "the sectional switches (model.*; sectional only)",
    "expert_d_ff, capacity_factor, shared_expert": "expert width (empty: d_ff), token capacity (learned routing), shared expert (token MoE)",
    "batch_tokens": "tokens per optimiser step, all devices",
    "params_total": "all parameters, tied head counted once",
    "params_active": "non-embedding parameters a token's computation reads (the K routed experts, all of a sectional layer)",
    "params_flop_equivalent": "FLOP-equivalent active non-embedding parameters, N_a of Wan et al. 2026 (6 N_a + attention = "
                              "training FLOPs per token; folds the sectional 1/r saving in; runs before 2026-12-07 logged "
                              "it as params/active)",
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
    "unigram_val_ppl": "validation perplexity of a unigram model of the train tokens, on the blocks the model was "
                       "validated on (val/unigram_ppl; runs before 2026-12-07: the whole split, data/unigram_ppl_validation)",
    "bigram_val_ppl": "validation perplexity of a smoothed bigram model, on the same blocks (val/bigram_ppl)",
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


def num(value: Any) -> float | None:
    """A float from a logged value (CSV strings, ints, bools), or None when not a finite number."""
    if value is None or isinstance(value, (dict, list)):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _int(value: Any) -> int | None:
    x = num(value)
    return None if x is None else int(round(x))


def series(history: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    """Finite values of ``key`` over the history rows, in order."""
    out = []
    for row in history:
        x = num(row.get(key))
        if x is not None:
            out.append(x)
    return out


def _last(history: Sequence[Mapping[str, Any]], key: str) -> float | None:
    values = series(history, key)
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
        tps = num(row.get("perf/tokens_per_s"))
        tokens = num(row.get("perf/tokens"))
        if tps is None or tokens is None or tps <= 0:
            continue
        delta = tokens - prev_tokens
        prev_tokens = tokens
        if delta <= 0:  # a restart re-logged the counter; the window length is unknown
            continue
        windows.append({"tokens": delta, "time": delta / tps, "step_time": num(row.get("perf/step_time_s")),
                        "mfu": num(row.get("perf/mfu")), "tflops": num(row.get("perf/tflops_per_s_per_device"))})
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
        fracs = {int(m.group(1)): num(v) for k, v in row.items() if (m := pattern.match(k)) and num(v) is not None}
        if fracs:
            values = [fracs[i] for i in sorted(fracs)]
            out.update(expert_frac_min=min(values), expert_frac_max=max(values),
                       expert_frac=",".join(f"{v:.6g}" for v in values))
            break
    return out


def _peak_memory(history: Sequence[Mapping[str, Any]], final: Mapping[str, Any]) -> tuple[float | None, str | None]:
    for key, kind in (("mem/max_reserved_gib", "cuda_reserved"), ("mem/peak_rss_gib", "cpu_peak_rss")):
        values = series(history, key)
        if values:
            return max(values), kind
    for key, kind in (("summary/mem_max_reserved_gib", "cuda_reserved"), ("summary/mem_peak_rss_gib", "cpu_peak_rss")):
        if num(final.get(key)) is not None:
            return num(final.get(key)), kind
    return None, None


def _bool(value: Any) -> bool | None:
    """A logged boolean (YAML/W&B bools, or their text) as a bool, None when absent."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    x = num(value)
    return None if x is None else bool(x)


def _seq_reduction_setting(c: Mapping[str, Any]) -> str | None:
    """``model.seq_reduction`` as configured: "experts" or the integer as text."""
    raw = c.get("model.seq_reduction")
    if raw is None or raw == "":
        return None
    return "experts" if raw == "experts" else str(_int(raw))


_SPEC_FIELDS = {f.name for f in dataclasses.fields(ModelSpec)}


def logged_spec(config: Mapping[str, Any]) -> ModelSpec | None:
    """The run's :class:`ModelSpec` from its logged ``spec.*`` keys; None for a run that logged none
    (it failed before its loggers started, or never started). Keys of a newer spec are ignored."""
    values = {k[len("spec."):]: v for k, v in config.items() if k.startswith("spec.") and k[len("spec."):] in _SPEC_FIELDS}
    return ModelSpec.from_dict(values) if values else None


def _spec_columns(spec: ModelSpec, c: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture columns of a run, from its spec."""
    dense, sectional = spec.family == "dense", spec.family == "sectional"
    rule = spec.routing_rule
    return {
        "family": spec.family, "size": spec.size, "experts": None if dense else spec.experts,
        "routing": "none" if dense else spec.routing,
        "top_k": spec.top_k if rule is not None and rule.learned else None,
        "seq_reduction": spec.seq_reduction if sectional else None,
        "seq_reduction_setting": _seq_reduction_setting(c) if sectional else None,
        "expert_d_ff": spec.expert_d_ff if not dense else None,
        "capacity_factor": spec.capacity_factor if not dense else None,
        "shared_expert": spec.shared_expert if spec.family == "moe" else None,
        "pre_expert": spec.pre_expert if sectional else None,
        "pre_expert_resolution": spec.pre_expert_resolution if sectional and spec.pre_expert else None,
        "seq_pool": spec.seq_pool if sectional else None,
        "expert_attention": spec.expert_attention if sectional else None,
        "merge_proj": spec.merge_proj if sectional else None, "sectional_every": spec.sectional_every if sectional else None,
        "d_model": spec.d_model, "n_layers": spec.n_layers, "d_ff": spec.d_ff, "seq_len": spec.seq_len, "vocab_size": spec.vocab_size,
    }


def _unlogged_columns(c: Mapping[str, Any]) -> dict[str, Any]:
    """What a run without a logged spec still tells (the Hydra config, or a sweep's job line)."""
    family = c.get("family")
    return {"family": family, "size": c.get("size"), "experts": None if family == "dense" else _int(c.get("experts")),
            "routing": "none" if family == "dense" else c.get("routing_name")}


def tidy_row(rec: RunRecord) -> dict[str, Any]:
    """The table row of one run: config columns, derived metrics, state (see :data:`COLUMN_DOCS`)."""
    c, h, f = rec.config, rec.history, rec.final
    spec = logged_spec(c)
    row: dict[str, Any] = {
        "run": rec.name, "run_id": rec.run_id, "group": rec.group, "task_name": c.get("task_name") or None,
        "state": rec.state, "error": rec.error,
        **(_spec_columns(spec, c) if spec is not None else _unlogged_columns(c)),
        "seed": _int(c.get("seed")),
        "batch_tokens": _int(c.get("global_batch_tokens")), "max_steps": _int(c.get("trainer.max_steps")),
        "lr": num(c.get("optim.lr")),
        "params_total": num(_first(c, "params/total") or f.get("summary/params_total")),
        "params_active": num(_first(c, "params/active") or f.get("summary/params_active")),
        "params_flop_equivalent": num(_first(c, "params/flop_equivalent") or f.get("summary/params_flop_equivalent")),
        "params_non_embedding": num(_first(c, "params/non_embedding") or f.get("summary/params_non_embedding")),
        "flops_per_token": num(_first(c, "flops/per_token") or f.get("summary/flops_per_token")),
        # the baselines on the validated blocks; runs that logged none scored them on the whole split
        "unigram_val_ppl": _last(h, "val/unigram_ppl") or num(c.get("data/unigram_ppl_validation")),
        "bigram_val_ppl": _last(h, "val/bigram_ppl") or num(c.get("data/bigram_ppl_validation")),
    }
    row["tokens"] = _last(h, "perf/tokens") or num(_first(f, "perf/tokens", "summary/tokens"))
    row["compute_flops"] = _last(h, "perf/flops") or num(_first(f, "perf/flops", "summary/flops"))
    if row["compute_flops"] is None and row["tokens"] and row["flops_per_token"]:
        row["compute_flops"] = row["tokens"] * row["flops_per_token"]
    val_loss, val_ppl = series(h, "val/loss"), series(h, "val/ppl")
    row["train_loss_final"] = _last(h, "train/loss") or num(f.get("train/loss"))
    row["val_loss_final"] = val_loss[-1] if val_loss else num(_first(f, "val/loss", "summary/val_loss_final"))
    row["val_ppl_final"] = val_ppl[-1] if val_ppl else num(_first(f, "val/ppl", "summary/val_ppl_final"))
    row["val_loss_best"] = min(val_loss) if val_loss else num(_first(f, "val/loss_best", "summary/val_loss_best"))
    row["val_ppl_best"] = min(val_ppl) if val_ppl else num(_first(f, "val/ppl_best", "summary/val_ppl_best"))
    row["test_loss"] = _last(h, "test/loss") or num(_first(f, "test/loss", "summary/test_loss"))
    row["test_ppl"] = _last(h, "test/ppl") or num(_first(f, "test/ppl", "summary/test_ppl"))
    warmup = _int(c.get("callbacks.speed.warmup_windows"))
    perf = steady_state(h, 1 if warmup is None else warmup)
    if perf["tokens_per_s"] is None:  # no history: the W&B summary's steady-state figures
        perf = {"tokens_per_s": num(f.get("summary/tokens_per_s")), "step_time_s": num(f.get("summary/step_time_s")),
                "mfu": num(f.get("summary/mfu")), "tflops_per_s_per_device": num(f.get("summary/tflops_per_s_per_device")),
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
            df[col] = pd.to_numeric(pd.Series([num(v) for v in df[col]], index=df.index, dtype=object), errors="coerce").astype(float)
    order = {s: i for i, s in enumerate(STATES)}
    df["_state_order"] = df["state"].map(lambda s: order.get(s, len(order)))
    df = df.sort_values(["_state_order", "family", "size", "routing", "experts", "seed", "run"], na_position="first", kind="stable")
    return df.drop(columns="_state_order").reset_index(drop=True)


def comparable(df: pd.DataFrame) -> pd.DataFrame:
    """The table without source-specific columns, indexed by run id (to compare two sources)."""
    return df.drop(columns=[c for c in SOURCE_SPECIFIC if c in df.columns]).set_index("run_id").sort_index()


def expert_fractions(value: Any) -> np.ndarray:
    """The ``expert_frac`` column (comma-separated) back to an array (empty if missing)."""
    if not isinstance(value, str) or not value:
        return np.array([])
    return np.array([float(x) for x in value.split(",")])
