"""bf16 against fp32 quality (docs/bench/precision_quality.md): seeds pooled per precision and
paired by seed, read with the report's own t-interval and verdict."""

from __future__ import annotations

import pytest

from sectional_moe.bench.quality import compare, to_markdown


def _runs(group, fp32, bf16):
    return [{"group": group, "run": f"{p}-{s}", "precision": p, "seed": s, "val/ppl": v, "test/ppl": v - 5}
            for p, values in (("32-true", fp32), ("bf16-mixed", bf16)) for s, v in enumerate(values)]


def test_precisions_are_paired_by_seed_and_judged_by_the_interval():
    runs = _runs("same", [70.0, 80.0, 75.0], [70.3, 80.31, 75.29]) + _runs("worse", [70.0, 80.0, 75.0], [75.0, 85.1, 80.2])
    same, worse = compare(runs)
    d = same["val/ppl"]["paired_difference"]
    assert d["seeds"] == [0, 1, 2] and d["mean"] == pytest.approx(0.3, abs=1e-3)
    assert d["verdict"] == "worse" and d["within_seed_noise"]  # consistently a bit higher, but far below the seeds' spread
    w = worse["val/ppl"]["paired_difference"]
    assert w["verdict"] == "worse" and w["mean"] == pytest.approx(5.1, abs=0.1) and not w["within_seed_noise"]
    assert worse["val/ppl"]["32-true"]["ci95"][0] < 75.0 < worse["val/ppl"]["32-true"]["ci95"][1]


def test_unpaired_seeds_give_no_interval_and_the_markdown_says_so():
    report = {"date": "d", "command": "c", "roots": ["r"], "notes": ["conditions"],
              "groups": compare(_runs("g", [70.0], [71.0, 72.0]))}
    g = report["groups"][0]["val/ppl"]
    assert g["paired_difference"]["n"] == 1 and g["paired_difference"]["ci95"] is None
    md = to_markdown(report)
    assert "| g | 32-true | 1 | 70.00 | 70.00 | – | – |" in md and "no interval at n = 1" in md and "- conditions" in md
