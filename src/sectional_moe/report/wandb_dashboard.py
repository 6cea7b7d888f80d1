"""Log a report to W&B as a summary run; the manual workspace recipe (the fallback of the views).

The summary run joins the sweep's group (``job_type="report"``) and holds the tidy table, the
comparison table and the fit tables as ``wandb.Table`` plus every figure as ``wandb.Image``
(:func:`report_run_keys` names them). Its id is derived from project and group, so re-running the
report updates the same run instead of adding one. Its config carries ``sectional_moe_report: true``
so the collector skips it.

The comparison *workspace* and *report* themselves are built as code by
:mod:`sectional_moe.report.wandb_views` (``--wandb-workspace``, ``--wandb-report``; the optional
extra ``wandb-views``). :data:`WORKSPACE_RECIPE` is the same view as manual steps in the W&B UI,
for when that package or the W&B API is not available.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pandas as pd

from sectional_moe.report.sources import REPORT_CONFIG_FLAG
from sectional_moe.report.html import Report
from sectional_moe.tracking.wandb_ids import resolve_wandb_mode

WORKSPACE_RECIPE = """\
W&B workspace for a sweep (project sectional-moe), by hand; `--wandb-workspace` builds it as code:
1. Filter runs: group = <sweep group> (the sweep directory's name), job_type = train.
2. Group runs by `routing_name`, then `family`, then `experts` (the innermost groups are the seed
   replicates: panels draw their mean and spread); colour by `experts`.
3. Add a scatter/line panel: x = `experts` (config, log2), y = `summary/val_ppl_best`;
   repeat for `summary/tokens_per_s`, `summary/mem_peak_rss_gib` (CPU) or
   `summary/mem_max_reserved_gib` (CUDA), `summary/step_time_s` and `moe/load_max_over_mean`.
4. Line plots of `val/loss` use x = `perf/tokens` (or `perf/flops` for compute) - the runs declare it.
5. Runs table columns: family, size, experts, routing_name, seq_reduction_resolved, seed,
   params/total, params/active, flops/per_token, summary/val_ppl_best, summary/test_ppl,
   summary/tokens_per_s, summary/mfu, summary/mem_*; sort by summary/val_ppl_best.
6. The report run (job_type = report) of the same group holds the tables `runs`, `comparison`,
   `fits/kappa`, `fits/laws` and the images `figures/*`: pin that run (so the train filter does not
   hide it) and add a pinned section with its media panels.
"""


def workspaces_available() -> bool:
    """True if ``wandb_workspaces`` (programmatic reports/workspaces, the ``wandb-views`` extra) is importable."""
    try:
        import wandb_workspaces.reports.v2  # noqa: F401
        import wandb_workspaces.workspaces  # noqa: F401
    except ImportError:
        return False
    return True


def report_run_keys(report: Report) -> dict[str, list[str]]:
    """The keys :func:`log_report` logs: ``tables`` (runs, comparison, the seed aggregates and the
    paired differences of the report, fits/*) and ``images`` (figures/<slug>)."""
    tables = ["runs", "comparison"]
    tables += [name for name, df in _aggregate_frames(report).items() if not df.empty]
    tables += [name for name, df in (("fits/kappa", report.kappa_table()), ("fits/laws", report.fit_table())) if not df.empty]
    images = [f"figures/{f.slug}" for f in report.figures if f.png is not None]
    return {"tables": tables, "images": images}


def _aggregate_frames(report: Report) -> dict[str, pd.DataFrame]:
    """The same seed aggregates the HTML report shows (mean, 95 % t-interval; paired differences)."""
    return {"replicates": report.replicate_table(), "paired_differences": report.paired_table()}


def _wandb_frame(df: pd.DataFrame) -> pd.DataFrame:
    """W&B tables take plain Python values: NA/NaN -> None, nullable ints -> objects."""
    out = df.astype(object)
    return out.where(pd.notna(out), None)


def summary_run_id(project: str, group: str | None) -> str:
    """The W&B id of the sweep's summary run (``report-<group>``), derived from project and group."""
    return hashlib.sha1(f"report|{project}|{group or ''}".encode()).hexdigest()[:16]


def log_report(report: Report, figure_dir: Path, *, mode: str = "offline", project: str = "sectional-moe",
               entity: str | None = None, group: str | None = None, save_dir: Path | None = None) -> dict[str, Any]:
    """Create/update the sweep's summary run; returns its id, group, mode and local directory."""
    import wandb

    mode = resolve_wandb_mode(mode)
    table = report.table
    if group is None:
        groups = table["group"].dropna()
        group = str(groups.mode().iloc[0]) if len(groups) else None
    run_id = summary_run_id(project, group)
    save_dir = Path(save_dir or figure_dir.parent)
    save_dir.mkdir(parents=True, exist_ok=True)
    config = {REPORT_CONFIG_FLAG: True, "source": report.source, "metric": report.metric, "group_by": report.group_by,
              "runs": int(len(table)), "runs_done": int((table["state"] == "done").sum())}
    run = wandb.init(project=project, entity=entity, group=group, job_type="report", name=f"report-{group or 'runs'}",
                     id=run_id, resume="allow", mode=mode, dir=str(save_dir), config=config)
    try:
        keys = report_run_keys(report)
        frames = {"runs": table, "comparison": report.comparison(), **_aggregate_frames(report),
                  "fits/kappa": report.kappa_table(), "fits/laws": report.fit_table()}
        payload: dict[str, Any] = {name: wandb.Table(dataframe=_wandb_frame(frames[name])) for name in keys["tables"]}
        captions = {f"figures/{f.slug}": f.caption for f in report.figures}
        for name in keys["images"]:
            path = figure_dir / f"{name.split('/', 1)[1]}.png"
            if path.is_file():
                payload[name] = wandb.Image(str(path), caption=captions[name])
        run.log(payload)
        best = report.comparison()
        summary: dict[str, Any] = {"report/runs": int(len(table)), "report/failed": int((table["state"] != "done").sum())}
        if len(best) and pd.notna(best.iloc[0][report.metric]):
            summary[f"report/best_{report.metric}"] = float(best.iloc[0][report.metric])
            summary["report/best_run"] = str(best.iloc[0]["run"])
        for k in report.kappas:
            if k.fit is not None:
                summary[f"report/kappa[{k.label}]"] = k.fit.kappa
        run.summary.update(summary)
        directory = run.dir
    finally:
        run.finish()
    return {"id": run_id, "group": group, "mode": mode, "dir": str(Path(directory).parent)}
