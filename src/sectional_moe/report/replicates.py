"""Seed replicates: one configuration's runs pooled into a mean with a 95 % confidence interval,
and each configuration compared with a reference (dense by default) paired by seed.

Definitions (stated in every table that uses them):

* a *configuration* is a set of runs that agree on every config column except ``seed``;
* its interval is the two-sided Student t-interval of the mean, ``mean ± t(0.975, n-1) · sd/√n``
  (sd with n - 1 in the denominator); with one run there is no interval;
* a *paired difference* pairs each run of a configuration with the reference run of the same
  seed (and the same values of the columns that vary among reference runs, e.g. the depth of an
  IsoFLOP grid): d_s = metric(config, s) - metric(reference, s); its mean and t-interval over the
  pairs. Pairing removes the seed-to-seed variation both share (same data order and init seed);
* the verdict reads the interval: *better* when it lies entirely on the better side of zero (lower
  for loss, perplexity and time; higher for throughput and MFU), *worse* when entirely on the
  other side, else *not distinguishable at n = k*.

Imports: numpy, scipy, pandas, :mod:`sectional_moe.report.table` (torch-free).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from sectional_moe.report.table import CONFIG_COLUMNS, DERIVED_CONFIG_COLUMNS

CONFIDENCE = 0.95
INTERVAL = "Student t-interval of the mean, 95 %, two-sided"
#: Metrics where larger is better (the others are minimised).
HIGHER_IS_BETTER = ("tokens_per_s", "mfu", "tflops_per_s_per_device")


def configuration_columns(df: pd.DataFrame) -> list[str]:
    """The config columns that identify a configuration: every one present except seed and the derived ones."""
    return [c for c in CONFIG_COLUMNS if c in df.columns and c != "seed" and c not in DERIVED_CONFIG_COLUMNS]


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, float | int | None]:
    """Mean, sd and the t-interval of the mean of ``values`` (NaNs dropped); no interval for n < 2."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "ci_lo": None, "ci_hi": None}
    mean = float(x.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "sd": None, "ci_lo": None, "ci_hi": None}
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci_lo": mean - half, "ci_hi": mean + half}


