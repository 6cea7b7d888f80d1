"""Fitters: exact recovery (scaling-laws.md §9.1 row 10), the loss-scale trap, bootstrap,
extrapolation error, drop rules, generic and Clark fitters."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import optimize

from sectional_moe.theory import fitting as ft
from sectional_moe.theory.fitting.identify import COND_MAX
from sectional_moe.theory import laws as lw
from tests.theory.printed import assert_printed

ROUNDED = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
# 8 starts: enough for these well-posed problems; the 4500-start Hoffmann grid stays the default
FEW_STARTS = ft.init_grid(e=[0.0, 0.5], a=[0.0, 5.0], b=[5.0, 10.0], alpha=[0.5], beta=[0.5])


def isoflop_data(params, budgets, sizes_per_budget, spread=8.0):
    """Noise-free IsoFLOP grid: at each budget C, N spans N_opt/spread … N_opt·spread (log-even),
    D = C/(6N) (the sampling of the vpnls recipe, scaling-laws.md §9.1 row 10)."""
    rows = []
    for C in budgets:
        n0 = float(lw.chinchilla_frontier(C=C, **params)["N_opt"])
        for f in np.geomspace(1 / spread, spread, sizes_per_budget):
            rows.append({"C": C, "N": n0 * f, "D": C / (6 * n0 * f)})
    df = pd.DataFrame(rows)
    df["L"] = lw.chinchilla_loss(N=df["N"], D=df["D"], **params)
    return df


@pytest.fixture(scope="module")
def row10():
    return isoflop_data(ROUNDED, np.geomspace(1e17, 1e22, 8), 16)


@pytest.fixture(scope="module")
def chinchilla_like():
    """Chinchilla-like noisy data: Epoch's coefficients, 9 IsoFLOP budgets over Hoffmann's
    Approach 2 range (6e18–3e21), 8 sizes each, 1 % log-normal noise."""
    df = isoflop_data(lw.CHINCHILLA.coefficients("epoch"), np.geomspace(6e18, 3e21, 9), 8, spread=4.0)
    rng = np.random.default_rng(0)
    df["L"] = df["L"] * np.exp(rng.normal(0.0, 0.01, len(df)))
    return df


# ------------------------------------------------------------------------------------------
def test_row10_huber_fit_recovers_noise_free_parameters_exactly(row10):
    fit = ft.fit_chinchilla(N=row10["N"], D=row10["D"], L=row10["L"], init=FEW_STARTS)
    assert len(row10) == 128
    for k, v in ROUNDED.items():
        assert fit.params[k] == pytest.approx(v, rel=1e-6), k
    assert fit.success and fit.objective < 1e-15
    assert fit.derived["a"] == pytest.approx(0.28 / 0.62, rel=1e-6)


def test_row10_vpnls_recovers_noise_free_parameters_exactly(row10):
    grid = np.round(np.arange(0.20, 0.50, 0.01), 10)
    fit = ft.fit_vpnls(N=row10["N"], D=row10["D"], L=row10["L"], alpha_grid=grid, beta_grid=grid)
    for k, v in ROUNDED.items():
        assert fit.params[k] == pytest.approx(v, rel=1e-6), k


# Row 11's 124 points (Chinchilla's MassiveText IsoFLOP runs, experiment
# ml_scalefit__massivetext__chinchilla of the HF dataset open-athena/isoflop-experiments) are
# third-party data whose licence we could not establish, so they are not shipped: export them to
# a CSV with columns budget, params, tokens, loss and point SMOE_ISOFLOP_CSV at it.
MASSIVETEXT = os.environ.get("SMOE_ISOFLOP_CSV")


@pytest.fixture(scope="module")
def massivetext() -> pd.DataFrame:
    """The 124 points of row 11, from ``SMOE_ISOFLOP_CSV``."""
    if not MASSIVETEXT or not Path(MASSIVETEXT).is_file():
        pytest.skip("row 11 needs the 124 MassiveText IsoFLOP points (HF dataset open-athena/isoflop-experiments, "
                    "experiment ml_scalefit__massivetext__chinchilla), not downloadable here and not shipped (licence "
                    "unclear); export them to CSV (columns budget, params, tokens, loss) and set SMOE_ISOFLOP_CSV")
    df = pd.read_csv(MASSIVETEXT, comment="#")
    assert len(df) == 124 and df["budget"].nunique() == 9
    return df


def _row11_fit(df: pd.DataFrame, irls_iters: int, lo: float = 0.05, hi: float = 1.0) -> ft.FitResult:
    grid = np.round(np.arange(lo, hi + 1e-4, 0.01), 10)  # the README's resolution 0.01
    return ft.fit_vpnls(N=df["params"], D=df["tokens"], L=df["loss"], loss="huber", delta=1e-3, n_scale=1e6, d_scale=1e9,
                        alpha_grid=grid, beta_grid=grid, refine=False, irls_iters=irls_iters)


def test_row11_vpnls_linear_huber_on_massivetext_points(massivetext):
    """vpnls's grid solver does 10 IRLS reweights per grid point; with the same the published fit
    comes out at its printed precision (α, β to 0.01 by the grid; E, A, B to 5 digits)."""
    fit = _row11_fit(massivetext, irls_iters=10)
    assert fit.params["alpha"] == pytest.approx(0.36, abs=1e-9)
    assert fit.params["beta"] == pytest.approx(0.40, abs=1e-9)
    for k, printed in {"E": "1.8608", "A": "4.1479", "B": "1.0546"}.items():
        assert_printed(fit.params[k], printed)
    # the README's comparison table: mean Huber loss x 1e6 = 13.1 (ours is the sum)
    assert_printed(fit.objective / 124 * 1e6, "13.1")
    assert fit.derived["A_raw"] == pytest.approx(fit.params["A"] * 1e6**0.36) and 500 < fit.derived["A_raw"] < 700


def test_row11_converged_irls_finds_a_lower_objective_one_grid_step_away(massivetext):
    """Iterated to convergence the Huber profile is lower at α = 0.37 than at the published 0.36:
    row 11's α is a property of the 10-iteration recipe, not of the data alone."""
    # near the optimum only (the full grid at 100 iterations takes ~25 s on one core)
    fit = _row11_fit(massivetext, irls_iters=100, lo=0.30, hi=0.45)
    published = _row11_fit(massivetext, irls_iters=10, lo=0.30, hi=0.45)
    assert (fit.params["alpha"], fit.params["beta"]) == pytest.approx((0.37, 0.40), abs=1e-9)
    assert fit.objective < published.objective


