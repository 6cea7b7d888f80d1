"""Numbers behind the report: metric direction, Pareto frontier, κ fits, scaling-law fits.

Fits use :mod:`sectional_moe.theory` (``fit_kappa``, ``fit_parametric``, ``fit_chinchilla``,
``bootstrap_fit``); every fit that cannot be made returns the reason instead of raising, so the
report can say why a section is empty.

Conventions: C (``compute_flops``) = trained tokens x training matmul FLOPs per token (3 x forward,
PaLM convention, attention scores included, no recompute); N = ``params_total`` (embeddings
included, Chinchilla's convention) unless stated; loss in nats per token; step time in seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from sectional_moe.theory import cost_model, fitting
from sectional_moe.theory.laws import CoefficientSet, Law

#: Metrics where larger is better; every other metric (ppl, loss, time, memory) is minimised.
HIGHER_IS_BETTER = ("tokens_per_s", "mfu", "tflops_per_s_per_device")

MIN_RUNS_COMPUTE_LAW = 5
MIN_DISTINCT_C = 3
MIN_RUNS_CHINCHILLA = 8


def ascending(metric: str) -> bool:
    """Sort order that puts the best run first."""
    return metric not in HIGHER_IS_BETTER


def finished(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["state"] == "done"]


def pareto_mask(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Points not dominated by another (lower-or-equal x and y, one strictly lower); NaNs are never on it."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    mask = np.zeros(len(x), dtype=bool)
    best = math.inf
    for i in sorted(np.flatnonzero(ok), key=lambda i: (x[i], y[i])):
        if y[i] < best:  # cheaper points seen so far all have a higher loss
            mask[i] = True
            best = y[i]
    return mask


# ============================================================================================
# κ: measured step cost vs E (sectional family)
# ============================================================================================
@dataclass
class KappaResult:
    label: str  # "size=nano, routing=segment_fixed"
    data: pd.DataFrame  # the runs used (experts, step_time_s)
    fit: cost_model.KappaFit | None = None
    reason: str | None = None  # why there is no fit

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"group": self.label, "runs": int(len(self.data)), "reason": self.reason}
        if self.fit is not None:
            f = self.fit
            out.update({"kappa_s_per_E2": f.kappa, "kappa_se": f.kappa_se, "preferred_overhead": f.preferred,
                        "delta_aic_linear_minus_quadratic": f.delta_aic, "E_opt_measured": f.measured_e_opt,
                        "E_opt_fitted": f.fitted_e_opt,
                        "E_opt_predicted": f.predicted.numeric_root if f.predicted else None,
                        "E_opt_predicted_integer": f.predicted.best_integer if f.predicted else None})
        return out


def kappa_fits(df: pd.DataFrame) -> list[KappaResult]:
    """One κ fit (``theory.fit_kappa``, step-time mode, summed view) per (size, routing) of the
    finished sectional runs; a group with < 3 distinct E or < 4 runs gets a reason instead."""
    sect = finished(df)
    sect = sect[(sect["family"] == "sectional") & sect["experts"].notna() & sect["step_time_s"].notna()]
    out = []
    for (size, routing), g in sect.groupby(["size", "routing"], sort=True):
        label = f"size={size}, routing={routing}"
        data = g[["run", "experts", "step_time_s"]].astype({"experts": float})
        distinct = data["experts"].nunique()
        if distinct < 3 or len(data) < 4:
            out.append(KappaResult(label, data, reason=f"{len(data)} run(s) at {distinct} distinct E; fit_kappa needs >= 4 runs at >= 3 distinct E"))
            continue
        try:
            fit = cost_model.fit_kappa(experts=data["experts"], step_time=data["step_time_s"], view="summed")
        except (ValueError, np.linalg.LinAlgError) as err:
            out.append(KappaResult(label, data, reason=f"fit failed: {err}"))
            continue
        out.append(KappaResult(label, data, fit=fit))
    return out


# ============================================================================================
# Loss vs compute: L(C) = E + A (C/C0)^-alpha per family, bootstrap band
# ============================================================================================
def _compute_loss(*, C: Any, E: float, A: float, alpha: float) -> np.ndarray:
    return E + A * np.asarray(C) ** (-alpha)


COMPUTE_LAW = Law(
    name="compute_power",
    citation="saturating power law in training compute (as in Kaplan et al. 2020 / Hoffmann et al. 2022 Fig. 3)",
    arxiv="2001.08361",
    formula="L = E + A * (C/C0)^-alpha",
    form_provenance="[I] our choice for a per-family loss-vs-compute trend",
    inputs={"C": "training FLOPs / C0 (C0 = geometric mean of the family's C)"},
    params=("E", "A", "alpha"),
    fn=_compute_loss,
    published={"start": CoefficientSet({"E": 1.0, "A": 1.0, "alpha": 0.3}, "[I]", "generic starting point")},
    default="start",
    conventions="C = tokens x training FLOPs/token; L in nats/token",
    positive=("E", "A"),
    bounds={"alpha": (0.0, 3.0)},
)


@dataclass
class LawFit:
    family: str
    law: str
    n: int
    params: dict[str, float] = field(default_factory=dict)
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    grid: np.ndarray | None = None  # C values of the curve (FLOPs)
    curve: np.ndarray | None = None
    band: tuple[np.ndarray, np.ndarray] | None = None  # 2.5 / 97.5 percentiles
    reason: str | None = None

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"family": self.family, "law": self.law, "runs": self.n, "reason": self.reason}
        out.update({k: v for k, v in self.params.items()})
        out.update({f"{k}_ci95": f"[{lo:.4g}, {hi:.4g}]" for k, (lo, hi) in self.ci.items()})
        return out


def compute_law_fits(df: pd.DataFrame, *, loss: str = "val_loss_best", n_boot: int = 100, seed: int = 0) -> list[LawFit]:
    """Per family, fit ``L = E + A (C/C0)^-α`` (Huber on log L, ``theory.fit_parametric``) and a
    95 % band from a run-level bootstrap; too few runs or compute budgets give a reason."""
    out = []
    done = finished(df)
    for family, g in done.groupby("family", sort=True):
        g = g[np.isfinite(g[loss].astype(float)) & np.isfinite(g["compute_flops"].astype(float))]
        C, L = g["compute_flops"].to_numpy(float), g[loss].to_numpy(float)
        distinct = len(np.unique(np.round(np.log(C), 2))) if len(C) else 0
        if len(g) < MIN_RUNS_COMPUTE_LAW or distinct < MIN_DISTINCT_C:
            out.append(LawFit(str(family), COMPUTE_LAW.name, len(g), reason=(
                f"{len(g)} finished run(s) at {distinct} distinct compute budget(s); the 3-parameter fit with a band needs "
                f">= {MIN_RUNS_COMPUTE_LAW} runs at >= {MIN_DISTINCT_C} budgets")))
            continue
        c0 = float(np.exp(np.mean(np.log(C))))
        start = {"E": 0.5 * float(L.min()), "A": max(float(L.max() - 0.5 * L.min()), 1e-3), "alpha": 0.3}
        fit = fitting.fit_parametric(COMPUTE_LAW, inputs={"C": C / c0}, L=L, init=start, n_random_starts=8, seed=seed)
        data = pd.DataFrame({"C": C / c0, "L": L})

        def refit(d: pd.DataFrame) -> dict[str, float]:
            return fitting.fit_parametric(COMPUTE_LAW, inputs={"C": d["C"]}, L=d["L"], init=fit.params, n_random_starts=0).params

        boot = fitting.bootstrap_fit(data=data, fit=refit, n_boot=n_boot, seed=seed)
        grid = np.geomspace(C.min() / 2, C.max() * 2, 60)
        curve = _compute_loss(C=grid / c0, **fit.params)
        draws = np.array([_compute_loss(C=grid / c0, **{k: r[k] for k in ("E", "A", "alpha")})
                          for _, r in boot.samples.dropna().iterrows()])
        band = (np.nanpercentile(draws, 2.5, axis=0), np.nanpercentile(draws, 97.5, axis=0)) if len(draws) else None
        params = {**fit.params, "C0": c0}
        ci = {k: (boot.ci_low[k], boot.ci_high[k]) for k in ("E", "A", "alpha") if k in boot.ci_low}
        out.append(LawFit(str(family), COMPUTE_LAW.name, len(g), params=params, ci=ci, grid=grid, curve=curve, band=band))
    return out


def chinchilla_fits(df: pd.DataFrame, *, loss: str = "val_loss_best") -> list[LawFit]:
    """Per family, Hoffmann/Epoch ``L = E + A/N^α + B/D^β`` (N = params_total, D = tokens) when there
    are >= 8 finished runs with >= 3 distinct N and >= 3 distinct D; else the reason."""
    out = []
    for family, g in finished(df).groupby("family", sort=True):
        g = g.dropna(subset=["params_total", "tokens", loss])
        nN, nD = g["params_total"].nunique(), g["tokens"].nunique()
        if len(g) < MIN_RUNS_CHINCHILLA or nN < 3 or nD < 3:
            out.append(LawFit(str(family), "chinchilla", len(g), reason=(
                f"{len(g)} run(s), {nN} distinct N, {nD} distinct D; needs >= {MIN_RUNS_CHINCHILLA} runs with >= 3 distinct N and D")))
            continue
        fit = fitting.fit_chinchilla(N=g["params_total"], D=g["tokens"], L=g[loss], init=fitting.small_init_grid())
        out.append(LawFit(str(family), "chinchilla", len(g), params={**fit.params, **fit.derived}))
    return out
