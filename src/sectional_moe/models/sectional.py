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

Where the pre-expert layer runs is not stated by the paper ("recomputes attention across
tokens" and "reduces the sequence length"); ``model.pre_expert_resolution`` chooses the reading
(all three are reconstructions [I], shared/paper-notes.md, "where the pre-expert layer runs"):

* ``short`` (above): it runs on the shortened sequence, T/r queries and keys;
* ``full``: it runs at full length on the residual stream, its output *is* the new stream h; the
  experts work on shorten(h) and their output is upsampled and added: out = h + upsample(u);
* ``cross`` (Funnel-style): the T/r short positions are queries over the full-length keys up to
  their group's last token (:class:`CrossPreExpert`), then the experts as in ``short``.

Causality: short position j pools tokens j*r-r+1 .. j*r (never a later one) and is copied back
to positions j*r .. j*r+r-1, all >= j*r; attention at short resolution is causal over short
positions, and a cross query j sees keys up to j*r only. So no output at position t depends on
a token after t (tests check every family and reading).

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

from sectional_moe.models.blocks import (
    Attention,
    RMSNorm,
    Rope,
    SwiGLU,
    TransformerBlock,
    apply_rope,
    cached_attention,
    causal_attention,
    rms_norm,
)
from sectional_moe.models.cache import KVCache, SectionalCache
from sectional_moe.models.experts import ExpertFFN, causal_priority
from sectional_moe.models.routers import LayerAux, build_router, rename_legacy_table
from sectional_moe.models.spec import ModelSpec


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
        self.capacity_factor = spec.capacity_factor
        self.attn = SectionAttention(spec) if spec.expert_attention else None
        self.attn_norm = nn.Parameter(torch.ones(E, 1, S)) if spec.expert_attention else None
        self.ffn_norm = nn.Parameter(torch.ones(E, 1, S))
        self.ffn = ExpertFFN(E, S, spec.resolved_expert_d_ff)
        # slices of section e form item group e; topk shares one router over all sections (SliceMoE-style),
        # hash maps (token id, section) -> expert with the token of a short position the newest it merges
        self.router = build_router(spec, layer, dim=S, groups=E)
        self.register_load_state_dict_pre_hook(rename_legacy_table)

    def forward(self, s: torch.Tensor, ids: torch.Tensor, rope: Rope, cache: KVCache | None = None) -> tuple[torch.Tensor, LayerAux | None]:
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

    def _ffn(self, x_ENS: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, LayerAux | None]:
        E, N, S = x_ENS.shape
        x_MS = x_ENS.reshape(E * N, S)  # M = E*N slices, section-major
        routing = self.router(x_MS, ids)
        capacity = self.capacity_factor if self.training else None  # evaluation is dropless, as in token MoE
        priority = None
        if capacity is not None and not routing.dedicated:  # ids is (B, T) at this layer's (shortened) length
            priority = causal_priority(batch=ids.shape[0], seq=ids.shape[1], groups=E, group_major=True)
        y, dropped = self.ffn(x_MS, routing, capacity, priority)
        return y.view(E, N, S), routing.layer_aux(dropped)


class CrossPreExpert(nn.Module):
    """The pre-expert layer read Funnel-style (``pre_expert_resolution=cross``): the T/r short
    positions are the queries and attend to the *full-length* keys up to their group's last token
    (short position j: keys at positions <= j*r), then a SwiGLU FFN at short length.

    It has the weights of a dense decoder layer (one norm serves queries and keys); its cost is
    (T/r) d^2 for Q, 2 T d_kv d for K and V, and (T/r) x T attention scores.
    """

    def __init__(self, spec: ModelSpec, r: int):
        super().__init__()
        self.r = r
        self.attn_norm = RMSNorm(spec.d_model, spec.norm_eps)
        self.attn = Attention(spec)
        self.ffn_norm = RMSNorm(spec.d_model, spec.norm_eps)
        self.ffn = SwiGLU(spec.d_model, spec.d_ff)

    def forward(self, s0: torch.Tensor, x: torch.Tensor, rope: Rope, j0: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        """s0 (B, m, D): short positions j0 .. j0+m-1; x (B, n, D): the full-length positions after the
        ``cache.length`` cached ones (all of x without a cache). Returns the updated short positions (B, m, D)."""
        a = self.attn
        B, m, _ = s0.shape
        n = x.shape[1]
        k_start = cache.length if cache is not None else 0
        k, v = a.wkv(self.attn_norm(x)).view(B, n, 2, a.n_kv_heads, a.head_dim).permute(2, 0, 3, 1, 4)  # (B, K, n, Dh)
        k = apply_rope(k, *rope(n, a.head_dim, 1, start=k_start))
        if cache is not None:
            k, v = cache.append(k, v)  # every key so far (B, K, k_start + n, Dh)
        if m == 0:  # no short position completed by this chunk: its keys are cached for the next ones
            return s0
        q = a.wq(self.attn_norm(s0)).view(B, m, a.n_heads, a.head_dim).transpose(1, 2)  # (B, H, m, Dh)
        q = apply_rope(q, *rope(m, a.head_dim, self.r, start=j0))  # short position j sits at position j*r
        last_key_BM = (torch.arange(j0, j0 + m, device=x.device) * self.r).unsqueeze(1)  # (m, 1): its group's last token
        mask = torch.arange(k.shape[2], device=x.device).unsqueeze(0) <= last_key_BM  # (m, keys)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
        s = s0 + a.wo(y.transpose(1, 2).reshape(B, m, -1))
        return s + self.ffn(self.ffn_norm(s))


class SectionalMoEBlock(nn.Module):
    """Shorten -> pre-expert layer -> E section experts -> merge -> upsample, as a residual block.

    ``pre_expert_resolution`` says where the pre-expert layer runs (see the module docstring):
    ``short`` on the shortened sequence, ``full`` on the full-length residual stream before the
    shortening, ``cross`` as short queries over full-length keys.
    """

    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        r = spec.seq_reduction
        self.r, self.resolution = r, spec.pre_expert_resolution
        self.pool = nn.Linear(r * spec.d_model, spec.d_model, bias=False) if r > 1 and spec.seq_pool == "linear" else None
        self.pre_expert: nn.Module | None = None
        if spec.pre_expert:
            if self.resolution == "cross":
                self.pre_expert = CrossPreExpert(spec, r)
            else:  # short: at T/r positions with the original position scale; full: at every position
                self.pre_expert = TransformerBlock(spec, rope_stride=r if self.resolution == "short" else 1)
        self.experts = SectionExperts(spec, layer, rope_stride=r)
        self.merge = nn.Linear(spec.d_model, spec.d_model, bias=False) if spec.merge_proj else None

    @property
    def _full_pre_expert(self) -> bool:
        return self.pre_expert is not None and self.resolution == "full"

    def new_cache(self, max_len: int) -> SectionalCache:
        """Decode state for up to ``max_len`` full-resolution positions (ceil(max_len / r) short ones)."""
        short = -(-max_len // self.r)
        pre = None
        if self.pre_expert is not None:  # short: one entry per short position; full and cross: per token
            pre = KVCache(short if self.resolution == "short" else max_len)
        return SectionalCache(pre=pre, experts=KVCache(short) if self.experts.attn is not None else None)

    def _pre_expert_short(self, s0: torch.Tensor, x: torch.Tensor, ids_short: torch.Tensor, rope: Rope,
                          j0: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        """The short positions after the pre-expert layer (``s0`` itself when it runs at full length or not at all)."""
        if self.pre_expert is None or self.resolution == "full":
            return s0
        if self.resolution == "cross":
            return self.pre_expert(s0, x, rope, j0, cache)
        return self.pre_expert(s0, ids_short, rope, cache)[0]

    def forward(self, x: torch.Tensor, ids: torch.Tensor, rope: Rope,
                cache: SectionalCache | None = None) -> tuple[torch.Tensor, LayerAux | None]:
        """x (B, T, D), ids (B, T) -> (B, T, D), aux. With a ``cache``, x and ids are the n new
        positions after ``cache.length`` seen ones (any n, any alignment to r; see the module doc)."""
        if cache is not None:
            return self._forward_cached(x, ids, rope, cache)
        # the residual stream: x, or the full-length pre-expert layer's output
        stream = self.pre_expert(x, ids, rope)[0] if self._full_pre_expert else x  # (B, T, D)
        s0 = shorten_causal(stream, self.r, self.pool)  # (B, T/r, D)
        ids_short = ids[:, :: self.r]  # newest token merged into each short position
        s = self._pre_expert_short(s0, x, ids_short, rope)
        u, aux = self.experts(s, ids_short, rope)
        if self.merge is not None:
            u = self.merge(u)
        delta = u if s is s0 else (s - s0) + u
        return stream + upsample(delta, self.r), aux

    def _forward_cached(self, x: torch.Tensor, ids: torch.Tensor, rope: Rope, cache: SectionalCache) -> tuple[torch.Tensor, LayerAux | None]:
        r, (B, n, D), p0 = self.r, x.shape, cache.length  # new positions p0 .. p0+n-1
        stream = self.pre_expert(x, ids, rope, cache.pre)[0] if self._full_pre_expert else x
        if cache.tail is None:  # before the sequence start: the zero padding of the right shift
            cache.tail = stream.new_zeros(B, r - 1, D)
        window = torch.cat([cache.tail, stream], dim=1)  # (B, r-1+n, D): the stream at p0-r+1 .. p0+n-1
        cache.tail = window[:, window.shape[1] - (r - 1):]
        cache.length = p0 + n
        # short positions completed by this chunk: j with p0 <= j*r <= p0+n-1
        j0, j1 = -(-p0 // r), (p0 + n - 1) // r
        m = max(0, j1 - j0 + 1)
        aux: LayerAux | None = None
        deltas = [cache.delta] if p0 % r else []  # short position p0 // r was completed earlier
        if r == 1:
            s0 = stream
        else:  # window index j0*r - p0 holds token j0*r-r+1, the first one short position j0 merges
            first = j0 * r - p0
            groups = window[:, first : first + m * r].reshape(B, m, r, D)  # as in shorten_causal
            s0 = groups.mean(dim=2) if self.pool is None else self.pool(groups.reshape(B, m, r * D))  # (B, m, D)
        ids_short = ids[:, j0 * r - p0 :: r][:, :m]  # token j*r, the newest merged (ids[:, ::r])
        cross_keys = cache.pre if self.resolution == "cross" else None
        if m > 0 or cross_keys is not None:  # cross attention caches every chunk's keys, complete or not
            s = self._pre_expert_short(s0, x, ids_short, rope, j0, cache.pre)
        if m > 0:
            u, aux = self.experts(s, ids_short, rope, cache.experts)
            if self.merge is not None:
                u = self.merge(u)
            deltas.append(u if s is s0 else (s - s0) + u)
        delta = torch.cat(deltas, dim=1)  # short positions p0 // r .. j1
        cache.delta = delta[:, -1:]
        offset = p0 % r  # output p0 sits at this offset inside short position p0 // r
        return stream + upsample(delta, r)[:, offset : offset + n], aux
