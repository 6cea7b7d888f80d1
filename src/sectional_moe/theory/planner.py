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
2. **Shape search** [I]: enumerate LLaMA-style shapes (d_model multiple of 64, n_layers,
   d_model/n_layers within an aspect band, heads of width ≤ 64, GQA 2:1, SwiGLU d_ff = 3·d_model
   as our presets), validate each with :class:`~sectional_moe.spec.ModelSpec`, count parameters
   and training FLOPs per token exactly with :mod:`sectional_moe.flops`, and keep, per expert
   count, the shapes closest (in log) to the law's target.
3. **Tokens** = C / M_exact, so that the run spends the budget exactly (M_exact = training
   matmul FLOPs per token incl. attention scores and LM head); steps = tokens / (batch·seq_len).
   The law's D_opt is reported alongside.
4. **Commands**: one ``python train.py -m ...`` line per distinct shape (experts sharing a shape
   and step count are merged into one sweep).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

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


@dataclass
class PlannedRun:
    """One proposed training run (all counts exact, from :mod:`sectional_moe.flops`)."""

    family: str
    experts: int | None
    routing: str | None
    preset: str  # nearest size preset by d_model (the base the overrides start from)
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    seq_len: int
    batch_size: int
    max_steps: int
    tokens: float  # max_steps · batch_size · seq_len
    flops_per_token: float  # training (3 × forward) matmul FLOPs per token, exact
    compute: float  # flops_per_token · tokens
    n_total: float
    n_non_embedding: float
    n_active: float
    target_name: str  # "N_opt" | "N_a_opt" | "M_opt"
    target: float
    matched: float  # the value of this config that was matched to the target
    law_d_opt: float  # D_opt of the law at this budget (tokens)
    predicted_loss: float | None = None  # in the law's own units (its data/tokenizer), if any

    def overrides(self, *, group: str) -> list[str]:
        out = [f"model={self.family}"]
        if self.family != "dense":
            out += [f"experts={self.experts}", f"routing={self.routing}"]
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


def _budget_tag(budget: float) -> str:
    mant, exp = f"{budget:.1e}".split("e")
    mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"


