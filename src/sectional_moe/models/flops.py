"""Analytic matmuls, FLOPs and parameter counts of a :class:`~sectional_moe.models.spec.ModelSpec` (pure Python).

Conventions (the same as PaLM app. B, nanoGPT, torchtitan and ``torch.utils.flop_counter``):

* FLOPs count matrix multiplications only, 2 FLOPs per multiply-accumulate. Norms, softmax,
  activations, RoPE, pooling by mean and the embedding look-up cost nothing; the LM head counts.
* Attention scores (QKᵀ and AV) are counted over the full context, without a causal discount:
  ``4 * T * d_attn`` forward FLOPs per query token.
* Training FLOPs = 3 x forward (the backward pass computes an input and a weight gradient for
  every matmul).
* A sectional layer runs on T/r positions, so its per-token cost is its per-position cost / r.
* Routed experts count what is executed: K expert FFNs per token (dropless; with a capacity
  factor our implementation still computes the dropped rows, so the count stays exact).

Two "active" counts, both without embeddings:

* ``params["active"]``: the parameters a token's computation reads, as MoE papers mean it. Dense:
  every layer; token MoE: attention, router and the K experts (and the shared one); a sectional
  layer: all of it (the pooling, the pre-expert layer and every section's expert, since each token
  has all E sections; a routed slice reads at most its K experts, and a token's E slices reach
  all E in the count).
* ``params["flop_equivalent"]``: the matmul parameters applied per token, a routed weight counted
  once per application and shortened layers weighted by 1/r, so that ``6 * flop_equivalent +
  attention-score FLOPs`` is the training cost per token (Wan et al. 2026's N_a). For dense and
  token MoE it equals ``active``; for the sectional family it folds the 1/r sequence saving into
  a parameter count, which is why it has its own name.

Everything is derived from one list, :func:`layer_matmuls` (name, groups, M, K, N of every
matmul of a layer), which the benchmark's GEMM probe times too.

The Wan/Jin triad of seed 003 is ``wan_triad(spec)``: (M, N_a, N) with M training FLOPs per token,
N_a active and N total non-embedding parameters.

Imports: :mod:`sectional_moe.models.spec` only (torch-free: theory and studies use it).
"""

from __future__ import annotations

from dataclasses import dataclass

from sectional_moe.models.spec import ModelSpec

COMPONENTS = ("qkv", "attn_scores", "attn_out", "ffn", "router", "merge", "pool", "lm_head")


@dataclass(frozen=True)
class Matmul:
    """One matrix multiply of a forward pass: ``groups`` independent (M, K) @ (K, N) products.

    ``M`` is rows per group; for routed experts it is the balanced share (rows x K / E), which
    may be fractional: the FLOP count is exact for any balance, the shape is what a balanced
    router gives each expert.
    """

    name: str  # e.g. attn_q, attn_kv, attn_scores, attn_values, attn_out, ffn_in, ffn_out, router, lm_head
    component: str  # one of COMPONENTS (the breakdown it adds to)
    groups: int
    M: float
    K: int
    N: int
    inside_attention: bool = False  # a score/value product inside SDPA, not a weight projection

    @property
    def flops(self) -> float:
        return 2.0 * self.groups * self.M * self.K * self.N


def _attention(prefix: str, rows: int, d_in: int, heads: int, kv_heads: int, head_dim: int, *, n_seq: int,
               context: int, groups: int = 1) -> list[Matmul]:
    """Pre-norm causal GQA attention of ``groups`` independent stacks (sections), ``rows`` positions each."""
    q, kv = heads * head_dim, kv_heads * head_dim
    return [
        Matmul(f"{prefix}attn_q", "qkv", groups, rows, d_in, q),
        Matmul(f"{prefix}attn_kv", "qkv", groups, rows, d_in, 2 * kv),
        # QK^T and AV per (sequence, group, query head) over the full context (no causal discount)
        Matmul(f"{prefix}attn_scores", "attn_scores", n_seq * groups * heads, context, head_dim, context, True),
        Matmul(f"{prefix}attn_values", "attn_scores", n_seq * groups * heads, context, context, head_dim, True),
        Matmul(f"{prefix}attn_out", "attn_out", groups, rows, q, d_in),
    ]


def _swiglu(prefix: str, component: str, groups: int, rows: float, d: int, hidden: int) -> list[Matmul]:
    return [Matmul(f"{prefix}ffn_in", component, groups, rows, d, 2 * hidden),  # w1 and w3 fused
            Matmul(f"{prefix}ffn_out", component, groups, rows, hidden, d)]


