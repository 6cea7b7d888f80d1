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

Imports: :mod:`sectional_moe.runs` (the run directory), scipy (t quantiles).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from sectional_moe.files import REPO_ROOT, atomic_write
from sectional_moe.runs.layout import RunDir

PRECISIONS = ("32-true", "bf16-mixed")
METRICS = ("val/ppl", "test/ppl")


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float] | None:
    """(mean, low, high): the Student-t confidence interval of the mean (None with fewer than 2 values)."""
    from scipy import stats

    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    half = float(stats.t.ppf(0.5 + level / 2, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def finished_runs(roots: Iterable[Path]) -> list[dict[str, Any]]:
    """Every finished run under ``roots``: its group (sweep directory name), precision, seed and metrics."""
    out = []
    for root in roots:
        for marker in sorted(Path(root).rglob("DONE")):
            rd = RunDir(marker.parent)
            identity_path = rd.identity_file
            identity = json.loads(identity_path.read_text()) if identity_path.is_file() else {}
            metrics = rd.final_metrics()
            precision = str(identity.get("trainer.precision", "?"))
            if precision not in PRECISIONS:
                continue
            out.append({"group": rd.path.parent.name, "run": rd.name, "precision": precision,
                        "seed": int(identity.get("seed", -1)) if "seed" in identity else _seed_of(rd.name),
                        **{m: metrics.get(m) for m in METRICS}})
    return out


def _seed_of(name: str) -> int:
    for part in name.split(","):
        if part.startswith("seed="):
            return int(part.split("=", 1)[1])
    return -1


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
            stats_m: dict[str, Any] = {}
            for p, seeds in by_prec.items():
                vals = [seeds[s] for s in sorted(seeds)]
                ci = t_interval(vals)
                stats_m[p] = {"seeds": sorted(seeds), "values": vals, "n": len(vals),
                              "mean": statistics.fmean(vals) if vals else None,
                              "sd": statistics.stdev(vals) if len(vals) > 1 else None,
                              "ci95": [ci[1], ci[2]] if ci else None}
            paired = sorted(set(by_prec["32-true"]) & set(by_prec["bf16-mixed"]))
            diffs = [by_prec["bf16-mixed"][s] - by_prec["32-true"][s] for s in paired]
            ci = t_interval(diffs)
            sd32 = stats_m["32-true"]["sd"]
            within = None
            if ci is not None:
                within = (ci[1] <= 0.0 <= ci[2]) or (sd32 is not None and abs(ci[0]) < sd32)
            stats_m["paired_difference"] = {"seeds": paired, "values": diffs, "mean": statistics.fmean(diffs) if diffs else None,
                                            "ci95": [ci[1], ci[2]] if ci else None,
                                            "relative_mean": (statistics.fmean(diffs) / stats_m["32-true"]["mean"]
                                                              if diffs and stats_m["32-true"]["mean"] else None),
                                            "within_seed_noise": within}
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
             "- interval: **Student-t 95 % confidence interval of the mean over seeds** (n - 1 degrees of freedom); "
             "the paired difference is bf16 - fp32 of the same seed (same initialisation and data order).",
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
        lines += ["", "| group | paired bf16 - fp32 per seed | mean | 95 % CI | relative | within seed noise |",
                  "|---|---|---|---|---|---|"]
        for e in report["groups"]:
            d = e[metric]["paired_difference"]
            ci = d["ci95"]
            verdict = "–" if d["within_seed_noise"] is None else ("yes" if d["within_seed_noise"] else "**no**")
            interval = "–" if not ci else f"[{_f(ci[0], '+.2f')}, {_f(ci[1], '+.2f')}]"
            relative = _f(None if d["relative_mean"] is None else 100 * d["relative_mean"], "+.1f")
            lines.append(f"| {e['group']} | {', '.join(_f(v, '+.2f') for v in d['values'])} | {_f(d['mean'], '+.2f')} | "
                         f"{interval} | {relative} % | {verdict} |")
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
