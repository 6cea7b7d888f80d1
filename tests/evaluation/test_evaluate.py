"""evaluate.py on real checkpoints of each family: test perplexity, prefill/decode throughput, samples."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from sectional_moe.errors import ConfigError
from sectional_moe.evaluation.evaluate import evaluate, load_checkpoint, main, perplexity
from sectional_moe.evaluation.generate import generate, measure_decode, measure_prefill, next_token_logits, restart_length
from sectional_moe.models.flops import flops_per_token
from sectional_moe.training.module import LMModule
from sectional_moe.models.spec import ModelSpec
from tests.conftest import CONF, REPO

T = 32
FAMILIES = {
    "dense": dict(family="dense", routing=None, experts=None),
    "moe-topk": dict(family="moe", routing="topk", experts=4),
    "sectional-segment_fixed": dict(family="sectional", routing="segment_fixed", experts=4, seq_reduction=4),
}
OPTIM = dict(lr=1e-3, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1, fused=False, schedule="constant",
             warmup_steps=1, min_lr_ratio=0.1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """A small text corpus and its data config (text_files, 300-token BPE): fast to tokenize."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = "the king queen sword crown night day love death rome romeo speak lord lady good noble".split()
    for split, lines in (("train", 400), ("val", 60), ("test", 60)):
        text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(lines))
        (root / f"{split}.txt").write_text(text)
    data = dict(source="text_files", name="tiny-text", train_files=[str(root / "train.txt")], val_files=[str(root / "val.txt")],
                test_files=[str(root / "test.txt")], vocab_size=300, batch_size=4, eval_batch_size=4)
    from sectional_moe.data import LMDataModule
    from sectional_moe.data.datamodule import default_cache_dir

    dm = LMDataModule(**data, seq_len=T, cache_dir=default_cache_dir(), seed=0)
    dm.prepare_data()
    return {"data": data, "vocab_size": dm.vocab_size, "root": root}


@pytest.fixture(scope="module")
def checkpoints(corpus, tmp_path_factory) -> dict[str, Path]:
    """One run directory per family: a few real optimiser steps, last.ckpt, and the run's .hydra config."""
    out: dict[str, Path] = {}
    for name, kw in FAMILIES.items():
        spec = ModelSpec(vocab_size=corpus["vocab_size"], d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                         seq_len=T, **kw).validate()
        torch.manual_seed(0)
        module = LMModule(spec.to_dict(), OPTIM, 4)
        ids = torch.randint(0, spec.vocab_size, (32, T + 1), generator=torch.Generator().manual_seed(0))
        run = tmp_path_factory.mktemp(name)
        trainer = pl.Trainer(accelerator="cpu", max_steps=4, max_epochs=-1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(run))
        trainer.fit(module, DataLoader(ids, batch_size=4))
        (run / ".hydra").mkdir()
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "data": corpus["data"]}))
        trainer.save_checkpoint(run / "checkpoints" / "last.ckpt")
        out[name] = run / "checkpoints" / "last.ckpt"
    return out


def eval_config(*overrides: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=["bench.prefill_seconds=0.05", "bench.decode_tokens=4",
                                                     "max_new_tokens=6", "limit_batches=2", *overrides])
    GlobalHydra.instance().clear()
    return cfg


@pytest.mark.parametrize("name", list(FAMILIES))
def test_evaluate_works_on_a_checkpoint_of_each_family(name, checkpoints, tmp_path):
    ckpt = checkpoints[name]
    results = evaluate(eval_config(f"ckpt_path={ckpt}", f"out={tmp_path / 'eval.json'}", "prompt=the king"))
    spec = ModelSpec.from_dict(torch.load(ckpt, weights_only=True)["hyper_parameters"]["spec"])
    test = results["test"]
    assert test["data"] == "tiny-text" and test["batches"] == 2 and test["tokens"] == 2 * 4 * T
    assert 1 < test["ppl"] < 10 * spec.vocab_size and test["ppl"] == pytest.approx(math.exp(test["loss"]))
    assert results["prefill"]["tokens_per_s"] > 0 and results["prefill"]["context_tokens"] == T
    decode = results["decode"]
    assert decode["tokens_per_s"] > 0 and decode["kv_cache"] is True and "KV-cached" in decode["note"]
    assert decode["new_tokens"] == 4 and decode["context_tokens"] == T - 4  # the prompt and the steps fill seq_len
    assert decode["flops_per_token"] == flops_per_token(spec, training=False)  # one new position per step
    assert results["sample"]["text"].startswith("the king") and len(results["sample"]["text"]) > len("the king")
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["test"] == test and written["model"]["family"] == spec.family


