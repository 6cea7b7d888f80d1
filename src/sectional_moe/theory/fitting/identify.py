"""Refuse what the data cannot determine: the design checks every fitter runs before fitting, and
the identifiability verdict it attaches after.

* :func:`check_design` — at least (free parameters + 1) points, and for every input that a free
  parameter acts on, the number of distinct values the law declares it needs
  (:attr:`Law.min_distinct <sectional_moe.theory.laws.Law>`); otherwise :class:`Underdetermined`,
  a ``ValueError`` whose one-line message says what is missing.
* :func:`identifiability` — after a fit, from the model's Jacobian at the optimum (in the fitting
  parameterisation): its numerical rank, the condition number of its column-scaled form, terms
  that contribute nothing, Gauss–Newton standard errors from the residual variance (when there
  are more points than parameters), and parameters sitting at a bound the law declares. The
  thresholds are ours [I]: rank below the parameter count, condition number above
  :data:`COND_MAX`, a 1σ relative error above 100 % (exponents) or a factor above 10 (coefficients
  fitted in log space) mark the fit "not identified".

Owns: :class:`Underdetermined`, :func:`check_design`, :func:`check_positive_finite`, :func:`identifiability`,
:func:`at_bound`, :func:`complex_step_jacobian`.
Imports: numpy (nothing of ours).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

COND_MAX = 1e8
"""Largest condition number of the column-scaled Jacobian of a fit we call identified [I]: above it
some parameter combination moves the predictions by < 1e-8 of what the others do."""
REL_SE_MAX = 1.0
"""Largest 1σ relative standard error of a linear-space parameter (an exponent) [I]."""
LOG_SE_MAX = math.log(10.0)
"""Largest 1σ standard error of a log-space parameter: uncertain by more than a factor 10 [I]."""
NULL_TERM = 1e-6
"""A parameter whose Jacobian column has an RMS below this fraction of the predictions' RMS
changes nothing: its term collapsed (e.g. an irreducible loss E → 0) [I]."""
BOUND_RTOL = 1e-3
"""A parameter within this fraction of its bounded range from a bound sits at it."""


class Underdetermined(ValueError):
    """The data cannot determine the law's parameters: too few points or distinct values."""


def check_design(*, law: str, n_free: int, inputs: Mapping[str, np.ndarray], min_distinct: Mapping[str, int],
                 can_fix: bool = False) -> None:
    """Raise :class:`Underdetermined` unless there are ≥ ``n_free + 1`` points and every input in
    ``min_distinct`` takes at least that many distinct values (only inputs a free parameter acts on
    should be listed). ``can_fix``: the fitter can hold parameters fixed (the message says so)."""
    n = min((np.asarray(v).size for v in inputs.values()), default=0)
    fix = " or hold parameters fixed (--fix)" if can_fix else ""
    if n < n_free + 1:
        raise Underdetermined(f"{law}: {n} point(s) for {n_free} free parameter(s); a fit needs at least {n_free + 1} "
                              f"(parameters + 1): add runs{fix}")
    for name, need in min_distinct.items():
        if name not in inputs:
            continue
        distinct = int(np.unique(np.asarray(inputs[name], dtype=float)).size)
        if distinct < need:
            raise Underdetermined(f"{law}: {name} takes {distinct} distinct value(s); the law's {name} terms need at least {need} "
                                  f"distinct values of {name}: vary {name} across runs{fix}")


def complex_step_jacobian(fun: Callable[[np.ndarray], np.ndarray], theta: np.ndarray, h: float = 1e-30) -> np.ndarray:
    """Jacobian of a real-analytic vector function by complex step (exact to rounding)."""
    cols = []
    for j in range(theta.size):
        t = theta.astype(complex)
        t[j] += 1j * h
        cols.append(np.imag(fun(t)) / h)
    return np.stack(cols, axis=1)


def check_positive_finite(**arrays: np.ndarray) -> None:
    """Raise ValueError unless every array is non-empty, finite and > 0 (log-space fits)."""
    for name, a in arrays.items():
        a = np.asarray(a, dtype=float)
        if a.size == 0:
            raise ValueError(f"{name} is empty")
        if not np.all(np.isfinite(a)) or np.any(a <= 0):
            raise ValueError(f"{name} must be positive and finite; apply drop rules first (drop_nonfinite, drop_nonpositive)")


def at_bound(value: float, lo: float | None, hi: float | None) -> str | None:
    """"lower"/"upper" when ``value`` sits at a finite bound (within :data:`BOUND_RTOL` of the range, or of 1
    when only one side is finite), else None."""
    span = (hi - lo) if lo is not None and hi is not None else 1.0
    if lo is not None and abs(value - lo) <= BOUND_RTOL * span:
        return "lower"
    if hi is not None and abs(value - hi) <= BOUND_RTOL * span:
        return "upper"
    return None


