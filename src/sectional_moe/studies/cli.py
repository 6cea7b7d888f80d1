"""``python -m sectional_moe.studies list | dry-run | commands | run``: the road-map studies from the command line.

    python -m sectional_moe.studies list
    python -m sectional_moe.studies dry-run e_sweep --scale gpu     # jobs, FLOPs, predicted cost
    python -m sectional_moe.studies run e_sweep                     # cpu scale, then the report
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from sectional_moe.errors import ConfigError
from sectional_moe.files import REPO_ROOT
from sectional_moe.studies.catalog import load_study, road_map_order, study_names
from sectional_moe.studies.runner import (children_stop_with_runner, dry_run, format_dry_run, resolve_parallel, run,
                                          stop_exit_code, train_commands)


def _progress_printer():
    """Progress on stderr: one line rewritten in place on a terminal, a line per step otherwise."""
    tty = sys.stderr.isatty()

    def say(line: str) -> None:
        if tty:
            print(f"\r\033[K{line[:150]}", end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    return say


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sectional_moe.studies", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the studies and their questions")
    for name, help_ in (("dry-run", "compose, validate and cost every job"), ("run", "run the study, then its report"),
                        ("commands", "print the train.py commands of the study")):
        p = sub.add_parser(name, help=help_)
        if name == "run":  # several in turn, or all of them: the whole road map from one command
            p.add_argument("study", nargs="+", help=f"one or more of: {', '.join(study_names())}; or all (road-map order); "
                                                    "then any overrides for every job (key=value)")
        else:
            p.add_argument("study", help=f"one of: {', '.join(study_names())}")
        p.add_argument("--scale", default="cpu", help="cpu (2 cores, < 30 min) or gpu")
        if name == "dry-run":
            p.add_argument("--peak-tflops", type=float, default=None, help="device peak for the cost estimate")
            p.add_argument("--json", action="store_true")
        if name == "run":
            p.add_argument("--report-dir", type=Path, default=None,
                           help="where the report goes (default docs/results/<study>-<scale>)")
            p.add_argument("--no-report", action="store_true")
            p.add_argument("--parallel", default="auto",
                           help="sweeps run at once, one thread each (default auto: every core on the cpu scale, 1 on gpu)")
        if name == "commands":
            p.add_argument("overrides", nargs="*", help="extra overrides for every job, e.g. hydra/launcher=slurm")
    # run: studies and overrides (key=value, for every job, e.g. hydra/launcher=slurm) in any order,
    # also after options, which argparse's positionals cannot take
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "run" or any("=" not in a for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "list":
            for n in study_names():
                s = load_study(n)
                print(f"{n:16s} {s.question}  [{len(s.jobs('cpu'))} cpu jobs]")
            return 0
        if args.command == "run":  # an override (key=value) is never a study name
            names = [a for a in args.study if "=" not in a]
            args.overrides = [a for a in args.study if "=" in a] + extra
            return _run_studies(road_map_order(names), args)
        study = load_study(args.study)
        if args.command == "dry-run":
            rows = dry_run(study, args.scale, args.peak_tflops, progress=_progress_printer())
            if sys.stderr.isatty():
                print("\r\033[K", end="", file=sys.stderr, flush=True)
            print(json.dumps(rows, indent=1) if args.json else format_dry_run(study, args.scale, rows))
            return 0
        if args.command == "commands":
            for cmd in train_commands(study, args.scale, args.overrides):
                print(" ".join(shlex.quote(c) for c in ["python", "train.py", *cmd[2:]]))  # with -m: each line is a sweep
            return 0
    except ConfigError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 2
    return 0


def _run_studies(names: list[str], args: argparse.Namespace) -> int:
    """Each study in turn (all validated first); the worst exit code; a stop (SIGTERM) ends the list."""
    try:
        studies = [load_study(n) for n in names]
        for study in studies:
            study.jobs(args.scale)  # an unknown scale is refused before anything runs
    except ConfigError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 2
    if args.report_dir is not None and len(studies) > 1:
        print("Error: --report-dir names one study's report directory; run the studies one at a time to use it",
              file=sys.stderr)
        return 2
    worst = 0
    with children_stop_with_runner():
        for study in studies:
            if len(studies) > 1:
                print(f"=== {study.name}", file=sys.stderr, flush=True)
            out = None if args.no_report else (args.report_dir or REPO_ROOT / "docs" / "results" / f"{study.name}-{args.scale}")
            try:
                worst = max(worst, run(study, args.scale, args.overrides, out,
                                       resolve_parallel(args.parallel, args.scale, study)))
            except ConfigError as err:
                print(f"Error: {err}", file=sys.stderr)
                return 2
            if stop_exit_code() is not None:
                break
    return stop_exit_code() or worst


if __name__ == "__main__":
    raise SystemExit(main())
