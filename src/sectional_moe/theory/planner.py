"""Compute-optimal planner: budget C (FLOPs) + family → configurations, the data to train them on,
and the Hydra sweep that trains them.

Steps (each says where its numbers come from):

1. **Allocation** from a law:
   * ``law="chinchilla"`` (default for ``dense``): the closed-form frontier of Hoffmann Eq. 4 [P]
     with a published coefficient set (default ``epoch_mle``, Besiroglu et al. 2024 [P]), or our
     own fitted coefficients (``coefficients=`` a dict, e.g. from :func:`coefficients_from_fit`),
     gives the target N_opt (parameters) and D_opt under C = 6·N·D. With a published set, MoE
     families match the *active* parameter count [I] (a dense law applied to N_a; no published
     basis); a fit of the family's own runs matches what it was fitted on (total parameters);
   * ``law="wan2026"`` (default for ``moe`` and ``sectional``): Wan et al. 2026 Eq. 2 [P] gives
     the target training FLOPs per token M_opt(C) and D_opt(C) with C = M·D. Wan fitted it on
     token MoE (1 shared + 288 routed experts, top-8); applying it to the sectional family is
     our assumption [I] — no scaling law for the sectional MoE exists.
2. **Shapes for any size** [I]: LLaMA-style decoders with head width 64 (d_model < 2048) or 128
   (GPT-3 and LLaMA use 64–128 [I, recalled]), GQA 2:1, SwiGLU d_ff = 3·d_model (our presets),
   d_model/n_layers within :data:`ASPECT_BAND`, preferring :func:`preferred_aspect` (≈ GPT-3's
   shapes, 43 at d 1024 → 128 from d 3072), and a context that grows with width,
   :func:`default_seq_len` (attention scores ≤ ~8 % of the matmul FLOPs). Widths are generated
   around the size the law asks for, every shape is validated by
   :class:`~sectional_moe.models.spec.ModelSpec` and counted exactly by
   :mod:`sectional_moe.models.flops`; the shapes within :data:`TARGET_RTOL` of the target are
   kept (closest first when none is). Where a constraint still binds, the gap to the target and
   the loss the *planned* allocation predicts are reported next to the law's optimum.
3. **Batch and learning rate** from the compute budget, DeepSeek LLM (Bi et al. 2024, arXiv
   2401.02954, §3.1 Eq. 1): ``B_opt = 0.2920·C^0.3271`` tokens per step [P] and
   ``η_opt = 0.3118·C^−0.1250`` [I: recalled; it reproduces the learning rates DeepSeek used for
   its 7B and 67B models, 4.2e-4 and 3.2e-4, as quoted by a secondary source [S]], fitted on
   dense models (outside its range they are extrapolated); ``batch_size = round(B_opt/seq_len)``.
4. **Expert count** from the laws (unless ``experts`` is given):
   * ``moe``: Zhao et al. 2025's G* = √(f/e) ≈ 6.78 [D on S] activated experts → ``top_k``, each
     expert ``d_ff/top_k`` wide (fine-grained, as Zhao varies G at fixed N_a [S]) [I]; the total E
     is the candidate whose planned N_a/N is closest to Zhao's optimum (N_a/N)*(N) (§3.3 [D]);
   * ``sectional``: the valid E (d_model, heads, kv heads, d_ff and seq_len divisible, r = E)
     with the lowest *exact* training FLOPs per token plus the overhead κ·E² (κ in MACs per E² per
     sequence and sectional layer, converted by
     :func:`~sectional_moe.theory.cost_model.kappa_flops_per_token`) — the model the report fits
     to measured step times, so a κ measured there and converted by
     :func:`~sectional_moe.theory.cost_model.kappa_in_macs` gives the E_opt the report shows
     [I]; the reconstructed S(E)'s closed form is printed beside it. Shape and E are iterated to
     a fixed point.
5. **Tokens** = C / M_exact, so that the run spends the budget exactly (M_exact = training
   matmul FLOPs per token incl. attention scores and LM head); steps = tokens / batch tokens.
6. **Data**: the smallest corpus of :mod:`~sectional_moe.theory.corpora` that holds the tokens
   within ``max_epochs`` passes (default 1: a compute-optimal law assumes unrepeated data), or
   the given one — refused (:class:`PlanError`) when the tokens exceed ``max_epochs`` of it.
7. **Predicted loss**, always in the law's own units (its data and tokenizer, not ours): dense —
   Chinchilla at (N, D); moe — Zhao's joint law at (N, D, N_a, G, S = 0); sectional — the dense
   Chinchilla law at its FLOP-equivalent active parameters plus embeddings, an assumption [I]
   stated in ``predicted_loss_note``. A prediction above ln(vocab) (a uniform guess) is flagged.
8. **Commands**: one ``python train.py -m ...`` line per distinct shape (experts sharing a shape
   and step count are merged into one sweep), with ``data=`` and ``optim.lr=``.

Imports: numpy; ``sectional_moe.models`` (spec, FLOP and parameter counts; torch-free),
``sectional_moe.errors``; ``theory.cost_model``, ``theory.laws``, ``theory.corpora``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from sectional_moe.errors import ConfigError
from sectional_moe.models.flops import flops_per_token, param_counts
from sectional_moe.models.spec import ModelSpec
from sectional_moe.theory import cost_model
from sectional_moe.theory.corpora import CORPORA, corpus_tokens
from sectional_moe.theory.laws import CHINCHILLA, WAN_N_OVER_NA_BAND, ZHAO, chinchilla_frontier, wan_d_opt, wan_m_opt, zhao_optima

#: The framework's size presets (conf/size/*.yaml): d_model/n_layers/n_heads/n_kv_heads/d_ff/seq_len.
SIZE_PRESETS: dict[str, dict[str, int]] = {
    "nano": {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 192, "seq_len": 64},
    "tiny": {"d_model": 128, "n_layers": 4, "n_heads": 8, "n_kv_heads": 4, "d_ff": 384, "seq_len": 128},
    "small": {"d_model": 256, "n_layers": 6, "n_heads": 8, "n_kv_heads": 4, "d_ff": 768, "seq_len": 256},
    "base": {"d_model": 768, "n_layers": 12, "n_heads": 16, "n_kv_heads": 4, "d_ff": 2048, "seq_len": 1024},
    "medium": {"d_model": 1024, "n_layers": 12, "n_heads": 16, "n_kv_heads": 4, "d_ff": 2816, "seq_len": 1024},
    "large": {"d_model": 1024, "n_layers": 24, "n_heads": 16, "n_kv_heads": 8, "d_ff": 3584, "seq_len": 2048},
}

DEFAULT_ROUTING = {"dense": None, "moe": "topk", "sectional": "segment_fixed"}
DEFAULT_LAW = {"dense": "chinchilla", "moe": "wan2026", "sectional": "wan2026"}

#: DeepSeek LLM (Bi et al. 2024) Eq. 1 [P]: B_opt = 0.2920·C^0.3271 tokens per step, C in FLOPs.
DEEPSEEK_BATCH = {"coef": 0.2920, "exp": 0.3271}
#: DeepSeek LLM Eq. 1, learning rate [I recalled, checked against their 7B/67B rates, see module doc].
DEEPSEEK_LR = {"coef": 0.3118, "exp": -0.1250}
#: Compute range of DeepSeek's hyper-parameter fits (FLOPs); outside it the rules are extrapolated.
DEEPSEEK_RANGE = (1e17, 2e19)
#: Overhead κ of the sectional cost model in MACs per E² per sequence and sectional layer (the unit
#: of A_trad = 3·L·d0²). A placeholder [I], not a measurement: pass one measured by the report
#: (its fits.json carries it converted: ``kappa_macs_per_E2_seq_layer``; ``--kappa-from``).
DEFAULT_KAPPA_MACS = 1e5
#: Total expert counts the moe planner compares by Zhao's optimal active ratio.
MOE_EXPERT_CANDIDATES = (8, 16, 32, 64)
#: conf/model/sectional.yaml's default: every 2nd layer sectional.
DEFAULT_SECTIONAL_EVERY = 2
#: d_model / n_layers of generated shapes [I]: GPT-3's 43-128 and our presets' 32-85 lie inside.
ASPECT_BAND = (16.0, 192.0)
#: A shape within this relative distance of the law's target counts as on target.
TARGET_RTOL = 0.02
#: Context lengths the planner generates.
SEQ_LEN_RANGE = (64, 8192)
#: Epochs of the chosen corpus a plan may use (compute-optimal laws assume unrepeated data).
DEFAULT_MAX_EPOCHS = 1.0


class PlanError(ValueError):
    """The plan cannot be made as asked (e.g. its tokens exceed the epochs allowed of the data)."""


@dataclass
class PlannedRun:
    """One proposed training run (all counts exact, from :mod:`sectional_moe.models.flops`)."""

    family: str
    experts: int | None
    routing: str | None
    top_k: int | None  # experts per token (moe topk)
    expert_d_ff: int | None  # expert FFN width when set explicitly (moe fine-grained experts)
    sectional_every: int | None  # every k-th layer sectional (sectional only)
    preset: str  # nearest size preset by d_model (the base the overrides start from)
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    seq_len: int
    batch_size: int  # sequences per optimiser step (one device: data.batch_size)
    batch_tokens: int  # batch_size · seq_len
    max_steps: int
    tokens: float  # max_steps · batch_tokens
    flops_per_token: float  # training (3 × forward) matmul FLOPs per token, exact
    compute: float  # flops_per_token · tokens
    n_total: float
    n_non_embedding: float
    n_active: float  # FLOP-equivalent active non-embedding parameters (N_a of Wan et al. 2026)
    target_name: str  # "N_opt" | "N_a_opt" | "M_opt"
    target: float
    matched: float  # the value of this config that was matched to the target
    law_d_opt: float  # D_opt of the law at this budget (tokens)
    lr: float = 0.0  # peak learning rate (optim.lr)
    data: str = "shakespeare"  # data config (data=...)
    data_overrides: list[str] = field(default_factory=list)  # extra data.* overrides (hub path, vocab)
    target_gap: float = 0.0  # matched / target − 1
    tokens_gap: float = 0.0  # tokens / D_opt − 1
    predicted_loss: float | None = None  # nats/token in the predicting law's units (its data/tokenizer)
    predicted_loss_law: str | None = None
    predicted_loss_note: str = ""
    optimum_loss: float | None = None  # the law's loss at its own optimum (chinchilla laws only)

    def overrides(self, *, group: str) -> list[str]:
        out = [f"model={self.family}"]
        if self.family != "dense":
            out += [f"experts={self.experts}", f"routing={self.routing}"]
        if self.routing == "topk" and self.top_k is not None:
            out.append(f"routing.top_k={self.top_k}")
        if self.expert_d_ff is not None:
            out.append(f"model.expert_d_ff={self.expert_d_ff}")
        if self.family == "sectional":
            out += ["model.seq_reduction=experts", f"model.sectional_every={self.sectional_every}"]
        out += [
            f"size={self.preset}",
            f"size.d_model={self.d_model}",
            f"size.n_layers={self.n_layers}",
            f"size.n_heads={self.n_heads}",
            f"size.n_kv_heads={self.n_kv_heads}",
            f"size.d_ff={self.d_ff}",
            f"size.seq_len={self.seq_len}",
            f"data={self.data}",
            *self.data_overrides,
            f"data.batch_size={self.batch_size}",
            f"trainer.max_steps={self.max_steps}",
            f"optim.lr={self.lr:.3g}",
            f"group={group}",
        ]
        return out


@dataclass
class Plan:
    """A budget's plan: the law's allocation, the runs, the data, the commands, and caveats."""

    budget: float
    family: str
    law: str
    law_provenance: str
    allocation: dict[str, float]
    batch_rule: str
    lr_rule: str
    expert_choice: dict[str, Any]  # how E (and top_k) were chosen, with the candidates compared
    data: dict[str, Any]  # the corpus, its tokens and how they are known, the epochs the plan uses
    runs: list[PlannedRun]
    commands: list[str]
    group: str
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what the user must act on (gaps, data, loss)

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "family": self.family,
            "law": self.law,
            "law_provenance": self.law_provenance,
            "allocation": self.allocation,
            "batch_rule": self.batch_rule,
            "lr_rule": self.lr_rule,
            "expert_choice": self.expert_choice,
            "data": self.data,
            "group": self.group,
            "runs": [asdict(r) for r in self.runs],
            "commands": self.commands,
            "notes": self.notes,
            "warnings": self.warnings,
        }


# ============================================================================================
# Shapes
# ============================================================================================
def head_dim_for(d_model: int) -> int:
    """Head width of a generated shape [I]: 64 below d_model 2048, 128 from it (GPT-3, LLaMA)."""
    return 64 if d_model < 2048 else 128


def default_heads(d_model: int) -> tuple[int, int]:
    """(n_heads, n_kv_heads) of a generated shape [I]: heads of :func:`head_dim_for` width, GQA 2:1
    (an odd head count keeps one kv head per query head)."""
    h = max(1, d_model // head_dim_for(d_model))
    return h, (h // 2 if h % 2 == 0 else h)


def preferred_aspect(d_model: int) -> float:
    """d_model / n_layers a generated shape prefers [I]: ``clip(d_model/24, 32, 128)`` — GPT-3's
    shapes (Brown et al. 2020 Table 2.1 [I, recalled]: 1024/24 = 43, 2048/24 = 85, 4096/32 = 128,
    12288/96 = 128) and our presets (32-85) lie on or near it."""
    return min(128.0, max(32.0, d_model / 24.0))


def default_seq_len(d_model: int) -> int:
    """Context length of a generated shape [I]: the largest power of two ≤ d_model/2, within
    :data:`SEQ_LEN_RANGE`. Attention scores cost ≈ 12·L·d training FLOPs per token and layer
    against ≈ 72·d² for the matmuls of a d_ff = 3d block, so L ≤ d/2 keeps them ≤ 1/12 (8 %)
    of the model — Kaplan et al. 2020's "context cost is small when d_model > n_ctx/12" with a
    margin. 2048 at d_model 4096 (GPT-3, LLaMA), 4096 at 12288."""
    lo, hi = SEQ_LEN_RANGE
    return int(min(hi, max(lo, 2 ** int(math.floor(math.log2(max(1, d_model // 2)))))))


def _widths(lo: float, hi: float) -> list[int]:
    """Valid widths in [lo, hi]: multiples of their head width (64 below 2048, 128 from it)."""
    out = []
    d = 64
    while d <= min(hi, 1 << 17):
        if d >= lo:
            out.append(d)
        d += head_dim_for(d)
    return out


def _layer_range(d_model: int, aspect: tuple[float, float]) -> range:
    """Layer counts with ``aspect[0] ≤ d_model/n_layers ≤ aspect[1]`` (at least one layer)."""
    lo = max(1, math.ceil(d_model / aspect[1]))
    return range(lo, max(lo, int(d_model // aspect[0])) + 1)


def candidate_widths(*, n_params: float | None = None, d_models: Iterable[int] | None = None, aspect: tuple[float, float] = ASPECT_BAND,
                     seq_len: int | None = None) -> list[tuple[dict[str, int], range]]:
    """(width, layer counts) pairs of generated shapes [I] (see the module doc, step 2): every
    valid width from 64, or — given ``n_params`` (≈ non-embedding parameters wanted, ≈ 12·d² per
    layer) — those whose aspect band can come within a factor 2 of it; ``seq_len`` None:
    :func:`default_seq_len` of each width."""
    if d_models is None:
        if n_params is not None:
            n = max(float(n_params), 1.0)
            lo = 0.8 * (n / 2.0 / (12.0 / aspect[0])) ** (1 / 3)  # the deepest shape of d reaches n/2
            hi = 1.25 * (2.0 * n / (12.0 / aspect[1])) ** (1 / 3)  # the shallowest shape of d stays below 2n
            d_models = _widths(lo, max(hi, 64.0))
        else:
            d_models = _widths(64, 4096)
    out = []
    for d in d_models:
        h, kv = default_heads(d)
        width = {"d_model": d, "n_heads": h, "n_kv_heads": kv, "d_ff": 3 * d, "seq_len": default_seq_len(d) if seq_len is None else seq_len}
        out.append((width, _layer_range(d, aspect)))
    return out


def candidate_shapes(
    *,
    d_models: Iterable[int] | None = None,
    n_layers: Iterable[int] | None = None,
    aspect: tuple[float, float] = ASPECT_BAND,
    seq_len: int | None = None,
    n_params: float | None = None,
) -> list[dict[str, int]]:
    """The shapes of :func:`candidate_widths` as a flat list (``n_layers`` restricts the depths)."""
    keep = set(n_layers) if n_layers is not None else None
    return [{**w, "n_layers": nl} for w, layers in candidate_widths(n_params=n_params, d_models=d_models, aspect=aspect, seq_len=seq_len)
            for nl in layers if keep is None or nl in keep]


def nearest_preset(d_model: int) -> str:
    """Size preset with the closest d_model (in log); ties go to the smaller preset."""
    return min(SIZE_PRESETS, key=lambda k: abs(math.log(SIZE_PRESETS[k]["d_model"] / d_model)))


def batch_tokens_opt(budget: float) -> float:
    """Compute-optimal global batch in tokens per step, ``0.2920·C^0.3271`` (C in FLOPs).

    [P] DeepSeek LLM (Bi et al. 2024, arXiv 2401.02954) §3.1 Eq. 1, fitted on dense models with
    C = M·D (M = non-embedding FLOPs per token); we apply it to every family [I].
    """
    return DEEPSEEK_BATCH["coef"] * float(budget) ** DEEPSEEK_BATCH["exp"]


def lr_opt(budget: float) -> float:
    """Compute-optimal peak learning rate ``0.3118·C^−0.1250`` (DeepSeek LLM Eq. 1; see the module
    doc for its provenance) [I]; AdamW, applied to every family [I]."""
    return DEEPSEEK_LR["coef"] * float(budget) ** DEEPSEEK_LR["exp"]


def _budget_tag(budget: float) -> str:
    mant, exp = f"{budget:.1e}".split("e")
    mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"


@dataclass
class _Candidate:
    shape: dict[str, int]
    kwargs: dict[str, Any]  # the family/expert part of the ModelSpec
    counts: dict[str, float]  # param_counts
    m_exact: float  # training FLOPs per token
    matched: float


class _ShapeSearch:
    """Shapes closest to the law's target for a given family/expert setting (exact counts)."""

    def __init__(self, widths: list[tuple[dict[str, int], Sequence[int]]], *, target_name: str, target: float, n_convention: str,
                 vocab_size: int):
        self.widths = [(tuple(sorted(w.items())), layers) for w, layers in widths]
        self.target_name, self.target = target_name, target
        self.n_convention, self.vocab_size = n_convention, vocab_size

    @classmethod
    def from_shapes(cls, shapes: list[dict[str, int]], **kw: Any) -> "_ShapeSearch":
        grouped: dict[tuple, list[int]] = {}
        for s in shapes:
            grouped.setdefault(tuple(sorted((k, v) for k, v in s.items() if k != "n_layers")), []).append(s["n_layers"])
        return cls([(dict(w), sorted(layers)) for w, layers in grouped.items()], **kw)

    def matched(self, counts: dict[str, float], m_exact: float, d_model: int) -> float:
        if self.target_name == "N_opt":
            return counts["total"] if self.n_convention == "total" else counts["non_embedding"]
        if self.target_name == "N_a_opt":
            return counts["flop_equivalent"]
        return m_exact - 3.0 * 2.0 * self.vocab_size * d_model  # Wan's M: without the LM head

    def best(self, kwargs: dict[str, Any], *, keep: int = 1) -> list[_Candidate]:
        scored = []
        for width, all_layers in self.widths:
            wd = dict(width)
            model = _layer_affine_counts(wd, kwargs, self.vocab_size)
            if model is None:
                continue
            layers = [n for n in all_layers if n >= model["min_layers"]]
            if not layers:
                continue
            # matched(n) is affine in n (per k layers for sectional): solve for the target, then
            # score the layer counts around the solution and the band's ends
            n0, n1 = layers[0], layers[0] + 4 * model["min_layers"]
            m0 = self.matched(*model["at"](n0), wd["d_model"])
            m1 = self.matched(*model["at"](n1), wd["d_model"])
            slope = (m1 - m0) / (n1 - n0)
            guess = n0 + (self.target - m0) / slope if slope > 0 else n0
            near = range(max(layers[0], math.floor(guess - max(2.0, 0.05 * guess))), min(layers[-1], math.ceil(guess + max(2.0, 0.05 * guess))) + 1)
            window = {n for n in near if n in all_layers} | {layers[0], layers[-1]}
            for n in window:
                counts, m_exact = model["at"](n)
                matched = self.matched(counts, m_exact, wd["d_model"])
                if matched <= 0:
                    continue
                dist = abs(math.log(matched / self.target))
                aspect_pen = abs(math.log((wd["d_model"] / n) / preferred_aspect(wd["d_model"])))
                shape = {**wd, "n_layers": n}
                # on target first; then even head counts (GQA 2:1), then the preferred aspect
                scored.append(((0.0 if dist <= math.log1p(TARGET_RTOL) else dist), wd["n_heads"] % 2, aspect_pen,
                               _Candidate(shape, model["kwargs"], counts, m_exact, matched)))
        scored.sort(key=lambda x: x[:3])
        out = [x[3] for x in scored[:keep]]
        for c in out:  # the shortcut is exact: check the proposals against a full count
            counts, m_exact = _exact_counts(c.shape, c.kwargs, self.vocab_size)
            assert abs(m_exact / c.m_exact - 1) < 1e-9 and abs(counts["total"] / c.counts["total"] - 1) < 1e-9
        return out


