"""Compute-optimal planner: budget C (FLOPs) + family → configurations and the Hydra sweep that
trains them.

Steps (each says where its numbers come from):

1. **Allocation** from a law:
   * ``law="chinchilla"`` (default for ``dense``): the closed-form frontier of Hoffmann Eq. 4 [P]
     with a published coefficient set (default ``epoch_mle``, Besiroglu et al. 2024 [P]) gives the
     target N_opt (parameters) and D_opt under C = 6·N·D. For MoE families the target is the
     *active* parameter count [I] (a dense law applied to N_a; no published basis);
   * ``law="wan2026"`` (default for ``moe`` and ``sectional``): Wan et al. 2026 Eq. 2 [P] gives
     the target training FLOPs per token M_opt(C) and D_opt(C) with C = M·D. Wan fitted it on
     token MoE (1 shared + 288 routed experts, top-8); applying it to the sectional family is
     our assumption [I] — no scaling law for the sectional MoE exists.
2. **Global batch** from the compute budget: ``B_opt = 0.2920·C^0.3271`` tokens per step, DeepSeek
   LLM (Bi et al. 2024, arXiv 2401.02954, §3.1 Eq. 1) [P], fitted on 1e17–2e19 FLOPs (outside that
   range it is extrapolated); ``batch_size = round(B_opt / seq_len)`` sequences.
3. **Expert count** from the laws (unless ``experts`` is given):
   * ``moe``: Zhao et al. 2025's G* = √(f/e) ≈ 6.78 [D on S] activated experts → ``top_k``, each
     expert ``d_ff/top_k`` wide (fine-grained, as Zhao varies G at fixed N_a [S]) [I]; the total E
     is the candidate whose planned N_a/N is closest to Zhao's optimum (N_a/N)*(N) (§3.3 [D]);
   * ``sectional``: the cost model's E_opt (reconstructed S(E) [I], :func:`cost_model.e_opt`) for
     the chosen d_model and seq_len at overhead ``kappa``, restricted to E the shape can split
     (d_model, heads, kv heads, d_ff and seq_len divisible); shape and E are iterated to a fixed
     point because the shape that meets the law's target depends on E.
4. **Shape search** [I]: enumerate LLaMA-style shapes (d_model multiple of 64, n_layers,
   d_model/n_layers within an aspect band, heads of width ≤ 64, GQA 2:1, SwiGLU d_ff = 3·d_model
   as our presets), validate each with :class:`~sectional_moe.spec.ModelSpec`, count parameters
   and training FLOPs per token exactly with :mod:`sectional_moe.flops`, and keep the shapes
   closest (in log) to the law's target.
5. **Tokens** = C / M_exact, so that the run spends the budget exactly (M_exact = training
   matmul FLOPs per token incl. attention scores and LM head); steps = tokens / batch tokens.
   The law's D_opt is reported alongside.
6. **Predicted loss**, always in the law's own units (its data and tokenizer, not ours): dense —
   Chinchilla at (N, D); moe — Zhao's joint law at (N, D, N_a, G, S = 0); sectional — the dense
   Chinchilla law at its FLOP-equivalent active parameters plus embeddings, an assumption [I]
   stated in ``predicted_loss_note``.
7. **Commands**: one ``python train.py -m ...`` line per distinct shape (experts sharing a shape
   and step count are merged into one sweep).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

from sectional_moe.theory import cost_model
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
#: Overhead κ of the sectional cost model in MACs per E² (per sequence and layer, the unit of
#: A_trad = 3·L·d0²). A placeholder [I], not a measurement: pass one from the report's κ fit
#: (:func:`cost_model.kappa_in_macs`). At 1e5, E_opt is 4–16 for d_model 256–1024 at L = 256.
DEFAULT_KAPPA_MACS = 1e5
#: Total expert counts the moe planner compares by Zhao's predicted loss.
MOE_EXPERT_CANDIDATES = (8, 16, 32, 64)
#: conf/model/sectional.yaml's default: every 2nd layer sectional.
DEFAULT_SECTIONAL_EVERY = 2


@dataclass
class PlannedRun:
    """One proposed training run (all counts exact, from :mod:`sectional_moe.flops`)."""

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
    n_active: float
    target_name: str  # "N_opt" | "N_a_opt" | "M_opt"
    target: float
    matched: float  # the value of this config that was matched to the target
    law_d_opt: float  # D_opt of the law at this budget (tokens)
    predicted_loss: float | None = None  # nats/token in the predicting law's units (its data/tokenizer)
    predicted_loss_law: str | None = None
    predicted_loss_note: str = ""

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
            f"trainer.max_steps={self.max_steps}",
            f"data.batch_size={self.batch_size}",
            f"group={group}",
        ]
        return out


@dataclass
class Plan:
    """A budget's plan: the law's allocation, the runs, the commands, and caveats."""

    budget: float
    family: str
    law: str
    law_provenance: str
    allocation: dict[str, float]
    batch_rule: str
    expert_choice: dict[str, Any]  # how E (and top_k) were chosen, with the candidates compared
    runs: list[PlannedRun]
    commands: list[str]
    group: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "family": self.family,
            "law": self.law,
            "law_provenance": self.law_provenance,
            "allocation": self.allocation,
            "batch_rule": self.batch_rule,
            "expert_choice": self.expert_choice,
            "group": self.group,
            "runs": [asdict(r) for r in self.runs],
            "commands": self.commands,
            "notes": self.notes,
        }


def default_heads(d_model: int) -> tuple[int, int]:
    """(n_heads, n_kv_heads) for a generated shape [I]: the largest power of two ≤ d_model/32,
    clamped to [4, 16] (head width 32–64 at our scales), GQA 2:1 — close to the presets."""
    h = 4
    while h * 2 <= min(16, d_model // 32):
        h *= 2
    return h, max(1, h // 2)


def candidate_shapes(
    *,
    d_models: Iterable[int] | None = None,
    n_layers: Iterable[int] | None = None,
    aspect: tuple[float, float] = (16.0, 128.0),
    seq_len: int = 256,
) -> list[dict[str, int]]:
    """LLaMA-style shapes [I]: d_model ∈ multiples of 64 (64…4096), n_layers ∈ 1…48 with
    ``aspect[0] ≤ d_model/n_layers ≤ aspect[1]``, d_ff = 3·d_model, heads by :func:`default_heads`."""
    d_models = list(d_models) if d_models is not None else list(range(64, 4097, 64))
    n_layers = list(n_layers) if n_layers is not None else list(range(1, 49))
    out = []
    for d in d_models:
        h, kv = default_heads(d)
        for nl in n_layers:
            if aspect[0] <= d / nl <= aspect[1]:
                out.append({"d_model": d, "n_layers": nl, "n_heads": h, "n_kv_heads": kv, "d_ff": 3 * d, "seq_len": seq_len})
    return out


def nearest_preset(d_model: int) -> str:
    """Size preset with the closest d_model (in log); ties go to the smaller preset."""
    return min(SIZE_PRESETS, key=lambda k: abs(math.log(SIZE_PRESETS[k]["d_model"] / d_model)))


def batch_tokens_opt(budget: float) -> float:
    """Compute-optimal global batch in tokens per step, ``0.2920·C^0.3271`` (C in FLOPs).

    [P] DeepSeek LLM (Bi et al. 2024, arXiv 2401.02954) §3.1 Eq. 1, fitted on 1e17–2e19 FLOPs of
    dense models with C = M·D (M = non-embedding FLOPs per token); we apply it to every family [I].
    """
    return DEEPSEEK_BATCH["coef"] * float(budget) ** DEEPSEEK_BATCH["exp"]


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

    def __init__(self, shapes: list[dict[str, int]], *, target_name: str, target: float, n_convention: str, vocab_size: int):
        self.shapes, self.target_name, self.target = shapes, target_name, target
        self.n_convention, self.vocab_size = n_convention, vocab_size

    def matched(self, counts: dict[str, float], m_exact: float, d_model: int) -> float:
        if self.target_name == "N_opt":
            return counts["total"] if self.n_convention == "total" else counts["non_embedding"]
        if self.target_name == "N_a_opt":
            return counts["active"]
        return m_exact - 3.0 * 2.0 * self.vocab_size * d_model  # Wan's M: without the LM head

    def best(self, kwargs: dict[str, Any], *, keep: int = 1) -> list[_Candidate]:
        scored = []
        per_width: dict[tuple, Any] = {}
        for shape in self.shapes:
            width = tuple(sorted((k, v) for k, v in shape.items() if k != "n_layers"))
            if width not in per_width:
                per_width[width] = _layer_affine_counts(dict(width), kwargs, self.vocab_size)
            model = per_width[width]
            if model is None or shape["n_layers"] < model["min_layers"]:
                continue
            counts, m_exact = model["at"](shape["n_layers"])
            matched = self.matched(counts, m_exact, shape["d_model"])
            if matched <= 0:
                continue
            dist = abs(math.log(matched / self.target))
            aspect_pen = abs(math.log((shape["d_model"] / shape["n_layers"]) / 48.0))
            # [I] among shapes within 5 % of the target prefer d_model/n_layers near 48 (our presets: 32-85)
            scored.append(((0.0 if dist <= math.log(1.05) else dist), aspect_pen,
                           _Candidate(shape, model["kwargs"], counts, m_exact, matched)))
        scored.sort(key=lambda x: (x[0], x[1]))
        out = [c for _, _, c in scored[:keep]]
        for c in out:  # the shortcut below is exact: check the proposals against a full count
            counts, m_exact = _exact_counts(c.shape, c.kwargs, self.vocab_size)
            assert abs(m_exact / c.m_exact - 1) < 1e-9 and abs(counts["total"] / c.counts["total"] - 1) < 1e-9
        return out


def _exact_counts(shape: dict[str, int], kwargs: dict[str, Any], vocab_size: int) -> tuple[dict[str, float], float]:
    from sectional_moe.flops import flops_per_token, param_counts
    from sectional_moe.spec import ModelSpec

    spec = ModelSpec(**shape, vocab_size=vocab_size, **kwargs).validate()
    return param_counts(spec), flops_per_token(spec, training=True)


def _layer_affine_counts(width: dict[str, int], kwargs: dict[str, Any], vocab_size: int) -> dict[str, Any] | None:
    """Counts of one width as an exact function of n_layers, or None if the width is invalid.

    Parameters and FLOPs are sums over layers, and with ``sectional_every = k`` a model of n
    layers has n//k sectional and n − n//k dense ones, so every count is
    ``base + n_dense·dense + n_sect·sect``: three specs (k, k+1 and 2k layers) fix the three terms.
    For dense and moe (k = 1, every layer alike) this is ``base + n·layer``.
    """
    from sectional_moe.errors import ConfigError

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


def sectional_expert_count(
    shape: dict[str, int], *, kappa: float, view: cost_model.View = "summed", e_max: int = 64,
    sectional_every: int = DEFAULT_SECTIONAL_EVERY, vocab_size: int = 8192, routing: str = "segment_fixed",
) -> dict[str, Any]:
    """The cost-model optimum E for one shape [I]: :func:`cost_model.e_opt` of the reconstructed
    S(E) with ``A_trad = 3·seq_len·d_model²`` MACs and overhead ``κ`` (MACs per E²), then the
    valid E (2…``e_max``, the spec accepts it with r = E: d_model, heads, kv heads, d_ff and
    seq_len divisible) with the largest S(E). ``view="summed"`` counts every expert (what the
    FLOP counter and the planner's budget see).
    """
    from sectional_moe.errors import ConfigError
    from sectional_moe.spec import ModelSpec

    a_trad = cost_model.qkv_cost_traditional(d_model=shape["d_model"], seq_len=shape["seq_len"])
    opt = cost_model.e_opt(a_trad=a_trad, kappa=kappa, view=view)
    valid = []
    for E in range(2, e_max + 1):
        try:
            ModelSpec(**shape, vocab_size=vocab_size, family="sectional", experts=E, routing=routing, seq_reduction=E,
                      sectional_every=min(sectional_every, shape["n_layers"])).validate()
        except ConfigError:
            continue
        valid.append(E)
    if not valid:
        return {"E": None, "valid": [], "e_opt": opt.to_dict(), "a_trad_macs": a_trad, "kappa_macs": kappa}
    s = {E: float(cost_model.savings(E, a_trad=a_trad, kappa=kappa, view=view)) for E in valid}
    best = max(valid, key=lambda E: s[E])
    return {"E": best, "valid": valid, "savings_macs": s[best], "pays": s[best] > 0, "e_opt": opt.to_dict(),
            "a_trad_macs": a_trad, "kappa_macs": kappa, "view": view}


def plan(
    *,
    budget: float,
    family: str,
    experts: Sequence[int] | None = None,
    routing: str | None = None,
    law: str | None = None,
    coefficients: str = "epoch_mle",
    seq_len: int = 256,
    batch_size: int | None = None,
    vocab_size: int = 8192,
    top_k: int | None = None,
    kappa: float | None = None,
    sectional_every: int = DEFAULT_SECTIONAL_EVERY,
    n_convention: str = "total",
    per_expert: int = 1,
    shapes: list[dict[str, int]] | None = None,
    group: str | None = None,
) -> Plan:
    """Propose compute-optimal configurations for ``budget`` FLOPs and ``family`` (see module doc).

    Args:
        budget: training compute C in FLOPs (matmul FLOPs, 3 × forward, as :mod:`sectional_moe.flops`).
        family: dense | moe | sectional.
        experts: expert counts to plan; default: chosen from the laws (step 3 of the module doc).
        routing: routing of the MoE families (default topk for moe, segment_fixed for sectional).
        law: "chinchilla" or "wan2026" (defaults: chinchilla for dense, wan2026 for MoE families).
        coefficients: Chinchilla coefficient set (``laws.CHINCHILLA.published``), default Epoch's MLE [P].
        seq_len: tokens per sequence.
        batch_size: sequences per step; default ``round(B_opt(C)/seq_len)`` (DeepSeek's rule, step 2).
        top_k: experts per token of moe topk; default round(Zhao's G*) with fine-grained experts.
        kappa: sectional overhead κ in MACs per E² (``DEFAULT_KAPPA_MACS``, a placeholder, if None).
        sectional_every: every k-th layer sectional (the framework's default 2), counted exactly.
        n_convention: which count is matched to Chinchilla's N_opt: "total" (Chinchilla counts
            embeddings [S]) or "non_embedding".
        per_expert: how many shapes to keep per expert count (closest first).
        shapes: candidate shapes (default :func:`candidate_shapes`).
    """
    if family not in DEFAULT_LAW:
        raise ValueError(f"family={family!r}: use dense, moe or sectional")
    if budget <= 0:
        raise ValueError(f"budget={budget} must be > 0 FLOPs")
    law = law or DEFAULT_LAW[family]
    routing = routing or DEFAULT_ROUTING[family]
    group = group or f"plan_{_budget_tag(budget)}"
    notes: list[str] = []

    if law == "chinchilla":
        coef = CHINCHILLA.coefficients(coefficients)
        fr = chinchilla_frontier(C=budget, **coef)
        target_name = "N_opt" if family == "dense" else "N_a_opt"
        target = float(fr["N_opt"])
        d_law = float(fr["D_opt"])
        allocation = {"N_opt": target, "D_opt": d_law, "a": float(fr["a"]), "G": float(fr["G"]), "D_per_N": float(fr["D_per_N"])}
        provenance = f"Hoffmann et al. 2022 Eq. 4 [P], coefficients '{coefficients}' {CHINCHILLA.published[coefficients].provenance} ({CHINCHILLA.published[coefficients].source}); C = 6·N·D"
        if family != "dense":
            notes.append("[I] the dense Chinchilla frontier is applied to the active parameter count N_a of an MoE model; no published law backs this.")
    elif law == "wan2026":
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

    if batch_size is None:
        b_opt = batch_tokens_opt(budget)
        batch_size = max(1, int(round(b_opt / seq_len)))
        batch_rule = (f"B_opt = 0.2920·C^0.3271 = {b_opt:.4g} tokens/step [P] (DeepSeek LLM, Bi et al. 2024, arXiv 2401.02954, Eq. 1; "
                      f"fitted on 1e17–2e19 FLOPs of dense models, applied to every family [I]) → batch_size = round(B_opt/seq_len) = {batch_size}")
        if not 1e17 <= budget <= 2e19:
            notes.append(f"the batch rule is extrapolated: C = {budget:.3g} lies outside its 1e17–2e19 FLOPs fitting range.")
    else:
        batch_rule = f"given: batch_size = {batch_size} sequences of {seq_len} tokens"
    tokens_per_step = batch_size * seq_len
    notes.append(f"global batch {batch_size} x {seq_len} = {tokens_per_step} tokens/step; data.batch_size is per device, "
                 "so divide it by the device count x trainer.accumulate_grad_batches on more than one device.")

    search = _ShapeSearch(shapes if shapes is not None else candidate_shapes(seq_len=seq_len), target_name=target_name,
                          target=target, n_convention=n_convention, vocab_size=vocab_size)
    if family == "dense":
        chosen: list[tuple[int | None, dict[str, Any]]] = [(None, {"family": "dense", "experts": None, "routing": None})]
        expert_choice: dict[str, Any] = {"rule": "dense: no experts"}
    elif family == "moe":
        chosen, expert_choice = _moe_experts(search, budget, experts, routing, top_k, tokens_per_step, notes)
    else:
        chosen, expert_choice = _sectional_experts(search, experts, routing, kappa, sectional_every, vocab_size, notes)

    runs: list[PlannedRun] = []
    for E, kwargs in chosen:
        found = search.best(kwargs, keep=per_expert)
        if not found:
            notes.append(f"no valid shape for experts={E}; check divisibility (d_model, n_heads, d_ff, seq_len by E)")
            continue
        for cand in found:
            runs.append(_planned_run(cand, family=family, budget=budget, batch_size=batch_size, tokens_per_step=tokens_per_step,
                                     target_name=target_name, target=target, d_law=d_law, law=law, coefficients=coefficients))
    if family == "moe" and runs:
        ratios = [r.n_non_embedding / r.n_active for r in runs]
        lo, hi = WAN_N_OVER_NA_BAND
        notes.append(
            f"N/N_a of the planned runs: {', '.join(f'{x:.1f}' for x in ratios)}; Wan et al. 2026 [P] find {lo:g}–{hi:g} near-optimal "
            "for 288 experts top-8 (unreachable with few experts)."
        )
    small = [r for r in runs if r.max_steps < 100]
    if small:
        notes.append("some runs have < 100 steps: lower the batch size or raise the budget.")
    return Plan(budget=float(budget), family=family, law=law, law_provenance=provenance, allocation=allocation,
                batch_rule=batch_rule, expert_choice=expert_choice, runs=runs, commands=hydra_commands(runs, group=group),
                group=group, notes=notes)


def planned_steps(budget: float, flops_per_token: float, tokens_per_step: int) -> int:
    """Optimiser steps that spend ``budget`` FLOPs at ``flops_per_token`` (step 5 of the module doc), at least 1."""
    return max(1, int(round(budget / flops_per_token / tokens_per_step)))


def _moe_experts(search: _ShapeSearch, budget: float, experts: Sequence[int] | None, routing: str, top_k: int | None,
                 tokens_per_step: int, notes: list[str]) -> tuple[list[tuple[int, dict[str, Any]]], dict[str, Any]]:
    """Zhao's G* → top_k (fine-grained experts); E = the candidate with the lowest Zhao loss."""
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
        tokens = planned_steps(budget, c.m_exact, tokens_per_step) * tokens_per_step
        loss = float(ZHAO.predict(N=c.counts["non_embedding"], D=tokens, N_a=c.counts["active"], G=min(k, E), S=0.0))
        ratio = float(zhao_optima(N=c.counts["non_embedding"], **ZHAO.coefficients())["N_a_over_N_opt"])
        rows.append({"E": E, "zhao_loss": loss, "N": c.counts["non_embedding"], "N_a_over_N": c.counts["active"] / c.counts["non_embedding"],
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


def _sectional_experts(search: _ShapeSearch, experts: Sequence[int] | None, routing: str, kappa: float | None, sectional_every: int,
                       vocab_size: int, notes: list[str]) -> tuple[list[tuple[int, dict[str, Any]]], dict[str, Any]]:
    """Cost-model E_opt of the chosen shape, iterated with the shape search to a fixed point."""

    def kwargs(E: int) -> dict[str, Any]:
        return {"family": "sectional", "experts": E, "routing": routing, "seq_reduction": E, "sectional_every": sectional_every}

    if experts:
        return [(int(E), kwargs(int(E))) for E in experts], {"rule": "given"}
    kappa_used = DEFAULT_KAPPA_MACS if kappa is None else float(kappa)
    if kappa is None:
        notes.append(f"[I] κ = {DEFAULT_KAPPA_MACS:g} MACs/E² is a placeholder, not a measurement: fit κ from a sweep's step times "
                     "(report, step-cost figure) and pass it (cost_model.kappa_in_macs converts s/E² to MACs/E²).")
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
        notes.append(f"under κ = {kappa_used:g} MACs/E² sectioning does not pay for this shape (S(E) ≤ 0 for every valid E); "
                     f"E = {E} is the least costly.")
    e = info["e_opt"]
    choice = {"rule": (f"E = the valid E (dividing d_model, heads, kv heads, d_ff, seq_len; r = E) with the largest reconstructed "
                       f"S(E) [I] for the chosen shape, κ = {kappa_used:g} MACs/E², summed view; shape and E iterated ({seen} → {E})"),
              "E": E, "kappa_macs": kappa_used, "kappa_is_default": kappa is None, "a_trad_macs": info["a_trad_macs"],
              "e_opt_closed_form": e["closed_form"], "e_opt_numeric_root": e["numeric_root"], "valid_E": info["valid"],
              "iterations": seen}
    notes.append(f"cost-model E_opt [I]: closed form {e['closed_form']:.2f}, root {e['numeric_root']:.2f} → valid E = {E}.")
    return [(E, kwargs(E))], choice


def _planned_run(c: _Candidate, *, family: str, budget: float, batch_size: int, tokens_per_step: int, target_name: str,
                 target: float, d_law: float, law: str, coefficients: str) -> PlannedRun:
    steps = planned_steps(budget, c.m_exact, tokens_per_step)
    tokens = float(steps * tokens_per_step)
    kw = c.kwargs
    pred, pred_law, pred_note = None, None, ""
    embedding = c.counts["total"] - c.counts["non_embedding"]
    if family == "dense":
        n = c.counts["total"] if law == "wan2026" else c.matched
        pred, pred_law = float(CHINCHILLA.predict(coefficients, N=n, D=tokens)), f"chinchilla/{coefficients}"
        pred_note = "[P] law; in nats on Chinchilla's data and tokenizer (MassiveText), not ours: compare differences, not levels."
    elif family == "moe":
        pred = float(ZHAO.predict(N=c.counts["non_embedding"], D=tokens, N_a=c.counts["active"], G=kw["top_k"], S=0.0))
        pred_law = "zhao2025"
        pred_note = ("[S] coefficients, [I] inputs: N = non-embedding total, N_a = FLOP-equivalent active non-embedding parameters "
                     "(Zhao's embedding convention is not stated), G = top_k, S = 0; nats on Zhao's data (Dolma subset).")
    else:
        pred = float(CHINCHILLA.predict(coefficients, N=c.counts["active"] + embedding, D=tokens))
        pred_law = f"chinchilla/{coefficients}"
        pred_note = ("[I] assumption, no law exists for the sectional family: the dense Chinchilla law at the FLOP-equivalent active "
                     "parameters plus embeddings (its N convention) and the planned tokens; nats on Chinchilla's data, not ours.")
    return PlannedRun(
        family=family, experts=kw.get("experts"), routing=kw.get("routing"),
        top_k=kw.get("top_k") if kw.get("routing") == "topk" else None,
        expert_d_ff=kw.get("expert_d_ff"),
        sectional_every=kw.get("sectional_every"), preset=nearest_preset(c.shape["d_model"]), **c.shape,
        batch_size=batch_size, batch_tokens=tokens_per_step, max_steps=steps, tokens=tokens, flops_per_token=c.m_exact,
        compute=c.m_exact * tokens, n_total=c.counts["total"], n_non_embedding=c.counts["non_embedding"], n_active=c.counts["active"],
        target_name=target_name, target=target, matched=c.matched, law_d_opt=d_law,
        predicted_loss=pred, predicted_loss_law=pred_law, predicted_loss_note=pred_note,
    )


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
