"""Scaling-law fitters: Hoffmann/Epoch Huber fit, a generic parametric fitter, VPNLS, Clark,
bootstrap confidence intervals, held-out extrapolation error and explicit drop rules.

The recipe follows ``shared/scaling-laws.md`` §2.4 and §8 (the best replication work):

* **summed** Huber loss (δ = 1e-3) on log-loss residuals — the mean-reduced objective with
  scipy's default tolerances stops almost at once near the start (Besiroglu et al. 2024's
  "poor choice of loss scale" [P]); see :func:`chinchilla_objective`;
* the log-sum-exp parameterisation of Hoffmann et al. 2022 Eq. 11 [P];
* L-BFGS-B with **analytic** gradients, ``ftol=1e-15``, ``gtol=1e-12``, from Hoffmann's grid of
  4500 initialisations [P], keeping every start's result;
* bootstrap CIs with a selectable resampling unit (rows, or clusters of a column), and
  Chinchilla's 80 % × 100 variant [P];
* held-out extrapolation error (R², NMSE, NMAE) on the largest runs (Alabdulmohsin et al. 2022,
  SLDBench [S]);
* diverged / under-trained runs are dropped only by explicit :class:`DropRule` objects whose
  decisions are logged and returned.

Pure numpy/scipy/pandas.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import optimize

from sectional_moe.theory.laws import CLARK, Law, clark_ehat, get_law

log = logging.getLogger(__name__)

TIGHT_TOL: dict[str, float] = {"ftol": 1e-15, "gtol": 1e-12}
"""L-BFGS-B tolerances of the recipe (scaling-laws.md §2.4). scipy's defaults are
``ftol≈2.2e-9, gtol=1e-5``: too loose for a Huber objective of order 1e-3."""

CHINCHILLA_PARAMS = ("E", "A", "B", "alpha", "beta")
CHINCHILLA_THETA = ("e", "a", "b", "alpha", "beta")  # E = exp(e), A = exp(a), B = exp(b)


# ============================================================================================
# Results
# ============================================================================================
@dataclass
class BootstrapResult:
    """Bootstrap refits: one row of ``samples`` per resample (NaN rows for failed refits)."""

    samples: pd.DataFrame
    se: dict[str, float]
    ci_low: dict[str, float]
    ci_high: dict[str, float]
    cov: pd.DataFrame
    settings: dict[str, Any]
    n_failed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "se": self.se,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "n_resamples": int(len(self.samples)),
            "n_failed": int(self.n_failed),
            "settings": _jsonable(self.settings),
        }


@dataclass
class FitResult:
    """Result of a fit: full-precision parameters, objective, every start, residuals, flags."""

    law: str
    params: dict[str, float]
    objective: float
    success: bool
    message: str
    n_points: int
    starts: pd.DataFrame
    residuals: np.ndarray
    settings: dict[str, Any]
    derived: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    bootstrap: BootstrapResult | None = None
    dropped: pd.DataFrame | None = None

    def to_dict(self, *, include_starts: bool = False) -> dict[str, Any]:
        """JSON-safe summary (``include_starts`` adds the per-start table)."""
        out: dict[str, Any] = {
            "law": self.law,
            "params": self.params,
            "derived": self.derived,
            "objective": self.objective,
            "success": self.success,
            "message": self.message,
            "n_points": self.n_points,
            "n_starts": int(len(self.starts)),
            "n_starts_at_best": int(self.settings.get("n_starts_at_best", 0)),
            "settings": _jsonable(self.settings),
            "warnings": list(self.warnings),
        }
        if self.bootstrap is not None:
            out["bootstrap"] = self.bootstrap.to_dict()
        if self.dropped is not None:
            out["dropped"] = _jsonable(self.dropped.to_dict(orient="records"))
        if include_starts:
            out["starts"] = _jsonable(self.starts.to_dict(orient="records"))
        return out


# ============================================================================================
# Huber helpers
# ============================================================================================
def huber(r: np.ndarray, *, delta: float) -> np.ndarray:
    """Huber loss ``½r²`` if ``|r| ≤ δ`` else ``δ(|r| − δ/2)`` (elementwise)."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def huber_grad(r: np.ndarray, *, delta: float) -> np.ndarray:
    """Derivative of :func:`huber` w.r.t. r: ``clip(r, −δ, δ)``."""
    return np.clip(r, -delta, delta)


