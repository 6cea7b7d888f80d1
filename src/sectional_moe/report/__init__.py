"""Sweep comparison: a tidy run table, an HTML/Markdown report with figures and fits, and W&B logging.

* :func:`~sectional_moe.report.collect.collect` — run directories, offline W&B files or the W&B
  API -> one pandas row per run (failed/unfinished runs included with their state);
* :func:`~sectional_moe.report.html.build_report` / :func:`~sectional_moe.report.html.write_report`
  — figures (matplotlib), κ and scaling-law fits (``sectional_moe.theory``), report.html/.md;
* :func:`~sectional_moe.report.wandb_dashboard.log_report` — the same as a W&B summary run;
* ``python -m sectional_moe.report SOURCE`` — the command line (:mod:`~sectional_moe.report.cli`).
"""

from sectional_moe.report.collect import TABLE_COLUMNS, collect, comparable

__all__ = ["TABLE_COLUMNS", "collect", "comparable"]