def identifiability(
    *,
    jacobian: np.ndarray,
    residuals: np.ndarray,
    predictions: np.ndarray,
    names: Sequence[str],
    theta: np.ndarray,
    log_space: Sequence[str] = (),
    bounds: Mapping[str, tuple[float | None, float | None]] | None = None,
    values: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The identifiability verdict of a fit (see the module docstring).

    Args:
        jacobian: (n, p) derivatives of the fitted quantity (e.g. ln L̂) w.r.t. the fitted
            parameters ``theta`` (log of the ``log_space`` ones).
        residuals: (n,) fitted-space residuals at the optimum (for the residual variance).
        predictions: (n,) the fitted quantity at the optimum (scale of the "null term" test).
        bounds: bounds of the linear-space parameters, in their own units; ``values`` their values.

    Returns a JSON-safe dict: identified, reasons, rank, n_params, condition_number (None when
    rank-deficient), rel_se (1σ: relative for linear-space parameters, of the log for log-space
    ones; None when not computable), at_bounds.
    """
    J = np.asarray(jacobian, dtype=float)
    n, p = J.shape
    reasons: list[str] = []
    log_space = set(log_space)
    norms = np.sqrt(np.mean(J * J, axis=0))
    scale = float(np.sqrt(np.mean(np.asarray(predictions, dtype=float) ** 2))) or 1.0
    null = [k for k, c in zip(names, norms) if not np.isfinite(c) or c < NULL_TERM * scale]
    if null:
        reasons.append(f"{', '.join(null)}: the fitted term changes nothing at these inputs (collapsed); the data do not constrain it")
    good = np.array([k not in null for k in names])
    cond: float | None = None
    rank = 0
    if J.size and np.all(np.isfinite(J)):
        Js = J[:, good] / norms[good] if good.any() else J[:, :0]
        s = np.linalg.svd(Js, compute_uv=False) if Js.size else np.array([])
        rank = int(np.sum(s > s[0] * 1e-10)) if s.size else 0
        if rank == p:
            cond = float(s[0] / s[-1])
    else:
        reasons.append("the Jacobian at the optimum is not finite")
    if rank < p and not null:
        reasons.append(f"the data determine only {rank} of {p} parameter combinations (rank-deficient Jacobian)")
    if cond is not None and cond > COND_MAX:
        reasons.append(f"ill-conditioned: the scaled Jacobian's condition number is {cond:.3g} > {COND_MAX:g} (parameters trade off)")
    rel_se: dict[str, float | None] = {k: None for k in names}
    r = np.asarray(residuals, dtype=float)
    if rank == p and n > p and np.all(np.isfinite(r)):
        sigma2 = float(r @ r) / (n - p)
        Js = J / norms  # invert in the column-scaled space: pinv would cut a tiny column's direction
        se = np.sqrt(np.clip(np.diag(sigma2 * np.linalg.pinv(Js.T @ Js)), 0.0, None)) / norms
        loose = []
        for k, s_k, t_k in zip(names, se, theta):
            if k in log_space:
                rel_se[k] = float(s_k)
                if s_k > LOG_SE_MAX:
                    loose.append(f"{k} (uncertain by a factor {math.exp(min(s_k, 700)):.3g}, 1σ)")
            else:
                rel = float(s_k / abs(t_k)) if t_k != 0 else math.inf
                rel_se[k] = rel if math.isfinite(rel) else None
                if rel > REL_SE_MAX:
                    loose.append(f"{k} (±{100 * rel:.0f} %, 1σ)")
        if loose:
            reasons.append("not determined by the data: " + ", ".join(loose))
    hits = {}
    for k, (lo, hi) in (bounds or {}).items():
        v = (values or {}).get(k)
        if v is None or k in log_space:
            continue
        side = at_bound(float(v), lo, hi)
        if side:
            hits[k] = side
    if hits:
        reasons.append("at a bound the law declares: " + ", ".join(f"{k} at its {s} bound {bounds[k][0 if s == 'lower' else 1]:g}"
                                                                    for k, s in hits.items()))
    return {"identified": not reasons, "reasons": reasons, "rank": rank, "n_params": p, "n_points": n,
            "condition_number": cond, "rel_se": rel_se, "at_bounds": hits,
            "thresholds": {"condition_number": COND_MAX, "rel_se": REL_SE_MAX, "log_se": LOG_SE_MAX, "null_term": NULL_TERM},
            "provenance": "[I] our criteria (see sectional_moe.theory.fitting.identify)"}
