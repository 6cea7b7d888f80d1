"""The sweep's W&B comparison view as code: a saved *workspace* and a shareable *report*.

Two steps, so that everything but the final API call works offline and is tested:

1. :func:`build_view_spec` turns a built :class:`~sectional_moe.report.html.Report` into a plain,
   JSON-serialisable **view spec**: which runs (filters), how they are grouped and coloured, the
   runs-table columns, and the panels (the sections of a workspace, or the blocks of a report).
   Every key a view uses is written as ``{"section": config | summary | history | run, "name": ...}``
   and, when the logged keys of the sweep's runs are known (:class:`LoggedKeys`), a panel whose
   keys no run logged is left out and listed under ``omitted``.
2. :func:`to_workspace` / :func:`to_report` turn a spec into ``wandb_workspaces`` objects (the
   optional extra ``wandb-views``); :func:`publish` saves them, the only step that needs the
   network and an API key. Without them it says why in one line; the spec is written beforehand
   (:func:`write_spec`), so the view can be created later from the file
   (``python -m sectional_moe.report --wandb-workspace-from <file>``).

Identity: ``key = sha1("view|<kind>|<project>|<group>")[:16]``. A workspace is saved under the internal
view name ``nw-<key>-v`` and a report carries ``[sectional-moe view <key>]`` in its description;
:func:`publish` looks the view up by them first and updates it, so re-running never adds a second.

What a workspace shows (the ``train`` runs of the group, grouped by routing and family, then by
any setting that varies inside them, then by E, so the innermost groups are seed replicates that
the panels draw as mean and standard deviation; every run coloured by E): a pinned section with
the ``report-<group>`` run's figures and comparison table (that run is pinned, so the filter does
not hide it), and sections *Quality vs E*, *Cost vs E*, *Learning curves* and *Expert load*. A
report holds prose written from the findings, the comparison table, the same panels and the
report run's figures. :data:`~sectional_moe.report.wandb_dashboard.WORKSPACE_RECIPE` is the manual
fallback.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import os
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import pandas as pd

from sectional_moe.report import analysis, wandb_dashboard
from sectional_moe.report.wandb_dashboard import report_run_keys, summary_run_id
from sectional_moe.report.table import num

if TYPE_CHECKING:  # pragma: no cover - only for annotations
    from sectional_moe.report.html import Report
    from sectional_moe.report.table import RunRecord

SPEC_FORMAT = "sectional-moe/wandb-view"
SPEC_VERSION = 1
KINDS = ("workspace", "report")
#: file names of the written specs, next to report.html
SPEC_FILES = {"workspace": "wandb-workspace.json", "report": "wandb-report.json"}
INSTALL_HINT = "pip install -e '.[wandb-views]' (or pip install wandb-workspaces)"
DEFAULT_BASE_URL = "https://api.wandb.ai"
DEFAULT_GROUP_BY = ("routing_name", "family")
DEFAULT_COLOR_BY = "experts"
SECTIONS = ("config", "summary", "history", "run")
#: run attributes a view may use (W&B's backend names)
RUN_ATTRIBUTES = ("group", "jobType", "name", "displayName", "state", "createdAt", "tags")
GREY = "#8c8c8c"

#: tidy-table config column -> the flat config key a training run logs (``training.run.logged_config``)
CONFIG_KEYS = {
    "family": "family", "size": "size", "experts": "experts", "routing": "routing_name", "seed": "seed",
    "top_k": "spec.top_k", "seq_reduction": "seq_reduction_resolved", "seq_reduction_setting": "model.seq_reduction",
    "pre_expert": "model.pre_expert", "seq_pool": "model.seq_pool", "expert_attention": "model.expert_attention",
    "merge_proj": "model.merge_proj", "sectional_every": "model.sectional_every", "d_model": "spec.d_model",
    "n_layers": "spec.n_layers", "seq_len": "spec.seq_len", "vocab_size": "spec.vocab_size",
    "batch_tokens": "global_batch_tokens", "max_steps": "max_steps", "lr": "optim.lr",
}
#: tidy-table metric column -> the W&B summary key that holds it (``callbacks.wandb_summary``)
SUMMARY_KEYS = {
    "val_ppl_best": "summary/val_ppl_best", "val_loss_best": "summary/val_loss_best",
    "val_ppl_final": "summary/val_ppl_final", "val_loss_final": "summary/val_loss_final",
    "test_ppl": "summary/test_ppl", "test_loss": "summary/test_loss", "tokens_per_s": "summary/tokens_per_s",
    "step_time_s": "summary/step_time_s", "mfu": "summary/mfu", "tflops_per_s_per_device": "summary/tflops_per_s_per_device",
    "params_total": "summary/params_total", "params_active": "summary/params_active",
    "params_non_embedding": "summary/params_non_embedding", "flops_per_token": "summary/flops_per_token",
    "tokens": "summary/tokens", "compute_flops": "summary/flops", "load_max_over_mean": "moe/load_max_over_mean",
    "load_cv": "moe/load_cv", "dead_experts": "moe/dead_experts",
}
MEM_KEYS = {"cuda_reserved": "summary/mem_max_reserved_gib", "cpu_peak_rss": "summary/mem_peak_rss_gib"}
#: the runs-table columns a comparison needs, in order (missing keys are dropped when keys are known)
TABLE_KEYS: tuple[tuple[str, str], ...] = (
    ("config", "family"), ("config", "size"), ("config", "experts"), ("config", "routing_name"),
    ("config", "seq_reduction_resolved"), ("config", "model.seq_reduction"), ("config", "model.sectional_every"),
    ("config", "model.pre_expert"), ("config", "model.expert_attention"), ("config", "model.merge_proj"),
    ("config", "seed"), ("config", "params/total"), ("config", "params/active"), ("config", "flops/per_token"),
    ("summary", "summary/val_ppl_best"), ("summary", "summary/test_ppl"), ("summary", "summary/tokens_per_s"),
    ("summary", "summary/step_time_s"), ("summary", "summary/mfu"), ("summary", "summary/mem_peak_rss_gib"),
    ("summary", "summary/mem_max_reserved_gib"), ("summary", "moe/load_max_over_mean"), ("run", "state"),
)


# ============================================================================================
# Keys
# ============================================================================================
def key(section: str, name: str) -> dict[str, str]:
    """A key of the spec: ``section`` is config | summary | history | run (W&B backend names)."""
    if section not in SECTIONS:
        raise ValueError(f"key section {section!r}: use one of {', '.join(SECTIONS)}")
    return {"section": section, "name": name}


def column_accessor(k: Mapping[str, str]) -> str:
    """The W&B runs-table column of a key: ``config:<key>.value`` (flat keys, dotted ones too),
    ``summary:<key>``, ``run:<attribute>``."""
    section, name = k["section"], k["name"]
    if section == "config":
        return f"config:{name}.value"
    if section in ("summary", "history"):  # a history key's column is its last value, i.e. the summary
        return f"summary:{name}"
    return f"run:{name}"


@dataclass
class LoggedKeys:
    """The keys the sweep's runs logged: flat config keys, history keys and summary keys.

    ``summary`` stays None while no source could tell it (run directories hold no W&B summary):
    panels are then not checked against it.
    """

    config: set[str] = field(default_factory=set)
    history: set[str] = field(default_factory=set)
    summary: set[str] | None = None
    runs: int = 0  # records added (a run read from its directory and its W&B file counts twice)
    origin: list[str] = field(default_factory=list)

    def add(self, config: Mapping[str, Any], history: Iterable[Mapping[str, Any]] = (),
            summary: Mapping[str, Any] | None = None) -> None:
        """Add one run's flat config, history rows and (if known) summary."""
        self.runs += 1
        self.config.update(config)
        for row in history:
            self.history.update(row)
        if summary is not None:
            self.summary = (self.summary or set()) | set(summary)

    def add_record(self, record: RunRecord) -> None:
        """Add a collected :class:`~sectional_moe.report.table.RunRecord` (its summary only from a W&B source)."""
        self.add(record.config, record.history, record.final if record.source != "runs" else None)
        if record.source not in self.origin:
            self.origin.append(record.source)

    def has(self, k: Mapping[str, str]) -> bool | None:
        """True/False if the key was (not) logged; None when the source cannot tell."""
        section, name = k["section"], k["name"]
        if self.runs == 0:
            return None
        if section == "config":
            return name in self.config
        if section == "history":
            return name in self.history
        if section == "summary":
            if self.summary is None:
                return None
            return name in self.summary
        return name in RUN_ATTRIBUTES