def test_analytic_gradient_matches_finite_differences(chinchilla_like):
    lnN, lnD, lnL = (np.log(chinchilla_like[c].to_numpy()) for c in ("N", "D", "L"))
    # a point where most residuals are in the linear Huber region and some in the quadratic one
    theta = np.array([0.6, 6.2, 7.6, 0.35, 0.37])
    for reduce in ("sum", "mean"):
        err = optimize.check_grad(lambda t: ft.chinchilla_objective(t, lnN, lnD, lnL, 1e-3, reduce)[0],
                                  lambda t: ft.chinchilla_objective(t, lnN, lnD, lnL, 1e-3, reduce)[1], theta, epsilon=1e-7)
        scale = np.linalg.norm(ft.chinchilla_objective(theta, lnN, lnD, lnL, 1e-3, reduce)[1])
        assert err < 1e-5 * scale
    s, _ = ft.chinchilla_objective(theta, lnN, lnD, lnL, 1e-3, "sum")
    m, _ = ft.chinchilla_objective(theta, lnN, lnD, lnL, 1e-3, "mean")
    assert m == pytest.approx(s / lnL.size, rel=1e-14)


def test_huber_is_quadratic_then_linear():
    r = np.array([-0.01, -1e-3, 0.0, 5e-4, 0.02])
    np.testing.assert_allclose(ft.huber(r, delta=1e-3), [1e-3 * (0.01 - 5e-4), 5e-7, 0.0, 1.25e-7, 1e-3 * (0.02 - 5e-4)])
    np.testing.assert_allclose(ft.huber_grad(r, delta=1e-3), [-1e-3, -1e-3, 0.0, 5e-4, 1e-3])