def plan(
    *,
    budget: float,
    family: str,
    experts: Sequence[int] | None = None,
    routing: str | None = None,
    law: str | None = None,
    coefficients: str = "epoch_mle",
    seq_len: int = 256,
    batch_size: int = 16,
    vocab_size: int = 8192,
    top_k: int = 2,
    n_convention: str = "total",
    per_expert: int = 1,
    shapes: list[dict[str, int]] | None = None,
    group: str | None = None,
) -> Plan:
    """Propose compute-optimal configurations for ``budget`` FLOPs and ``family`` (see module doc).

    Args:
        budget: training compute C in FLOPs (matmul FLOPs, 3 × forward, as :mod:`sectional_moe.flops`).
        family: dense | moe | sectional.
        experts: expert counts to plan (default: none for dense, [4, 8] otherwise).
        routing: routing of the MoE families (default topk for moe, segment_fixed for sectional).
        law: "chinchilla" or "wan2026" (defaults: chinchilla for dense, wan2026 for MoE families).
        coefficients: Chinchilla coefficient set (``laws.CHINCHILLA.published``), default Epoch's MLE [P].
        seq_len, batch_size: tokens per step = batch_size · seq_len (data.batch_size is per device).
        n_convention: which count is matched to Chinchilla's N_opt: "total" (Chinchilla counts
            embeddings [S]) or "non_embedding".
        per_expert: how many shapes to keep per expert count (closest first).
        shapes: candidate shapes (default :func:`candidate_shapes`).
    """
    from sectional_moe.errors import ConfigError
    from sectional_moe.flops import flops_per_token, param_counts
    from sectional_moe.spec import ModelSpec

    if family not in DEFAULT_LAW:
        raise ValueError(f"family={family!r}: use dense, moe or sectional")
    if budget <= 0:
        raise ValueError(f"budget={budget} must be > 0 FLOPs")
    law = law or DEFAULT_LAW[family]
    routing = routing or DEFAULT_ROUTING[family]
    expert_list: list[int | None] = [None] if family == "dense" else list(experts or (4, 8))
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

    shapes = shapes if shapes is not None else candidate_shapes(seq_len=seq_len)
    tokens_per_step = batch_size * seq_len
    head_flops = 3.0 * 2.0 * vocab_size  # training FLOPs per token per unit d_model of the LM head
    runs: list[PlannedRun] = []
    for E in expert_list:
        kwargs: dict[str, Any] = dict(vocab_size=vocab_size, family=family)
        if family == "dense":
            kwargs.update(experts=None, routing=None)
        else:
            kwargs.update(experts=E, routing=routing, top_k=min(top_k, E))
            if family == "sectional":
                kwargs.update(seq_reduction=E)
        # every layer is identical (sectional_every=1), so counts are affine in n_layers: evaluate
        # each width at 1 and 2 layers and extrapolate exactly
        per_width: dict[tuple, tuple[dict[str, float], dict[str, float], float, float] | None] = {}
        scored = []
        for shape in shapes:
            width = tuple(sorted((k, v) for k, v in shape.items() if k != "n_layers"))
            if width not in per_width:
                try:
                    s1 = ModelSpec(**dict(width), n_layers=1, **kwargs).validate()
                    s2 = ModelSpec(**dict(width), n_layers=2, **kwargs).validate()
                    p1, p2 = param_counts(s1), param_counts(s2)
                    per_width[width] = (p1, p2, flops_per_token(s1, training=True), flops_per_token(s2, training=True))
                except ConfigError:
                    per_width[width] = None
            counts = per_width[width]
            if counts is None:
                continue
            p1, p2, m1, m2 = counts
            nl = shape["n_layers"]
            pc = {k: p1[k] + (nl - 1) * (p2[k] - p1[k]) for k in p1}
            m_exact = m1 + (nl - 1) * (m2 - m1)
            if target_name == "N_opt":
                matched = pc["total"] if n_convention == "total" else pc["non_embedding"]
            elif target_name == "N_a_opt":
                matched = pc["active"]
            else:
                matched = m_exact - head_flops * shape["d_model"]  # Wan's M: without the LM head
            if matched <= 0:
                continue
            dist = abs(math.log(matched / target))
            aspect_pen = abs(math.log((shape["d_model"] / nl) / 48.0))
            # [I] among shapes within 5 % of the target prefer d_model/n_layers near 48 (our presets: 32-85)
            scored.append(((0.0 if dist <= math.log(1.05) else dist), aspect_pen, shape, pc, m_exact, matched))
        if not scored:
            notes.append(f"no valid shape for experts={E}; check divisibility (d_model, n_heads, d_ff, seq_len by E)")
            continue
        scored.sort(key=lambda x: (x[0], x[1]))
        for _, _, shape, pc, m_exact, matched in scored[:per_expert]:
            spec = ModelSpec(**shape, **kwargs).validate()
            assert abs(flops_per_token(spec, training=True) / m_exact - 1) < 1e-9  # the affine shortcut is exact
            tokens_budget = budget / m_exact
            steps = max(1, int(round(tokens_budget / tokens_per_step)))
            tokens = float(steps * tokens_per_step)
            pred = None
            if law == "chinchilla" and family == "dense":
                pred = float(CHINCHILLA.predict(coefficients, N=matched, D=tokens))
            runs.append(
                PlannedRun(
                    family=family, experts=E, routing=routing if family != "dense" else None,
                    preset=nearest_preset(spec.d_model), d_model=spec.d_model, n_layers=spec.n_layers,
                    n_heads=spec.n_heads, n_kv_heads=spec.n_kv_heads, d_ff=spec.d_ff, seq_len=spec.seq_len,
                    batch_size=batch_size, max_steps=steps, tokens=tokens, flops_per_token=m_exact,
                    compute=m_exact * tokens, n_total=pc["total"], n_non_embedding=pc["non_embedding"], n_active=pc["active"],
                    target_name=target_name, target=target, matched=matched, law_d_opt=d_law, predicted_loss=pred,
                )
            )
    if family == "moe" and runs:
        ratios = [r.n_non_embedding / r.n_active for r in runs]
        lo, hi = WAN_N_OVER_NA_BAND
        notes.append(
            f"N/N_a of the planned runs: {', '.join(f'{x:.1f}' for x in ratios)}; Wan et al. 2026 [P] find {lo:g}–{hi:g} near-optimal "
            "for 288 experts top-8 (unreachable with few experts at top-k 2)."
        )
        z = zhao_optima(**ZHAO.coefficients())
        notes.append(f"Zhao et al. 2025 [S]: optimal activated experts G* = {z['G_opt']:.2f}, shared ratio S* = {z['S_opt']:.3f} (independent of N, D by the law's separable form).")
    small = [r for r in runs if r.max_steps < 100]
    if small:
        notes.append("some runs have < 100 steps: lower data.batch_size or raise the budget.")
    return Plan(budget=float(budget), family=family, law=law, law_provenance=provenance, allocation=allocation,
                runs=runs, commands=hydra_commands(runs, group=group), group=group, notes=notes)


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

