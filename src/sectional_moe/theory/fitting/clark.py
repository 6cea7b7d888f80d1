"""Clark et al. 2022's per-router law ``log₁₀ L = a·log₁₀N + b·log₁₀Ê + c·log₁₀N·log₁₀Ê + d`` [S]:
for fixed (E_start, E_max) it is linear in (a, b, c, d), solved by least squares in log₁₀ L; the
saturation (E_start, E_max) by a grid, then Nelder–Mead (scaling-laws.md §6.5 [I]). One fit per
router (:func:`fit_by_group`).

Owns: :func:`fit_clark`, :func:`fit_by_group`.
Imports: numpy, pandas, scipy.optimize; ``theory.laws`` (the law, Ê) and the fitting modules
``result`` and ``identify``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from scipy import optimize

from sectional_moe.theory.fitting.identify import check_design, check_positive_finite, complex_step_jacobian, identifiability
from sectional_moe.theory.fitting.result import FitResult
from sectional_moe.theory.laws import CLARK, clark_ehat


def fit_clark(
    *,
    N: Sequence[float] | np.ndarray,
    E: Sequence[float] | np.ndarray,
    L: Sequence[float] | np.ndarray,
    e_start_grid: Sequence[float] = (1.2, 1.5, 2.0, 3.0, 5.0, 8.0),
    e_max_grid: Sequence[float] = (50.0, 100.0, 300.0, 1000.0, 3000.0),
) -> FitResult:
    """Fit Clark et al.'s per-router law [S]: for fixed (E_start, E_max) the law is linear in
    (a, b, c, d) in log₁₀ space, solved by OLS; (E_start, E_max) by a grid, then Nelder–Mead on
    (ln E_start, ln(E_max − E_start)) — scaling-laws.md §6.5 [I]. Objective: ½Σ residual² in log₁₀ L.

    Refuses (:class:`~sectional_moe.theory.fitting.identify.Underdetermined`) fewer than 7 points,
    fewer than 2 distinct N or 4 distinct E (``CLARK.min_distinct``); the identifiability verdict
    marks, e.g., an E_max beyond the largest E swept (the saturation is then not seen)."""
    N, E, L = (np.asarray(x, dtype=float) for x in (N, E, L))
    check_positive_finite(N=N, E=E, L=L)
    check_design(law="clark", n_free=len(CLARK.params), inputs={"N": N, "E": E}, min_distinct=CLARK.design_rules())
    lN, y = np.log10(N), np.log10(L)

    def inner(es: float, em: float) -> tuple[float, np.ndarray]:
        lE = np.log10(clark_ehat(E, e_start=es, e_max=em))
        X = np.column_stack([lN, lE, lN * lE, np.ones_like(lN)])
        coef, *_ = np.linalg.lstsq(X, y, rcond=None)
        r = X @ coef - y
        return 0.5 * float(r @ r), coef

    rows = []
    for es in e_start_grid:
        for em in e_max_grid:
            if em > es:
                rows.append((es, em, inner(es, em)[0]))
    grid = pd.DataFrame(rows, columns=["e_start", "e_max", "objective"])
    b0 = grid.loc[int(grid["objective"].idxmin())]
    x0 = [math.log(b0["e_start"]), math.log(b0["e_max"] - b0["e_start"])]

    def unpack(x: Any) -> tuple[Any, Any]:
        return np.exp(x[0]), np.exp(x[0]) + np.exp(x[1])

    res = optimize.minimize(lambda x: inner(*(float(v) for v in unpack(x)))[0], x0, method="Nelder-Mead",
                            options={"xatol": 1e-10, "fatol": 1e-16, "maxiter": 5000})
    es, em = (float(v) for v in unpack(res.x))
    val, coef = inner(es, em)
    params = {"a": float(coef[0]), "b": float(coef[1]), "c": float(coef[2]), "d": float(coef[3]), "e_start": es, "e_max": em}
    resid = np.log10(CLARK.fn(N=N, E=E, **params)) - y

    def predict(theta: np.ndarray) -> np.ndarray:  # log10 L̂ of (a, b, c, d, ln E_start, ln(E_max − E_start))
        a, b, c, d, t0, t1 = theta
        e_start, e_max = unpack((t0, t1))
        lE = np.log10(clark_ehat(E, e_start=e_start, e_max=e_max))
        return a * lN + b * lE + c * lN * lE + d

    theta = np.array([*coef, *res.x], dtype=float)
    verdict = identifiability(jacobian=complex_step_jacobian(predict, theta), residuals=resid, predictions=resid + y,
                              names=("a", "b", "c", "d", "e_start", "e_max - e_start"), theta=theta,
                              log_space=("e_start", "e_max - e_start"))
    derived = {"N_cut": float(10 ** (-params["b"] / params["c"])) if params["c"] != 0 and abs(params["b"] / params["c"]) < 300 else None}
    warn = []
    if em > 2.0 * float(E.max()):
        warn.append(f"E_max = {em:.3g} lies beyond twice the largest E swept ({E.max():g}): the saturation is extrapolated")
    return FitResult(law="clark", params=params, objective=val, success=bool(res.success), message=str(res.message),
                     n_points=int(L.size), starts=grid, residuals=resid, derived=derived, warnings=warn,
                     settings={"loss": "mse_log10", "method": "OLS inner + grid/Nelder-Mead outer", "n_starts_at_best": 1},
                     identified=bool(verdict["identified"]), identifiability=verdict)


def fit_by_group(data: pd.DataFrame, *, group: str, fit: Callable[[pd.DataFrame], FitResult]) -> dict[Any, FitResult]:
    """Run ``fit`` separately on each value of column ``group`` (e.g. one Clark fit per router)."""
    return {key: fit(sub) for key, sub in data.groupby(group, sort=True)}
