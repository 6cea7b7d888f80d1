"""The CPU fast path: precision=auto, what stays fp32 under bf16-mixed, compile=auto's rule, the compile fallback,
and malloc_reuse (freed host memory reused, not page-faulted in again).

No timing here (speed is the benchmark's business): these check the decisions and their safety.
"""

from __future__ import annotations

import os
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch

from sectional_moe import device as dev
from sectional_moe.errors import ConfigError
from sectional_moe.models import build_model
from sectional_moe.models.loss import lm_loss
from sectional_moe.training.compiling import try_compile
from sectional_moe.training.module import LMModule
from tests.models.cases import tiny_spec

OPTIM = {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "schedule": "constant",
         "warmup_steps": 0, "min_lr_ratio": 0.1}


# ---------------------------------------------------------------------------------------------- precision=auto
@pytest.mark.parametrize("native,speedup,expected", [
    (None, None, "32-true"),           # no avx512_bf16/AMX: bf16 would be emulated
    ("amx", None, "bf16-mixed"),       # AMX tiles: no probe needed
    ("avx512_bf16", 0.55, "32-true"),  # the flag, but bf16 matmuls slower than fp32 (a host of this machine kind)
    ("avx512_bf16", 3.0, "bf16-mixed"),
])
def test_precision_auto_on_cpu_follows_native_bf16_and_its_measured_speed(monkeypatch, native, speedup, expected):
    monkeypatch.setattr(dev, "cpu_native_bf16", lambda: native)
    monkeypatch.setattr(dev, "cpu_bf16_gemm_speedup", lambda: speedup)
    choice = dev.choose_precision({"accelerator": "cpu", "precision": "auto"})
    assert choice.precision == expected
    assert choice.reason.startswith("auto:")


def test_precision_auto_is_bf16_on_cuda_and_explicit_values_win(monkeypatch):
    assert dev.choose_precision({"accelerator": "gpu", "precision": "auto"}).precision == "bf16-mixed"
    monkeypatch.setattr(dev, "cpu_native_bf16", lambda: "amx")
    assert dev.choose_precision({"accelerator": "cpu", "precision": "32-true"}) == ("32-true", "configured")


def test_cpu_flags_are_read_from_proc_cpuinfo():
    flags = dev.cpu_flags()
    assert isinstance(flags, frozenset)
    native = dev.cpu_native_bf16()
    assert native in (None, "amx", "avx512_bf16")
    if "avx512_bf16" in flags and "amx_bf16" not in flags:
        assert native in ("avx512_bf16", "amx")


# ---------------------------------------------------------------------------------------------- what stays fp32
def test_router_logits_stay_fp32_under_bf16_autocast():
    """bf16 logits would flip near-tied experts: the top-k router must decide exactly as in fp32."""
    torch.manual_seed(0)
    model = build_model(tiny_spec("moe", "topk"))
    router = model.blocks[0].ffn.router
    x = torch.randn(64, model.spec.d_model)
    ids = torch.zeros(1, 64, dtype=torch.long)
    ref = router(x, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = router(x, ids)
    assert got.weights.dtype == torch.float32 and got.z_loss.dtype == torch.float32
    assert torch.equal(got.expert_ids, ref.expert_ids)
    torch.testing.assert_close(got.weights, ref.weights, rtol=0, atol=0)


def test_bf16_mixed_keeps_weights_optimizer_state_and_loss_in_fp32():
    """A Lightning bf16-mixed step with the fused AdamW and gradient clipping (Lightning refuses to
    clip fused optimisers under mixed precision; bf16 has no scaler, so LMModule clips itself)."""
    spec = tiny_spec("moe", "topk")
    module = LMModule(spec.to_dict(), OPTIM, max_steps=2)
    data = torch.randint(0, spec.vocab_size, (4, spec.seq_len + 1))
    losses = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"])

    trainer = pl.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         gradient_clip_val=1.0, callbacks=[Spy()])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=2))
    assert all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in losses)
    assert all(p.dtype == torch.float32 for p in module.model.parameters())
    state = trainer.optimizers[0].state
    assert state and all(v.dtype == torch.float32 for s in state.values() for k, v in s.items() if k != "step")


