"""Every config group composes and instantiates; bad values fail at start-up naming the key."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from sectional_moe.training.validate import validate_config
from sectional_moe.errors import ConfigError
from sectional_moe.models.flops import param_counts
from sectional_moe.models import build_model
from sectional_moe.models.spec import spec_from_config

SIZES = ["nano", "tiny", "small", "base", "medium", "large"]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("model", ["dense", "moe", "sectional"])
def test_every_size_and_family_composes_and_builds(compose, size, model):
    cfg = compose(f"size={size}", f"model={model}", "trainer=cpu", tiny=False)
    spec = validate_config(cfg)
    assert spec.family == model and spec.size == size
    with torch.device("meta"):  # large presets: no memory, same module tree
        net = build_model(spec)
    assert net.num_parameters() == param_counts(spec)["total"]


def test_large_preset_is_about_350m_parameters(compose):
    spec = validate_config(compose("size=large", "model=dense", tiny=False))
    assert 3.0e8 < param_counts(spec)["total"] < 4.0e8


@pytest.mark.parametrize(
    "model,routing",
    [("sectional", "segment_fixed"), ("sectional", "topk"), ("sectional", "hash"), ("moe", "topk"), ("moe", "hash")],
)
@pytest.mark.parametrize("experts", [1, 2, 4])
def test_model_routing_experts_compose(compose, model, routing, experts):
    extra = [f"routing.top_k={min(2, experts)}"] if routing == "topk" else []
    spec = validate_config(compose(f"model={model}", f"routing={routing}", f"experts={experts}", *extra))
    assert (spec.family, spec.routing, spec.experts) == (model, routing, experts)
    if model == "sectional":
        assert spec.seq_reduction == experts  # default seq_reduction: experts -> r = E


def test_top_k_above_experts_names_the_key_and_the_fix(compose):
    with pytest.raises(ConfigError, match=r"routing.top_k.*top_k=2 > experts=1"):
        validate_config(compose("model=moe", "routing=topk", "experts=1"))


def test_each_family_picks_its_default_routing(compose):
    assert validate_config(compose("model=sectional")).routing == "segment_fixed"
    assert validate_config(compose("model=moe")).routing == "topk"
    dense = validate_config(compose("model=dense", "experts=8"))
    assert dense.routing is None and dense.experts is None  # recorded as null


def test_sectional_is_the_default_family(compose):
    assert compose(tiny=False).model.family == "sectional"


@pytest.mark.parametrize("trainer", ["default", "cpu", "ddp_sim"])
def test_cpu_trainer_configs_validate(compose, trainer):
    validate_config(compose(f"trainer={trainer}"))


@pytest.mark.parametrize("trainer", ["gpu", "ddp", "fsdp"])
def test_gpu_trainer_configs_compose_and_fail_clearly_without_cuda(compose, trainer):
    cfg = compose(f"trainer={trainer}")
    assert cfg.trainer.accelerator == "gpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError) as err:
            validate_config(cfg)
        if trainer == "fsdp":  # the strategy itself needs CUDA: the fix is a CPU strategy, not only a CPU device
            assert err.value.key == "trainer.strategy" and "trainer=ddp_sim" in str(err.value)
        else:
            assert err.value.key == "trainer.accelerator" and "trainer=cpu" in str(err.value)


@pytest.mark.parametrize("logger", ["wandb", "csv", "none", "[wandb,csv]"])
def test_logger_options_compose(compose, logger):
    cfg = compose(f"logger={logger}")
    expected = {"wandb": {"wandb"}, "csv": {"csv"}, "none": set(), "[wandb,csv]": {"wandb", "csv"}}[logger]
    assert set(cfg.logger or {}) == expected


@pytest.mark.parametrize("callbacks", ["default", "none"])
def test_callbacks_instantiate(compose, callbacks):
    cfg = compose(f"callbacks={callbacks}")
    made = [instantiate(c) for c in (cfg.callbacks or {}).values()]
    assert all(hasattr(c, "on_train_start") for c in made)


@pytest.mark.parametrize("debug", ["fdr", "overfit", "limit", "profiler"])
def test_debug_configs_compose(compose, debug):
    cfg = compose(f"debug={debug}")
    assert cfg.task_name == "debug"
    validate_config(cfg)


def test_experiment_quick_composes(compose):
    cfg = compose("experiment=quick", tiny=False)
    assert cfg.size.name == "nano" and cfg.trainer.max_steps == 1000 and cfg.data.vocab_size == 2048
    assert validate_config(cfg).seq_len == 64


def test_spec_uses_the_tokenizer_vocabulary(compose):
    cfg = compose()
    assert spec_from_config(cfg, vocab_size=300).vocab_size == 300


BAD = [
    (["experts=0"], "experts", "positive integer"),
    (["experts=-2"], "experts", "positive integer"),
    (["experts=3"], "experts", "d_model=64 is not divisible by experts=3"),
    (["model=moe", "routing=segment_fixed"], "routing", "model=sectional"),
    (["routing=topk", "routing.top_k=5", "experts=4"], "routing.top_k", "top_k=5 > experts=4"),
    (["model.seq_reduction=3"], "model.seq_reduction", "seq_len=64 is not divisible by seq_reduction=3"),
    (["model.seq_reduction=fast"], "model.seq_reduction", "'experts'"),
    (["size.n_heads=3"], "size.n_heads", "not divisible by n_heads=3"),
    (["size.n_kv_heads=3"], "size.n_kv_heads", "n_kv_heads=3"),
    (["experts=2", "size.n_heads=6", "size.n_kv_heads=3", "size.d_model=96"], "experts", "n_kv_heads=3 is not divisible by experts=2"),
    (["model.sectional_every=5"], "model.sectional_every", "[1, n_layers=2]"),
    (["model.seq_pool=max"], "model.seq_pool", "mean"),
    (["model.expert_d_ff=-1"], "model.expert_d_ff", "> 0"),
    (["routing=topk", "routing.capacity_factor=0"], "routing.capacity_factor", "dropless"),
    (["model=sectional", "routing=topk", "routing.shared_expert=true"], "routing.shared_expert", "model=moe"),
    (["data.batch_size=0"], "data.batch_size", "> 0"),
    (["optim.lr=0"], "optim.lr", "> 0"),
    (["optim.lr=-0.1"], "optim.lr", "> 0"),
    (["optim.schedule=linear"], "optim.schedule", "cosine"),
    (["optim.betas=[0.9]"], "optim.betas", "two numbers"),
    (["optim.warmup_steps=50"], "optim.warmup_steps", "shorten the warmup"),
    (["trainer.max_steps=0"], "trainer.max_steps", "> 0"),
    (["trainer.val_check_interval=100"], "trainer.val_check_interval", "no validation would run"),
    (["trainer.precision=16-mixed", "trainer.accelerator=cpu"], "trainer.precision", "not supported on CPU"),
    (["trainer.precision=fp8"], "trainer.precision", "bf16-mixed"),
    (["hardware.peak_tflops=-5"], "hardware.peak_tflops", "> 0"),
    (["logger=wandb", "logger.wandb.mode=sometimes"], "logger.wandb.mode", "offline"),
    (["resume=/nonexistent/last.ckpt"], "resume", "existing checkpoint"),
]


@pytest.mark.parametrize("overrides,key,fragment", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_config_names_the_key_and_the_fix(compose, overrides, key, fragment):
    with pytest.raises(ConfigError) as err:
        validate_config(compose(*overrides))
    assert err.value.key == key
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)  # one line


def test_a_flops_budget_sets_the_steps_that_reach_it(compose):
    from sectional_moe.models.flops import flops_per_token

    cfg = compose("trainer.flops_budget=2e10", "size.n_layers=4")
    spec = validate_config(cfg)
    tokens_per_step = cfg.data.batch_size * spec.seq_len
    assert cfg.trainer.max_steps == round(2e10 / (flops_per_token(spec) * tokens_per_step))
    deeper = compose("trainer.flops_budget=2e10", "size.n_layers=8")
    validate_config(deeper)
    assert deeper.trainer.max_steps < cfg.trainer.max_steps  # one budget: a bigger model trains for fewer steps
    with pytest.raises(ConfigError, match="trainer.flops_budget: flops_budget=1000 is less than one optimiser step"):
        validate_config(compose("trainer.flops_budget=1000"))
