"""Hoffmann et al. 2022's Approach 3 with the Epoch replication's hygiene: ``L = E + A/N^α + B/D^β``
fitted by a summed Huber loss (δ = 1e-3) on ln L in the log-sum-exp parameterisation (Eq. 11 [P]),
L-BFGS-B with analytic gradients from Hoffmann's grid of 4500 starts [P], every start kept,
exponents bounded as the law declares, and a design check and identifiability verdict
(:mod:`~sectional_moe.theory.fitting.identify`).

Owns: the init grids, the objective and its gradient, the (e, a, b, α, β) ↔ {E, A, B, α, β}
conversions, the derived allocation exponents and G (:func:`chinchilla_derived`), and
:func:`fit_chinchilla`.
Imports: numpy, pandas; ``theory.laws`` (the law, its bounds and design rules) and the fitting
modules ``result``, ``robust``, ``identify``.
"""

from __future__ import annotations

import itertools
import math
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from sectional_moe.theory.fitting.identify import check_design, check_positive_finite, identifiability
from sectional_moe.theory.fitting.result import FitResult
from sectional_moe.theory.fitting.robust import TIGHT_TOL, best_row, huber, huber_grad, multistart_warnings, run_starts, start_rows
from sectional_moe.theory.laws import CHINCHILLA

CHINCHILLA_PARAMS = ("E", "A", "B", "alpha", "beta")
CHINCHILLA_THETA = ("e", "a", "b", "alpha", "beta")  # E = exp(e), A = exp(a), B = exp(b)


def hoffmann_init_grid() -> np.ndarray:
    """Hoffmann et al. 2022 App. D.2 initialisation grid [P], 4500 rows of (e, a, b, α, β):
    α, β ∈ {0, 0.5, …, 2}, e ∈ {−1, −0.5, …, 1}, a, b ∈ {0, 5, …, 25}."""
    return init_grid(
        e=np.arange(-1.0, 1.01, 0.5), a=np.arange(0.0, 25.1, 5.0), b=np.arange(0.0, 25.1, 5.0),
        alpha=np.arange(0.0, 2.01, 0.5), beta=np.arange(0.0, 2.01, 0.5),
    )


def init_grid(*, e: Iterable[float], a: Iterable[float], b: Iterable[float], alpha: Iterable[float], beta: Iterable[float]) -> np.ndarray:
    """Cartesian grid of Chinchilla starts in (e, a, b, α, β) order (for a reduced grid)."""
    return np.array(list(itertools.product(e, a, b, alpha, beta)), dtype=float)


def small_init_grid() -> np.ndarray:
    """A 72-start subset of the Hoffmann grid (for tests and quick looks; not the recipe)."""
    return init_grid(e=[-1.0, 0.5], a=[0.0, 5.0, 10.0], b=[5.0, 10.0, 20.0], alpha=[0.0, 0.5], beta=[0.5, 1.0])


def _lse_terms(theta: np.ndarray, lnN: np.ndarray, lnD: np.ndarray) -> np.ndarray:
    e, a, b, al, be = theta
    return np.stack([a - al * lnN, b - be * lnD, np.full_like(lnN, e)])


def chinchilla_predict_log(theta: np.ndarray, lnN: np.ndarray, lnD: np.ndarray) -> np.ndarray:
    """``log L̂ = LSE(a − α·lnN, b − β·lnD, e)`` (Hoffmann Eq. 11) [P]; theta = (e, a, b, α, β)."""
    t = _lse_terms(theta, lnN, lnD)
    m = t.max(axis=0)
    return m + np.log(np.exp(t - m).sum(axis=0))


def chinchilla_jacobian(theta: np.ndarray, lnN: np.ndarray, lnD: np.ndarray) -> np.ndarray:
    """∂ log L̂/∂(e, a, b, α, β), shape (n, 5): with w = softmax of the three LSE terms,
    (w₂, w₀, w₁, −w₀·lnN, −w₁·lnD) [D]."""
    t = _lse_terms(theta, lnN, lnD)
    w = np.exp(t - t.max(axis=0))
    w /= w.sum(axis=0)
    return np.column_stack([w[2], w[0], w[1], -w[0] * lnN, -w[1] * lnD])