def test_loss_is_fp32_and_matches_cross_entropy_for_bf16_logits():
    torch.manual_seed(0)
    model = build_model(tiny_spec("dense", None))
    batch = torch.randint(0, model.spec.vocab_size, (2, model.spec.seq_len + 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lm_loss(model, batch)
        logits, _ = model(batch[:, :-1])
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
    assert out.nll.dtype == torch.float32
    torch.testing.assert_close(out.nll, ref)


# ---------------------------------------------------------------------------------------------- compile=auto
def test_compile_rule_compiles_only_when_the_remaining_steps_repay_the_compile_time():
    rule = dev.CompileRule(speedup=1.25, compile_s=60.0, decide_after=10)
    # saving = remaining x step x (1 - 1/1.25) = remaining x step x 0.2
    assert rule.pays(remaining_steps=1000, eager_step_s=0.5)  # 100 s >= 60 s
    assert not rule.pays(remaining_steps=500, eager_step_s=0.5)  # 50 s < 60 s
    assert "1000 remaining steps" in rule.explain(1000, 0.5) and ">= 60 s compile" in rule.explain(1000, 0.5)


def test_compile_rule_defaults_per_device_and_bad_values_are_refused():
    assert dev.compile_rule(None, "cpu") == dev.CompileRule(**dev.COMPILE_DEFAULTS["cpu"])
    assert dev.compile_rule({"speedup": 2.0, "compile_s": None, "decide_after": None}, "cpu").speedup == 2.0
    for bad in ({"speedup": 1.0}, {"compile_s": -1}, {"decide_after": 1}, {"decide_after": True}):
        with pytest.raises(ConfigError, match="compile_rule"):
            dev.compile_rule(bad, "cpu")
    assert dev.resolve_compile({"compile": "auto"}) == "auto"
    assert dev.resolve_compile({"compile": True}) == "on" and dev.resolve_compile({"compile": False}) == "off"


def _fit(module: LMModule, steps: int) -> pl.Trainer:
    spec = module.spec
    data = torch.randint(0, spec.vocab_size, (2 * steps, spec.seq_len + 1))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=2))
    return trainer


def test_compile_auto_stays_eager_when_the_run_is_too_short():
    module = LMModule(tiny_spec("dense", None).to_dict(), OPTIM, max_steps=12, compile="auto",
                      compile_rule={"speedup": 1.2, "compile_s": 60.0, "decide_after": 3})
    _fit(module, 12)
    assert module.compile_report["decision"] == "eager"
    assert module.compile_report["remaining_steps"] == 9 and module._compiled is None


_BROKEN_COMPILER_RUN = """
import logging, sys
import torch, torch._inductor.config as inductor_config
import lightning.pytorch as pl
from sectional_moe.training.module import LMModule
from tests.models.cases import tiny_spec
from tests.training.test_fast_path import OPTIM
inductor_config.cpp.cxx = ("/nonexistent/c++",)
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(levelname)s %(message)s")
spec = tiny_spec("dense", None)
module = LMModule(spec.to_dict(), OPTIM, max_steps=3, compile=True)
data = torch.randint(0, spec.vocab_size, (6, spec.seq_len + 1))
trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)
trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=2))
print("RESULT", module.compile_report["decision"], trainer.global_step)
"""


