"""``python -m sectional_moe.report SOURCE``: collect a sweep, write the report, optionally log to W&B.

SOURCE: a sweep or output directory (run directories), a directory of offline W&B runs, or
``wandb:ENTITY/PROJECT[/GROUP]`` (W&B public API, online). Writes into ``--out`` (default
``<SOURCE>/report`` or ``reports/<project>[-<group>]``): report.html (self-contained),
report.md + figures/*.png, runs.csv, runs.json, fits.json.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from sectional_moe.report.collect import TABLE_COLUMNS, collect, parse_wandb_source

KINDS = {"auto": "auto", "runs": "runs", "wandb": "wandb-offline", "wandb-offline": "wandb-offline", "wandb-api": "wandb-api"}


# logged metric names (as in W&B / experiments/*.yaml) -> the table column a report compares
METRIC_ALIASES = {"val/ppl": "val_ppl_best", "val/loss": "val_loss_best", "test/ppl": "test_ppl", "test/loss": "test_loss",
                  "perf/step_time": "step_time_s", "perf/tokens_per_s": "tokens_per_s", "perf/mfu": "mfu"}


def table_column(name: str) -> str:
    """A column name, or the column a logged metric name stands for (``val/ppl`` -> ``val_ppl_best``)."""
    return METRIC_ALIASES.get(name, name if name in TABLE_COLUMNS else name.replace("/", "_"))


def default_out(source: str) -> Path:
    if source.startswith("wandb:"):
        entity, project, group = parse_wandb_source(source)
        return Path("reports") / (f"{project}-{group}" if group else project)
    return Path(source) / "report"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sectional_moe.report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="sweep/output directory, directory of offline W&B runs, or wandb:ENTITY/PROJECT[/GROUP]")
    p.add_argument("--from", dest="kind", choices=sorted(KINDS), default="auto",
                   help="read run directories (runs) or W&B run files (wandb) when a directory holds both; default: runs if any")
    p.add_argument("--metric", default="val_ppl_best", help="column (or logged metric, e.g. val/ppl) to plot against E and sort the comparison by (default val_ppl_best)")
    p.add_argument("--group-by", default="routing", help="column that splits the lines of the per-E plots (default routing)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default <SOURCE>/report)")
    p.add_argument("--wandb", dest="wandb_mode", choices=("off", "offline", "online", "auto"), default="off",
                   help="also log the tables and figures as a W&B summary run in the sweep's group (default off)")
    p.add_argument("--wandb-project", default="sectional-moe")
    p.add_argument("--wandb-entity", default=None)
    p.add_argument("--n-boot", type=int, default=100, help="bootstrap resamples for the fit bands (default 100)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar while collecting")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from sectional_moe.report.html import build_report, write_report

    try:
        table = collect(args.source, kind=KINDS[args.kind], progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if table.empty:
        print(f"error: no runs found in {args.source}", file=sys.stderr)
        return 2
    args.metric, args.group_by = table_column(args.metric), table_column(args.group_by)
    for col, flag in ((args.metric, "--metric"), (args.group_by, "--group-by")):
        if col not in TABLE_COLUMNS:
            print(f"error: {flag} {col!r} is not a column; columns: {', '.join(TABLE_COLUMNS)}", file=sys.stderr)
            return 2
    report = build_report(table, source=str(args.source), metric=args.metric, group_by=args.group_by, n_boot=args.n_boot)
    out = args.out or default_out(str(args.source))
    paths = write_report(report, out)
    counts = table["state"].value_counts().to_dict()
    print(f"{len(table)} runs ({', '.join(f'{v} {k}' for k, v in counts.items())})")
    for f in report.figures:
        print(f"  figure {f.slug}: {'ok' if f.png is not None else 'skipped: ' + str(f.skipped)}")
    for name in ("html", "md", "csv", "json", "fits"):
        print(f"  {name:5s} {paths[name]}")
    if args.wandb_mode != "off":
        from sectional_moe.report.wandb_dashboard import log_report

        info = log_report(report, out / "figures", mode=args.wandb_mode, project=args.wandb_project, entity=args.wandb_entity,
                          save_dir=out)
        print(f"  W&B summary run {info['id']} (group {info['group']}, {info['mode']}) in {info['dir']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
