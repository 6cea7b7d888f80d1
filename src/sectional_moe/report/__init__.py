"""Sweep comparison: a tidy run table, an HTML/Markdown report with figures and fits, and W&B logging.

* :mod:`~sectional_moe.report.sources` — run directories, offline W&B files or the W&B API ->
  :func:`~sectional_moe.report.sources.collect`, one pandas row per run (failed/unfinished runs
  included with their state); :mod:`~sectional_moe.report.table` — the columns and their derivation;
* :mod:`~sectional_moe.report.analysis` — grouping, Pareto frontiers, κ and scaling-law fits;
* :mod:`~sectional_moe.report.figures` / :mod:`~sectional_moe.report.html` — figures (matplotlib),
  report.html/.md; :mod:`~sectional_moe.report.wandb_dashboard` — the same as a W&B summary run;
* ``python -m sectional_moe.report SOURCE`` — the command line (:mod:`~sectional_moe.report.cli`).

May import :mod:`sectional_moe.runs`, :mod:`sectional_moe.tracking` (W&B ids and files),
:mod:`sectional_moe.models.spec`, :mod:`sectional_moe.theory` and the top-level modules (torch-free).
"""
