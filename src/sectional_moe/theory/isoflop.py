"""Compute-optimal allocation from our own runs: Hoffmann et al. 2022's Approach 2 (IsoFLOP
profiles) and Approach 1 (the lower envelope of training curves), and Wan/Jin-style allocation
laws M_opt(C), D_opt(C) fitted per family and set beside the published ones.

* **Approach 2** [P method]: runs at one compute budget (C within ``budget_tol`` of each other)
  with ≥ 3 distinct sizes form an IsoFLOP profile; a parabola of loss in ln x (x = N, parameters,
  and x = M, training FLOPs per token) gives its minimum x_opt(C). Power laws ``N_opt = k·C^a``,
  ``M_opt = k_M·C^m`` and ``D_opt = C/M_opt = C^(1−m)/k_M`` (C = M·D exactly) follow by least
  squares in log–log, with percentile bands from a bootstrap that resamples runs within each
  budget. A vertex outside the sampled sizes is extrapolated and left out of the power law
  (listed); one in the outer 10 % of the sampled range is kept and flagged (off-centre sampling
  biases the vertex, Open-Athena 2026 [P abstract]).
* **Approach 1** [P method]: at each of ``n_grid`` log-spaced compute values, the run with the
  lowest loss (its validation curve interpolated linearly in ln C) wins; ``N_opt ∝ C^a`` is fitted
  to the winners, with a bootstrap over runs. Hoffmann trained 4 horizons per size with the cosine
  schedule matched to each; a curve's early points come from a schedule tuned to a longer
  horizon, so with one horizon per size the envelope favours larger models [I].
* **Allocation laws** (Wan et al. 2026 Eq. 2 form [P]): ``M_opt(C)`` and ``D_opt(C)`` of Approach 2,
  next to Wan's ``M_opt = 0.04368·C^0.5437``, ``D_opt = 22.8929·C^0.4563`` (token MoE, their data)
  and, for reference, the Epoch-refit Chinchilla exponents (a = β/(α+β)). Units: C in FLOPs of
  our exact count (training matmul FLOPs incl. attention scores and the LM head, ``C = M·D``);
  Wan's M excludes the embeddings [P], ours includes the LM head — compare exponents.

Owns: :func:`budget_groups`, :func:`isoflop_profiles`, :func:`power_law`, :func:`approach2`,
:func:`approach1_envelope`, :func:`isoflop_analysis`, :class:`IsoflopResult`.
Imports: numpy, pandas; ``theory.laws`` (the published allocation laws) and
``theory.fitting.result`` (JSON conversion).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from sectional_moe.theory.fitting.result import jsonable
from sectional_moe.theory.laws import CHINCHILLA, WAN_2026, chinchilla_frontier

BUDGET_TOL = 0.05
"""Runs whose compute lies within 5 % of a budget's smallest are one IsoFLOP budget (scaling-laws.md §8.5)."""
MIN_SIZES = 3
"""Distinct sizes a parabola needs."""
EDGE = 0.10
"""A vertex in the outer 10 % (in ln x) of the sampled range is flagged as off-centre [I]."""
RUN_COLUMNS = ("run", "family", "N", "M", "C", "L")


def budget_groups(C: Sequence[float] | np.ndarray, *, tol: float = BUDGET_TOL) -> np.ndarray:
    """A budget label per run: sorted C split wherever a value exceeds its budget's first by > ``tol``."""
    C = np.asarray(C, dtype=float)
    labels = np.empty(C.size, dtype=int)
    first, label = None, -1
    for i in np.argsort(C, kind="stable"):
        if first is None or C[i] > first * (1.0 + tol):
            first, label = C[i], label + 1
        labels[i] = label
    return labels


def _parabola(lx: np.ndarray, L: np.ndarray) -> tuple[float, float, float] | None:
    """Least-squares L = c2·lx² + c1·lx + c0, or None with fewer than 3 distinct lx."""
    if np.unique(lx).size < MIN_SIZES:
        return None
    c2, c1, c0 = np.polyfit(lx, L, 2)
    return float(c2), float(c1), float(c0)