def test_hoffmann_grid_is_4500_starts_and_every_start_is_kept(row10):
    grid = ft.hoffmann_init_grid()
    assert grid.shape == (4500, 5)
    assert sorted(np.unique(grid[:, 1])) == [0, 5, 10, 15, 20, 25]
    fit = ft.fit_chinchilla(N=row10["N"], D=row10["D"], L=row10["L"], init=FEW_STARTS)
    assert len(fit.starts) == len(FEW_STARTS) == fit.settings["n_starts"]
    assert {"init_e", "init_beta", "e", "beta", "objective", "success", "nit"} <= set(fit.starts.columns)
    assert fit.objective == fit.starts["objective"].min()
    assert fit.settings["options"] == {"maxiter": 15000, "ftol": 1e-15, "gtol": 1e-12}


def test_loss_scale_trap_mean_objective_with_default_tolerances_stalls(chinchilla_like):
    """Besiroglu et al. 2024 [P]: minimising the *mean* Huber loss with scipy's default L-BFGS-B
    tolerances stops almost at once near the start (here Hoffmann's TeX values); the *summed*
    objective with ftol=1e-15, gtol=1e-12 reaches the optimum. Reproduced on Chinchilla-like
    synthetic data (the Epoch CSV is not available offline)."""
    df = chinchilla_like
    start = ft.params_to_theta(lw.CHINCHILLA.coefficients("hoffmann_tex"))[None, :]
    reference = ft.fit_chinchilla(N=df["N"], D=df["D"], L=df["L"], init=FEW_STARTS)  # multi-start, summed, tight
    trap = ft.fit_chinchilla(N=df["N"], D=df["D"], L=df["L"], init=start, reduce="mean", default_tolerances=True)
    fixed = ft.fit_chinchilla(N=df["N"], D=df["D"], L=df["L"], init=start, reduce="sum")

    # the trap: the optimiser reports success but stayed near the start
    assert trap.success
    assert trap.params["B"] == pytest.approx(410.72, rel=0.01)  # the start; the optimum has B in the thousands
    assert trap.params["beta"] == pytest.approx(0.2849, abs=0.01)
    trap_sum = trap.objective * trap.n_points  # compare on the summed scale
    assert trap_sum > 1.10 * reference.objective

    # as Epoch found on the real data, the summed objective also stalls with default tolerances
    stalled = ft.fit_chinchilla(N=df["N"], D=df["D"], L=df["L"], init=start, reduce="sum", default_tolerances=True)
    assert stalled.objective > 1.10 * reference.objective

    # the fix: same single start, summed objective, tight tolerances -> the multi-start optimum
    assert fixed.objective == pytest.approx(reference.objective, rel=1e-9)
    for k in ("E", "alpha", "beta"):
        assert fixed.params[k] == pytest.approx(reference.params[k], rel=1e-5)
    assert reference.params["B"] > 2000 and reference.params["beta"] > 0.33
    assert reference.settings["n_starts_at_best"] == len(FEW_STARTS)


