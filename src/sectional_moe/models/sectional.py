"""The sectional MoE block of Sane 2025 (arXiv 2503.20750), as reconstructed in shared/paper-notes.md.

The paper splits the *embedding dimension* of every token into E sections and gives each section
a dedicated expert; a full-width *pre-expert transformer layer* in front recomputes attention
across tokens and shortens the sequence. What the paper leaves open is decided here, each choice
a config key (defaults in brackets):

    x (B, T, D)
    s0 = shorten(x)               causal: shift right by r-1, merge groups of r tokens  [mean]
                                  -> (B, T/r, D); r = seq_reduction                     [r = E]
    s  = pre_expert(s0)           full-width attention + SwiGLU at length T/r           [on]
    h  = s.view(B, T/r, E, D/E)   section the embedding dimension
    u  = experts(h)               expert e on section e: attention + SwiGLU on width D/E [attn on]
                                  (routing=topk|hash: the FFN part is routed per slice)
    u  = merge(concat(u))         optional D x D projection                             [off]
    out = x + upsample((s - s0) + u)   repeat each short position r times; the residual is the
                                       full-resolution stream x

Causality: short position j pools tokens j*r-r+1 .. j*r (never a later one) and is copied back
to positions j*r .. j*r+r-1, all >= j*r; attention at short resolution is causal over short
positions. So no output at position t depends on a token after t (tests check every family).

Incremental decoding (``cache=``, see :meth:`SectionalMoEBlock.forward`) follows from the same
index map: short position j is complete once token j*r has arrived. So when token t arrives and
t % r == 0, the block pools the last r inputs (kept in a small tail; zeros before the sequence
start, as the training shift pads), runs the pre-expert layer and the experts for that one short
position against their short-resolution KV caches and keeps its delta; every output t is
x_t + delta_{t // r}. When t % r != 0 the block costs nothing but the addition.

All E experts run as batched GEMMs over a stacked expert axis; there is no Python loop over
experts. With E=1, r=1, pre_expert off and segment_fixed routing the block *is* a dense
pre-norm block (tests check this equality).

Shape legend: B batch, T tokens (shortened), E experts = sections, S = D/E section width,
N = B*T items per section, h/k query/kv heads per section, c head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sectional_moe.models.blocks import Rope, TransformerBlock, cached_attention, causal_attention, rms_norm
from sectional_moe.models.cache import KVCache, SectionalCache
from sectional_moe.models.routing import (
    ExpertFFN,
    causal_priority,
    expert_counts,
    hash_table,
    load_balance_loss,
    route_topk,
    router_z_loss,
)
from sectional_moe.spec import ModelSpec


def shorten_causal(x: torch.Tensor, r: int, pool: nn.Linear | None = None) -> torch.Tensor:
    """(B, T, D) -> (B, T/r, D). Shift right by r-1 (hourglass, Nawrot et al. 2021) so short
    position j merges tokens j*r-r+1 .. j*r, then average them (or apply a learned r*D -> D map)."""
    if r == 1:
        return x
    B, T, D = x.shape
    shifted = F.pad(x, (0, 0, r - 1, 0))[:, :T]  # (B, T, D): shifted[i] = x[i - r + 1]
    groups = shifted.view(B, T // r, r, D)
    if pool is None:
        return groups.mean(dim=2)
    return pool(groups.reshape(B, T // r, r * D))


def upsample(y: torch.Tensor, r: int) -> torch.Tensor:
    """(B, T/r, D) -> (B, T, D): short position j is copied to positions j*r .. j*r+r-1."""
    return y if r == 1 else y.repeat_interleave(r, dim=1)


class SectionAttention(nn.Module):
    """E independent causal attentions, expert e on section e, as one batched GEMM per projection
    and one SDPA call over all E*h heads (the block-diagonal form of E small attentions)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        E, S = spec.n_experts, spec.section_dim
        self.h, self.k, self.c = spec.section_heads, spec.section_kv_heads, spec.section_head_dim
        self.wq = nn.Parameter(torch.empty(E, S, self.h * self.c))
        self.wkv = nn.Parameter(torch.empty(E, S, 2 * self.k * self.c))
        self.wo = nn.Parameter(torch.empty(E, self.h * self.c, S))
        for w in (self.wq, self.wkv, self.wo):
            nn.init.normal_(w, std=0.02)

    def forward(self, x_ENS: torch.Tensor, B: int, T: int, rope: Rope, stride: int,
                cache: KVCache | None = None) -> torch.Tensor:
        E, h, k, c = x_ENS.shape[0], self.h, self.k, self.c
        q = torch.bmm(x_ENS, self.wq).view(E, B, T, h, c).permute(1, 0, 3, 2, 4).reshape(B, E * h, T, c)
        kv = torch.bmm(x_ENS, self.wkv).view(E, B, T, 2, k, c).permute(3, 1, 0, 4, 2, 5).reshape(2, B, E * k, T, c)
        if cache is None:
            y = causal_attention(q, kv[0], kv[1], *rope(T, c, stride))  # (B, E*h, T, c)
        else:  # T new short positions; the cache holds the E*k kv heads of all experts
            y = cached_attention(q, kv[0], kv[1], *rope(T, c, stride, start=cache.length), cache)
        y = y.view(B, E, h, T, c).permute(1, 0, 3, 2, 4).reshape(E, B * T, h * c)
        return torch.bmm(y, self.wo)  # (E, N, S)