# ============================================================================================
# Identity, names and colours
# ============================================================================================
def view_key(kind: str, project: str, group: str) -> str:
    """The 16-hex identity of a view: the same kind, project and group give the same view."""
    if kind not in KINDS:
        raise ValueError(f"view kind {kind!r}: use one of {', '.join(KINDS)}")
    return hashlib.sha1(f"view|{kind}|{project}|{group}".encode()).hexdigest()[:16]


def workspace_internal_name(key_hex: str) -> str:
    """W&B's internal view name of a saved workspace (``nw-<id>-v``; the id must not contain ``-v``)."""
    return f"nw-{key_hex}-v"


def description_tag(key_hex: str) -> str:
    """The marker a report's description carries so that a re-run finds and updates it."""
    return f"[sectional-moe view {key_hex}]"


def safe_title(text: str, limit: int = 128) -> str:
    """A display name W&B accepts: no symbol characters (its validator rejects ``=``, ``+``, ...)."""
    out = "".join("_" if unicodedata.category(c).startswith(("So", "Sk", "Sm", "Sc", "Cs")) else c for c in text)
    return out[:limit]


def _sort_value(v: Any) -> tuple[int, float, str]:
    x = num(v)
    return (0, x, "") if x is not None else (1, 0.0, str(v))


def palette(values: Iterable[Any]) -> dict[str, str]:
    """A colour per distinct value (as text), light to dark in value order; missing values are grey.

    The hue turns from amber to indigo while the lightness falls, so neighbouring E stay apart
    and the order reads at a glance.
    """
    distinct = sorted({_label(v) for v in values if _label(v) != "none"}, key=lambda s: _sort_value(s))
    out: dict[str, str] = {"none": GREY}
    n = len(distinct)
    for i, value in enumerate(distinct):
        t = i / (n - 1) if n > 1 else 0.5
        r, g, b = colorsys.hls_to_rgb((0.11 + 0.6 * t) % 1.0, 0.62 - 0.34 * t, 0.75)
        out[value] = f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"
    return out


def _label(v: Any) -> str:
    return analysis.label_value(v)