def isoflop_profiles(runs: pd.DataFrame, *, x: str = "N", tol: float = BUDGET_TOL) -> pd.DataFrame:
    """One row per IsoFLOP budget of ``runs`` (columns C, L and ``x``): the budget (geometric mean of
    its C), its runs and distinct sizes, the sampled range, the parabola's vertex ``x_opt`` and its
    loss, and ``status``: ``ok``, ``edge`` (vertex in the outer :data:`EDGE` of the range: kept,
    flagged), ``outside`` (vertex beyond the sampled sizes: extrapolated, left out), ``concave``
    (no minimum) or ``too few sizes``."""
    rows = []
    labels = budget_groups(runs["C"].to_numpy(float), tol=tol)
    for lab in np.unique(labels):
        g = runs[labels == lab]
        lx = np.log(g[x].to_numpy(float))
        L = g["L"].to_numpy(float)
        row: dict[str, Any] = {"C": float(np.exp(np.mean(np.log(g["C"].to_numpy(float))))), "runs": int(len(g)),
                               "sizes": int(np.unique(lx).size), f"{x}_min": float(np.exp(lx.min())), f"{x}_max": float(np.exp(lx.max())),
                               f"{x}_opt": None, "L_opt": None, "curvature": None, "status": "too few sizes"}
        p = _parabola(lx, L)
        if p is not None:
            c2, c1, c0 = p
            row["curvature"] = c2
            if c2 <= 0:
                row["status"] = "concave"
            else:
                v = -c1 / (2.0 * c2)
                row[f"{x}_opt"], row["L_opt"] = float(np.exp(v)), float(c0 - c1 * c1 / (4.0 * c2))
                span = lx.max() - lx.min()
                if v < lx.min() or v > lx.max():
                    row["status"] = "outside"
                elif min(v - lx.min(), lx.max() - v) < EDGE * span:
                    row["status"] = "edge"
                else:
                    row["status"] = "ok"
        rows.append(row)
    return pd.DataFrame(rows, columns=["C", "runs", "sizes", f"{x}_min", f"{x}_max", f"{x}_opt", "L_opt", "curvature", "status"])


def power_law(C: np.ndarray, y: np.ndarray) -> dict[str, Any] | None:
    """``y = k·C^e`` by least squares in log–log: {k, exponent, n, r2}; None with < 2 distinct C."""
    C, y = np.asarray(C, dtype=float), np.asarray(y, dtype=float)
    if np.unique(C).size < 2:
        return None
    e, lk = np.polyfit(np.log(C), np.log(y), 1)
    pred = lk + e * np.log(C)
    ss = float(np.sum((np.log(y) - np.log(y).mean()) ** 2))
    r2 = 1.0 - float(np.sum((np.log(y) - pred) ** 2)) / ss if ss > 0 else None
    return {"k": float(math.exp(lk)), "exponent": float(e), "n": int(C.size), "r2": r2}


def _usable(prof: pd.DataFrame) -> pd.DataFrame:
    return prof[prof["status"].isin(["ok", "edge"])]


def _allocation(runs: pd.DataFrame, tol: float) -> dict[str, Any]:
    """Profiles on N and M and the three power laws (no bootstrap)."""
    pn, pm = isoflop_profiles(runs, x="N", tol=tol), isoflop_profiles(runs, x="M", tol=tol)
    un, um = _usable(pn), _usable(pm)
    n_law = power_law(un["C"].to_numpy(), un["N_opt"].to_numpy(float)) if len(un) else None
    m_law = power_law(um["C"].to_numpy(), um["M_opt"].to_numpy(float)) if len(um) else None
    d_law = None
    if m_law is not None:
        d_law = {"k": 1.0 / m_law["k"], "exponent": 1.0 - m_law["exponent"], "n": m_law["n"], "r2": m_law["r2"],
                 "from": "D_opt = C / M_opt (C = M·D exactly)"}
    return {"profiles_N": pn, "profiles_M": pm, "N_opt": n_law, "M_opt": m_law, "D_opt": d_law}