def test_perplexity_is_exp_of_the_mean_token_nll_over_the_split(checkpoints):
    model, spec, _ = load_checkpoint(checkpoints["moe-topk"])
    batches = [torch.randint(0, spec.vocab_size, (3, T + 1), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    batches.append(batches[0][:1])  # a short last batch weighs by its tokens, not as one batch
    result = perplexity(model, batches, torch.device("cpu"))
    with torch.no_grad():
        nll = sum(F.cross_entropy(model(b[:, :-1])[0].flatten(0, 1), b[:, 1:].flatten(), reduction="sum").item() for b in batches)
    tokens = sum(b[:, 1:].numel() for b in batches)
    assert result["tokens"] == tokens == 10 * T
    assert result["ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)


def test_short_context_of_a_sectional_model_is_padded_without_changing_its_logits(checkpoints):
    model, spec, _ = load_checkpoint(checkpoints["sectional-segment_fixed"])
    assert spec.seq_reduction == 4
    ids = torch.randint(1, spec.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))  # 5 % r != 0
    with torch.no_grad():
        logits = next_token_logits(model, ids)
        for pad in (7, 99):  # whatever follows position 4 cannot matter: the model is causal
            full, _ = model(torch.cat([ids, torch.full((2, 3), pad)], dim=1))
            torch.testing.assert_close(logits, full[:, 4])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_cached_generation_equals_cache_free_greedy_generation(name, checkpoints):
    """Greedy tokens from the KV cache = argmax of full forward passes over the same context,
    including past seq_len, where the context restarts from its newest restart_length tokens."""
    model, spec, _ = load_checkpoint(checkpoints[name])
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = generate(model, prompt, max_new_tokens=T + 8, temperature=0.0)
    assert out.shape == (2, 3 + T + 8) and torch.equal(out[:, :3], prompt)
    ref, start = prompt, 0
    with torch.no_grad():
        while ref.shape[1] < out.shape[1]:
            if ref.shape[1] - start > T:  # the context is full: restart it
                start = ref.shape[1] - restart_length(T)
            ref = torch.cat([ref, next_token_logits(model, ref[:, start:]).argmax(-1, keepdim=True)], dim=1)
    assert start > 0 and torch.equal(out, ref)


def test_decode_benchmark_times_one_token_cached_steps(checkpoints, monkeypatch):
    model, spec, _ = load_checkpoint(checkpoints["sectional-segment_fixed"])
    calls: list[tuple[int, int, bool]] = []
    forward = model.forward

    def recording(ids, cache=None):
        calls.append((ids.shape[0], ids.shape[1], cache is not None))
        return forward(ids, cache=cache)

    monkeypatch.setattr(model, "forward", recording)
    decode = measure_decode(model, batch_size=2, new_tokens=3)
    # warm-up and timed run: each a prompt prefill of seq_len - 3 tokens, then 3 one-token steps, all cached
    assert calls == 2 * ([(2, T - 3, True)] + [(2, 1, True)] * 3)
    assert decode["batch_size"] == 2 and decode["new_tokens"] == 3 and decode["kv_cache"] is True
    assert decode["tokens_per_s"] == pytest.approx(2 * 3 / (3 * decode["ms_per_token"] / 1e3))
    calls.clear()
    prefill = measure_prefill(model, batch_size=2, seconds=0.0, min_reps=2)
    assert calls == [(2, T, True)] * 4 and prefill["repeats"] == 2  # 2 warm-up passes, then the timed ones
    with pytest.raises(ConfigError) as err:
        measure_decode(model, new_tokens=T)  # the prompt would be empty
    assert err.value.key == "bench.decode_tokens"


def test_bad_checkpoint_paths_and_missing_data_are_config_errors(checkpoints, tmp_path, capsys):
    with pytest.raises(ConfigError) as err:
        evaluate(eval_config())
    assert err.value.key == "ckpt_path"
    with pytest.raises(SystemExit) as exit_:
        main(eval_config(f"ckpt_path={tmp_path / 'nope.ckpt'}"))
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0  # one line: key, value and fix
    lone = tmp_path / "lone.ckpt"  # no training run config next to it
    lone.write_bytes(checkpoints["dense"].read_bytes())
    with pytest.raises(ConfigError) as err:
        evaluate(eval_config(f"ckpt_path={lone}"))
    assert err.value.key == "data" and "data=" in str(err.value)


def test_evaluate_cli_with_explicit_data(checkpoints, corpus, tmp_path):
    d = corpus["data"]
    out = tmp_path / "cli.json"
    args = [f"ckpt_path={checkpoints['dense']}", "data=text_files", f"data.train_files={d['train_files']}",
            f"data.val_files={d['val_files']}", f"data.test_files={d['test_files']}", "data.vocab_size=300", "data.eval_batch_size=4",
            f"out={out}", "limit_batches=1", "bench.prefill_seconds=0.05", "bench.decode_tokens=2", "max_new_tokens=4",
            "prompt=the queen", "temperature=0"]
    proc = subprocess.run([sys.executable, str(REPO / "evaluate.py"), *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "prefill tokens/s" in proc.stdout and "decode tokens/s" in proc.stdout and "KV cache" in proc.stdout
    assert json.loads(out.read_text())["test"]["tokens"] == 4 * T
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli.json"]  # no Hydra run directory or log file


def test_evaluate_and_the_training_time_test_agree_on_the_same_checkpoint_and_blocks(compose, tmp_path):
    """The training-time test and ``evaluate.py`` score the best checkpoint on the same test blocks
    (the run's own limit, ``limit_batches=auto``) with the same precision rule, so they report one
    test perplexity, and both score the count baselines on exactly those blocks."""
    from sectional_moe.runs.layout import RunDir
    from sectional_moe.training.run import train

    cfg = compose("trainer.limit_test_batches=2", "trainer.limit_val_batches=2", "model=moe", "experts=2")
    metrics = train(cfg)
    run = RunDir(cfg.paths.output_dir)
    run.hydra_dir.mkdir()
    OmegaConf.save(cfg, run.hydra_config)  # what Hydra's runtime records for a launched run
    best = sorted(run.checkpoint_dir.glob("best-step*.ckpt"))
    assert len(best) == 1
    results = evaluate(eval_config(f"ckpt_path={best[0]}", f"out={tmp_path / 'eval.json'}", "prompt=null",
                                   "limit_batches=auto", f"paths.cache_dir={cfg.paths.cache_dir}"))
    test = results["test"]
    assert test["batches"] == 2
    assert test["ppl"] == pytest.approx(metrics["test/ppl"], rel=1e-5)
    assert test["unigram_ppl"] == pytest.approx(metrics["test/unigram_ppl"], rel=1e-6)  # logged as float32
    assert test["bigram_ppl"] == pytest.approx(metrics["test/bigram_ppl"], rel=1e-6)
    assert metrics["val/bigram_ppl"] < metrics["val/unigram_ppl"]