# ============================================================================================
# The spec
# ============================================================================================
@dataclass
class ViewOptions:
    """Knobs of a view (the ``--wandb-*`` options of ``python -m sectional_moe.report``).

    Attributes:
        project: W&B project of the runs (and of the view).
        entity: W&B entity; None: the API key's default entity, resolved when the view is saved.
        group: the sweep's W&B group; None: the most common group of the table.
        group_by: config keys the runs are grouped by first; every setting that varies inside
            those groups (except seed and E) and then ``color_by`` are appended, so that the
            innermost groups are seed replicates.
        color_by: config key the runs are coloured by (default E).
        report_rows: rows of the comparison table written into a report.
        pin_report_run: pin the ``report-<group>`` run so its media show despite the train filter.
        job_type: the runs' W&B job type the view keeps.
    """

    project: str = "sectional-moe"
    entity: str | None = None
    group: str | None = None
    group_by: Sequence[str] = DEFAULT_GROUP_BY
    color_by: str = DEFAULT_COLOR_BY
    report_rows: int = 25
    pin_report_run: bool = True
    job_type: str = "train"


def sweep_group(table: pd.DataFrame, group: str | None = None) -> str:
    """The group a view is about: ``group`` if given, else the most common group of the table."""
    if group:
        return group
    groups = table["group"].dropna() if "group" in table else pd.Series(dtype=object)
    if not len(groups):
        raise ValueError("--wandb-group: the runs have no W&B group (logged without one); pass --wandb-group NAME")
    return str(groups.mode().iloc[0])


def _panel(kind: str, title: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "title": title, **fields}


def panel_keys(panel: Mapping[str, Any]) -> list[dict[str, str]]:
    """Every key a panel spec reads."""
    out: list[dict[str, str]] = []
    for name in ("x", "y"):
        v = panel.get(name)
        if isinstance(v, Mapping):
            out.append(dict(v))
        elif isinstance(v, list):
            out.extend(dict(k) for k in v)
    for name in ("metrics", "keys"):
        out.extend(dict(k) for k in panel.get(name, []))
    if panel.get("table"):
        out.append(dict(panel["table"]))
    return out


def _train_sections(table: pd.DataFrame, metric: str, n_runs: int) -> list[dict[str, Any]]:
    """The panels about the train runs, as sections (a report lays them out in one grid)."""
    E = key("config", "experts")
    tokens, flops = key("history", "perf/tokens"), key("history", "perf/flops")
    metric_key = key("summary", SUMMARY_KEYS.get(metric, "summary/val_ppl_best"))
    quality = [
        _panel("scatter", "best val ppl vs E (every run)", x=E, y=key("summary", "summary/val_ppl_best"), log_x=True, log_y=True),
        _panel("bar", "best val ppl per group (mean ± std over seeds)", metrics=[key("summary", "summary/val_ppl_best")],
               agg="mean", range="stddev"),
        _panel("scatter", "test ppl vs E", x=E, y=key("summary", "summary/test_ppl"), log_x=True, log_y=True),
    ]
    if metric_key["name"] not in ("summary/val_ppl_best", "summary/test_ppl"):
        quality.append(_panel("scatter", f"{metric} vs E", x=E, y=metric_key, log_x=True))
    kinds = set(table["mem_kind"].dropna()) if "mem_kind" in table else set()
    mem = [MEM_KEYS[k] for k in ("cuda_reserved", "cpu_peak_rss") if k in kinds] or [MEM_KEYS["cpu_peak_rss"], MEM_KEYS["cuda_reserved"]]
    cost = [_panel("scatter", "tokens/s vs E (steady state)", x=E, y=key("summary", "summary/tokens_per_s"), log_x=True)]
    cost += [_panel("scatter", f"peak memory vs E ({m.split('mem_', 1)[1]})", x=E, y=key("summary", m), log_x=True) for m in mem]
    cost += [
        _panel("scatter", "step time vs E (steady state)", x=E, y=key("summary", "summary/step_time_s"), log_x=True),
        _panel("scatter", "MFU vs E", x=E, y=key("summary", "summary/mfu"), log_x=True),
        _panel("bar", "tokens/s per group (mean ± std over seeds)", metrics=[key("summary", "summary/tokens_per_s")],
               agg="mean", range="stddev"),
    ]
    curves = [
        _panel("line", "val loss vs tokens", x=tokens, y=[key("history", "val/loss")], agg="mean", range="stddev", log_x=True),
        _panel("line", "val loss vs training FLOPs", x=flops, y=[key("history", "val/loss")], agg="mean", range="stddev", log_x=True),
        _panel("line", "train loss vs tokens", x=tokens, y=[key("history", "train/loss")], agg="mean", range="stddev", log_x=True),
        _panel("line", "tokens/s vs tokens", x=tokens, y=[key("history", "perf/tokens_per_s")], agg="mean", range="stddev"),
    ]
    load = [
        _panel("scatter", "expert load max/mean vs E (last window)", x=E, y=key("summary", "moe/load_max_over_mean"), log_x=True),
        _panel("line", "expert load max/mean vs tokens", x=tokens, y=[key("history", "moe/load_max_over_mean")], agg="mean", range="stddev"),
        _panel("line", "expert load CV vs tokens", x=tokens, y=[key("history", "moe/load_cv")], agg="mean", range="stddev"),
        _panel("line", "dead experts vs tokens", x=tokens, y=[key("history", "moe/dead_experts")], agg="mean", range="stddev"),
    ]
    for panels in (quality, cost, curves, load):
        for p in panels:
            if p["type"] == "line":
                p["max_runs"] = max(10, n_runs)
    return [
        {"name": "Quality vs E", "runset": "train", "pinned": False, "panels": quality},
        {"name": "Cost vs E", "runset": "train", "pinned": False, "panels": cost},
        {"name": "Learning curves", "runset": "train", "pinned": False, "panels": curves},
        {"name": "Expert load", "runset": "train", "pinned": False, "panels": load},
    ]


