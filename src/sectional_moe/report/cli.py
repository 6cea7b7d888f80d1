"""``python -m sectional_moe.report SOURCE``: collect a sweep, write the report, optionally log to W&B.

SOURCE: a sweep or output directory (run directories), a directory of offline W&B runs, or
``wandb:ENTITY/PROJECT[/GROUP]`` (W&B public API, online). Writes into ``--out`` (default
``<SOURCE>/report`` or ``reports/<project>[-<group>]``): report.html (self-contained),
report.md + figures/*.png, runs.csv, runs.json, fits.json.

``--wandb-workspace`` / ``--wandb-report`` also build the sweep's W&B comparison view as code
(:mod:`sectional_moe.report.wandb_views`): the view's spec is written next to the report
(wandb-workspace.json, wandb-report.json) and saved to W&B when the optional package, an API key
and the network are there; ``--wandb-workspace-from FILE`` saves such a spec later.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from sectional_moe.report.sources import collect, parse_wandb_source
from sectional_moe.report.table import TABLE_COLUMNS

KINDS = {"auto": "auto", "runs": "runs", "wandb": "wandb-offline", "wandb-offline": "wandb-offline", "wandb-api": "wandb-api"}


# logged metric names (as in W&B / experiments/*.yaml) -> the table column a report compares
METRIC_ALIASES = {"val/ppl": "val_ppl_best", "val/loss": "val_loss_best", "test/ppl": "test_ppl", "test/loss": "test_loss",
                  "perf/step_time": "step_time_s", "perf/tokens_per_s": "tokens_per_s", "perf/mfu": "mfu"}


def table_column(name: str) -> str:
    """A column name, or the column a logged metric name stands for (``val/ppl`` -> ``val_ppl_best``)."""
    return METRIC_ALIASES.get(name, name if name in TABLE_COLUMNS else name.replace("/", "_"))


def parse_reference(text: str) -> dict[str, Any]:
    """``family=dense,routing=none`` -> {"family": "dense", "routing": "none"}; numbers and booleans keep their type."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise ValueError(f"--reference {text!r}: give column=value pairs, e.g. family=dense")
        key, value = (t.strip() for t in part.split("=", 1))
        out[key] = _typed(value)
    return out