# ============================================================================================
# Chinchilla (Hoffmann Approach 3 / Epoch replication)
# ============================================================================================
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


def chinchilla_predict_log(theta: np.ndarray, lnN: np.ndarray, lnD: np.ndarray) -> np.ndarray:
    """``log L̂ = LSE(a − α·lnN, b − β·lnD, e)`` (Hoffmann Eq. 11) [P]; theta = (e, a, b, α, β)."""
    e, a, b, al, be = theta
    t = np.stack([a - al * lnN, b - be * lnD, np.full_like(lnN, e)])
    m = t.max(axis=0)
    return m + np.log(np.exp(t - m).sum(axis=0))


def chinchilla_objective(
    theta: np.ndarray, lnN: np.ndarray, lnD: np.ndarray, lnL: np.ndarray, delta: float = 1e-3, reduce: str = "sum"
) -> tuple[float, np.ndarray]:
    """Huber objective on log-loss residuals and its analytic gradient, theta = (e, a, b, α, β).

    ``Σ_i Huber_δ(LSE(a − α lnN_i, b − β lnD_i, e) − ln L_i)`` (Hoffmann Eq. 11 [P]);
    ``reduce="mean"`` divides by n (what Hoffmann probably did [P Epoch]; a trap with default
    tolerances). Gradient: w = softmax of the three LSE terms, g = clip(r, −δ, δ):
    ∂/∂e = Σ g·w₂, ∂/∂a = Σ g·w₀, ∂/∂b = Σ g·w₁, ∂/∂α = −Σ g·w₀·lnN, ∂/∂β = −Σ g·w₁·lnD.
    """
    e, a, b, al, be = theta
    t = np.stack([a - al * lnN, b - be * lnD, np.full_like(lnN, e)])
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


