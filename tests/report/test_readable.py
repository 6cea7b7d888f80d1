"""The report stays readable (issue 19): the comparison table says once what every run shares, and a
loss-vs-compute axis over a narrow range has few, non-overlapping tick labels."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from sectional_moe.report.figures import compute_axis, eng  # noqa: E402
from sectional_moe.report.html import compact  # noqa: E402


def test_the_comparison_table_drops_what_every_row_shares():
    df = pd.DataFrame({
        "run": ["experiment=quick,experts=4,routing=topk,tags=[a,b]", "experiment=quick,experts=8,routing=topk,tags=[a,b]"],
        "family": ["sectional", "sectional"], "size": ["nano", "nano"], "experts": [4, 8], "seed": [0, 0],
        "val_ppl_best": [120.0, 118.0], "state": ["done", "done"], "mfu": [None, None]})
    table, shared = compact(df, keep=("run", "val_ppl_best"))
    assert list(table["run"]) == ["experts=4", "experts=8"]
    assert list(table.columns) == ["run", "experts", "val_ppl_best"]
    assert shared == ["experiment=quick", "routing=topk", "tags=[a,b]", "family=sectional", "size=nano", "seed=0", "state=done"]
    one, none = compact(df.head(1))
    assert none == [] and list(one.columns) == list(df.columns)  # one row: nothing to factor out


def _overlaps(ax) -> list[tuple[str, str]]:
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = [t for t in ax.get_xticklabels(which="both") if t.get_text() and t.get_visible()
              and ax.get_xlim()[0] <= t.get_position()[0] <= ax.get_xlim()[1]]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in labels]
    return [(a, b) for i, (a, ba) in enumerate(boxes) for b, bb in boxes[i + 1:] if ba.overlaps(bb)]


# (1e14, 1.2e14), (3e14, 3.15e14) and (3e14, 6e15) overlap with matplotlib's own log ticks at this size
@pytest.mark.parametrize("lo,hi", [(1.0e14, 1.2e14), (3.0e14, 3.15e14), (3.0e14, 6.0e15), (2.1e14, 2.6e14), (1.0e14, 1.0e14)],
                         ids=["1.2x", "1.05x", "20x", "1.24x", "one-point"])
def test_a_narrow_compute_axis_has_readable_ticks(lo, hi):
    values = np.geomspace(lo, hi, 6)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(values, np.linspace(4.0, 3.8, 6))
    compute_axis(ax, values)
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert 1 <= len(labels) <= 4 and all(label[-1] in "TP" for label in labels), labels
    assert _overlaps(ax) == []
    plt.close(fig)


def test_matplotlibs_own_ticks_do_overlap_there():  # the failure the helper exists for
    fig, ax = plt.subplots(figsize=(7, 4.5))
    values = np.geomspace(1.0e14, 1.2e14, 6)
    ax.scatter(values, values * 0)
    ax.set_xscale("log")
    assert _overlaps(ax)
    plt.close(fig)


def test_a_wide_compute_axis_keeps_matplotlibs_log_ticks():
    fig, ax = plt.subplots()
    ax.scatter([1e12, 1e16], [4, 3])
    compute_axis(ax, [1e12, 1e16])
    assert ax.get_xscale() == "log" and _overlaps(ax) == []
    plt.close(fig)
    assert eng(3.4e14) == "340T" and eng(1.2e18) == "1.2E" and eng(5e5) == "500k"