def approach2(runs: pd.DataFrame, *, tol: float = BUDGET_TOL, n_boot: int = 0, seed: int = 0, ci: tuple[float, float] = (2.5, 97.5),
              grid: np.ndarray | None = None) -> dict[str, Any]:
    """Approach 2 on one family's runs (columns N, M, C, L; see the module doc). ``n_boot`` > 0 adds
    percentile intervals of the exponents and bands of N_opt(C), M_opt(C), D_opt(C) on ``grid``
    (default: 40 log-spaced budgets over the usable ones), resampling runs within each budget."""
    base = _allocation(runs, tol)
    out: dict[str, Any] = {**base, "reason": None, "budget_tol": tol}
    usable = _usable(base["profiles_N"])
    if base["N_opt"] is None or base["M_opt"] is None:
        n_budgets = int(len(base["profiles_N"]))
        out["reason"] = (f"{len(usable)} of {n_budgets} compute budget(s) (runs within {100 * tol:g} % of C) have an interior loss minimum "
                         f"over >= {MIN_SIZES} distinct sizes; the power laws need >= 2 such IsoFLOP profiles "
                         "(run several sizes at each of several fixed budgets)")
        return out
    if n_boot > 0:
        Cs = usable["C"].to_numpy()
        grid = np.geomspace(Cs.min(), Cs.max(), 40) if grid is None else np.asarray(grid, dtype=float)
        rng = np.random.default_rng(seed)
        labels = budget_groups(runs["C"].to_numpy(float), tol=tol)
        draws, curves, failed = [], {"N_opt": [], "M_opt": [], "D_opt": []}, 0
        for _ in range(n_boot):
            idx = np.concatenate([rng.choice(np.flatnonzero(labels == k), size=int((labels == k).sum()), replace=True)
                                  for k in np.unique(labels)])
            b = _allocation(runs.iloc[idx].reset_index(drop=True), tol)
            if b["N_opt"] is None or b["M_opt"] is None:
                failed += 1
                continue
            draws.append({"a": b["N_opt"]["exponent"], "m": b["M_opt"]["exponent"], "b": b["D_opt"]["exponent"]})
            for key in curves:
                curves[key].append(b[key]["k"] * grid ** b[key]["exponent"])
        out["bootstrap"] = {"n_boot": n_boot, "failed": failed, "unit": "runs within each budget", "ci": list(ci), "seed": seed}
        if draws:
            d = pd.DataFrame(draws)
            out["bootstrap"]["ci_low"] = {k: float(d[k].quantile(ci[0] / 100)) for k in d}
            out["bootstrap"]["ci_high"] = {k: float(d[k].quantile(ci[1] / 100)) for k in d}
            out["bands"] = {"C": grid, **{k: (np.percentile(v, ci[0], axis=0), np.percentile(v, ci[1], axis=0)) for k, v in curves.items()}}
    out["a_plus_b"] = base["N_opt"]["exponent"] + base["D_opt"]["exponent"]
    return out