def chinchilla_objective(
    theta: np.ndarray, lnN: np.ndarray, lnD: np.ndarray, lnL: np.ndarray, delta: float = 1e-3, reduce: str = "sum"
) -> tuple[float, np.ndarray]:
    """Huber objective on log-loss residuals and its analytic gradient, theta = (e, a, b, α, β).

    ``Σ_i Huber_δ(LSE(a − α lnN_i, b − β lnD_i, e) − ln L_i)`` (Hoffmann Eq. 11 [P]);
    ``reduce="mean"`` divides by n (what Hoffmann probably did [P Epoch]; a trap with default
    tolerances). Gradient: w = softmax of the three LSE terms, g = clip(r, −δ, δ):
    ∂/∂e = Σ g·w₂, ∂/∂a = Σ g·w₀, ∂/∂b = Σ g·w₁, ∂/∂α = −Σ g·w₀·lnN, ∂/∂β = −Σ g·w₁·lnD.
    """
    t = _lse_terms(theta, lnN, lnD)
    m = t.max(axis=0)
    w = np.exp(t - m)
    s = w.sum(axis=0)
    w /= s
    r = m + np.log(s) - lnL
    g = huber_grad(r, delta=delta)
    val = float(huber(r, delta=delta).sum())
    grad = np.array([(g * w[2]).sum(), (g * w[0]).sum(), (g * w[1]).sum(), -(g * w[0] * lnN).sum(), -(g * w[1] * lnD).sum()])
    if reduce == "mean":
        n = lnL.size
        return val / n, grad / n
    if reduce != "sum":
        raise ValueError(f"reduce={reduce!r}: use 'sum' or 'mean'")
    return val, grad


def theta_to_params(theta: Sequence[float]) -> dict[str, float]:
    """(e, a, b, α, β) → {E, A, B, alpha, beta} (full precision)."""
    e, a, b, al, be = (float(x) for x in theta)
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": al, "beta": be}


def params_to_theta(params: Mapping[str, float]) -> np.ndarray:
    """{E, A, B, alpha, beta} → (e, a, b, α, β)."""
    return np.array([math.log(params["E"]), math.log(params["A"]), math.log(params["B"]), params["alpha"], params["beta"]])


def chinchilla_derived(params: Mapping[str, float]) -> dict[str, float | None]:
    """Allocation exponents of a Chinchilla fit [P Eq. 4]: a = β/(α+β), b = α/(α+β),
    G = (αA/(βB))^(1/(α+β)). Defined only for α, β > 0 and positive A, B; otherwise each is
    None (never a complex or NaN number)."""
    al, be, A, B = (float(params[k]) for k in ("alpha", "beta", "A", "B"))
    if not (al > 0 and be > 0 and A > 0 and B > 0) or not all(map(math.isfinite, (al, be, A, B))):
        return {"a": None, "b": None, "G": None}
    s = al + be
    try:
        G = math.exp((math.log(al * A) - math.log(be * B)) / s)
    except OverflowError:
        G = None
    return {"a": be / s, "b": al / s, "G": G}


def _chinchilla_starts(starts: np.ndarray, lnN: np.ndarray, lnD: np.ndarray, lnL: np.ndarray, delta: float, reduce: str,
                       options: dict[str, Any], bounds: list[tuple[float | None, float | None]]) -> list[dict[str, Any]]:
    """L-BFGS-B from each start; one result row per start (module level so it pickles)."""
    results = run_starts(chinchilla_objective, starts, args=(lnN, lnD, lnL, delta, reduce), bounds=bounds, options=options)
    return start_rows(CHINCHILLA_THETA, starts, results)


def _parallel_starts(starts: np.ndarray, n_jobs: int, *args: Any) -> list[dict[str, Any]]:
    """Split the starts over ``n_jobs`` worker processes (each single-threaded BLAS)."""
    chunks = np.array_split(starts, n_jobs)
    with ProcessPoolExecutor(max_workers=n_jobs) as pool:
        parts = pool.map(_chinchilla_starts, chunks, *([x] * n_jobs for x in args))
        return [row for part in parts for row in part]


