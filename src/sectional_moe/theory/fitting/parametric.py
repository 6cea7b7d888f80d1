"""Fits of any law of the registry: the generic multi-start fitter (:func:`fit_parametric`) and the
variable-projection cross-check of the Chinchilla form (:func:`fit_vpnls`, Open-Athena's recipe).

:func:`fit_parametric` optimises positive coefficients in log space and the others inside the box
the law declares, with an exact gradient (complex-step Jacobian of the law chained with the Huber
derivative), from a published start plus seeded jittered ones; it refuses data the law cannot be
fitted to (:func:`~sectional_moe.theory.fitting.identify.check_design`) and attaches the
identifiability verdict.

Owns: :func:`fit_parametric`, :func:`fit_vpnls`.
Imports: numpy, pandas, scipy.optimize; ``theory.laws`` and the fitting modules ``result``,
``robust``, ``identify`` and ``chinchilla`` (for the derived allocation of a VPNLS fit).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import optimize

from sectional_moe.theory.fitting.chinchilla import chinchilla_derived
from sectional_moe.theory.fitting.identify import check_design, check_positive_finite, complex_step_jacobian, identifiability
from sectional_moe.theory.fitting.result import FitResult
from sectional_moe.theory.fitting.robust import TIGHT_TOL, best_row, huber, huber_grad, run_starts, start_rows
from sectional_moe.theory.laws import CHINCHILLA, Law, get_law


def _to_theta(law: Law, values: Mapping[str, float], names: Sequence[str]) -> np.ndarray:
    return np.array([math.log(values[k]) if k in law.positive else float(values[k]) for k in names])


def _from_theta(law: Law, theta: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """Transformed vector → parameters (complex-safe: also used inside the complex-step Jacobian)."""
    return {k: (np.exp(t) if k in law.positive else t) for k, t in zip(names, theta)}


def fit_parametric(
    law: Law | str,
    *,
    inputs: Mapping[str, Sequence[float] | np.ndarray],
    L: Sequence[float] | np.ndarray,
    loss: str = "huber_log",
    delta: float = 1e-3,
    reduce: str = "sum",
    init: Mapping[str, float] | Sequence[Mapping[str, float]] | str | None = None,
    fixed: Mapping[str, float] | None = None,
    n_random_starts: int = 20,
    jitter: float = 0.5,
    seed: int = 0,
    ftol: float = TIGHT_TOL["ftol"],
    gtol: float = 1e-10,
    maxiter: int = 15000,
) -> FitResult:
    """Fit any registry law by multi-start L-BFGS-B (generic version of the recipe).

    Positive coefficients (``law.positive``) are optimised in log space, the others within
    ``law.bounds``. The gradient is exact: residual Jacobian by complex-step differentiation of
    the law (all registry laws are complex-analytic), chained with the Huber derivative.

    Args:
        law: a :class:`~sectional_moe.theory.laws.Law` or its registry name.
        inputs: the law's inputs (e.g. N, D, G), arrays of equal length.
        L: observed loss (nats).
        loss: "huber_log" (Huber on ln L residuals, the default), "huber" (on L) or "mse" (on ln L).
        init: starting coefficients: a dict, a list of dicts, a published set name, or None for
            the law's default published set. ``n_random_starts`` more starts jitter it by
            N(0, ``jitter``) in the transformed space (seeded); every start is kept.
        fixed: coefficients held at a value (not fitted).

    Raises :class:`~sectional_moe.theory.fitting.identify.Underdetermined` when there are fewer
    than (free parameters + 1) points, or an input has fewer distinct values than
    ``law.min_distinct`` asks (inputs whose parameters are all fixed are not checked).
    """
    law = get_law(law) if isinstance(law, str) else law
    fixed = dict(fixed or {})
    unknown = sorted(set(fixed) - set(law.params))
    if unknown:
        raise KeyError(f"law {law.name!r} has no parameter(s) {unknown}; its parameters: {list(law.params)}")
    names = [p for p in law.params if p not in fixed]
    missing = sorted(set(law.inputs) - set(inputs))
    if missing:
        raise KeyError(f"law {law.name!r}: missing inputs {missing} (needs {list(law.inputs)})")
    X = {k: np.asarray(v, dtype=float) for k, v in inputs.items()}
    y = np.asarray(L, dtype=float)
    check_positive_finite(L=y)
    for k, v in X.items():
        if v.shape != y.shape or not np.all(np.isfinite(v)):
            raise ValueError(f"input {k} must be finite with one value per loss ({v.size} values for {y.size} losses)")
    check_design(law=law.name, n_free=len(names), inputs=X, min_distinct=law.design_rules(fixed), can_fix=True)
    if loss not in ("huber_log", "huber", "mse"):
        raise ValueError(f"loss={loss!r}: use 'huber_log', 'huber' or 'mse'")
    target = y if loss == "huber" else np.log(y)

    def predict(theta: np.ndarray) -> np.ndarray:
        pred = law.fn(**X, **{**fixed, **_from_theta(law, theta, names)})
        return pred if loss == "huber" else np.log(pred)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        r = predict(theta) - target
        if not np.all(np.isfinite(r)):
            return 1e30, np.zeros_like(theta)
        J = complex_step_jacobian(predict, theta)
        if loss == "mse":
            val, psi = 0.5 * float((r * r).sum()), r
        else:
            val, psi = float(huber(r, delta=delta).sum()), huber_grad(r, delta=delta)
        grad = J.T @ psi
        if reduce == "mean":
            return val / r.size, grad / r.size
        return val, grad

    if init is None or isinstance(init, str):
        base = [law.coefficients(init)]
    elif isinstance(init, Mapping):
        base = [dict(init)]
    else:
        base = [dict(x) for x in init]
    rng = np.random.default_rng(seed)
    thetas = [_to_theta(law, b, names) for b in base]
    for _ in range(n_random_starts):
        thetas.append(thetas[0] + rng.normal(0.0, jitter, size=len(names)))
    bounds = [law.bounds.get(k, (None, None)) if k not in law.positive else (None, None) for k in names]
    lo_b = np.array([-np.inf if lo is None else lo for lo, _ in bounds])
    hi_b = np.array([np.inf if hi is None else hi for _, hi in bounds])
    starts = [np.clip(x0, lo_b, hi_b) for x0 in thetas]
    options = {"ftol": ftol, "gtol": gtol, "maxiter": maxiter}
    results = run_starts(objective, starts, bounds=bounds, options=options)
    table = pd.DataFrame(start_rows(names, starts, results,
                                    to_params=lambda x: {k: float(v) for k, v in _from_theta(law, x, names).items()}))
    best_i, n_at_best = best_row(table)
    best = table.loc[best_i]
    params = {**fixed, **{k: float(best[k]) for k in names}}
    params = {k: params[k] for k in law.params}
    theta = _to_theta(law, params, names)
    pred = predict(theta)
    r = pred - target
    verdict = identifiability(jacobian=complex_step_jacobian(predict, theta), residuals=np.real(r), predictions=np.real(pred),
                              names=names, theta=theta, log_space=[k for k in names if k in law.positive],
                              bounds={k: law.bounds[k] for k in names if k in law.bounds and k not in law.positive},
                              values=params)
    return FitResult(
        law=law.name,
        params=params,
        objective=float(best["objective"]),
        success=bool(best["success"]),
        message=str(best["message"]),
        n_points=int(y.size),
        starts=table,
        residuals=np.real(r),
        settings={"loss": loss, "delta": delta, "reduce": reduce, "method": "L-BFGS-B", "gradient": "complex-step",
                  "options": options, "fixed": fixed, "n_starts": int(len(thetas)), "n_starts_at_best": n_at_best,
                  "log_space": [k for k in names if k in law.positive],
                  "bounds": {k: list(law.bounds[k]) for k in names if k in law.bounds and k not in law.positive}},
        warnings=[] if bool(best["success"]) else [f"best start did not report convergence: {best['message']}"],
        identified=bool(verdict["identified"]),
        identifiability=verdict,
    )


# ============================================================================================
# VPNLS (variable projection, Open-Athena) — cross-check of the Chinchilla fit
# ============================================================================================
def _linear_solve(X: np.ndarray, y: np.ndarray, *, loss: str, delta: float, iters: int = 100) -> tuple[np.ndarray, float]:
    """Non-negative (E, A, B) for fixed exponents: NNLS (mse) or IRLS-weighted NNLS (huber):
    an unweighted NNLS start, then up to ``iters`` reweighted solves (stopping once converged)."""
    coef, _ = optimize.nnls(X, y)
    if loss == "mse":
        r = X @ coef - y
        return coef, 0.5 * float(r @ r)
    for _ in range(iters):
        r = X @ coef - y
        w = np.sqrt(np.where(np.abs(r) <= delta, 1.0, delta / np.maximum(np.abs(r), 1e-300)))
        new, _ = optimize.nnls(X * w[:, None], y * w)
        if np.allclose(new, coef, rtol=1e-13, atol=1e-15):
            coef = new
            break
        coef = new
    r = X @ coef - y
    return coef, float(huber(r, delta=delta).sum())


def fit_vpnls(
    *,
    N: Sequence[float] | np.ndarray,
    D: Sequence[float] | np.ndarray,
    L: Sequence[float] | np.ndarray,
    alpha_grid: Sequence[float] | np.ndarray | None = None,
    beta_grid: Sequence[float] | np.ndarray | None = None,
    loss: str = "mse",
    delta: float = 1e-3,
    n_scale: float = 1.0,
    d_scale: float = 1.0,
    refine: bool = True,
    irls_iters: int = 100,
) -> FitResult:
    """Variable-projection fit of ``L = E + A/N^α + B/D^β`` in linear loss space (Open-Athena
    vpnls recipe [P README]): for each (α, β) on a grid solve (E, A, B) ≥ 0 linearly (NNLS, or
    IRLS for Huber), keep the best grid point, then refine (α, β) by Nelder–Mead on the profile.

    ``n_scale``/``d_scale`` divide N and D before fitting (the vpnls README uses N/1e6, D/1e9);
    reported A and B are in those scaled units, and ``derived`` holds A_raw, B_raw for raw units.
    Grids default to 0.01 steps over [0.05, 1.0]. ``irls_iters`` caps the Huber reweighting per
    grid point; the default runs to convergence, vpnls's grid solver stops after 10, which is
    what its published fits used (scaling-laws.md §9.1 row 11 depends on it). Same design check
    as :func:`~sectional_moe.theory.fitting.chinchilla.fit_chinchilla`.
    """
    N, D, L = (np.asarray(x, dtype=float) for x in (N, D, L))
    check_positive_finite(N=N, D=D, L=L)
    check_design(law="chinchilla (VPNLS)", n_free=5, inputs={"N": N, "D": D}, min_distinct=CHINCHILLA.design_rules())
    n, d = N / n_scale, D / d_scale
    ag = np.round(np.arange(0.05, 1.0001, 0.01), 10) if alpha_grid is None else np.asarray(alpha_grid, dtype=float)
    bg = np.round(np.arange(0.05, 1.0001, 0.01), 10) if beta_grid is None else np.asarray(beta_grid, dtype=float)

    def profile(al: float, be: float) -> tuple[float, np.ndarray]:
        X = np.column_stack([np.ones_like(n), n**-al, d**-be])
        coef, val = _linear_solve(X, L, loss=loss, delta=delta, iters=irls_iters)
        return val, coef

    grid_rows = []
    for al in ag:
        for be in bg:
            val, coef = profile(al, be)
            grid_rows.append((al, be, val, *coef))
    grid = pd.DataFrame(grid_rows, columns=["alpha", "beta", "objective", "E", "A", "B"])
    bi = int(grid["objective"].idxmin())
    al, be = float(grid.loc[bi, "alpha"]), float(grid.loc[bi, "beta"])
    msg = "grid"
    if refine:
        res = optimize.minimize(lambda x: profile(x[0], x[1])[0], [al, be], method="Nelder-Mead",
                                options={"xatol": 1e-12, "fatol": 1e-12 * float(grid.loc[bi, "objective"]), "maxiter": 4000, "maxfev": 8000})
        if res.fun <= grid.loc[bi, "objective"]:
            al, be = float(res.x[0]), float(res.x[1])
        msg = f"grid + Nelder-Mead: {res.message}"
    val, coef = profile(al, be)
    params = {"E": float(coef[0]), "A": float(coef[1]), "B": float(coef[2]), "alpha": al, "beta": be}
    resid = params["E"] + params["A"] * n**-al + params["B"] * d**-be - L
    derived = {**chinchilla_derived(params), "A_raw": params["A"] * n_scale**al, "B_raw": params["B"] * d_scale**be}
    tn, td = n**-al, d**-be  # linear-space Jacobian of L̂ w.r.t. (E, A, B, α, β) [D]
    J = np.column_stack([np.ones_like(n), tn, td, -params["A"] * tn * np.log(n), -params["B"] * td * np.log(d)])
    verdict = identifiability(jacobian=J, residuals=resid, predictions=resid + L, names=("E", "A", "B", "alpha", "beta"),
                              theta=np.array([params[k] for k in ("E", "A", "B", "alpha", "beta")]),
                              bounds={"alpha": (float(ag.min()), float(ag.max())), "beta": (float(bg.min()), float(bg.max()))},
                              values=params)
    return FitResult(
        law="chinchilla", params=params, objective=val, success=True, message=msg, n_points=int(L.size), starts=grid,
        residuals=resid, derived=derived, identified=bool(verdict["identified"]), identifiability=verdict,
        settings={"loss": f"{loss}_linear", "delta": delta, "method": "VPNLS", "n_scale": n_scale, "d_scale": d_scale, "irls_iters": irls_iters,
                  "grid_resolution": float(np.min(np.diff(ag))) if ag.size > 1 else None, "n_starts_at_best": 1},
    )
