"""The report: build it from the tidy table, render a self-contained HTML page and a Markdown twin.

HTML embeds every figure as a base64 PNG (one file to mail or attach); the Markdown links the same
PNGs from ``figures/`` next to it (GitHub does not render data: URIs). Both hold the same sections:
conventions, the comparison table sorted by the chosen metric, runs that did not finish, each
figure with its caption (or the reason it was skipped), and the fit tables.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sectional_moe.report import analysis, replicates
from sectional_moe.report.figures import Figure, build_figures, label
from sectional_moe.theory import isoflop

DISPLAY_COLUMNS = (
    "run", "family", "size", "experts", "routing", "seed", "params_total", "params_active", "flops_per_token", "tokens",
    "compute_flops", "val_ppl_best", "val_ppl_final", "test_ppl", "tokens_per_s", "step_time_s", "mfu", "peak_mem_gib",
    "load_max_over_mean", "state",
)

CONVENTIONS = [
    "E = number of experts (token MoE) or of d_model sections (sectional MoE); dense runs have none and are drawn as reference lines.",
    "N: params_total = all parameters with embeddings (tied head once); params_active = non-embedding parameters a token reads; "
    "params_flop_equivalent = FLOP-equivalent active non-embedding parameters N_a (6 N_a + attention = training FLOPs per token).",
    "C = trained tokens × training matmul FLOPs/token (3 × forward, attention scores over the full context, no recompute; PaLM convention), in FLOPs.",
    "Loss in nats/token; perplexity = exp(loss). 'best' = lowest over evaluations, 'final' = last evaluation.",
    "tokens/s, step time, MFU: steady state = total tokens / total time over logging windows after the first (validation excluded).",
    "Peak memory in GiB: CUDA max reserved by the allocator, or the CPU process's peak RSS (column mem_kind).",
]


@dataclass
class Report:
    table: pd.DataFrame
    source: str
    metric: str
    group_by: str
    figures: list[Figure]
    kappas: list[analysis.KappaResult]
    law_fits: list[analysis.LawFit]
    chinchilla: list[analysis.LawFit]
    leverage: pd.DataFrame  # analysis.compute_leverage of the table
    isoflop: list[isoflop.IsoflopResult] = field(default_factory=list)  # Approaches 1 and 2 per family
    curves: pd.DataFrame | None = None  # (run, C, L) training curves behind Approach 1
    reference: dict[str, Any] = field(default_factory=lambda: {"family": "dense"})  # what paired differences compare to
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S"))

    @property
    def title(self) -> str:
        groups = sorted({g for g in self.table["group"].dropna()})
        return f"Sweep report: {', '.join(groups) if groups else self.source}"

    def comparison(self) -> pd.DataFrame:
        """Finished runs, best first by ``metric`` (missing values last)."""
        done = analysis.finished(self.table)
        # the settings that tell runs apart (e.g. sectional_every) go next to the identity columns
        varying = [c for c in analysis.varying_config_columns(done) if c not in DISPLAY_COLUMNS]
        cols = list(DISPLAY_COLUMNS)
        cols[cols.index("seed") + 1:cols.index("seed") + 1] = varying
        return done.sort_values(self.metric, ascending=analysis.ascending(self.metric), na_position="last", kind="stable")[cols]

    def compact_comparison(self) -> tuple[pd.DataFrame, list[str]]:
        """:meth:`comparison` as printed: what every row shares is said once (:func:`compact`)."""
        return compact(self.comparison(), keep=("run", self.metric))

    def not_finished(self) -> pd.DataFrame:
        bad = self.table[self.table["state"] != "done"]
        return pd.DataFrame({"run": bad["run"], "state": bad["state"],
                             "error": bad["error"].map(lambda e: e.strip().splitlines()[0] if isinstance(e, str) and e.strip() else ""),
                             "path": bad["path"]})

    def replicate_table(self) -> pd.DataFrame:
        """One row per configuration: n, seeds, mean, sd and 95 % t-interval of ``metric``, best first."""
        agg = replicates.aggregate(self.table, self.metric, _shown_configuration(self.table))
        return agg.sort_values("mean", ascending=analysis.ascending(self.metric), na_position="last", kind="stable")

    def paired_table(self) -> pd.DataFrame:
        """Every configuration minus the reference, paired by seed, with its interval and verdict."""
        return replicates.paired_differences(self.table, self.metric, self.reference, _shown_configuration(self.table))

    def kappa_table(self) -> pd.DataFrame:
        return pd.DataFrame([k.summary() for k in self.kappas])

    def fit_table(self) -> pd.DataFrame:
        return pd.DataFrame([f.summary() for f in self.law_fits + self.chinchilla])

    def leverage_table(self) -> pd.DataFrame:
        return self.leverage

    def isoflop_table(self) -> pd.DataFrame:
        """Per family: the fitted allocation exponents (N_opt ∝ C^a, M_opt ∝ C^m, D_opt ∝ C^b) with
        95 % intervals, Approach 1's exponent, or the reasons, and Wan et al. 2026's published pair."""
        rows = [r.summary() for r in self.isoflop]
        if rows:
            rows.append({"family": "published: Wan et al. 2026 [P] (token MoE)", "M_opt_k": isoflop.WAN_2026["M_coef"],
                         "M_opt_exp": isoflop.WAN_2026["M_exp"], "D_opt_k": isoflop.WAN_2026["D_coef"], "D_opt_exp": isoflop.WAN_2026["D_exp"]})
        return pd.DataFrame(rows)

    def fits_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "interval": replicates.INTERVAL, "reference": self.reference,
                "replicates": self.replicate_table().to_dict(orient="records"),
                "paired_differences": self.paired_table().to_dict(orient="records"),
                "kappa": [k.summary() for k in self.kappas], "compute_law": [f.summary() for f in self.law_fits],
                "chinchilla": [f.summary() for f in self.chinchilla],
                "leverage": self.leverage_table().to_dict(orient="records"),
                "isoflop": [r.to_dict() for r in self.isoflop]}


def _shown_configuration(table: pd.DataFrame) -> list[str]:
    """The configuration columns a reader needs: family, routing, E, size and what varies besides."""
    varying = [c for c in analysis.varying_config_columns(analysis.finished(table)) if c != "size"]
    return list(dict.fromkeys(["family", "routing", "experts", "size", *varying]))


REPLICATES_NOTE = ("Runs that differ only in their seed are one configuration: n runs, their mean and the "
                   + replicates.INTERVAL + " (mean ± t(0.975, n−1)·sd/√n; none for n = 1).")
PAIRED_NOTE = ("Each configuration minus the reference, paired by seed (and by the settings that vary among the reference "
               "runs): the mean difference and its 95 % t-interval over the pairs. 'better' or 'worse' only where the interval "
               "excludes zero; otherwise 'not distinguishable at n = k'.")


LEVERAGE_NOTE = ("At each loss level both frontiers reach, dense training compute / the family's training compute, "
                 "read off each family's Pareto frontier of (C, best validation loss) by log-linear interpolation "
                 "(no law assumed); > 1 means the family reaches that loss with less compute.")


ISOFLOP_NOTE = ("Hoffmann et al. 2022's Approach 2 per family: runs within 5 % of one compute budget C = M·D with >= 3 sizes form "
                "an IsoFLOP profile; a parabola of the best validation loss in ln N (and ln M) gives its minimum; N_opt = k·C^a, "
                "M_opt = k·C^m and D_opt = C/M_opt = C^b/k are fitted in log-log, 95 % intervals from a bootstrap of runs within "
                "budgets. Approach 1: the lower envelope of the logged validation curves against cumulative FLOPs. The last row "
                "is Wan et al. 2026's published allocation (token MoE, their data): compare exponents, not coefficients.")


def build_report(table: pd.DataFrame, *, source: str, metric: str = "val_ppl_best", group_by: str = "routing",
                 n_boot: int = 100, curves: pd.DataFrame | None = None, reference: dict[str, Any] | None = None,
                 fit_params: str = "params_non_embedding") -> Report:
    """Fits and figures for ``table`` (see :mod:`sectional_moe.report.analysis` and ``figures``).
    ``curves`` (run, C, L) are the training curves of Approach 1; None re-reads them from the runs'
    directories or offline W&B files (:func:`analysis.training_curves`). ``reference`` selects the
    runs every configuration is compared with, paired by seed (default dense); ``fit_params`` is
    the parameter count N of the scaling-law and IsoFLOP fits."""
    if fit_params not in analysis.FIT_PARAMS:
        raise ValueError(f"--fit-params {fit_params!r}: use one of {', '.join(analysis.FIT_PARAMS)}")
    if reference is not None:
        replicates.check_reference(table, reference)
    reference = reference or {"family": "dense"}  # the default may find no dense run: then no paired table
    if metric not in table.columns:
        raise ValueError(f"--metric {metric!r} is not a column; choose one of: {', '.join(c for c in table.columns if table[c].dtype == float)}")
    if group_by not in table.columns:
        raise ValueError(f"--group-by {group_by!r} is not a column of the table")
    kappas = analysis.kappa_fits(table)
    law_fits = analysis.compute_law_fits(table, n_boot=n_boot)
    chinchilla = analysis.chinchilla_fits(table, params=fit_params)
    if curves is None:
        curves = analysis.training_curves(table)
    isoflops = analysis.isoflop_results(table, curves=curves, n_boot=n_boot, params=fit_params)
    figures = build_figures(table, metric=metric, group_by=group_by, kappas=kappas, law_fits=law_fits, isoflops=isoflops)
    return Report(table, source, metric, group_by, figures, kappas, law_fits, chinchilla, analysis.compute_leverage(table),
                  isoflop=isoflops, curves=curves, reference=reference)


# ============================================================================================
# Formatting
# ============================================================================================
_OVERRIDE_SPLIT = re.compile(r",(?![^\[\]]*\])")  # commas outside [...] lists


def compact(df: pd.DataFrame, keep: tuple[str, ...] = ("run",)) -> tuple[pd.DataFrame, list[str]]:
    """A table that fits a page: columns with one value in every row are dropped (except ``keep``)
    and so are the ``key=value`` parts of the run names that every row shares; both are returned
    as ``key=value`` strings to print once above the table. Tables of one row are left alone."""
    if len(df) < 2:
        return df, []
    shared: list[str] = []
    out = df.copy()
    if "run" in out.columns:
        parts = [_OVERRIDE_SPLIT.split(str(r)) if isinstance(r, str) else [] for r in out["run"]]
        common = set.intersection(*(set(p) for p in parts)) if all(parts) else set()
        if common:
            shared += [c for c in parts[0] if c in common]
            out["run"] = [",".join(p for p in ps if p not in common) or "(as shared)" for ps in parts]
    for col in list(out.columns):
        if col in keep:
            continue
        values = out[col].dropna()
        if values.empty:
            out = out.drop(columns=col)
        elif len(out[col]) == len(values) and values.map(lambda v: str(v)).nunique() == 1:
            shared.append(f"{_header(col)}={fmt(values.iloc[0], col)}")
            out = out.drop(columns=col)
    return out, shared


def shared_line(shared: list[str]) -> str:
    return f"Every run shares: {', '.join(shared)}." if shared else ""


def fmt(value: Any, col: str = "") -> str:
    """Human formatting: engineering notation for counts, 4 significant digits otherwise."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if col in ("params_total", "params_active", "params_flop_equivalent", "params_non_embedding", "tokens", "compute_flops", "flops_per_token"):
            for div, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
                if abs(v) >= div:
                    return f"{v / div:.3g}{suffix}"
            return f"{v:.3g}"
        if col == "mfu":
            return f"{100 * v:.2f}%"
        return f"{v:.4g}"
    return str(value)


