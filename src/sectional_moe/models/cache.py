"""Inference caches for incremental decoding (prefill once, then one token per step).

A :class:`DecodeCache` holds one entry per decoder block:

* dense / token-MoE block: a :class:`KVCache` of its attention (full resolution);
* sectional block: a :class:`SectionalCache`, i.e. the KV caches of the pre-expert layer and of
  the section attention, both at *short* resolution (one entry per completed short position),
  plus the last r-1 layer inputs (what the next pooling group still needs) and the latest delta.

Caches are filled in place by ``LanguageModel.forward(ids, cache=cache)``, which reads the new
tokens' positions from the cache itself; training never passes a cache, so its numerics do not
depend on this module. Tensors are allocated lazily at the first write, with the dtype the
projections produce (bf16 under autocast), on the device of the model.

Shape legend: B batch, K kv heads, L max cached positions, Dh head width, D d_model, r seq_reduction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVCache:
    """Rotated keys and values of one attention layer, preallocated (B, K, L, Dh); ``length`` filled."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, K, n, Dh) at positions length..length+n-1; return all cached (B, K, length+n, Dh)."""
        B, K, n, Dh = k.shape
        end = self.length + n
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len={self.max_len}; "
                             "re-prefill a shorter context or build the cache with a larger max_len")
        if self.k is None:
            self.k = k.new_empty(B, K, self.max_len, Dh)
            self.v = v.new_empty(B, K, self.max_len, Dh)
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reset(self) -> None:
        """Forget every cached position (the tensors are kept and overwritten)."""
        self.length = 0


@dataclass
class SectionalCache:
    """State of one sectional block between decode steps.

    ``tail``: the last r-1 inputs of the block (B, r-1, D); zeros before the sequence start, exactly
    the zero padding of the training-time right shift. ``delta``: the update of the newest
    completed short position (B, 1, D), added to every output position it covers.
    """

    pre: KVCache | None  # pre-expert attention, short resolution
    experts: KVCache | None  # section attention of all E experts, short resolution
    length: int = 0  # full-resolution positions seen by this block
    tail: torch.Tensor | None = None
    delta: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget every position seen (the KV tensors are kept and overwritten)."""
        self.length, self.tail, self.delta = 0, None, None
        for kv in (self.pre, self.experts):
            if kv is not None:
                kv.reset()


@dataclass
class DecodeCache:
    """Per-block caches of a :class:`~sectional_moe.models.LanguageModel`; ``pos`` tokens seen so far."""

    layers: list[KVCache | SectionalCache]
    max_len: int
    pos: int = 0

    def reset(self) -> None:
        """Forget every cached position (tensors are kept and overwritten)."""
        self.pos = 0
        for c in self.layers:
            c.reset()
