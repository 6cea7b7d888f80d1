"""The ``python -m sectional_moe.theory`` command line (human and --json output), its refusals and
bad-input errors, the --plot figures, and its purity and start-up cost."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from sectional_moe.theory import cli
from sectional_moe.theory import cost_model as cm
from sectional_moe.theory import fitting as ft
from sectional_moe.theory import laws as lw


def run_json(capsys, *argv):
    assert cli.main([*argv, "--json"]) == 0
    text = capsys.readouterr().out
    assert "NaN" not in text and "Infinity" not in text
    return json.loads(text)


def run_error(capsys, *argv) -> str:
    """The command fails as bad input: exit code 2 and exactly one ``error:`` line on stderr."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


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


def test_help_loads_neither_scipy_nor_pandas_nor_matplotlib():
    """``--help`` must stay fast: the package and the CLI import only the standard library."""
    code = (
        "import sys\n"
        "from sectional_moe.theory import cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'numpy', 'scipy', 'pandas', 'matplotlib', 'torch'})\n"
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "HEAVY []"
    assert "isoflop" in out.stdout and "plan" in out.stdout


def test_lazy_package_names_resolve():
    import sectional_moe.theory as th

    assert th.fit_chinchilla is ft.fit_chinchilla and th.plan.__module__ == "sectional_moe.theory.planner"
    assert set(th.__all__) >= {"fit_chinchilla", "isoflop_analysis", "Underdetermined", "kappa_in_macs"}
    with pytest.raises(AttributeError):
        th.no_such_name  # noqa: B018


def test_hardcoded_choices_match_the_registry():
    assert cli.LAW_NAMES == tuple(sorted(lw.LAWS))
    assert cli.CHINCHILLA_SETS == tuple(sorted(lw.CHINCHILLA.published))


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


def _grid_csv(tmp_path, name="runs.csv", budgets=np.geomspace(1e19, 1e21, 5), sizes=6, noise=0.003, seed=3, nan_row=True):
    params = lw.CHINCHILLA.coefficients("epoch")
    rng = np.random.default_rng(seed)
    rows = []
    for C in budgets:
        n0 = float(lw.chinchilla_frontier(C=C, **params)["N_opt"])
        for f in np.geomspace(0.25, 4, sizes):
            rows.append({"params": n0 * f, "tokens": C / (6 * n0 * f)})
    df = pd.DataFrame(rows)
    df["loss"] = lw.chinchilla_loss(N=df["params"], D=df["tokens"], **params) * np.exp(rng.normal(0, noise, len(df)))
    if nan_row:
        df.loc[len(df)] = {"params": 1e9, "tokens": 1e10, "loss": np.nan}  # a diverged run
    path = tmp_path / name
    df.to_csv(path, index=False)
    return path


@pytest.fixture()
def runs_csv(tmp_path):
    return _grid_csv(tmp_path)


COLS = ("--n-col", "params", "--d-col", "tokens", "--loss-col", "loss")


def test_fit_chinchilla_json_with_bootstrap_and_holdout(capsys, runs_csv):
    out = run_json(capsys, "fit", "chinchilla", str(runs_csv), *COLS, "--grid", "small", "--bootstrap", "8", "--holdout", "largest_budget")
    assert out["n_points"] == 30 and out["n_starts"] == len(ft.small_init_grid())
    assert out["dropped"][0]["rule"].startswith("nonfinite") and out["dropped"][0]["row"] == 30
    assert out["params"]["alpha"] == pytest.approx(0.3478, abs=0.03)
    assert out["settings"]["options"]["ftol"] == 1e-15 and out["settings"]["reduce"] == "sum"
    assert out["identified"] is True and out["identifiability"]["rank"] == 5
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
    assert "dropped 2 rows" in text and "top_k(loss,2)" in text and "identified: yes" in text
    params = {line.split()[0] for line in text.splitlines() if line.strip()}
    assert {"E", "A", "B", "alpha", "beta", "a", "b", "G"} <= params


@pytest.mark.parametrize("scheme", ["loo", "kfold", "above"])
def test_pooled_and_threshold_extrapolation_checks_give_a_defined_r2(capsys, tmp_path, scheme):
    path = _grid_csv(tmp_path, budgets=np.geomspace(1e19, 1e21, 3), sizes=4, nan_row=False)
    extra = {"loo": [], "kfold": ["--folds", "3"], "above": ["--holdout-above", "5e20"]}[scheme]
    out = run_json(capsys, "fit", "chinchilla", str(path), *COLS, "--grid", "small", "--holdout", scheme, *extra)
    ex = out["extrapolation"]
    assert ex["holdout"] == scheme and isinstance(ex["r2"], float) and isinstance(ex["nmse"], float)
    assert ex["n_test"] == {"loo": 12, "kfold": 12, "above": 4}[scheme]
    if scheme != "above":  # pooled in-range predictions; extrapolating from 2 budgets to a 10x larger one is harder
        assert ex["r2"] > 0.8


def test_a_single_held_out_point_says_why_r2_is_undefined(capsys, tmp_path):
    path = _grid_csv(tmp_path, budgets=[1e19, 3e19, 1e20], sizes=4, nan_row=False)
    out = run_json(capsys, "fit", "chinchilla", str(path), *COLS, "--grid", "small", "--holdout", "largest_N")
    ex = out["extrapolation"]
    assert ex["n_test"] == 1 and ex["r2"] is None and ex["nmse"] is None
    assert "undefined for 1 held-out point" in ex["note"] and "--holdout loo or kfold" in ex["note"]


def test_chinchilla_fit_refuses_too_few_points(capsys, tmp_path):
    for n in (1, 3):
        path = tmp_path / f"few{n}.csv"
        pd.DataFrame({"N": np.geomspace(1e8, 1e9, n), "D": np.geomspace(1e10, 1e9, n), "L": np.linspace(3.0, 2.8, n)}).to_csv(path, index=False)
        err = run_error(capsys, "fit", "chinchilla", str(path), "--grid", "small", "--json")
        assert f"{n} point(s) for 5 free parameter(s)" in err and "at least 6" in err


def test_a_fit_the_data_do_not_identify_is_marked_and_its_json_stays_real(capsys, tmp_path):
    """One IsoFLOP budget: N and D move together, the floor E and B trade off."""
    path = _grid_csv(tmp_path, budgets=[1e20], sizes=8, nan_row=False)
    out = run_json(capsys, "fit", "chinchilla", str(path), *COLS, "--grid", "small")
    assert out["identified"] is False and out["identifiability"]["reasons"]
    assert all(v is None or isinstance(v, float) for v in out["derived"].values())
    df = pd.read_csv(path)
    fit = ft.fit_chinchilla(N=df["params"], D=df["tokens"], L=df["loss"], init=ft.small_init_grid()[:8])
    assert cli._identified_line(fit).startswith("  NOT IDENTIFIED: ") and not fit.identified


def test_derived_allocation_is_none_not_complex_when_an_exponent_is_zero():
    d = ft.chinchilla_derived({"E": 1.8, "A": 400.0, "B": 2000.0, "alpha": 0.0, "beta": 0.3})
    assert d == {"a": None, "b": None, "G": None}
    assert json.dumps(cli._clean({"x": complex(1, 2), "y": float("nan"), "z": np.float64(2.0), "w": np.array([1.0, np.inf])}),
                      allow_nan=False) == '{"x": null, "y": null, "z": 2.0, "w": [1.0, null]}'


def test_bad_input_is_one_line_naming_the_flag(capsys, tmp_path, runs_csv):
    err = run_error(capsys, "fit", "chinchilla", str(runs_csv), *COLS, "--chinchilla-bootstrap")
    assert err == "error: --chinchilla-bootstrap needs --bootstrap N"
    assert "--n-col" in run_error(capsys, "fit", "chinchilla", str(runs_csv))
    assert "not found" in run_error(capsys, "fit", "chinchilla", str(tmp_path / "nope.csv"))
    df = pd.read_csv(runs_csv)
    df["loss"] = df["loss"].astype(object)
    df.loc[4, "loss"] = "2.9x"
    bad = tmp_path / "bad.csv"
    df.to_csv(bad, index=False)
    err = run_error(capsys, "fit", "chinchilla", str(bad), *COLS)
    assert "row 4 (line 6), column 'loss': '2.9x' is not a number" in err
    assert "--budget" in run_error(capsys, "plan", "--budget", "-1", "--family", "dense")
    assert "--holdout-above" in run_error(capsys, "fit", "chinchilla", str(runs_csv), *COLS, "--holdout-above", "1e20")
    assert "--input" in run_error(capsys, "fit", "law", "fine_grained", str(runs_csv), "--input", "N")


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
    # the exact compute (FLOPs per step) as g(E): same κ, no S(E) prediction, and κ in the planner's unit
    flops = 5e9 * cm.r1_qkv_cost_fraction(E, view="summed")
    pd.DataFrame({"experts": E, "step_time": t, "flops": flops}).to_csv(path, index=False)
    out = run_json(capsys, "fit", "kappa", str(path), "--work-col", "flops", "--sequences-per-step", "8", "--sectional-layers", "2")
    assert out["compute_term"] == "exact" and out["kappa"] == pytest.approx(2e-3, rel=0.05) and out["predicted"] is None
    assert out["rate"] == pytest.approx(5e9 / 3.0, rel=0.05)  # t = 3 s per 5e9 FLOPs of compute: 1.67e9 FLOP/s
    assert out["kappa_macs_per_E2_seq_layer"] == pytest.approx(out["kappa"] * out["rate"] / 2 / 16, rel=1e-9)
    plot = tmp_path / "kappa.png"
    assert cli.main(["fit", "kappa", str(path), "--work-col", "flops", "--plot", str(plot)]) == 0
    assert "exact compute from column 'flops'" in capsys.readouterr().out and plot.read_bytes()[:4] == b"\x89PNG"
    assert "--work-col" in run_error(capsys, "fit", "kappa", str(path), "--sequences-per-step", "8", "--sectional-layers", "2")


def test_fit_law_and_clark_cli(capsys, tmp_path):
    N, D, G = np.array(list(itertools.product(np.geomspace(1e8, 4e9, 4), np.geomspace(1e10, 1.5e11, 3), [1, 4, 16]))).T
    path = tmp_path / "fg.csv"
    pd.DataFrame({"n": N, "D": D, "G": G, "L": lw.FINE_GRAINED.predict(N=N, D=D, G=G)}).to_csv(path, index=False)
    plot = tmp_path / "fg.png"
    out = run_json(capsys, "fit", "law", "fine_grained", str(path), "--input", "N=n", "--starts", "2", "--plot", str(plot))
    assert out["params"]["gamma"] == pytest.approx(0.58, rel=1e-4) and out["identified"] is True
    assert plot.read_bytes()[:4] == b"\x89PNG"
    N, E = np.array(list(itertools.product(np.geomspace(2e7, 1e9, 4), [1, 4, 16, 64, 256]))).T
    path = tmp_path / "clark.csv"
    pd.DataFrame({"N": N, "E": E, "router": "hash", "L": lw.CLARK.predict("hash", N=N, E=E)}).to_csv(path, index=False)
    out = run_json(capsys, "fit", "clark", str(path), "--group-col", "router", "--plot", str(tmp_path / "c.png"))
    assert out["hash"]["params"]["e_start"] == pytest.approx(4.175, rel=1e-5) and (tmp_path / "c.png").is_file()


def test_underdetermined_law_fits_are_refused(capsys, tmp_path):
    path = tmp_path / "fg4.csv"
    pd.DataFrame({"N": [1e8, 2e8, 4e8, 8e8], "D": [1e10, 2e10, 4e10, 8e10], "G": [1, 2, 4, 8], "L": [3.2, 3.1, 3.0, 2.9]}).to_csv(path, index=False)
    err = run_error(capsys, "fit", "law", "fine_grained", str(path))
    assert "4 point(s) for 7 free parameter(s)" in err
    path = tmp_path / "clark4.csv"
    pd.DataFrame({"N": [1e8, 1e8, 1e9, 1e9], "E": [1, 8, 1, 8], "L": [2.7, 2.5, 2.2, 2.1]}).to_csv(path, index=False)
    assert "4 point(s) for 6 free parameter(s)" in run_error(capsys, "fit", "clark", str(path))
    # enough points but one G value: the granularity terms cannot be told apart
    N, D = np.array(list(itertools.product(np.geomspace(1e8, 4e9, 4), np.geomspace(1e10, 1.5e11, 3)))).T
    pd.DataFrame({"N": N, "D": D, "G": 4, "L": lw.FINE_GRAINED.predict(N=N, D=D, G=4)}).to_csv(path, index=False)
    assert "G takes 1 distinct value" in run_error(capsys, "fit", "law", "fine_grained", str(path))
    # ... unless they are held fixed
    out = run_json(capsys, "fit", "law", "fine_grained", str(path), "--fix", "g=2.1", "--fix", "gamma=0.58", "--starts", "2")
    assert out["params"]["g"] == 2.1


def test_chinchilla_plot_draws_data_fit_residuals_and_band(capsys, tmp_path, runs_csv):
    plot = tmp_path / "fit.png"
    assert cli.main(["fit", "chinchilla", str(runs_csv), *COLS, "--grid", "small", "--bootstrap", "5", "--plot", str(plot)]) == 0
    assert f"plot: {plot}" in capsys.readouterr().out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 20_000


def test_plan_cli_human_and_json(capsys):
    assert cli.main(["plan", "--budget", "1e18", "--family", "sectional"]) == 0
    text = capsys.readouterr().out
    assert "Wan, Han, Zhang, Jin 2026" in text and "python train.py -m model=sectional experts=" in text
    assert "group=plan_1e18" in text and "DeepSeek LLM" in text and "[I] assumption" in text
    assert "data=hub" in text and "warning: the plan trains on" in text and "optim.lr=" in text
    out = run_json(capsys, "plan", "--budget", "1e13", "--family", "dense", "--seq-len", "128", "--batch-size", "8")
    assert out["law"] == "chinchilla" and out["runs"][0]["seq_len"] == 128 and "data.batch_size=8" in out["commands"][0]
    assert out["data"]["name"] in ("shakespeare", "wikitext103") and f"data={out['data']['name']}" in out["commands"][0]


def test_plan_refuses_data_it_would_repeat(capsys):
    err = run_error(capsys, "plan", "--budget", "1e18", "--family", "sectional", "--data", "shakespeare")
    assert "--data shakespeare" in err and "epochs" in err and "--max-epochs" in err
    assert "--hub-path" in run_error(capsys, "plan", "--budget", "1e18", "--family", "dense", "--data", "hub", "--data-tokens", "1e10")
    out = run_json(capsys, "plan", "--budget", "1e18", "--family", "dense", "--data", "hub", "--hub-path", "my/corpus",
                   "--data-tokens", "1e10")
    assert "data=hub data.hub_path=my/corpus" in out["commands"][0] and out["data"]["epochs"] < 1


def test_plan_from_our_own_fit_and_refusal_of_an_unidentified_one(capsys, tmp_path, runs_csv):
    fit = run_json(capsys, "fit", "chinchilla", str(runs_csv), *COLS, "--grid", "small")
    path = tmp_path / "fit.json"
    path.write_text(json.dumps(fit))
    out = run_json(capsys, "plan", "--budget", "1e20", "--family", "dense", "--from-fit", str(path))
    f = lw.chinchilla_frontier(C=1e20, **fit["params"])
    assert out["allocation"]["N_opt"] == pytest.approx(float(f["N_opt"])) and "own fitted coefficients" in out["law_provenance"]
    fit["identified"], fit["identifiability"] = False, {"reasons": ["rank-deficient"]}
    path.write_text(json.dumps(fit))
    assert "not identified" in run_error(capsys, "plan", "--budget", "1e20", "--family", "dense", "--from-fit", str(path))
    report = tmp_path / "fits.json"
    report.write_text(json.dumps({"chinchilla": [{"family": "dense", "law": "chinchilla", "reason": "degenerate fit, not a result: x",
                                                  **fit["params"]}]}))
    assert "not a result" in run_error(capsys, "plan", "--budget", "1e20", "--family", "dense", "--from-fit", str(report))


def test_laws_cli_lists_every_law_with_provenance(capsys):
    out = run_json(capsys, "laws")
    assert set(out["loss_laws"]) == set(lw.LAWS)
    assert out["loss_laws"]["zhao"]["published"]["zhao2025"]["provenance"] == "[S]"
    assert out["loss_laws"]["chinchilla"]["min_distinct"] == {"N": 3, "D": 3}
    assert out["allocation_laws"]["wan2026"]["values"]["M_exp"] == 0.5437