def _header(col: str) -> str:
    return {"params_total": "N total", "params_active": "N active", "params_flop_equivalent": "N_a (FLOP-eq.)", "flops_per_token": "FLOPs/token", "compute_flops": "C (FLOPs)",
            "tokens": "D (tokens)", "val_ppl_best": "val ppl best", "val_ppl_final": "val ppl final", "test_ppl": "test ppl",
            "tokens_per_s": "tokens/s", "step_time_s": "step s", "mfu": "MFU", "peak_mem_gib": "peak mem GiB",
            "load_max_over_mean": "load max/mean"}.get(col, col)


def markdown_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "_(none)_"
    cols = list(df.columns)
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(esc(_header(c)) for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(esc(fmt(row[c], c)) for c in cols) + " |")
    return "\n".join(lines)


def html_table(df: pd.DataFrame, highlight: str | None = None) -> str:
    if df.empty:
        return "<p><em>(none)</em></p>"
    cols = list(df.columns)
    head = "".join(f"<th{' class=metric' if c == highlight else ''}>{html.escape(_header(c))}</th>" for c in cols)
    body = []
    for _, row in df.iterrows():
        cells = "".join(f"<td{' class=metric' if c == highlight else ''}>{html.escape(fmt(row[c], c))}</td>" for c in cols)
        body.append(f"<tr class='{html.escape(str(row.get('state', '')).replace(' ', '-'))}'>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# ============================================================================================
# Rendering
# ============================================================================================
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:12px;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}.metric{background:#fff6d5}
tr.failed td,tr.unfinished td,tr.not-started td{background:#fde8e8}figure{margin:1em 0 2em}
figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:13px;color:#444}.skip{color:#a33}
code{background:#f4f4f4;padding:1px 3px}
"""


def render_html(report: Report) -> str:
    """The self-contained page (every image inline as base64)."""
    r = report
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(r.title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{html.escape(r.title)}</h1>",
             f"<p>Source: <code>{html.escape(r.source)}</code> · {len(r.table)} runs "
             f"({(r.table['state'] == 'done').sum()} finished) · generated {r.created} · sorted by <b>{html.escape(label(r.metric))}</b> "
             f"· grouped by <b>{html.escape(r.group_by)}</b></p>",
             "<h2>Conventions</h2><ul>" + "".join(f"<li>{html.escape(c)}</li>" for c in CONVENTIONS) + "</ul>",
             f"<h2 id='comparison'>Comparison (finished runs, best {html.escape(r.metric)} first)</h2>",
             f"<p class='shared'>{html.escape(shared_line(r.compact_comparison()[1]))}</p>",
             html_table(r.compact_comparison()[0], highlight=r.metric),
             f"<h2 id='replicates'>Configurations (seeds pooled: {html.escape(r.metric)})</h2><p>{html.escape(REPLICATES_NOTE)}</p>",
             html_table(r.replicate_table(), highlight="mean"),
             f"<h2 id='paired'>Against {html.escape(analysis.group_label(r.reference, bare=()))} (paired by seed)</h2>"
             f"<p>{html.escape(PAIRED_NOTE)}</p>", html_table(r.paired_table(), highlight="verdict"),
             "<h2 id='not-finished'>Runs that did not finish</h2>", html_table(r.not_finished())]
    for f in r.figures:
        parts.append(f"<h2 id='{f.slug}'>{html.escape(f.title)}</h2>")
        if f.png is not None:
            b64 = base64.b64encode(f.png).decode()
            parts.append(f"<figure data-figure='{f.slug}'><img alt='{html.escape(f.title)}' src='data:image/png;base64,{b64}'>"
                         f"<figcaption>{html.escape(f.caption)}</figcaption></figure>")
        else:
            parts.append(f"<p class='skip' data-skipped='{f.slug}'>Skipped: {html.escape(f.skipped or '')}</p>")
        for note in f.notes:
            parts.append(f"<p class='skip'>{html.escape(note)}</p>")
    parts += ["<h2 id='fits'>Fits</h2><h3>κ (step cost vs E, sectional)</h3>", html_table(r.kappa_table()),
              "<h3>Scaling laws</h3>", html_table(r.fit_table()),
              f"<h3>Compute leverage over dense</h3><p>{html.escape(LEVERAGE_NOTE)}</p>", html_table(r.leverage_table()),
              f"<h3 id='isoflop-fits'>IsoFLOP allocation laws</h3><p>{html.escape(ISOFLOP_NOTE)}</p>", html_table(r.isoflop_table()),
              "</body></html>"]
    return "\n".join(parts)


def render_markdown(report: Report, figure_dir: str = "figures") -> str:
    r = report
    lines = [f"# {r.title}", "",
             f"Source: `{r.source}` · {len(r.table)} runs ({(r.table['state'] == 'done').sum()} finished) · generated {r.created} · "
             f"sorted by **{label(r.metric)}** · grouped by **{r.group_by}**", "", "## Conventions", ""]
    lines += [f"- {c}" for c in CONVENTIONS]
    table, shared = r.compact_comparison()
    lines += ["", f"## Comparison (finished runs, best {r.metric} first)", ""] + ([shared_line(shared), ""] if shared else [])
    lines += [markdown_table(table), "",
              f"## Configurations (seeds pooled: {r.metric})", "", REPLICATES_NOTE, "", markdown_table(r.replicate_table()), "",
              f"## Against {analysis.group_label(r.reference, bare=())} (paired by seed)", "", PAIRED_NOTE, "",
              markdown_table(r.paired_table()), "",
              "## Runs that did not finish", "", markdown_table(r.not_finished()), ""]
    for f in r.figures:
        lines += [f"## {f.title}", ""]
        if f.png is not None:
            lines += [f"![{f.title}]({figure_dir}/{f.slug}.png)", "", f"_{f.caption}_", ""]
        else:
            lines += [f"**Skipped:** {f.skipped}", ""]
        lines += [f"- {n}" for n in f.notes] + ([""] if f.notes else [])
    lines += ["## Fits", "", "### κ (step cost vs E, sectional)", "", markdown_table(r.kappa_table()), "",
              "### Scaling laws", "", markdown_table(r.fit_table()), "",
              "### Compute leverage over dense", "", LEVERAGE_NOTE, "", markdown_table(r.leverage_table()), "",
              "### IsoFLOP allocation laws", "", ISOFLOP_NOTE, "", markdown_table(r.isoflop_table()), ""]
    return "\n".join(lines)


def _json_default(x: Any) -> Any:
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return None if math.isnan(float(x)) else float(x)
    if x is pd.NA:
        return None
    return str(x)


def write_table(table: pd.DataFrame, out: Path) -> dict[str, Path]:
    """``runs.csv`` and ``runs.json`` (records; NaN -> null) of the tidy table."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "runs.csv", "json": out / "runs.json"}
    table.to_csv(paths["csv"], index=False)
    records = [{k: (None if (v is pd.NA or (isinstance(v, float) and math.isnan(v))) else v) for k, v in row.items()}
               for row in table.to_dict(orient="records")]
    paths["json"].write_text(json.dumps(records, indent=1, default=_json_default))
    return paths


def write_report(report: Report, out: Path) -> dict[str, Path]:
    """Write report.html, report.md, figures/*.png, runs.csv/json and fits.json into ``out``."""
    out = Path(out)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    paths = write_table(report.table, out)
    for f in report.figures:
        if f.png is not None:
            (fig_dir / f"{f.slug}.png").write_bytes(f.png)
    paths["html"] = out / "report.html"
    paths["html"].write_text(render_html(report))
    paths["md"] = out / "report.md"
    paths["md"].write_text(render_markdown(report))
    paths["fits"] = out / "fits.json"
    paths["fits"].write_text(json.dumps(_finite(report.fits_json()), indent=1, default=_json_default, allow_nan=False))
    if report.curves is not None:  # Approach 1's input, for `python -m sectional_moe.theory isoflop <out>`
        paths["curves"] = out / "curves.csv"
        report.curves.to_csv(paths["curves"], index=False)
    return paths


def _finite(x: Any) -> Any:
    """NaN and ±inf → None inside nested dicts and lists (fits.json is strict JSON)."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, (float, np.floating)) and not math.isfinite(float(x)):
        return None
    return x
