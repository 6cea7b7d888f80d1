"""Figures of the theory command line (``--plot``) and of the report's IsoFLOP section: data, the
fitted law, residuals and, when there is one, the bootstrap band. Every axis says its unit and
every title says whether the fit is identified.

Each builder returns a matplotlib ``Figure`` (the caller saves or embeds it); :func:`save`
writes a PNG. matplotlib is imported with this module only (the Agg backend: no display).

Owns: :func:`chinchilla_figure`, :func:`parametric_figure`, :func:`clark_figure`,
:func:`kappa_figure`, :func:`isoflop_figure`, :func:`save`.
Imports: matplotlib, numpy, pandas; ``theory.laws``, ``theory.isoflop``, ``theory.fitting``,
``theory.cost_model`` (types and predictions only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from sectional_moe.theory.cost_model import KappaFit  # noqa: E402
from sectional_moe.theory.fitting.result import FitResult  # noqa: E402
from sectional_moe.theory.isoflop import IsoflopResult, budget_groups  # noqa: E402
from sectional_moe.theory.laws import CLARK, Law, chinchilla_loss  # noqa: E402


def save(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as a PNG (directories created) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
    return path


def _verdict(fit: FitResult) -> str:
    return "identified" if fit.identified else "NOT IDENTIFIED: " + "; ".join(fit.identifiability.get("reasons", []))[:90]


def _band(curves: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    if not curves:
        return None
    arr = np.array(curves)
    return np.nanpercentile(arr, 2.5, axis=0), np.nanpercentile(arr, 97.5, axis=0)


def chinchilla_figure(fit: FitResult, *, N: np.ndarray, D: np.ndarray, L: np.ndarray, n_label: str = "N (parameters)") -> Any:
    """Left: loss against N; one curve of the fitted law per IsoFLOP budget (C = 6ND within 5 %)
    when the data have such budgets, else per distinct D (up to 6), with the bootstrap's 95 % band.
    Right: residuals ln L̂ − ln L against N."""
    N, D, L = (np.asarray(x, dtype=float) for x in (N, D, L))
    fig, (ax, rx) = plt.subplots(1, 2, figsize=(11, 4.3))
    C = 6.0 * N * D
    labels = budget_groups(C)
    use_c = np.bincount(labels).max() >= 3
    keys = np.unique(labels) if use_c else np.unique(D)
    if len(keys) > 6:
        keys = keys[np.linspace(0, len(keys) - 1, 6).round().astype(int)]
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(keys)))
    samples = fit.bootstrap.samples.dropna() if fit.bootstrap is not None else None
    grid = np.geomspace(N.min() / 1.5, N.max() * 1.5, 80)
    for key, color in zip(keys, colors):
        sel = labels == key if use_c else D == key
        if use_c:
            c = float(np.exp(np.mean(np.log(C[sel]))))
            d_of = lambda n, c=c: c / (6.0 * n)  # noqa: E731
            name = f"C = 6ND ≈ {c:.2g}"
        else:
            d_of = lambda n, d=float(key): np.full_like(n, d)  # noqa: E731
            name = f"D = {key:.3g}"
        ax.scatter(N[sel], L[sel], color=color, s=18)
        ax.plot(grid, chinchilla_loss(N=grid, D=d_of(grid), **fit.params), color=color, lw=1.2, label=name)
        if samples is not None and len(samples):
            band = _band([chinchilla_loss(N=grid, D=d_of(grid), **{k: r[k] for k in ("E", "A", "B", "alpha", "beta")})
                          for _, r in samples.iterrows()])
            if band is not None:
                ax.fill_between(grid, band[0], band[1], color=color, alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel(n_label + ", log")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"L = E + A/N^α + B/D^β: {_verdict(fit)}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    rx.scatter(N, fit.residuals, s=14, color="k")
    rx.axhline(0, color="grey", lw=0.8)
    rx.set_xscale("log")
    rx.set_xlabel(n_label + ", log")
    rx.set_ylabel("residual ln L̂ − ln L")
    rx.set_title(f"residuals (Huber δ = {fit.settings.get('delta', 1e-3):g} on ln L)" +
                 (f"; band: 95 % of {len(samples)} bootstrap refits" if samples is not None else ""), fontsize=9)
    rx.grid(alpha=0.3)
    return fig


def parametric_figure(fit: FitResult, law: Law, *, inputs: Mapping[str, np.ndarray], L: np.ndarray) -> Any:
    """Left: observed against fitted loss (the diagonal is a perfect fit). Right: residuals against
    the law's first input."""
    L = np.asarray(L, dtype=float)
    pred = np.asarray(law.fn(**{k: np.asarray(v, dtype=float) for k, v in inputs.items()}, **fit.params), dtype=float)
    fig, (ax, rx) = plt.subplots(1, 2, figsize=(11, 4.3))
    ax.scatter(pred, L, s=16)
    lo, hi = float(min(pred.min(), L.min())), float(max(pred.max(), L.max()))
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
    ax.set_xlabel("fitted loss (nats/token)")
    ax.set_ylabel("observed loss (nats/token)")
    ax.set_title(f"{law.name}: {_verdict(fit)}", fontsize=9)
    ax.grid(alpha=0.3)
    first = next(iter(law.inputs))
    rx.scatter(np.asarray(inputs[first], dtype=float), fit.residuals, s=14, color="k")
    rx.axhline(0, color="grey", lw=0.8)
    rx.set_xscale("log")
    rx.set_xlabel(f"{first} ({law.inputs[first]}), log")
    rx.set_ylabel(f"residual ({fit.settings.get('loss')})")
    rx.set_title("residuals", fontsize=9)
    rx.grid(alpha=0.3)
    return fig


