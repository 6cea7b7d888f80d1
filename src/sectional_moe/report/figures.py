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
from sectional_moe.report.replicates import configuration_columns, t_interval  # noqa: E402
from sectional_moe.report.table import expert_fractions  # noqa: E402
from sectional_moe.theory import isoflop, plots  # noqa: E402

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
    "params_active": "active parameters (read per token)",
    "params_flop_equivalent": "FLOP-equivalent active parameters N_a",
}
FAMILY_MARKERS = {"dense": "s", "moe": "o", "sectional": "^"}
NARROW_DECADES = 1.5  # a compute axis spanning fewer decades gets explicit, non-overlapping ticks


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
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", bbox_extra_artists=legends)  # keeps an outside legend
    plt.close(fig)
    return buf.getvalue()


def _legend(ax: plt.Axes) -> None:
    """A legend that never covers the data: inside for a few short entries, else beside the axes."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    if len(handles) <= 4 and max(len(t) for t in labels) <= 40:
        ax.legend(fontsize=8)
    else:
        outside = ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        outside.set_in_layout(False)  # tight_layout must not shrink the axes for it; savefig's "tight" box adds it


def _log2_experts(ax: plt.Axes, experts: pd.Series) -> None:
    ax.set_xscale("log", base=2)
    ticks = sorted({int(e) for e in experts.dropna()})
    if ticks:
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
    ax.set_xlabel("experts E (log2)")


def line_groups(df: pd.DataFrame, group_by: str) -> tuple[list[str], list[str]]:
    """(keys that split ``df`` into lines, the subset a legend must name).

    A line is one family and routing (and ``group_by``), further split by every config column that
    varies within a (family, routing) of ``df`` (:func:`analysis.varying_config_columns`), so
    seeds are the only runs averaged into a point. Family and size are named only when the plot
    holds more than one of them.
    """
    varying = analysis.varying_config_columns(df)
    keys = list(dict.fromkeys(["family", "routing", group_by, "size", *varying]))
    named = [k for k in keys if k not in ("family", "size") or df[k].nunique(dropna=False) > 1 or k in varying]
    return keys, analysis.drop_implied(df, named, keep=("family", "routing", group_by))


def _mean_ci(values: pd.Series) -> tuple[float, float, float]:
    """(mean, lower, upper error bar) of the replicates: the 95 % t-interval, none for one run."""
    ci = t_interval(values.astype(float).tolist())
    if ci["ci_lo"] is None:
        return float(ci["mean"]), 0.0, 0.0
    return float(ci["mean"]), float(ci["mean"] - ci["ci_lo"]), float(ci["ci_hi"] - ci["mean"])


def _lines_vs_experts(ax: plt.Axes, df: pd.DataFrame, metric: str, group_by: str) -> int:
    """Mean over seeds per config group vs E with 95 % t-interval bars; dense as dashed lines with a band."""
    routed = df[df["experts"].notna() & df[metric].notna()].astype({"experts": float})
    dense = df[(df["family"] == "dense") & df[metric].notna()]
    keys, named = line_groups(pd.concat([routed, dense]), group_by)
    n = 0
    for key, g in analysis.config_groups(routed, keys):
        points = sorted((e, *_mean_ci(v)) for e, v in g.groupby("experts")[metric])
        x, mean, lo, hi = (np.array(col) for col in zip(*points))
        ax.errorbar(x, mean, yerr=[lo, hi], marker=FAMILY_MARKERS.get(key["family"], "o"), capsize=3,
                    label=analysis.group_label({k: key[k] for k in named if k in key}))
        n += 1
    dense_keys = [k for k in keys if k not in ("family", "routing") and dense[k].nunique(dropna=False) > 1]
    for key, g in analysis.config_groups(dense, ["family", *dense_keys]):
        extra = analysis.group_label({k: key[k] for k in dense_keys}, bare=())
        mean, lo, hi = _mean_ci(g[metric])
        line = ax.axhline(mean, ls="--", color="k", alpha=0.6, label=f"dense{', ' + extra if extra else ''} (reference)")
        if lo or hi:
            ax.axhspan(mean - lo, mean + hi, color=line.get_color(), alpha=0.08)
        n += 1
    if len(routed):
        _log2_experts(ax, routed["experts"])
    ax.set_ylabel(label(metric))
    ax.grid(alpha=0.3)
    _legend(ax)
    return n


#: Baseline columns drawn on the quality plot: (column, legend name).
BASELINES = (("unigram_val_ppl", "unigram"), ("bigram_val_ppl", "bigram"))


def _baselines(ax: plt.Axes, df: pd.DataFrame, metric: str) -> list[float]:
    """Horizontal lines at the data's unigram/bigram validation perplexity (log of it for a
    validation-loss metric); one line per distinct value. Returns the values drawn."""
    if not metric.startswith("val_"):
        return []  # the baselines are validation-split numbers
    as_loss = metric.startswith("val_loss")
    drawn = []
    for (col, name), color in zip(BASELINES, ("tab:red", "tab:purple")):
        for value in sorted({round(float(v), 2) for v in df[col].dropna()}) if col in df.columns else []:
            y = float(np.log(value)) if as_loss else value
            unit = f"{y:.3f} nats/token" if as_loss else f"ppl {value:g}"
            ax.axhline(y, ls=":", lw=1.4, color=color, label=f"{name} baseline (validation, {unit})")
            drawn.append(y)
    return drawn


# ============================================================================================
def fig_quality_vs_experts(df: pd.DataFrame, metric: str, group_by: str) -> Figure:
    done = analysis.finished(df)
    title = f"{label(metric)} vs E"
    cap = (f"{label(metric)} of finished runs against the number of experts E, one line per family, {group_by} and "
           "every other config setting that differs between runs (named in the legend; mean over seeds, bars: 95 % "
           "t-interval of the mean, none for a single seed); dense runs are the dashed reference line (band: its interval). Dotted: the data's unigram and bigram validation perplexity "
           "(the level of token frequencies and of adjacent-token statistics), when logged.")
    if not done[metric].notna().any():
        return Figure("quality_vs_experts", title, cap, skipped=f"no finished run has {metric}")
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    _lines_vs_experts(ax, done, metric, group_by)
    drawn = _baselines(ax, done, metric)
    if drawn:
        values = done[metric].dropna().astype(float)
        if max(drawn + values.tolist()) / min(drawn + values.tolist()) > 3 and not metric.startswith("val_loss"):
            ax.set_yscale("log")  # a unigram ppl of ~10x the models' would flatten their differences
        _legend(ax)
    ax.set_title(title)
    return Figure("quality_vs_experts", title, cap, png=_png(fig))


def fig_throughput_memory(df: pd.DataFrame, metric: str, group_by: str) -> Figure:
    done = analysis.finished(df)
    title = "Throughput and peak memory vs E"
    kinds = ", ".join(sorted(done["mem_kind"].dropna().unique())) or "n/a"
    cap = ("Left: steady-state global training tokens/s (first logging window and validation excluded). "
           f"Right: peak memory in GiB ({kinds}: CUDA max reserved or CPU process peak RSS). Dense runs dashed. "
           "Points: mean over seeds, bars: 95 % t-interval of the mean.")
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
           "(3 x forward matmul FLOPs incl. attention scores, PaLM convention; FLOPs, log scale). One point per configuration: "
           "the mean over its seeds, bars: 95 % t-interval of the mean. The black line joins the Pareto-optimal "
           "configurations (no other is both cheaper and better on average).")
    if done.empty:
        return Figure("loss_vs_compute", title, cap, skipped="no finished run has both compute and validation loss")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    means = configuration_means(done, "val_loss_best")
    for fam, g in means.groupby("family", sort=True):
        ax.errorbar(g["compute_flops"], g["val_loss_best"], yerr=[g["err_lo"], g["err_hi"]], fmt=FAMILY_MARKERS.get(fam, "o"),
                    ms=6, capsize=3, label=str(fam), alpha=0.85)
    mask = analysis.pareto_mask(means["compute_flops"].to_numpy(), means["val_loss_best"].to_numpy())
    front = means[mask].sort_values("compute_flops")
    ax.step(front["compute_flops"], front["val_loss_best"], where="post", color="k", lw=1.2, label="Pareto frontier")
    for _, r in front.iterrows():
        ax.annotate(_short(r), (r["compute_flops"], r["val_loss_best"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    compute_axis(ax, done["compute_flops"])
    ax.set_xlabel("training compute C (FLOPs, log)")
    ax.set_ylabel("best validation loss (nats/token)")
    ax.grid(alpha=0.3, which="both")
    _legend(ax)
    ax.set_title(title)
    return Figure("loss_vs_compute", title, cap, png=_png(fig))


def configuration_means(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per configuration (seeds pooled): its first run's columns, the mean of ``metric`` and
    of ``compute_flops``, and the error bars of the 95 % t-interval (``err_lo``, ``err_hi``)."""
    columns = configuration_columns(df)
    rows = []
    for _, g in df.groupby([df[c].astype(object).where(df[c].notna(), "∅") for c in columns], sort=False):
        row = g.iloc[0].copy()
        row[metric], row["err_lo"], row["err_hi"] = _mean_ci(g[metric])
        row["compute_flops"] = float(g["compute_flops"].mean())
        rows.append(row)
    return pd.DataFrame(rows).reset_index(drop=True)