def _report_run_section(report: Report, group: str) -> dict[str, Any]:
    logged = report_run_keys(report)
    panels: list[dict[str, Any]] = []
    if logged["images"]:
        panels.append(_panel("media", "report figures", keys=[key("history", k) for k in logged["images"]],
                             columns=min(3, len(logged["images"]))))
    panels.append(_panel("table", "comparison (best first)", table=key("history", "comparison")))
    return {"name": f"Sweep report (report-{group})", "runset": "report", "pinned": True, "panels": panels}


def _filter_by_keys(sections: list[dict[str, Any]], keys: LoggedKeys | None, scope_keys: Mapping[str, set[str]]) -> list[dict[str, Any]]:
    """Drop panels whose keys were not logged; returns the omitted ones as ``{panel, section, missing}``."""
    omitted = []
    for section in sections:
        kept = []
        for p in section["panels"]:
            if section["runset"] == "report":
                missing = [k["name"] for k in panel_keys(p) if k["name"] not in scope_keys["report"]]
            elif keys is None:
                missing = []
            else:
                missing = [k["name"] for k in panel_keys(p) if keys.has(k) is False]
            if missing:
                omitted.append({"panel": p["title"], "section": section["name"], "missing": missing})
            else:
                kept.append(p)
        section["panels"] = kept
    return omitted


def _group_by_keys(table: pd.DataFrame, options: ViewOptions, keys: LoggedKeys | None) -> tuple[list[str], list[str]]:
    """The runset's grouping keys and notes (settings that vary but have no logged key)."""
    notes: list[str] = []
    group_by = [k.strip() for k in options.group_by if k and k.strip()]
    if keys is not None and keys.runs:
        unknown = [k for k in group_by + [options.color_by] if k not in keys.config]
        if unknown:
            raise ValueError(f"--wandb-view-group-by/--wandb-view-color-by: {', '.join(unknown)} not a logged config key; "
                             f"use keys such as {', '.join(sorted(k for k in keys.config if k in CONFIG_KEYS.values())[:8])}")
    done = analysis.finished(table)
    for col in analysis.varying_config_columns(done) if len(done) else []:
        name = CONFIG_KEYS.get(col)
        if name is None or (keys is not None and keys.runs and name not in keys.config):
            notes.append(f"the setting {col} varies but has no logged config key: its runs share groups")
            continue
        if name not in group_by:
            group_by.append(name)
    if options.color_by not in group_by:
        group_by.append(options.color_by)
    return group_by, notes


def _runsets(table: pd.DataFrame, options: ViewOptions, group: str, metric: str, keys: LoggedKeys | None,
             report_run: str, group_by: list[str]) -> dict[str, Any]:
    colour_col = next((c for c, k in CONFIG_KEYS.items() if k == options.color_by), None)
    runs = table[table["group"] == group] if "group" in table else table
    colours = palette(runs[colour_col]) if colour_col in runs else {"none": GREY}
    run_colors = {}
    if colour_col in runs:
        for rid, value in sorted(zip(runs["run_id"], runs[colour_col]), key=lambda t: str(t[0])):
            if isinstance(rid, str) and rid:
                run_colors[rid] = colours[_label(value)]
    group_colors = []
    value_cols = [next((c for c, k in CONFIG_KEYS.items() if k == g), None) for g in group_by]
    if all(c is not None and c in runs for c in value_cols) and len(runs):
        paths = runs[value_cols].astype(object).where(runs[value_cols].notna(), None).drop_duplicates()
        for row in sorted(paths.itertuples(index=False), key=lambda r: [str(v) for v in r]):
            path = [_label(v) for v in row]
            group_colors.append({"path": path, "color": colours.get(path[-1], GREY)})
    columns = [key(s, n) for s, n in TABLE_KEYS]
    if keys is not None and keys.runs:
        columns = [c for c in columns if keys.has(c) is not False]
    if metric not in SUMMARY_KEYS:  # a column W&B holds no summary of: sort by best val ppl
        metric = "val_ppl_best"
    sort_key = SUMMARY_KEYS[metric]
    train = {
        "name": f"{group} ({options.job_type} runs)",
        "filters": [{"key": key("run", "group"), "op": "=", "value": group},
                    {"key": key("run", "jobType"), "op": "=", "value": options.job_type}],
        "groupby": [key("config", g) for g in group_by],
        "color_by": key("config", options.color_by),
        "run_colors": run_colors,
        "group_colors": group_colors,
        "columns": columns,
        "order": [{"key": key("summary", sort_key), "ascending": analysis.ascending(metric)}],
        "pinned_runs": [report_run] if options.pin_report_run else [],
    }
    report = {
        "name": f"report-{group}",
        "filters": [{"key": key("run", "name"), "op": "=", "value": report_run}],
        "groupby": [], "run_colors": {}, "group_colors": [], "columns": [], "order": [], "pinned_runs": [],
    }
    return {"train": train, "report": report}


def _fmt(x: Any, digits: int = 4) -> str:
    v = num(x)
    return "n/a" if v is None else f"{v:.{digits}g}"