def _dense_block(spec: ModelSpec, prefix: str, rows: int, n_seq: int, context: int, ffn: bool = True) -> list[Matmul]:
    out = _attention(prefix, rows, spec.d_model, spec.n_heads, spec.n_kv_heads, spec.head_dim, n_seq=n_seq, context=context)
    return out + (_swiglu(prefix, "ffn", 1, rows, spec.d_model, spec.d_ff) if ffn else [])


def _cross_block(spec: ModelSpec, prefix: str, short: int, rows: int, n_seq: int, Ts: int, T: int) -> list[Matmul]:
    """The cross-resolution pre-expert layer: Q from the short positions, K and V from every
    position, (Ts x T) scores per head, the output projection and the FFN at short length."""
    D, H, Dh = spec.d_model, spec.n_heads, spec.head_dim
    return [
        Matmul(f"{prefix}attn_q", "qkv", 1, short, D, H * Dh),
        Matmul(f"{prefix}attn_kv", "qkv", 1, rows, D, 2 * spec.n_kv_heads * Dh),
        Matmul(f"{prefix}attn_scores", "attn_scores", n_seq * H, Ts, Dh, T, True),
        Matmul(f"{prefix}attn_values", "attn_scores", n_seq * H, Ts, T, Dh, True),
        Matmul(f"{prefix}attn_out", "attn_out", 1, short, H * Dh, D),
    ] + _swiglu(prefix, "ffn", 1, short, D, spec.d_ff)


def layer_matmuls(spec: ModelSpec, layer: int, batch: int = 1) -> list[Matmul]:
    """Every matmul of decoder layer ``layer`` in one forward pass of ``batch`` sequences of ``seq_len``.

    The single description of the architecture's work: :func:`flops_breakdown` sums it, the
    benchmark times its weight projections (``inside_attention`` False) as the machine's GEMM mix.
    """
    T, D = spec.seq_len, spec.d_model
    rows = batch * T
    if not spec.is_routed_layer(layer):
        return _dense_block(spec, "", rows, batch, T)
    E, F = spec.n_experts, spec.resolved_expert_d_ff
    rule = spec.routing_rule
    assert rule is not None
    k = spec.experts_per_item
    if spec.family == "moe":
        out = _dense_block(spec, "", rows, batch, T, ffn=False)
        out += _swiglu("experts_", "ffn", E, rows * k / E, D, F)
        if rule.learned:
            out.append(Matmul("router", "router", 1, rows, D, E))
        if spec.shared_expert:
            out += _swiglu("shared_", "ffn", 1, rows, D, F)
        return out
    # sectional layer: everything below runs on the T/r short positions
    r, S = spec.seq_reduction, spec.section_dim
    Ts = T // r
    short = batch * Ts
    out = []
    if r > 1 and spec.seq_pool == "linear":
        out.append(Matmul("pool", "pool", 1, short, r * D, D))
    if spec.pre_expert and spec.pre_expert_resolution == "short":
        out += _dense_block(spec, "pre_expert_", short, batch, Ts)
    elif spec.pre_expert and spec.pre_expert_resolution == "full":  # every position, before the shortening
        out += _dense_block(spec, "pre_expert_", rows, batch, T)
    elif spec.pre_expert:  # cross: short queries, full-length keys and values
        out += _cross_block(spec, "pre_expert_", short, rows, batch, Ts, T)
    if spec.expert_attention:
        out += _attention("experts_", short, S, spec.section_heads, spec.section_kv_heads, spec.section_head_dim,
                          n_seq=batch, context=Ts, groups=E)
    # E*short slices, each to k experts: short*k rows per expert (exactly E of them when dedicated)
    out += _swiglu("experts_", "ffn", E, short * k, S, F)
    if rule.learned:
        out.append(Matmul("router", "router", 1, E * short, S, E))
    if spec.merge_proj:
        out.append(Matmul("merge", "merge", 1, short, D, D))
    return out


def head_matmuls(spec: ModelSpec, batch: int = 1) -> list[Matmul]:
    """The LM head of one forward pass of ``batch`` sequences."""
    return [Matmul("lm_head", "lm_head", 1, batch * spec.seq_len, spec.d_model, spec.vocab_size)]


def model_matmuls(spec: ModelSpec, batch: int = 1) -> list[Matmul]:
    """Every matmul of one forward pass of ``batch`` sequences: all layers, then the head."""
    return [m for layer in range(spec.n_layers) for m in layer_matmuls(spec, layer, batch)] + head_matmuls(spec, batch)