def compute_axis(ax: plt.Axes, values: Any) -> None:
    """A log x-axis of training compute whose tick labels never overlap: within less than
    :data:`NARROW_DECADES` decades matplotlib labels the minor ticks too (``2x10^14 3x10^14 ...``
    run into each other), so a narrow range gets at most 4 ticks at rounded values, in
    engineering notation, and no minor labels."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    ax.set_xscale("log")
    v = np.asarray(pd.to_numeric(pd.Series(values), errors="coerce"), dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size == 0 or np.log10(v.max() / v.min()) >= NARROW_DECADES:
        return
    lo, hi = v.min(), v.max()
    raw = np.geomspace(lo, hi, 4) if hi > lo * 1.001 else np.array([lo])
    ticks = sorted({float(f"{t:.2g}") for t in raw})
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: eng(x)))
    pad = (hi / lo) ** 0.08 if hi > lo * 1.001 else 1.2
    ax.set_xlim(min(lo, ticks[0]) / pad, max(hi, ticks[-1]) * pad)


def eng(x: float) -> str:
    """``3.4e14`` -> ``340T`` (FLOPs), two significant digits."""
    for div, suffix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{float(f'{x / div:.2g}'):g}{suffix}"
    return f"{x:.2g}"


def _short(r: pd.Series) -> str:
    if r["family"] == "dense":
        return f"dense {r['size']}"
    e = "" if pd.isna(r["experts"]) else f" E={int(r['experts'])}"
    return f"{r['family']} {r['routing']}{e}"


def fig_step_cost(df: pd.DataFrame, metric: str, group_by: str, kappas: list[analysis.KappaResult]) -> Figure:
    done = analysis.finished(df)
    title = "Measured step cost vs E, fitted κ and E_opt"
    cap = ("Steady-state seconds per optimiser step against E. For each group of sectional runs with the same config "
           "(size, routing and every setting that differs, named in the legend) and enough runs, the dotted line is "
           "theory.fit_kappa's step-time model t = t0 + a·g(E) + κE², κ in s/E², g = each run's exact training FLOPs per step "
           "(sectional_moe.models.flops) relative to the costliest run (R1's summed QKV fraction only when FLOPs are missing); "
           "E_opt measured = swept E with the lowest step time, fitted = argmin of the fitted curve, predicted = optimum "
           "of the reconstructed S(E) (R1 compute term only). The κ table also gives κ in the planner's unit, MACs per E² per "
           "sequence and sectional layer, converted with the measured FLOP rate (plan --kappa-from fits.json).")
    notes = [f"κ fit skipped for {k.label}: {k.reason}" for k in kappas if k.fit is None]
    routed = done[done["experts"].notna() & done["step_time_s"].notna()]
    if routed.empty:
        return Figure("step_cost_kappa", title, cap, skipped="no finished routed run has a steady-state step time", notes=notes)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    _lines_vs_experts(ax, done, "step_time_s", group_by)
    # each fitted curve in the colour of the measured line of its group
    colors = {lab: h[0].get_color() for h, lab in zip(*ax.get_legend_handles_labels()) if isinstance(h, tuple) or hasattr(h, "lines")}
    _, named = line_groups(routed, group_by)
    fitted = [k for k in kappas if k.fit is not None]
    # name a fit only by what tells it from the other fits (the full group is in the κ table)
    keys = pd.DataFrame([{c: analysis.label_value(v) for c, v in k.key.items()} for k in fitted])
    differing = analysis.drop_implied(keys, [c for c in keys.columns if keys[c].nunique() > 1]) if len(keys) else []
    for k in fitted:
        f = k.fit
        grid = np.geomspace(k.data["experts"].min(), k.data["experts"].max(), 80)
        line_label = analysis.group_label({c: {"family": "sectional"}.get(c, k.key.get(c)) for c in named})
        which = analysis.group_label({c: k.key.get(c) for c in differing}, bare=())
        pred = f", S(E) {f.predicted.numeric_root:.1f}" if f.predicted else ""
        ax.plot(grid, f.predict(grid), ":", lw=1.5, color=colors.get(line_label),
                label=f"fit{' ' + which if which else ''}: κ={f.kappa:.2g}±{f.kappa_se:.1g} s/E², "
                      f"E_opt meas. {f.measured_e_opt:g} / fit {f.fitted_e_opt:.0f}{pred}")
    _legend(ax)
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
    _, named = line_groups(moe, "routing")
    for _, r in moe.iterrows():
        fr = expert_fractions(r["expert_frac"])
        if fr.size:
            run_label = analysis.group_label({k: r[k] for k in named}) + f", E={int(r['experts'])}" + (
                "" if pd.isna(r["seed"]) else f", seed={int(r['seed'])}")
            axes[1].plot(np.arange(1, fr.size + 1) / fr.size, np.sort(fr)[::-1] * fr.size, marker=".", label=run_label)
    axes[1].axhline(1.0, color="grey", lw=0.8)
    axes[1].set_xlabel("expert rank / E (sorted by load)")
    axes[1].set_ylabel("share of assignments x E")
    axes[1].grid(alpha=0.3)
    if len(moe) <= 12:
        _legend(axes[1])
    return Figure("expert_load", title, cap, png=_png(fig))


def fig_scaling(df: pd.DataFrame, metric: str, group_by: str, fits: list[analysis.LawFit]) -> Figure:
    title = "Scaling-law fits: loss vs compute with 95% bands"
    cap = ("Per family, L = E + A·(C/C0)^-α fitted to the best validation loss (nats/token) by Huber regression on log L "
           "(theory.fit_parametric); shaded: 2.5-97.5 percentile band of a run-level bootstrap. C in FLOPs as above, "
           "C0 = geometric mean of the family's budgets.")
    notes = [f"{f.family}: {f.law} fit skipped: {f.reason}" for f in fits if f.reason]
    notes += [f"{f.family}: {f.law} caveat: {w}" for f in fits if f.reason is None for w in f.warnings]
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
    compute_axis(ax, np.concatenate([np.asarray(f.grid, dtype=float) for f in good] + [done["compute_flops"].to_numpy(dtype=float)]))
    ax.set_xlabel("training compute C (FLOPs, log)")
    ax.set_ylabel("best validation loss (nats/token)")
    ax.grid(alpha=0.3, which="both")
    _legend(ax)
    ax.set_title(title)
    return Figure("scaling_fits", title, cap, png=_png(fig), notes=notes)


def fig_isoflop(df: pd.DataFrame, metric: str, group_by: str, results: list[isoflop.IsoflopResult]) -> Figure:
    title = "IsoFLOP profiles and compute-optimal N(C) (Hoffmann Approaches 1 and 2)"
    cap = ("Left: best validation loss (nats/token) against total parameters N at each compute budget (runs within 5 % of C, "
           "C = trained tokens x training FLOPs/token), a parabola in ln N per budget with >= 3 sizes and its minimum (stars). "
           "Right: the minima N_opt against C, the power law N_opt = k·C^a with its 95 % bootstrap band (runs resampled within "
           "budgets), and (dotted) the run on the lower envelope of the validation curves at each C (Approach 1). "
           "theory.isoflop; exponents and Wan et al. 2026's published allocation are in the fit tables.")
    notes = []
    for r in results:
        if r.approach2.get("reason"):
            notes.append(f"{r.family}: Approach 2: {r.approach2['reason']}")
        a1 = r.approach1
        notes.append(f"{r.family}: Approach 1: {a1['reason']}" if a1 is not None and a1.get("reason") else
                     f"{r.family}: Approach 1: no training curves" if a1 is None else "")
        notes += [f"{r.family}: {n}" for n in r.notes]
    notes = [n for n in notes if n]
    runs = analysis.isoflop_runs(df)
    runs = runs[np.isfinite(runs[["N", "C", "L"]]).all(axis=1)]
    if runs.empty or not results:
        return Figure("isoflop", title, cap, notes=notes, skipped="no finished run has parameters, compute and validation loss")
    # the runs are drawn even without a power law: the left panel shows why (one size per budget, ...)
    return Figure("isoflop", title, cap, png=_png(plots.isoflop_figure(results, runs)), notes=notes)


#: Every figure of the report, in order (slug -> builder); tests check each appears or is explained.
FIGURE_SLUGS = ("quality_vs_experts", "throughput_memory_vs_experts", "loss_vs_compute", "step_cost_kappa", "expert_load", "scaling_fits",
                "isoflop", "lr_tuning")


def fig_lr_tuning(df: pd.DataFrame, metric: str) -> Figure:
    """The tuning curve: ``metric`` against the learning rate, one line per configuration (seeds
    pooled, 95 % t-interval bars), the best value of each line marked; drawn when lr varies."""
    done = analysis.finished(df).dropna(subset=["lr", metric])
    title = f"{label(metric)} vs learning rate"
    cap = (f"{label(metric)} of finished runs against optim.lr (log scale), one line per configuration (every config "
           "setting but lr and seed); points: mean over seeds, bars: 95 % t-interval; a star marks each line's best lr.")
    columns = [c for c in configuration_columns(done) if c != "lr"]
    lines = list(analysis.config_groups(done, columns)) if len(done) else []
    lines = [(key, g) for key, g in lines if g["lr"].nunique() > 1]
    if not lines:
        return Figure("lr_tuning", title, cap, skipped="no configuration was trained at more than one learning rate")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    named = analysis.drop_implied(done, [c for c in columns if done[c].astype(object).nunique(dropna=False) > 1],
                                  keep=("family", "routing"))
    better = min if analysis.ascending(metric) else max
    for key, g in lines:
        points = sorted((lr, *_mean_ci(v)) for lr, v in g.groupby("lr")[metric])
        x, mean, lo, hi = (np.array(col) for col in zip(*points))
        bars = ax.errorbar(x, mean, yerr=[lo, hi], marker=FAMILY_MARKERS.get(key.get("family"), "o"), capsize=3,
                           label=analysis.group_label({k: key[k] for k in named if k in key}) or "runs")
        best = better(range(len(x)), key=lambda i: mean[i])
        ax.plot([x[best]], [mean[best]], marker="*", ms=14, color=bars.lines[0].get_color(), ls="none")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate optim.lr (log)")
    ax.set_ylabel(label(metric))
    ax.grid(alpha=0.3, which="both")
    _legend(ax)
    ax.set_title(title)
    return Figure("lr_tuning", title, cap, png=_png(fig))


def build_figures(df: pd.DataFrame, *, metric: str, group_by: str, kappas: list[analysis.KappaResult],
                  law_fits: list[analysis.LawFit], isoflops: list[isoflop.IsoflopResult] | None = None) -> list[Figure]:
    builders: list[Callable[[], Figure]] = [
        lambda: fig_quality_vs_experts(df, metric, group_by),
        lambda: fig_throughput_memory(df, metric, group_by),
        lambda: fig_loss_vs_compute(df, metric, group_by),
        lambda: fig_step_cost(df, metric, group_by, kappas),
        lambda: fig_expert_load(df, metric, group_by),
        lambda: fig_scaling(df, metric, group_by, law_fits),
        lambda: fig_isoflop(df, metric, group_by, isoflops or []),
        lambda: fig_lr_tuning(df, metric),
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
