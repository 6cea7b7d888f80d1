"""Cost model of Sane 2025: golden tables of paper-notes §2.6, the R1 reconstructions, exact
block FLOPs from sectional_moe.flops, E_opt and the κ fit."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sectional_moe.theory import cost_model as cm
from tests.theory.printed import assert_printed

REL = 1e-3
D0, L = 4096, 2048

# paper-notes §2.6, first table: E, d0/E, L/E, lit (E³+1)/E², R1 E³/(E²+1), summed E²/(E+1), lit 3(2+3L)/(2E)
GOLDEN_FACTORS = [
    (1, 4096, 2048, 2.000, 0.500, 0.500, 9219.0),
    (2, 2048, 1024, 2.250, 1.600, 1.333, 4609.5),
    (4, 1024, 512, 4.063, 3.765, 3.200, 2304.8),
    (8, 512, 256, 8.016, 7.877, 7.111, 1152.4),
    (16, 256, 128, 16.004, 15.938, 15.059, 576.2),
    (32, 128, 64, 32.001, 31.969, 31.030, 288.1),
    (64, 64, 32, 64.000, 63.984, 63.015, 144.0),
]

# paper-notes §2.6, second table: κ, closed form, exact root of dS/dE, best integer, best power of 2
GOLDEN_EOPT = [
    (1e7, 17.27, 17.33, 17, 16),
    (1e8, 8.02, 8.14, 8, 8),
    (1e9, 3.72, 3.95, 4, 4),
]


def test_a_trad_worked_example_matches_paper_notes():
    assert cm.qkv_cost_traditional(d_model=D0, seq_len=L) == 103_079_215_104
    # B_trad is printed to 3 significant digits (1.72e10, 3.44e10); exact values are 2^34 and 2^35
    assert cm.attention_cost_traditional(d_model=D0, seq_len=L) == 2**34
    assert cm.attention_cost_traditional(d_model=D0, seq_len=L, include_av=True) == 2**35
    assert_printed(cm.attention_cost_traditional(d_model=D0, seq_len=L), "1.72e10")


def test_reduction_table_reproduces_paper_notes_first_table():
    table = cm.reduction_table(d_model=D0, seq_len=L)
    assert list(table["E"]) == [row[0] for row in GOLDEN_FACTORS]
    cols = ["d0/E", "L/E", "reported_qkv", "r1_parallel", "r1_summed", "reported_attention"]
    for (_, *expected), (_, got) in zip(GOLDEN_FACTORS, table.iterrows()):
        for col, value in zip(cols, expected):
            assert got[col] == pytest.approx(value, rel=REL), col


def test_r1_terms_at_e8_match_paper_notes():
    t = cm.r1_qkv_terms(d_model=D0, seq_len=L, experts=8)
    # printed to 3 significant digits: compare at that precision
    assert_printed(t["A_pre"], "1.29e10")
    assert_printed(t["A_expert"], "2.01e8")
    assert_printed(t["A_sect_parallel"], "1.31e10")
    assert t["A_trad"] / t["A_sect_parallel"] == pytest.approx(7.877, rel=REL)
    assert t["A_trad"] / t["A_sect_summed"] == pytest.approx(cm.r1_summed_qkv_factor(8), rel=1e-12)


def test_reported_factors_are_inconsistent_as_documented():
    E = np.arange(1, 129)
    # read as a cost ratio, the literal QKV factor says sectioning always increases cost
    assert np.all(cm.reported_qkv_factor(E) > 1.0)
    # read as a reduction factor, it halves the cost at E = 1 where R1 doubles it
    assert cm.reported_qkv_factor(1) == 2.0 and cm.r1_parallel_qkv_factor(1) == 0.5
    # the literal attention factor changes cost 9219-fold with no split at all
    assert cm.reported_attention_factor(1, seq_len=L) == pytest.approx(9219.0)
    # and it depends on L, unlike every first-principles attention term
    assert cm.reported_attention_factor(4, seq_len=1024) != cm.reported_attention_factor(4, seq_len=2048)
    assert cm.r1_attention_cost_fraction(4) == pytest.approx(1 / 16 + 1 / 64)


@pytest.mark.parametrize("kappa, closed, root, best_int, best_pow", GOLDEN_EOPT)
def test_e_opt_reproduces_paper_notes_second_table(kappa, closed, root, best_int, best_pow):
    a = cm.qkv_cost_traditional(d_model=D0, seq_len=L)
    r = cm.e_opt(a_trad=a, kappa=kappa, view="parallel")
    assert r.closed_form == pytest.approx(closed, rel=REL)
    assert r.numeric_root == pytest.approx(root, rel=REL)
    assert r.best_integer == best_int
    assert r.best_power_of_two == best_pow
    # the root is a stationary point of S, and the closed form is within ~6 % of it
    assert cm.savings_derivative(r.numeric_root, a_trad=a, kappa=kappa) == pytest.approx(0.0, abs=1e-6 * a)
    assert abs(r.closed_form / r.numeric_root - 1) < 0.06


def test_e_opt_table_and_the_script_of_paper_notes_agree():
    # the integer scan of the paper-notes script: max(range(1, 513), key=S)
    a = cm.qkv_cost_traditional(d_model=D0, seq_len=L)
    df = cm.e_opt_table(d_model=D0, seq_len=L, kappas=[k for k, *_ in GOLDEN_EOPT])
    for (_, row), (k, *_rest) in zip(df.iterrows(), GOLDEN_EOPT):
        scan = max(range(1, 513), key=lambda e: a * (1 - 1 / e - 1 / e**3) - k * e**2)
        assert row["best_integer"] == scan


def test_closed_form_is_a_cube_root_law():
    a = 1e11
    ratio = cm.e_opt_closed_form(a_trad=a, kappa=1e6) / cm.e_opt_closed_form(a_trad=a, kappa=8e6)
    assert ratio == pytest.approx(2.0, rel=1e-12)
    with pytest.raises(ValueError):
        cm.e_opt_closed_form(a_trad=a, kappa=0.0)


def test_summed_view_best_integer_is_floor_or_ceil_of_root():
    a = cm.qkv_cost_traditional(d_model=1024, seq_len=512)
    for kappa in (1e4, 1e5, 1e6, 1e7):
        r = cm.e_opt(a_trad=a, kappa=kappa, view="summed")
        assert r.best_integer in (math.floor(r.numeric_root), math.ceil(r.numeric_root))
        assert r.savings_at_best_integer >= r.savings_at_best_power_of_two


# ------------------------------------------------------------------------------------------
# exact per-config counts (sectional_moe.flops)
# ------------------------------------------------------------------------------------------
def test_exact_dense_qkv_flops_equal_two_a_trad():
    """With full multi-head attention the flops module's QKV FLOPs per sequence are 2·A_trad
    (2 FLOPs per MAC): the paper's A_trad counts exactly the QKV projections."""
    from sectional_moe.models.flops import flops_breakdown
    from sectional_moe.models.spec import ModelSpec

    spec = ModelSpec(family="dense", d_model=D0, n_layers=1, n_heads=32, n_kv_heads=32, d_ff=11008,
                     seq_len=L, experts=None, routing=None, vocab_size=32000).validate()
    assert flops_breakdown(spec)["qkv"] * L == pytest.approx(2 * cm.qkv_cost_traditional(d_model=D0, seq_len=L), rel=1e-12)


