"""Evaluate a trained checkpoint: test perplexity, inference throughput and a text sample.

``python evaluate.py ckpt_path=<run>/checkpoints/last.ckpt`` (the thin root script) calls
:func:`main` with ``conf/eval.yaml``. The steps:

1. load the checkpoint with ``torch.load(weights_only=True)`` and rebuild the model from its
   ``spec`` hyper-parameters (:func:`load_checkpoint`);
2. test perplexity: ``exp(sum of token NLL / number of tokens)`` over the test split of the data
   the run trained on (its ``.hydra/config.yaml`` next to the checkpoint), or of ``data=<name>``;
3. inference throughput of prefill and KV-cached decode (:mod:`sectional_moe.evaluation.generate`);
4. a text sample from ``prompt`` (temperature, top-k), decoded with the same cache;
5. ``eval.json`` next to the checkpoint (or at ``out=``) and a small table on stdout.

Imports: torch, :mod:`sectional_moe.models`, :mod:`sectional_moe.data` (for the test split),
:mod:`sectional_moe.runs.layout`, :mod:`sectional_moe.device`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from sectional_moe.device import autocast, pick_device, resolve_precision
from sectional_moe.errors import CheckpointError, ConfigError
from sectional_moe.evaluation.generate import DECODE_NOTE, check_decode_tokens, measure_decode, measure_prefill, sample_text
from sectional_moe.models import build_model
from sectional_moe.models.flops import flops_per_token, param_counts
from sectional_moe.models.lm import LanguageModel
from sectional_moe.models.loss import lm_loss
from sectional_moe.models.spec import ModelSpec
from sectional_moe.runs.layout import RunDir

EVAL_FILE = "eval.json"


# ---------------------------------------------------------------------------------------------- loading
def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[LanguageModel, ModelSpec, dict[str, Any]]:
    """A Lightning checkpoint of :class:`~sectional_moe.training.module.LMModule` -> (model in eval mode, spec, hparams)."""
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


# ---------------------------------------------------------------------------------------------- perplexity
def batch_limit(limit: int | float | None, n_batches: int) -> int:
    """How many batches a Lightning-style limit keeps: an int is a count, a float in [0, 1] a
    fraction of the loader (Lightning's ``limit_test_batches``), None or 1.0 every batch."""
    if limit is None or (isinstance(limit, float) and limit == 1.0):
        return n_batches
    if isinstance(limit, float) and 0.0 <= limit < 1.0:
        return int(n_batches * limit)
    return min(int(limit), n_batches)


@torch.inference_mode()
def perplexity(model: LanguageModel, batches: Iterable[torch.Tensor], device: torch.device, precision: str = "auto",
               max_batches: int | None = None, baselines: Mapping[str, Any] | None = None) -> dict[str, float]:
    """exp(mean token NLL) over blocks (B, T+1): NLL summed in float64 over every target token.

    With ``baselines`` (the data module's count models) their perplexities are scored on exactly
    the same blocks, as the training-time validation and test do.
    """
    nll, tokens, n = 0.0, 0, 0
    base_nll = dict.fromkeys(baselines or {}, 0.0)
    for batch in batches:
        if max_batches is not None and n >= max_batches:
            break
        for kind in base_nll:
            base_nll[kind] += baselines[kind].nll(batch.numpy())  # type: ignore[index]
        batch = batch.to(device)
        with autocast(device, precision):
            out = lm_loss(model, batch, reduction="sum")
        nll += float(out.nll.double())
        tokens += out.tokens
        n += 1
    if tokens == 0:
        raise ConfigError("limit_batches", "no test tokens were evaluated; the test split is empty or limit_batches=0")
    mean = nll / tokens
    result = {"loss": mean, "ppl": _exp(mean), "tokens": tokens, "batches": n}
    result.update({f"{kind}_ppl": _exp(total / tokens) for kind, total in base_nll.items()})
    return result


def _exp(mean_nll: float) -> float:
    return math.exp(mean_nll) if mean_nll < 700 else float("inf")


# ---------------------------------------------------------------------------------------------- the app
def run_config(ckpt_path: Path) -> DictConfig | None:
    """The config of the training run a checkpoint belongs to (its ``.hydra/config.yaml``), or None."""
    for parent in (ckpt_path.parent, ckpt_path.parent.parent):
        saved = RunDir(parent).hydra_config
        if saved.is_file():
            loaded = OmegaConf.load(saved)
            assert isinstance(loaded, DictConfig)
            return loaded
    return None


def run_data_config(ckpt_path: Path) -> tuple[dict[str, Any], int] | None:
    """(data config, seed) of the training run a checkpoint belongs to."""
    run_cfg = run_config(ckpt_path)
    if run_cfg is None or "data" not in run_cfg:
        return None
    data = OmegaConf.to_container(run_cfg.data, resolve=True)
    assert isinstance(data, dict)
    return data, int(run_cfg.get("seed", 0))


def eval_limit(cfg: DictConfig, ckpt_path: Path) -> int | float | None:
    """``limit_batches``: ``auto`` = the training run's own ``trainer.limit_test_batches`` (so the
    training-time test and this evaluation score the same blocks), else the given number."""
    limit = cfg.get("limit_batches", "auto")
    if limit != "auto":
        return limit
    run_cfg = run_config(ckpt_path)
    return OmegaConf.select(run_cfg, "trainer.limit_test_batches", default=None) if run_cfg is not None else None


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
    precision = resolve_precision({"accelerator": device.type, "precision": cfg.get("precision", "auto")})  # as training
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
            loader = dm.test_dataloader()
            limit = batch_limit(eval_limit(cfg, ckpt), len(loader))
            results["test"] = {"data": data_name, "split": "test",
                               **perplexity(model, loader, device, precision, limit, dm.baselines())}
    batch = int(bench.get("batch_size", 1))
    results["prefill"] = measure_prefill(model, batch_size=batch, seconds=float(bench.get("prefill_seconds", 1.0)),
                                         precision=precision)
    results["decode"] = measure_decode(model, batch_size=batch, new_tokens=decode_tokens, precision=precision,
                                       prefill=results["prefill"])
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
        if "unigram_ppl" in t:
            rows.append(("baselines, same tokens", f"unigram {t['unigram_ppl']:.1f}, bigram {t['bigram_ppl']:.1f}"))
    p, d = results["prefill"], results["decode"]
    rows.append(("prefill tokens/s", f"{p['tokens_per_s']:,.0f}  (batch {p['batch_size']} x {p['context_tokens']} tokens, "
                                     f"{1e3 * p['latency_s']:.2f} ms/pass)"))
    rows.append(("decode tokens/s", f"{d['tokens_per_s']:,.1f}  ({d['ms_per_token']:.2f} ms/step, batch {d['batch_size']}, "
                                    f"KV cache, {d['new_tokens']} steps after {d['context_tokens']} prompt tokens)"))
    if "decode_cost_in_prefill_tokens" in d:
        rows.append(("decode vs prefill", f"a decoded token costs {d['decode_cost_in_prefill_tokens']:.1f} prefill tokens "
                                          f"({d['decode_ms_per_token']:.3f} vs {d['prefill_ms_per_token']:.3f} ms per token)"))
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
