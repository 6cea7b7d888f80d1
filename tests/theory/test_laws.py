"""Golden numbers of shared/scaling-laws.md §9.1 (rows 1, 2, 3, 12, 13, 14, 15) and registry checks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize

from sectional_moe.theory import laws as lw
from tests.theory.printed import assert_printed

REL = 1e-3
C_CHINCHILLA = 6 * 70e9 * 1.4e12  # 5.88e23 FLOPs


def test_row1_frontier_hoffmann_tex():
    c = lw.CHINCHILLA.coefficients("hoffmann_tex")
    assert c["E"] == pytest.approx(1.69344, rel=1e-4) and c["A"] == pytest.approx(406.40, rel=1e-4)
    f = lw.chinchilla_frontier(C=C_CHINCHILLA, **c)
    assert f["G"] == pytest.approx(1.3000, rel=REL)
    assert f["a"] == pytest.approx(0.4565, rel=REL)
    assert f["b"] == pytest.approx(0.5435, rel=REL)
    assert f["N_opt"] == pytest.approx(4.074e10, rel=REL)
    assert f["D_opt"] == pytest.approx(2.405e12, rel=REL)
    assert f["D_per_N"] == pytest.approx(59.0, rel=REL)
    assert 6 * f["N_opt"] * f["D_opt"] == pytest.approx(C_CHINCHILLA, rel=1e-12)


def test_row2_frontier_rounded_params():
    c = lw.CHINCHILLA.coefficients("hoffmann_rounded")
    f = lw.chinchilla_frontier(C=C_CHINCHILLA, **c)
    assert f["G"] == pytest.approx(1.3447, rel=REL)
    assert f["a"] == pytest.approx(0.4516, rel=REL)
    assert f["D_per_N"] == pytest.approx(92.8, rel=REL)
    assert lw.CHINCHILLA.predict("hoffmann_rounded", N=70e9, D=1.4e12) == pytest.approx(1.9366, rel=REL)


def test_row3_frontier_epoch_params():
    c = lw.CHINCHILLA.coefficients("epoch")
    f = lw.chinchilla_frontier(C=np.array([1e21, C_CHINCHILLA]), **c)
    assert f["G"] == pytest.approx(0.1196, rel=REL)
    assert f["a"] == pytest.approx(0.5126, rel=REL)
    # D/N is printed to 3 significant digits (±0.05, i.e. up to 0.27 % relative): compare at that precision
    for value, printed in zip(f["D_per_N"], ("21.6", "18.4")):
        assert_printed(value, printed)
    assert lw.CHINCHILLA.predict("epoch", N=70e9, D=1.4e12) == pytest.approx(1.9739, rel=REL)


def test_printed_precision_helper_is_half_a_unit_of_the_last_digit():
    from tests.theory.printed import half_unit

    assert half_unit("21.6") == pytest.approx(0.05) and half_unit("0.220") == pytest.approx(5e-4)
    assert half_unit("1.29e10") == pytest.approx(5e7) and half_unit("2") == 0.5
    assert_printed(21.64, "21.6")
    with pytest.raises(AssertionError, match="does not round"):
        assert_printed(21.66, "21.6")


def test_frontier_is_the_argmin_of_the_law_on_the_isoflop_curve():
    c = lw.CHINCHILLA.coefficients("epoch")
    C = 1e20
    res = optimize.minimize_scalar(lambda x: float(lw.chinchilla_loss(N=np.exp(x), D=C / (6 * np.exp(x)), **c)),
                                   bounds=(np.log(1e6), np.log(1e12)), method="bounded", options={"xatol": 1e-10})
    assert np.exp(res.x) == pytest.approx(lw.chinchilla_frontier(C=C, **c)["N_opt"], rel=1e-6)


def test_row12_zhao_closed_form_optima_and_loss():
    c = lw.ZHAO.coefficients()
    z = lw.zhao_optima(N=np.array([30e9, 671e9, 1e12]), **c)
    assert z["G_opt"] == pytest.approx(6.778, rel=REL)
    assert z["S_opt"] == pytest.approx(0.3148, rel=REL)
    assert z["P_opt"] == pytest.approx(1.6283, rel=REL)
    # N_a/N is printed to 3 decimals (±5e-4, up to 0.25 % relative at 0.204): compare at that precision
    for value, printed in zip(z["N_a_over_N_opt"], ("0.401", "0.220", "0.204")):
        assert_printed(value, printed)
    assert lw.ZHAO.predict(N=1e9, D=1e11, N_a=1e8, G=8, S=0.25) == pytest.approx(2.6825, rel=REL)


def test_zhao_closed_form_active_ratio_matches_a_numerical_minimiser():
    c = lw.ZHAO.coefficients()
    z = lw.zhao_optima(N=30e9, **c)
    res = optimize.minimize_scalar(
        lambda x: float(lw.ZHAO.predict(N=30e9, D=1e11, N_a=np.exp(x), G=z["G_opt"], S=z["S_opt"])),
        bounds=(np.log(1e8), np.log(30e9)), method="bounded", options={"xatol": 1e-10})
    assert np.exp(res.x) / 30e9 == pytest.approx(float(z["N_a_over_N_opt"]), rel=1e-5)
    assert z["ratio_exponent"] == pytest.approx(-c["alpha"] / (1 + c["alpha"]))


def test_row13_wan_law_reproduces_table2():
    C = np.array([1e18, 3e18, 1e19, 3e19, 1e20, 3e20])
    np.testing.assert_allclose(lw.wan_m_opt(C) / 1e9, [0.2672, 0.4856, 0.9345, 1.6983, 3.2681, 5.9390], rtol=REL)
    np.testing.assert_allclose(lw.wan_d_opt(C) / 1e9, [3.742, 6.1775, 10.7004, 17.6649, 30.5985, 50.5138], rtol=REL)
    np.testing.assert_allclose(lw.wan_allocation(C)["MD_over_C"], 1.0, rtol=REL)
    assert lw.WAN_N_OVER_NA_BAND == (18.0, 25.0)


def test_row14_fine_grained_loss_decreases_and_saturates_with_granularity():
    G = np.array([1, 2, 4, 8, 16])
    loss = lw.FINE_GRAINED.predict(N=1.6e9, D=66e9, G=G)
    np.testing.assert_allclose(loss, [3.0264, 2.9656, 2.9250, 2.8978, 2.8796], atol=1e-4)
    steps = -np.diff(loss)
    assert np.all(steps > 0) and np.all(np.diff(steps) < 0)  # strictly decreasing, saturating
    c = lw.FINE_GRAINED.coefficients()
    limit = c["c"] + c["a"] / 1.6e9 ** c["alpha"] + c["b"] / 66e9 ** c["beta"]
    assert lw.FINE_GRAINED.predict(N=1.6e9, D=66e9, G=1e12) == pytest.approx(limit, rel=1e-7)


def test_row15_clark_transform_identities_and_sbase_losses():
    for name in ("s_base", "rl_r", "hash"):
        c = lw.CLARK.coefficients(name)
        assert lw.clark_ehat(1, e_start=c["e_start"], e_max=c["e_max"]) == pytest.approx(c["e_start"], rel=1e-12)
        assert lw.clark_ehat(1e15, e_start=c["e_start"], e_max=c["e_max"]) == pytest.approx(c["e_max"], rel=1e-9)
    assert lw.CLARK.predict("s_base", N=1.3e8, E=1) == pytest.approx(2.687, abs=1e-3)
    assert lw.CLARK.predict("s_base", N=1.3e8, E=64) == pytest.approx(2.389, abs=1e-3)
    c = lw.CLARK.coefficients("s_base")
    assert lw.clark_n_cut(b=c["b"], c=c["c"]) == pytest.approx(1e12, rel=REL)


def test_clark_table_of_scaling_laws_section_6_4():
    expected = {  # N = 1.3e8 and 1.3e9, E = 1, 8, 64, 512
        "s_base": [2.687, 2.547, 2.389, 2.283, 2.237, 2.150, 2.050, 1.982],
        "rl_r": [2.690, 2.574, 2.439, 2.339, 2.239, 2.182, 2.115, 2.064],
        "hash": [2.674, 2.576, 2.414, 2.283, 2.226, 2.170, 2.075, 1.997],
    }
    N = np.repeat([1.3e8, 1.3e9], 4)
    E = np.tile([1, 8, 64, 512], 2)
    for name, values in expected.items():
        np.testing.assert_allclose(lw.CLARK.predict(name, N=N, E=E), values, atol=1e-3)
    n_cut = {k: lw.clark_n_cut(b=lw.CLARK.coefficients(k)["b"], c=lw.CLARK.coefficients(k)["c"]) for k in expected}
    assert n_cut["rl_r"] == pytest.approx(3.2e10, rel=0.02) and n_cut["hash"] == pytest.approx(2.2e11, rel=0.03)


def test_clark_effective_parameter_count_is_defined_by_equal_loss():
    c = lw.CLARK.coefficients("s_base")
    nbar = lw.clark_effective_params(N=1.3e8, E=64, **c)
    assert nbar > 1.3e8
    assert lw.CLARK.predict(c, N=nbar, E=1) == pytest.approx(float(lw.CLARK.predict(c, N=1.3e8, E=64)), rel=1e-10)


def test_joint_moe_law_gives_the_documented_plausible_loss():
    assert lw.JOINT_MOE.predict(N_act=1e9, D=2e10, E=1) == pytest.approx(2.57, abs=0.005)


def test_registry_entries_are_complete_and_tagged():
    assert set(lw.LAWS) == {"chinchilla", "fine_grained", "clark", "joint_moe", "zhao"}
    for law in lw.LAWS.values():
        assert law.default in law.published
        assert law.form_provenance.startswith("[")
        for cs in law.published.values():
            assert cs.provenance in ("[P]", "[S]", "[D]", "[I]")
            assert set(cs.values) == set(law.params)
        desc = law.describe()
        assert desc["inputs"] and desc["conventions"]
    with pytest.raises(KeyError, match="known"):
        lw.get_law("kaplan")
    with pytest.raises(KeyError, match="no coefficient set"):
        lw.CHINCHILLA.coefficients("nope")
    with pytest.raises(KeyError, match="missing inputs"):
        lw.CHINCHILLA.predict(N=1e9)