def test_noisy_fit_is_close_and_cluster_bootstrap_brackets_it(chinchilla_like):
    df = chinchilla_like
    fit = ft.fit_chinchilla(N=df["N"], D=df["D"], L=df["L"], init=FEW_STARTS)
    truth = lw.CHINCHILLA.coefficients("epoch")
    assert fit.params["E"] == pytest.approx(truth["E"], rel=0.05)
    assert fit.params["alpha"] == pytest.approx(truth["alpha"], abs=0.03)
    assert fit.derived["a"] == pytest.approx(truth["beta"] / (truth["alpha"] + truth["beta"]), abs=0.05)
    boot = ft.bootstrap_chinchilla(fit, data=df, n_boot=20, unit="C", seed=1)
    assert fit.bootstrap is boot and boot.n_failed == 0
    assert len(boot.samples) == 20 and {"E", "alpha", "a", "G"} <= set(boot.samples.columns)
    for k in ("E", "alpha", "beta", "a"):
        assert boot.se[k] > 0
        assert boot.ci_low[k] <= boot.ci_high[k]
    assert boot.ci_low["E"] < fit.params["E"] < boot.ci_high["E"]
    assert boot.cov.shape[0] == boot.samples.shape[1]
    out = fit.to_dict()
    assert out["bootstrap"]["settings"]["unit"] == "C"


def test_bootstrap_units_and_the_chinchilla_80_percent_variant():
    data = pd.DataFrame({"g": np.repeat(np.arange(10), 3), "x": np.arange(30.0)})
    seen = []

    def record(df):
        seen.append(df)
        return {"mean": float(df["x"].mean())}

    ft.bootstrap_fit(data=data, fit=record, n_boot=5, unit="g", seed=0)
    for df in seen:  # whole clusters of 3 rows, 10 clusters drawn with replacement
        assert len(df) == 30 and (df.groupby("g").size() % 3 == 0).all()
    seen.clear()
    res = ft.bootstrap_fit(data=data, fit=record, seed=0, **ft.CHINCHILLA_BOOTSTRAP)
    assert len(res.samples) == 100 and res.settings["ci"] == [10.0, 90.0]
    for df in seen:  # 80 % of the rows, without replacement
        assert len(df) == 24 and df["x"].is_unique
    assert res.ci_low["mean"] == pytest.approx(res.samples["mean"].quantile(0.1))
    with pytest.raises(KeyError, match="unit"):
        ft.bootstrap_fit(data=data, fit=record, n_boot=1, unit="nope")


def test_failed_bootstrap_refits_are_counted_not_raised():
    data = pd.DataFrame({"x": np.arange(5.0)})
    calls = iter(range(10))

    def flaky(df):
        if next(calls) % 2:
            raise RuntimeError("diverged")
        return {"m": 1.0}

    res = ft.bootstrap_fit(data=data, fit=flaky, n_boot=4)
    assert res.n_failed == 2 and res.samples["m"].isna().sum() == 2


# ------------------------------------------------------------------------------------------
def test_extrapolation_metrics_definitions():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    assert ft.extrapolation_metrics(y_true=y, y_pred=y)["r2"] == 1.0
    m = ft.extrapolation_metrics(y_true=y, y_pred=np.full(4, 2.5))  # predicting the mean
    assert m["r2"] == pytest.approx(0.0) and m["nmse"] == pytest.approx(1.0) and m["nmae"] == pytest.approx(1.0)
    m = ft.extrapolation_metrics(y_true=y, y_pred=y + 0.5)
    assert m["mae"] == 0.5 and m["rmse"] == 0.5 and m["nmse"] == pytest.approx(0.25 / 1.25)


def test_holdout_of_the_largest_budget_and_extrapolation_of_a_true_law(row10):
    mask = ft.holdout_largest(row10, column="C")
    assert mask.sum() == 16 and row10.loc[mask, "C"].nunique() == 1 and row10.loc[mask, "C"].iloc[0] == row10["C"].max()
    assert ft.holdout_largest(row10, column="N", n_groups=3).sum() == 3

    def fit_predict(train, test):
        f = ft.fit_chinchilla(N=train["N"], D=train["D"], L=train["L"], init=FEW_STARTS)
        return lw.chinchilla_loss(N=test["N"], D=test["D"], **f.params)

    out = ft.extrapolation_eval(data=row10, fit_predict=fit_predict, target="L", holdout="largest_budget")
    assert out["n_test"] == 16 and out["n_train"] == 112
    assert out["r2"] > 1 - 1e-9 and out["nmae"] < 1e-4


