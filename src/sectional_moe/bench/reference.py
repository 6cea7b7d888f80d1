"""A REFERENCE model, not one of ours: the plainest GPT-2-style decoder, to hold our dense model against.

The benchmark trains it in the same bare loop as our dense model (same batch, optimiser,
precision and loss) and reports our tokens/s as a multiple of its own. It is written from the
GPT-2 description (Radford et al. 2019): learned absolute positions, pre-norm LayerNorm, one
fused QKV projection, causal SDPA, a 4x GELU MLP, a final LayerNorm and a head tied to the
embedding. Nothing in it is tuned; it is the speed floor a LLaMA-style model should match.

*Equal FLOPs*: per layer GPT-2 has 4 d^2 attention + 8 d^2 MLP = 12 d^2 matmul parameters. Our
dense block with GQA (n_kv_heads = n_heads / 2) has q d^2 + kv d^2 + o d^2 = 3 d^2 attention and a
SwiGLU of width 3d: 9 d^2, also 12 d^2, and the same attention-score FLOPs. So at equal
(d_model, n_layers, n_heads, seq_len, vocab) the two do the same matmul work per token; the
difference is everything else (norms, RoPE vs a position table, activations, the loss).

Imports: torch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _RefBlock(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d, bias=False)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.ln2 = nn.LayerNorm(d, bias=False)
        self.fc = nn.Linear(d, 4 * d, bias=False)
        self.out = nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class ReferenceGPT(nn.Module):
    """REFERENCE (benchmark only): a minimal GPT-2-style LM; ``forward(ids) -> (logits, [])`` like ours."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, seq_len: int):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(_RefBlock(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model, bias=False)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.wte.weight
        for p in self.parameters():  # GPT-2 init: N(0, 0.02) matrices (denormal-free), unit norms
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, list]:
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x)), []


def reference_loss(model: ReferenceGPT, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in fp32, as :func:`~sectional_moe.models.loss.lm_loss` computes ours."""
    logits, _ = model(batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
