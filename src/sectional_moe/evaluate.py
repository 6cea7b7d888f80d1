"""Evaluate a trained checkpoint: test perplexity, inference throughput and a text sample.

``python evaluate.py ckpt_path=<run>/checkpoints/last.ckpt`` (the thin root script) calls
:func:`main` with ``conf/eval.yaml``. The steps:

1. load the checkpoint with ``torch.load(weights_only=True)`` and rebuild the model from its
   ``spec`` hyper-parameters (:func:`load_checkpoint`);
2. test perplexity: ``exp(sum of token NLL / number of tokens)`` over the test split of the data
   the run trained on (its ``.hydra/config.yaml`` next to the checkpoint), or of ``data=<name>``;
3. inference throughput, measured separately for the two phases of generation, both through the
   models' KV cache (:meth:`~sectional_moe.models.LanguageModel.init_cache`):

   * **prefill**: one cache-filling forward pass over a full context of ``seq_len`` tokens
     (tokens/s; median over repeated passes);
   * **decode**: ``bench.decode_tokens`` greedy tokens generated one cached step at a time after a
     prompt of ``seq_len - decode_tokens`` tokens (tokens/s of the timed steps only). Each step
     processes one new position per layer against the cached keys/values. A sectional layer
     does its pre-expert and expert work only on the steps that complete a short position (every
     r-th token) and adds its stored delta on the others, so r-fold shortening lowers its
     amortised decode cost too, at the price of uneven per-token latency.

4. a text sample from ``prompt`` (temperature, top-k), decoded with the same cache;
5. ``eval.json`` next to the checkpoint (or at ``out=``) and a small table on stdout.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from sectional_moe.errors import CheckpointError, ConfigError
from sectional_moe.flops import flops_per_token, param_counts
from sectional_moe.models import LanguageModel, build_model
from sectional_moe.spec import ModelSpec

EVAL_FILE = "eval.json"
DECODE_NOTE = ("KV-cached decode: one new position per step against cached keys/values; a sectional layer runs "
               "its pre-expert layer and experts only on steps completing a short position (every r-th token), "
               "so flops_per_token is the analytic forward cost per token, amortised over r steps")


# ---------------------------------------------------------------------------------------------- loading
def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[LanguageModel, ModelSpec, dict[str, Any]]:
    """A Lightning checkpoint of :class:`~sectional_moe.lit.LMModule` -> (model in eval mode, spec, hparams)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("ckpt_path", f"ckpt_path={str(path)!r} is not a file; give a checkpoint, e.g. "
                          "outputs/train/runs/<run>/checkpoints/last.ckpt (quote a path holding '=' or ',': "
                          "\"ckpt_path='<path>'\")")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated, corrupt or not a checkpoint at all
        raise CheckpointError(f"{path}: cannot be loaded ({type(err).__name__}: {err}); is it a complete checkpoint?") from err
    hparams = state.get("hyper_parameters") or {}
    if "spec" not in hparams:
        raise CheckpointError(f"{path}: no 'spec' in its hyper-parameters; it was not written by sectional_moe's LMModule")
    spec = ModelSpec.from_dict(hparams["spec"]).validate()
    model = build_model(spec)
    weights = {k[len("model."):]: v for k, v in state["state_dict"].items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the spec (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device).eval(), spec, dict(hparams)


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda if available, else cpu; or the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", f"device={name} but no CUDA device is visible; use device=cpu or device=auto")
    return torch.device(name)


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast for ``bf16-mixed`` (``auto`` on CUDA), otherwise full precision."""
    if precision == "auto":
        precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    if precision.startswith("bf16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision not in ("32-true", "32"):
        raise ConfigError("precision", f"precision={precision!r}; use auto, 32-true or bf16-mixed")
    return contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- perplexity
@torch.inference_mode()
def perplexity(model: LanguageModel, batches: Iterable[torch.Tensor], device: torch.device, precision: str = "auto",
               max_batches: int | None = None) -> dict[str, float]:
    """exp(mean token NLL) over blocks (B, T+1): NLL summed in float64 over every target token."""
    nll, tokens, n = 0.0, 0, 0
    for batch in batches:
        if max_batches is not None and n >= max_batches:
            break
        batch = batch.to(device)
        with autocast(device, precision):
            logits, _ = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
        nll += float(loss.double())
        tokens += batch[:, 1:].numel()
        n += 1
    if tokens == 0:
        raise ConfigError("limit_batches", "no test tokens were evaluated; the test split is empty or limit_batches=0")
    mean = nll / tokens
    return {"loss": mean, "ppl": math.exp(mean) if mean < 700 else float("inf"), "tokens": tokens, "batches": n}


# ---------------------------------------------------------------------------------------------- generation
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
        _sync(device)
        start = time.perf_counter()
        while len(times) < min_reps or (time.perf_counter() - start < seconds and len(times) < 1000):
            t0 = time.perf_counter()
            model(ids, cache=model.init_cache())
            _sync(device)
            times.append(time.perf_counter() - t0)
    latency = statistics.median(times)
    fwd = flops_per_token(spec, training=False)
    return {"tokens_per_s": B * T / latency, "latency_s": latency, "batch_size": B, "context_tokens": T,
            "repeats": len(times), "tflops_per_s": B * T * fwd / latency / 1e12}


def _decode_steps(model: LanguageModel, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> float:
    """Prefill ``prompt`` (untimed), then time ``new_tokens`` greedy cached steps; -> seconds."""
    cache = model.init_cache(prompt.shape[1] + new_tokens)
    nxt = model(prompt, cache=cache)[0][:, -1:].argmax(dim=-1)  # (B, 1)
    _sync(device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        nxt = model(nxt, cache=cache)[0][:, -1:].argmax(dim=-1)
    _sync(device)
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
                   context: torch.Tensor | None = None) -> dict[str, Any]:
    """Tokens/s of KV-cached greedy decoding: ``new_tokens`` one-token steps per sequence after a
    prompt of ``seq_len - new_tokens`` tokens (so the last step fills the context exactly).

    Only the steps are timed (the prompt's prefill is :func:`measure_prefill`'s business); one
    untimed warm-up run first. A sectional layer's work lands on every r-th step, so the mean over
    ``new_tokens`` >= r steps is its amortised cost.
    """
    spec, device = model.spec, next(model.parameters()).device
    check_decode_tokens(new_tokens, spec.seq_len)
    ids = context[:batch_size, : spec.seq_len] if context is not None else _context(spec, batch_size, device)
    prompt = ids[:, : spec.seq_len - new_tokens]
    B = prompt.shape[0]
    with autocast(device, precision):
        _decode_steps(model, prompt, min(new_tokens, 4), device)  # warm-up: kernels, allocator, thread pool
        elapsed = _decode_steps(model, prompt, new_tokens, device)
    return {"tokens_per_s": B * new_tokens / elapsed, "ms_per_token": 1e3 * elapsed / new_tokens, "batch_size": B,
            "new_tokens": new_tokens, "context_tokens": prompt.shape[1], "kv_cache": True,
            "flops_per_token": flops_per_token(spec, training=False), "note": DECODE_NOTE}


# ---------------------------------------------------------------------------------------------- the app
def run_data_config(ckpt_path: Path) -> tuple[dict[str, Any], int] | None:
    """(data config, seed) of the training run a checkpoint belongs to, from its ``.hydra/config.yaml``."""
    for parent in (ckpt_path.parent, ckpt_path.parent.parent):
        saved = parent / ".hydra" / "config.yaml"
        if saved.is_file():
            run_cfg = OmegaConf.load(saved)
            if "data" in run_cfg:
                data = OmegaConf.to_container(run_cfg.data, resolve=True)
                assert isinstance(data, dict)
                return data, int(run_cfg.get("seed", 0))
    return None


def build_data(cfg: DictConfig, spec: ModelSpec, ckpt_path: Path) -> tuple[Any, str]:
    """The test split's data module (the training run's data unless ``data=`` is given) and its name."""
    if cfg.get("data") is not None:
        data = OmegaConf.to_container(cfg.data, resolve=True)
        assert isinstance(data, dict)
        seed = int(cfg.seed)
    else:
        found = run_data_config(ckpt_path)
        if found is None:
            raise ConfigError("data", f"no training config (.hydra/config.yaml) next to {ckpt_path}; "
                              "pass the data the model was trained on, e.g. data=shakespeare")
        data, seed = found
    from sectional_moe.data import LMDataModule  # heavy (datasets); only when perplexity is wanted

    dm = LMDataModule(**data, seq_len=spec.seq_len, cache_dir=cfg.paths.cache_dir, seed=seed)
    dm.prepare_data()
    dm.setup("test")
    if dm.vocab_size != spec.vocab_size:
        raise ConfigError("data", f"the data's tokenizer has {dm.vocab_size} tokens but the checkpoint's model "
                          f"{spec.vocab_size}; pass the data config the model was trained on")
    return dm, str(data.get("name") or data.get("source"))


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the whole evaluation described by an ``eval.yaml`` config; write and return the results."""
    if not cfg.get("ckpt_path"):
        raise ConfigError("ckpt_path", "ckpt_path is required: python evaluate.py ckpt_path=<run>/checkpoints/last.ckpt")
    ckpt = Path(str(cfg.ckpt_path)).expanduser()
    device = pick_device(str(cfg.get("device", "auto")))
    precision = str(cfg.get("precision", "auto"))
    if precision == "auto":
        precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    model, spec, hparams = load_checkpoint(ckpt, device)
    bench = cfg.get("bench") or {}
    decode_tokens = int(bench.get("decode_tokens", 32))
    check_decode_tokens(decode_tokens, spec.seq_len)  # before the (slow) test split
    results: dict[str, Any] = {
        "checkpoint": str(ckpt),
        "model": {"family": spec.family, "routing": spec.routing, "experts": spec.experts if spec.family != "dense" else None,
                  "size": spec.size, "seq_len": spec.seq_len,
                  "seq_reduction": spec.seq_reduction if spec.family == "sectional" else None},
        "params": param_counts(spec),
        "flops_per_token_forward": flops_per_token(spec, training=False),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": precision,
    }
    tokenizer = None
    if cfg.get("test", True) or cfg.get("prompt") is not None:
        dm, data_name = build_data(cfg, spec, ckpt)
        tokenizer = dm.tokenizer
        if cfg.get("test", True):
            limit = cfg.get("limit_batches")
            results["test"] = {"data": data_name, "split": "test",
                               **perplexity(model, dm.test_dataloader(), device, precision, limit)}
    batch = int(bench.get("batch_size", 1))
    results["prefill"] = measure_prefill(model, batch_size=batch, seconds=float(bench.get("prefill_seconds", 1.0)),
                                         precision=precision)
    results["decode"] = measure_decode(model, batch_size=batch, new_tokens=decode_tokens, precision=precision)
    if tokenizer is not None and cfg.get("prompt") is not None:
        sampling = {"max_new_tokens": int(cfg.max_new_tokens), "temperature": float(cfg.temperature),
                    "top_k": cfg.get("top_k"), "seed": int(cfg.seed)}
        text = sample_text(model, tokenizer, str(cfg.prompt), precision=precision, **sampling)
        results["sample"] = {"prompt": str(cfg.prompt), **sampling, "text": text}
    out = Path(str(cfg.out)) if cfg.get("out") else ckpt.parent / EVAL_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    results["out"] = str(out)
    return results