def _key_frame(df: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """The grouping columns as plain objects, missing values as a value of their own."""
    keys = df[list(columns)].astype(object)
    return keys.where(keys.notna(), "∅")


def aggregate(df: pd.DataFrame, metric: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per configuration of the finished runs: its columns, n, the seeds, mean, sd, CI of ``metric``."""
    done = df[(df["state"] == "done") & df[metric].notna()] if "state" in df.columns else df[df[metric].notna()]
    columns = list(columns if columns is not None else configuration_columns(df))
    if done.empty:
        return pd.DataFrame(columns=[*columns, "n", "seeds", "mean", "sd", "ci_lo", "ci_hi"])
    rows = []
    keys = _key_frame(done, columns)
    for _, idx in keys.groupby(columns, sort=False, dropna=False).groups.items():
        group = done.loc[idx]
        row = {c: group[c].iloc[0] for c in columns}
        row.update(t_interval(group[metric].astype(float).tolist()))
        row["seeds"] = ",".join(str(int(s)) for s in sorted(group["seed"].dropna())) if "seed" in group else ""
        rows.append(row)
    return pd.DataFrame(rows)


def verdict(ci_lo: float | None, ci_hi: float | None, n: int, metric: str) -> str:
    """better / worse / not distinguishable, from the interval of (configuration - reference)."""
    if ci_lo is None or ci_hi is None:
        return f"no interval at n = {n}"
    lower_better = metric not in HIGHER_IS_BETTER
    if ci_hi < 0:
        return "better" if lower_better else "worse"
    if ci_lo > 0:
        return "worse" if lower_better else "better"
    return f"not distinguishable at n = {n}"


def drop_implied(df: pd.DataFrame, columns: Sequence[str], keep: Sequence[str] = ()) -> list[str]:
    """``columns`` minus those whose value the others already determine in ``df`` (d_model and
    n_layers by size, batch tokens by seq_len, ...): what a label names and what a paired
    comparison matches on. Columns in ``keep`` stay; the later columns are dropped first."""
    named = list(dict.fromkeys(columns))
    table = df.astype(object).where(df.notna(), "none") if len(df) else df
    for col in reversed(list(named)):
        others = [c for c in named if c != col]
        if col in keep or not others or col not in table.columns:
            continue
        if table.groupby(others, dropna=False)[col].nunique().max() <= 1:
            named.remove(col)
    return named


def reference_mask(df: pd.DataFrame, reference: dict[str, Any]) -> np.ndarray:
    """The rows of ``df`` whose columns hold every ``reference`` value (a missing value never matches)."""
    hit = np.ones(len(df), dtype=bool)
    for col, value in reference.items():
        hit &= df[col].eq(value).fillna(False).to_numpy(dtype=bool)
    return hit


def check_reference(table: pd.DataFrame, reference: dict[str, Any]) -> None:
    """A chosen reference must name columns of the table and select at least one finished run."""
    unknown = [k for k in reference if k not in table.columns]
    if unknown:
        raise ValueError(f"--reference {','.join(unknown)}: not a column of the table")
    done = table[table["state"] == "done"] if "state" in table.columns else table
    if len(done) and not reference_mask(done, reference).any():
        shown = ",".join(f"{k}={v}" for k, v in reference.items())
        raise ValueError(f"--reference {shown}: no finished run has these values (e.g. family={done['family'].iloc[0]})")


def paired_differences(df: pd.DataFrame, metric: str, reference: dict[str, Any] | None = None,
                       columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Every non-reference configuration against the reference, paired by seed (module docstring).

    ``reference`` selects the reference runs by column values (default ``{"family": "dense"}``).
    Returns one row per configuration: its columns, the number of pairs, the mean difference, its
    interval, the relative difference (mean difference / reference mean) and the verdict.
    """
    reference = reference or {"family": "dense"}
    done = df[(df["state"] == "done") & df[metric].notna()] if "state" in df.columns else df[df[metric].notna()]
    columns = list(columns if columns is not None else configuration_columns(df))
    is_ref = reference_mask(done, reference)
    refs, others = done[is_ref], done[~is_ref]
    out_cols = [*columns, "n_pairs", "diff_mean", "diff_ci_lo", "diff_ci_hi", "rel_diff", "verdict"]
    if refs.empty or others.empty:
        return pd.DataFrame(columns=out_cols)
    # columns that vary among the reference runs (besides seed) are matched too: e.g. depth x steps
    # (not those the others determine among the references: a token-MoE reference at E = 4 and 8 has
    # expert_d_ff = d_ff/E too, and a slice MoE with another width is still paired by E)
    match = [c for c in columns if c in refs.columns and refs[c].astype(object).nunique(dropna=False) > 1]
    match = drop_implied(refs, match)
    ref_value = {}
    for _, r in refs.iterrows():
        ref_value[(tuple(_key_frame(r.to_frame().T, match).iloc[0]) if match else (), r["seed"])] = float(r[metric])
    rows = []
    keys = _key_frame(others, columns)
    for _, idx in keys.groupby(columns, sort=False, dropna=False).groups.items():
        group = others.loc[idx]
        diffs, ref_vals = [], []
        for _, run in group.iterrows():
            key = (tuple(_key_frame(run.to_frame().T, match).iloc[0]) if match else (), run["seed"])
            if key in ref_value:
                diffs.append(float(run[metric]) - ref_value[key])
                ref_vals.append(ref_value[key])
        if not diffs:
            continue
        ci = t_interval(diffs)
        row = {c: group[c].iloc[0] for c in columns}
        ref_mean = float(np.mean(ref_vals))
        row.update(n_pairs=ci["n"], diff_mean=ci["mean"], diff_ci_lo=ci["ci_lo"], diff_ci_hi=ci["ci_hi"],
                   rel_diff=ci["mean"] / ref_mean if ref_mean else None,
                   verdict=verdict(ci["ci_lo"], ci["ci_hi"], int(ci["n"]), metric))
        rows.append(row)
    return pd.DataFrame(rows, columns=out_cols)