def test_drop_rules_are_explicit_and_logged(caplog):
    df = pd.DataFrame({
        "N": [1e8, 2e8, 3e8, 4e8, 5e8, 6e8],
        "D": [2e9, 4e9, 1e8, 8e9, 1e10, 1.2e10],
        "L": [3.1, np.nan, 3.0, 12.0, 2.9, 2.8],
    })
    rules = [ft.drop_nonfinite("L"), ft.drop_above("L", 10.0), ft.drop_undertrained(tokens="D", params="N", min_tokens_per_param=1.0),
             ft.drop_top_k("L", 1)]
    with caplog.at_level("INFO", logger="sectional_moe.theory.fitting"):
        kept, log = ft.apply_drop_rules(df, rules)
    assert list(kept.index) == [4, 5]
    assert list(log["row"]) == [1, 3, 2, 0]
    assert list(log["rule"]) == ["nonfinite(L)", "above(L,10)", "undertrained(D/N<1)", "top_k(L,1)"]
    assert "non-finite L" in log["reason"].iloc[0] and "12 > 10" in log["reason"].iloc[1]
    assert sum("drop row" in r.message for r in caplog.records) == 4
    assert ft.apply_drop_rules(df.dropna(), [ft.drop_nonpositive("L")])[1].empty
    with pytest.raises(ValueError, match="drop rules"):
        ft.fit_chinchilla(N=df["N"], D=df["D"], L=df["L"], init=FEW_STARTS)


# ------------------------------------------------------------------------------------------
def test_generic_fitter_recovers_the_fine_grained_law():
    truth = lw.FINE_GRAINED.coefficients()
    grid = np.array(list(itertools.product(np.geomspace(1e8, 4e9, 5), np.geomspace(1e10, 1.5e11, 4), [1, 2, 4, 8, 16])))
    N, D, G = grid.T
    L = lw.FINE_GRAINED.predict(N=N, D=D, G=G)
    fit = ft.fit_parametric("fine_grained", inputs={"N": N, "D": D, "G": G}, L=L,
                            init={k: v * 1.3 for k, v in truth.items()}, n_random_starts=3, seed=0)
    assert len(fit.starts) == 4
    for k, v in truth.items():
        assert fit.params[k] == pytest.approx(v, rel=1e-5), k
    fixed = ft.fit_parametric("fine_grained", inputs={"N": N, "D": D, "G": G}, L=L, fixed={"c": truth["c"]}, n_random_starts=0)
    assert fixed.params["c"] == truth["c"] and fixed.params["gamma"] == pytest.approx(truth["gamma"], rel=1e-5)


def test_clark_fitter_recovers_each_router_separately():
    N, E = np.array(list(itertools.product(np.geomspace(1.5e7, 1.3e9, 6), [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]))).T
    frames = [pd.DataFrame({"N": N, "E": E, "router": r, "L": lw.CLARK.predict(r, N=N, E=E)}) for r in ("s_base", "hash")]
    fits = ft.fit_by_group(pd.concat(frames), group="router", fit=lambda d: ft.fit_clark(N=d["N"], E=d["E"], L=d["L"]))
    for router, fit in fits.items():
        for k, v in lw.CLARK.coefficients(router).items():
            assert fit.params[k] == pytest.approx(v, rel=1e-6), (router, k)
    assert fits["s_base"].derived["N_cut"] == pytest.approx(1e12, rel=1e-5)