def test_exact_block_qkv_ratio_is_the_summed_reconstruction():
    """The flops module counts every expert (total compute), so with r = E its QKV reduction is
    exactly R1-summed E²/(E+1), never the parallel E³/(E²+1) nor the literal (E³+1)/E²."""
    df = cm.block_flops_comparison(d_model=D0, seq_len=L)
    assert (df["note"] == "").all()
    np.testing.assert_allclose(df["ratio_qkv"], df["r1_summed"], rtol=1e-12)
    assert np.all(df["ratio_qkv"][df["E"] > 1] < df["r1_parallel"][df["E"] > 1])
    # attention scores, summed view, self-attention over L/E: B_sect/B_trad = 2/E²
    frac = cm.r1_attention_cost_fraction(df["E"].to_numpy(), view="summed")
    np.testing.assert_allclose(df["ratio_attn_scores"], 1 / frac, rtol=1e-12)
    # the whole block (FFN included) saves a little more than QKV alone for E ≥ 2
    assert np.all(df["ratio_block"][df["E"] >= 2] > df["ratio_qkv"][df["E"] >= 2])


def test_exact_block_reports_invalid_expert_counts_instead_of_crashing():
    df = cm.block_flops_comparison(d_model=96, seq_len=64, n_heads=4, n_kv_heads=2, d_ff=288, experts=[2, 5])
    assert df.loc[df["E"] == 2, "note"].item() == ""
    bad = df.loc[df["E"] == 5]
    assert "experts" in bad["note"].item() and math.isnan(bad["ratio_block"].item())