def findings_markdown(report: Report, group: str) -> str:
    """Prose for a W&B report, written from the report's table, fits and figures."""
    t = report.table
    done = analysis.finished(t)
    metric = report.metric
    lines = [f"Sweep **{group}**: {len(t)} runs, {len(done)} finished"
             + (f", {len(t) - len(done)} did not finish ({', '.join(f'{v} {k}' for k, v in t.loc[t['state'] != 'done', 'state'].value_counts().items())})"
                if len(t) > len(done) else "") + f". Source: `{report.source}`."]
    ranked = done[done[metric].notna()] if metric in done else done.iloc[0:0]
    if len(ranked):
        best = ranked.sort_values(metric, ascending=analysis.ascending(metric), kind="stable").iloc[0]
        lines.append(f"Best {metric}: **{_fmt(best[metric])}** by `{best['run']}` ({best['family']}, routing {_label(best['routing'])}, "
                     f"E = {_label(best['experts'])}, seed {_label(best['seed'])}).")
        per_cell = []
        varying = analysis.varying_config_columns(ranked)  # settings that split a family and routing, as in the figures
        for cell_key, cell in ranked.groupby(["family", "routing", *varying], dropna=False, sort=True):
            family, routing, *settings = cell_key
            named = "".join(f", {col} {_label(v)}" for col, v in zip(varying, settings) if _label(v) != "none")
            stats = cell.groupby(cell["experts"].astype(object).where(cell["experts"].notna(), None), dropna=False)[metric].agg(["mean", "std", "count"])
            stats = stats.sort_values("mean", ascending=analysis.ascending(metric), kind="stable")
            e, row = stats.index[0], stats.iloc[0]
            spread = f" ± {_fmt(row['std'], 3)}" if row["count"] > 1 and num(row["std"]) is not None else ""
            where = "" if family == "dense" else f" at E = {_label(e)}"
            per_cell.append(f"- {family}, routing {_label(routing)}{named}: best mean {metric} {_fmt(row['mean'])}{spread}"
                            f" ({int(row['count'])} seed{'s' if row['count'] > 1 else ''}){where}")
        lines += ["", "Per family, routing and setting (mean over seeds at the best E):", "", *per_cell]
    baselines = [f"{name} {_fmt(done[col].dropna().iloc[0])}" for col, name in (("unigram_val_ppl", "unigram"), ("bigram_val_ppl", "bigram"))
                 if col in done and done[col].notna().any()]
    if baselines:
        lines += ["", f"Count baselines on the validation split: {', '.join(baselines)} (val ppl)."]
    kappa = [f"{k.label}: κ = {_fmt(k.fit.kappa, 3)}" for k in report.kappas if getattr(k, "fit", None) is not None]
    if kappa:
        lines += ["", "Step cost vs E (κ fits): " + "; ".join(kappa) + "."]
    skipped = [f"{f.title} ({f.skipped})" for f in report.figures if f.png is None and f.skipped]
    if skipped:
        lines += ["", "Figures not drawn: " + "; ".join(skipped) + "."]
    return "\n".join(lines)


def _comparison_markdown(report: Report, rows: int) -> str:
    from sectional_moe.report.html import markdown_table

    cmp = report.comparison()
    text = markdown_table(cmp.head(rows))
    if len(cmp) > rows:
        text += f"\n\n_{len(cmp) - rows} more runs in the `comparison` table of the report run (--wandb-report-rows)._"
    return text


def build_view_spec(kind: str, report: Report, options: ViewOptions | None = None, *,
                    keys: LoggedKeys | None = None) -> dict[str, Any]:
    """The JSON-serialisable spec of the sweep's workspace (``kind="workspace"``) or report.

    Args:
        kind: ``workspace`` or ``report``.
        report: the built report (its table, metric, figures and fits).
        options: project, entity, group and the grouping/colour knobs (:class:`ViewOptions`).
        keys: the keys the sweep's runs logged; panels reading a key no run logged are left out
            (listed under ``omitted``). None: nothing is checked.

    Raises:
        ValueError: unknown kind, a table without a W&B group, or an unknown grouping key
            (one line naming the ``--wandb-*`` option to fix).
    """
    options = options or ViewOptions()
    if kind not in KINDS:
        raise ValueError(f"view kind {kind!r}: use one of {', '.join(KINDS)}")
    table = report.table
    group = sweep_group(table, options.group)
    key_hex = view_key(kind, options.project, group)
    report_run = summary_run_id(options.project, group)
    group_by, notes = _group_by_keys(table, options, keys)
    n_runs = int((table["group"] == group).sum()) if "group" in table else len(table)
    sections = [_report_run_section(report, group), *_train_sections(table, report.metric, n_runs)]
    logged_report = report_run_keys(report)
    omitted = _filter_by_keys(sections, keys, {"report": set(logged_report["images"]) | set(logged_report["tables"])})
    sections = [s for s in sections if s["panels"]]
    spec: dict[str, Any] = {
        "format": SPEC_FORMAT,
        "version": SPEC_VERSION,
        "kind": kind,
        "key": key_hex,
        "entity": options.entity,
        "project": options.project,
        "group": group,
        "report_run": {"id": report_run, "name": f"report-{group}"},
        "source": report.source,
        "metric": report.metric,
        "runsets": _runsets(table, options, group, report.metric, keys, report_run, group_by),
        "keys_checked": {
            "records": keys.runs if keys is not None else 0,
            "from": list(keys.origin) if keys is not None else [],
            "config": bool(keys is not None and keys.runs),
            "history": bool(keys is not None and keys.runs),
            "summary": bool(keys is not None and keys.runs and keys.summary is not None),
        },
        "omitted": omitted,
        "notes": notes,
    }
    if kind == "workspace":
        spec["name"] = safe_title(f"{group} - sweep comparison")
        spec["internal_name"] = workspace_internal_name(key_hex)
        spec["settings"] = {"x_axis": "perf/tokens", "max_runs": max(10, n_runs)}
        spec["sections"] = sections
    else:
        spec["name"] = safe_title(f"Sweep {group}: {report.metric} and cost vs E")
        spec["description"] = (f"{len(table)} runs of group {group} compared by python -m sectional_moe.report. "
                               f"{description_tag(key_hex)}")
        blocks: list[dict[str, Any]] = [
            {"type": "markdown", "text": findings_markdown(report, group)},
            {"type": "heading", "level": 2, "text": f"Comparison (finished runs, best {report.metric} first)"},
            {"type": "markdown", "text": _comparison_markdown(report, options.report_rows)},
        ]
        for s in sections:
            blocks.append({"type": "heading", "level": 2, "text": s["name"]})
            blocks.append({"type": "panel_grid", "runset": s["runset"], "panels": s["panels"]})
        captions = [f"- **{f.title}**: {f.caption}" for f in report.figures if f.png is not None and f.caption]
        if captions:
            blocks += [{"type": "heading", "level": 3, "text": "Figure captions"}, {"type": "markdown", "text": "\n".join(captions)}]
        spec["blocks"] = blocks
    json.dumps(spec)  # plain data only
    return spec


