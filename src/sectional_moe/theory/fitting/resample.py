"""Uncertainty and out-of-sample checks of a fit: bootstrap confidence intervals (rows, clusters,
or clusters within strata; Chinchilla's 80 % × 100 variant [P]) and extrapolation error —
hold out the largest budget / N or every run above a budget threshold, or pool the predictions of
leave-one-out and k-fold refits (R², NMSE, NMAE as SLDBench [S]; Alabdulmohsin et al. 2022 judge
laws by extrapolation [S]).

Owns: :func:`bootstrap_fit`, :data:`CHINCHILLA_BOOTSTRAP`, :func:`bootstrap_chinchilla`,
:func:`bootstrap_verdict`, :func:`extrapolation_metrics`, :func:`holdout_largest`,
:func:`extrapolation_eval`, :func:`cross_validate`, :func:`chinchilla_fit_predict`.
Imports: numpy, pandas; ``theory.laws`` and the fitting modules ``result``, ``identify`` and
``chinchilla``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd

from sectional_moe.theory.fitting.chinchilla import fit_chinchilla, init_grid, params_to_theta
from sectional_moe.theory.fitting.identify import at_bound
from sectional_moe.theory.fitting.result import BootstrapResult, FitResult
from sectional_moe.theory.laws import CHINCHILLA, chinchilla_loss

log = logging.getLogger("sectional_moe.theory.fitting")


# ============================================================================================
# Bootstrap
# ============================================================================================
def bootstrap_fit(
    *,
    data: pd.DataFrame,
    fit: Callable[[pd.DataFrame], Mapping[str, float]],
    n_boot: int = 1000,
    unit: str = "run",
    strata: str | None = None,
    fraction: float = 1.0,
    replace: bool = True,
    ci: tuple[float, float] = (2.5, 97.5),
    seed: int = 0,
) -> BootstrapResult:
    """Bootstrap a fit: resample, refit, summarise.

    Args:
        data: the run table.
        fit: refits one resample and returns a flat dict of parameters (and any derived values).
            Exceptions count as failed resamples (NaN row; the first distinct reasons are kept).
        unit: "run" resamples rows; any column name resamples whole clusters of that column
            (e.g. model size or IsoFLOP curve: runs sharing a size are correlated [P Epoch]).
        strata: a column; units are resampled within each of its values (each IsoFLOP budget
            keeps its number of runs), so every resample has every stratum.
        fraction, replace: resample size as a fraction of the units, with or without
            replacement. Chinchilla's variant [P]: ``fraction=0.8, replace=False, n_boot=100,
            ci=(10, 90)`` (see :data:`CHINCHILLA_BOOTSTRAP`).
        ci: percentiles of the interval.

    Returns SEs (std of the draws), percentile CIs and the covariance of the draws.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot} must be >= 1")
    rng = np.random.default_rng(seed)
    for col in [c for c in (unit, strata) if c not in (None, "run")]:
        if col not in data.columns:
            raise KeyError(f"unit/strata {col!r} is neither 'run' nor a column of the data ({list(data.columns)})")
    units = np.arange(len(data)) if unit == "run" else pd.factorize(data[unit], sort=True)[0]
    if strata is None:
        layers = [np.arange(len(data))]
    else:
        codes = pd.factorize(data[strata], sort=True)[0]
        layers = [np.flatnonzero(codes == k) for k in np.unique(codes)]
    plan = []  # per stratum: its unit keys and the rows of each
    for rows in layers:
        keys = np.unique(units[rows])
        m = max(1, int(round(fraction * len(keys))))
        if not replace and m > len(keys):
            raise ValueError(f"fraction={fraction} > 1 needs replace=True")
        plan.append((keys, {k: rows[units[rows] == k] for k in keys}, m))
    draws, failed, failures = [], 0, []
    for _ in range(n_boot):
        idx = np.concatenate([np.concatenate([groups[k] for k in rng.choice(keys, size=m, replace=replace)])
                              for keys, groups, m in plan])
        try:
            draws.append(dict(fit(data.iloc[idx].reset_index(drop=True))))
        except Exception as err:  # noqa: BLE001 - a failed refit is data, not a crash
            log.info("bootstrap refit failed: %s", err)
            draws.append({})
            failed += 1
            if str(err) not in failures and len(failures) < 3:
                failures.append(str(err))
    samples = pd.DataFrame(draws).apply(pd.to_numeric, errors="coerce")
    lo = samples.quantile(ci[0] / 100.0)
    hi = samples.quantile(ci[1] / 100.0)
    return BootstrapResult(
        samples=samples,
        se={k: float(v) for k, v in samples.std(ddof=1).items()},
        ci_low={k: float(v) for k, v in lo.items()},
        ci_high={k: float(v) for k, v in hi.items()},
        cov=samples.cov(),
        settings={"n_boot": n_boot, "unit": unit, "strata": strata, "fraction": fraction, "replace": replace, "ci": list(ci),
                  "seed": seed},
        n_failed=failed,
        failures=failures,
    )


