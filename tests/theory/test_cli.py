"""The ``python -m sectional_moe.theory`` command line (human and --json output) and purity."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from sectional_moe.theory import cli
from sectional_moe.theory import cost_model as cm
from sectional_moe.theory import laws as lw


def run_json(capsys, *argv):
    assert cli.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_package_does_not_import_torch():
    code = (
        "import sys, sectional_moe.theory, sectional_moe.theory.cli, sectional_moe.theory.planner\n"
        "from sectional_moe.theory.cost_model import block_flops_comparison\n"
        "from sectional_moe.theory.planner import plan\n"
        "block_flops_comparison(d_model=256, seq_len=64, n_heads=8, experts=[2]); plan(budget=1e15, family='sectional')\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_module_entry_point_prints_the_cost_table():
    out = subprocess.run([sys.executable, "-m", "sectional_moe.theory", "cost", "--d-model", "4096", "--seq-len", "2048",
                          "--kappa", "1e8"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "9219.0" in text and "7.877" in text and "7.111" in text and "8.016" in text
    assert "8.02" in text and "8.14" in text  # closed form and exact root at κ = 1e8


def test_cost_json_has_the_golden_numbers(capsys):
    out = run_json(capsys, "cost", "--d-model", "4096", "--seq-len", "2048", "--kappa", "1e7", "1e8", "1e9")
    assert out["A_trad_macs"] == 103_079_215_104
    rows = {r["E"]: r for r in out["reduction_factors"]}
    assert rows[4]["r1_parallel"] == pytest.approx(3.765, rel=1e-3) and rows[64]["r1_summed"] == pytest.approx(63.015, rel=1e-3)
    par = out["e_opt"]["parallel"]
    assert [r["best_integer"] for r in par] == [17, 8, 4] and [r["best_power_of_two"] for r in par] == [16, 8, 4]
    assert par[0]["numeric_root"] == pytest.approx(17.33, rel=1e-3)
    exact = {r["E"]: r for r in out["exact_block_flops"]}
    assert exact[8]["ratio_qkv"] == pytest.approx(cm.r1_summed_qkv_factor(8), rel=1e-12)
    assert "[S]" in out["provenance"]["reported_qkv"] and "[I]" in out["provenance"]["r1_parallel"]


@pytest.fixture()
def runs_csv(tmp_path):
    params = lw.CHINCHILLA.coefficients("epoch")
    rng = np.random.default_rng(3)
    rows = []
    for C in np.geomspace(1e19, 1e21, 5):
        n0 = float(lw.chinchilla_frontier(C=C, **params)["N_opt"])
        for f in np.geomspace(0.25, 4, 6):
            rows.append({"params": n0 * f, "tokens": C / (6 * n0 * f)})
    df = pd.DataFrame(rows)
    df["loss"] = lw.chinchilla_loss(N=df["params"], D=df["tokens"], **params) * np.exp(rng.normal(0, 0.003, len(df)))
    df.loc[len(df)] = {"params": 1e9, "tokens": 1e10, "loss": np.nan}  # a diverged run
    path = tmp_path / "runs.csv"
    df.to_csv(path, index=False)
    return path


def test_fit_chinchilla_json_with_bootstrap_and_holdout(capsys, runs_csv):
    out = run_json(capsys, "fit", "chinchilla", str(runs_csv), "--n-col", "params", "--d-col", "tokens", "--loss-col", "loss",
                   "--grid", "small", "--bootstrap", "8", "--holdout", "largest_budget")
    assert out["n_points"] == 30 and out["n_starts"] == len(cli.ft.small_init_grid())
    assert out["dropped"][0]["rule"].startswith("nonfinite") and out["dropped"][0]["row"] == 30
    assert out["params"]["alpha"] == pytest.approx(0.3478, abs=0.03)
    assert out["settings"]["options"]["ftol"] == 1e-15 and out["settings"]["reduce"] == "sum"
    b = out["bootstrap"]
    assert b["n_resamples"] == 8 and b["ci_low"]["E"] <= out["params"]["E"] <= b["ci_high"]["E"]
    assert out["extrapolation"]["n_test"] == 6 and out["extrapolation"]["r2"] > 0.9


def test_fit_chinchilla_human_output_and_compute_column(capsys, tmp_path, runs_csv):
    df = pd.read_csv(runs_csv).dropna()
    df["compute"] = 6 * df["params"] * df["tokens"]
    path = tmp_path / "nc.csv"
    df.drop(columns=["tokens"]).to_csv(path, index=False)
    assert cli.main(["fit", "chinchilla", str(path), "--n-col", "params", "--c-col", "compute", "--loss-col", "loss",
                     "--grid", "small", "--chinchilla-bootstrap", "--bootstrap", "5", "--drop-top-k", "2"]) == 0
    text = capsys.readouterr().out
    assert "Chinchilla fit" in text and "objective" in text and "p10" in text and "p90" in text
    assert "dropped 2 rows" in text and "top_k(loss,2)" in text
    params = {line.split()[0] for line in text.splitlines() if line.strip()}
    assert {"E", "A", "B", "alpha", "beta", "a", "b", "G"} <= params


def test_fit_kappa_cli(capsys, tmp_path):
    E = np.repeat([1, 2, 4, 8, 16], 4).astype(float)
    rng = np.random.default_rng(0)
    t = 0.1 + 3.0 * cm.r1_qkv_cost_fraction(E, view="summed") + 2e-3 * E**2 + rng.normal(0, 0.004, E.size)
    path = tmp_path / "sweep.csv"
    pd.DataFrame({"experts": E, "step_time": t}).to_csv(path, index=False)
    out = run_json(capsys, "fit", "kappa", str(path), "--e-col", "experts", "--time-col", "step_time")
    assert out["preferred"] == "quadratic" and out["kappa"] == pytest.approx(2e-3, rel=0.05)
    true = cm.e_opt(a_trad=3.0, kappa=2e-3, view="summed")  # root ≈ 9.8: between the swept 8 and 16
    assert out["measured_e_opt"] == 8.0
    assert out["predicted"]["numeric_root"] == pytest.approx(true.numeric_root, rel=0.03)
    assert cli.main(["fit", "kappa", str(path)]) == 0
    text = capsys.readouterr().out
    assert "preferred by AIC: quadratic" in text and "E_opt measured" in text and "E_opt predicted" in text
    # the exact compute of each run as g(E): same κ here (the column is R1's fraction), no S(E) prediction
    pd.DataFrame({"experts": E, "step_time": t, "flops": 5e6 * cm.r1_qkv_cost_fraction(E, view="summed")}).to_csv(path, index=False)
    out = run_json(capsys, "fit", "kappa", str(path), "--work-col", "flops")
    assert out["compute_term"] == "exact" and out["kappa"] == pytest.approx(2e-3, rel=0.05) and out["predicted"] is None
    assert cli.main(["fit", "kappa", str(path), "--work-col", "flops"]) == 0
    assert "exact compute from column 'flops'" in capsys.readouterr().out


def test_fit_law_and_clark_cli(capsys, tmp_path):
    import itertools

    N, D, G = np.array(list(itertools.product(np.geomspace(1e8, 4e9, 4), np.geomspace(1e10, 1.5e11, 3), [1, 4, 16]))).T
    path = tmp_path / "fg.csv"
    pd.DataFrame({"n": N, "D": D, "G": G, "L": lw.FINE_GRAINED.predict(N=N, D=D, G=G)}).to_csv(path, index=False)
    out = run_json(capsys, "fit", "law", "fine_grained", str(path), "--input", "N=n", "--starts", "2")
    assert out["params"]["gamma"] == pytest.approx(0.58, rel=1e-4)
    N, E = np.array(list(itertools.product(np.geomspace(2e7, 1e9, 4), [1, 4, 16, 64, 256]))).T
    path = tmp_path / "clark.csv"
    pd.DataFrame({"N": N, "E": E, "router": "hash", "L": lw.CLARK.predict("hash", N=N, E=E)}).to_csv(path, index=False)
    out = run_json(capsys, "fit", "clark", str(path), "--group-col", "router")
    assert out["hash"]["params"]["e_start"] == pytest.approx(4.175, rel=1e-5)


def test_plan_cli_human_and_json(capsys):
    assert cli.main(["plan", "--budget", "1e18", "--family", "sectional"]) == 0
    text = capsys.readouterr().out
    assert "Wan, Han, Zhang, Jin 2026" in text and "python train.py -m model=sectional experts=16" in text
    assert "group=plan_1e18" in text and "DeepSeek LLM" in text and "[I] assumption" in text
    out = run_json(capsys, "plan", "--budget", "1e17", "--family", "dense", "--seq-len", "128", "--batch-size", "8")
    assert out["law"] == "chinchilla" and out["runs"][0]["seq_len"] == 128 and "data.batch_size=8" in out["commands"][0]


def test_laws_cli_lists_every_law_with_provenance(capsys):
    out = run_json(capsys, "laws")
    assert set(out["loss_laws"]) == set(lw.LAWS)
    assert out["loss_laws"]["zhao"]["published"]["zhao2025"]["provenance"] == "[S]"
    assert out["allocation_laws"]["wan2026"]["values"]["M_exp"] == 0.5437


def test_cli_errors_are_one_line(capsys, tmp_path):
    path = tmp_path / "x.csv"
    pd.DataFrame({"a": [1]}).to_csv(path, index=False)
    with pytest.raises(SystemExit, match="columns"):
        cli.main(["fit", "chinchilla", str(path)])
    assert cli.main(["plan", "--budget", "-1", "--family", "dense"]) == 2
    assert "budget" in capsys.readouterr().err
