"""Analytic FLOPs and parameter counts of a :class:`~sectional_moe.spec.ModelSpec` (pure Python).

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

``params["active"]`` is the *FLOP-equivalent* active non-embedding parameter count: the matmul
parameters applied per token, a routed weight counted once per application and shortened layers
weighted by 1/r (so that ``6 * active + attention-score FLOPs`` is the training cost per token,
Wan et al. 2026's N_a). For token MoE it is the usual "shared + K/E of the experts"; for the
sectional family it is the only definition that stays meaningful when a token touches all E
experts on 1/E of its width.

The Wan/Jin triad of seed 003 is ``wan_triad(spec)``: (M, N_a, N) with M training FLOPs per token,
N_a active and N total non-embedding parameters.
"""

from __future__ import annotations

from sectional_moe.spec import ModelSpec

COMPONENTS = ("qkv", "attn_scores", "attn_out", "ffn", "router", "merge", "pool", "lm_head")


def _dense_layer(d: int, heads_dim: int, kv_dim: int, ffn_hidden: int, context: int) -> dict[str, float]:
    """Forward FLOPs per position of a pre-norm attention + SwiGLU layer."""
    return {
        "qkv": 2.0 * d * (heads_dim + 2 * kv_dim),
        "attn_scores": 4.0 * context * heads_dim,
        "attn_out": 2.0 * heads_dim * d,
        "ffn": 6.0 * d * ffn_hidden,
    }


def _add(total: dict[str, float], part: dict[str, float], scale: float = 1.0) -> None:
    for key, value in part.items():
        total[key] = total.get(key, 0.0) + scale * value


def layer_flops(spec: ModelSpec, layer: int) -> dict[str, float]:
    """Forward FLOPs per (original) token of decoder layer ``layer``, by component."""
    D, T = spec.d_model, spec.seq_len
    kv_dim = spec.n_kv_heads * spec.head_dim
    out: dict[str, float] = dict.fromkeys(COMPONENTS, 0.0)
    if spec.family == "dense" or (spec.family == "sectional" and not spec.is_sectional_layer(layer)):
        _add(out, _dense_layer(D, D, kv_dim, spec.d_ff, T))
        return out
    E, F = spec.n_experts, spec.resolved_expert_d_ff
    if spec.family == "moe":
        attn = _dense_layer(D, D, kv_dim, 0, T)
        _add(out, attn)
        k = spec.top_k if spec.routing == "topk" else 1
        out["ffn"] = 6.0 * D * F * (k + (1 if spec.shared_expert else 0))
        out["router"] = 2.0 * D * E if spec.routing == "topk" else 0.0
        return out
    # sectional layer: everything below runs on T/r positions, so divide by r per original token
    r, S = spec.seq_reduction, spec.section_dim
    Ts = T // r
    per_pos: dict[str, float] = dict.fromkeys(COMPONENTS, 0.0)
    if r > 1 and spec.seq_pool == "linear":
        per_pos["pool"] = 2.0 * r * D * D
    if spec.pre_expert:
        _add(per_pos, _dense_layer(D, D, kv_dim, spec.d_ff, Ts))
    if spec.expert_attention:
        c, h, kh = spec.section_head_dim, spec.section_heads, spec.section_kv_heads
        _add(per_pos, _dense_layer(S, h * c, kh * c, 0, Ts), scale=E)
    k = spec.top_k if spec.routing == "topk" else 1
    per_pos["ffn"] += E * k * 6.0 * S * F
    if spec.routing == "topk":
        per_pos["router"] += E * 2.0 * S * E
    if spec.merge_proj:
        per_pos["merge"] += 2.0 * D * D
    _add(out, per_pos, scale=1.0 / r)
    return out


def flops_breakdown(spec: ModelSpec) -> dict[str, float]:
    """Forward matmul FLOPs per token, summed over layers, by component, plus ``total``."""
    out: dict[str, float] = dict.fromkeys(COMPONENTS, 0.0)
    for layer in range(spec.n_layers):
        _add(out, layer_flops(spec, layer))
    out["lm_head"] = 2.0 * spec.d_model * spec.vocab_size
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
    plus the head if untied), ``non_embedding`` and FLOP-equivalent ``active`` (see module doc)."""
    D, V = spec.d_model, spec.vocab_size
    kv_dim = spec.n_kv_heads * spec.head_dim
    total = V * D * (1 if spec.tie_embeddings else 2) + D  # embeddings (+ head) + final norm
    for layer in range(spec.n_layers):
        if spec.family == "dense" or (spec.family == "sectional" and not spec.is_sectional_layer(layer)):
            total += _dense_layer_params(D, kv_dim, spec.d_ff)
            continue
        E, F = spec.n_experts, spec.resolved_expert_d_ff
        if spec.family == "moe":
            total += _dense_layer_params(D, kv_dim, 0) + E * 3 * D * F
            total += D * E if spec.routing == "topk" else 0
            total += 3 * D * F if spec.shared_expert else 0
            continue
        r, S = spec.seq_reduction, spec.section_dim
        c, h, kh = spec.section_head_dim, spec.section_heads, spec.section_kv_heads
        total += r * D * D if (r > 1 and spec.seq_pool == "linear") else 0
        total += _dense_layer_params(D, kv_dim, spec.d_ff) if spec.pre_expert else 0
        if spec.expert_attention:
            total += E * (S + S * (h * c + 2 * kh * c) + h * c * S)  # norm, q/kv, out per section
        total += E * (S + 3 * S * F)  # ffn norm + SwiGLU per expert
        total += S * E if spec.routing == "topk" else 0
        total += D * D if spec.merge_proj else 0
    embedding = V * D * (1 if spec.tie_embeddings else 2)
    fwd = flops_breakdown(spec)
    active = (fwd["total"] - fwd["attn_scores"] - fwd["lm_head"]) / 2.0
    return {"total": float(total), "embedding": float(embedding), "non_embedding": float(total - embedding), "active": active}


def wan_triad(spec: ModelSpec) -> dict[str, float]:
    """(M, N_a, N) of Wan et al. 2026 (seed 003): training FLOPs per token, active and total
    non-embedding parameters."""
    p = param_counts(spec)
    return {"M": flops_per_token(spec, training=True), "N_a": p["active"], "N": p["non_embedding"]}