def clark_figure(fits: Mapping[Any, FitResult], data: Mapping[Any, pd.DataFrame], *, n_col: str, e_col: str, loss_col: str) -> Any:
    """Per group: loss against E (log2) at each N, with the fitted law; residuals (log10) beside."""
    fig, (ax, rx) = plt.subplots(1, 2, figsize=(11, 4.3))
    markers = "os^vD<>"
    for gi, (key, fit) in enumerate(fits.items()):
        d = data[key]
        for ni, n in enumerate(sorted(d[n_col].unique())):
            sub = d[d[n_col] == n].sort_values(e_col)
            line, = ax.plot(sub[e_col], sub[loss_col], markers[gi % len(markers)], ms=4)
            grid = np.geomspace(sub[e_col].min(), sub[e_col].max(), 60)
            ax.plot(grid, CLARK.fn(N=np.full_like(grid, n), E=grid, **fit.params), color=line.get_color(), lw=1,
                    label=f"{key}, N={n:.2g}" if ni < 4 else None)
        rx.scatter(d[e_col], fit.residuals, s=12, marker=markers[gi % len(markers)], label=f"{key}: {'identified' if fit.identified else 'NOT IDENTIFIED'}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("experts E (log2)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Clark et al. 2022 law per group [S]", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    rx.axhline(0, color="grey", lw=0.8)
    rx.set_xscale("log", base=2)
    rx.set_xlabel("experts E (log2)")
    rx.set_ylabel("residual log10 L̂ − log10 L")
    rx.legend(fontsize=7)
    rx.grid(alpha=0.3)
    return fig


def kappa_figure(fit: KappaFit, *, experts: np.ndarray, step_time: np.ndarray) -> Any:
    """Step time against E with the quadratic (κE², the paper's claim [S]) and linear overhead fits;
    residuals of the quadratic fit beside."""
    E, t = np.asarray(experts, dtype=float), np.asarray(step_time, dtype=float)
    fig, (ax, rx) = plt.subplots(1, 2, figsize=(11, 4.3))
    ax.scatter(E, t, s=16, color="k", label="measured")
    grid = np.geomspace(E.min(), E.max(), 80)
    for name, style in (("quadratic", "-"), ("linear", "--")):
        ax.plot(grid, fit.predict(grid, name), style, label=f"{fit.models[name].formula} (AIC {fit.models[name].aic:.1f})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("experts E (log2)")
    ax.set_ylabel("step time (caller's unit, s per step in the report)")
    ax.set_title(f"κ = {fit.kappa:.3g} ± {fit.kappa_se:.2g} per E²; E_opt measured {fit.measured_e_opt:g}, fitted {fit.fitted_e_opt:.2f}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    rx.scatter(E, t - fit.predict(E, "quadratic"), s=14, color="k")
    rx.axhline(0, color="grey", lw=0.8)
    rx.set_xscale("log", base=2)
    rx.set_xlabel("experts E (log2)")
    rx.set_ylabel("residual (measured − quadratic fit)")
    rx.grid(alpha=0.3)
    return fig


def isoflop_figure(results: list[IsoflopResult], runs: pd.DataFrame) -> Any:
    """Left: each family's IsoFLOP profiles (loss against N at each budget, the parabola and its
    vertex). Right: N_opt(C) of Approach 2 (vertices, power law, 95 % bootstrap band) and of
    Approach 1 (envelope winners, power law) per family. ``runs`` has columns family, N, C, L."""
    fig, (ax, px) = plt.subplots(1, 2, figsize=(12, 4.6))
    markers = {"dense": "s", "moe": "o", "sectional": "^"}
    for r in results:
        g = runs[runs["family"] == r.family]
        prof = r.approach2["profiles_N"]
        labels = budget_groups(g["C"].to_numpy(float))
        color = None
        for lab in np.unique(labels):
            sub = g[labels == lab]
            sc = ax.scatter(sub["N"], sub["L"], s=14, marker=markers.get(r.family, "o"), color=color)
            color = sc.get_facecolor()[0] if color is None else color
            lx = np.log(sub["N"].to_numpy(float))
            if np.unique(lx).size >= 3:
                c2, c1, c0 = np.polyfit(lx, sub["L"].to_numpy(float), 2)
                xs = np.linspace(lx.min(), lx.max(), 40)
                ax.plot(np.exp(xs), c2 * xs**2 + c1 * xs + c0, color=color, lw=0.8, alpha=0.8)
        ok = prof[prof["status"].isin(["ok", "edge"])]
        if len(ok):
            ax.scatter(ok["N_opt"], ok["L_opt"], marker="*", s=70, color=color, edgecolor="k", zorder=3, label=f"{r.family}: vertices")
            px.scatter(ok["C"], ok["N_opt"], marker=markers.get(r.family, "o"), color=color, label=f"{r.family}: IsoFLOP minima")
        law = r.approach2.get("N_opt")
        if law:
            Cs = np.geomspace(ok["C"].min(), ok["C"].max(), 40)
            ci = r.approach2.get("bootstrap", {})
            ci_txt = f" [{ci['ci_low']['a']:.2f}, {ci['ci_high']['a']:.2f}]" if "ci_low" in ci else ""
            px.plot(Cs, law["k"] * Cs ** law["exponent"], color=color, label=f"{r.family}: N_opt ∝ C^{law['exponent']:.3f}{ci_txt}")
            band = r.approach2.get("bands", {}).get("N_opt")
            if band is not None:
                px.fill_between(r.approach2["bands"]["C"], band[0], band[1], color=color, alpha=0.15)
        a1 = r.approach1 or {}
        if a1.get("N_opt"):
            env = a1["envelope"]
            px.plot(env["C"], env["N"], ":", color=color, lw=1, label=f"{r.family}: envelope winners (Approach 1), a = {a1['N_opt']['exponent']:.3f}")
    _finish(ax, "N (parameters, log)", "loss (nats/token)",
            "IsoFLOP profiles: parabola in ln N per budget (Hoffmann Approach 2)", logx=True)
    has_fit = bool(px.get_legend_handles_labels()[0])
    if not has_fit:
        px.text(0.5, 0.5, "no IsoFLOP profile (>= 3 sizes at one budget)\nand no envelope of training curves:\nno N_opt(C) to fit",
                ha="center", va="center", transform=px.transAxes, fontsize=9, color="0.3")
    _finish(px, "training compute C = M·D (FLOPs, log)", "compute-optimal N (parameters, log)",
            "N_opt(C): power law, 95 % bootstrap band (runs resampled within budgets)", logx=has_fit, logy=has_fit)
    return fig


def _finish(ax: Any, xlabel: str, ylabel: str, title: str, logx: bool = False, logy: bool = False) -> None:
    """Scales, labels, a small title, a light grid, and a legend where something is labelled."""
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
