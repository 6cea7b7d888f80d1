"""Matplotlib figures of the report. Each builder returns a :class:`Figure` (PNG bytes + caption)
or the reason it was skipped, never raises on thin data.

Conventions on every plot: E = experts (sections of d_model for the sectional family), x-axes in
E are log2; C = training FLOPs (tokens x 3 x forward matmul FLOPs/token); loss in nats/token;
perplexity = exp(loss); tokens/s = steady-state global training throughput.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")  # no display: figures are only saved
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from sectional_moe.report import analysis  # noqa: E402
from sectional_moe.report.collect import expert_fractions  # noqa: E402

LABELS: dict[str, str] = {
    "val_ppl_best": "best validation perplexity",
    "val_ppl_final": "final validation perplexity",
    "val_loss_best": "best validation loss (nats/token)",
    "val_loss_final": "final validation loss (nats/token)",
    "test_ppl": "test perplexity",
    "test_loss": "test loss (nats/token)",
    "tokens_per_s": "steady-state tokens/s (global)",
    "step_time_s": "steady-state step time (s)",
    "mfu": "MFU (fraction of peak)",
    "peak_mem_gib": "peak memory (GiB)",
    "params_total": "total parameters N",
    "params_active": "active parameters N_a",
}
FAMILY_MARKERS = {"dense": "s", "moe": "o", "sectional": "^"}


@dataclass
class Figure:
    slug: str
    title: str
    caption: str
    png: bytes | None = None
    skipped: str | None = None  # why there is no figure
    notes: list[str] = field(default_factory=list)  # e.g. fits skipped for some groups


def label(col: str) -> str:
    return LABELS.get(col, col)


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _log2_experts(ax: plt.Axes, experts: pd.Series) -> None:
    ax.set_xscale("log", base=2)
    ticks = sorted({int(e) for e in experts.dropna()})
    if ticks:
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
    ax.set_xlabel("experts E (log2)")


def _series_label(keys: tuple, names: list[str], multi_size: bool) -> str:
    parts = [f"{v}" for k, v in zip(names, keys) if k != "size" or multi_size]
    return " / ".join(parts)


def _lines_vs_experts(ax: plt.Axes, df: pd.DataFrame, metric: str, group_by: str) -> int:
    """Mean over seeds per (family, group_by, size) vs E, min-max bars; dense as dashed lines."""
    multi_size = df["size"].nunique() > 1
    routed = df[df["experts"].notna() & df[metric].notna()].astype({"experts": float})
    keys = ["family", group_by, "size"] if group_by != "family" else ["family", "size"]
    keys = list(dict.fromkeys(keys))
    n = 0
    for gkey, g in routed.groupby(keys, sort=True, dropna=False):
        gkey = gkey if isinstance(gkey, tuple) else (gkey,)
        stats = g.groupby("experts")[metric].agg(["mean", "min", "max"]).sort_index()
        fam = gkey[0]
        ax.errorbar(stats.index, stats["mean"], yerr=[stats["mean"] - stats["min"], stats["max"] - stats["mean"]],
                    marker=FAMILY_MARKERS.get(fam, "o"), capsize=3, label=_series_label(gkey, keys, multi_size))
        n += 1
    dense = df[(df["family"] == "dense") & df[metric].notna()]
    for size, g in dense.groupby("size", sort=True):
        ax.axhline(g[metric].mean(), ls="--", color="k", alpha=0.6, label=f"dense{' ' + str(size) if multi_size else ''} (reference)")
        n += 1
    if len(routed):
        _log2_experts(ax, routed["experts"])
    ax.set_ylabel(label(metric))
    ax.grid(alpha=0.3)
    if n:
        ax.legend(fontsize=8)
    return n


# ============================================================================================
def fig_quality_vs_experts(df: pd.DataFrame, metric: str, group_by: str) -> Figure:
    done = analysis.finished(df)
    title = f"{label(metric)} vs E"
    cap = (f"{label(metric)} of finished runs against the number of experts E, one line per family and {group_by} "
           "(mean over seeds, bars: min-max); dense runs are the dashed reference line.")
    if not done[metric].notna().any():
        return Figure("quality_vs_experts", title, cap, skipped=f"no finished run has {metric}")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    _lines_vs_experts(ax, done, metric, group_by)
    ax.set_title(title)
    return Figure("quality_vs_experts", title, cap, png=_png(fig))


def fig_throughput_memory(df: pd.DataFrame, metric: str, group_by: str) -> Figure:
    done = analysis.finished(df)
    title = "Throughput and peak memory vs E"
    kinds = ", ".join(sorted(done["mem_kind"].dropna().unique())) or "n/a"
    cap = ("Left: steady-state global training tokens/s (first logging window and validation excluded). "
           f"Right: peak memory in GiB ({kinds}: CUDA max reserved or CPU process peak RSS). Dense runs dashed.")
    if not (done["tokens_per_s"].notna().any() or done["peak_mem_gib"].notna().any()):
        return Figure("throughput_memory_vs_experts", title, cap, skipped="no finished run logged perf/ or mem/ metrics")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, col in zip(axes, ("tokens_per_s", "peak_mem_gib")):
        _lines_vs_experts(ax, done, col, group_by)
    axes[0].set_title("tokens/s vs E")
    axes[1].set_title("peak memory vs E")
    return Figure("throughput_memory_vs_experts", title, cap, png=_png(fig))


def fig_loss_vs_compute(df: pd.DataFrame, metric: str, group_by: str) -> Figure:
    done = analysis.finished(df).dropna(subset=["compute_flops", "val_loss_best"])
    title = "Loss vs training compute (Pareto frontier)"
    cap = ("Best validation loss (nats/token) against training compute C = trained tokens x training FLOPs/token "
           "(3 x forward matmul FLOPs incl. attention scores, PaLM convention; FLOPs, log scale). The black line joins the "
           "Pareto-optimal runs (no other run is both cheaper and better).")
    if done.empty:
        return Figure("loss_vs_compute", title, cap, skipped="no finished run has both compute and validation loss")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for fam, g in done.groupby("family", sort=True):
        ax.scatter(g["compute_flops"], g["val_loss_best"], marker=FAMILY_MARKERS.get(fam, "o"), s=45, label=str(fam), alpha=0.85)
    mask = analysis.pareto_mask(done["compute_flops"].to_numpy(), done["val_loss_best"].to_numpy())
    front = done[mask].sort_values("compute_flops")
    ax.step(front["compute_flops"], front["val_loss_best"], where="post", color="k", lw=1.2, label="Pareto frontier")
    for _, r in front.iterrows():
        ax.annotate(_short(r), (r["compute_flops"], r["val_loss_best"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("training compute C (FLOPs, log)")
    ax.set_ylabel("best validation loss (nats/token)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title)
    return Figure("loss_vs_compute", title, cap, png=_png(fig))


def _short(r: pd.Series) -> str:
    if r["family"] == "dense":
        return f"dense {r['size']}"
    e = "" if pd.isna(r["experts"]) else f" E={int(r['experts'])}"
    return f"{r['family']} {r['routing']}{e}"


def fig_step_cost(df: pd.DataFrame, metric: str, group_by: str, kappas: list[analysis.KappaResult]) -> Figure:
    done = analysis.finished(df)
    title = "Measured step cost vs E, fitted κ and E_opt"
    cap = ("Steady-state seconds per optimiser step against E (same batch per size). For each sectional (size, routing) with "
           "enough runs, the line is theory.fit_kappa's step-time model t = t0 + a·g(E) + κE² (g = summed R1 QKV cost "
           "fraction, κ in s/E²); E_opt measured = swept E with the lowest step time, fitted = argmin of the fitted curve, "
           "predicted = optimum of the reconstructed S(E) with the fitted a and κ.")
    notes = [f"κ fit skipped for {k.label}: {k.reason}" for k in kappas if k.fit is None]
    routed = done[done["experts"].notna() & done["step_time_s"].notna()]
    if routed.empty:
        return Figure("step_cost_kappa", title, cap, skipped="no finished routed run has a steady-state step time", notes=notes)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    _lines_vs_experts(ax, done, "step_time_s", group_by)
    text = []
    for k in kappas:
        if k.fit is None:
            continue
        f = k.fit
        grid = np.geomspace(k.data["experts"].min(), k.data["experts"].max(), 80)
        model = f.models["quadratic"]
        ax.plot(grid, model.predict(grid, view=f.view, compute=True), ":", lw=1.5, label=f"κ fit {k.label}")
        pred = f"{f.predicted.numeric_root:.2f}" if f.predicted else "n/a (κ or a ≤ 0)"
        text.append(f"{k.label}: κ={f.kappa:.3g}±{f.kappa_se:.2g} s/E², ΔAIC(lin−quad)={f.delta_aic:.2f}\n"
                    f"  E_opt measured={f.measured_e_opt:g}, fitted={f.fitted_e_opt:.2f}, predicted={pred}")
    if text:
        ax.text(0.02, 0.98, "\n".join(text), transform=ax.transAxes, va="top", fontsize=7,
                bbox={"boxstyle": "round", "fc": "white", "alpha": 0.85})
        ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title)
    return Figure("step_cost_kappa", title, cap, png=_png(fig), notes=notes)


def fig_expert_load(df: pd.DataFrame, metric: str, group_by: str) -> Figure:
    done = analysis.finished(df)
    moe = done[done["load_max_over_mean"].notna()]
    title = "Expert-load balance per routing"
    cap = ("Left: max/mean expert load of the last logging window (worst routed layer; 1 = perfectly balanced) against E, "
           "per family and routing. Right: each run's per-expert share of assignments x E, sorted (1 = its fair share); "
           "flat is balanced, a steep drop means idle experts.")
    if moe.empty:
        return Figure("expert_load", title, cap, skipped="no finished run logged moe/ load statistics (dense runs have none)")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    _lines_vs_experts(axes[0], moe, "load_max_over_mean", "routing")
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].set_ylabel("max / mean expert load")
    for _, r in moe.iterrows():
        fr = expert_fractions(r["expert_frac"])
        if fr.size:
            axes[1].plot(np.arange(1, fr.size + 1) / fr.size, np.sort(fr)[::-1] * fr.size, marker=".", label=_short(r))
    axes[1].axhline(1.0, color="grey", lw=0.8)
    axes[1].set_xlabel("expert rank / E (sorted by load)")
    axes[1].set_ylabel("share of assignments x E")
    axes[1].grid(alpha=0.3)
    if len(moe) <= 12:
        axes[1].legend(fontsize=7)
    return Figure("expert_load", title, cap, png=_png(fig))


def fig_scaling(df: pd.DataFrame, metric: str, group_by: str, fits: list[analysis.LawFit]) -> Figure:
    title = "Scaling-law fits: loss vs compute with 95% bands"
    cap = ("Per family, L = E + A·(C/C0)^-α fitted to the best validation loss (nats/token) by Huber regression on log L "
           "(theory.fit_parametric); shaded: 2.5-97.5 percentile band of a run-level bootstrap. C in FLOPs as above, "
           "C0 = geometric mean of the family's budgets.")
    notes = [f"{f.family}: {f.law} fit skipped: {f.reason}" for f in fits if f.reason]
    good = [f for f in fits if f.reason is None]
    if not good:
        return Figure("scaling_fits", title, cap, notes=notes,
                      skipped="no family has enough finished runs for a fit (reasons below)" if notes else "no finished runs")
    done = analysis.finished(df)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for f in good:
        g = done[done["family"] == f.family]
        line, = ax.plot(f.grid, f.curve, label=f"{f.family}: α={f.params['alpha']:.3g}, E={f.params['E']:.3g}")
        if f.band is not None:
            ax.fill_between(f.grid, f.band[0], f.band[1], color=line.get_color(), alpha=0.2)
        ax.scatter(g["compute_flops"], g["val_loss_best"], color=line.get_color(), marker=FAMILY_MARKERS.get(f.family, "o"))
    ax.set_xscale("log")
    ax.set_xlabel("training compute C (FLOPs, log)")
    ax.set_ylabel("best validation loss (nats/token)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title)
    return Figure("scaling_fits", title, cap, png=_png(fig), notes=notes)


#: Every figure of the report, in order (slug -> builder); tests check each appears or is explained.
FIGURE_SLUGS = ("quality_vs_experts", "throughput_memory_vs_experts", "loss_vs_compute", "step_cost_kappa", "expert_load", "scaling_fits")


def build_figures(df: pd.DataFrame, *, metric: str, group_by: str, kappas: list[analysis.KappaResult],
                  law_fits: list[analysis.LawFit]) -> list[Figure]:
    builders: list[Callable[[], Figure]] = [
        lambda: fig_quality_vs_experts(df, metric, group_by),
        lambda: fig_throughput_memory(df, metric, group_by),
        lambda: fig_loss_vs_compute(df, metric, group_by),
        lambda: fig_step_cost(df, metric, group_by, kappas),
        lambda: fig_expert_load(df, metric, group_by),
        lambda: fig_scaling(df, metric, group_by, law_fits),
    ]
    out = []
    for slug, build in zip(FIGURE_SLUGS, builders):
        try:
            out.append(build())
        except Exception as err:  # noqa: BLE001 - one broken plot must not lose the whole report
            plt.close("all")
            out.append(Figure(slug, slug, "", skipped=f"figure failed: {type(err).__name__}: {err}"))
    return out


def metric_label(metric: str) -> str:
    return label(metric)


__all__: list[Any] = ["Figure", "FIGURE_SLUGS", "build_figures", "label"]