CHINCHILLA_BOOTSTRAP: dict[str, Any] = {"n_boot": 100, "fraction": 0.8, "replace": False, "ci": (10.0, 90.0)}
"""Hoffmann et al. 2022 Table 2 bootstrap [P]: 80 % of the data sampled 100 times, 10th/90th
percentiles. Epoch showed these CIs are implausibly narrow; prefer the default 95 % bootstrap."""


def bootstrap_verdict(fit: FitResult, bounds: Mapping[str, tuple[float | None, float | None]], *, max_failed: float = 0.5) -> None:
    """Add the bootstrap's evidence to ``fit.identifiability`` [I]: more than ``max_failed`` of the
    refits failed, or a bounded parameter's interval reaches its bound, marks the fit not
    identified (the data cannot tell the parameter from its bound)."""
    b = fit.bootstrap
    if b is None:
        return
    reasons = []
    n = len(b.samples)
    if n and b.n_failed / n > max_failed:
        reasons.append(f"{b.n_failed} of {n} bootstrap refits failed ({'; '.join(b.failures[:1])})")
    for k, (lo, hi) in bounds.items():
        for end in (b.ci_low.get(k), b.ci_high.get(k)):
            if end is not None and math.isfinite(end) and at_bound(end, lo, hi):
                reasons.append(f"the bootstrap interval of {k} [{b.ci_low[k]:.3g}, {b.ci_high[k]:.3g}] reaches its bound")
                break
    if reasons:
        fit.identifiability.setdefault("reasons", []).extend(reasons)
        fit.identifiability["identified"] = False
        fit.identified = False


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
    ``kwargs`` go to :func:`bootstrap_fit` (n_boot, unit, strata, fraction, replace, ci, seed).
    Also reports the derived a, b, G; adds the bootstrap's verdict (:func:`bootstrap_verdict`)."""
    theta0 = params_to_theta(fit.params)
    delta = fit.settings.get("delta", 1e-3) if delta is None else delta

    def refit(df: pd.DataFrame) -> dict[str, float]:
        r = fit_chinchilla(N=df[n_col], D=df[d_col], L=df[loss_col], delta=delta, init=theta0[None, :])
        return {**r.params, **{k: (np.nan if v is None else v) for k, v in r.derived.items()}}

    result = bootstrap_fit(data=data, fit=refit, **kwargs)
    fit.bootstrap = result
    bootstrap_verdict(fit, {"alpha": CHINCHILLA.bounds["alpha"], "beta": CHINCHILLA.bounds["beta"]})
    return result