# ------------------------------------------------------------------------------------------
# κ from measurements
# ------------------------------------------------------------------------------------------
SWEEP = np.repeat([1, 2, 4, 8, 16, 32], 3).astype(float)


def _times(overhead, seed=0, sigma=0.005):
    rng = np.random.default_rng(seed)
    compute = 2.0 * cm.r1_qkv_cost_fraction(SWEEP, view="summed")
    return 0.05 + compute + overhead(SWEEP) + rng.normal(0.0, sigma, SWEEP.size), compute


def test_fit_kappa_recovers_a_quadratic_overhead_and_prefers_it_by_aic():
    t, _ = _times(lambda E: 1e-3 * E**2)
    r = cm.fit_kappa(experts=SWEEP, step_time=t, view="summed")
    assert r.preferred == "quadratic" and r.delta_aic > 10
    assert abs(r.kappa - 1e-3) < 4 * r.kappa_se and r.kappa == pytest.approx(1e-3, rel=0.02)
    true = cm.e_opt(a_trad=2.0, kappa=1e-3, view="summed")
    assert r.predicted.numeric_root == pytest.approx(true.numeric_root, rel=0.02)
    assert r.measured_e_opt == 8.0  # the swept E with the lowest mean time
    assert r.fitted_e_opt == pytest.approx(true.numeric_root, rel=0.02)


def test_fit_kappa_prefers_linear_when_the_overhead_is_linear():
    t, _ = _times(lambda E: 0.02 * E, seed=1)
    r = cm.fit_kappa(experts=SWEEP, step_time=t)
    assert r.preferred == "linear" and r.delta_aic < -10
    assert r.models["linear"].coef["lambda"] == pytest.approx(0.02, rel=0.05)


def test_fit_kappa_overhead_mode_subtracts_the_compute_column():
    t, compute = _times(lambda E: 1e-3 * E**2, seed=2)
    r = cm.fit_kappa(experts=SWEEP, step_time=t, compute_time=compute)
    assert r.mode == "overhead" and r.preferred == "quadratic"
    assert r.kappa == pytest.approx(1e-3, rel=0.02)
    assert r.a_time == pytest.approx(2.0, rel=1e-9)  # regression of compute on g(E) is exact here
    assert r.to_dict()["per_e"][0]["E"] == 1.0


def test_fit_kappa_rejects_too_few_points():
    with pytest.raises(ValueError, match="distinct E"):
        cm.fit_kappa(experts=[1, 2], step_time=[1.0, 0.8])


def _fixed_r_flops(E: np.ndarray, r: int = 2) -> np.ndarray:
    """FLOPs per token of a fixed-r sectional stack, relative units: half the layers dense, the
    other half a pre-expert layer on L/r positions plus E experts on d/E sections (summed)."""
    return 0.5 + 0.5 * (1.0 / r + 1.0 / E)


