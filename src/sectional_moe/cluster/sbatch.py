"""Plain-sbatch sweeps: write one line of overrides per job, for ``slurm/array.sbatch``.

    python -m sectional_moe.launch overrides experts=4,8,16 routing=topk,hash -o sweep.txt
    sbatch --array=0-5 slurm/array.sbatch sweep.txt

Line ``i`` of the file (0-based, matching ``$SLURM_ARRAY_TASK_ID``) holds the overrides of job
``i``, expanded by the same rules as ``python train.py -m`` (Hydra's basic sweeper: comma lists,
``range(...)``, ``glob(...)``; keys in command-line order), so both paths run the same jobs and, since run
directories come from the overrides, write to the same run keys.

Values are shell-quoted (:func:`shlex.quote`); ``array.sbatch`` splits a line back with
:func:`shlex.split` and never evaluates it, so an edited line with ``$(...)`` stays literal text.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from sectional_moe.cluster.sweeps import expand_sweep


def sweep_lines(overrides: list[str]) -> list[str]:
    """One shell-quoted line of overrides per job of the sweep ``overrides`` describes."""
    try:
        jobs = expand_sweep(overrides)
    except Exception as err:  # Hydra's parser errors are long; keep the first line, name the input
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: overrides: cannot parse {' '.join(overrides)!r}: {first}", file=sys.stderr)
        raise SystemExit(2) from None
    return [" ".join(shlex.quote(o) for o in job) for job in jobs]


def array_spec(n_jobs: int, parallelism: int | None = None) -> str:
    """The ``--array`` value for ``n_jobs`` tasks: ``0-5``, or ``0-5%2`` with a concurrency cap."""
    spec = f"0-{n_jobs - 1}"
    return f"{spec}%{parallelism}" if parallelism else spec


def _overrides_command(args: argparse.Namespace) -> int:
    if not args.overrides:
        print("error: overrides: give at least one override, e.g. experts=4,8 routing=topk,hash", file=sys.stderr)
        return 2
    lines = sweep_lines(args.overrides)
    text = "\n".join(lines) + "\n"
    if args.output in (None, "-"):
        sys.stdout.write(text)
        return 0
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    # the submission command on stderr, so that stdout stays machine-readable
    print(f"wrote {len(lines)} jobs to {out}; submit with:\n  sbatch --array={array_spec(len(lines), args.parallelism)} "
          f"slurm/array.sbatch {shlex.quote(str(out))}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="python -m sectional_moe.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("overrides", help="write a sweep's job override lines (one per array task)")
    p.add_argument("overrides", nargs="*", help="Hydra sweep overrides, as after `python train.py -m`")
    p.add_argument("-o", "--output", help="file to write (default: stdout)")
    p.add_argument("-p", "--parallelism", type=int, default=None,
                   help="print the sbatch command with --array=...%%N (at most N tasks at once)")
    args = parser.parse_args(argv)
    if args.command == "overrides":
        return _overrides_command(args)
    return 2  # unreachable: argparse enforces the sub-command


if __name__ == "__main__":
    sys.exit(main())
