"""Generation with the KV cache: sampling, and the inference throughput of its two phases.

* **prefill** (:func:`measure_prefill`): one cache-filling forward pass over a full context of
  ``seq_len`` tokens (tokens/s; median over repeated passes);
* **decode** (:func:`measure_decode`): ``new_tokens`` greedy tokens generated one cached step at a
  time after a prompt of ``seq_len - new_tokens`` tokens (tokens/s of the timed steps only). Each
  step processes one new position per layer against the cached keys/values. A sectional layer
  does its pre-expert and expert work only on the steps that complete a short position (every
  r-th token) and adds its stored delta on the others, so r-fold shortening lowers its amortised
  decode cost too, at the price of uneven per-token latency.

Imports: torch, :mod:`sectional_moe.models`, :mod:`sectional_moe.device`.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from sectional_moe.device import autocast, sync
from sectional_moe.errors import ConfigError
from sectional_moe.models.flops import flops_per_token
from sectional_moe.models.lm import LanguageModel
from sectional_moe.models.spec import ModelSpec

DECODE_NOTE = ("KV-cached decode: one new position per step against cached keys/values; a sectional layer runs "
               "its pre-expert layer and experts only on steps completing a short position (every r-th token), "
               "so flops_per_token is the analytic forward cost per token, amortised over r steps")


def next_token_logits(model: LanguageModel, ids: torch.Tensor) -> torch.Tensor:
    """Cache-free logits (B, V) for the token after ``ids`` (B, t), seeing at most the last
    ``seq_len`` tokens: a full forward pass (the reference that cached decoding must match).

    A sectional model shortens the sequence r-fold, so its input length must be a multiple of r:
    a shorter context is right-padded, which cannot change the logits at position t-1 (every
    model is causal; tests check it). Token 0 pads.
    """
    spec = model.spec
    ids = ids[:, -spec.seq_len:]
    t = ids.shape[1]
    r = spec.seq_reduction if spec.family == "sectional" else 1
    pad = (-t) % r
    if pad:
        ids = F.pad(ids, (0, pad), value=0)
    logits, _ = model(ids)
    return logits[:, t - 1].float()


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B, 1) ids: greedy at temperature 0, else softmax(logits / T) over the top k."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).to(logits.device)


def restart_length(seq_len: int) -> int:
    """Tokens kept when a generation outgrows the context: the newest half of it."""
    return max(1, seq_len // 2)


@torch.inference_mode()
def generate(model: LanguageModel, ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.8,
             top_k: int | None = 50, seed: int = 0, precision: str = "auto") -> torch.Tensor:
    """Append ``max_new_tokens`` sampled tokens to ``ids`` (B, t) with KV-cached decoding.

    The prompt (its last ``seq_len`` tokens) is prefilled once, then each token is one cached step.
    The model has RoPE tables and, for the sectional family, short-position groups anchored at
    position 0 for ``seq_len`` positions only, so when the context is full it restarts from the
    newest :func:`restart_length` tokens (one re-prefill) instead of sliding by one token.
    """
    device, seq_len = ids.device, model.spec.seq_len
    generator = torch.Generator().manual_seed(seed)
    cache = model.init_cache()
    with autocast(device, precision):
        logits = model(ids[:, -seq_len:], cache=cache)[0][:, -1]
        for i in range(max_new_tokens):
            nxt = sample_next(logits.float(), temperature, top_k, generator)  # (B, 1)
            ids = torch.cat([ids, nxt], dim=1)
            if i == max_new_tokens - 1:
                break
            if cache.pos == cache.max_len:  # context full: restart from its newest part
                cache.reset()
                logits = model(ids[:, -restart_length(seq_len):], cache=cache)[0][:, -1]
            else:
                logits = model(nxt, cache=cache)[0][:, -1]
    return ids


def sample_text(model: LanguageModel, tokenizer: Any, prompt: str, max_new_tokens: int, *, temperature: float = 0.8,
                top_k: int | None = 50, seed: int = 0, precision: str = "auto") -> str:
    """Prompt + generated continuation, decoded (a ``tokenizers.Tokenizer``: ``encode(s).ids``, ``decode``)."""
    device = next(model.parameters()).device
    prompt_ids = tokenizer.encode(prompt).ids if prompt else []
    if not prompt_ids:  # an empty prompt starts from the end-of-text token (or id 0)
        eos = tokenizer.token_to_id("<|endoftext|>") if hasattr(tokenizer, "token_to_id") else None
        prompt_ids = [eos if eos is not None else 0]
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    out = generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed, precision=precision)
    return tokenizer.decode(out[0].tolist())


# ---------------------------------------------------------------------------------------------- throughput
def _context(spec: ModelSpec, batch_size: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, spec.vocab_size, (batch_size, spec.seq_len), generator=gen).to(device)


@torch.inference_mode()
def measure_prefill(model: LanguageModel, *, batch_size: int = 1, seconds: float = 1.0, min_reps: int = 3,
                    precision: str = "auto", context: torch.Tensor | None = None) -> dict[str, float]:
    """Tokens/s of one cache-filling forward pass over a full context (B, seq_len); median over
    repeated passes (a fresh cache each, as a new prompt gets)."""
    spec, device = model.spec, next(model.parameters()).device
    ids = context[:batch_size, : spec.seq_len] if context is not None else _context(spec, batch_size, device)
    B, T = ids.shape
    times: list[float] = []
    with autocast(device, precision):
        for _ in range(2):  # warm-up: kernels, allocator, thread pool
            model(ids, cache=model.init_cache())
        sync(device)
        start = time.perf_counter()
        while len(times) < min_reps or (time.perf_counter() - start < seconds and len(times) < 1000):
            t0 = time.perf_counter()
            model(ids, cache=model.init_cache())
            sync(device)
            times.append(time.perf_counter() - t0)
    latency = statistics.median(times)
    fwd = flops_per_token(spec, training=False)
    return {"tokens_per_s": B * T / latency, "latency_s": latency, "batch_size": B, "context_tokens": T,
            "repeats": len(times), "tflops_per_s": B * T * fwd / latency / 1e12}


def _decode_steps(model: LanguageModel, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> float:
    """Prefill ``prompt`` (untimed), then time ``new_tokens`` greedy cached steps; -> seconds."""
    cache = model.init_cache(prompt.shape[1] + new_tokens)
    nxt = model(prompt, cache=cache)[0][:, -1:].argmax(dim=-1)  # (B, 1)
    sync(device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        nxt = model(nxt, cache=cache)[0][:, -1:].argmax(dim=-1)
    sync(device)
    return time.perf_counter() - start


def check_decode_tokens(new_tokens: int, seq_len: int) -> None:
    """``bench.decode_tokens`` must leave room for a prompt in the ``seq_len`` context.

    Raises:
        ConfigError: ``new_tokens`` is not in [1, seq_len - 1].
    """
    if not 0 < new_tokens < seq_len:
        raise ConfigError("bench.decode_tokens", f"decode_tokens={new_tokens} must be in [1, seq_len-1={seq_len - 1}]: "
                          "the prompt and the generated tokens share the seq_len context")


@torch.inference_mode()
def measure_decode(model: LanguageModel, *, batch_size: int = 1, new_tokens: int = 32, precision: str = "auto",
                   context: torch.Tensor | None = None, prefill: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Tokens/s of KV-cached greedy decoding: ``new_tokens`` one-token steps per sequence after a
    prompt of ``seq_len - new_tokens`` tokens (so the last step fills the context exactly).

    Only the steps are timed (the prompt's prefill is :func:`measure_prefill`'s business); one
    untimed warm-up run first. A sectional layer's work lands on every r-th step, so the mean over
    ``new_tokens`` >= r steps is its amortised cost. With ``prefill`` (:func:`measure_prefill`'s
    result) the report adds :func:`decode_vs_prefill`.
    """
    spec, device = model.spec, next(model.parameters()).device
    check_decode_tokens(new_tokens, spec.seq_len)
    ids = context[:batch_size, : spec.seq_len] if context is not None else _context(spec, batch_size, device)
    prompt = ids[:, : spec.seq_len - new_tokens]
    B = prompt.shape[0]
    with autocast(device, precision):
        _decode_steps(model, prompt, min(new_tokens, 4), device)  # warm-up: kernels, allocator, thread pool
        elapsed = _decode_steps(model, prompt, new_tokens, device)
    out = {"tokens_per_s": B * new_tokens / elapsed, "ms_per_token": 1e3 * elapsed / new_tokens, "batch_size": B,
           "new_tokens": new_tokens, "context_tokens": prompt.shape[1], "kv_cache": True,
           "flops_per_token": flops_per_token(spec, training=False), "note": DECODE_NOTE}
    if prefill is not None:
        out.update(decode_vs_prefill(out, prefill))
    return out


def decode_vs_prefill(decode: Mapping[str, Any], prefill: Mapping[str, Any]) -> dict[str, float]:
    """A decoded token's cost in prefill tokens: both take about the same FLOPs per token, so the
    ratio is what one-token steps lose to fixed per-step costs (Python dispatch of every op, reading
    every weight for one row; a batch of B sequences shares them)."""
    prefill_s = 1.0 / prefill["tokens_per_s"]
    decode_s = 1.0 / decode["tokens_per_s"]
    return {"prefill_ms_per_token": 1e3 * prefill_s, "decode_ms_per_token": 1e3 * decode_s,
            "decode_cost_in_prefill_tokens": decode_s / prefill_s}


