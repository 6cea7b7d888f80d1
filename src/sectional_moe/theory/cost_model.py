"""Cost model of the sectional MoE (Sane 2025, arXiv 2503.20750) and its optimal expert count.

Everything here is pure numpy. Provenance tags (as in ``shared/paper-notes.md``):

* **[P]** the paper's own words (only its abstract could be read);
* **[S]** a secondary source (AI-written summaries of the paper), not checked against the PDF;
* **[D]** derived here from a stated formula;
* **[I]** our reconstruction: *not* the paper's equation.

Units: costs are in multiply-accumulates (MACs) per sequence of ``seq_len`` tokens, like the
paper's ``A_trad = 3·L·d0²``. The exact per-config counts of :func:`block_flops_comparison` come
from :mod:`sectional_moe.models.flops`, which counts FLOPs (2 per MAC) per token; only ratios are compared.

Symbols: ``L`` = ``seq_len`` (tokens), ``d0`` = ``d_model``, ``E`` = number of experts = number
of embedding sections, ``κ`` = ``kappa`` (overhead cost per E², in the unit of ``A_trad``: MACs
per E² per sequence and (sectional) layer). :func:`fit_kappa` measures κ in seconds per E² per
optimiser step; :func:`kappa_in_macs` converts it with the measured FLOP rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Literal

import numpy as np
import pandas as pd
from scipy import optimize

View = Literal["parallel", "summed"]

#: Expert counts of the worked example table in paper-notes §2.6.
PAPER_TABLE_EXPERTS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)


# --------------------------------------------------------------------------------------------
# Traditional (dense block) costs
# --------------------------------------------------------------------------------------------
def qkv_cost_traditional(*, d_model: float, seq_len: float) -> float:
    """QKV projection cost of one standard block, ``A_trad = 3·L·d0²`` MACs per sequence.

    [S] themoonlight-EN review of the paper ("Atrad = L * 3d02"); the only cost formula that all
    sources agree on.
    """
    return 3.0 * seq_len * d_model**2


def attention_cost_traditional(*, d_model: float, seq_len: float, include_av: bool = False) -> float:
    """Attention-score cost of one standard block, ``B_trad = L²·d0`` MACs (QKᵀ only), or
    ``2·L²·d0`` with the AV product. [D] standard counting, no causal discount."""
    return (2.0 if include_av else 1.0) * seq_len**2 * d_model


# --------------------------------------------------------------------------------------------
# Reduction factors: reported (literal) and reconstructed
# --------------------------------------------------------------------------------------------
def reported_qkv_factor(experts: float | np.ndarray) -> float | np.ndarray:
    """QKV "reduction factor" as reported, read literally: ``(E³ + 1)/E²`` = E + E⁻².

    [S] arxivlens "Key Results" blurb ("E^3+1/E^2"). Kept only to be plotted and falsified: as a
    cost ratio it is > 1 for every E (sectioning would increase cost); as a reduction factor it
    halves the cost at E = 1 (no split plus an extra block), and ``E²/(E³+1)`` cannot arise from
    an ``A_pre + A_experts`` sum of power-law terms (paper-notes §2.3).
    """
    E = np.asarray(experts, dtype=float)
    return _scalar((E**3 + 1.0) / E**2)


def reported_attention_factor(experts: float | np.ndarray, *, seq_len: float) -> float | np.ndarray:
    """Attention-score "reduction factor" as reported, read literally: ``3(2 + 3L)/(2E)``.

    [S] arxivlens "Key Results" blurb. Not reproducible from first principles: at E = 1 and
    L = 2048 it gives a 9219-fold change (paper-notes §2.3); most likely garbled by the summariser.
    """
    E = np.asarray(experts, dtype=float)
    return _scalar(3.0 * (2.0 + 3.0 * seq_len) / (2.0 * E))


def r1_qkv_cost_fraction(experts: float | np.ndarray, *, view: View = "parallel") -> float | np.ndarray:
    """``A_sect/A_trad`` under reconstruction R1 [I].

    R1: the pre-expert block shortens L → L/E before its full-width QKV (``A_pre = A_trad/E``);
    each expert works on L/E tokens × d0/E width (``A_expert = A_trad/E³``).

    * ``view="parallel"``: experts counted once (critical path / latency): ``1/E + 1/E³``;
    * ``view="summed"``: experts summed (total compute, what a FLOP counter sees): ``1/E + 1/E²``.
    """
    E = np.asarray(experts, dtype=float)
    if view == "parallel":
        return _scalar(1.0 / E + 1.0 / E**3)
    if view == "summed":
        return _scalar(1.0 / E + 1.0 / E**2)
    raise ValueError(f"view={view!r}: use 'parallel' or 'summed'")


def r1_parallel_qkv_factor(experts: float | np.ndarray) -> float | np.ndarray:
    """QKV reduction factor ``A_trad/A_sect = E³/(E² + 1)`` of R1 with experts in parallel [I].

    The self-consistent rearrangement of the reported symbols (paper-notes §2.3): 0.5 at E = 1,
    1.6 at E = 2, 3.765 at E = 4, → E.
    """
    E = np.asarray(experts, dtype=float)
    return _scalar(E**3 / (E**2 + 1.0))


def r1_summed_qkv_factor(experts: float | np.ndarray) -> float | np.ndarray:
    """QKV reduction factor ``A_trad/A_sect = E²/(E + 1)`` of R1 with experts summed [I]/[D]."""
    E = np.asarray(experts, dtype=float)
    return _scalar(E**2 / (E + 1.0))


def r1_attention_cost_fraction(
    experts: float | np.ndarray,
    *,
    pre_expert: Literal["self", "cross"] = "self",
    view: View = "parallel",
) -> float | np.ndarray:
    """``B_sect/B_trad`` under R1 [D] (attention scores, ``n_queries · n_keys · width``).

    Pre-expert block: ``1/E²`` when it self-attends over L/E tokens, ``1/E`` when L/E queries
    cross-attend to L keys. Experts (L/E tokens, d0/E wide): ``1/E³`` each, so ``1/E³``
    (``view="parallel"``, paper-notes §2.3) or ``1/E²`` (``view="summed"``). No L dependence,
    unlike the reported attention factor.
    """
    E = np.asarray(experts, dtype=float)
    if pre_expert == "self":
        pre = 1.0 / E**2
    elif pre_expert == "cross":
        pre = 1.0 / E
    else:
        raise ValueError(f"pre_expert={pre_expert!r}: use 'self' or 'cross'")
    if view == "parallel":
        return _scalar(pre + 1.0 / E**3)
    if view == "summed":
        return _scalar(pre + 1.0 / E**2)
    raise ValueError(f"view={view!r}: use 'parallel' or 'summed'")


def r1_qkv_terms(*, d_model: float, seq_len: float, experts: float) -> dict[str, float]:
    """The R1 terms in MACs per sequence [I]: ``A_trad``, ``A_pre = A_trad/E``,
    ``A_expert = A_trad/E³`` (one expert), ``A_sect_parallel`` and ``A_sect_summed``."""
    a_trad = qkv_cost_traditional(d_model=d_model, seq_len=seq_len)
    E = float(experts)
    a_pre = 3.0 * (seq_len / E) * d_model**2
    a_exp = 3.0 * (seq_len / E) * (d_model / E) ** 2
    return {
        "A_trad": a_trad,
        "A_pre": a_pre,
        "A_expert": a_exp,
        "A_sect_parallel": a_pre + a_exp,
        "A_sect_summed": a_pre + E * a_exp,
    }


def reduction_table(
    *, d_model: int, seq_len: int, experts: Iterable[int] = PAPER_TABLE_EXPERTS
) -> pd.DataFrame:
    """The reduction-factor table of paper-notes §2.6, one row per E.

    Columns: ``E``, ``d0/E``, ``L/E``, ``reported_qkv`` [S literal], ``r1_parallel`` [I],
    ``r1_summed`` [I], ``reported_attention`` [S literal]. All are *reduction* factors
    (``cost_trad/cost_sect``) except the two literal strings, whose reading is unknown.
    """
    E = np.asarray(list(experts), dtype=float)
    return pd.DataFrame(
        {
            "E": E.astype(int),
            "d0/E": d_model / E,
            "L/E": seq_len / E,
            "reported_qkv": np.atleast_1d(reported_qkv_factor(E)),
            "r1_parallel": np.atleast_1d(r1_parallel_qkv_factor(E)),
            "r1_summed": np.atleast_1d(r1_summed_qkv_factor(E)),
            "reported_attention": np.atleast_1d(reported_attention_factor(E, seq_len=seq_len)),
        }
    )


# --------------------------------------------------------------------------------------------
# S(E) and the optimal expert count
# --------------------------------------------------------------------------------------------
def overhead_cost(experts: float | np.ndarray, *, kappa: float) -> float | np.ndarray:
    """System overhead ``C(E) = κ·E²`` [S] ("quadratic hardware overhead", sciencestack); the
    constant κ and its unit are ours (same unit as ``A_trad``)."""
    E = np.asarray(experts, dtype=float)
    return _scalar(kappa * E**2)


def savings(
    experts: float | np.ndarray, *, a_trad: float, kappa: float, view: View = "parallel"
) -> float | np.ndarray:
    """Net QKV saving ``S(E) = A_trad − A_sect(E) − κE²`` [I] (paper-notes §2.4).

    [S]: S(E) trades QKV/attention savings against a quadratic overhead; its exact definition was
    not retrieved. This reconstruction keeps the QKV term of R1 only (``view`` as in
    :func:`r1_qkv_cost_fraction`). Unit: that of ``a_trad`` (MACs, or seconds when fitted).
    """
    E = np.asarray(experts, dtype=float)
    frac = np.asarray(r1_qkv_cost_fraction(E, view=view))
    return _scalar(a_trad * (1.0 - frac) - kappa * E**2)


def savings_derivative(
    experts: float | np.ndarray, *, a_trad: float, kappa: float, view: View = "parallel"
) -> float | np.ndarray:
    """``dS/dE`` of :func:`savings` [I]: ``A_trad(1/E² + 3/E⁴) − 2κE`` (parallel) or
    ``A_trad(1/E² + 2/E³) − 2κE`` (summed)."""
    E = np.asarray(experts, dtype=float)
    if view == "parallel":
        g = 1.0 / E**2 + 3.0 / E**4
    elif view == "summed":
        g = 1.0 / E**2 + 2.0 / E**3
    else:
        raise ValueError(f"view={view!r}: use 'parallel' or 'summed'")
    return _scalar(a_trad * g - 2.0 * kappa * E)


def kappa_in_macs(*, kappa_s: float, flop_rate: float, sequences_per_step: float, sectional_layers: int) -> float:
    """κ as the report measures it → κ as the planner and this module use it [I].

    The report (:func:`fit_kappa` with each run's exact FLOPs per step as the compute term) gives
    κ in **seconds per E² per optimiser step**, next to the measured FLOP rate ``R`` (FLOP/s: the
    costliest run's FLOPs per step over its fitted compute time, :attr:`KappaFit.rate`). The
    planner's κ is in **MACs per E² per sequence and sectional layer** (the unit of
    ``A_trad = 3·L·d0²``, one sequence through one block). So

    ``κ_MACs = κ_s · R / 2 / (sequences_per_step · sectional_layers)``

    (2 FLOPs per MAC). The assumption is that the overhead scales with sequences and sectional
    layers (the router/merge/sync work of each block and sequence), so that it transfers to
    another batch or depth; :func:`kappa_flops_per_token` undoes it for a planned shape.
    """
    if not (flop_rate > 0 and sequences_per_step > 0 and sectional_layers > 0):
        raise ValueError(f"flop_rate={flop_rate}, sequences_per_step={sequences_per_step} and sectional_layers={sectional_layers} "
                         "must be > 0")
    return kappa_s * flop_rate / 2.0 / (sequences_per_step * sectional_layers)


def kappa_flops_per_token(*, kappa_macs: float, sectional_layers: int, seq_len: int) -> float:
    """The overhead per E² in training FLOPs per token of a model with ``sectional_layers`` sectional
    layers and context ``seq_len``: ``2·κ_MACs·sectional_layers/seq_len`` [I] (inverse of
    :func:`kappa_in_macs`), to add ``κ·E²`` to :func:`sectional_moe.models.flops.flops_per_token`."""
    return 2.0 * kappa_macs * sectional_layers / seq_len


def e_opt_closed_form(*, a_trad: float, kappa: float) -> float:
    """Closed-form optimum ``E* ≈ (A_trad/(2κ))^(1/3) = (3·L·d0²/(2κ))^(1/3)`` [I].

    Obtained from ``dS/dE = 0`` keeping only the leading ``A_trad/E²`` term (dropping the
    ``1/E⁴`` / ``1/E³`` and attention terms). It has the shape the abstract describes [P]
    (non-linear in d0, L and the overhead) but it is **not** the paper's equation.
    """
    if a_trad <= 0 or kappa <= 0:
        raise ValueError(f"a_trad={a_trad} and kappa={kappa} must be > 0")
    return (a_trad / (2.0 * kappa)) ** (1.0 / 3.0)


@dataclass(frozen=True)
class EOpt:
    """Optimal expert count of the reconstructed S(E) [I], by four methods."""

    closed_form: float  # (A_trad/(2κ))^(1/3)
    numeric_root: float  # exact root of dS/dE (Brent)
    best_integer: int  # argmax of S over integers 1..e_max
    best_power_of_two: int  # argmax of S over 1, 2, 4, ... ≤ e_max
    view: str
    savings_at_best_integer: float
    savings_at_best_power_of_two: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def e_opt(*, a_trad: float, kappa: float, view: View = "parallel", e_max: int = 1 << 16) -> EOpt:
    """Optimal expert count of the reconstructed S(E) [I]: closed form, exact root of ``dS/dE``,
    best integer and best power of two in ``[1, e_max]``.

    ``S`` is strictly concave on E > 0 (``d²S/dE² < 0``), so ``dS/dE`` has exactly one positive
    root and the best integer is its floor or ceiling; we still scan to be safe.
    """
    closed = e_opt_closed_form(a_trad=a_trad, kappa=kappa)
    f = lambda e: float(savings_derivative(e, a_trad=a_trad, kappa=kappa, view=view))  # noqa: E731
    lo, hi = 1e-6, max(2.0, 2.0 * closed)
    while f(hi) > 0:
        hi *= 2.0
    root = optimize.brentq(f, lo, hi, xtol=1e-14, rtol=4 * np.finfo(float).eps, maxiter=500)
    top = int(min(e_max, max(2, math.ceil(root) + 2)))
    ints = np.arange(1, top + 1)
    s_int = np.asarray(savings(ints, a_trad=a_trad, kappa=kappa, view=view))
    best_int = int(ints[int(np.argmax(s_int))])
    pows = 2 ** np.arange(0, int(math.log2(max(1, min(e_max, 4 * top)))) + 1)
    s_pow = np.asarray(savings(pows, a_trad=a_trad, kappa=kappa, view=view))
    best_pow = int(pows[int(np.argmax(s_pow))])
    return EOpt(
        closed_form=closed,
        numeric_root=float(root),
        best_integer=best_int,
        best_power_of_two=best_pow,
        view=view,
        savings_at_best_integer=float(s_int.max()),
        savings_at_best_power_of_two=float(s_pow.max()),
    )


def e_opt_table(
    *, d_model: int, seq_len: int, kappas: Iterable[float], view: View = "parallel"
) -> pd.DataFrame:
    """``E_opt`` for several κ (paper-notes §2.6, second table) [I]. κ in MACs per E²."""
    a_trad = qkv_cost_traditional(d_model=d_model, seq_len=seq_len)
    rows = []
    for k in kappas:
        r = e_opt(a_trad=a_trad, kappa=float(k), view=view)
        rows.append(
            {
                "kappa": float(k),
                "closed_form": r.closed_form,
                "numeric_root": r.numeric_root,
                "best_integer": r.best_integer,
                "best_power_of_two": r.best_power_of_two,
            }
        )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Exact per-config counts (sectional_moe.models.flops)
# --------------------------------------------------------------------------------------------
BLOCK_COMPONENTS = ("qkv", "attn_scores", "attn_out", "ffn", "router", "merge", "pool")


def llama_d_ff(d_model: int, *, multiple_of: int = 256) -> int:
    """SwiGLU hidden width of LLaMA: ``multiple_of``-rounded ``2/3 · 4·d_model`` (11008 at 4096)."""
    hidden = int(2 * 4 * d_model / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def block_flops_comparison(
    *,
    d_model: int,
    seq_len: int,
    experts: Iterable[int] = PAPER_TABLE_EXPERTS,
    n_heads: int | None = None,
    n_kv_heads: int | None = None,
    d_ff: int | None = None,
    routing: str = "segment_fixed",
    seq_reduction: int | str = "experts",
    expert_attention: bool = True,
    merge_proj: bool = False,
    vocab_size: int = 32000,
) -> pd.DataFrame:
    """Exact FLOP ratio ``dense block / sectional block`` per component, from
    :func:`sectional_moe.models.flops.flops_breakdown` on 1-layer specs of the same ``d_model``, L [D].

    Our framework's block (paper-notes §1.3, our reconstruction [I]): a full-width pre-expert layer
    on L/r positions, E attention+SwiGLU experts on d/E-wide sections, optional merge projection.
    Defaults: head width 128, full multi-head attention (``n_kv_heads = n_heads``, which is what
    ``A_trad = 3·L·d0²`` assumes), LLaMA SwiGLU width, ``r = E``. The LM head is excluded (it is
    not part of the block).

    Columns: ``E`` and, per component c in qkv, attn_scores, attn_out, ffn, ``ratio_<c>`` (dense
    FLOPs / sectional FLOPs; a reduction factor), ``ratio_block`` (all block components incl.
    router and merge), the dense and sectional block FLOPs per token, and the paper-notes factors
    for comparison. ``note`` says why a row is NaN (an invalid spec for that E).
    """
    from sectional_moe.errors import ConfigError
    from sectional_moe.models.flops import flops_breakdown
    from sectional_moe.models.spec import ModelSpec

    n_heads = n_heads or max(1, d_model // 128)
    n_kv_heads = n_kv_heads or n_heads
    d_ff = d_ff or llama_d_ff(d_model)
    common = dict(
        d_model=d_model, n_layers=1, n_heads=n_heads, n_kv_heads=n_kv_heads, d_ff=d_ff,
        seq_len=seq_len, vocab_size=vocab_size,
    )
    dense = flops_breakdown(ModelSpec(family="dense", experts=None, routing=None, **common).validate())
    dense_block = sum(dense[c] for c in BLOCK_COMPONENTS)
    rows = []
    for E in experts:
        E = int(E)
        r = E if seq_reduction == "experts" else int(seq_reduction)
        row: dict[str, Any] = {"E": E, "r": r}
        try:
            spec = ModelSpec(
                family="sectional", experts=E, routing=routing, seq_reduction=r,
                expert_attention=expert_attention, merge_proj=merge_proj, **common,
            ).validate()
            sect = flops_breakdown(spec)
            note = ""
        except ConfigError as err:
            sect, note = None, str(err)
        for c in ("qkv", "attn_scores", "attn_out", "ffn"):
            row[f"ratio_{c}"] = dense[c] / sect[c] if sect and sect[c] > 0 else float("nan")
        sect_block = sum(sect[c] for c in BLOCK_COMPONENTS) if sect else float("nan")
        row["ratio_block"] = dense_block / sect_block if sect else float("nan")
        row["dense_block_flops_per_token"] = dense_block
        row["sectional_block_flops_per_token"] = sect_block
        row["r1_summed"] = float(r1_summed_qkv_factor(E))
        row["r1_parallel"] = float(r1_parallel_qkv_factor(E))
        row["reported_qkv"] = float(reported_qkv_factor(E))
        row["note"] = note
        rows.append(row)
    return pd.DataFrame(rows)


def _scalar(x: np.ndarray) -> float | np.ndarray:
    return float(x) if np.ndim(x) == 0 else x


# --------------------------------------------------------------------------------------------
# κ from measurements: quadratic vs linear overhead, compared by AIC
# --------------------------------------------------------------------------------------------
@dataclass
class OverheadModel:
    """One least-squares fit of step time (or overhead) against E."""

    name: str  # "quadratic" (κ·E²) or "linear" (λ·E)
    formula: str
    coef: dict[str, float]
    se: dict[str, float]
    rss: float
    n: int
    k: int  # regression coefficients (σ² adds one more to the AIC count)
    aic: float
    aicc: float

    def predict(self, experts: np.ndarray, *, g: np.ndarray | None) -> np.ndarray:
        """Fitted time at ``experts``; ``g`` = the compute term g(E) there (None: no compute term)."""
        E = np.asarray(experts, dtype=float)
        out = self.coef["t0"] + np.zeros_like(E)
        if g is not None and "a" in self.coef:
            out = out + self.coef["a"] * np.asarray(g, dtype=float)
        slope = self.coef.get("kappa", self.coef.get("lambda"))
        return out + slope * (E**2 if self.name == "quadratic" else E)


@dataclass
class KappaFit:
    """κ fitted from a sweep of step time vs E [I] (paper-notes §2.5), with the AIC comparison
    of a quadratic (the paper's claim [S]) and a linear overhead, and E_opt measured vs predicted."""

    models: dict[str, OverheadModel]
    preferred: str  # model with the lower AIC
    delta_aic: float  # AIC(linear) − AIC(quadratic); > 0 favours the quadratic overhead
    kappa: float
    kappa_se: float
    view: str
    mode: str  # "step_time" (compute term fitted) or "overhead" (compute column subtracted)
    compute_term: str  # what g(E) is: "exact" (the caller's compute, / its max) or "r1_summed" | "r1_parallel"
    a_time: float  # time of g = 1 used for the S(E) prediction: A_trad in time units under R1
    a_time_source: str
    a_fit: float  # time of g = 1 as fitted (step-time model) or regressed from compute_time; 0 if none
    measured_e_opt: float  # sweep E with the lowest mean measured step time
    fitted_e_opt: float  # continuous argmin of the fitted quadratic-overhead step time
    predicted: EOpt | None  # S(E) optimum with a = a_time and the fitted κ (R1 compute term only)
    predicted_note: str  # why ``predicted`` is None, or ""
    per_e: pd.DataFrame  # E, mean measured time, n, mean g, fitted times of both models
    g_coef: list[float] | None = None  # exact term between swept E: coefficients of COMPUTE_BASIS
    work_max: float | None = None  # the costliest run's compute, in the caller's unit (exact term only)

    @property
    def rate(self) -> float | None:
        """Measured compute rate, compute units per time unit (FLOP/s when the compute column is
        FLOPs per step and times are seconds): the costliest run's compute over its fitted compute
        time ``a``. None without the exact term or with a non-positive ``a``."""
        if self.compute_term != "exact" or self.work_max is None or not self.a_fit > 0:
            return None
        return self.work_max / self.a_fit

    def best_of(self, experts: Iterable[float], model: str = "quadratic") -> float:
        """The E among ``experts`` with the lowest fitted step time (the fitted optimum on a grid)."""
        E = np.asarray(list(experts), dtype=float)
        return float(E[int(np.argmin(self.predict(E, model)))])

    def g(self, experts: np.ndarray) -> np.ndarray:
        """The compute term g(E) at any E (dimensionless): R1's closed form, or, for the exact
        term, the swept values continued by :data:`COMPUTE_BASIS` (or, if that does not fit them,
        interpolated linearly in (log E, log g), constant beyond the sweep)."""
        E = np.asarray(experts, dtype=float)
        if self.compute_term != "exact":
            return np.asarray(r1_qkv_cost_fraction(E, view=self.view), dtype=float)
        if self.g_coef is not None:
            return _compute_basis(E, len(self.g_coef)) @ np.asarray(self.g_coef)
        return np.exp(np.interp(np.log(E), np.log(self.per_e["E"]), np.log(self.per_e["g"])))

    def predict(self, experts: np.ndarray, model: str = "quadratic") -> np.ndarray:
        """Fitted step time (s) at ``experts``: the overhead model plus the compute term."""
        E = np.asarray(experts, dtype=float)
        m = self.models[model]
        if self.mode == "step_time":
            return m.predict(E, g=self.g(E))
        return m.predict(E, g=None) + self.a_fit * self.g(E)

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": {k: {kk: vv for kk, vv in m.__dict__.items()} for k, m in self.models.items()},
            "preferred": self.preferred,
            "delta_aic": self.delta_aic,
            "kappa": self.kappa,
            "kappa_se": self.kappa_se,
            "view": self.view,
            "mode": self.mode,
            "compute_term": self.compute_term,
            "a_time": self.a_time,
            "a_time_source": self.a_time_source,
            "a_fit": self.a_fit,
            "measured_e_opt": self.measured_e_opt,
            "fitted_e_opt": self.fitted_e_opt,
            "predicted": self.predicted.to_dict() if self.predicted else None,
            "predicted_note": self.predicted_note,
            "g_coef": self.g_coef,
            "work_max": self.work_max,
            "rate": self.rate,
            "per_e": self.per_e.to_dict(orient="records"),
        }


#: Functions of E that FLOPs per token of our sectional stacks are a linear combination of [D]
#: (sectional_moe.models.flops): a constant (dense layers, merge), 1/E (summed expert sections; a
#: pre-expert layer on L/r positions when r = E), 1/E² (its attention over L/r keys when r = E)
#: and E (a learned router's d x E logits). Exact for a fixed r and for r = E.
COMPUTE_BASIS = ("1", "1/E", "1/E^2", "E")


def _compute_basis(E: np.ndarray, n: int) -> np.ndarray:
    E = np.asarray(E, dtype=float)
    return np.column_stack([np.ones_like(E), 1.0 / E, 1.0 / E**2, E][:n])


def _fit_compute_basis(E: np.ndarray, g: np.ndarray, rtol: float = 1e-6) -> list[float] | None:
    """Coefficients of the first min(4, #E) basis functions through the swept (E, g), or None when
    they do not reproduce the values to ``rtol`` (then g is interpolated instead)."""
    X = _compute_basis(E, min(len(COMPUTE_BASIS), E.size))
    coef, *_ = np.linalg.lstsq(X, g, rcond=None)
    if np.max(np.abs(X @ coef - g)) > rtol * np.max(np.abs(g)):
        return None
    return [float(c) for c in coef]


def _ols(X: np.ndarray, y: np.ndarray, names: list[str]) -> tuple[dict[str, float], dict[str, float], float]:
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    r = y - X @ coef
    rss = float(r @ r)
    n, k = X.shape
    dof = max(n - k, 1)
    cov = (rss / dof) * np.linalg.pinv(X.T @ X)
    se = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    return dict(zip(names, map(float, coef))), dict(zip(names, map(float, se))), rss


def _aic(rss: float, n: int, k: int) -> tuple[float, float]:
    """Gaussian AIC ``n·ln(RSS/n) + 2(k+1)`` (σ² counted) and its small-sample AICc."""
    p = k + 1
    rss = max(rss, n * 1e-300)
    aic = n * math.log(rss / n) + 2 * p
    aicc = aic + (2 * p * (p + 1) / (n - p - 1) if n - p - 1 > 0 else float("inf"))
    return aic, aicc


def fit_kappa(
    *,
    experts: Iterable[float],
    step_time: Iterable[float],
    compute: Iterable[float] | None = None,
    compute_time: Iterable[float] | None = None,
    view: View = "summed",
    a_time: float | None = None,
) -> KappaFit:
    """Fit the overhead constant κ from measured step time against E [I] (paper-notes §2.5).

    Two models, each by ordinary least squares, compared by Gaussian AIC (and AICc):

    * ``mode="step_time"`` (no ``compute_time``): ``t = t0 + a·g(E) + κE²`` vs
      ``t = t0 + a·g(E) + λE``, where g(E) carries the compute cost of each run;
    * ``mode="overhead"`` (``compute_time`` given, e.g. analytic FLOPs / peak throughput):
      ``t − t_compute = t0 + κE²`` vs ``t0 + λE``; ``a`` comes from regressing ``t_compute`` on g(E).

    The compute term g(E):

    * ``compute`` given (preferred): the exact compute of each measured run in any unit, e.g.
      training FLOPs per step or per token from :mod:`sectional_moe.models.flops`, divided by its
      maximum (dimensionless, 1 = the most expensive run); right for any seq_reduction,
      sectional_every or block layout. If it is the same for every run, the a·g term is dropped.
    * otherwise the fallback: R1's ``A_sect/A_trad`` (``view``), which assumes the whole step is
      the QKV of a block with r = E, so ``a`` is A_trad in time units. Wrong for a fixed
      seq_reduction or mixed dense/sectional layers.

    Units: E dimensionless; times (step_time, compute_time, t0, a) in the caller's unit (seconds
    per step in the report); κ in time per E², λ in time per E.

    E_opt: *measured* = the swept E with the lowest mean step time; *fitted* = the continuous
    argmin of the fitted quadratic model on [min E, max E] (the exact g continued between swept E
    by :data:`COMPUTE_BASIS`);
    *predicted* = :func:`e_opt` of the reconstructed S(E) with ``a_time`` (if given, A_trad in
    time units) or the fitted ``a`` and κ — only with the R1 term, because S(E) is R1's model.
    """
    E = np.asarray(list(experts), dtype=float)
    t = np.asarray(list(step_time), dtype=float)
    if E.shape != t.shape or E.size == 0:
        raise ValueError("experts and step_time must be non-empty and of equal length")
    if np.any(E <= 0) or not np.all(np.isfinite(t)):
        raise ValueError("experts must be > 0 and step times finite")
    if compute is not None:
        work = np.asarray(list(compute), dtype=float)
        if work.shape != E.shape or not np.all(np.isfinite(work)) or np.any(work <= 0):
            raise ValueError("compute must hold one finite value > 0 per measurement")
        g, compute_term = work / work.max(), "exact"
    else:
        g, compute_term = np.asarray(r1_qkv_cost_fraction(E, view=view), dtype=float), f"r1_{view}"
    # identical compute for every run (e.g. only the router changes): a·g would duplicate t0
    has_g = bool(np.ptp(g) > 1e-12 * np.max(np.abs(g)))
    one = np.ones_like(E)
    if compute_time is None:
        mode, y = "step_time", t
        base, names = ([one, g], ["t0", "a"]) if has_g else ([one], ["t0"])
    else:
        mode = "overhead"
        tc = np.asarray(list(compute_time), dtype=float)
        y = t - tc
        base, names = [one], ["t0"]
    need = len(base) + 2
    if np.unique(E).size < len(base) + 1 or E.size < need:
        raise ValueError(f"need at least {len(base) + 1} distinct E and {need} measurements for mode={mode}")
    models = {}
    lhs = "t" if mode == "step_time" else "t - t_compute"
    g_term = " + a*g(E)" if "a" in names else ""
    for name, col, cname, term in (("quadratic", E**2, "kappa", "kappa*E^2"), ("linear", E, "lambda", "lambda*E")):
        X = np.column_stack(base + [col])
        coef, se, rss = _ols(X, y, names + [cname])
        aic, aicc = _aic(rss, E.size, X.shape[1])
        models[name] = OverheadModel(name, f"{lhs} = t0{g_term} + {term}", coef, se, rss, int(E.size), int(X.shape[1]), aic, aicc)
    quad = models["quadratic"]
    if mode == "step_time":
        a_fit, a_src = quad.coef.get("a", 0.0), "fitted a (step-time model)" if has_g else "n/a: compute identical across runs"
    elif has_g:
        _, a_c = np.linalg.lstsq(np.column_stack([np.ones_like(g), g]), tc, rcond=None)[0]
        a_fit, a_src = float(a_c), "regression of compute_time on g(E)"
    else:
        a_fit, a_src = float("nan"), "n/a"
    a_use, a_src = (float(a_time), "given a_time") if a_time is not None else (float(a_fit), a_src)
    kappa = quad.coef["kappa"]
    predicted, note = None, ""
    if compute_term == "exact":
        note = "S(E) is R1's model; with the exact compute term only the measured and fitted E_opt apply"
    elif not (a_use > 0 and kappa > 0):
        note = f"S(E) has no interior optimum with a = {a_use:.3g} and κ = {kappa:.3g} (both must be > 0)"
    else:
        predicted = e_opt(a_trad=a_use, kappa=kappa, view=view)
    uniq = np.unique(E)
    per_e = pd.DataFrame({"E": uniq, "mean_time": [t[E == e].mean() for e in uniq], "n": [(E == e).sum() for e in uniq],
                          "g": [g[E == e].mean() for e in uniq]})
    fit = KappaFit(
        models=models, preferred=min(models, key=lambda k: models[k].aic),
        delta_aic=models["linear"].aic - models["quadratic"].aic, kappa=kappa, kappa_se=quad.se["kappa"], view=view,
        mode=mode, compute_term=compute_term, a_time=a_use, a_time_source=a_src, a_fit=float(a_fit) if np.isfinite(a_fit) else 0.0,
        measured_e_opt=float(uniq[int(np.argmin(per_e["mean_time"]))]), fitted_e_opt=float("nan"),
        predicted=predicted, predicted_note=note, per_e=per_e,
        g_coef=_fit_compute_basis(uniq, per_e["g"].to_numpy()) if compute_term == "exact" else None,
        work_max=float(work.max()) if compute is not None else None,
    )
    for name in models:
        per_e[f"fit_{name}"] = fit.predict(uniq, name)
    res = optimize.minimize_scalar(lambda e: float(fit.predict(np.array([e]))[0]), bounds=(float(uniq.min()), float(uniq.max())),
                                   method="bounded", options={"xatol": 1e-9})
    fit.fitted_e_opt = float(res.x)
    return fit