def test_compile_failure_falls_back_to_eager_with_one_warning():
    """No working C++ compiler: one warning line, no exception, the run trains eagerly to the end.
    (In a subprocess: Inductor caches the compiler it found for the life of the process.)"""
    import subprocess
    import sys

    from tests.conftest import REPO

    proc = subprocess.run([sys.executable, "-c", _BROKEN_COMPILER_RUN], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [line for line in proc.stdout.splitlines() if line.startswith("WARNING") and "torch.compile" in line]
    assert len(warnings) == 1, proc.stdout
    assert "training continues eagerly" in warnings[0] and "InvalidCxxCompiler" in warnings[0]
    assert "RESULT failed 3" in proc.stdout
    assert len(proc.stdout) + len(proc.stderr) < 5000, "a compiler failure must not dump pages of output"


def test_try_compile_reports_a_failing_model_in_one_line():
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom\nwith\nmany\nlines")

    result = try_compile(Broken(), lambda m: m(torch.ones(2)).sum())
    assert result.compiled is None and result.error is not None
    assert "\n" not in result.error and "boom" in result.error


def test_clipping_inside_the_fused_optimizer_equals_clip_grad_norm():
    """LMModule under Lightning clips through AdamW's grad_scale; a bare loop with torch's
    clip_grad_norm_ must end at the same weights (the clipping is active at this threshold)."""
    spec = tiny_spec("moe", "topk")
    data = torch.randint(0, spec.vocab_size, (6, spec.seq_len + 1))
    torch.manual_seed(0)
    lit = LMModule(spec.to_dict(), OPTIM, max_steps=3)
    torch.manual_seed(0)
    bare = LMModule(spec.to_dict(), OPTIM, max_steps=3)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=0.05)
    trainer.fit(lit, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=2))
    conf = bare.configure_optimizers()
    optimizer, scheduler = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    for batch in torch.utils.data.DataLoader(data, batch_size=2):
        bare.loss(batch).loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(bare.model.parameters(), 0.05)
        assert norm > 0.05  # clipping is active
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    for (name, a), b in zip(lit.model.named_parameters(), bare.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------- malloc_reuse
# a fresh interpreter (mallopt is process-wide): page faults of re-allocating a freed 64 MiB buffer
_FAULTS = """
import resource, sys
from sectional_moe.device import reuse_host_memory
if sys.argv[1] != "off":
    assert reuse_host_memory({"true": True, "auto": "auto"}[sys.argv[1]], "cpu").applied
buf = bytearray(64 << 20); del buf  # first use: faults in either case
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    buf = bytearray(64 << 20); del buf  # bytearray writes every page (zero fill)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_malloc_reuse_stops_the_page_faults_of_reallocating_freed_buffers():
    def faults(mode: str) -> int:
        env = {k: v for k, v in os.environ.items() if k not in dev.HOST_MALLOC_USER_ENV}
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True, env=env)
        return int(out.stdout.strip())

    pages = 4 * (64 << 20) // 4096
    assert faults("off") > pages // 2  # glibc maps and unmaps a block this size on every allocation
    assert faults("auto") < pages // 20  # kept in the heap: the same pages again


def test_malloc_reuse_auto_leaves_gpu_runs_and_a_users_allocator_alone(monkeypatch):
    for key in dev.HOST_MALLOC_USER_ENV:
        monkeypatch.delenv(key, raising=False)
    assert dev.reuse_host_memory("auto", "cuda") == (False, "cuda run")
    assert dev.reuse_host_memory(False, "cpu") == (False, "malloc_reuse=false")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    choice = dev.reuse_host_memory("auto", "cpu")
    assert not choice.applied and "LD_PRELOAD" in choice.reason


def test_malloc_reuse_says_when_there_is_no_glibc(monkeypatch):
    monkeypatch.setattr(dev.platform, "libc_ver", lambda: ("", ""))
    for key in dev.HOST_MALLOC_USER_ENV:
        monkeypatch.delenv(key, raising=False)
    choice = dev.reuse_host_memory(True, "cpu")
    assert not choice.applied and choice.reason.startswith("not glibc")


def test_the_threaded_gradient_norm_equals_torchs_total_norm():
    """Large CPU gradients are reduced in row blocks (all threads); small, odd-sized and strided ones whole."""
    from sectional_moe.training.optim import total_grad_norm

    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(16, 64, 96, generator=gen), torch.randn(257, 259, generator=gen),
             torch.randn(300, 256, generator=gen).t(), torch.randn(7, generator=gen)]
    exact = torch.stack([g.double().pow(2).sum() for g in grads]).sum().sqrt()
    ours = total_grad_norm(grads)
    assert ours.dtype == torch.float32 and ours.dim() == 0
    torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=0)
    torch.testing.assert_close(ours, torch.nn.utils.get_total_norm(grads), rtol=1e-5, atol=0)