def test_parallel_starts_give_the_same_result(row10):
    serial = ft.fit_chinchilla(N=row10["N"], D=row10["D"], L=row10["L"], init=FEW_STARTS)
    parallel = ft.fit_chinchilla(N=row10["N"], D=row10["D"], L=row10["L"], init=FEW_STARTS, n_jobs=2)
    pd.testing.assert_frame_equal(serial.starts, parallel.starts)
    assert serial.params == parallel.params


# ------------------------------------------------------------------------------------------
# Refusing what the data cannot determine
# ------------------------------------------------------------------------------------------
def test_every_fitter_refuses_fewer_points_than_parameters_plus_one(row10):
    few = row10.iloc[:5]
    with pytest.raises(ft.Underdetermined, match="5 point"):
        ft.fit_chinchilla(N=few["N"], D=few["D"], L=few["L"], init=FEW_STARTS)
    with pytest.raises(ft.Underdetermined, match="5 point"):
        ft.fit_vpnls(N=few["N"], D=few["D"], L=few["L"])
    with pytest.raises(ft.Underdetermined, match="7 free"):
        ft.fit_parametric("fine_grained", inputs={"N": few["N"], "D": few["D"], "G": [1, 2, 4, 8, 16]}, L=few["L"])
    with pytest.raises(ft.Underdetermined, match="6 free"):
        ft.fit_clark(N=[1e8, 1e8, 1e9, 1e9, 1e10, 1e10], E=[1, 8, 1, 8, 1, 8], L=[2.7, 2.5, 2.2, 2.1, 1.9, 1.85])


def test_every_fitter_refuses_too_few_distinct_values(row10):
    data = pd.DataFrame({"N": np.repeat([1e8, 1e9], 6), "D": np.tile(np.geomspace(1e9, 1e11, 6), 2)})
    data["L"] = lw.chinchilla_loss(N=data["N"], D=data["D"], **ROUNDED)
    with pytest.raises(ft.Underdetermined, match="N takes 2 distinct value"):
        ft.fit_chinchilla(N=data["N"], D=data["D"], L=data["L"], init=FEW_STARTS)
    N, E = np.array(list(itertools.product(np.geomspace(1e8, 1e9, 4), [1, 8, 64]))).T
    with pytest.raises(ft.Underdetermined, match="E takes 3 distinct value"):
        ft.fit_clark(N=N, E=E, L=lw.CLARK.predict("hash", N=N, E=E))


def test_a_well_designed_noise_free_fit_is_identified(row10):
    fit = ft.fit_chinchilla(N=row10["N"], D=row10["D"], L=row10["L"], init=FEW_STARTS)
    ident = fit.identifiability
    assert fit.identified and ident["rank"] == 5 and ident["reasons"] == []
    assert 1 < ident["condition_number"] < COND_MAX
    assert all(v is not None and v < 1e-6 for v in ident["rel_se"].values())  # no noise: no uncertainty


def test_one_isoflop_budget_does_not_identify_the_law(chinchilla_like):
    """At one budget N and D move together (ln D = ln C/6 − ln N): the floor E and the two terms trade
    off; the fit converges but is marked, with the reason."""
    one = chinchilla_like[chinchilla_like["C"] == chinchilla_like["C"].iloc[0]]
    fit = ft.fit_chinchilla(N=one["N"], D=one["D"], L=one["L"], init=FEW_STARTS)
    assert not fit.identified and fit.identifiability["reasons"]
    assert "not determined by the data" in " ".join(fit.identifiability["reasons"]) or "collapsed" in " ".join(fit.identifiability["reasons"])
    out = fit.to_dict()
    json.dumps(out, allow_nan=False)
    assert out["identified"] is False


