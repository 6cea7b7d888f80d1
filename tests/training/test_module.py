"""The LightningModule and its optimiser: learning-rate schedules, exact evaluation perplexity, CUDA bf16 steps."""

from __future__ import annotations

import math

import pytest
import torch

from sectional_moe.training.optim import lr_multiplier


@pytest.mark.parametrize("schedule,step,expected", [
    ("cosine", 0, 0.1), ("cosine", 9, 1.0), ("cosine", 10, 1.0), ("cosine", 55, 0.1 + 0.9 * 0.5), ("cosine", 100, 0.1),
    ("wsd", 9, 1.0), ("wsd", 79, 1.0), ("wsd", 80, 1.0), ("wsd", 90, 1.0 - 0.9 * 0.5), ("wsd", 100, 0.1),
    ("constant", 0, 0.1), ("constant", 99, 1.0),
])
def test_learning_rate_schedules(schedule, step, expected):
    # warmup 10 steps, 100 steps in all, floor 0.1; wsd cools down over the last 20 %
    got = lr_multiplier(step, schedule=schedule, warmup_steps=10, max_steps=100, min_lr_ratio=0.1, decay_frac=0.2)
    assert got == pytest.approx(expected, abs=1e-12)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_multiplier(0, schedule="linear", warmup_steps=0, max_steps=10, min_lr_ratio=0.1)


def test_validation_perplexity_weights_every_token_equally():
    """Two batches with different token counts: exp(sum NLL / sum tokens), not the mean of two ppls."""
    from sectional_moe.training.module import LMModule
    from sectional_moe.models.spec import ModelSpec

    spec = ModelSpec(family="dense", routing=None, experts=None, vocab_size=50, d_model=16, n_layers=1, n_heads=2,
                     n_kv_heads=1, d_ff=32, seq_len=8).validate()
    module = LMModule(spec.to_dict(), {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0,
                                       "schedule": "constant", "warmup_steps": 0, "min_lr_ratio": 0.1}, max_steps=1)
    logged: dict[str, torch.Tensor] = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, value)  # type: ignore[method-assign]
    torch.manual_seed(0)
    batches = [torch.randint(0, 50, (3, 9)), torch.randint(0, 50, (1, 5))]  # 24 and 4 target tokens
    sums, counts = [], []
    for b in batches:
        module.validation_step(b, 0)
        nll = module.loss(b, reduction="sum").nll
        sums.append(nll.item())
        counts.append(b[:, 1:].numel())
    module.on_validation_epoch_end()
    mean_nll = sum(sums) / sum(counts)
    assert logged["val/loss"].item() == pytest.approx(mean_nll, rel=1e-6)
    assert logged["val/ppl"].item() == pytest.approx(math.exp(mean_nll), rel=1e-6)
    per_batch_mean = sum(math.exp(s / c) for s, c in zip(sums, counts)) / 2
    assert abs(logged["val/ppl"].item() - per_batch_mean) > 1e-3  # the two definitions differ here


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bf16 autocast on GPU)")
def test_every_family_trains_a_step_under_cuda_bf16_autocast():
    from sectional_moe.models import ModelSpec, build_model

    for family, routing in (("dense", None), ("moe", "topk"), ("sectional", "segment_fixed"), ("sectional", "topk")):
        spec = ModelSpec(family=family, routing=routing, experts=None if family == "dense" else 4, vocab_size=97,
                         d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, seq_len=32).validate()
        model = build_model(spec).cuda()
        ids = torch.randint(0, 97, (2, 32), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, _ = model(ids)
        logits.float().logsumexp(-1).mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