def fit_chinchilla(
    *,
    N: Sequence[float] | np.ndarray,
    D: Sequence[float] | np.ndarray,
    L: Sequence[float] | np.ndarray,
    delta: float = 1e-3,
    init: np.ndarray | None = None,
    reduce: str = "sum",
    ftol: float = TIGHT_TOL["ftol"],
    gtol: float = TIGHT_TOL["gtol"],
    maxiter: int = 15000,
    default_tolerances: bool = False,
    agree_rtol: float = 1e-6,
    n_jobs: int = 1,
) -> FitResult:
    """Fit ``L = E + A/N^α + B/D^β`` by Hoffmann's Approach 3 (Eq. 11) [P] with the Epoch
    replication's hygiene [P]: summed Huber on log L, L-BFGS-B with analytic gradients,
    multi-start, tight tolerances; α and β bounded as :data:`~sectional_moe.theory.laws.CHINCHILLA`
    declares.

    Args:
        N: parameters (state your convention), D: tokens, L: loss (nats). Positive, finite.
        delta: Huber threshold on log-loss residuals (1e-3 as in Hoffmann).
        init: starts as rows of (e, a, b, α, β); default: the full 4500-start Hoffmann grid
            (:func:`hoffmann_init_grid`; about 2 min for 30 points on one core, use ``n_jobs``).
            Pass :func:`small_init_grid` or :func:`init_grid` for a smaller one.
        reduce: "sum" (recipe) or "mean" (the loss-scale trap, for demonstrations).
        ftol, gtol: L-BFGS-B tolerances; ``default_tolerances=True`` uses scipy's defaults
            instead (the trap).
        agree_rtol: relative objective window defining "starts at the best".
        n_jobs: worker processes for the starts (the result does not depend on it).

    Raises :class:`~sectional_moe.theory.fitting.identify.Underdetermined` with fewer than 6 points
    or fewer than 3 distinct N or D values.

    Returns:
        :class:`FitResult` with params {E, A, B, alpha, beta}, derived {a, b, G}, every start in
        ``starts`` (init_*, final params, objective, success, nit), residuals (pred − obs) in
        log space, the identifiability verdict, and warnings if the best start is on the grid
        boundary or if near-best starts disagree in their parameters.
    """
    N, D, L = (np.asarray(x, dtype=float) for x in (N, D, L))
    check_positive_finite(N=N, D=D, L=L)
    check_design(law="chinchilla", n_free=5, inputs={"N": N, "D": D}, min_distinct=CHINCHILLA.design_rules())
    lnN, lnD, lnL = np.log(N), np.log(D), np.log(L)
    starts = hoffmann_init_grid() if init is None else np.atleast_2d(np.asarray(init, dtype=float))
    if starts.shape[1] != 5:
        raise ValueError(f"init must have 5 columns (e, a, b, alpha, beta), got shape {starts.shape}")
    bounds = [(None, None)] * 3 + [CHINCHILLA.bounds["alpha"], CHINCHILLA.bounds["beta"]]
    starts = np.column_stack([starts[:, :3], np.clip(starts[:, 3:], [b[0] for b in bounds[3:]], [b[1] for b in bounds[3:]])])
    options: dict[str, Any] = {"maxiter": maxiter}
    if not default_tolerances:
        options.update(ftol=ftol, gtol=gtol)
    if n_jobs > 1 and len(starts) > n_jobs:
        rows = _parallel_starts(starts, n_jobs, lnN, lnD, lnL, delta, reduce, options, bounds)
    else:
        rows = _chinchilla_starts(starts, lnN, lnD, lnL, delta, reduce, options, bounds)
    table = pd.DataFrame(rows)
    best_i, n_at_best = best_row(table, agree_rtol)
    best = table.loc[best_i]
    theta = best[list(CHINCHILLA_THETA)].to_numpy(dtype=float)
    params = theta_to_params(theta)
    warn = multistart_warnings(table, best_i, starts, CHINCHILLA_THETA, agree_rtol)
    pred = chinchilla_predict_log(theta, lnN, lnD)
    resid = pred - lnL
    verdict = identifiability(jacobian=chinchilla_jacobian(theta, lnN, lnD), residuals=resid, predictions=pred,
                              names=CHINCHILLA_PARAMS, theta=theta, log_space=("E", "A", "B"),
                              bounds={"alpha": CHINCHILLA.bounds["alpha"], "beta": CHINCHILLA.bounds["beta"]},
                              values={"alpha": params["alpha"], "beta": params["beta"]})
    return FitResult(
        law="chinchilla",
        params=params,
        objective=float(best["objective"]),
        success=bool(best["success"]),
        message=str(best["message"]),
        n_points=int(L.size),
        starts=table,
        residuals=resid,
        settings={
            "loss": "huber_log", "delta": delta, "reduce": reduce, "method": "L-BFGS-B", "gradient": "analytic",
            "options": options, "n_starts": int(len(starts)), "n_starts_at_best": n_at_best,
            "parameterisation": "LSE: E=exp(e), A=exp(a), B=exp(b)",
            "bounds": {"alpha": list(CHINCHILLA.bounds["alpha"]), "beta": list(CHINCHILLA.bounds["beta"])},
        },
        derived=chinchilla_derived(params),
        warnings=warn,
        identified=bool(verdict["identified"]),
        identifiability=verdict,
    )

