"""Measured FLOPs of a real forward/backward pass, to check the analytic counts of :mod:`flops`.

``torch.utils.flop_counter.FlopCounterMode`` counts the matmuls that actually execute on a real
device (it is data-dependent, so routed experts count what was dispatched). Out of the box it
misses two ops we use on CPU: the fused CPU SDPA kernel and ``grouped_mm``; we register their
formulas here (same conventions as torch's own GPU SDPA formulas: no causal discount).
"""

from __future__ import annotations

import torch
from torch.utils import flop_counter as fc

aten = torch.ops.aten


def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return fc.sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _grouped_mm(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """2 FLOPs per multiply-add: 2D x 3D (M, K) @ (G, K, N) -> 2MKN; 2D x 2D (K, M) @ (M, N) with
    groups along M (the weight gradient) -> 2KMN as well; 3D x 3D batched -> 2GMKN."""
    if len(a_shape) == 2 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    if len(a_shape) == 3 and len(b_shape) == 2:  # (G, M, K) @ (K*, N) with groups along b
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[1] // max(1, b_shape[0] // a_shape[2])
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[-1]


CUSTOM_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward,
    aten._grouped_mm: _grouped_mm,
}


def measure_flops(model: torch.nn.Module, ids: torch.Tensor, training: bool = True) -> int:
    """Matmul FLOPs of one forward (and backward if ``training``) of ``model`` on ``ids``."""
    counter = fc.FlopCounterMode(display=False, custom_mapping=CUSTOM_FORMULAS)
    with counter:
        logits, _ = model(ids)
        if training:
            logits.float().logsumexp(-1).mean().backward()
    return counter.get_total_flops()