def _typed(value: str) -> Any:
    """A reference value as the table holds it: int, float, bool (true/false), else the string."""
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def default_out(source: str) -> Path:
    if source.startswith("wandb:"):
        entity, project, group = parse_wandb_source(source)
        return Path("reports") / (f"{project}-{group}" if group else project)
    return Path(source) / "report"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sectional_moe.report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", help="sweep/output directory, directory of offline W&B runs, or wandb:ENTITY/PROJECT[/GROUP] "
                   "(not needed with --wandb-workspace-from)")
    p.add_argument("--from", dest="kind", choices=sorted(KINDS), default="auto",
                   help="read run directories (runs) or W&B run files (wandb) when a directory holds both; default: runs if any")
    p.add_argument("--metric", default="val_ppl_best", help="column (or logged metric, e.g. val/ppl) to plot against E and sort the comparison by (default val_ppl_best)")
    p.add_argument("--group-by", default="routing", help="column that splits the lines of the per-E plots (default routing)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default <SOURCE>/report)")
    p.add_argument("--wandb", dest="wandb_mode", choices=("off", "offline", "online", "auto"), default=None,
                   help="also log the tables and figures as a W&B summary run in the sweep's group (default off; with "
                        "--wandb-workspace/--wandb-report, whose views show that run's figures: online if W&B answers, else offline)")
    p.add_argument("--wandb-project", default=None,
                   help="W&B project of the summary run and the views (default: the project of a wandb: SOURCE, else sectional-moe)")
    p.add_argument("--wandb-entity", default=None, help="W&B entity (default: the entity of a wandb: SOURCE, else your default entity)")
    views = p.add_argument_group("W&B views as code (optional extra: pip install -e '.[wandb-views]')")
    views.add_argument("--wandb-workspace", action="store_true",
                       help="create or update the sweep's saved W&B workspace (writes wandb-workspace.json next to the report)")
    views.add_argument("--wandb-report", action="store_true",
                       help="create or update a shareable W&B report of the sweep (writes wandb-report.json next to the report)")
    views.add_argument("--wandb-workspace-from", type=Path, default=None, metavar="FILE",
                       help="create or update the view a spec file written earlier describes (wandb-workspace.json or "
                            "wandb-report.json); needs no SOURCE")
    views.add_argument("--wandb-group", default=None, help="the W&B group the views show (default: the runs' group)")
    views.add_argument("--wandb-view-group-by", default="routing_name,family",
                       help="config keys the view groups runs by, outermost first (default routing_name,family); settings "
                            "that vary inside them and then --wandb-view-color-by are appended, so the innermost groups are seeds")
    views.add_argument("--wandb-view-color-by", default="experts", help="config key the view colours runs by (default experts)")
    views.add_argument("--wandb-report-rows", type=int, default=25, help="rows of the comparison table in a W&B report (default 25)")
    views.add_argument("--wandb-timeout", type=float, default=10.0, help="seconds to wait for the W&B server (default 10)")
    p.add_argument("--n-boot", type=int, default=100, help="bootstrap resamples for the fit bands (default 100)")
    p.add_argument("--reference", default=None,
                   help="the runs every configuration is compared with, paired by seed: column=value[,column=value] (default family=dense)")
    p.add_argument("--fit-params", default="params_non_embedding",
                   choices=("params_non_embedding", "params_total", "params_active", "params_flop_equivalent"),
                   help="the parameter count N of the Chinchilla and IsoFLOP fits (default: non-embedding)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar while collecting")
    return p


def wandb_target(args: argparse.Namespace) -> tuple[str, str | None, str | None]:
    """Project, entity and group of the W&B summary run and views: the flags, else a wandb: SOURCE's, else defaults."""
    project, entity, group = args.wandb_project, args.wandb_entity, args.wandb_group
    if args.source and str(args.source).startswith("wandb:"):
        src_entity, src_project, src_group = parse_wandb_source(str(args.source))
        project, entity, group = project or src_project, entity or src_entity, group or src_group
    return project or "sectional-moe", entity, group


def _view_mode(args: argparse.Namespace) -> str:
    return args.wandb_mode if args.wandb_mode in ("online", "offline") else "auto"


