"""Registry of published scaling laws: functional forms, coefficient sets, units, provenance.

All functions are pure and vectorised (numpy broadcasting), keyword-only. Provenance tags follow
``shared/scaling-laws.md``:

* **[P]** read in a primary source (the paper's text, or the authors' code and notebook outputs);
* **[S]** secondary source (third-party notes), not checked against the paper;
* **[D]** derived here from a stated formula;
* **[I]** inferred or our own choice.

Units, unless a law says otherwise: N and N_a in parameters (raw counts, not millions), D in
tokens, C in FLOPs, loss in nats per token. Each law's ``conventions`` string says what N counts.

Published MoE coefficients are tied to each paper's tokenizer, data and loss definition: compare
exponents, optima and qualitative structure with our runs, not absolute constants.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

ArrayLike = float | np.ndarray

DEFAULT_MIN_DISTINCT = 3
"""Distinct values of an input a fit needs when its law does not say: a power term in that input
next to a constant has a coefficient and an exponent, so 3 values [D]."""


@dataclass(frozen=True)
class CoefficientSet:
    """One published set of coefficients of a law, with where it was read."""

    values: Mapping[str, float]
    provenance: str  # "[P]", "[S]", "[D]" or "[I]"
    source: str
    note: str = ""


@dataclass(frozen=True)
class Law:
    """A parametric loss law ``L = fn(**inputs, **params)``.

    ``positive`` lists the parameters a fitter should optimise in log space (they must be > 0);
    ``bounds`` optional (low, high) boxes for the others. ``input_params`` says which parameters
    act on each input and ``min_distinct`` how many distinct values of that input a fit needs to
    determine them [D: a term ``A/x^α`` beside a constant needs 3 values of x]; the fitters refuse
    data with fewer (an input whose parameters are all held fixed is not checked). Inputs missing
    from ``min_distinct`` need :data:`DEFAULT_MIN_DISTINCT`.
    """

    name: str
    citation: str
    arxiv: str
    formula: str
    form_provenance: str
    inputs: Mapping[str, str]  # input name -> unit / definition
    params: tuple[str, ...]
    fn: Callable[..., np.ndarray]
    published: Mapping[str, CoefficientSet]
    default: str
    conventions: str
    positive: tuple[str, ...] = ()
    bounds: Mapping[str, tuple[float | None, float | None]] = field(default_factory=dict)
    input_params: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    min_distinct: Mapping[str, int] = field(default_factory=dict)

    def design_rules(self, fixed: Mapping[str, float] | None = None) -> dict[str, int]:
        """Distinct values each input needs, skipping inputs whose parameters are all fixed."""
        fixed = fixed or {}
        out = {}
        for name in self.inputs:
            acting = self.input_params.get(name, self.params)
            if any(p not in fixed for p in acting):
                out[name] = int(self.min_distinct.get(name, DEFAULT_MIN_DISTINCT))
        return out

    def coefficients(self, which: str | Mapping[str, float] | None = None) -> dict[str, float]:
        """A published set by name (default: ``self.default``), or a dict passed through."""
        if which is None:
            which = self.default
        if isinstance(which, str):
            if which not in self.published:
                raise KeyError(f"law {self.name!r} has no coefficient set {which!r}; known: {sorted(self.published)}")
            return dict(self.published[which].values)
        missing = set(self.params) - set(which)
        if missing:
            raise KeyError(f"law {self.name!r}: missing coefficients {sorted(missing)}")
        return {k: float(which[k]) for k in self.params}

    def predict(self, coefficients: str | Mapping[str, float] | None = None, **inputs: ArrayLike) -> np.ndarray:
        """Loss predicted at ``inputs`` with a published set or explicit coefficients."""
        missing = set(self.inputs) - set(inputs)
        if missing:
            raise KeyError(f"law {self.name!r}: missing inputs {sorted(missing)} (needs {list(self.inputs)})")
        return self.fn(**{k: np.asarray(v, dtype=float) for k, v in inputs.items()}, **self.coefficients(coefficients))

    def describe(self) -> dict[str, Any]:
        """JSON-safe summary (for the ``laws`` CLI)."""
        return {
            "name": self.name,
            "citation": self.citation,
            "arxiv": self.arxiv,
            "formula": self.formula,
            "form_provenance": self.form_provenance,
            "inputs": dict(self.inputs),
            "params": list(self.params),
            "conventions": self.conventions,
            "default": self.default,
            "bounds": {k: list(v) for k, v in self.bounds.items()},
            "min_distinct": {k: int(self.min_distinct.get(k, DEFAULT_MIN_DISTINCT)) for k in self.inputs},
            "published": {
                k: {"values": dict(v.values), "provenance": v.provenance, "source": v.source, "note": v.note}
                for k, v in self.published.items()
            },
        }


# ============================================================================================
# Chinchilla (Hoffmann et al. 2022) and the Epoch refit (Besiroglu et al. 2024)
# ============================================================================================
def chinchilla_loss(*, N: ArrayLike, D: ArrayLike, E: float, A: float, B: float, alpha: float, beta: float) -> np.ndarray:
    """``L(N, D) = E + A/N^α + B/D^β`` (Hoffmann et al. 2022, Eq. 2) [P]. N parameters, D tokens."""
    N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
    return E + A / N**alpha + B / D**beta


def chinchilla_frontier(
    *, C: ArrayLike, E: float, A: float, B: float, alpha: float, beta: float
) -> dict[str, np.ndarray | float]:
    """Closed-form compute-optimal frontier under ``C = 6·N·D`` (Hoffmann Eq. 4) [P].

    ``N_opt = G·(C/6)^a``, ``D_opt = G⁻¹·(C/6)^b``, ``G = (αA/(βB))^(1/(α+β))``,
    ``a = β/(α+β)``, ``b = α/(α+β)``. Returns G, a, b, N_opt (parameters), D_opt (tokens),
    L_opt (nats) and D_per_N. C in FLOPs. Never round coefficients before calling this.
    """
    C = np.asarray(C, dtype=float)
    G = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
    a = beta / (alpha + beta)
    b = alpha / (alpha + beta)
    n_opt = G * (C / 6.0) ** a
    d_opt = (C / 6.0) ** b / G
    return {
        "G": G,
        "a": a,
        "b": b,
        "N_opt": n_opt,
        "D_opt": d_opt,
        "L_opt": chinchilla_loss(N=n_opt, D=d_opt, E=E, A=A, B=B, alpha=alpha, beta=beta),
        "D_per_N": d_opt / n_opt,
    }


_HOFFMANN_TEX = {
    "E": float(np.exp(0.5267228)),
    "A": float(np.exp(6.0073404)),
    "B": float(np.exp(6.0179186)),
    "alpha": 0.33917084,
    "beta": 0.2849083,
}

CHINCHILLA = Law(
    name="chinchilla",
    citation="Hoffmann et al. 2022, Training Compute-Optimal Large Language Models (Approach 3); Besiroglu et al. 2024, Chinchilla Scaling: A replication attempt",
    arxiv="2203.15556; 2404.10102",
    formula="L = E + A/N^alpha + B/D^beta",
    form_provenance="[P] Hoffmann Eq. 2",
    inputs={"N": "parameters (Chinchilla counts embeddings [S])", "D": "training tokens"},
    params=("E", "A", "B", "alpha", "beta"),
    fn=chinchilla_loss,
    published={
        "hoffmann_tex": CoefficientSet(_HOFFMANN_TEX, "[P]", "TeX source values, read in Epoch's data_analysis.ipynb"),
        "hoffmann_rounded": CoefficientSet(
            {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}, "[P]", "Hoffmann et al. 2022, paper body (rounded)"
        ),
        "epoch": CoefficientSet(
            {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658},
            "[S]",
            "Besiroglu et al. 2024 Table 1, as quoted by a secondary source",
            "the notebook's Huber-MLE gives E=1.8169, beta=0.3659 [P]",
        ),
        "epoch_mle": CoefficientSet(
            {"E": 1.8169, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3659}, "[P]", "Epoch data_analysis.ipynb, Huber-likelihood MLE"
        ),
        "epoch_huber_grid": CoefficientSet(
            {"E": 1.8172, "A": 477.8, "B": 2143.4, "alpha": 0.3473, "beta": 0.3672},
            "[P]",
            "Epoch notebook: pure Huber minimiser from the 4500-start L-BFGS-B grid (reproduced in scaling-laws.md §9)",
        ),
    },
    default="epoch_mle",
    conventions="N = total parameters incl. embeddings [S]; D tokens; C = 6·N·D FLOPs; loss in nats.",
    positive=("E", "A", "B"),
    bounds={"alpha": (0.0, 5.0), "beta": (0.0, 5.0)},
    input_params={"N": ("A", "alpha"), "D": ("B", "beta")},
    min_distinct={"N": 3, "D": 3},
)


# ============================================================================================
# Fine-grained MoE (Krajewski / Ludziejewski et al. 2024)
# ============================================================================================
def fine_grained_loss(
    *, N: ArrayLike, D: ArrayLike, G: ArrayLike, a: float, alpha: float, b: float, beta: float, g: float, gamma: float, c: float
) -> np.ndarray:
    """``L(N, D, G) = c + (g/G^γ + a)/N^α + b/D^β`` (Krajewski et al. 2024) [S].

    G = d_ff/d_expert (granularity, ≥ 1), N total non-embedding parameters [S], D tokens. As
    G → ∞ the N-coefficient saturates at ``a``; there is no D×G interaction.
    """
    N, D, G = (np.asarray(x, dtype=float) for x in (N, D, G))
    return c + (g / G**gamma + a) / N**alpha + b / D**beta


def fine_grained_flops(
    *, d_model: ArrayLike, expansion: ArrayLike, G: ArrayLike, D: ArrayLike, n_blocks: ArrayLike, c_f: float = 6.0, c_r: float = 14.0
) -> np.ndarray:
    """Training FLOPs ``F = (12·d²·c_f + d·E·G·c_r)·D·n_blocks`` of Krajewski et al. 2024 [S];
    ``E`` = expansion rate, ``c_r`` the router/gather/scatter overhead constant (14 [S])."""
    d, e, g, dd, nb = (np.asarray(x, dtype=float) for x in (d_model, expansion, G, D, n_blocks))
    return (12.0 * d**2 * c_f + d * e * g * c_r) * dd * nb


FINE_GRAINED = Law(
    name="fine_grained",
    citation="Krajewski/Ludziejewski et al. 2024, Scaling Laws for Fine-Grained Mixture of Experts",
    arxiv="2402.07871",
    formula="L = c + (g/G^gamma + a)/N^alpha + b/D^beta",
    form_provenance="[S]",
    inputs={"N": "total non-embedding parameters [S]", "D": "training tokens", "G": "granularity d_ff/d_expert"},
    params=("a", "alpha", "b", "beta", "g", "gamma", "c"),
    fn=fine_grained_loss,
    published={
        "krajewski2024": CoefficientSet(
            {"a": 18.1, "alpha": 0.115, "b": 30.8, "beta": 0.147, "g": 2.1, "gamma": 0.58, "c": 0.47},
            "[S]",
            "two secondary notes agree (paper Table 2 not read)",
            "Expert Choice routing, expansion rate 64, C4",
        )
    },
    default="krajewski2024",
    conventions="N non-embedding total params; D tokens; loss nats (C4); G is an average experts per token (Expert Choice).",
    positive=("a", "b", "g", "c"),
    bounds={"alpha": (0.0, 3.0), "beta": (0.0, 3.0), "gamma": (0.0, 3.0)},
    input_params={"N": ("a", "alpha", "g", "gamma"), "D": ("b", "beta"), "G": ("g", "gamma")},
    min_distinct={"N": 3, "D": 3, "G": 3},
)


# ============================================================================================
# Clark et al. 2022 (routed LMs, per router incl. hash)
# ============================================================================================
def clark_ehat(E: ArrayLike, *, e_start: float, e_max: float) -> np.ndarray:
    """Saturating expert transform ``1/Ê = 1/(E − 1 + (1/E_start − 1/E_max)⁻¹) + 1/E_max``
    (Clark et al. 2022) [S]. ``Ê(1) = E_start``, ``Ê(∞) = E_max`` [D]."""
    E = np.asarray(E, dtype=float)
    return 1.0 / (1.0 / (E - 1.0 + 1.0 / (1.0 / e_start - 1.0 / e_max)) + 1.0 / e_max)


def clark_loss(
    *, N: ArrayLike, E: ArrayLike, a: float, b: float, c: float, d: float, e_start: float, e_max: float
) -> np.ndarray:
    """``log₁₀ L = a·log₁₀N + b·log₁₀Ê + c·log₁₀N·log₁₀Ê + d`` (Clark et al. 2022) [S].

    N = dense (per-token active) parameters, E = experts. Logs are base 10 [D]: natural logs
    give implausible losses (scaling-laws.md §6.2).
    """
    lN = np.log10(np.asarray(N, dtype=float))
    lE = np.log10(clark_ehat(E, e_start=e_start, e_max=e_max))
    return 10.0 ** (a * lN + b * lE + c * lN * lE + d)


def clark_n_cut(*, b: float, c: float) -> float:
    """Dense size at which routing stops helping, ``N_cut = 10^(−b/c)`` [D] (∂log L/∂log Ê = 0)."""
    return float(10.0 ** (-b / c))


def clark_effective_params(
    *, N: ArrayLike, E: ArrayLike, a: float, b: float, c: float, d: float = 0.0, e_start: float, e_max: float
) -> np.ndarray:
    """Effective parameter count N̄ with ``L(N̄, 1) = L(N, E)`` [D]:
    ``log N̄ = (a·logN + b·logÊ + c·logN·logÊ − b·logÊ₁)/(a + c·logÊ₁)``, Ê₁ = E_start."""
    lN = np.log10(np.asarray(N, dtype=float))
    lE = np.log10(clark_ehat(E, e_start=e_start, e_max=e_max))
    l1 = np.log10(e_start)
    return 10.0 ** ((a * lN + b * lE + c * lN * lE - b * l1) / (a + c * l1))


CLARK = Law(
    name="clark",
    citation="Clark et al. 2022, Unified Scaling Laws for Routed Language Models",
    arxiv="2202.01169",
    formula="log10 L = a log10 N + b log10 Ehat + c log10 N log10 Ehat + d;  1/Ehat = 1/(E-1+(1/E_start-1/E_max)^-1) + 1/E_max",
    form_provenance="[S]",
    inputs={"N": "dense (active) parameters", "E": "number of experts"},
    params=("a", "b", "c", "d", "e_start", "e_max"),
    fn=clark_loss,
    published={
        "s_base": CoefficientSet(
            {"a": -0.082, "b": -0.108, "c": 0.009, "d": 1.104, "e_start": 1.847, "e_max": 314.5},
            "[S]",
            "single secondary source; matches recollection of the paper [I]",
            "Sinkhorn-BASE routing; 130B tokens per run",
        ),
        "rl_r": CoefficientSet(
            {"a": -0.083, "b": -0.126, "c": 0.012, "d": 1.111, "e_start": 1.880, "e_max": 470.0},
            "[S]",
            "single secondary source, not independently confirmed",
            "REINFORCE-learned routing",
        ),
        "hash": CoefficientSet(
            {"a": -0.087, "b": -0.136, "c": 0.012, "d": 1.157, "e_start": 4.175, "e_max": 477.7},
            "[S]",
            "single secondary source, not independently confirmed",
            "hash layers (Roller et al. 2021)",
        ),
    },
    default="s_base",
    conventions="log base 10 [D]; N dense/active params; fixed 130B training tokens (no D term); loss nats.",
    positive=("e_start", "e_max"),
    input_params={"N": ("a", "c"), "E": ("b", "c", "e_start", "e_max")},
    # for fixed (E_start, E_max) the law is linear in (a, b, c, d): 2 values of log N suffice; Ê's
    # saturation adds E_start and E_max to b, so 4 values of E [D]
    min_distinct={"N": 2, "E": 4},
)


# ============================================================================================
# Ludziejewski et al. 2025 (joint MoE law)
# ============================================================================================
def joint_moe_loss(
    *,
    N_act: ArrayLike,
    D: ArrayLike,
    E: ArrayLike,
    a: float,
    alpha: float,
    delta: float,
    gamma: float,
    b: float,
    beta: float,
    omega: float,
    zeta: float,
    c: float,
    e_start: float,
    e_max: float,
) -> np.ndarray:
    """``L = a·Ê^δ·N_act^−(α+γ·lnÊ) + b·Ê^ω·D^−(β+ζ·lnÊ) + c`` (Ludziejewski et al. 2025) [S],
    with Ê the Clark saturating transform (Ê(1) = E_start) [S]. Signs as in scaling-laws.md §7.1."""
    N, D = np.asarray(N_act, dtype=float), np.asarray(D, dtype=float)
    eh = clark_ehat(E, e_start=e_start, e_max=e_max)
    le = np.log(eh)
    return a * eh**delta * N ** (-(alpha + gamma * le)) + b * eh**omega * D ** (-(beta + zeta * le)) + c


JOINT_MOE = Law(
    name="joint_moe",
    citation="Ludziejewski et al. 2025, Joint MoE Scaling Laws: Mixture of Experts Can Be Memory Efficient",
    arxiv="2502.05172",
    formula="L = a Ehat^delta N_act^-(alpha + gamma ln Ehat) + b Ehat^omega D^-(beta + zeta ln Ehat) + c",
    form_provenance="[S] (two secondary notes agree; one drops the minus signs)",
    inputs={"N_act": "active parameters", "D": "training tokens", "E": "number of experts"},
    params=("a", "alpha", "delta", "gamma", "b", "beta", "omega", "zeta", "c", "e_start", "e_max"),
    fn=joint_moe_loss,
    published={
        "ludziejewski2025": CoefficientSet(
            {
                "a": 35.91, "alpha": 0.1889, "delta": 0.2285, "gamma": -0.0098, "b": 35.98, "beta": 0.1775,
                "omega": -0.5529, "zeta": 0.0259, "c": 1.3637, "e_start": 2.07, "e_max": 290.45,
            },
            "[S]",
            "two secondary notes agree on the numbers",
            "mostly Switch top-1 routing; FineWeb-Edu",
        )
    },
    default="ludziejewski2025",
    conventions="N_act active params; D tokens; natural log inside the exponents; loss nats.",
    positive=("a", "b", "c", "e_start", "e_max"),
    input_params={"N_act": ("a", "alpha", "gamma"), "D": ("b", "beta", "zeta"),
                  "E": ("delta", "gamma", "omega", "zeta", "e_start", "e_max")},
    min_distinct={"N_act": 3, "D": 3, "E": 4},
)


# ============================================================================================
# Zhao et al. 2025 (comprehensive MoE law, seed 002)
# ============================================================================================
ZHAO_PARAMS = ("e", "f", "m", "n", "k", "h", "a", "alpha", "b", "beta", "c", "eps")


def zhao_structure_multiplier(*, G: ArrayLike, S: ArrayLike, e: float, f: float, m: float, n: float) -> np.ndarray:
    """``P(G, S) = e·G + f/G + m·S² + n·S`` (the separable structure factor of Zhao's law) [S]."""
    G, S = np.asarray(G, dtype=float), np.asarray(S, dtype=float)
    return e * G + f / G + m * S**2 + n * S


def zhao_loss(
    *,
    N: ArrayLike,
    D: ArrayLike,
    N_a: ArrayLike,
    G: ArrayLike,
    S: ArrayLike,
    e: float,
    f: float,
    m: float,
    n: float,
    k: float,
    h: float,
    a: float,
    alpha: float,
    b: float,
    beta: float,
    c: float,
    eps: float,
) -> np.ndarray:
    """Zhao et al. 2025 joint law [S] (scaling-laws.md §3.2):

    ``L = (e·G + f/G + m·S² + n·S)·(1/N^α + k/N_a^α + h·N_a/N) + a/N^α + b/D^β + c/N_a^α + ε``.

    N total and N_a activated parameters (raw counts [D]), D tokens, G activated experts,
    S shared-expert ratio. Whether embeddings are counted is not stated [S].
    """
    N, D, Na = (np.asarray(x, dtype=float) for x in (N, D, N_a))
    P = zhao_structure_multiplier(G=G, S=S, e=e, f=f, m=m, n=n)
    return P * (1.0 / N**alpha + k / Na**alpha + h * Na / N) + a / N**alpha + b / D**beta + c / Na**alpha + eps


def zhao_optima(
    *, N: ArrayLike | None = None, e: float, f: float, m: float, n: float, k: float, h: float, alpha: float, c: float, **_: float
) -> dict[str, Any]:
    """Closed-form optima of Zhao's law [D] (scaling-laws.md §3.3).

    ``G* = √(f/e)``, ``S* = −n/(2m)`` (independent of N, D, N_a *by the separable form*),
    ``P* = P(G*, S*)``, and from ∂L/∂N_a = 0:
    ``N_a* = (α(P*·k + c)·N/(P*·h))^(1/(1+α))``, so ``(N_a/N)* ∝ N^(−α/(1+α))``, independent of D.
    Extra keyword coefficients (a, b, beta, eps) are accepted and ignored.
    """
    g_opt = float(np.sqrt(f / e))
    s_opt = float(-n / (2.0 * m))
    p_opt = float(zhao_structure_multiplier(G=g_opt, S=s_opt, e=e, f=f, m=m, n=n))
    out: dict[str, Any] = {"G_opt": g_opt, "S_opt": s_opt, "P_opt": p_opt, "ratio_exponent": -alpha / (1.0 + alpha)}
    if N is not None:
        N = np.asarray(N, dtype=float)
        na = (alpha * (p_opt * k + c) * N / (p_opt * h)) ** (1.0 / (1.0 + alpha))
        out["N_a_opt"] = na
        out["N_a_over_N_opt"] = na / N
    return out


ZHAO = Law(
    name="zhao",
    citation="Zhao et al. 2025, Towards a Comprehensive Scaling Law of Mixture-of-Experts",
    arxiv="2509.23678",
    formula="L = (eG + f/G + mS^2 + nS)(1/N^alpha + k/N_a^alpha + h N_a/N) + a/N^alpha + b/D^beta + c/N_a^alpha + eps",
    form_provenance="[S] (Chinese-language study note; optima cross-checked [D])",
    inputs={"N": "total parameters", "D": "training tokens", "N_a": "activated parameters", "G": "activated experts", "S": "shared-expert ratio"},
    params=ZHAO_PARAMS,
    fn=zhao_loss,
    published={
        "zhao2025": CoefficientSet(
            {
                "e": 0.1577, "f": 7.2446, "m": 5.1395, "n": -3.2363, "k": 0.0013, "h": 0.0450,
                "a": 38.051, "alpha": 0.2383, "b": 27129.05, "beta": 0.4694, "c": 31.096, "eps": 1.8182,
            },
            "[S]",
            "secondary study note (paper App. C.1 Table 2 not read); reproduces the paper's headline optima [D]",
        )
    },
    default="zhao2025",
    conventions="N, N_a raw parameter counts [D]; D tokens; embedding convention not stated [S]; loss nats (Dolma subset).",
    positive=("e", "f", "m", "k", "h", "a", "b", "c", "eps"),
    bounds={"alpha": (0.0, 3.0), "beta": (0.0, 3.0)},
    input_params={"N": ("a", "alpha", "h"), "D": ("b", "beta"), "N_a": ("k", "h", "c"), "G": ("e", "f"), "S": ("m", "n")},
    min_distinct={"N": 3, "D": 3, "N_a": 3, "G": 3, "S": 3},
)


# ============================================================================================
# Wan, Han, Zhang, Jin 2026 (holistic MoE laws, seed 003): allocation, not a loss
# ============================================================================================
WAN_2026: dict[str, float] = {"D_coef": 22.8929, "D_exp": 0.4563, "M_coef": 0.04368, "M_exp": 0.5437}
"""Wan et al. 2026 Eq. 2 coefficients [P]: ``D_opt = 22.8929·C^0.4563``, ``M_opt = 0.04368·C^0.5437``."""

WAN_N_OVER_NA_BAND: tuple[float, float] = (18.0, 25.0)
"""Near-optimal parameter expansion ratio N/N_a of Wan et al. 2026 [P] (1 shared + 288 routed
experts, top-8; fixed rather than fitted vs C, their App. F.4)."""


def wan_d_opt(C: ArrayLike) -> np.ndarray:
    """Compute-optimal training tokens ``D_opt(C) = 22.8929·C^0.4563`` (Wan et al. 2026 Eq. 2) [P].
    C in FLOPs with ``C = M·D`` exactly (M includes attention FLOPs and the backward pass [D])."""
    return WAN_2026["D_coef"] * np.asarray(C, dtype=float) ** WAN_2026["D_exp"]


def wan_m_opt(C: ArrayLike) -> np.ndarray:
    """Compute-optimal training FLOPs per token ``M_opt(C) = 0.04368·C^0.5437`` (Wan Eq. 2) [P].
    M in FLOPs/token, forward + backward [D] (≈ 6·N_a + attention terms)."""
    return WAN_2026["M_coef"] * np.asarray(C, dtype=float) ** WAN_2026["M_exp"]


def wan_allocation(C: ArrayLike) -> dict[str, np.ndarray | tuple[float, float]]:
    """Wan et al. 2026 allocation at budget C [P]: M_opt, D_opt, their product over C (≈ 1
    because 22.8929 × 0.04368 ≈ 1 [D]) and the N/N_a band."""
    m, d = wan_m_opt(C), wan_d_opt(C)
    return {"M_opt": m, "D_opt": d, "MD_over_C": m * d / np.asarray(C, dtype=float), "N_over_N_a_band": WAN_N_OVER_NA_BAND}


# ============================================================================================
# Registry
# ============================================================================================
LAWS: dict[str, Law] = {law.name: law for law in (CHINCHILLA, FINE_GRAINED, CLARK, JOINT_MOE, ZHAO)}
"""Loss laws by name: chinchilla, fine_grained, clark, joint_moe, zhao."""

ALLOCATION_LAWS: dict[str, dict[str, Any]] = {
    "wan2026": {
        "citation": "Wan, Han, Zhang, Jin 2026, Holistic Scaling Laws for Optimal Mixture-of-Experts Architecture Optimization",
        "arxiv": "2603.21862",
        "formula": "D_opt = 22.8929 C^0.4563;  M_opt = 0.04368 C^0.5437;  N/N_a in 18-25",
        "provenance": "[P] (v1 full text, Eq. 2 and Table 2)",
        "conventions": "C FLOPs = M·D exactly; M training FLOPs/token incl. attention; N, N_a non-embedding.",
        "values": dict(WAN_2026),
        "n_over_na_band": list(WAN_N_OVER_NA_BAND),
    },
    "chinchilla_frontier": {
        "citation": "Hoffmann et al. 2022, Eq. 4",
        "arxiv": "2203.15556",
        "formula": "N_opt = G (C/6)^a, D_opt = (C/6)^b / G, G = (alpha A/(beta B))^(1/(alpha+beta)), a = beta/(alpha+beta)",
        "provenance": "[P]",
        "conventions": "C = 6 N D FLOPs; any chinchilla coefficient set.",
    },
}


def get_law(name: str) -> Law:
    """A loss law by name, with an error listing the known names."""
    try:
        return LAWS[name]
    except KeyError:
        raise KeyError(f"unknown law {name!r}; known: {sorted(LAWS)}") from None