def layer_flops(spec: ModelSpec, layer: int) -> dict[str, float]:
    """Forward FLOPs per (original) token of decoder layer ``layer``, by component."""
    out: dict[str, float] = dict.fromkeys(COMPONENTS, 0.0)
    for m in layer_matmuls(spec, layer):
        out[m.component] += m.flops / spec.seq_len
    return out


def flops_breakdown(spec: ModelSpec) -> dict[str, float]:
    """Forward matmul FLOPs per token, summed over layers, by component, plus ``total``."""
    out: dict[str, float] = dict.fromkeys(COMPONENTS, 0.0)
    for m in model_matmuls(spec):
        out[m.component] += m.flops / spec.seq_len
    out["total"] = sum(out[k] for k in COMPONENTS)
    return out


def flops_per_token(spec: ModelSpec, training: bool = True) -> float:
    """Matmul FLOPs per token: forward, or forward + backward (3x) when ``training``."""
    fwd = flops_breakdown(spec)["total"]
    return 3.0 * fwd if training else fwd


def attention_recompute_flops(spec: ModelSpec) -> float:
    """FLOPs per token that a flash-style attention backward spends recomputing QKᵀ.

    Not model FLOPs (PaLM/torchtitan exclude recompute), but ``FlopCounterMode`` counts them for
    the flash kernels (CPU and CUDA): half of the forward attention-score FLOPs.
    """
    return flops_breakdown(spec)["attn_scores"] / 2.0


def _dense_layer_params(D: int, kv_dim: int, ffn_hidden: int) -> int:
    return 2 * D + D * (D + 2 * kv_dim) + D * D + 3 * D * ffn_hidden


def param_counts(spec: ModelSpec) -> dict[str, float]:
    """Parameter counts: ``total`` (all, a tied head counted once), ``embedding`` (token embedding,
    plus the head if untied), ``non_embedding``, ``active`` (read per token) and ``flop_equivalent``
    (see the module docstring)."""
    D, V = spec.d_model, spec.vocab_size
    kv_dim = spec.n_kv_heads * spec.head_dim
    total = V * D * (1 if spec.tie_embeddings else 2) + D  # embeddings (+ head) + final norm
    idle = 0.0  # parameters a token's computation does not read: the experts it is not routed to
    learned = spec.routing_rule is not None and spec.routing_rule.learned
    for layer in range(spec.n_layers):
        if not spec.is_routed_layer(layer):
            total += _dense_layer_params(D, kv_dim, spec.d_ff)
            continue
        E, F = spec.n_experts, spec.resolved_expert_d_ff
        if spec.family == "moe":
            total += _dense_layer_params(D, kv_dim, 0) + E * 3 * D * F
            total += D * E if learned else 0
            total += 3 * D * F if spec.shared_expert else 0
            idle += max(0, E - spec.experts_per_item) * 3 * D * F
            continue
        r, S = spec.seq_reduction, spec.section_dim
        c, h, kh = spec.section_head_dim, spec.section_heads, spec.section_kv_heads
        total += r * D * D if (r > 1 and spec.seq_pool == "linear") else 0
        total += _dense_layer_params(D, kv_dim, spec.d_ff) if spec.pre_expert else 0
        if spec.expert_attention:
            total += E * (S + S * (h * c + 2 * kh * c) + h * c * S)  # norm, q/kv, out per section
        total += E * (S + 3 * S * F)  # ffn norm + SwiGLU per expert
        total += S * E if learned else 0
        total += D * D if spec.merge_proj else 0
    embedding = V * D * (1 if spec.tie_embeddings else 2)
    fwd = flops_breakdown(spec)
    flop_equivalent = (fwd["total"] - fwd["attn_scores"] - fwd["lm_head"]) / 2.0
    non_embedding = float(total - embedding)
    return {"total": float(total), "embedding": float(embedding), "non_embedding": non_embedding,
            "active": non_embedding - idle, "flop_equivalent": flop_equivalent}


def wan_triad(spec: ModelSpec) -> dict[str, float]:
    """(M, N_a, N) of Wan et al. 2026 (seed 003): training FLOPs per token, active and total
    non-embedding parameters."""
    p = param_counts(spec)
    return {"M": flops_per_token(spec, training=True), "N_a": p["flop_equivalent"], "N": p["non_embedding"]}
