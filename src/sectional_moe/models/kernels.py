"""Compute kernels the experts need beyond plain PyTorch ops: the grouped GEMM.

:func:`grouped_mm` multiplies consecutive row groups of ``x`` by their own weight matrix, the
core of dropless token routing (torchtitan's and Megablocks' "grouped GEMM"). Under
``torch.compile`` an fp32 call goes through an opaque custom op with shape-only fake kernels
(``sectional_moe::grouped_mm``) because the meta kernel of ``aten._grouped_mm`` accepts bf16 only.

Imports: torch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Grouped GEMM rows x[offs[e-1]:offs[e]] @ w[e]: x (M, K), w (G, K, N), offs (G,) int32 -> (M, N).

    Under autocast both sides are cast to the autocast dtype explicitly (the op is not on every
    backend's autocast list, and it wants one dtype on both sides), so bf16-mixed training runs
    the experts in bf16 on GPU. Under ``torch.compile`` a non-bf16 call goes through the opaque
    :func:`grouped_mm_op`: the fake (meta) kernel of ``aten._grouped_mm`` accepts only bf16, so
    an fp32 call would otherwise break the graph; a bf16 call stays on aten (Inductor lowers it).
    """
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dtype), w.to(dtype)
    elif x.dtype != w.dtype:
        w = w.to(x.dtype)
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return grouped_mm_op(x, w, offs)
    return F.grouped_mm(x, w, offs=offs)


# --- grouped GEMM as an opaque custom op (torch.compile, non-bf16) --------------------------------
# Same maths as aten._grouped_mm, but with our own shape-only fake kernels, so Dynamo/AOTAutograd
# trace it at fp32 without running aten's bf16-only meta check. Eager code never calls these
# (FlopCounterMode and the loop references see plain aten ops).


@torch.library.custom_op("sectional_moe::grouped_mm", mutates_args=(), schema="(Tensor x, Tensor w, Tensor offs) -> Tensor")
def grouped_mm_op(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x (M, K) grouped along M by offs, w (G, K, N) -> (M, N)."""
    return torch._grouped_mm(x, w, offs=offs)


@grouped_mm_op.register_fake
def _(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("sectional_moe::grouped_mm_wgrad", mutates_args=(), schema="(Tensor x, Tensor dy, Tensor offs) -> Tensor")
def grouped_mm_wgrad_op(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Weight gradient of :func:`grouped_mm_op`: per group g, x_g^T @ dy_g. x (M, K), dy (M, N) -> (G, K, N)."""
    return torch._grouped_mm(x.t(), dy, offs=offs)


@grouped_mm_wgrad_op.register_fake
def _(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(offs.shape[0], x.shape[1], dy.shape[1])


def _grouped_mm_setup(ctx, inputs, output) -> None:
    x, w, offs = inputs
    ctx.save_for_backward(x, w, offs)


def _grouped_mm_backward(ctx, grad_out: torch.Tensor):
    x, w, offs = ctx.saved_tensors
    grad_out = grad_out.contiguous()  # the CPU/CUDA kernels want 16-byte-aligned row strides
    dx = grouped_mm_op(grad_out, w.transpose(-2, -1), offs) if ctx.needs_input_grad[0] else None
    dw = grouped_mm_wgrad_op(x, grad_out, offs) if ctx.needs_input_grad[1] else None
    return dx, dw, None


grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)
