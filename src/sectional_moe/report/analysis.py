"""Numbers behind the report: metric direction, Pareto frontier, κ fits, scaling-law fits.

Fits use :mod:`sectional_moe.theory` (``fit_kappa``, ``fit_parametric``, ``fit_chinchilla``,
``bootstrap_fit``, ``isoflop_analysis``); every fit that cannot be made, or that the data do not
identify, returns the reason instead of raising, so the report can say why a section is empty.

Conventions: C (``compute_flops``) = trained tokens x training matmul FLOPs per token (3 x forward,
PaLM convention, attention scores included, no recompute); N = the ``fit_params`` column of the
scaling-law fits, ``params_non_embedding`` by default (at CPU scale the embedding outweighs the
rest; ``params_total`` is Chinchilla's own convention); loss in nats per token; step time in seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from sectional_moe.report.sources.run_dirs import read_run_dir
from sectional_moe.report.sources.wandb_offline import find_wandb_files, read_wandb_files
from sectional_moe.report.replicates import drop_implied
from sectional_moe.report.table import CONFIG_COLUMNS, DERIVED_CONFIG_COLUMNS, num
from sectional_moe.theory import cost_model, fitting, isoflop
from sectional_moe.theory.laws import CHINCHILLA, CoefficientSet, Law

#: Metrics where larger is better; every other metric (ppl, loss, time, memory) is minimised.
HIGHER_IS_BETTER = ("tokens_per_s", "mfu", "tflops_per_s_per_device")

MIN_RUNS_COMPUTE_LAW = 5
MIN_DISTINCT_C = 3  # compute budgets, counted with BUDGET_TOL
MIN_COMPUTE_SPAN = 3.0  # max C / min C: below it a 3-parameter law in C is not identified [I]
BUDGET_TOL = 0.05  # runs within 5 % of compute are one budget (scaling-laws.md §8.5 isoflop_analysis)
MIN_RUNS_CHINCHILLA = 8
BOUND_RTOL = 1e-3  # a parameter this close to a bound (relative to the bound's range or scale) sits at it

#: What a curve or a fit spans; every other config column that varies splits runs into groups.
SPANNED_COLUMNS = ("experts", "seed")
#: Table columns shown under a shorter name in labels.
LABEL_NAMES = {"seq_reduction_setting": "seq_reduction"}


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


def compute_leverage(df: pd.DataFrame, reference: str = "dense", levels: int = 3) -> pd.DataFrame:
    """Compute leverage of each family over ``reference``: at a loss both reach, the reference's
    training compute divided by the family's, read off each family's Pareto frontier of
    (compute C, best validation loss) by log-linear interpolation between frontier runs.

    No law is assumed (so it works where a fitted law is degenerate); ``levels`` loss levels
    spread over the overlap of the two frontiers' loss ranges. > 1: the family needs less compute
    for the same loss. A family whose frontier does not overlap the reference's gets a reason.
    """
    done = finished(df).dropna(subset=["compute_flops", "val_loss_best"])
    frontiers = {}
    for fam, g in done.groupby("family"):
        front = g[pareto_mask(g["compute_flops"].to_numpy(), g["val_loss_best"].to_numpy())].sort_values("compute_flops")
        frontiers[fam] = (np.log(front["compute_flops"].to_numpy(float)), front["val_loss_best"].to_numpy(float))
    rows: list[dict[str, Any]] = []
    if reference not in frontiers:
        return pd.DataFrame(rows)
    ref_logc, ref_loss = frontiers[reference]
    for fam, (logc, loss) in sorted(frontiers.items()):
        if fam == reference:
            continue
        lo, hi = max(loss.min(), ref_loss.min()), min(loss.max(), ref_loss.max())
        if len(loss) < 2 or len(ref_loss) < 2 or lo >= hi:
            rows.append({"family": fam, "reference": reference, "reason": "its frontier and the reference's share no loss range"})
            continue
        for level in np.linspace(hi, lo, levels):  # loss falls along a frontier: interpolate on reversed arrays
            c_fam = math.exp(float(np.interp(level, loss[::-1], logc[::-1])))
            c_ref = math.exp(float(np.interp(level, ref_loss[::-1], ref_logc[::-1])))
            rows.append({"family": fam, "reference": reference, "val_loss": float(level), "compute_family": c_fam,
                         "compute_reference": c_ref, "leverage": c_ref / c_fam, "reason": None})
    return pd.DataFrame(rows)


# ============================================================================================
# Grouping: runs are pooled (as seeds) only when every config column except E and seed agrees
# ============================================================================================
def varying_config_columns(df: pd.DataFrame, *, within: Sequence[str] = ("family", "routing")) -> list[str]:
    """Config columns (except E, seed and derived ones) that take more than one value among the
    runs of some ``within`` cell of ``df``, in table order.

    Checking inside each (family, routing) cell keeps a column that is only *implied* by the
    cell (top_k is set for topk and empty for hash; the sectional switches are empty for dense)
    from splitting lines that the family or routing already separates. Missing values count as a
    value, so a run without a setting is never pooled with one that has it.
    """
    candidates = [c for c in CONFIG_COLUMNS if c not in SPANNED_COLUMNS + DERIVED_CONFIG_COLUMNS + tuple(within) and c in df.columns]
    if df.empty:
        return []
    varying = set()
    for _, cell in df.groupby(list(within), sort=False, dropna=False):
        for col in candidates:
            if cell[col].astype(object).where(cell[col].notna(), None).nunique(dropna=False) > 1:
                varying.add(col)
    return [c for c in candidates if c in varying]


def label_value(value: Any) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "none"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return f"{value:.3g}" if isinstance(value, (float, np.floating)) else str(value)


def group_label(key: Mapping[str, Any], *, bare: Sequence[str] = ("family", "routing")) -> str:
    """``"sectional segment_fixed, sectional_every=2"``: bare values for ``bare`` columns, then
    ``name=value`` for the others that have a value (missing values read "none" among the bare ones)."""
    head = " ".join(label_value(key[c]) for c in bare if c in key)
    # a setting a family does not have (sectional_every of a token-MoE run) is left out, not "=none"
    rest = [f"{LABEL_NAMES.get(c, c)}={label_value(v)}" for c, v in key.items() if c not in bare and label_value(v) != "none"]
    return ", ".join([head] * bool(head) + rest)


def config_groups(df: pd.DataFrame, keys: Sequence[str]) -> Iterator[tuple[dict[str, Any], pd.DataFrame]]:
    """``df`` split by ``keys`` (missing values kept as their own group), sorted, as (key dict, rows)."""
    keys = list(dict.fromkeys(keys))
    if df.empty:
        return
    for values, g in df.groupby(keys, sort=True, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        yield dict(zip(keys, values)), g


# ============================================================================================
# κ: measured step cost vs E (sectional family)
# ============================================================================================
@dataclass
class KappaResult:
    label: str  # "size=nano, routing=segment_fixed, sectional_every=2"
    data: pd.DataFrame  # the runs used (experts, step_time_s)
    fit: cost_model.KappaFit | None = None
    reason: str | None = None  # why there is no fit
    key: dict[str, Any] = field(default_factory=dict)  # the config values the group shares

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"group": self.label, "runs": int(len(self.data)), "reason": self.reason}
        if self.fit is not None:
            f = self.fit
            out.update({"compute_term": f.compute_term, "kappa_s_per_E2": f.kappa, "kappa_se": f.kappa_se, "preferred_overhead": f.preferred,
                        "delta_aic_linear_minus_quadratic": f.delta_aic, "E_opt_measured": f.measured_e_opt,
                        "E_opt_fitted": f.fitted_e_opt, "E_opt_fitted_swept": f.best_of(self.data["experts"].unique()),
                        "E_opt_predicted": f.predicted.numeric_root if f.predicted else None,
                        "E_opt_predicted_integer": f.predicted.best_integer if f.predicted else None,
                        "E_opt_predicted_note": f.predicted_note or None})
            out.update(self.planner_kappa())
        return out

    def planner_kappa(self) -> dict[str, Any]:
        """κ in the planner's unit, MACs per E² per sequence and sectional layer
        (:func:`cost_model.kappa_in_macs`), with what the conversion used: the measured FLOP rate
        (the costliest run's FLOPs per step over its fitted compute time), sequences per step and
        sectional layers of the group. None (with a note) when a quantity is missing or not unique."""
        out: dict[str, Any] = {"flop_rate_per_s": None, "sequences_per_step": None, "sectional_layers": None,
                               "kappa_macs_per_E2_seq_layer": None}
        f = self.fit
        if f is None or f.rate is None:
            out["kappa_macs_note"] = "no FLOP rate: the fit has no exact compute term or a non-positive compute time"
            return out
        d = self.data
        seqs = (d["batch_tokens"] / d["seq_len"]).dropna().unique()
        layers = (d["n_layers"] // d["sectional_every"]).dropna().unique()
        out["flop_rate_per_s"] = f.rate
        if len(seqs) != 1 or len(layers) != 1 or not seqs[0] > 0 or not layers[0] > 0:
            out["kappa_macs_note"] = "sequences per step or sectional layers missing or not one value in the group"
            return out
        out.update(sequences_per_step=float(seqs[0]), sectional_layers=int(layers[0]),
                   kappa_macs_per_E2_seq_layer=cost_model.kappa_in_macs(kappa_s=f.kappa, flop_rate=f.rate, sequences_per_step=float(seqs[0]),
                                                                        sectional_layers=int(layers[0])))
        out["kappa_macs_note"] = "[I] assumes the overhead scales with sequences and sectional layers; plan --kappa-from fits.json"
        return out


def kappa_fits(df: pd.DataFrame) -> list[KappaResult]:
    """One κ fit (``theory.fit_kappa``, step-time mode) per group of the finished sectional runs;
    a group with < 3 distinct E or < 4 runs gets a reason instead.

    Groups: size and routing, plus every config column that varies among the sectional runs of a
    routing (see :func:`varying_config_columns`), so runs that differ in, e.g., sectional_every or
    seq_reduction are never pooled as if they were seeds. The compute term is each run's exact
    training FLOPs per step (``flops_per_token`` x ``batch_tokens``, from ``sectional_moe.models.flops``);
    only when a run lacks it does the fit fall back to R1's summed QKV fraction (r = E assumed).
    κ comes in seconds per E² per step and, converted with the measured FLOP rate, in the planner's
    MACs per E² per sequence and sectional layer (:meth:`KappaResult.planner_kappa`).
    """
    sect = finished(df)
    sect = sect[(sect["family"] == "sectional") & sect["experts"].notna() & sect["step_time_s"].notna()]
    keys = ["size", "routing", *varying_config_columns(sect)]
    out = []
    for key, g in config_groups(sect, keys):
        label = group_label(key, bare=())
        data = g[["run", "experts", "step_time_s", "flops_per_token", "batch_tokens", "seq_len", "n_layers", "sectional_every"]].astype(
            {"experts": float, "flops_per_token": float, "batch_tokens": float, "seq_len": float, "n_layers": float, "sectional_every": float})
        distinct = data["experts"].nunique()
        if distinct < 3 or len(data) < 4:
            out.append(KappaResult(label, data, reason=f"{len(data)} run(s) at {distinct} distinct E; fit_kappa needs >= 4 runs at >= 3 distinct E", key=key))
            continue
        work = data["flops_per_token"] * data["batch_tokens"].fillna(1.0)  # FLOPs per step (per token if no batch)
        exact = bool(np.all(np.isfinite(work)) and np.all(work > 0))
        try:
            fit = cost_model.fit_kappa(experts=data["experts"], step_time=data["step_time_s"],
                                       compute=work if exact else None, view="summed")
        except (ValueError, np.linalg.LinAlgError) as err:
            out.append(KappaResult(label, data, reason=f"fit failed: {err}", key=key))
            continue
        out.append(KappaResult(label, data, fit=fit, key=key))
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
    reason: str | None = None  # why the fit is not a result (too few runs, degenerate); not plotted then
    warnings: list[str] = field(default_factory=list)  # caveats of a fit that is reported

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"family": self.family, "law": self.law, "runs": self.n, "reason": self.reason}
        out.update({k: v for k, v in self.params.items()})
        out.update({f"{k}_ci95": f"[{lo:.4g}, {hi:.4g}]" for k, (lo, hi) in self.ci.items()})
        if self.warnings:
            out["warnings"] = "; ".join(self.warnings)
        return out


def count_budgets(C: np.ndarray, *, tol: float = BUDGET_TOL) -> int:
    """Distinct compute budgets: sorted C split wherever a value exceeds its budget's first by > ``tol``."""
    budgets, first = 0, None
    for c in np.sort(np.asarray(C, dtype=float)):
        if first is None or c > first * (1.0 + tol):
            budgets, first = budgets + 1, c
    return budgets


def _param_bounds(law: Law, name: str) -> tuple[float | None, float | None, float]:
    """(lower, upper, span) of a law parameter: a positive one (fitted in log space) is bounded by
    0 below only; the span is the bounded range, or 1 when a side is open."""
    lo, hi = (0.0, None) if name in law.positive else law.bounds.get(name, (None, None))
    return lo, hi, (hi - lo) if lo is not None and hi is not None else 1.0


def at_bounds(law: Law, params: Mapping[str, float], *, scale: float) -> list[str]:
    """Parameters of a fit that sit at a bound, as sentences (empty: none).

    A bounded parameter within ``BOUND_RTOL`` of its bound's range; a positive one (fitted in log
    space, so its only bound is 0) below ``BOUND_RTOL x scale`` (``scale``: the loss level, the
    unit of E and A here). Such a fit says the data do not constrain that parameter.
    """
    out = []
    for name, value in params.items():
        if name in law.positive:
            if value < BOUND_RTOL * scale:
                out.append(f"{name} = {value:.3g} collapsed to its lower bound 0 (< {BOUND_RTOL:g} x the loss scale {scale:.3g})")
        elif name in law.bounds:
            lo, hi, span = _param_bounds(law, name)
            for bound, side in ((lo, "lower"), (hi, "upper")):
                if bound is not None and abs(value - bound) <= BOUND_RTOL * span:
                    out.append(f"{name} = {value:.3g} sits at its {side} bound {bound:g}")
    return out


#: Exponents of a data or parameter term above this describe no scaling law: every published LM
#: fit has alpha, beta in 0.2-0.8 (Hoffmann, Epoch, Kaplan); a fit far above says the grid spans
#: too little of N or D for that term, whose coefficient then runs off (A ~ 1e20).
MAX_PLAUSIBLE_EXPONENT = 2.0


def implausible_exponents(params: Mapping[str, float]) -> list[str]:
    """Chinchilla exponents above :data:`MAX_PLAUSIBLE_EXPONENT`, as sentences (empty: none)."""
    return [f"{name} = {params[name]:.3g} > {MAX_PLAUSIBLE_EXPONENT:g}: the grid does not constrain that term"
            for name in ("alpha", "beta") if name in params and params[name] > MAX_PLAUSIBLE_EXPONENT]


def _ci_at_bounds(law: Law, ci: Mapping[str, tuple[float, float]]) -> list[str]:
    out = []
    for name, (lo, hi) in ci.items():
        lo_b, hi_b, span = _param_bounds(law, name)
        for end, bound, side in ((lo, lo_b, "lower"), (hi, hi_b, "upper")):
            if bound is not None and np.isfinite(end) and abs(end - bound) <= BOUND_RTOL * span:
                out.append(f"the 95 % interval of {name} [{lo:.3g}, {hi:.3g}] reaches its {side} bound {bound:g}")
    return out


def compute_law_fits(df: pd.DataFrame, *, loss: str = "val_loss_best", n_boot: int = 100, seed: int = 0) -> list[LawFit]:
    """Per family, fit ``L = E + A (C/C0)^-α`` (Huber on log L, ``theory.fit_parametric``) and a
    95 % band from a run-level bootstrap.

    A fit is made only from >= ``MIN_RUNS_COMPUTE_LAW`` runs at >= ``MIN_DISTINCT_C`` budgets
    (``BUDGET_TOL`` apart) spanning >= ``MIN_COMPUTE_SPAN`` x in C; and it is reported as a result
    only if no parameter sits at a bound (:func:`at_bounds`). Otherwise ``reason`` says why and
    the figure shows no curve: a law fitted to a few per cent of compute has its floor E and
    exponent α unidentified, and its curve would look like a finding.
    """
    out = []
    done = finished(df)
    for family, g in done.groupby("family", sort=True):
        g = g[np.isfinite(g[loss].astype(float)) & np.isfinite(g["compute_flops"].astype(float))]
        C, L = g["compute_flops"].to_numpy(float), g[loss].to_numpy(float)
        budgets = count_budgets(C) if len(C) else 0
        span = float(C.max() / C.min()) if len(C) else 0.0
        if len(g) < MIN_RUNS_COMPUTE_LAW or budgets < MIN_DISTINCT_C or span < MIN_COMPUTE_SPAN:
            out.append(LawFit(str(family), COMPUTE_LAW.name, len(g), reason=(
                f"{len(g)} finished run(s) at {budgets} distinct compute budget(s) spanning {span:.3g}x in C; the 3-parameter fit "
                f"with a band needs >= {MIN_RUNS_COMPUTE_LAW} runs at >= {MIN_DISTINCT_C} budgets spanning >= {MIN_COMPUTE_SPAN:g}x")))
            continue
        c0 = float(np.exp(np.mean(np.log(C))))
        start = {"E": 0.5 * float(L.min()), "A": max(float(L.max() - 0.5 * L.min()), 1e-3), "alpha": 0.3}
        try:
            fit = fitting.fit_parametric(COMPUTE_LAW, inputs={"C": C / c0}, L=L, init=start, n_random_starts=8, seed=seed)
        except ValueError as err:  # fitting.Underdetermined: too few points or distinct budgets
            out.append(LawFit(str(family), COMPUTE_LAW.name, len(g), reason=f"not fitted: {err}"))
            continue
        degenerate = at_bounds(COMPUTE_LAW, fit.params, scale=float(L.min()))
        if not fit.identified:
            degenerate = degenerate + [f"not identified: {'; '.join(fit.identifiability['reasons'])}"]
        if degenerate:
            out.append(LawFit(str(family), COMPUTE_LAW.name, len(g), params={**fit.params, "C0": c0}, reason=(
                "degenerate fit, not a result: " + "; ".join(degenerate) + " (the data do not constrain the law)")))
            continue
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
        out.append(LawFit(str(family), COMPUTE_LAW.name, len(g), params=params, ci=ci, grid=grid, curve=curve, band=band,
                          warnings=_ci_at_bounds(COMPUTE_LAW, ci)))
    return out


FIT_PARAMS = ("params_non_embedding", "params_total", "params_active", "params_flop_equivalent")


def chinchilla_fits(df: pd.DataFrame, *, loss: str = "val_loss_best", params: str = "params_non_embedding") -> list[LawFit]:
    """Per family, Hoffmann/Epoch ``L = E + A/N^α + B/D^β`` (N = the ``params`` column, D = tokens) when
    there are >= 8 finished runs with >= 3 distinct N and >= 3 distinct D; else the reason. A fit that is
    degenerate or not identified (``fitting.identify``) is reported with its reason, not as a result."""
    out = []
    for family, g in finished(df).groupby("family", sort=True):
        g = g.dropna(subset=[params, "tokens", loss])
        nN, nD = g[params].nunique(), g["tokens"].nunique()
        if len(g) < MIN_RUNS_CHINCHILLA or nN < 3 or nD < 3:
            out.append(LawFit(str(family), "chinchilla", len(g), reason=(
                f"{len(g)} run(s), {nN} distinct N, {nD} distinct D; needs >= {MIN_RUNS_CHINCHILLA} runs with >= 3 distinct N and D")))
            continue
        try:
            fit = fitting.fit_chinchilla(N=g[params], D=g["tokens"], L=g[loss], init=fitting.small_init_grid())
        except ValueError as err:  # fitting.Underdetermined
            out.append(LawFit(str(family), "chinchilla", len(g), reason=f"not fitted: {err}"))
            continue
        degenerate = at_bounds(CHINCHILLA, fit.params, scale=float(g[loss].min())) + implausible_exponents(fit.params)
        if not fit.identified:
            degenerate.append(f"not identified: {'; '.join(fit.identifiability['reasons'])}")
        reason = "degenerate fit, not a result: " + "; ".join(degenerate) if degenerate else None
        derived = {k: v for k, v in fit.derived.items() if v is not None}
        out.append(LawFit(str(family), "chinchilla", len(g), params={**fit.params, **derived}, reason=reason))
    return out


# ============================================================================================
# IsoFLOP analysis (Hoffmann Approaches 1 and 2) and allocation laws per family
# ============================================================================================
def isoflop_runs(df: pd.DataFrame, *, loss: str = "val_loss_best", params: str = "params_non_embedding") -> pd.DataFrame:
    """The finished runs as :func:`sectional_moe.theory.isoflop.isoflop_analysis` reads them:
    run (run_id), family, N = the ``params`` column, M = flops_per_token, C = compute_flops (= M·D), L = ``loss``."""
    done = finished(df)
    return pd.DataFrame({"run": done["run_id"].astype(str), "family": done["family"].astype(str), "N": done[params].astype(float),
                         "M": done["flops_per_token"].astype(float), "C": done["compute_flops"].astype(float),
                         "L": done[loss].astype(float)}).reset_index(drop=True)


def training_curves(df: pd.DataFrame) -> pd.DataFrame | None:
    """(run, C, L): every logged evaluation of the finished runs with both ``perf/flops`` and
    ``val/loss``, re-read from their run directories or offline W&B files (the table holds only
    the final numbers). Runs read from the W&B API are skipped. None when no run has a curve."""
    points = []
    for _, row in finished(df).iterrows():
        path = row.get("path")
        if not isinstance(path, str) or not path or not Path(path).exists():
            continue
        try:
            if row.get("source") == "runs":
                rec = read_run_dir(Path(path))
            elif row.get("source") == "wandb-offline":
                files = find_wandb_files(Path(path).parent).get(str(row["run_id"]))
                rec = read_wandb_files(files) if files else None
            else:
                rec = None
        except (OSError, ValueError):
            rec = None
        for h in (rec.history if rec is not None else []):
            c, loss = num(h.get("perf/flops")), num(h.get("val/loss"))
            if c is not None and loss is not None:
                points.append((str(row["run_id"]), c, loss))
    return pd.DataFrame(points, columns=["run", "C", "L"]) if points else None


def isoflop_results(df: pd.DataFrame, *, curves: pd.DataFrame | None = None, loss: str = "val_loss_best", n_boot: int = 100,
                    seed: int = 0, params: str = "params_non_embedding") -> list[isoflop.IsoflopResult]:
    """Approach 2 (IsoFLOP profiles of the final ``loss``), Approach 1 (envelope of ``curves``) and
    the allocation laws M_opt(C), D_opt(C) per family (:mod:`sectional_moe.theory.isoflop`); a
    family without IsoFLOP budgets or curves gets the reason."""
    runs = isoflop_runs(df, loss=loss, params=params)
    if runs.empty:
        return []
    return isoflop.isoflop_analysis(runs, curves, n_boot=n_boot, seed=seed)
