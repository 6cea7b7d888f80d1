"""bf16-mixed against fp32: does the precision change the quality a run reaches?

``python -m sectional_moe.bench.quality <sweep dir> ... [--out docs/bench]`` reads finished run
directories (every ``DONE`` run under the given directories), groups them by sweep directory and
``trainer.precision``, and writes ``precision_quality.json`` and ``precision_quality.md``:

* per group and precision: the seeds' validation perplexity (and test perplexity), their mean and
  a **Student-t 95 % confidence interval of the mean** over seeds;
* per group: the **seed-paired difference** bf16 - fp32 (same seed = same initialisation and data
  order, so the pairing removes most of the seed-to-seed spread), its mean and Student-t 95 % CI;
* a verdict, *within seed noise*: the paired difference's 95 % CI contains 0, or the difference is
  smaller than the fp32 seeds' own standard deviation.

Imports: :mod:`sectional_moe.report` (the runs as the report reads them, its t-interval and verdict).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from sectional_moe.files import REPO_ROOT, atomic_write
from sectional_moe.report.replicates import INTERVAL, t_interval, verdict
from sectional_moe.report.sources.run_dirs import iter_run_dirs

PRECISIONS = ("32-true", "bf16-mixed")
METRICS = ("val/ppl", "test/ppl")


def finished_runs(roots: Iterable[Path]) -> list[dict[str, Any]]:
    """Every finished run under ``roots``: its group (sweep directory name), precision, seed and metrics."""
    out = []
    for root in roots:
        _, records = iter_run_dirs(Path(root))
        for r in records:
            precision = str(r.config.get("trainer.precision"))
            if r.state != "done" or precision not in PRECISIONS:
                continue
            out.append({"group": Path(r.path).parent.name, "run": r.name, "precision": precision,
                        "seed": int(r.config["seed"]), **{m: r.final.get(m) for m in METRICS}})
    return out


def _interval(values: list[float]) -> dict[str, Any]:
    ci = t_interval(values)
    return {"values": values, "n": ci["n"], "mean": ci["mean"], "sd": ci["sd"],
            "ci95": None if ci["ci_lo"] is None else [ci["ci_lo"], ci["ci_hi"]]}


def compare(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per group: both precisions' seeds, means and t intervals, and the seed-paired bf16 - fp32 difference."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(r["group"], []).append(r)
    out = []
    for group, rs in sorted(groups.items()):
        entry: dict[str, Any] = {"group": group}
        for metric in METRICS:
            by_prec = {p: {r["seed"]: r[metric] for r in rs if r["precision"] == p and r[metric] is not None} for p in PRECISIONS}
            stats_m: dict[str, Any] = {p: {"seeds": sorted(seeds), **_interval([seeds[s] for s in sorted(seeds)])}
                                       for p, seeds in by_prec.items()}
            paired = sorted(set(by_prec["32-true"]) & set(by_prec["bf16-mixed"]))
            d = {"seeds": paired, **_interval([by_prec["bf16-mixed"][s] - by_prec["32-true"][s] for s in paired])}
            ref_mean, sd32 = stats_m["32-true"]["mean"], stats_m["32-true"]["sd"]
            d["relative_mean"] = d["mean"] / ref_mean if d["mean"] is not None and ref_mean else None
            d["verdict"] = verdict(*(d["ci95"] or (None, None)), d["n"], metric)
            d["within_seed_noise"] = (None if d["ci95"] is None else
                                      d["ci95"][0] <= 0.0 <= d["ci95"][1] or (sd32 is not None and abs(d["mean"]) < sd32))
            stats_m["paired_difference"] = d
            entry[metric] = stats_m
        out.append(entry)
    return out


def _f(x: float | None, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def to_markdown(report: dict[str, Any]) -> str:
    """The comparison as Markdown: one row per group and precision, then the paired differences."""
    lines = ["# bf16-mixed vs fp32: validation perplexity (issue 17)", "",
             f"- written {report['date']} by `{report['command']}`",
             "- runs: " + ", ".join(f"`{r}`" for r in report["roots"]),
             f"- interval: **{INTERVAL}** over seeds; the paired difference is bf16 - fp32 of the same seed "
             "(same initialisation and data order).",
             "- within seed noise: the paired difference's 95 % CI contains 0, or |mean difference| < the fp32 seeds' "
             "standard deviation.", ""]
    for note in report.get("notes", []):
        lines.append(f"- {note}")
    for metric in METRICS:
        lines += ["", f"## {metric}", "",
                  "| group | precision | seeds | per seed | mean | 95 % CI | SD |", "|---|---|---|---|---|---|---|"]
        for e in report["groups"]:
            for p in PRECISIONS:
                s = e[metric][p]
                interval = "–" if not s["ci95"] else f"[{_f(s['ci95'][0])}, {_f(s['ci95'][1])}]"
                lines.append(f"| {e['group']} | {p} | {s['n']} | {', '.join(_f(v) for v in s['values'])} | {_f(s['mean'])} | "
                             f"{interval} | {_f(s['sd'])} |")
        lines += ["", "| group | paired bf16 - fp32 per seed | mean | 95 % CI | relative | verdict (bf16) | within seed noise |",
                  "|---|---|---|---|---|---|---|"]
        for e in report["groups"]:
            d = e[metric]["paired_difference"]
            ci = d["ci95"]
            within = "–" if d["within_seed_noise"] is None else ("yes" if d["within_seed_noise"] else "**no**")
            interval = "–" if not ci else f"[{_f(ci[0], '+.2f')}, {_f(ci[1], '+.2f')}]"
            relative = _f(None if d["relative_mean"] is None else 100 * d["relative_mean"], "+.1f")
            lines.append(f"| {e['group']} | {', '.join(_f(v, '+.2f') for v in d['values'])} | {_f(d['mean'], '+.2f')} | "
                         f"{interval} | {relative} % | {d['verdict']} | {within} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m sectional_moe.bench.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("roots", nargs="+", help="sweep or output directories holding the bf16-mixed and fp32 runs")
    p.add_argument("--out", default=str(REPO_ROOT / "docs" / "bench"), help="where precision_quality.{json,md} go ('' = print only)")
    p.add_argument("--note", action="append", default=[], help="a line for the Markdown's header (conditions, wall times)")
    a = p.parse_args(argv)
    roots = [Path(r) for r in a.roots]
    missing = [str(r) for r in roots if not r.is_dir()]
    if missing:
        raise SystemExit(f"error: not a directory: {', '.join(missing)}")
    runs = finished_runs(roots)
    if not runs:
        raise SystemExit(f"error: no finished run (DONE) with trainer.precision in {PRECISIONS} under {', '.join(map(str, roots))}")
    command = "python -m sectional_moe.bench.quality " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "command": command,
              "roots": [str(r) for r in roots], "notes": a.note, "runs": runs, "groups": compare(runs)}
    md = to_markdown(report)
    print(md)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "precision_quality.json", json.dumps(report, indent=1) + "\n")
        atomic_write(out / "precision_quality.md", md)
        print(f"wrote {out / 'precision_quality.json'} and {out / 'precision_quality.md'}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