def chinchilla_derived(params: Mapping[str, float]) -> dict[str, float]:
    """Allocation exponents of a Chinchilla fit [P Eq. 4]: a = β/(α+β), b = α/(α+β), G."""
    al, be = params["alpha"], params["beta"]
    return {
        "a": be / (al + be),
        "b": al / (al + be),
        "G": (al * params["A"] / (be * params["B"])) ** (1.0 / (al + be)),
    }


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
    multi-start, tight tolerances.

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

    Returns:
        :class:`FitResult` with params {E, A, B, alpha, beta}, derived {a, b, G}, every start in
        ``starts`` (init_*, final params, objective, success, nit), residuals (pred − obs) in
        log space, and warnings if the best start is on the grid boundary or if near-best starts
        disagree in their parameters.
    """
    N, D, L = (np.asarray(x, dtype=float) for x in (N, D, L))
    _check_positive_finite(N=N, D=D, L=L)
    lnN, lnD, lnL = np.log(N), np.log(D), np.log(L)
    starts = hoffmann_init_grid() if init is None else np.atleast_2d(np.asarray(init, dtype=float))
    if starts.shape[1] != 5:
        raise ValueError(f"init must have 5 columns (e, a, b, alpha, beta), got shape {starts.shape}")
    options: dict[str, Any] = {"maxiter": maxiter}
    if not default_tolerances:
        options.update(ftol=ftol, gtol=gtol)
    if n_jobs > 1 and len(starts) > n_jobs:
        rows = _parallel_starts(starts, n_jobs, lnN, lnD, lnL, delta, reduce, options)
    else:
        rows = _chinchilla_starts(starts, lnN, lnD, lnL, delta, reduce, options)
    table = pd.DataFrame(rows)
    finite = table["objective"].replace([np.inf, -np.inf], np.nan)
    best_i = int(finite.idxmin())
    best = table.loc[best_i]
    theta = best[list(CHINCHILLA_THETA)].to_numpy(dtype=float)
    params = theta_to_params(theta)
    warn = _multistart_warnings(table, best_i, starts, agree_rtol)
    resid = chinchilla_predict_log(theta, lnN, lnD) - lnL
    n_at_best = int((finite <= best["objective"] * (1 + agree_rtol) + 1e-300).sum())
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
        },
        derived=chinchilla_derived(params),
        warnings=warn,
    )


def _chinchilla_starts(starts: np.ndarray, lnN: np.ndarray, lnD: np.ndarray, lnL: np.ndarray, delta: float, reduce: str,
                       options: dict[str, Any]) -> list[dict[str, Any]]:
    """Run L-BFGS-B from each start; one result row per start (module level so it pickles)."""
    rows = []
    with warnings.catch_warnings(), single_threaded_blas():
        warnings.simplefilter("ignore", RuntimeWarning)
        results = [
            optimize.minimize(chinchilla_objective, x0, args=(lnN, lnD, lnL, delta, reduce), jac=True, method="L-BFGS-B", options=options)
            for x0 in starts
        ]
    for x0, res in zip(starts, results):
        rows.append(
            {**{f"init_{k}": float(v) for k, v in zip(CHINCHILLA_THETA, x0)},
             **{k: float(v) for k, v in zip(CHINCHILLA_THETA, res.x)},
             "objective": float(res.fun), "success": bool(res.success), "nit": int(res.nit), "message": str(res.message)}
        )
    return rows


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
        import ctypes
        import os

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


def _parallel_starts(starts: np.ndarray, n_jobs: int, *args: Any) -> list[dict[str, Any]]:
    """Split the starts over ``n_jobs`` worker processes (each single-threaded BLAS)."""
    from concurrent.futures import ProcessPoolExecutor

    chunks = np.array_split(starts, n_jobs)
    with ProcessPoolExecutor(max_workers=n_jobs) as pool:
        parts = pool.map(_chinchilla_starts, chunks, *([x] * n_jobs for x in args))
        return [row for part in parts for row in part]

def _multistart_warnings(table: pd.DataFrame, best_i: int, starts: np.ndarray, agree_rtol: float) -> list[str]:
    out = []
    obj = table["objective"].to_numpy()
    at_best = obj <= obj[best_i] * (1 + agree_rtol) + 1e-300
    near = table[at_best]
    # Hoffmann: "the optimal initialisation is not on the boundary" -- warn when every start
    # that reaches the best objective began on the boundary of the grid in some coordinate
    for j, name in enumerate(CHINCHILLA_THETA):
        values = np.unique(starts[:, j])
        if values.size > 2:
            inits = starts[at_best, j]
            if np.all((inits == values.min()) | (inits == values.max())):
                out.append(f"every start reaching the best objective has init_{name} on the grid boundary; widen the grid")
    if len(near) > 1:
        spread = (near[list(CHINCHILLA_THETA)].max() - near[list(CHINCHILLA_THETA)].min()).abs()
        scale = near[list(CHINCHILLA_THETA)].abs().max().clip(lower=1e-12)
        rel = (spread / scale).max()
        if rel > 1e-3:
            out.append(f"{len(near)} starts reach the best objective within {agree_rtol:g} but their parameters differ by up to {rel:.2g} (flat or multimodal objective)")
    if not bool(table.loc[best_i, "success"]):
        out.append(f"best start did not report convergence: {table.loc[best_i, 'message']}")
    return out


# ============================================================================================
# Generic parametric fitter (any Law of the registry)
# ============================================================================================
def _to_theta(law: Law, values: Mapping[str, float], names: Sequence[str]) -> np.ndarray:
    return np.array([math.log(values[k]) if k in law.positive else float(values[k]) for k in names])


def _from_theta(law: Law, theta: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    return {k: (math.exp(t) if k in law.positive else float(t)) for k, t in zip(names, theta)}


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
    """
    law = get_law(law) if isinstance(law, str) else law
    fixed = dict(fixed or {})
    names = [p for p in law.params if p not in fixed]
    X = {k: np.asarray(v, dtype=float) for k, v in inputs.items()}
    y = np.asarray(L, dtype=float)
    _check_positive_finite(L=y)
    if loss not in ("huber_log", "huber", "mse"):
        raise ValueError(f"loss={loss!r}: use 'huber_log', 'huber' or 'mse'")
    target = y if loss == "huber" else np.log(y)

    def residual(theta: np.ndarray) -> np.ndarray:
        p = {**fixed, **_from_theta_c(law, theta, names)}
        pred = law.fn(**X, **p)
        return (pred if loss == "huber" else np.log(pred)) - target

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        r = residual(theta)
        if not np.all(np.isfinite(r)):
            return 1e30, np.zeros_like(theta)
        J = _complex_step_jacobian(residual, theta)
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
    bounds = []
    for k in names:
        lo, hi = law.bounds.get(k, (None, None)) if k not in law.positive else (None, None)
        bounds.append((lo, hi))
    rows = []
    lo_b = np.array([-np.inf if lo is None else lo for lo, _ in bounds])
    hi_b = np.array([np.inf if hi is None else hi for _, hi in bounds])
    starts = [np.clip(x0, lo_b, hi_b) for x0 in thetas]
    with warnings.catch_warnings(), single_threaded_blas():
        warnings.simplefilter("ignore", RuntimeWarning)
        results = [
            optimize.minimize(objective, x0, jac=True, method="L-BFGS-B", bounds=bounds, options={"ftol": ftol, "gtol": gtol, "maxiter": maxiter})
            for x0 in starts
        ]
    for x0, res in zip(starts, results):
        p = _from_theta(law, res.x, names)
        rows.append({**{f"init_{k}": v for k, v in _from_theta(law, x0, names).items()}, **p,
                     "objective": float(res.fun), "success": bool(res.success), "nit": int(res.nit), "message": str(res.message)})
    table = pd.DataFrame(rows)
    best_i = int(table["objective"].idxmin())
    best = table.loc[best_i]
    params = {**fixed, **{k: float(best[k]) for k in names}}
    params = {k: params[k] for k in law.params}
    r = residual(_to_theta(law, params, names))
    n_at_best = int((table["objective"] <= best["objective"] * (1 + 1e-6) + 1e-300).sum())
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
                  "options": {"ftol": ftol, "gtol": gtol, "maxiter": maxiter}, "fixed": fixed,
                  "n_starts": int(len(thetas)), "n_starts_at_best": n_at_best, "log_space": [k for k in names if k in law.positive]},
        warnings=[] if bool(best["success"]) else [f"best start did not report convergence: {best['message']}"],
    )


