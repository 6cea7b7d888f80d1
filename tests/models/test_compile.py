"""torch.compile readiness: no graph break inside any block's forward, compiled == eager.

A graph break inside a block splits the compiled region, costs a Python round-trip per step on
GPU and usually hides a host sync; these tests fail on the first new one. They run on CPU at
nano shapes with the cheap Dynamo backends (``eager`` traces only, ``aot_eager`` adds
AOTAutograd's joint forward/backward graph), so the kernels themselves are the eager ones and
the comparisons can be tight. One test compiles every family and routing with **Inductor**,
forward and backward, in a single graph (one compile, not six: on 2 cores a cold Inductor
compile costs about a second per generated kernel). No timing here: speed lives in
``python -m sectional_moe.bench``.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo

from sectional_moe.models import build_model
from sectional_moe.models.kernels import grouped_mm_op
from tests.models.cases import FAMILY_ROUTING, tiny_spec

CASES = [pytest.param(f, r, id=f"{f}-{r}") for f, r in FAMILY_ROUTING]


def _block_and_inputs(family: str, routing: str | None, **kw):
    """First block of a one-layer nano model and its inputs: x (B, T, D), ids (B, T), rope."""
    torch.manual_seed(0)
    spec = tiny_spec(family, routing, n_layers=1, **kw)
    model = build_model(spec)
    ids = torch.randint(0, spec.vocab_size, (2, spec.seq_len))
    x = model.embed(ids).detach()
    return model.blocks[0], x, ids, model.rope


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


@pytest.mark.parametrize("family,routing", CASES)
def test_block_forward_has_no_graph_break(family, routing):
    block, x, ids, rope = _block_and_inputs(family, routing)
    explained = dynamo.explain(block)(x, ids, rope)
    reasons = [b.reason for b in explained.break_reasons]
    assert explained.graph_break_count == 0, f"graph breaks in the {family}/{routing} block: {reasons}"
    assert explained.graph_count == 1


def test_capacity_factor_block_has_no_graph_break():
    block, x, ids, rope = _block_and_inputs("moe", "topk", capacity_factor=1.25)
    explained = dynamo.explain(block)(x, ids, rope)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


# The routed families are the ones with non-trivial compile paths (the fp32 grouped GEMM goes
# through our custom op and its autograd formula); dense and segment_fixed use plain aten ops and
# are covered by the graph-break test above. Kept to two cases: each trace takes seconds on CPU.
@pytest.mark.parametrize("family,routing", [pytest.param("moe", "topk", id="moe-topk"), pytest.param("sectional", "topk", id="sectional-topk")])
def test_compiled_block_matches_eager_forward_and_backward(family, routing):
    """fullgraph=True raises on any graph break; aot_eager also traces the backward graph (and
    with it the autograd formula of the grouped-GEMM custom op used under compile)."""
    block, x, ids, rope = _block_and_inputs(family, routing)
    x = x.requires_grad_()
    out_ref, _ = block(x, ids, rope)
    out_ref.square().mean().backward()
    grads_ref = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
    dx_ref = x.grad.clone()
    block.zero_grad(set_to_none=True)
    x.grad = None

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    out, _ = compiled(x, ids, rope)
    out.square().mean().backward()
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, dx_ref, atol=1e-5, rtol=1e-5)
    assert grads_ref.keys() == {n for n, p in block.named_parameters() if p.grad is not None}
    for name, g in grads_ref.items():
        torch.testing.assert_close(dict(block.named_parameters())[name].grad, g, atol=1e-5, rtol=1e-5, msg=name)


def test_grouped_mm_custom_op_passes_opcheck_and_matches_aten():
    """The opaque op used under compile: schema, fake kernel and autograd formula are consistent,
    and it computes the same as the eager expert path."""
    torch.manual_seed(0)
    x = torch.randn(24, 16, requires_grad=True)
    w = torch.randn(3, 16, 8, requires_grad=True)
    offs = torch.tensor([5, 5, 24], dtype=torch.int32)  # an empty group in the middle
    torch.library.opcheck(grouped_mm_op, (x, w, offs))
    y = grouped_mm_op(x, w, offs)
    y_ref = torch._grouped_mm(x, w, offs=offs)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), g)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x, w), g)
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(dw, dw_ref)



@pytest.mark.slow
def test_every_family_compiles_with_inductor_and_matches_eager():
    """Every family/routing block (and token MoE top-k under bf16 autocast, whose grouped GEMM
    Inductor lowers itself) in ONE fullgraph Inductor compile: no graph break anywhere, and the
    compiled outputs and gradients equal eager's."""
    import torch._inductor.config as inductor_config

    cases = [(f, r, False) for f, r in FAMILY_ROUTING] + [("moe", "topk", True)]
    blocks = [_block_and_inputs(f, r) for f, r, _ in cases]

    def run_all(xs):
        outs = []
        for (block, _, ids, rope), x, (_, _, bf16) in zip(blocks, xs, cases):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                outs.append(block(x, ids, rope)[0].float())
        return outs

    def grads(fn):
        """Outputs and per-case gradients (input, then each parameter) of one summed loss."""
        xs = [x.clone().requires_grad_() for _, x, _, _ in blocks]
        per_case = [[x, *block.parameters()] for x, (block, *_) in zip(xs, blocks)]
        outs = fn(xs)
        flat = torch.autograd.grad(sum(o.square().mean() for o in outs), [t for ts in per_case for t in ts], allow_unused=True)
        it = iter(flat)
        return outs, [[next(it) for _ in ts] for ts in per_case]

    outs_ref, grads_ref = grads(run_all)
    with inductor_config.patch(compile_threads=1):  # a worker pool costs more than it saves on 2 cores
        outs, grads_c = grads(torch.compile(run_all, backend="inductor", fullgraph=True, dynamic=False))
    for (f, r, bf16), o, o_ref, gs, gs_ref in zip(cases, outs, outs_ref, grads_c, grads_ref):
        tol = 3e-2 if bf16 else 1e-4  # bf16: Inductor fuses and rounds elsewhere than eager
        torch.testing.assert_close(o, o_ref, atol=tol, rtol=tol, msg=f"{f}-{r} bf16={bf16} output")
        for g, g_ref in zip(gs, gs_ref):
            assert (g is None) == (g_ref is None), f"{f}-{r}: gradient presence differs"
            if g_ref is not None:
                err = ((g.float() - g_ref.float()).abs().max() / g_ref.float().abs().max().clamp_min(1e-12)).item()
                assert err < tol, f"{f}-{r} bf16={bf16}: compiled gradient differs from eager by {err:.2e} (relative to max)"