def test_fit_kappa_with_the_exact_compute_recovers_kappa_where_r1_is_biased():
    """With a fixed seq_reduction the compute does not follow R1's 1/E + 1/E²; the exact per-run
    compute as g(E) recovers the overhead, the R1 fallback does not."""
    work = _fixed_r_flops(SWEEP) * 3e6  # any unit: the fit divides by the maximum
    rng = np.random.default_rng(3)
    t = 0.05 + 2.0 * work / work.max() + 1e-3 * SWEEP**2 + rng.normal(0.0, 0.002, SWEEP.size)
    exact = cm.fit_kappa(experts=SWEEP, step_time=t, compute=work)
    r1 = cm.fit_kappa(experts=SWEEP, step_time=t)
    assert exact.compute_term == "exact" and r1.compute_term == "r1_summed"
    assert exact.kappa == pytest.approx(1e-3, rel=0.03) and abs(exact.kappa - 1e-3) < 4 * exact.kappa_se
    assert exact.models["quadratic"].coef["a"] == pytest.approx(2.0, rel=0.03)
    # R1's compute curve has the wrong shape: κ > 3 standard errors off, a 100x worse fit, a wrong E_opt
    assert abs(r1.kappa - 1e-3) > 3 * r1.kappa_se and r1.models["quadratic"].rss > 20 * exact.models["quadratic"].rss
    # E_opt of the fitted curve: the true curve's argmin between swept E (g continued by COMPUTE_BASIS)
    grid = np.geomspace(1, 32, 20001)
    true = 0.05 + 2.0 * _fixed_r_flops(grid) / _fixed_r_flops(SWEEP).max() + 1e-3 * grid**2
    assert exact.fitted_e_opt == pytest.approx(grid[np.argmin(true)], rel=0.05)
    assert abs(r1.fitted_e_opt / grid[np.argmin(true)] - 1) > 0.1
    # S(E) is R1's model: no prediction from it with the exact term, and the reason is given
    assert exact.predicted is None and "R1" in exact.predicted_note and r1.predicted is not None
    np.testing.assert_allclose(exact.g(SWEEP), work / work.max(), rtol=1e-9)
    np.testing.assert_allclose(exact.g(grid), _fixed_r_flops(grid) / _fixed_r_flops(SWEEP).max(), rtol=1e-9)


def test_fit_kappa_drops_the_compute_term_when_every_run_costs_the_same():
    rng = np.random.default_rng(4)
    t = 0.5 + 1e-3 * SWEEP**2 + rng.normal(0.0, 1e-3, SWEEP.size)
    r = cm.fit_kappa(experts=SWEEP, step_time=t, compute=np.full(SWEEP.size, 7e6))
    assert "a" not in r.models["quadratic"].coef and r.kappa == pytest.approx(1e-3, rel=0.02)


def test_kappa_from_step_time_to_macs_per_sequence_and_layer_and_back():
    """κ_MACs = κ_s · R / 2 / (sequences · sectional layers), R the FLOP rate the fit measured (the
    costliest run's FLOPs per step over its fitted compute time); kappa_flops_per_token undoes it."""
    work = _fixed_r_flops(SWEEP) * 3e9  # FLOPs per step
    rate = 1.5e10  # FLOP/s
    t = 0.05 + work / rate + 2e-4 * SWEEP**2
    r = cm.fit_kappa(experts=SWEEP, step_time=t, compute=work)
    assert r.work_max == pytest.approx(work.max()) and r.rate == pytest.approx(rate, rel=1e-6)
    k = cm.kappa_in_macs(kappa_s=r.kappa, flop_rate=r.rate, sequences_per_step=16, sectional_layers=3)
    assert k == pytest.approx(2e-4 * rate / 2 / (16 * 3), rel=1e-6)
    # back to FLOPs per token of a model with 3 sectional layers and 256-token sequences: 16 sequences
    # of 256 tokens per step, so the per-step overhead κ_s·R spreads over 4096 tokens
    assert cm.kappa_flops_per_token(kappa_macs=k, sectional_layers=3, seq_len=256) == pytest.approx(2e-4 * rate / 4096, rel=1e-6)
    assert cm.fit_kappa(experts=SWEEP, step_time=t).rate is None  # no exact compute term, no FLOP rate
    with pytest.raises(ValueError, match="flop_rate"):
        cm.kappa_in_macs(kappa_s=1.0, flop_rate=0.0, sequences_per_step=1, sectional_layers=1)