def _from_theta_c(law: Law, theta: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    # complex-safe version of _from_theta (used inside the complex-step Jacobian)
    return {k: (np.exp(t) if k in law.positive else t) for k, t in zip(names, theta)}


def _complex_step_jacobian(fun: Callable[[np.ndarray], np.ndarray], theta: np.ndarray, h: float = 1e-30) -> np.ndarray:
    """Jacobian of a real-analytic vector function by complex step (exact to rounding)."""
    cols = []
    for j in range(theta.size):
        t = theta.astype(complex)
        t[j] += 1j * h
        cols.append(np.imag(fun(t)) / h)
    return np.stack(cols, axis=1)


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
    what its published fits used (scaling-laws.md §9.1 row 11 depends on it).
    """
    N, D, L = (np.asarray(x, dtype=float) for x in (N, D, L))
    _check_positive_finite(N=N, D=D, L=L)
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
    return FitResult(
        law="chinchilla", params=params, objective=val, success=True, message=msg, n_points=int(L.size), starts=grid,
        residuals=resid, derived=derived,
        settings={"loss": f"{loss}_linear", "delta": delta, "method": "VPNLS", "n_scale": n_scale, "d_scale": d_scale, "irls_iters": irls_iters,
                  "grid_resolution": float(np.min(np.diff(ag))) if ag.size > 1 else None, "n_starts_at_best": 1},
    )


# ============================================================================================
# Clark et al. 2022: inner OLS on log10 L, outer search on (E_start, E_max)
# ============================================================================================
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
    Fit each router separately (``fit_by_group``)."""
    N, E, L = (np.asarray(x, dtype=float) for x in (N, E, L))
    _check_positive_finite(N=N, E=E, L=L)
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
    unpack = lambda x: (math.exp(x[0]), math.exp(x[0]) + math.exp(x[1]))  # noqa: E731
    res = optimize.minimize(lambda x: inner(*unpack(x))[0], x0, method="Nelder-Mead",
                            options={"xatol": 1e-10, "fatol": 1e-16, "maxiter": 5000})
    es, em = unpack(res.x)
    val, coef = inner(es, em)
    params = {"a": float(coef[0]), "b": float(coef[1]), "c": float(coef[2]), "d": float(coef[3]), "e_start": es, "e_max": em}
    resid = np.log10(CLARK.fn(N=N, E=E, **params)) - y
    derived = {"N_cut": float(10 ** (-params["b"] / params["c"])) if params["c"] != 0 else float("inf")}
    return FitResult(law="clark", params=params, objective=val, success=bool(res.success), message=str(res.message),
                     n_points=int(L.size), starts=grid, residuals=resid, derived=derived,
                     settings={"loss": "mse_log10", "method": "OLS inner + grid/Nelder-Mead outer", "n_starts_at_best": 1})


def fit_by_group(data: pd.DataFrame, *, group: str, fit: Callable[[pd.DataFrame], FitResult]) -> dict[Any, FitResult]:
    """Run ``fit`` separately on each value of column ``group`` (e.g. one Clark fit per router)."""
    return {key: fit(sub) for key, sub in data.groupby(group, sort=True)}


# ============================================================================================
# Bootstrap
# ============================================================================================
def bootstrap_fit(
    *,
    data: pd.DataFrame,
    fit: Callable[[pd.DataFrame], Mapping[str, float]],
    n_boot: int = 1000,
    unit: str = "run",
    fraction: float = 1.0,
    replace: bool = True,
    ci: tuple[float, float] = (2.5, 97.5),
    seed: int = 0,
) -> BootstrapResult:
    """Bootstrap a fit: resample, refit, summarise.

    Args:
        data: the run table.
        fit: refits one resample and returns a flat dict of parameters (and any derived values).
            Exceptions count as failed resamples (NaN row).
        unit: "run" resamples rows; any column name resamples whole clusters of that column
            (e.g. model size or IsoFLOP curve: runs sharing a size are correlated [P Epoch]).
        fraction, replace: resample size as a fraction of the units, with or without
            replacement. Chinchilla's variant [P]: ``fraction=0.8, replace=False, n_boot=100,
            ci=(10, 90)`` (see :data:`CHINCHILLA_BOOTSTRAP`).
        ci: percentiles of the interval.

    Returns SEs (std of the draws), percentile CIs and the covariance of the draws.
    """
    rng = np.random.default_rng(seed)
    if unit == "run":
        keys = np.arange(len(data))
        groups = {k: np.array([k]) for k in keys}
    else:
        if unit not in data.columns:
            raise KeyError(f"unit={unit!r} is neither 'run' nor a column of the data ({list(data.columns)})")
        codes, uniq = pd.factorize(data[unit], sort=True)
        keys = np.arange(len(uniq))
        groups = {k: np.flatnonzero(codes == k) for k in keys}
    m = max(1, int(round(fraction * len(keys))))
    if not replace and m > len(keys):
        raise ValueError(f"fraction={fraction} > 1 needs replace=True")
    draws, failed = [], 0
    for _ in range(n_boot):
        pick = rng.choice(keys, size=m, replace=replace)
        idx = np.concatenate([groups[k] for k in pick])
        try:
            draws.append(dict(fit(data.iloc[idx].reset_index(drop=True))))
        except Exception as err:  # noqa: BLE001 - a failed refit is data, not a crash
            log.warning("bootstrap refit failed: %s", err)
            draws.append({})
            failed += 1
    samples = pd.DataFrame(draws)
    lo = samples.quantile(ci[0] / 100.0)
    hi = samples.quantile(ci[1] / 100.0)
    return BootstrapResult(
        samples=samples,
        se={k: float(v) for k, v in samples.std(ddof=1).items()},
        ci_low={k: float(v) for k, v in lo.items()},
        ci_high={k: float(v) for k, v in hi.items()},
        cov=samples.cov(),
        settings={"n_boot": n_boot, "unit": unit, "fraction": fraction, "replace": replace, "ci": list(ci), "seed": seed},
        n_failed=failed,
    )


CHINCHILLA_BOOTSTRAP: dict[str, Any] = {"n_boot": 100, "fraction": 0.8, "replace": False, "ci": (10.0, 90.0)}
"""Hoffmann et al. 2022 Table 2 bootstrap [P]: 80 % of the data sampled 100 times, 10th/90th
percentiles. Epoch showed these CIs are implausibly narrow; prefer the default 95 % bootstrap."""


def bootstrap_chinchilla(
    fit: FitResult,
    *,
    data: pd.DataFrame,
    n_col: str = "N",
    d_col: str = "D",
    loss_col: str = "L",
    delta: float | None = None,
    **kwargs: Any,
) -> BootstrapResult:
    """Bootstrap a :func:`fit_chinchilla` result: each resample is refitted from the full-data
    optimum (one start, as Epoch did from a fixed init), summed Huber, tight tolerances.
    ``kwargs`` go to :func:`bootstrap_fit` (n_boot, unit, fraction, replace, ci, seed).
    Also reports the derived a, b, G."""
    theta0 = params_to_theta(fit.params)
    delta = fit.settings.get("delta", 1e-3) if delta is None else delta

    def refit(df: pd.DataFrame) -> dict[str, float]:
        r = fit_chinchilla(N=df[n_col], D=df[d_col], L=df[loss_col], delta=delta, init=theta0[None, :])
        return {**r.params, **r.derived}

    result = bootstrap_fit(data=data, fit=refit, **kwargs)
    fit.bootstrap = result
    return result


# ============================================================================================
# Held-out extrapolation
# ============================================================================================
def extrapolation_metrics(*, y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Held-out error [I conventions, as SLDBench]: R² = 1 − SS_res/SS_tot,
    NMSE = mean((y − ŷ)²)/var(y), NMAE = mean|y − ŷ| / mean|y − ȳ|, plus MAE and RMSE.
    R²/NMSE/NMAE are NaN when the held-out targets have no spread (a single point)."""
    y, p = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    err = p - y
    var = float(np.mean((y - y.mean()) ** 2))
    mad = float(np.mean(np.abs(y - y.mean())))
    mse = float(np.mean(err**2))
    mae = float(np.mean(np.abs(err)))
    return {
        "n": int(y.size),
        "r2": 1.0 - mse / var if var > 0 else float("nan"),
        "nmse": mse / var if var > 0 else float("nan"),
        "nmae": mae / mad if mad > 0 else float("nan"),
        "mae": mae,
        "rmse": math.sqrt(mse),
    }


def holdout_largest(data: pd.DataFrame, *, column: str, n_groups: int = 1, rel_tol: float = 0.05) -> pd.Series:
    """Boolean mask of the rows in the ``n_groups`` largest groups of ``column`` (e.g. the largest
    compute budget, or the largest N). Values within ``rel_tol`` of each other (in log) form
    one group, so IsoFLOP budgets with rounding noise are grouped."""
    v = np.log(data[column].to_numpy(dtype=float))
    order = np.sort(np.unique(v))[::-1]
    groups: list[float] = []
    for x in order:
        if not groups or abs(x - groups[-1]) > math.log1p(rel_tol):
            groups.append(x)
    if len(groups) <= n_groups:
        raise ValueError(f"column {column!r} has {len(groups)} groups; cannot hold out {n_groups} and still fit")
    cut = groups[n_groups - 1] - math.log1p(rel_tol) / 2
    return pd.Series(v >= cut, index=data.index)


def extrapolation_eval(
    *,
    data: pd.DataFrame,
    fit_predict: Callable[[pd.DataFrame, pd.DataFrame], np.ndarray],
    target: str,
    holdout: str | pd.Series = "largest_budget",
    budget_col: str = "C",
    n_col: str = "N",
    n_groups: int = 1,
) -> dict[str, Any]:
    """Fit on the smaller runs and score the prediction of the held-out larger ones.

    ``holdout``: "largest_budget" (the largest group of ``budget_col``), "largest_N" (of
    ``n_col``) or a boolean mask. ``fit_predict(train, test)`` fits on train and returns the
    predicted target for test. Returns :func:`extrapolation_metrics` plus the split sizes.
    """
    if isinstance(holdout, str):
        column = {"largest_budget": budget_col, "largest_N": n_col}.get(holdout)
        if column is None:
            raise ValueError(f"holdout={holdout!r}: use 'largest_budget', 'largest_N' or a boolean mask")
        mask = holdout_largest(data, column=column, n_groups=n_groups)
    else:
        mask = holdout.astype(bool)
    train, test = data[~mask], data[mask]
    pred = fit_predict(train, test)
    out = extrapolation_metrics(y_true=test[target].to_numpy(), y_pred=pred)
    out.update({"n_train": int(len(train)), "n_test": int(len(test)), "holdout": holdout if isinstance(holdout, str) else "mask"})
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
    """Drop rows where any of ``columns`` is NaN or ±inf (diverged runs, failed logs)."""

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


# ============================================================================================
def _check_positive_finite(**arrays: np.ndarray) -> None:
    for name, a in arrays.items():
        a = np.asarray(a, dtype=float)
        if a.size == 0:
            raise ValueError(f"{name} is empty")
        if not np.all(np.isfinite(a)) or np.any(a <= 0):
            raise ValueError(f"{name} must be positive and finite; apply drop rules first (drop_nonfinite, drop_nonpositive)")


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.bool_):
        return bool(x)
    return x
