"""Log a report to W&B as a summary run, and the recipe for a comparison workspace.

The summary run joins the sweep's group (``job_type="report"``) and holds the tidy table, the
comparison table and the fit tables as ``wandb.Table`` plus every figure as ``wandb.Image``. Its
id is derived from project and group, so re-running the report updates the same run instead of
adding one. Its config carries ``sectional_moe_report: true`` so the collector skips it.

Programmatic creation of a W&B *report/workspace* needs the ``wandb-workspaces`` package
(``wandb[workspaces]``), which this project does not install (heavy, online-only);
:func:`workspaces_available` tells, and :data:`WORKSPACE_RECIPE` documents the manual steps.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pandas as pd

from sectional_moe.report.collect import REPORT_CONFIG_FLAG
from sectional_moe.report.html import Report

WORKSPACE_RECIPE = """\
W&B workspace for a sweep (project sectional-moe):
1. Filter runs: group = <sweep group> (the sweep directory's name), job_type = train.
2. Group runs by `routing_name` (then `family`); colour by `experts`.
3. Add a scatter/line panel: x = `experts` (config, log2), y = `summary/val_ppl_best`;
   repeat for `summary/tokens_per_s`, `summary/mem_peak_rss_gib` (CPU) or
   `summary/mem_max_reserved_gib` (CUDA), `summary/step_time_s` and `moe/load_max_over_mean`.
4. Line plots of `val/loss` use x = `perf/tokens` (or `perf/flops` for compute) - the runs declare it.
5. Runs table columns: family, size, experts, routing_name, seq_reduction_resolved, seed,
   params/total, params/active, flops/per_token, summary/val_ppl_best, summary/test_ppl,
   summary/tokens_per_s, summary/mfu, summary/mem_*; sort by summary/val_ppl_best.
6. The report run (job_type = report) of the same group holds the tables `runs`, `comparison`,
   `fits/kappa`, `fits/laws` and the images `figures/*`: pin its media panels to the workspace.
"""


def workspaces_available() -> bool:
    """True if ``wandb_workspaces`` (programmatic reports/workspaces) is importable."""
    try:
        import wandb_workspaces  # noqa: F401
    except ImportError:
        return False
    return True


def _wandb_frame(df: pd.DataFrame) -> pd.DataFrame:
    """W&B tables take plain Python values: NA/NaN -> None, nullable ints -> objects."""
    out = df.astype(object)
    return out.where(pd.notna(out), None)


def summary_run_id(project: str, group: str | None) -> str:
    return hashlib.sha1(f"report|{project}|{group or ''}".encode()).hexdigest()[:16]


def log_report(report: Report, figure_dir: Path, *, mode: str = "offline", project: str = "sectional-moe",
               entity: str | None = None, group: str | None = None, save_dir: Path | None = None) -> dict[str, Any]:
    """Create/update the sweep's summary run; returns its id, group, mode and local directory."""
    import wandb

    from sectional_moe.runs import resolve_wandb_mode

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
        payload: dict[str, Any] = {
            "runs": wandb.Table(dataframe=_wandb_frame(table)),
            "comparison": wandb.Table(dataframe=_wandb_frame(report.comparison())),
        }
        for name, df in (("fits/kappa", report.kappa_table()), ("fits/laws", report.fit_table())):
            if not df.empty:
                payload[name] = wandb.Table(dataframe=_wandb_frame(df))
        for f in report.figures:
            path = figure_dir / f"{f.slug}.png"
            if f.png is not None and path.is_file():
                payload[f"figures/{f.slug}"] = wandb.Image(str(path), caption=f.caption)
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