# ============================================================================================
# Extrapolation error
# ============================================================================================
def extrapolation_metrics(*, y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Any]:
    """Held-out error [I conventions, as SLDBench]: R² = 1 − SS_res/SS_tot,
    NMSE = mean((y − ŷ)²)/var(y), NMAE = mean|y − ŷ| / mean|y − ȳ|, plus MAE and RMSE.
    R², NMSE and NMAE need ≥ 2 held-out targets with spread; otherwise they are None and ``note``
    says why (use leave-one-out or k-fold, which pool every point's prediction)."""
    y, p = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    err = p - y
    var = float(np.mean((y - y.mean()) ** 2)) if y.size else 0.0
    mad = float(np.mean(np.abs(y - y.mean()))) if y.size else 0.0
    mse = float(np.mean(err**2)) if y.size else float("nan")
    mae = float(np.mean(np.abs(err))) if y.size else float("nan")
    defined = y.size >= 2 and var > 0
    note = None
    if not defined:
        note = (f"R², NMSE and NMAE are undefined for {y.size} held-out point(s) without spread; "
                "use --holdout loo or kfold (pooled predictions) or a lower --holdout-above threshold")
    return {
        "n": int(y.size),
        "r2": 1.0 - mse / var if defined else None,
        "nmse": mse / var if defined else None,
        "nmae": mae / mad if defined and mad > 0 else None,
        "mae": mae,
        "rmse": math.sqrt(mse) if math.isfinite(mse) else None,
        "note": note,
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
    threshold: float | None = None,
) -> dict[str, Any]:
    """Fit on the smaller runs and score the prediction of the held-out larger ones.

    ``holdout``: "largest_budget" (the largest group of ``budget_col``), "largest_N" (of
    ``n_col``), "above" (every run with ``budget_col`` ≥ ``threshold``) or a boolean mask.
    ``fit_predict(train, test)`` fits on train and returns the predicted target for test.
    Returns :func:`extrapolation_metrics` plus the split sizes.
    """
    if isinstance(holdout, str):
        if holdout == "above":
            if threshold is None:
                raise ValueError("holdout='above' needs a budget threshold")
            mask = data[budget_col].astype(float) >= threshold
            if not mask.any() or mask.all():
                raise ValueError(f"the budget threshold {threshold:.3g} holds out {int(mask.sum())} of {len(data)} runs; "
                                 f"pick one between {data[budget_col].min():.3g} and {data[budget_col].max():.3g}")
        else:
            column = {"largest_budget": budget_col, "largest_N": n_col}.get(holdout)
            if column is None:
                raise ValueError(f"holdout={holdout!r}: use 'largest_budget', 'largest_N', 'above' or a boolean mask")
            mask = holdout_largest(data, column=column, n_groups=n_groups)
    else:
        mask = holdout.astype(bool)
    train, test = data[~mask], data[mask]
    pred = fit_predict(train, test)
    out = extrapolation_metrics(y_true=test[target].to_numpy(), y_pred=pred)
    out.update({"n_train": int(len(train)), "n_test": int(len(test)), "holdout": holdout if isinstance(holdout, str) else "mask"})
    if threshold is not None and holdout == "above":
        out["threshold"] = float(threshold)
    return out


def cross_validate(
    *,
    data: pd.DataFrame,
    fit_predict: Callable[[pd.DataFrame, pd.DataFrame], np.ndarray],
    target: str,
    scheme: str = "loo",
    k: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Leave-one-out (``scheme="loo"``) or k-fold (``"kfold"``, seeded shuffled folds) refits; each
    point is predicted by the fit that did not see it and the pooled predictions are scored by
    :func:`extrapolation_metrics`. Refits that fail (e.g. a fold leaves too few distinct values)
    are counted and their points left out of the score."""
    n = len(data)
    if scheme == "loo":
        folds = [np.array([i]) for i in range(n)]
    elif scheme == "kfold":
        if not 2 <= k <= n:
            raise ValueError(f"k={k} folds need 2 <= k <= {n} (the number of points)")
        folds = [np.sort(f) for f in np.array_split(np.random.default_rng(seed).permutation(n), k)]  # rows in data order
    else:
        raise ValueError(f"scheme={scheme!r}: use 'loo' or 'kfold'")
    pred = np.full(n, np.nan)
    failed, reasons = 0, []
    for idx in folds:
        mask = np.zeros(n, dtype=bool)
        mask[idx] = True
        try:
            pred[idx] = fit_predict(data[~mask], data[mask])
        except ValueError as err:
            failed += 1
            if str(err) not in reasons and len(reasons) < 2:
                reasons.append(str(err))
    ok = np.isfinite(pred)
    out = extrapolation_metrics(y_true=data[target].to_numpy(dtype=float)[ok], y_pred=pred[ok])
    out.update({"holdout": scheme, "folds": len(folds), "failed_folds": failed, "failures": reasons,
                "n_train": int(n - max(len(f) for f in folds)), "n_test": int(ok.sum())})
    return out


def chinchilla_fit_predict(fit: FitResult, *, n_col: str, d_col: str, loss_col: str, delta: float = 1e-3) -> Callable[[pd.DataFrame, pd.DataFrame], np.ndarray]:
    """A ``fit_predict`` for the checks above: refit the Chinchilla law on ``train`` from the full
    fit's optimum plus 8 grid starts, predict the loss of ``test``."""
    theta0 = params_to_theta(fit.params)
    starts = np.vstack([theta0, init_grid(e=[0.0, 0.5], a=[0.0, 5.0], b=[5.0, 10.0], alpha=[0.5], beta=[0.5])])

    def fit_predict(train: pd.DataFrame, test: pd.DataFrame) -> np.ndarray:
        f = fit_chinchilla(N=train[n_col], D=train[d_col], L=train[loss_col], delta=delta, init=starts)
        return np.asarray(chinchilla_loss(N=test[n_col], D=test[d_col], **f.params), dtype=float)

    return fit_predict