def approach1_envelope(curves: pd.DataFrame, runs: pd.DataFrame, *, n_grid: int = 200, n_boot: int = 0, seed: int = 0,
                       ci: tuple[float, float] = (2.5, 97.5)) -> dict[str, Any]:
    """Approach 1 (module doc): ``curves`` has columns run, C, L (validation loss at cumulative
    training FLOPs C); ``runs`` columns run, N, M. Returns the envelope (C, run, N, M, L at each grid
    point), ``N_opt`` and ``D_opt`` power laws over it (D = C/M of the winning run), and a bootstrap
    over runs when ``n_boot`` > 0; ``reason`` when fewer than 2 runs ever win."""
    sizes = runs.set_index("run")[["N", "M"]]
    cur = curves[curves["run"].isin(sizes.index) & np.isfinite(curves["C"]) & np.isfinite(curves["L"]) & (curves["C"] > 0)]
    series = {r: g.sort_values("C") for r, g in cur.groupby("run") if len(g) >= 2}
    out: dict[str, Any] = {"reason": None, "n_runs": len(series)}
    if len(series) < 2:
        out["reason"] = f"{len(series)} run(s) with >= 2 logged (perf/flops, val/loss) points; the envelope needs training curves of >= 2 runs"
        return out

    def envelope(keys: Sequence[Any]) -> pd.DataFrame | None:
        lo = min(float(series[k]["C"].iloc[0]) for k in keys)
        hi = max(float(series[k]["C"].iloc[-1]) for k in keys)
        lg = np.log(np.geomspace(lo, hi, n_grid))
        loss = np.full((len(keys), n_grid), np.inf)  # each run's curve on the grid, +inf outside its range
        for j, k in enumerate(keys):
            lc, ll = np.log(series[k]["C"].to_numpy(float)), series[k]["L"].to_numpy(float)
            inside = (lg >= lc[0]) & (lg <= lc[-1])
            loss[j, inside] = np.interp(lg[inside], lc, ll)
        has = np.isfinite(loss).any(axis=0)
        win = np.argmin(loss, axis=0)[has]
        run = [keys[j] for j in win]
        env = pd.DataFrame({"C": np.exp(lg[has]), "run": run, "N": sizes.loc[run, "N"].to_numpy(float),
                            "M": sizes.loc[run, "M"].to_numpy(float), "L": loss[win, np.flatnonzero(has)]})
        return env if env["run"].nunique() >= 2 and env["N"].nunique() >= 2 else None

    env = envelope(list(series))
    if env is None:
        out["reason"] = "one run is lowest at every compute value: the envelope does not change size, so no N_opt(C) can be fitted"
        return out
    out["envelope"] = env
    out["N_opt"] = power_law(env["C"].to_numpy(), env["N"].to_numpy())
    out["D_opt"] = power_law(env["C"].to_numpy(), (env["C"] / env["M"]).to_numpy())
    out["winners"] = [str(r) for r in dict.fromkeys(env["run"])]
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        keys = list(series)
        a, failed = [], 0
        for _ in range(n_boot):
            pick = list(dict.fromkeys(rng.choice(len(keys), size=len(keys), replace=True)))  # a run twice adds nothing to a minimum
            e = envelope([keys[i] for i in pick]) if len(pick) >= 2 else None
            if e is None:
                failed += 1
                continue
            a.append(power_law(e["C"].to_numpy(), e["N"].to_numpy())["exponent"])
        out["bootstrap"] = {"n_boot": n_boot, "failed": failed, "unit": "run", "ci": list(ci), "seed": seed}
        if a:
            out["bootstrap"]["ci_low"] = {"a": float(np.percentile(a, ci[0]))}
            out["bootstrap"]["ci_high"] = {"a": float(np.percentile(a, ci[1]))}
    return out


PUBLISHED_ALLOCATION = {
    "wan2026": {"M_opt": {"k": WAN_2026["M_coef"], "exponent": WAN_2026["M_exp"]}, "D_opt": {"k": WAN_2026["D_coef"], "exponent": WAN_2026["D_exp"]},
                "provenance": "[P] Wan, Han, Zhang, Jin 2026 Eq. 2 (token MoE, 1 shared + 288 routed experts, top-8; their data)"},
}


def _chinchilla_reference() -> dict[str, Any]:
    fr = chinchilla_frontier(C=1e21, **CHINCHILLA.coefficients("epoch_mle"))
    return {"a": float(fr["a"]), "b": float(fr["b"]), "provenance": "[P] Epoch refit of Chinchilla (Besiroglu et al. 2024), a = β/(α+β), C = 6ND"}


