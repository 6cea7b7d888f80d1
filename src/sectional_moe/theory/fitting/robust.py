"""Robust-regression machinery shared by the fitters: the Huber loss and its derivative, the
multi-start L-BFGS-B runner that keeps every start, the warnings a multi-start table raises, and
explicit, logged drop rules for runs that must not enter a fit.

The recipe (``shared/scaling-laws.md`` §2.4, §8.6): a **summed** Huber loss (δ = 1e-3) on log-loss
residuals with tight tolerances (``ftol=1e-15, gtol=1e-12``) — the mean-reduced objective with
scipy's defaults stops next to its start (Besiroglu et al. 2024 [P]); every start's result kept;
diverged or under-trained runs dropped only by named :class:`DropRule` objects whose decisions are
logged and returned.

Owns: :func:`huber`, :func:`huber_grad`, :data:`TIGHT_TOL`, :func:`single_threaded_blas`,
:func:`run_starts`, :func:`multistart_warnings`, :class:`DropRule` and the ``drop_*`` rules,
:func:`apply_drop_rules`.
Imports: numpy, pandas, scipy.optimize (nothing of ours).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
from scipy import optimize

log = logging.getLogger("sectional_moe.theory.fitting")

TIGHT_TOL: dict[str, float] = {"ftol": 1e-15, "gtol": 1e-12}
"""L-BFGS-B tolerances of the recipe (scaling-laws.md §2.4). scipy's defaults are
``ftol≈2.2e-9, gtol=1e-5``: too loose for a Huber objective of order 1e-3."""


# ============================================================================================
# Huber loss
# ============================================================================================
def huber(r: np.ndarray, *, delta: float) -> np.ndarray:
    """Huber loss ``½r²`` if ``|r| ≤ δ`` else ``δ(|r| − δ/2)`` (elementwise)."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def huber_grad(r: np.ndarray, *, delta: float) -> np.ndarray:
    """Derivative of :func:`huber` w.r.t. r: ``clip(r, −δ, δ)``."""
    return np.clip(r, -delta, delta)