def view_from_file(args: argparse.Namespace) -> int:
    """``--wandb-workspace-from FILE``: save the view a spec file describes (0 saved, 1 not, 2 bad file)."""
    from sectional_moe.report.wandb_views import publish, read_spec

    if args.source:
        print("error: --wandb-workspace-from creates a view from its spec file alone; drop SOURCE (or the flag)", file=sys.stderr)
        return 2
    try:
        spec = read_spec(args.wandb_workspace_from)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = publish(spec, args.wandb_workspace_from, mode=_view_mode(args), entity=args.wandb_entity,
                     timeout_s=args.wandb_timeout, written=False)
    print(result.message)
    return 0 if result.saved else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for flag, value, ok in (("--wandb-timeout", args.wandb_timeout, args.wandb_timeout > 0),
                            ("--wandb-report-rows", args.wandb_report_rows, args.wandb_report_rows >= 1)):
        if not ok:
            print(f"error: {flag} {value}: use a positive number", file=sys.stderr)
            return 2
    if args.wandb_workspace_from is not None:
        return view_from_file(args)
    if not args.source:
        print("error: SOURCE is required (a sweep directory or wandb:ENTITY/PROJECT[/GROUP]), unless --wandb-workspace-from FILE",
              file=sys.stderr)
        return 2
    from sectional_moe.report.html import build_report, write_report
    from sectional_moe.report.replicates import check_reference

    views = [kind for kind, on in (("workspace", args.wandb_workspace), ("report", args.wandb_report)) if on]
    project, entity, view_group = wandb_target(args)
    keys_by_group: dict = {}
    on_record = None
    if views:
        from sectional_moe.report.wandb_views import LoggedKeys

        def on_record(rec) -> None:  # the keys the runs logged, per group: a view only uses logged keys
            keys_by_group.setdefault(rec.group, LoggedKeys()).add_record(rec)
    try:
        table = collect(args.source, kind=KINDS[args.kind], progress=not args.no_progress, on_record=on_record)
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
    try:
        reference = parse_reference(args.reference) if args.reference else None
        if reference is not None:
            check_reference(table, reference)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = build_report(table, source=str(args.source), metric=args.metric, group_by=args.group_by, n_boot=args.n_boot,
                          reference=reference, fit_params=args.fit_params)
    out = args.out or default_out(str(args.source))
    paths = write_report(report, out)
    counts = table["state"].value_counts().to_dict()
    print(f"{len(table)} runs ({', '.join(f'{v} {k}' for k, v in counts.items())})")
    for f in report.figures:
        print(f"  figure {f.slug}: {'ok' if f.png is not None else 'skipped: ' + str(f.skipped)}")
    for name in ("html", "md", "csv", "json", "fits"):
        print(f"  {name:5s} {paths[name]}")
    wandb_mode = args.wandb_mode or "off"
    if args.wandb_mode is None and views:  # the views show the summary run's figures: log it, online only if W&B answers
        from sectional_moe.report.wandb_views import offline_reason, server_reachable

        wandb_mode = "offline" if offline_reason("auto") or server_reachable(args.wandb_timeout) else "online"
    if wandb_mode != "off":
        from sectional_moe.report.wandb_dashboard import log_report

        info = log_report(report, out / "figures", mode=wandb_mode, project=project, entity=entity, group=view_group, save_dir=out)
        print(f"  W&B summary run {info['id']} (group {info['group']}, {info['mode']}) in {info['dir']}")
    if views:
        return write_views(args, report, out, views, keys_by_group, project, entity, view_group)
    return 0


def write_views(args: argparse.Namespace, report, out: Path, views: Sequence[str], keys_by_group: dict, project: str,
                entity: str | None, group: str | None) -> int:
    """Build, write and publish the requested views; 0 unless a spec cannot be built (2) or W&B refused one (1)."""
    from sectional_moe.report.sources import detect_kind
    from sectional_moe.report.sources.wandb_offline import find_wandb_files, read_wandb_files
    from sectional_moe.report.wandb_views import LoggedKeys, ViewOptions, build_view_spec, publish, sweep_group, write_spec

    options = ViewOptions(project=project, entity=entity, group=group, group_by=tuple(args.wandb_view_group_by.split(",")),
                          color_by=args.wandb_view_color_by, report_rows=args.wandb_report_rows)
    try:
        options.group = sweep_group(report.table, group)
        if (KINDS[args.kind] if args.kind != "auto" else detect_kind(args.source)) == "runs":
            # run directories hold no W&B summary: read the runs' W&B files (written online or offline) for it
            for files in find_wandb_files(Path(args.source)).values():
                rec = read_wandb_files(files)
                if rec is not None:
                    keys_by_group.setdefault(rec.group, LoggedKeys()).add_record(rec)
        specs = [build_view_spec(kind, report, options, keys=keys_by_group.get(options.group)) for kind in views]
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    code = 0
    for spec in specs:
        path = write_spec(spec, out)
        result = publish(spec, path, mode=_view_mode(args), entity=entity, timeout_s=args.wandb_timeout)
        print(f"  {result.message}")
        if spec["omitted"]:  # e.g. expert load in a dense-only sweep; the spec lists the missing keys
            print(f"    left out (keys no run logged): {'; '.join(item['panel'] for item in spec['omitted'])}")
        code = max(code, 1 if result.status == "failed" else 0)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