@dataclass
class IsoflopResult:
    """Approaches 1 and 2 and the allocation laws for one family."""

    family: str
    n_runs: int
    approach2: dict[str, Any]
    approach1: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Flat, JSON-safe numbers for tables (exponents, coefficients, CIs, reasons)."""
        a2, a1 = self.approach2, self.approach1 or {}
        out: dict[str, Any] = {"family": self.family, "runs": self.n_runs, "approach2_reason": a2.get("reason")}
        for key, name in (("N_opt", "a"), ("M_opt", "m"), ("D_opt", "b")):
            law = a2.get(key)
            out[f"{key}_k"] = law["k"] if law else None
            out[f"{key}_exp"] = law["exponent"] if law else None
            b = a2.get("bootstrap", {})
            if "ci_low" in b and name in b["ci_low"]:
                out[f"{key}_exp_ci95"] = f"[{b['ci_low'][name]:.3g}, {b['ci_high'][name]:.3g}]"
        prof = a2.get("profiles_N")
        if prof is not None and len(prof):
            out["budgets"] = int(len(prof))
            out["budgets_used"] = int(prof["status"].isin(["ok", "edge"]).sum())
        out["approach1_reason"] = a1.get("reason") if self.approach1 is not None else "no training curves"
        if a1.get("N_opt"):
            out["approach1_a"] = a1["N_opt"]["exponent"]
            if "ci_low" in a1.get("bootstrap", {}):
                out["approach1_a_ci95"] = f"[{a1['bootstrap']['ci_low']['a']:.3g}, {a1['bootstrap']['ci_high']['a']:.3g}]"
        return jsonable(out)

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-safe (profiles as records, bands as lists)."""
        def clean(d: dict[str, Any] | None) -> dict[str, Any] | None:
            if d is None:
                return None
            out = {}
            for k, v in d.items():
                if isinstance(v, pd.DataFrame):
                    out[k] = v.to_dict(orient="records")
                elif k == "bands":
                    out[k] = {kk: ([list(map(float, b)) for b in vv] if isinstance(vv, tuple) else list(map(float, vv))) for kk, vv in v.items()}
                else:
                    out[k] = v
            return out

        return jsonable({"family": self.family, "runs": self.n_runs, "approach2": clean(self.approach2), "approach1": clean(self.approach1),
                         "published": {**PUBLISHED_ALLOCATION, "chinchilla_epoch": _chinchilla_reference()},
                         "conventions": "N parameters (as given; the report's params_total), M training FLOPs per token, C = M·D FLOPs, L nats",
                         "notes": self.notes})


def isoflop_analysis(runs: pd.DataFrame, curves: pd.DataFrame | None = None, *, tol: float = BUDGET_TOL, n_boot: int = 0, seed: int = 0,
                     n_grid: int = 200) -> list[IsoflopResult]:
    """Approaches 2 (and 1, given ``curves``) per family of ``runs`` (columns run, family, N, M, C, L;
    rows with a non-finite or non-positive value are left out and counted in the notes)."""
    missing = [c for c in RUN_COLUMNS if c not in runs.columns]
    if missing:
        raise KeyError(f"isoflop runs lack columns {missing} (need {list(RUN_COLUMNS)})")
    out = []
    for family, g in runs.groupby("family", sort=True, dropna=False):
        vals = g[["N", "M", "C", "L"]].astype(float)
        ok = np.isfinite(vals).all(axis=1) & (vals > 0).all(axis=1)
        notes = [f"{int((~ok).sum())} run(s) without finite positive N, M, C and loss left out"] if (~ok).any() else []
        g = g[ok]
        a2 = approach2(g, tol=tol, n_boot=n_boot, seed=seed)
        for key in ("profiles_N", "profiles_M"):
            prof = a2[key]
            for _, r in prof[prof["status"].isin(["outside", "edge"])].iterrows():
                x = key[-1]
                what = ("vertex outside the sampled sizes: extrapolated, left out of the power law" if r["status"] == "outside"
                        else "vertex in the outer 10 % of the sampled sizes: off-centre, kept")
                notes.append(f"budget C = {r['C']:.3g} ({x}): {what}")
        a1 = None
        if curves is not None:
            a1 = approach1_envelope(curves[curves["run"].isin(g["run"])], g[["run", "N", "M"]], n_grid=n_grid, n_boot=n_boot, seed=seed)
            if a1.get("N_opt"):
                notes.append("[I] Approach 1 here uses one training horizon per size: a curve's early points come from a schedule "
                             "tuned to a longer run, which favours larger models (Hoffmann trained 4 horizons per size)")
        out.append(IsoflopResult(str(family), int(len(g)), a2, a1, notes))
    return out
