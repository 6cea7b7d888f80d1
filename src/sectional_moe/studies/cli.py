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
from sectional_moe.studies.catalog import load_study, study_names
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
        if name in ("run", "commands"):
            p.add_argument("overrides", nargs="*", help="extra overrides for every job, e.g. hydra/launcher=slurm")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            for n in study_names():
                s = load_study(n)
                print(f"{n:16s} {s.question}  [{len(s.jobs('cpu'))} cpu jobs]")
            return 0
        study = load_study(args.study)
        if args.command == "dry-run":
            rows = dry_run(study, args.scale, args.peak_tflops, progress=_progress_printer())
            if sys.stderr.isatty():
                print("\r\033[K", end="", file=sys.stderr, flush=True)
            print(json.dumps(rows, indent=1) if args.json else format_dry_run(study, args.scale, rows))
            return 0
        if args.command == "commands":
            for cmd in train_commands(study, args.scale, args.overrides):
                print(" ".join(shlex.quote(c) for c in ["python", "train.py", *cmd[3:]]))
            return 0
        out = None if args.no_report else (args.report_dir or REPO_ROOT / "docs" / "results" / f"{study.name}-{args.scale}")
        with children_stop_with_runner():
            rc = run(study, args.scale, args.overrides, out, resolve_parallel(args.parallel, args.scale, study))
        return stop_exit_code() or rc
    except ConfigError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