class SectionExperts(nn.Module):
    """E dedicated experts over the E sections: pre-norm attention (optional) then a SwiGLU FFN,
    each with its own residual. Returns the experts' update (their output minus their input)."""

    def __init__(self, spec: ModelSpec, layer: int, rope_stride: int):
        super().__init__()
        E, S = spec.n_experts, spec.section_dim
        self.E, self.eps, self.rope_stride = E, spec.norm_eps, rope_stride
        self.routing, self.top_k = spec.routing, spec.top_k if spec.routing == "topk" else 1
        self.capacity_factor = spec.capacity_factor
        self.attn = SectionAttention(spec) if spec.expert_attention else None
        self.attn_norm = nn.Parameter(torch.ones(E, 1, S)) if spec.expert_attention else None
        self.ffn_norm = nn.Parameter(torch.ones(E, 1, S))
        self.ffn = ExpertFFN(E, S, spec.resolved_expert_d_ff)
        if self.routing == "topk":
            self.router = nn.Linear(S, E, bias=False)  # shared by all sections (SliceMoE-style)
        elif self.routing == "hash":
            # (token id, section) -> expert; the token of a short position is the newest it merges
            self.register_buffer("table", hash_table(rows=spec.vocab_size, cols=E, num_experts=E, seed=spec.hash_seed + layer))

    def forward(self, s: torch.Tensor, ids: torch.Tensor, rope: Rope, cache: KVCache | None = None) -> tuple[torch.Tensor, dict]:
        B, T, D = s.shape
        E, S = self.E, D // self.E
        x = s.view(B, T, E, S).permute(2, 0, 1, 3).reshape(E, B * T, S)  # (E, N, S): section-major
        update = torch.zeros_like(x)
        if self.attn is not None:
            update = self.attn(rms_norm(x, self.attn_norm, self.eps), B, T, rope, self.rope_stride, cache)
            x = x + update
        f, aux = self._ffn(rms_norm(x, self.ffn_norm, self.eps), ids)
        update = update + f
        return update.view(E, B, T, S).permute(1, 2, 0, 3).reshape(B, T, D), aux

    def _ffn(self, x_ENS: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if self.routing == "segment_fixed":
            return self.ffn.forward_dedicated(x_ENS), {}
        E, N, S = x_ENS.shape
        x_MS = x_ENS.reshape(E * N, S)  # M = E*N slices, section-major
        aux: dict[str, torch.Tensor] = {}
        if self.routing == "topk":
            with torch.autocast(device_type=x_MS.device.type, enabled=False):
                logits = F.linear(x_MS.float(), self.router.weight.float())  # (M, E)
            weights, expert_ids, probs = route_topk(logits, self.top_k)
            counts = expert_counts(expert_ids, E)
            aux["lb_loss"] = load_balance_loss(probs_NE=probs, counts_E=counts, top_k=self.top_k)
            aux["z_loss"] = router_z_loss(logits)
        else:
            expert_ids = self.table[ids.reshape(-1)].t().reshape(E * N, 1)  # (M, 1), section-major
            weights = torch.ones_like(expert_ids, dtype=x_MS.dtype)
            counts = expert_counts(expert_ids, E)
        priority = None
        if self.capacity_factor is not None:  # ids is (B, T) at this layer's (shortened) length
            priority = causal_priority(batch=ids.shape[0], seq=ids.shape[1], groups=E, group_major=True)
        y, dropped = self.ffn.forward_routed(x_MS, expert_ids, weights, counts, self.capacity_factor, priority)
        aux["counts"] = counts.detach()
        if self.capacity_factor is not None:
            aux["drop_frac"] = dropped
        return y.view(E, N, S), aux


class SectionalMoEBlock(nn.Module):
    """Shorten -> pre-expert layer -> E section experts -> merge -> upsample, as a residual block."""

    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        r = spec.seq_reduction
        self.r = r
        self.pool = nn.Linear(r * spec.d_model, spec.d_model, bias=False) if r > 1 and spec.seq_pool == "linear" else None
        self.pre_expert = TransformerBlock(spec, rope_stride=r) if spec.pre_expert else None
        self.experts = SectionExperts(spec, layer, rope_stride=r)
        self.merge = nn.Linear(spec.d_model, spec.d_model, bias=False) if spec.merge_proj else None

    def new_cache(self, max_len: int) -> SectionalCache:
        """Decode state for up to ``max_len`` full-resolution positions (ceil(max_len / r) short ones)."""
        short = -(-max_len // self.r)
        return SectionalCache(pre=KVCache(short) if self.pre_expert is not None else None,
                              experts=KVCache(short) if self.experts.attn is not None else None)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, rope: Rope,
                cache: SectionalCache | None = None) -> tuple[torch.Tensor, dict]:
        """x (B, T, D), ids (B, T) -> (B, T, D), aux. With a ``cache``, x and ids are the n new
        positions after ``cache.length`` seen ones (any n, any alignment to r; see the module doc)."""
        if cache is not None:
            return self._forward_cached(x, ids, rope, cache)
        s0 = shorten_causal(x, self.r, self.pool)  # (B, T/r, D)
        ids_short = ids[:, :: self.r]  # newest token merged into each short position
        s = s0 if self.pre_expert is None else self.pre_expert(s0, ids_short, rope)[0]
        u, aux = self.experts(s, ids_short, rope)
        if self.merge is not None:
            u = self.merge(u)
        delta = u if self.pre_expert is None else (s - s0) + u
        return x + upsample(delta, self.r), aux

    def _forward_cached(self, x: torch.Tensor, ids: torch.Tensor, rope: Rope, cache: SectionalCache) -> tuple[torch.Tensor, dict]:
        r, (B, n, D), p0 = self.r, x.shape, cache.length  # new positions p0 .. p0+n-1
        if cache.tail is None:  # before the sequence start: the zero padding of the right shift
            cache.tail = x.new_zeros(B, r - 1, D)
        window = torch.cat([cache.tail, x], dim=1)  # (B, r-1+n, D): inputs at p0-r+1 .. p0+n-1
        cache.tail = window[:, window.shape[1] - (r - 1):]
        cache.length = p0 + n
        # short positions completed by this chunk: j with p0 <= j*r <= p0+n-1
        j0, j1 = -(-p0 // r), (p0 + n - 1) // r
        m = j1 - j0 + 1
        aux: dict = {}
        deltas = [cache.delta] if p0 % r else []  # short position p0 // r was completed earlier
        if m > 0:
            if r == 1:
                s0 = x
            else:  # window index j0*r - p0 holds token j0*r-r+1, the first one short position j0 merges
                first = j0 * r - p0
                groups = window[:, first : first + m * r].reshape(B, m, r, D)  # as in shorten_causal
                s0 = groups.mean(dim=2) if self.pool is None else self.pool(groups.reshape(B, m, r * D))  # (B, m, D)
            ids_short = ids[:, j0 * r - p0 :: r][:, :m]  # token j*r, the newest merged (ids[:, ::r])
            s = s0 if self.pre_expert is None else self.pre_expert(s0, ids_short, rope, cache.pre)[0]
            u, aux = self.experts(s, ids_short, rope, cache.experts)
            if self.merge is not None:
                u = self.merge(u)
            deltas.append(u if self.pre_expert is None else (s - s0) + u)
        delta = torch.cat(deltas, dim=1)  # short positions p0 // r .. j1
        cache.delta = delta[:, -1:]
        offset = p0 % r  # output p0 sits at this offset inside short position p0 // r
        return x + upsample(delta, r)[:, offset : offset + n], aux
