"""IsoFLOP analysis (Hoffmann Approaches 1 and 2) and Wan-style allocation laws, on synthetic runs
drawn from the Epoch coefficients (no third-party data), and the ``theory isoflop`` command."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from sectional_moe.theory import cli
from sectional_moe.theory import isoflop as iso
from sectional_moe.theory import laws as lw

EPOCH = lw.CHINCHILLA.coefficients("epoch")
A_TRUE = EPOCH["beta"] / (EPOCH["alpha"] + EPOCH["beta"])  # 0.5126 [D]


def grid(budgets=np.geomspace(1e18, 1e21, 5), sizes=7, spread=4.0, noise=0.0, seed=0, family="dense", off=1.0):
    """Runs at fixed budgets C (M = 6N, so C = 6ND), sizes log-evenly spaced around the law's N_opt
    (times ``off``: off-centre sampling)."""
    rng = np.random.default_rng(seed)
    rows = []
    for C in budgets:
        n0 = float(lw.chinchilla_frontier(C=C, **EPOCH)["N_opt"]) * off
        for f in np.geomspace(1 / spread, spread, sizes):
            N = n0 * f
            L = float(lw.chinchilla_loss(N=N, D=C / (6 * N), **EPOCH)) * float(np.exp(rng.normal(0, noise)))
            rows.append({"run": f"{family}-{C:.1e}-{f:.3f}", "family": family, "N": N, "M": 6 * N, "C": C, "L": L})
    return pd.DataFrame(rows)


def test_budget_groups_join_runs_within_the_tolerance():
    labels = iso.budget_groups([1.00e18, 1.04e18, 1.2e18, 3e18, 3.1e18])
    assert list(labels) == [0, 0, 1, 2, 2]


def test_approach2_recovers_the_allocation_exponent_of_the_law():
    (r,) = iso.isoflop_analysis(grid())
    a2 = r.approach2
    assert a2["reason"] is None and (a2["profiles_N"]["status"] == "ok").all()
    assert a2["N_opt"]["exponent"] == pytest.approx(A_TRUE, abs=0.005)
    # M = 6N exactly here, so M_opt ∝ C^a and D_opt = C/M_opt ∝ C^(1-a)
    assert a2["M_opt"]["exponent"] == pytest.approx(a2["N_opt"]["exponent"], abs=1e-9)
    assert a2["D_opt"]["exponent"] == pytest.approx(1 - a2["N_opt"]["exponent"], abs=1e-9) and a2["a_plus_b"] == pytest.approx(1.0)
    # each vertex is near the law's own optimum on that IsoFLOP curve
    for _, row in a2["profiles_N"].iterrows():
        n_true = float(lw.chinchilla_frontier(C=row["C"], **EPOCH)["N_opt"])
        assert row["N_opt"] == pytest.approx(n_true, rel=0.05)


def test_bootstrap_bands_cover_the_truth_on_noisy_runs():
    (r,) = iso.isoflop_analysis(grid(noise=0.004, seed=1), n_boot=60, seed=2)
    b = r.approach2["bootstrap"]
    assert b["failed"] == 0 and b["ci_low"]["a"] < A_TRUE < b["ci_high"]["a"]
    lo, hi = r.approach2["bands"]["N_opt"]
    C = r.approach2["bands"]["C"]
    truth = np.array([float(lw.chinchilla_frontier(C=c, **EPOCH)["N_opt"]) for c in C])
    assert np.mean((lo <= truth * 1.05) & (truth <= hi * 1.05)) > 0.9
    s = r.summary()
    assert s["N_opt_exp_ci95"].startswith("[") and s["budgets_used"] == 5
    json.dumps(r.to_dict(), allow_nan=False)


def test_off_centre_and_thin_budgets_are_flagged_or_left_out():
    df = pd.concat([grid(budgets=[1e18, 1e19, 1e20]), grid(budgets=[1e21], off=6.0)])  # the last budget sampled far above its optimum
    (r,) = iso.isoflop_analysis(df)
    status = dict(zip(r.approach2["profiles_N"]["C"].round(-15), r.approach2["profiles_N"]["status"]))
    assert status[1e21] == "outside" and r.approach2["N_opt"]["n"] == 3
    assert any("outside the sampled sizes" in n for n in r.notes)
    thin = grid(budgets=[1e18, 1e19], sizes=2)
    (t,) = iso.isoflop_analysis(thin)
    assert t.approach2["N_opt"] is None and "interior loss minimum" in t.approach2["reason"]


def _curves(sizes, horizon_c, points=40):
    """Validation curves of runs trained to ``horizon_c``: loss of the law at each cumulative C."""
    rows = []
    for N in sizes:
        for c in np.geomspace(horizon_c / 300, horizon_c, points):
            rows.append({"run": f"n{N:.3g}", "C": c, "L": float(lw.chinchilla_loss(N=N, D=c / (6 * N), **EPOCH))})
    return pd.DataFrame(rows)


def test_approach1_envelope_follows_the_law():
    sizes = np.geomspace(2e7, 2e10, 16)
    curves = _curves(sizes, 1e22)
    runs = pd.DataFrame({"run": [f"n{N:.3g}" for N in sizes], "family": "dense", "N": sizes, "M": 6 * sizes, "C": 1e22,
                         "L": [g["L"].iloc[-1] for _, g in curves.groupby("run", sort=False)]})
    (r,) = iso.isoflop_analysis(runs, curves, n_boot=20)
    a1 = r.approach1
    assert a1["reason"] is None and len(a1["winners"]) >= 5
    assert a1["N_opt"]["exponent"] == pytest.approx(A_TRUE, abs=0.04)
    assert a1["bootstrap"]["ci_low"]["a"] <= a1["N_opt"]["exponent"] <= a1["bootstrap"]["ci_high"]["a"]
    assert r.approach2["reason"] is not None  # all runs share one budget: no IsoFLOP power law, and it says why
    one = iso.approach1_envelope(curves[curves["run"] == "n2e+07"], runs[["run", "N", "M"]])
    assert "envelope needs training curves of >= 2 runs" in one["reason"]


def test_isoflop_cli_on_a_synthetic_grid(capsys, tmp_path):
    df = pd.concat([grid(noise=0.003, seed=4), grid(noise=0.003, seed=5, family="sectional")])
    df = df.assign(D=df["C"] / df["M"]).drop(columns=["M", "C"])  # what a user has: N, D, loss
    path = tmp_path / "grid.csv"
    df.to_csv(path, index=False)
    plot = tmp_path / "iso.png"
    assert cli.main(["isoflop", str(path), "--bootstrap", "30", "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert "== family dense" in text and "== family sectional" in text and "N_opt(C) =" in text
    assert "Wan et al. 2026 [P]" in text and "M = 6N (C = 6ND)" in text and plot.read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["isoflop", str(path), "--bootstrap", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    fams = {f["family"]: f for f in out["families"]}
    assert fams["dense"]["approach2"]["N_opt"]["exponent"] == pytest.approx(A_TRUE, abs=0.02)
    assert fams["dense"]["published"]["wan2026"]["M_opt"]["exponent"] == 0.5437


def test_isoflop_cli_reads_a_report_directory_and_says_what_it_needs(capsys, tmp_path):
    g = grid()
    table = pd.DataFrame({"run_id": g["run"], "family": g["family"], "state": "done", "params_total": g["N"], "flops_per_token": g["M"],
                          "compute_flops": g["C"], "val_loss_best": g["L"]})
    (tmp_path / "report").mkdir()
    table.to_csv(tmp_path / "report" / "runs.csv", index=False)
    _curves(np.geomspace(1e8, 1e10, 6), 1e21).assign(run=lambda d: d["run"]).to_csv(tmp_path / "report" / "curves.csv", index=False)
    assert cli.main(["isoflop", str(tmp_path), "--bootstrap", "0"]) == 0
    text = capsys.readouterr().out
    assert "the report's table" in text and "N_opt(C) =" in text and "Approach 1" in text
    assert cli.main(["isoflop", str(tmp_path / "nothing")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["isoflop", str(tmp_path / "empty")]) == 2
    assert "python -m sectional_moe.report" in capsys.readouterr().err