def view_sections(spec: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The sections (workspace) or panel grids (report) of a spec, each with ``runset`` and ``panels``."""
    if spec["kind"] == "workspace":
        return list(spec["sections"])
    return [b for b in spec["blocks"] if b["type"] == "panel_grid"]


def view_keys(spec: Mapping[str, Any]) -> list[tuple[str, dict[str, str]]]:
    """Every ``(runset, key)`` a spec reads: panel keys, grouping keys, columns, filters and order."""
    out: list[tuple[str, dict[str, str]]] = []
    for section in view_sections(spec):
        out += [(section["runset"], k) for p in section["panels"] for k in panel_keys(p)]
    for name, rs in spec["runsets"].items():
        out += [(name, dict(k)) for k in rs["groupby"] + rs["columns"]]
        out += [(name, dict(f["key"])) for f in rs["filters"]]
        out += [(name, dict(o["key"])) for o in rs["order"]]
    return out


def validate_spec(spec: Any, source: str = "the spec") -> dict[str, Any]:
    """Check a spec read from a file; raises ValueError with one line saying what is wrong."""
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
        raise ValueError(f"{source} is not a view spec written by python -m sectional_moe.report (format {SPEC_FORMAT!r})")
    if spec.get("version") != SPEC_VERSION:
        raise ValueError(f"{source} has spec version {spec.get('version')!r}; this code reads version {SPEC_VERSION}: "
                         "re-run python -m sectional_moe.report SOURCE --wandb-workspace")
    if spec.get("kind") not in KINDS:
        raise ValueError(f"{source}: kind {spec.get('kind')!r} is not one of {', '.join(KINDS)}")
    missing = [k for k in ("project", "group", "key", "name", "runsets") if not spec.get(k)]
    missing += [k for k in (("sections",) if spec["kind"] == "workspace" else ("blocks",)) if k not in spec]
    if missing:
        raise ValueError(f"{source} lacks {', '.join(missing)}")
    for _, k in view_keys(spec):
        if k.get("section") not in SECTIONS or not k.get("name"):
            raise ValueError(f"{source}: malformed key {k!r} (section one of {', '.join(SECTIONS)}, and a name)")
    return spec


def write_spec(spec: Mapping[str, Any], out: Path) -> Path:
    """Write the spec as ``<out>/wandb-workspace.json`` or ``wandb-report.json``; returns the path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / SPEC_FILES[spec["kind"]]
    path.write_text(json.dumps(spec, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_spec(path: Path) -> dict[str, Any]:
    """Read and validate a spec file (ValueError/FileNotFoundError with one line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--wandb-workspace-from {path}: no such file (it is written next to report.html as "
                                f"{' or '.join(SPEC_FILES.values())})")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"--wandb-workspace-from {path}: not JSON ({err})") from err
    return validate_spec(spec, f"--wandb-workspace-from {path}")


# ============================================================================================
# Conversion to wandb_workspaces objects (the optional extra)
# ============================================================================================
def workspaces_available() -> bool:
    """True if the optional ``wandb_workspaces`` package (the ``wandb-views`` extra) can be imported."""
    return wandb_dashboard.workspaces_available()


def _config_name(name: str) -> str:
    """A flat config key as W&B addresses it: a dotted one needs its ``.value`` at the end."""
    return f"{name}.value" if "." in name else name


def _filter_expr(runset: Mapping[str, Any]) -> Any:
    from wandb_workspaces import expr

    sections = {"run": expr.Metric, "config": expr.Config, "summary": expr.Summary}
    items = []
    for f in runset["filters"]:
        k, op, value = f["key"], f["op"], f["value"]
        if k["section"] not in sections:
            raise ValueError(f"filter on {k!r}: only run, config and summary keys can filter runs")
        name = expr.to_frontend_name(k["name"]) if k["section"] == "run" else k["name"]
        metric = sections[k["section"]](name)
        ops = {"=": metric.__eq__, "!=": metric.__ne__, "<=": metric.__le__, ">=": metric.__ge__,
               "in": metric.isin, "not in": metric.notin}
        if op not in ops:
            raise ValueError(f"filter op {op!r}: use one of {', '.join(ops)}")
        items.append(ops[op](value))
    return expr.And(*items) if items else ""


def _panel_object(p: Mapping[str, Any]) -> Any:
    import wandb_workspaces.reports.v2 as wr

    def axis(k: Mapping[str, str]) -> Any:  # scatter axes: config or summary
        if k["section"] == "config":
            if "." in k["name"]:
                raise ValueError(f"panel {p['title']!r}: a scatter axis takes a top-level config key, not {k['name']!r}")
            return wr.Config(k["name"])
        if k["section"] in ("summary", "history"):
            return wr.SummaryMetric(k["name"])
        return wr.Metric(k["name"])

    kind = p["type"]
    if kind == "scatter":
        return wr.ScatterPlot(title=p["title"], x=axis(p["x"]), y=axis(p["y"]), log_x=p.get("log_x"), log_y=p.get("log_y"))
    if kind == "bar":
        return wr.BarPlot(title=p["title"], metrics=[k["name"] for k in p["metrics"]], orientation="v",
                          groupby_aggfunc=p.get("agg"), groupby_rangefunc=p.get("range"))
    if kind == "line":
        return wr.LinePlot(title=p["title"], x=p["x"]["name"], y=[k["name"] for k in p["y"]], log_x=p.get("log_x"),
                           groupby_aggfunc=p.get("agg"), groupby_rangefunc=p.get("range"), max_runs_to_show=p.get("max_runs"),
                           smoothing_type="none")
    if kind == "media":
        return wr.MediaBrowser(title=p["title"], media_keys=[k["name"] for k in p["keys"]], num_columns=p.get("columns"))
    if kind == "table":
        return wr.WeavePanelSummaryTable(table_name=p["table"]["name"], layout=wr.Layout(w=24, h=12))
    if kind == "markdown":
        return wr.MarkdownPanel(markdown=p["text"])
    raise ValueError(f"panel type {kind!r} is not one of scatter, bar, line, media, table, markdown")


def to_workspace(spec: Mapping[str, Any], *, entity: str | None = None) -> Any:
    """The spec as a ``wandb_workspaces.workspaces.Workspace`` (no network; ``entity`` overrides the spec's)."""
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces import expr

    if spec["kind"] != "workspace":
        raise ValueError(f"to_workspace: the spec is a {spec['kind']}")
    entity = entity or spec.get("entity")
    if not entity:
        raise ValueError("--wandb-entity: a workspace needs an entity (pass --wandb-entity, or log in so W&B knows your default)")
    rs = spec["runsets"]["train"]
    groupby = [expr.Config(_config_name(k["name"])) for k in rs["groupby"]]
    order = [expr.Ordering(expr.Summary(o["key"]["name"]) if o["key"]["section"] == "summary" else expr.Config(_config_name(o["key"]["name"])),
                           ascending=bool(o["ascending"])) for o in rs["order"]]
    group_colors = {ws.GroupPath(*g["path"]): g["color"] for g in rs["group_colors"] if len(g["path"]) == len(groupby)}
    runset = ws.RunsetSettings(
        filters=_filter_expr(rs),
        groupby=groupby,
        order=order,
        run_settings={rid: ws.RunSettings(color=c) for rid, c in rs["run_colors"].items()},
        group_colors=group_colors,
        pinned_columns=[column_accessor(c) for c in rs["columns"]],
        pinned_runs=list(rs["pinned_runs"]),
    )
    sections = [ws.Section(name=s["name"], panels=[_panel_object(p) for p in s["panels"]], is_open=True, pinned=bool(s.get("pinned")))
                for s in spec["sections"]]
    settings = ws.WorkspaceSettings(x_axis=spec["settings"]["x_axis"], max_runs=int(spec["settings"]["max_runs"]))
    return ws.Workspace(entity=entity, project=spec["project"], name=spec["name"], sections=sections, settings=settings,
                        runset_settings=runset)


def _report_runset(spec: Mapping[str, Any], name: str, entity: str) -> Any:
    import wandb_workspaces.reports.v2 as wr

    rs = spec["runsets"][name]
    groupby = [f"config.{_config_name(k['name'])}" for k in rs["groupby"]]
    order = [wr.OrderBy(wr.SummaryMetric(o["key"]["name"]) if o["key"]["section"] == "summary" else wr.Config(o["key"]["name"]),
                        ascending=bool(o["ascending"])) for o in rs["order"]]
    kw: dict[str, Any] = {"order": order} if order else {}
    return wr.Runset(entity=entity, project=spec["project"], name=rs["name"], filters=_filter_expr(rs), groupby=groupby,
                     run_settings={rid: wr.RunSettings(color=c) for rid, c in rs["run_colors"].items()},
                     pinned_columns=[column_accessor(c) for c in rs["columns"]], **kw)


def to_report(spec: Mapping[str, Any], *, entity: str | None = None) -> Any:
    """The spec as a ``wandb_workspaces.reports.v2.Report`` (building it needs no network;
    its ``_to_model``/``save`` look the project up online)."""
    import wandb_workspaces.reports.v2 as wr

    if spec["kind"] != "report":
        raise ValueError(f"to_report: the spec is a {spec['kind']}")
    entity = entity or spec.get("entity")
    if not entity:
        raise ValueError("--wandb-entity: a report needs an entity (pass --wandb-entity, or log in so W&B knows your default)")
    headings = {1: wr.H1, 2: wr.H2, 3: wr.H3}
    blocks: list[Any] = []
    for b in spec["blocks"]:
        if b["type"] == "markdown":
            blocks.append(wr.MarkdownBlock(text=b["text"]))
        elif b["type"] == "heading":
            blocks.append(headings[int(b["level"])](text=b["text"]))
        elif b["type"] == "panel_grid":
            blocks.append(wr.PanelGrid(runsets=[_report_runset(spec, b["runset"], entity)],
                                       panels=[_panel_object(p) for p in b["panels"]]))
        else:
            raise ValueError(f"report block type {b['type']!r} is not one of markdown, heading, panel_grid")
    return wr.Report(project=spec["project"], entity=entity, title=spec["name"], description=spec["description"],
                     blocks=blocks, width="fluid")


# ============================================================================================
# Publishing (the only step that needs the network)
# ============================================================================================
@dataclass
class PublishResult:
    """What :func:`publish` did, in one ``message`` line.

    ``status``: ``created`` / ``updated`` (the view is in W&B now, at ``url``), ``deferred`` (not
    possible here: no package, offline, no key, no network; the spec file is kept for later) or
    ``failed`` (W&B answered with an error).
    """

    status: str
    message: str
    url: str | None = None

    @property
    def saved(self) -> bool:
        return self.status in ("created", "updated")


def base_url() -> str:
    """The W&B server's URL (``WANDB_BASE_URL``, default the public cloud)."""
    return os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL).rstrip("/")


def api_key_configured() -> bool:
    """True if W&B has an API key: ``WANDB_API_KEY``, or a netrc entry for the W&B host."""
    from sectional_moe.tracking.wandb_ids import wandb_api_key_configured

    if wandb_api_key_configured():
        return True
    host = urllib.parse.urlparse(base_url()).hostname or ""
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return bool(host) and host in netrc.read_text()
    except OSError:
        return False


def offline_reason(mode: str | None) -> str | None:
    """Why no view can be saved now (``--wandb`` mode, ``WANDB_MODE``, no API key), or None."""
    if mode in ("offline", "disabled"):
        return f"--wandb {mode} asks for no network"
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode != "online" and env in ("offline", "dryrun", "disabled"):
        return f"WANDB_MODE={env} asks for no network"
    if not api_key_configured():
        return "no W&B API key (run `wandb login` or set WANDB_API_KEY)"
    return None


def server_reachable(timeout_s: float) -> str | None:
    """None if the W&B server answers within ``timeout_s`` (any HTTP status), else why not."""
    try:
        urllib.request.urlopen(base_url(), timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        return f"the W&B server {base_url()} is not reachable within {timeout_s:g} s ({reason})"
    return None


def check_objects(spec: Mapping[str, Any]) -> Any:
    """Build the spec's library objects offline (a workspace down to its wire model); raises if invalid."""
    entity = spec.get("entity") or "entity"
    if spec["kind"] == "workspace":
        obj = to_workspace(spec, entity=entity)
        obj._to_model()
        return obj
    return to_report(spec, entity=entity)  # its wire model needs the project's id, i.e. the network


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _default_entity() -> str:
    import wandb

    return str(wandb.Api().default_entity)


def _save_workspace(spec: Mapping[str, Any], entity: str) -> tuple[str, bool]:
    from wandb_workspaces.workspaces import internal

    obj = to_workspace(spec, entity=entity)
    try:
        existing = internal.View.from_name(entity, spec["project"], spec["internal_name"])
    except ValueError:  # "Workspace ... not found" (or the project does not exist yet)
        existing = None
    obj._internal_name = spec["internal_name"]
    if existing is not None:
        obj._internal_id = existing.id
    obj.save()
    return str(obj.url), existing is not None


def _save_report(spec: Mapping[str, Any], entity: str) -> tuple[str, bool]:
    import wandb

    obj = to_report(spec, entity=entity)
    tag = description_tag(spec["key"])
    existing = None
    try:
        for r in wandb.Api().reports(f"{entity}/{spec['project']}"):
            if tag in (r.description or ""):
                existing = r
                break
    except ValueError:  # the project does not exist yet
        existing = None
    if existing is not None:
        obj.id = existing.id
    obj.save()
    return str(obj.url), existing is not None


def publish(spec: Mapping[str, Any], spec_path: Path, *, mode: str | None = "auto", entity: str | None = None,
            timeout_s: float = 10.0, written: bool = True) -> PublishResult:
    """Create or update the view in W&B, or say in one line why not (the spec is already at ``spec_path``).

    Args:
        spec: a view spec (:func:`build_view_spec` or :func:`read_spec`).
        spec_path: the spec's file (named in the message, for a later ``--wandb-workspace-from``).
        mode: ``auto`` (online with an API key), ``online``, ``offline``/``disabled`` (never try).
        entity: overrides the spec's entity; None and no entity in the spec: the key's default entity.
        timeout_s: how long to wait for the W&B server before giving up.
        written: the spec was written just now (the message says so) rather than read from a file.
    """
    kind = spec["kind"]
    kept = f"spec written to {spec_path}" if written else f"spec {spec_path} kept"
    later = f"create it later with: python -m sectional_moe.report --wandb-workspace-from {spec_path}"
    if not workspaces_available():
        return PublishResult("deferred", f"W&B {kind} not created: the optional package wandb-workspaces is not installed; "
                                         f"install it with {INSTALL_HINT}; {kept}")
    try:  # offline first: the spec must make valid library objects before anything goes online
        check_objects(spec)
    except Exception as err:
        return PublishResult("failed", f"W&B {kind} not created: the spec does not make valid wandb-workspaces objects "
                                       f"({_first_line(err)}); {kept}")
    why = offline_reason(mode) or server_reachable(timeout_s)
    if why:
        return PublishResult("deferred", f"W&B {kind} not created: {why}; {kept}; {later}")
    try:
        entity = entity or spec.get("entity") or _default_entity()
        url, updated = (_save_workspace if kind == "workspace" else _save_report)(spec, entity)
    except Exception as err:
        return PublishResult("failed", f"W&B {kind} not created: W&B answered {_first_line(err)}; {kept}; {later}")
    return PublishResult("updated" if updated else "created", f"W&B {kind} {'updated' if updated else 'created'}: {url} ({kept})", url)