def format_table(results: Mapping[str, Any]) -> str:
    """A short human-readable summary of :func:`evaluate`'s results."""
    m, params = results["model"], results["params"]
    routed = f" {m['routing']} E={m['experts']}" if m["family"] != "dense" else ""
    rows = [("model", f"{m['family']}{routed} ({m['size']}, seq_len {m['seq_len']})"),
            ("params total / active", f"{params['total']:,.0f} / {params['active']:,.0f}"),
            ("device", f"{results['device_name']} ({results['precision']})")]
    if "test" in results:
        t = results["test"]
        rows.append((f"test ppl ({t['data']})", f"{t['ppl']:.3f}  (loss {t['loss']:.4f} nats over {t['tokens']:,} tokens)"))
    p, d = results["prefill"], results["decode"]
    rows.append(("prefill tokens/s", f"{p['tokens_per_s']:,.0f}  (batch {p['batch_size']} x {p['context_tokens']} tokens, "
                                     f"{1e3 * p['latency_s']:.2f} ms/pass)"))
    rows.append(("decode tokens/s", f"{d['tokens_per_s']:,.1f}  ({d['ms_per_token']:.2f} ms/step, batch {d['batch_size']}, "
                                    f"KV cache, {d['new_tokens']} steps after {d['context_tokens']} prompt tokens)"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append(f"note: {DECODE_NOTE}")
    if "sample" in results:
        smp = results["sample"]
        lines += ["", f"sample (temperature {smp['temperature']}, top-k {smp['top_k']}):", smp["text"]]
    lines.append(f"\nwritten: {results['out']}")
    return "\n".join(lines)


def main(cfg: DictConfig) -> dict[str, Any] | None:
    """Hydra entry point: evaluate, print the table; a config error prints one line and exits 2."""
    try:
        results = evaluate(cfg)
    except (ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(format_table(results), flush=True)
    return results