def _exact_counts(shape: dict[str, int], kwargs: dict[str, Any], vocab_size: int) -> tuple[dict[str, float], float]:
    spec = ModelSpec(**shape, vocab_size=vocab_size, **kwargs).validate()
    return param_counts(spec), flops_per_token(spec, training=True)


def _layer_affine_counts(width: dict[str, int], kwargs: dict[str, Any], vocab_size: int) -> dict[str, Any] | None:
    """Counts of one width as an exact function of n_layers, or None if the width is invalid.

    Parameters and FLOPs are sums over layers, and with ``sectional_every = k`` a model of n
    layers has n//k sectional and n − n//k dense ones, so every count is
    ``base + n_dense·dense + n_sect·sect``: three specs (k, k+1 and 2k layers) fix the three terms.
    For dense and moe (k = 1, every layer alike) this is ``base + n·layer``.
    """
    kwargs = dict(kwargs)
    if kwargs.get("expert_d_ff") == "per_top_k":  # fine-grained experts follow d_ff
        kwargs["expert_d_ff"] = fine_grained_width(width["d_ff"], kwargs["top_k"])
    k = int(kwargs.get("sectional_every", 1)) if kwargs.get("family") == "sectional" else 1
    try:
        at = {n: _exact_counts({**width, "n_layers": n}, kwargs, vocab_size) for n in (k, k + 1, 2 * k)}
    except ConfigError:
        return None

    def terms(f: dict[int, float]) -> tuple[float, float, float]:
        layer = f[k + 1] - f[k]  # one more dense layer (k = 1: one more layer)
        if k == 1:
            return f[1] - layer, layer, 0.0
        sect = f[2 * k] - f[k] - (k - 1) * layer
        return f[k] - (k - 1) * layer - sect, layer, sect

    keys = list(at[k][0])
    count_terms = {key: terms({n: at[n][0][key] for n in at}) for key in keys}
    flop_terms = terms({n: at[n][1] for n in at})

    def value(t: tuple[float, float, float], n: int) -> float:
        n_sect = n // k if k > 1 else 0
        return t[0] + (n - n_sect) * t[1] + n_sect * t[2]

    return {"kwargs": kwargs, "min_layers": k,
            "at": lambda n: ({key: value(t, n) for key, t in count_terms.items()}, value(flop_terms, n))}