def test_exponents_stay_inside_the_declared_bounds_and_a_bound_marks_the_fit():
    """Loss that grows with N (a broken sweep) would drive α negative; the law bounds α at 0, the fit
    sits there and says so, and the derived allocation is None rather than complex."""
    N = np.repeat(np.geomspace(1e8, 1e10, 4), 4)
    D = np.tile(np.geomspace(1e9, 1e11, 4), 4)
    L = 1.8 + 2000.0 / D**0.36 + 0.02 * np.log(N / 1e8)
    fit = ft.fit_chinchilla(N=N, D=D, L=L, init=FEW_STARTS)
    assert fit.params["alpha"] >= 0.0 and not fit.identified
    assert "alpha" in json.dumps(fit.identifiability["reasons"]) or "A" in json.dumps(fit.identifiability["reasons"])
    assert all(v is None or (isinstance(v, float) and np.isfinite(v)) for v in fit.derived.values())


def test_generic_fit_marks_a_floor_the_data_cannot_see():
    """The fine-grained law's floor c (0.47) next to a slowly decaying N term: with 0.3 % noise on this
    grid c is uncertain by orders of magnitude, and the verdict says so."""
    grid = np.array(list(itertools.product(np.geomspace(1e8, 4e9, 5), np.geomspace(1e10, 1.5e11, 4), [1, 2, 4, 8, 16])))
    N, D, G = grid.T
    L = lw.FINE_GRAINED.predict(N=N, D=D, G=G) * np.exp(np.random.default_rng(0).normal(0, 0.003, N.size))
    fit = ft.fit_parametric("fine_grained", inputs={"N": N, "D": D, "G": G}, L=L, n_random_starts=3)
    assert not fit.identified and "c (uncertain by a factor" in " ".join(fit.identifiability["reasons"])
    held = ft.fit_parametric("fine_grained", inputs={"N": N, "D": D, "G": G}, L=L, fixed={"c": 0.47}, n_random_starts=3)
    assert held.identified, held.identifiability["reasons"]


def test_stratified_bootstrap_keeps_every_stratum():
    data = pd.DataFrame({"budget": np.repeat([1, 2, 3], [3, 4, 5]), "x": np.arange(12.0)})
    seen = []

    def record(df):
        seen.append(df)
        return {"m": float(df["x"].mean())}

    res = ft.bootstrap_fit(data=data, fit=record, n_boot=6, strata="budget", seed=0)
    assert res.settings["strata"] == "budget" and len(res.samples) == 6
    for df in seen:
        assert df.groupby("budget").size().to_dict() == {1: 3, 2: 4, 3: 5}


def test_cross_validation_pools_predictions_in_data_order(row10):
    def fit_predict(train, test):
        f = ft.fit_chinchilla(N=train["N"], D=train["D"], L=train["L"], init=FEW_STARTS)
        return lw.chinchilla_loss(N=test["N"], D=test["D"], **f.params)

    sub = row10.iloc[::11].reset_index(drop=True)  # 12 points over 8 budgets
    for scheme in ("kfold", "loo"):
        out = ft.cross_validate(data=sub, fit_predict=fit_predict, target="L", scheme=scheme, k=3)
        assert out["r2"] > 1 - 1e-6 and out["n_test"] == 12 and out["failed_folds"] == 0
    with pytest.raises(ValueError, match="k=1"):
        ft.cross_validate(data=sub, fit_predict=fit_predict, target="L", scheme="kfold", k=1)


def test_bootstrap_verdict_marks_an_exponent_whose_interval_reaches_its_bound(chinchilla_like):
    fit = ft.fit_chinchilla(N=chinchilla_like["N"], D=chinchilla_like["D"], L=chinchilla_like["L"], init=FEW_STARTS)
    fit.bootstrap = ft.BootstrapResult(samples=pd.DataFrame({"alpha": [0.0, 0.3]}), se={}, ci_low={"alpha": 0.0},
                                       ci_high={"alpha": 0.4}, cov=pd.DataFrame(), settings={})
    assert fit.identified
    ft.bootstrap_verdict(fit, {"alpha": (0.0, 5.0)})
    assert not fit.identified and "reaches its bound" in fit.identifiability["reasons"][-1]
