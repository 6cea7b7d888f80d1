"""FSDP: the config builds a real Lightning ``FSDPStrategy``, and our model trains sharded on CPU.

Lightning refuses FSDP without GPUs ("The strategy `fsdp` requires a GPU accelerator"), and so
does :func:`sectional_moe.training.validate.validate_config`, one line and before any compute. What is ours
(the auto-wrap policy, and that the model trains and checkpoints correctly when sharded block by
block) runs on CPU anyway: 2 gloo processes wrap the model with torch's FSDP using the policy
instantiated from ``conf/trainer/fsdp.yaml`` itself, train a few steps and save/load a full state
dict; the losses and the weights must match a single unsharded process on the same data.
"""

from __future__ import annotations

import json
import os
import socket
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from sectional_moe.runs.checkpoints import atomic_save
from sectional_moe.training.module import LMModule, decoder_block_classes
from sectional_moe.training.optim import param_groups

pytestmark = pytest.mark.slow

WORLD = 2
STEPS = 3
PER_RANK_BATCH = 4
OPTIM = {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "fused": False, "schedule": "constant",
         "warmup_steps": 0, "min_lr_ratio": 1.0}
_FSDP_PREFIX = "_fsdp_wrapped_module."


# ---------------------------------------------------------------------------------- the config
def test_fsdp_config_builds_a_lightning_strategy_with_the_block_wrap_policy(compose):
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from sectional_moe.training.run import trainer_kwargs

    strategy = trainer_kwargs(compose("trainer=fsdp"))["strategy"]
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy) and set(policy._module_classes) == decoder_block_classes()
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert strategy._state_dict_type == "full"  # one last.ckpt, which resume=auto reads
    assert strategy._activation_checkpointing_kwargs == {}  # off by default
    assert strategy.kwargs["use_orig_params"] is True  # configure_optimizers sees the original parameters
    # every knob is YAML: e.g. recompute each block in backward, gradients-and-optimizer-only sharding
    tuned = trainer_kwargs(compose("trainer=fsdp", "trainer.strategy.sharding_strategy=SHARD_GRAD_OP",
                                   "trainer.strategy.activation_checkpointing_policy=${trainer.strategy.auto_wrap_policy}"))["strategy"]
    assert tuned.sharding_strategy == ShardingStrategy.SHARD_GRAD_OP
    assert isinstance(tuned._activation_checkpointing_kwargs["auto_wrap_policy"], ModuleWrapPolicy)


# ---------------------------------------------------------------------------------- shared by both runs
def _module(spec: dict[str, Any], seed: int = 0) -> LMModule:
    torch.manual_seed(seed)
    return LMModule(spec, OPTIM, max_steps=STEPS)


def _batches(spec: dict[str, Any]) -> torch.Tensor:
    """(steps, ranks, per-rank batch, seq_len + 1) token ids: rank r trains [step, r]."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(spec["vocab_size"], (STEPS, WORLD, PER_RANK_BATCH, spec["seq_len"] + 1), generator=g)


def _decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters our optimiser decays, decided on the unwrapped model."""
    decay = {id(p) for p in param_groups(model, OPTIM["weight_decay"])[0]["params"]}
    return {name for name, p in model.named_parameters() if id(p) in decay}


def _adamw(model: nn.Module, decay_names: set[str]) -> torch.optim.Optimizer:
    """AdamW with our decay groups, by name, so a sharded model gets the same groups (see
    test_param_groups_survive_fsdp_sharding for why param_groups itself cannot decide there)."""
    groups: tuple[list, list] = ([], [])
    for name, p in model.named_parameters():
        groups[0 if name.replace(_FSDP_PREFIX, "") in decay_names else 1].append(p)
    return torch.optim.AdamW([{"params": groups[0], "weight_decay": OPTIM["weight_decay"]},
                              {"params": groups[1], "weight_decay": 0.0}],
                             lr=OPTIM["lr"], betas=tuple(OPTIM["betas"]), eps=OPTIM["eps"], foreach=False)