# ============================================================================================
# Multi-start L-BFGS-B
# ============================================================================================
@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run the block with one OpenBLAS thread in the calling thread (best effort, Linux).

    scipy's L-BFGS-B calls BLAS on tiny vectors; with OpenBLAS' default thread pool a second
    thread spins for nothing (twice the CPU time for the same wall time), and forked workers
    ran ~5x slower than serial. We call ``openblas_set_num_threads_local`` of every loaded
    OpenBLAS (numpy's and scipy's) and restore the previous value on exit.
    """
    restore = []
    try:
        with open("/proc/self/maps") as fh:
            fields = (line.split() for line in fh)
            paths = {f[-1] for f in fields if len(f) >= 6 and "openblas" in os.path.basename(f[-1]).lower()}
        for path in sorted(paths):
            try:
                fn = getattr(ctypes.CDLL(path), "openblas_set_num_threads_local")
            except (OSError, AttributeError):
                continue
            fn.restype = ctypes.c_int
            restore.append((fn, fn(1)))
    except OSError:  # no /proc (not Linux): nothing to do
        pass
    try:
        yield
    finally:
        for fn, old in restore:
            fn(old)


def run_starts(
    objective: Callable[..., tuple[float, np.ndarray]],
    starts: Sequence[np.ndarray],
    *,
    args: tuple = (),
    bounds: Sequence[tuple[float | None, float | None]] | None = None,
    options: dict[str, Any],
) -> list[optimize.OptimizeResult]:
    """L-BFGS-B (``jac=True``: ``objective`` returns value and gradient) from every start, one
    BLAS thread, overflow warnings silenced (a diverging start is a row of the table, not noise)."""
    with warnings.catch_warnings(), single_threaded_blas():
        warnings.simplefilter("ignore", RuntimeWarning)
        return [optimize.minimize(objective, x0, args=args, jac=True, method="L-BFGS-B", bounds=bounds, options=options)
                for x0 in starts]


def start_rows(names: Sequence[str], starts: Sequence[np.ndarray], results: Sequence[optimize.OptimizeResult],
               *, to_params: Callable[[np.ndarray], dict[str, float]] | None = None) -> list[dict[str, Any]]:
    """One table row per start: ``init_<name>``, the final values, objective, success, nit, message.
    ``to_params`` maps a transformed vector to the reported parameters (default: by ``names``)."""
    conv = to_params or (lambda x: {k: float(v) for k, v in zip(names, x)})
    rows = []
    for x0, res in zip(starts, results):
        rows.append({**{f"init_{k}": v for k, v in conv(np.asarray(x0, dtype=float)).items()}, **conv(res.x),
                     "objective": float(res.fun), "success": bool(res.success), "nit": int(res.nit), "message": str(res.message)})
    return rows


def best_row(table: pd.DataFrame, agree_rtol: float = 1e-6) -> tuple[int, int]:
    """(index of the lowest finite objective, number of starts within ``agree_rtol`` of it)."""
    obj = table["objective"].replace([np.inf, -np.inf], np.nan)
    if obj.notna().sum() == 0:
        raise ValueError("every start of the fit failed (non-finite objective); check the data for outliers")
    best_i = int(obj.idxmin())
    n_at_best = int((obj <= obj[best_i] * (1 + agree_rtol) + 1e-300).sum())
    return best_i, n_at_best


def multistart_warnings(table: pd.DataFrame, best_i: int, starts: np.ndarray, names: Sequence[str], agree_rtol: float) -> list[str]:
    """Warnings of a multi-start table: every best start began on the grid boundary (Hoffmann:
    "the optimal initialisation is not on the boundary" [P]); near-best starts disagree in their
    parameters (a flat or multimodal objective); the best start did not converge."""
    out = []
    obj = table["objective"].to_numpy()
    at_best = obj <= obj[best_i] * (1 + agree_rtol) + 1e-300
    near = table[at_best]
    for j, name in enumerate(names):
        values = np.unique(starts[:, j])
        if values.size > 2:
            inits = starts[at_best, j]
            if np.all((inits == values.min()) | (inits == values.max())):
                out.append(f"every start reaching the best objective has init_{name} on the grid boundary; widen the grid")
    if len(near) > 1:
        cols = list(names)
        spread = (near[cols].max() - near[cols].min()).abs()
        scale = near[cols].abs().max().clip(lower=1e-12)
        rel = (spread / scale).max()
        if rel > 1e-3:
            out.append(f"{len(near)} starts reach the best objective within {agree_rtol:g} but their parameters differ by up to "
                       f"{rel:.2g} (flat or multimodal objective)")
    if not bool(table.loc[best_i, "success"]):
        out.append(f"best start did not report convergence: {table.loc[best_i, 'message']}")
    return out


# ============================================================================================
# Explicit, logged drop rules
# ============================================================================================
@dataclass(frozen=True)
class DropRule:
    """A named rule; ``select(df)`` returns the reason (str) for each row to drop, indexed by label."""

    name: str
    select: Callable[[pd.DataFrame], pd.Series]

    def __call__(self, df: pd.DataFrame) -> pd.Series:
        return self.select(df)


def drop_nonfinite(*columns: str) -> DropRule:
    """Drop rows where any of ``columns`` is NaN or ±inf (diverged runs, failed logs, empty cells)."""

    def select(df: pd.DataFrame) -> pd.Series:
        bad = ~np.isfinite(df[list(columns)].astype(float))
        mask = bad.any(axis=1)
        return pd.Series({i: "non-finite " + ",".join(c for c in columns if bad.loc[i, c]) for i in df.index[mask]}, dtype=object)

    return DropRule(f"nonfinite({','.join(columns)})", select)


def drop_nonpositive(*columns: str) -> DropRule:
    """Drop rows where any of ``columns`` is ≤ 0 (cannot enter a log-space fit)."""

    def select(df: pd.DataFrame) -> pd.Series:
        bad = df[list(columns)].astype(float) <= 0
        mask = bad.any(axis=1)
        return pd.Series({i: "non-positive " + ",".join(c for c in columns if bad.loc[i, c]) for i in df.index[mask]}, dtype=object)

    return DropRule(f"nonpositive({','.join(columns)})", select)


def drop_top_k(column: str, k: int) -> DropRule:
    """Drop the ``k`` rows with the highest ``column`` (Epoch dropped the 5 highest losses [P])."""

    def select(df: pd.DataFrame) -> pd.Series:
        top = df[column].astype(float).nlargest(k)
        return pd.Series({i: f"among the {k} highest {column} ({v:.6g})" for i, v in top.items()}, dtype=object)

    return DropRule(f"top_k({column},{k})", select)


def drop_above(column: str, threshold: float) -> DropRule:
    """Drop rows with ``column`` > ``threshold`` (e.g. a loss above the unigram entropy: diverged)."""

    def select(df: pd.DataFrame) -> pd.Series:
        v = df[column].astype(float)
        return pd.Series({i: f"{column}={x:.6g} > {threshold:g}" for i, x in v[v > threshold].items()}, dtype=object)

    return DropRule(f"above({column},{threshold:g})", select)


def drop_undertrained(*, tokens: str, params: str, min_tokens_per_param: float) -> DropRule:
    """Drop runs with ``tokens/params`` below a threshold (too short to be near convergence)."""

    def select(df: pd.DataFrame) -> pd.Series:
        ratio = df[tokens].astype(float) / df[params].astype(float)
        bad = ratio[ratio < min_tokens_per_param]
        return pd.Series({i: f"{tokens}/{params}={x:.3g} < {min_tokens_per_param:g}" for i, x in bad.items()}, dtype=object)

    return DropRule(f"undertrained({tokens}/{params}<{min_tokens_per_param:g})", select)


def apply_drop_rules(data: pd.DataFrame, rules: Sequence[DropRule]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Apply ``rules`` in order (each sees the rows kept so far), log every drop.

    Returns (kept rows, drop log with columns row, rule, reason). Nothing is dropped silently.
    """
    kept = data
    records = []
    for rule in rules:
        reasons = rule(kept)
        for i, why in reasons.items():
            records.append({"row": i, "rule": rule.name, "reason": why})
            log.info("drop row %s by %s: %s", i, rule.name, why)
        kept = kept.drop(index=reasons.index)
    return kept, pd.DataFrame(records, columns=["row", "rule", "reason"])