def fine_grained_width(d_ff: int, top_k: int) -> int:
    """Expert FFN width ``d_ff/top_k`` rounded down to a multiple of 8 (≥ 8) [I]: G activated
    experts then hold about one dense FFN's active parameters, as in Zhao's G sweeps [S]."""
    return max(8, (d_ff // top_k) // 8 * 8)


# ============================================================================================
# Sectional expert count: exact compute + κE²
# ============================================================================================
def sectional_expert_count(
    shape: dict[str, int], *, kappa: float, e_max: int = 64, candidates: Iterable[int] | None = None,
    sectional_every: int = DEFAULT_SECTIONAL_EVERY, vocab_size: int = 8192, routing: str = "segment_fixed",
) -> dict[str, Any]:
    """The E of one shape with the lowest training cost per token [I]:
    ``cost(E) = M_exact(E) + κ_tok·E²``, M_exact from :func:`sectional_moe.models.flops.flops_per_token`
    (r = E, ``sectional_every``), ``κ_tok`` = :func:`cost_model.kappa_flops_per_token` of
    ``kappa`` (MACs per E² per sequence and sectional layer). This is the report's step-time
    model (:func:`cost_model.fit_kappa` with the exact compute term) in FLOPs, so a κ measured
    there and converted by :func:`cost_model.kappa_in_macs` picks the same E on the same shape.

    E ranges over 2…``e_max`` (or ``candidates``) that the spec accepts (d_model, heads, kv heads,
    d_ff and seq_len divisible). Also returns the dense model of the same shape (``pays``: the
    best E is cheaper than it) and, for κ > 0, the reconstructed S(E)'s optimum (:func:`cost_model.e_opt`,
    summed view) as a reference.
    """
    k = min(sectional_every, shape["n_layers"])
    n_sect = shape["n_layers"] // k
    kappa_tok = cost_model.kappa_flops_per_token(kappa_macs=kappa, sectional_layers=n_sect, seq_len=shape["seq_len"])
    cost = {}
    for E in (candidates if candidates is not None else range(2, e_max + 1)):
        try:
            spec = ModelSpec(**shape, vocab_size=vocab_size, family="sectional", experts=int(E), routing=routing, seq_reduction=int(E),
                             sectional_every=k).validate()
        except ConfigError:
            continue
        cost[int(E)] = flops_per_token(spec, training=True) + kappa_tok * E**2
    dense = flops_per_token(ModelSpec(**shape, vocab_size=vocab_size, family="dense", experts=None, routing=None).validate(), training=True)
    a_trad = cost_model.qkv_cost_traditional(d_model=shape["d_model"], seq_len=shape["seq_len"])
    ref = cost_model.e_opt(a_trad=a_trad, kappa=kappa, view="summed").to_dict() if kappa > 0 else None
    if not cost:
        return {"E": None, "valid": [], "e_opt_r1": ref, "a_trad_macs": a_trad, "kappa_macs": kappa}
    best = min(cost, key=cost.get)
    return {"E": best, "valid": sorted(cost), "cost_flops_per_token": cost, "cost_at_best": cost[best], "dense_flops_per_token": dense,
            "pays": cost[best] < dense, "kappa_macs": kappa, "kappa_flops_per_token_per_E2": kappa_tok, "sectional_layers": n_sect,
            "e_opt_r1": ref, "a_trad_macs": a_trad}


# ============================================================================================
# Coefficients and κ from our own fits
# ============================================================================================
def _load(source: str | Path | Mapping[str, Any]) -> Any:
    if isinstance(source, Mapping):
        return source
    path = Path(source)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PlanError(f"{path}: no such file") from None
    except json.JSONDecodeError as err:
        raise PlanError(f"{path}: not JSON ({err.msg} at line {err.lineno})") from None


def coefficients_from_fit(source: str | Path | Mapping[str, Any], *, family: str) -> tuple[dict[str, float], str]:
    """Chinchilla coefficients fitted on our own runs, and where they came from.

    ``source`` is the output of ``theory fit chinchilla --json`` (one fit) or a report's
    ``fits.json`` (one fit per family under ``"chinchilla"``; the entry of ``family`` is used).
    Refused (:class:`PlanError`) when the fit is not identified, was skipped, or is not a
    Chinchilla fit.
    """
    data = _load(source)
    label = str(source) if not isinstance(source, Mapping) else "the given fit"
    if isinstance(data, Mapping) and data.get("law") == "chinchilla" and isinstance(data.get("params"), Mapping):
        if data.get("identified") is False:
            why = "; ".join(data.get("identifiability", {}).get("reasons", [])) or "see its identifiability"
            raise PlanError(f"--from-fit {label}: the fit is not identified ({why}); refit with more runs")
        params, origin = data["params"], f"`theory fit chinchilla` output {label}"
    elif isinstance(data, Mapping) and isinstance(data.get("chinchilla"), list):
        entries = {e.get("family"): e for e in data["chinchilla"] if isinstance(e, Mapping)}
        if family not in entries:
            raise PlanError(f"--from-fit {label}: no chinchilla fit of family {family!r} (has {sorted(map(str, entries))}); "
                            "pass --fit-family")
        entry = entries[family]
        if entry.get("reason"):
            raise PlanError(f"--from-fit {label}: the {family} fit is not a result ({entry['reason']})")
        params, origin = entry, f"the report's fits.json {label}, family {family}"
    else:
        raise PlanError(f"--from-fit {label}: not a chinchilla fit (expected `theory fit chinchilla --json` output or a report's fits.json)")
    try:
        coef = {k: float(params[k]) for k in CHINCHILLA.params}
    except (KeyError, TypeError, ValueError):
        raise PlanError(f"--from-fit {label}: the fit lacks finite {list(CHINCHILLA.params)}") from None
    if not all(math.isfinite(v) for v in coef.values()) or min(coef.values()) <= 0:
        raise PlanError(f"--from-fit {label}: coefficients must be finite and > 0, got {coef}")
    return coef, origin


def kappa_from_fits(source: str | Path | Mapping[str, Any], *, group: str | None = None) -> tuple[float, str]:
    """κ in MACs per E² per sequence and sectional layer from a report's ``fits.json`` (its κ fits
    carry the converted value, ``kappa_macs_per_E2_seq_layer``). ``group``: the κ fit's group
    label (needed when the report has several)."""
    data = _load(source)
    fits = [e for e in (data.get("kappa") or []) if isinstance(e, Mapping)] if isinstance(data, Mapping) else []
    usable = [e for e in fits if e.get("kappa_macs_per_E2_seq_layer") is not None]
    if group is not None:
        usable = [e for e in usable if e.get("group") == group]
    if not usable:
        known = [e.get("group") for e in fits]
        raise PlanError(f"--kappa-from {source}: no converted κ fit{f' for group {group!r}' if group else ''} (κ groups: {known}); "
                        "fit κ on a sweep with FLOP counts and step times (report), or pass --kappa")
    if len(usable) > 1:
        raise PlanError(f"--kappa-from {source}: {len(usable)} κ fits; pick one with --kappa-group (one of {[e.get('group') for e in usable]})")
    e = usable[0]
    return float(e["kappa_macs_per_E2_seq_layer"]), f"report κ fit '{e.get('group')}' ({e.get('kappa_s_per_E2'):.3g} s/E² per step at {e.get('flop_rate_per_s'):.3g} FLOP/s)"


# ============================================================================================
# Data
# ============================================================================================
def choose_data(tokens: float, *, data: str | None, data_tokens: float | None, max_epochs: float, hub_path: str | None,
                vocab_size: int) -> dict[str, Any]:
    """The corpus a plan of ``tokens`` trains on (module doc, step 6). Raises :class:`PlanError`
    when a given corpus is too small; with none given, the smallest known one that suffices, else
    an open ``data=hub`` choice with a warning."""
    if max_epochs <= 0:
        raise PlanError(f"--max-epochs {max_epochs:g} must be > 0")
    extra = [f"data.vocab_size={vocab_size}"] if vocab_size != 8192 else []
    if data is None:
        if data_tokens is not None or hub_path is not None:
            raise PlanError("--data-tokens and --hub-path describe a corpus: pass --data hub (or another data config) with them")
        for c in sorted(CORPORA.values(), key=lambda c: c.train_tokens):
            if tokens <= max_epochs * c.train_tokens:
                return {"name": c.name, "train_tokens": c.train_tokens, "how": f"{c.provenance} {c.how}", "epochs": tokens / c.train_tokens,
                        "max_epochs": max_epochs, "chosen": "smallest known corpus holding the tokens", "overrides": extra, "ok": True}
        biggest = max(CORPORA.values(), key=lambda c: c.train_tokens)
        return {"name": "hub", "train_tokens": None, "how": "no known corpus is large enough", "epochs": None, "max_epochs": max_epochs,
                "chosen": "none of the known corpora suffices", "overrides": extra, "ok": False,
                "warning": (f"the plan trains on {tokens:.3g} tokens; the largest known corpus, {biggest.name}, holds {biggest.train_tokens:.3g} "
                            f"({tokens / biggest.train_tokens:.3g} epochs > --max-epochs {max_epochs:g}): the command says data=hub, so set "
                            f"data.hub_path to a corpus of >= {tokens / max_epochs:.3g} training tokens and re-plan with --data hub "
                            "--hub-path PATH --data-tokens N to check it")}
    n, how = corpus_tokens(data, data_tokens)
    overrides = ([f"data.hub_path={hub_path}"] if hub_path else []) + extra
    if data == "hub" and hub_path is None:
        raise PlanError("--data hub needs --hub-path (a Hugging Face dataset id or local dataset directory)")
    if n is None:
        raise PlanError(f"--data {data}: its size is unknown; pass --data-tokens N (its training tokens)")
    epochs = tokens / n
    if epochs > max_epochs:
        raise PlanError(f"--data {data}: the plan needs {tokens:.3g} training tokens, {epochs:.3g} epochs of its {n:.3g} ({how}) > "
                        f"--max-epochs {max_epochs:g}; pick a larger corpus (--data hub --hub-path PATH --data-tokens N) or raise --max-epochs")
    return {"name": data, "train_tokens": n, "how": how, "epochs": epochs, "max_epochs": max_epochs, "chosen": "given",
            "overrides": overrides, "ok": True}


# ============================================================================================
# The plan
# ============================================================================================
def plan(
    *,
    budget: float,
    family: str,
    experts: Sequence[int] | None = None,
    routing: str | None = None,
    law: str | None = None,
    coefficients: str | Mapping[str, float] = "epoch_mle",
    coefficients_origin: str | None = None,
    seq_len: int | None = None,
    batch_size: int | None = None,
    vocab_size: int = 8192,
    top_k: int | None = None,
    kappa: float | None = None,
    kappa_origin: str | None = None,
    sectional_every: int = DEFAULT_SECTIONAL_EVERY,
    n_convention: str = "total",
    per_expert: int = 1,
    shapes: list[dict[str, int]] | None = None,
    group: str | None = None,
    data: str | None = None,
    data_tokens: float | None = None,
    hub_path: str | None = None,
    max_epochs: float = DEFAULT_MAX_EPOCHS,
    lr: float | None = None,
) -> Plan:
    """Propose compute-optimal configurations for ``budget`` FLOPs and ``family`` (see module doc).

    Args:
        budget: training compute C in FLOPs (matmul FLOPs, 3 × forward, as :mod:`sectional_moe.models.flops`).
        family: dense | moe | sectional.
        experts: expert counts to plan; default: chosen from the laws (step 4 of the module doc).
        routing: routing of the MoE families (default topk for moe, segment_fixed for sectional).
        law: "chinchilla" or "wan2026" (defaults: chinchilla for dense, wan2026 for MoE families;
            chinchilla whenever ``coefficients`` is a dict).
        coefficients: a Chinchilla coefficient set name (``laws.CHINCHILLA.published``) or our own
            fitted {E, A, B, alpha, beta} (``coefficients_origin`` says where they came from).
        seq_len: tokens per sequence; default :func:`default_seq_len` of each width.
        batch_size: sequences per step; default ``round(B_opt(C)/seq_len)`` (DeepSeek's rule).
        top_k: experts per token of moe topk; default round(Zhao's G*) with fine-grained experts.
        kappa: sectional overhead κ in MACs per E² per sequence and sectional layer
            (``DEFAULT_KAPPA_MACS``, a placeholder, if None); ``kappa_origin`` says where it came from.
        sectional_every: every k-th layer sectional (the framework's default 2), counted exactly.
        n_convention: which count is matched to Chinchilla's N_opt: "total" (Chinchilla counts
            embeddings [S]) or "non_embedding".
        per_expert: how many shapes to keep per expert count (closest first).
        shapes: candidate shapes (default: :func:`candidate_widths` around the law's target).
        data, data_tokens, hub_path, max_epochs: the corpus (step 6).
        lr: peak learning rate; default DeepSeek's rule (step 3).
    """
    if family not in DEFAULT_LAW:
        raise ValueError(f"family={family!r}: use dense, moe or sectional")
    if not budget > 0 or not math.isfinite(budget):
        raise ValueError(f"budget={budget} must be a finite number of FLOPs > 0")
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("vocab_size", vocab_size), ("top_k", top_k)):
        if value is not None and value <= 0:
            raise ValueError(f"{name}={value} must be > 0")
    if kappa is not None and kappa < 0:
        raise ValueError(f"kappa={kappa:g} must be >= 0 (MACs per E² per sequence and sectional layer)")
    own_fit = not isinstance(coefficients, str)
    law = law or ("chinchilla" if own_fit else DEFAULT_LAW[family])
    routing = routing or DEFAULT_ROUTING[family]
    group = group or f"plan_{_budget_tag(budget)}"
    notes: list[str] = []
    warnings: list[str] = []

    if law == "chinchilla":
        coef = dict(coefficients) if own_fit else CHINCHILLA.coefficients(coefficients)
        fr = chinchilla_frontier(C=budget, **coef)
        target_name = "N_opt" if (family == "dense" or own_fit) else "N_a_opt"
        target = float(fr["N_opt"])
        d_law = float(fr["D_opt"])
        allocation = {"N_opt": target, "D_opt": d_law, "a": float(fr["a"]), "G": float(fr["G"]), "D_per_N": float(fr["D_per_N"]),
                      "L_opt": float(fr["L_opt"])}
        if own_fit:
            coef_label = "own_fit"
            provenance = (f"Hoffmann et al. 2022 Eq. 4 [P] with our own fitted coefficients ({coefficients_origin or 'given'}): "
                          + ", ".join(f"{k}={v:.4g}" for k, v in coef.items()) + "; C = 6·N·D")
            notes.append("[D] the law fitted on our runs, in our data's nats and our N convention (params_total for the report's fits).")
        else:
            coef_label = coefficients
            cs = CHINCHILLA.published[coefficients]
            provenance = f"Hoffmann et al. 2022 Eq. 4 [P], coefficients '{coefficients}' {cs.provenance} ({cs.source}); C = 6·N·D"
            if family != "dense":
                notes.append("[I] the dense Chinchilla frontier is applied to the active parameter count N_a of an MoE model; no published law backs this.")
    elif law == "wan2026":
        if own_fit:
            raise ValueError("own fitted coefficients are a Chinchilla law: use law='chinchilla' with them")
        coef, coef_label = CHINCHILLA.coefficients(coefficients), coefficients
        target_name = "M_opt"
        target = float(wan_m_opt(budget))
        d_law = float(wan_d_opt(budget))
        allocation = {"M_opt": target, "D_opt": d_law, "MD_over_C": target * d_law / budget}
        provenance = "Wan, Han, Zhang, Jin 2026 Eq. 2 [P]: D_opt = 22.8929·C^0.4563, M_opt = 0.04368·C^0.5437, C = M·D"
        if family == "sectional":
            notes.append("[I] Wan's law was fitted on token MoE (1 shared + 288 routed experts, top-8); no scaling law exists for the sectional family, so its allocation is used as a prior.")
        if family == "dense":
            notes.append("[I] Wan's allocation law was fitted on MoE models; for dense models prefer law=chinchilla.")
        notes.append("M is matched without the LM head (Wan's M ≈ 6·N_a + attention, N_a excluding embeddings [P]); tokens use the exact M with the head.")
    else:
        raise ValueError(f"law={law!r}: use 'chinchilla' or 'wan2026'")

    n_equiv = target / 6.0 if target_name == "M_opt" else target  # ≈ parameters the shapes must reach
    kw = {"target_name": target_name, "target": target, "n_convention": n_convention, "vocab_size": vocab_size}
    search = (_ShapeSearch.from_shapes(shapes, **kw) if shapes is not None
              else _ShapeSearch(candidate_widths(seq_len=seq_len, n_params=n_equiv), **kw))
    if family == "dense":
        chosen: list[tuple[int | None, dict[str, Any]]] = [(None, {"family": "dense", "experts": None, "routing": None})]
        expert_choice: dict[str, Any] = {"rule": "dense: no experts"}
    elif family == "moe":
        chosen, expert_choice = _moe_experts(search, budget, experts, routing, top_k, batch_size, notes)
    else:
        chosen, expert_choice = _sectional_experts(search, experts, routing, kappa, kappa_origin, sectional_every, vocab_size, notes)

    lr_value = lr_opt(budget) if lr is None else float(lr)
    lr_rule = (f"η = 0.3118·C^-0.1250 = {lr_value:.3g} (DeepSeek LLM, Bi et al. 2024, Eq. 1 [I: recalled; reproduces their 7B/67B rates "
               "4.2e-4/3.2e-4 quoted by a secondary source [S]]; AdamW peak, fitted on dense models, applied to every family [I])"
               if lr is None else f"given: optim.lr = {lr_value:g}")
    found_any = False
    runs: list[PlannedRun] = []
    batch_rule = ""
    for E, kwargs in chosen:
        found = search.best(kwargs, keep=per_expert)
        if not found:
            notes.append(f"no valid shape for experts={E}; check divisibility (d_model, n_heads, d_ff, seq_len by E)")
            continue
        found_any = True
        for cand in found:
            run, batch_rule = _planned_run(cand, family=family, budget=budget, batch_size=batch_size, target_name=target_name,
                                           target=target, d_law=d_law, law=law, coef=coef, coef_label=coef_label, lr=lr_value,
                                           vocab_size=vocab_size)
            runs.append(run)
    if not found_any:
        raise PlanError(f"no valid shape reaches {target_name} = {target:.3g} for family {family} (experts {experts}); "
                        "try other --experts or --seq-len")
    if not DEEPSEEK_RANGE[0] <= budget <= DEEPSEEK_RANGE[1] and (batch_size is None or lr is None):
        notes.append(f"the batch and learning-rate rules are extrapolated: C = {budget:.3g} lies outside their "
                     f"{DEEPSEEK_RANGE[0]:.0e}–{DEEPSEEK_RANGE[1]:.0e} FLOPs fitting range.")
    r0 = runs[0]
    notes.append(f"global batch {r0.batch_size} x {r0.seq_len} = {r0.batch_tokens} tokens/step; data.batch_size is per device, "
                 "so divide it by the device count x trainer.accumulate_grad_batches on more than one device.")
    if family == "moe":
        ratios = [r.n_non_embedding / r.n_active for r in runs]
        lo, hi = WAN_N_OVER_NA_BAND
        notes.append(
            f"N/N_a of the planned runs: {', '.join(f'{x:.1f}' for x in ratios)}; Wan et al. 2026 [P] find {lo:g}–{hi:g} near-optimal "
            "for 288 experts top-8 (unreachable with few experts)."
        )
    for r in runs:
        label = f"experts={r.experts}: " if r.experts is not None else ""
        if abs(r.target_gap) > TARGET_RTOL:
            warnings.append(f"{label}the shape misses {r.target_name} = {r.target:.4g} by {100 * r.target_gap:+.1f} % "
                            f"(planned {r.matched:.4g}): no valid shape is closer")
        if abs(r.tokens_gap) > 0.1:
            why = (" (M_exact includes the LM head and attention, the law's M does not)" if r.target_name == "M_opt"
                   else " (C = 6·N·D in the law, the exact FLOPs per token here)")
            warnings.append(f"{label}{r.tokens:.3g} tokens are {100 * r.tokens_gap:+.1f} % from the law's D_opt = {r.law_d_opt:.3g}{why}")
        if r.optimum_loss is not None and r.predicted_loss is not None and (abs(r.target_gap) > TARGET_RTOL or abs(r.tokens_gap) > 0.1):
            warnings.append(f"{label}the planned allocation (N {100 * r.target_gap:+.1f} %, D {100 * r.tokens_gap:+.1f} % from the law's optimum) "
                            f"predicts {r.predicted_loss:.4g} nats against {r.optimum_loss:.4g} at the optimum ({r.predicted_loss - r.optimum_loss:+.3g})")
        if r.predicted_loss is not None and r.predicted_loss > math.log(vocab_size):
            warnings.append(f"{label}the predicted loss {r.predicted_loss:.3g} nats exceeds ln(vocab) = {math.log(vocab_size):.3g}, the loss of a "
                            "uniform guess: the law is used far outside its range and the number means nothing")
        if r.max_steps < 100:
            warnings.append(f"{label}only {r.max_steps} optimiser steps: lower the batch size or raise the budget")
    data_choice = choose_data(max(r.tokens for r in runs), data=data, data_tokens=data_tokens, max_epochs=max_epochs,
                              hub_path=hub_path, vocab_size=vocab_size)
    if data_choice.get("warning"):
        warnings.append(data_choice["warning"])
    for r in runs:
        r.data, r.data_overrides = data_choice["name"], list(data_choice["overrides"])
    return Plan(budget=float(budget), family=family, law=law, law_provenance=provenance, allocation=allocation,
                batch_rule=batch_rule, lr_rule=lr_rule, expert_choice=expert_choice, data=data_choice, runs=runs,
                commands=hydra_commands(runs, group=group), group=group, notes=notes, warnings=warnings)


def planned_steps(budget: float, flops_per_token: float, tokens_per_step: int) -> int:
    """Optimiser steps that spend ``budget`` FLOPs at ``flops_per_token`` (step 5 of the module doc), at least 1."""
    return max(1, int(round(budget / flops_per_token / tokens_per_step)))


def _batch(budget: float, seq_len: int, batch_size: int | None) -> tuple[int, str]:
    if batch_size is not None:
        return int(batch_size), f"given: batch_size = {batch_size} sequences of {seq_len} tokens"
    b_opt = batch_tokens_opt(budget)
    size = max(1, int(round(b_opt / seq_len)))
    return size, (f"B_opt = 0.2920·C^0.3271 = {b_opt:.4g} tokens/step [P] (DeepSeek LLM, Bi et al. 2024, arXiv 2401.02954, Eq. 1; "
                  f"fitted on dense models, applied to every family [I]) → batch_size = round(B_opt/seq_len) = {size} x {seq_len}")


def _moe_experts(search: _ShapeSearch, budget: float, experts: Sequence[int] | None, routing: str, top_k: int | None,
                 batch_size: int | None, notes: list[str]) -> tuple[list[tuple[int, dict[str, Any]]], dict[str, Any]]:
    """Zhao's G* → top_k (fine-grained experts); E = the candidate closest to Zhao's optimal N_a/N."""
    z = zhao_optima(**ZHAO.coefficients())
    fine = top_k is None and routing == "topk"
    k = max(1, int(round(z["G_opt"]))) if top_k is None else int(top_k)
    notes.append(f"Zhao et al. 2025 [S]: optimal activated experts G* = {z['G_opt']:.2f}, shared ratio S* = {z['S_opt']:.3f} "
                 "(independent of N, D by the law's separable form); we plan no shared expert (S = 0).")

    def kwargs(E: int) -> dict[str, Any]:
        kw: dict[str, Any] = {"family": "moe", "experts": E, "routing": routing, "top_k": min(k, E)}
        if fine:
            kw["expert_d_ff"] = "per_top_k"
        return kw

    if experts:
        return [(int(E), kwargs(int(E))) for E in experts], {"rule": "given", "top_k": k}
    rows = []
    for E in MOE_EXPERT_CANDIDATES:
        if E <= k:
            continue
        found = search.best(kwargs(E))
        if not found:
            continue
        c = found[0]
        bs, _ = _batch(budget, c.shape["seq_len"], batch_size)
        tokens = planned_steps(budget, c.m_exact, bs * c.shape["seq_len"]) * bs * c.shape["seq_len"]
        loss = float(ZHAO.predict(N=c.counts["non_embedding"], D=tokens, N_a=c.counts["flop_equivalent"], G=min(k, E), S=0.0))
        ratio = float(zhao_optima(N=c.counts["non_embedding"], **ZHAO.coefficients())["N_a_over_N_opt"])
        rows.append({"E": E, "zhao_loss": loss, "N": c.counts["non_embedding"], "N_a_over_N": c.counts["flop_equivalent"] / c.counts["non_embedding"],
                     "zhao_N_a_over_N_opt": ratio})
    if not rows:
        return [], {"rule": "no candidate E had a valid shape", "top_k": k}
    # At fixed N_a (the law's M target fixes it) Zhao's loss falls monotonically with N, so its argmin
    # over E is always the largest candidate; its optimality condition dL/dN_a = 0 instead gives the
    # N_a/N a model of total size N should have, which picks E (clamped: N_a/N cannot exceed 1).
    best = min(rows, key=lambda r: abs(math.log(r["N_a_over_N"] / min(1.0, r["zhao_N_a_over_N_opt"]))))
    choice = {
        "rule": (f"top_k = round(Zhao G*) = {k}" + (f" experts of width d_ff/{k} (fine-grained) [I]" if fine else "")
                 + f"; E = the candidate in {list(MOE_EXPERT_CANDIDATES)} whose N_a/N is closest to Zhao's optimum (N_a/N)*(N) "
                 "[D on S] at its planned shape"),
        "top_k": k, "candidates": rows, "E": best["E"],
    }
    if best["zhao_N_a_over_N_opt"] >= 1.0:
        notes.append(f"at N ≈ {best['N']:.3g} Zhao's optimal N_a/N is {best['zhao_N_a_over_N_opt']:.2f} ≥ 1 (no sparsity pays): the law "
                     "is used below its fitting range (N 133M–3.4B [S]), so the E choice is weakly determined.")
    return [(best["E"], kwargs(best["E"]))], choice


def _sectional_experts(search: _ShapeSearch, experts: Sequence[int] | None, routing: str, kappa: float | None, kappa_origin: str | None,
                       sectional_every: int, vocab_size: int, notes: list[str]) -> tuple[list[tuple[int, dict[str, Any]]], dict[str, Any]]:
    """The cheapest E (exact FLOPs + κE²) of the chosen shape, iterated with the shape search to a fixed point."""

    def kwargs(E: int) -> dict[str, Any]:
        return {"family": "sectional", "experts": E, "routing": routing, "seq_reduction": E, "sectional_every": sectional_every}

    if experts:
        return [(int(E), kwargs(int(E))) for E in experts], {"rule": "given"}
    kappa_used = DEFAULT_KAPPA_MACS if kappa is None else float(kappa)
    if kappa is None:
        notes.append(f"[I] κ = {DEFAULT_KAPPA_MACS:g} MACs per E² per sequence and sectional layer is a placeholder, not a measurement: "
                     "measure κ with a cost_vs_e sweep and its report, then pass --kappa-from <report>/fits.json.")
    E, seen, info = 4, [], {}
    for _ in range(8):
        found = search.best(kwargs(E))
        if not found:
            break
        info = sectional_expert_count(found[0].shape, kappa=kappa_used, sectional_every=sectional_every, vocab_size=vocab_size, routing=routing)
        seen.append(E)
        if info["E"] is None or info["E"] == E or info["E"] in seen:
            E = info["E"] or E
            break
        E = info["E"]
    if not info:
        return [], {"rule": "no valid shape"}
    if not info.get("pays", False):
        notes.append(f"under κ = {kappa_used:g} MACs/E² no E makes the sectional model cheaper per token than dense of the same shape; "
                     f"E = {E} is the least costly.")
    ref = info.get("e_opt_r1")
    choice = {"rule": (f"E = the valid E (dividing d_model, heads, kv heads, d_ff, seq_len; r = E) with the lowest exact training FLOPs "
                       f"per token + κ·E² [I], κ = {kappa_used:g} MACs per E² per sequence and sectional layer "
                       f"({kappa_origin or ('placeholder' if kappa is None else 'given')}); shape and E iterated ({seen} → {E})"),
              "E": E, "kappa_macs": kappa_used, "kappa_is_default": kappa is None, "kappa_origin": kappa_origin,
              "valid_E": info["valid"], "cost_flops_per_token": info.get("cost_flops_per_token"),
              "dense_flops_per_token": info.get("dense_flops_per_token"), "iterations": seen, "e_opt_r1": ref}
    if ref:
        notes.append(f"for comparison, the reconstructed S(E) [I] (QKV term only, R1 summed) puts E_opt at {ref['numeric_root']:.2f} "
                     f"(closed form {ref['closed_form']:.2f}); the plan uses the exact FLOPs of every layer.")
    return [(E, kwargs(E))], choice


def _planned_run(c: _Candidate, *, family: str, budget: float, batch_size: int | None, target_name: str, target: float,
                 d_law: float, law: str, coef: dict[str, float], coef_label: str, lr: float, vocab_size: int) -> tuple[PlannedRun, str]:
    seq_len = c.shape["seq_len"]
    bs, batch_rule = _batch(budget, seq_len, batch_size)
    tokens_per_step = bs * seq_len
    steps = planned_steps(budget, c.m_exact, tokens_per_step)
    tokens = float(steps * tokens_per_step)
    kw = c.kwargs
    pred, pred_law, pred_note, optimum = None, None, "", None
    embedding = c.counts["total"] - c.counts["non_embedding"]
    if family == "dense" or (law == "chinchilla" and coef_label == "own_fit"):
        n = c.counts["total"] if law == "wan2026" else c.matched
        pred, pred_law = float(CHINCHILLA.fn(N=n, D=tokens, **coef)), f"chinchilla/{coef_label}"
        pred_note = ("[D] our own fit: nats on our data and tokenizer." if coef_label == "own_fit" else
                     "[P] law; in nats on Chinchilla's data and tokenizer (MassiveText), not ours: compare differences, not levels.")
    elif family == "moe":
        pred = float(ZHAO.predict(N=c.counts["non_embedding"], D=tokens, N_a=c.counts["flop_equivalent"], G=kw["top_k"], S=0.0))
        pred_law = "zhao2025"
        pred_note = ("[S] coefficients, [I] inputs: N = non-embedding total, N_a = FLOP-equivalent active non-embedding parameters "
                     "(Zhao's embedding convention is not stated), G = top_k, S = 0; nats on Zhao's data (Dolma subset).")
    else:
        pred = float(CHINCHILLA.fn(N=c.counts["flop_equivalent"] + embedding, D=tokens, **coef))
        pred_law = f"chinchilla/{coef_label}"
        pred_note = ("[I] assumption, no law exists for the sectional family: the dense Chinchilla law at the FLOP-equivalent active "
                     "parameters plus embeddings (its N convention) and the planned tokens; nats on Chinchilla's data, not ours.")
    if law == "chinchilla" and (family == "dense" or coef_label == "own_fit"):  # the same law predicts both
        optimum = float(chinchilla_frontier(C=budget, **coef)["L_opt"])
    run = PlannedRun(
        family=family, experts=kw.get("experts"), routing=kw.get("routing"),
        top_k=kw.get("top_k") if kw.get("routing") == "topk" else None,
        expert_d_ff=kw.get("expert_d_ff"),
        sectional_every=kw.get("sectional_every"), preset=nearest_preset(c.shape["d_model"]), **c.shape,
        batch_size=bs, batch_tokens=tokens_per_step, max_steps=steps, tokens=tokens, flops_per_token=c.m_exact,
        compute=c.m_exact * tokens, n_total=c.counts["total"], n_non_embedding=c.counts["non_embedding"], n_active=c.counts["flop_equivalent"],
        target_name=target_name, target=target, matched=c.matched, law_d_opt=d_law, lr=lr,
        target_gap=c.matched / target - 1.0, tokens_gap=tokens / d_law - 1.0,
        predicted_loss=pred, predicted_loss_law=pred_law, predicted_loss_note=pred_note, optimum_loss=optimum,
    )
    return run, batch_rule


def hydra_commands(runs: Sequence[PlannedRun], *, group: str, script: str = "train.py") -> list[str]:
    """One ``python train.py -m`` line per distinct (shape, steps, batch); expert counts that share
    them are merged into one comma-separated sweep value."""
    merged: dict[tuple, list[PlannedRun]] = {}
    for r in runs:
        key = tuple(o for o in r.overrides(group=group) if not o.startswith("experts="))
        merged.setdefault(key, []).append(r)
    lines = []
    for key, rs in merged.items():
        parts = list(key)
        if rs[0].family != "dense":
            parts.insert(1, "experts=" + ",".join(str(r.experts) for r in rs))
        lines.append(f"python {script} -m " + " ".join(parts))
    return lines
