"""The decoder-only language model shared by the three families.

Embedding -> n_layers blocks -> RMSNorm -> LM head (optionally tied to the embedding). Only the
blocks differ by family:

* ``dense``: pre-norm transformer blocks (RoPE, GQA attention, SwiGLU);
* ``moe``: the same blocks with the FFN replaced by a token-routed MoE FFN;
* ``sectional``: every ``sectional_every``-th block is a :class:`SectionalMoEBlock`, the others dense.

``forward(ids)`` returns ``(logits, aux)`` where ``aux`` holds one entry per block: the routed
layer's :class:`~sectional_moe.models.routers.LayerAux` (router losses, expert counts) or None;
:func:`~sectional_moe.models.loss.lm_loss` turns them into the weighted training loss.

Incremental decoding: ``cache = model.init_cache()``, then ``model(prompt, cache=cache)``
(prefill) and ``model(next_ids, cache=cache)`` once per generated token (decode); each call takes
only the new tokens and returns their logits, equal to the full forward's at those positions
(tests check every family). A ``capacity_factor`` drops assignments in training only, so
evaluation and decoding are dropless and cached calls equal one full pass there too.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sectional_moe.models.blocks import Rope, RMSNorm, TransformerBlock
from sectional_moe.models.cache import DecodeCache
from sectional_moe.models.moe import TokenMoEFFN
from sectional_moe.models.routers import LayerAux
from sectional_moe.models.sectional import SectionalMoEBlock
from sectional_moe.models.spec import ModelSpec

# parameters that write into the residual stream get the GPT-2 scaled init std/sqrt(2 * n_layers)
_RESIDUAL_OUTPUTS = ("wo", "w2", "merge")


def build_block(spec: ModelSpec, layer: int) -> nn.Module:
    if spec.family == "moe":
        return TransformerBlock(spec, ffn=TokenMoEFFN(spec, layer))
    if spec.is_sectional_layer(layer):
        return SectionalMoEBlock(spec, layer)
    return TransformerBlock(spec)


class LanguageModel(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab_size, spec.d_model)
        self.blocks = nn.ModuleList(build_block(spec, i) for i in range(spec.n_layers))
        self.norm = RMSNorm(spec.d_model, spec.norm_eps)
        self.head = nn.Linear(spec.d_model, spec.vocab_size, bias=False)
        if spec.tie_embeddings:
            self.head.weight = self.embed.weight
        head_dims = {spec.head_dim}
        if spec.family == "sectional" and spec.expert_attention:
            head_dims.add(spec.section_head_dim)
        self.rope = Rope(head_dims, spec.seq_len, spec.rope_theta)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, init_std) for every matrix, scaled by 1/sqrt(2 L) for residual outputs; norms = 1."""
        std = self.spec.init_std
        out_std = std / math.sqrt(2 * self.spec.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.ones_(p)
            elif p.dim() == 3 and p.shape[1] == 1:  # per-section norm weights (E, 1, S)
                nn.init.ones_(p)
            else:
                parts = name.split(".")
                residual_out = any(part in _RESIDUAL_OUTPUTS for part in parts[-2:])
                nn.init.normal_(p, mean=0.0, std=out_std if residual_out else std)

    def init_cache(self, max_len: int | None = None) -> DecodeCache:
        """An empty decode cache for up to ``max_len`` positions (default and at most ``seq_len``,
        the extent of the RoPE tables the model was trained with)."""
        max_len = self.spec.seq_len if max_len is None else int(max_len)
        if not 0 < max_len <= self.spec.seq_len:
            raise ValueError(f"max_len={max_len} must be in [1, seq_len={self.spec.seq_len}]")
        return DecodeCache([block.new_cache(max_len) for block in self.blocks], max_len)

    def forward(self, ids: torch.Tensor, cache: DecodeCache | None = None) -> tuple[torch.Tensor, list[LayerAux | None]]:
        """ids (B, T) int64 -> logits (B, T, V), per-block :class:`LayerAux` (None for unrouted blocks).

        With a ``cache``, ids are the T tokens that follow the ``cache.pos`` already seen; the cache
        is updated in place.
        """
        x = self.embed(ids)  # (B, T, D)
        aux: list[LayerAux | None] = []
        if cache is None:
            for block in self.blocks:
                x, a = block(x, ids, self.rope)
                aux.append(a)
            return self.head(self.norm(x)), aux
        if cache.pos + ids.shape[1] > cache.max_len:
            raise ValueError(f"{cache.pos} cached + {ids.shape[1]} new tokens > max_len={cache.max_len}; reset or re-prefill the cache")
        for block, layer_cache in zip(self.blocks, cache.layers):
            x, a = block(x, ids, self.rope, layer_cache)
            aux.append(a)
        cache.pos += ids.shape[1]
        return self.head(self.norm(x)), aux

    def num_parameters(self) -> int:
        """Distinct parameters (a tied embedding/head counts once)."""
        return sum(p.numel() for p in self.parameters())