# ---------------------------------------------------------------------------------- 2 gloo processes
def _worker(rank: int, port: int, spec: dict[str, Any], policy_cfg: dict[str, Any], out_dir: str) -> None:
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    warnings.filterwarnings("ignore")  # self.log outside a Trainer, FSDP's CPU notes
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    out = Path(out_dir)
    try:
        def shard(model: nn.Module) -> FSDP:
            # the policy exactly as conf/trainer/fsdp.yaml instantiates it
            return FSDP(model, auto_wrap_policy=instantiate(policy_cfg), use_orig_params=True, device_id=torch.device("cpu"))

        module = _module(spec)
        decay = _decay_names(module.model)
        blocks = sum(isinstance(m, tuple(decoder_block_classes())) for m in module.model.modules())
        total = sum(p.numel() for p in module.model.parameters())
        plain_groups = [len(g["params"]) for g in param_groups(module.model, OPTIM["weight_decay"])]
        module.model = shard(module.model)
        units = sum(isinstance(m, FSDP) for m in module.model.modules())
        local = sum(p.numel() for p in module.model.parameters())
        sharded_groups = [len(g["params"]) for g in param_groups(module.model, OPTIM["weight_decay"], module.decay_names)]
        optimizer = _adamw(module.model, decay)
        losses = []
        for step in _batches(spec):
            loss = module.training_step(step[rank], 0)  # the real training loss (aux terms included)
            optimizer.zero_grad()
            loss.backward()  # FSDP reduce-scatters the gradient mean over the ranks
            optimizer.step()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / WORLD)

        # offload_to_cpu=True (Lightning's choice on GPUs) segfaults in FSDP's clone hook on CPU tensors (torch 2.13)
        full_cfg = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
        with FSDP.state_dict_type(module.model, StateDictType.FULL_STATE_DICT, full_cfg):
            full = module.model.state_dict()  # a collective: gathered on rank 0
        if rank == 0:
            atomic_save({"state_dict": full}, out / "full.ckpt")
        dist.barrier()

        # round trip: a differently initialised sharded model loads the file and computes the same
        fresh = _module(spec, seed=1)
        fresh.model = shard(fresh.model)
        saved = torch.load(out / "full.ckpt", weights_only=True)["state_dict"]
        with FSDP.state_dict_type(fresh.model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)):
            fresh.model.load_state_dict(saved)
        probe = _batches(spec)[0, rank]
        with torch.no_grad():
            before, after = module.loss(probe).nll.item(), fresh.loss(probe).nll.item()
        with FSDP.state_dict_type(fresh.model, StateDictType.FULL_STATE_DICT, full_cfg):
            reloaded = fresh.model.state_dict()
        same = rank != 0 or all(torch.equal(reloaded[k], saved[k]) for k in saved) and reloaded.keys() == saved.keys()
        (out / f"rank{rank}.json").write_text(json.dumps({
            "losses": losses, "blocks": blocks, "units": units, "local_params": local, "total_params": total,
            "loss_before_save": before, "loss_after_load": after, "reloaded_state_equal": same,
            "groups": {"plain": plain_groups, "sharded": sharded_groups},
        }))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(spec: dict[str, Any]) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One unsharded process on the same data: the mean of the ranks' losses, one optimiser step each."""
    module = _module(spec)
    optimizer = _adamw(module.model, _decay_names(module.model))
    losses = []
    for step in _batches(spec):
        loss = sum(module.training_step(step[r], 0) for r in range(WORLD)) / WORLD
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, module.model.state_dict()


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path, dict[str, Any]]:
    """One 2-process run of :func:`_worker` -> (per-rank results, its directory, the model spec)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sectional_moe.models.spec import spec_from_config
    from tests.conftest import CONF, TINY

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*TINY, "trainer=fsdp"])  # composes; validation would refuse it here
    GlobalHydra.instance().clear()
    spec = spec_from_config(cfg).to_dict()
    policy_cfg = OmegaConf.to_container(cfg.trainer.strategy.auto_wrap_policy, resolve=True)
    out = tmp_path_factory.mktemp("fsdp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.start_processes(_worker, args=(_free_port(), spec, policy_cfg, str(out)), nprocs=WORLD, start_method="spawn")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)], out, spec


@pytest.mark.filterwarnings("ignore")
def test_fsdp_two_gloo_processes_match_one_unsharded_process(fsdp_run):
    ranks, out, spec = fsdp_run
    ref_losses, ref_state = _reference(spec)
    for r in ranks:
        assert r["losses"] == pytest.approx(ref_losses, abs=1e-5), (r["losses"], ref_losses)
    # the policy made one FSDP unit per decoder block (the pre-expert layer of a sectional block is a
    # TransformerBlock too) plus the root, and each rank holds about half of the parameters
    assert ranks[0]["blocks"] >= spec["n_layers"] and ranks[0]["units"] == ranks[0]["blocks"] + 1
    assert sum(r["local_params"] for r in ranks) == pytest.approx(ranks[0]["total_params"], rel=0.01)
    assert all(r["local_params"] < 0.6 * r["total_params"] for r in ranks)

    # the full state dict is a plain checkpoint with the unsharded model's keys and trained values
    saved = torch.load(out / "full.ckpt", weights_only=True)["state_dict"]
    assert saved.keys() == ref_state.keys()
    for key, value in ref_state.items():
        torch.testing.assert_close(saved[key], value, atol=1e-5, rtol=0, msg=key)
    for r in ranks:  # loaded into a differently initialised sharded model: same weights, same loss
        assert r["loss_after_load"] == r["loss_before_save"] and r["reloaded_state_equal"]


def test_param_groups_survive_fsdp_sharding(fsdp_run):
    groups = fsdp_run[0][0]["groups"]
    assert groups["sharded"] == groups["plain"]
