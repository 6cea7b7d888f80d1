"""Model tests: causality, vectorised experts vs loop reference, degenerate cases, routing properties."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch

from sectional_moe.models import build_model
from sectional_moe.models.blocks import Rope, TransformerBlock, rms_norm
from sectional_moe.models.experts import ExpertFFN
from sectional_moe.models.routers import expert_counts, hash_table, load_balance_loss, route_topk
from sectional_moe.models.sectional import SectionalMoEBlock, SectionAttention, SectionExperts
from tests.models import reference_experts as ref
from tests.models.cases import FAMILY_ROUTING, all_cases, tiny_spec

@pytest.mark.parametrize("family,routing,kw", list(all_cases()))
def test_changing_future_tokens_never_changes_past_logits(family, routing, kw):
    torch.manual_seed(0)
    spec = tiny_spec(family, routing, **kw)
    model = build_model(spec).eval()
    ids = torch.randint(0, spec.vocab_size, (2, spec.seq_len))
    with torch.no_grad():
        base, _ = model(ids)
        for t in (0, 1, 3, 7, 13, spec.seq_len - 2):
            changed = ids.clone()
            changed[:, t + 1 :] = torch.randint(0, spec.vocab_size, changed[:, t + 1 :].shape)
            out, _ = model(changed)
            # routed GEMMs regroup rows when later tokens change expert, which may move the last
            # float bit (~1e-8); a real leak moves logits by ~1e-1
            past = (out[:, : t + 1] - base[:, : t + 1]).abs().max().item()
            assert past < 1e-6, f"position <= {t} saw a later token (max change {past:.2e})"
            assert (out[:, t + 1 :] - base[:, t + 1 :]).abs().max().item() > 1e-3  # visible later


@pytest.mark.parametrize("family,routing", [("moe", "topk"), ("moe", "hash"), ("sectional", "topk"), ("sectional", "hash")])
def test_capacity_dropping_is_causal(family, routing):
    """Over-capacity assignments are dropped position-major, so a later token never evicts an earlier one."""
    torch.manual_seed(0)
    spec = tiny_spec(family, routing, capacity_factor=0.5, **({"seq_reduction": 2} if family == "sectional" else {}))
    model = build_model(spec).train()  # capacity drops in training
    ids = torch.randint(0, spec.vocab_size, (2, spec.seq_len))
    with torch.no_grad():
        base, aux = model(ids)
        assert max(a.drop_frac.item() for a in aux if a is not None) > 0.1  # the capacity really bites
        for t in (0, 5, 12, spec.seq_len - 2):
            changed = ids.clone()
            changed[:, t + 1:] = torch.randint(0, spec.vocab_size, changed[:, t + 1:].shape)
            out, _ = model(changed)
            assert (out[:, : t + 1] - base[:, : t + 1]).abs().max().item() < 1e-6, f"position <= {t} saw a later token"


@pytest.mark.parametrize("family,routing", [("moe", "topk"), ("sectional", "topk"), ("sectional", "hash")])
def test_evaluation_with_a_capacity_factor_is_dropless_and_never_depends_on_other_sequences(family, routing):
    """Capacity is shared by a batch: in training a row's drops depend on its neighbours, so
    evaluation is dropless and a sequence's logits are the same alone, in any batch, at any size."""
    torch.manual_seed(0)
    spec = tiny_spec(family, routing, capacity_factor=0.5, **({"seq_reduction": 2} if family == "sectional" else {}))
    model = build_model(spec).eval()
    ids = torch.randint(0, spec.vocab_size, (8, spec.seq_len))
    with torch.no_grad():
        batch, aux = model(ids)
        assert all(a.drop_frac is None for a in aux if a is not None)
        for size in (1, 2, 4):
            alone, _ = model(ids[:size])
            torch.testing.assert_close(alone, batch[:size], atol=1e-5, rtol=1e-5)
        shuffled, _ = model(ids.flip(0))
        torch.testing.assert_close(shuffled.flip(0), batch, atol=1e-5, rtol=1e-5)


def test_causal_priority_orders_by_position_then_row_then_section():
    from sectional_moe.models.experts import causal_priority

    # token MoE: items (b, t) row-major; B=2, T=3 -> priorities t*B + b
    assert causal_priority(batch=2, seq=3).tolist() == [0, 2, 4, 1, 3, 5]
    # sectional slices (g, b, t) section-major; G=2, B=1, T=2 -> (t*B + b)*G + g
    assert causal_priority(batch=1, seq=2, groups=2, group_major=True).tolist() == [0, 2, 1, 3]


def test_capacity_with_priority_equals_loop_reference():
    from sectional_moe.models.experts import causal_priority

    torch.manual_seed(0)
    ffn = ExpertFFN(4, 8, 12)
    B, T, K = 2, 16, 2
    x = torch.randn(B * T, 8)
    weights, ids, _ = route_topk(torch.randn(B * T, 4) * 3, K)
    prio = causal_priority(batch=B, seq=T)
    y, dropped = ffn.forward_routed(x, ids, weights, expert_counts(ids, 4), capacity_factor=0.75, priority_N=prio)
    capacity = 12  # ceil(0.75 * 32 * 2 / 4)
    torch.testing.assert_close(y, ref.routed_ffn(ffn, x, ids, weights, capacity=capacity, priority_N=prio), atol=1e-5, rtol=1e-5)
    assert dropped > 0


def test_dedicated_experts_equal_loop_reference():
    torch.manual_seed(0)
    ffn = ExpertFFN(4, 8, 12)
    x = torch.randn(4, 10, 8)
    torch.testing.assert_close(ffn.forward_dedicated(x), ref.dedicated_ffn(ffn, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_routed_experts_equal_loop_reference(k):
    torch.manual_seed(k)
    ffn = ExpertFFN(5, 8, 12)
    x = torch.randn(40, 8)
    weights, ids, _ = route_topk(torch.randn(40, 5), k)
    counts = expert_counts(ids, 5)
    y, dropped = ffn.forward_routed(x, ids, weights, counts)
    torch.testing.assert_close(y, ref.routed_ffn(ffn, x, ids, weights), atol=1e-5, rtol=1e-5)
    assert dropped == 0


def test_capacity_factor_drops_exactly_the_overflow():
    torch.manual_seed(0)
    ffn = ExpertFFN(4, 8, 12)
    x = torch.randn(32, 8)
    ids = torch.zeros(32, 1, dtype=torch.long)  # everything to expert 0: heavy overflow
    ids[::4] = 1
    w = torch.ones(32, 1)
    cf = 1.0
    y, dropped = ffn.forward_routed(x, ids, w, expert_counts(ids, 4), capacity_factor=cf)
    capacity = 8  # ceil(1.0 * 32 * 1 / 4)
    torch.testing.assert_close(y, ref.routed_ffn(ffn, x, ids, w, capacity=capacity), atol=1e-5, rtol=1e-5)
    assert dropped.item() == pytest.approx((24 - 8) / 32)


def test_section_attention_equals_loop_reference():
    torch.manual_seed(0)
    spec = tiny_spec("sectional", "segment_fixed", experts=2, seq_reduction=2)
    attn = SectionAttention(spec)
    rope = Rope({spec.section_head_dim}, spec.seq_len)
    B, T = 3, 16
    x = torch.randn(2, B * T, spec.section_dim)
    torch.testing.assert_close(attn(x, B, T, rope, 2), ref.section_attention(attn, x, B, T, rope, 2), atol=1e-5, rtol=1e-5)


def _copy_dense_into_section_experts(dense: TransformerBlock, block: SectionalMoEBlock) -> None:
    ex = block.experts
    with torch.no_grad():
        ex.attn.wq.copy_(dense.attn.wq.weight.t().unsqueeze(0))
        ex.attn.wkv.copy_(dense.attn.wkv.weight.t().unsqueeze(0))
        ex.attn.wo.copy_(dense.attn.wo.weight.t().unsqueeze(0))
        ex.attn_norm.copy_(dense.attn_norm.weight.view(1, 1, -1))
        ex.ffn_norm.copy_(dense.ffn_norm.weight.view(1, 1, -1))
        ex.ffn.w13.copy_(dense.ffn.w13.weight.t().unsqueeze(0))
        ex.ffn.w2.copy_(dense.ffn.w2.weight.t().unsqueeze(0))


def test_one_section_no_shortening_no_pre_expert_is_a_dense_block():
    torch.manual_seed(0)
    spec = tiny_spec("sectional", "segment_fixed", experts=1, seq_reduction=1, pre_expert=False)
    dense, block = TransformerBlock(spec), SectionalMoEBlock(spec, 0)
    for p in dense.parameters():  # random norms too, so a norm mix-up would show
        torch.nn.init.normal_(p, std=0.2)
    _copy_dense_into_section_experts(dense, block)
    rope = Rope({spec.head_dim}, spec.seq_len)
    x, ids = torch.randn(2, spec.seq_len, spec.d_model), torch.zeros(2, spec.seq_len, dtype=torch.long)
    torch.testing.assert_close(block(x, ids, rope)[0], dense(x, ids, rope)[0], atol=1e-5, rtol=1e-5)


def test_one_section_with_pre_expert_is_two_stacked_dense_blocks():
    torch.manual_seed(0)
    spec = tiny_spec("sectional", "segment_fixed", experts=1, seq_reduction=1, pre_expert=True)
    first, second, block = TransformerBlock(spec), TransformerBlock(spec), SectionalMoEBlock(spec, 0)
    block.pre_expert.load_state_dict(first.state_dict())
    _copy_dense_into_section_experts(second, block)
    rope = Rope({spec.head_dim}, spec.seq_len)
    x, ids = torch.randn(2, spec.seq_len, spec.d_model), torch.zeros(2, spec.seq_len, dtype=torch.long)
    expected = second(first(x, ids, rope)[0], ids, rope)[0]
    torch.testing.assert_close(block(x, ids, rope)[0], expected, atol=1e-5, rtol=1e-5)


def test_load_balance_loss_is_one_at_uniform_routing():
    E, N, k = 8, 64, 2
    probs = torch.full((N, E), 1.0 / E)
    ids = torch.arange(N * k).remainder(E).view(N, k)
    lb = load_balance_loss(probs_NE=probs, counts_E=expert_counts(ids, E), top_k=k)
    assert lb.item() == pytest.approx(1.0, abs=1e-6)
    skewed = torch.zeros(N, k, dtype=torch.long)  # all to expert 0, router agrees
    probs_skew = torch.zeros(N, E)
    probs_skew[:, 0] = 1.0
    assert load_balance_loss(probs_NE=probs_skew, counts_E=expert_counts(skewed, E), top_k=k).item() == pytest.approx(E)


@pytest.mark.parametrize("family", ["moe", "sectional"])
def test_topk_gradients_reach_every_expert_and_the_router(family):
    torch.manual_seed(0)
    spec = tiny_spec(family, "topk", experts=4, n_layers=1)
    model = build_model(spec)
    ids = torch.randint(0, spec.vocab_size, (8, spec.seq_len))
    logits, aux = model(ids)
    loss = logits.logsumexp(-1).mean() + aux[0].lb_loss
    loss.backward()
    block = model.blocks[0]
    ffn_owner = block.ffn if family == "moe" else block.experts
    w13_grad = ffn_owner.experts.w13.grad if family == "moe" else ffn_owner.ffn.w13.grad
    per_expert = w13_grad.abs().flatten(1).sum(1)
    assert (per_expert > 0).all(), f"experts without gradient: {per_expert}"
    assert ffn_owner.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["moe", "sectional"])
@pytest.mark.parametrize("k", [1, 2])
def test_router_learns_from_the_lm_loss_alone(family, k):
    """No aux loss in the objective: the router's gradient must come from the gates (k = 1 included)."""
    torch.manual_seed(0)
    spec = tiny_spec(family, "topk", experts=4, n_layers=1, top_k=k)
    model = build_model(spec)
    ids = torch.randint(0, spec.vocab_size, (4, spec.seq_len))
    logits, _ = model(ids)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    block = model.blocks[0]
    router = (block.ffn if family == "moe" else block.experts).router
    assert router.weight.grad.abs().max().item() > 1e-6


def test_single_expert_gate_is_the_router_probability():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    w1, ids1, probs = route_topk(logits, 1)
    assert ids1.tolist() == [[0]] and w1.item() == pytest.approx(probs[0, 0].item()) and w1.item() < 1
    w2, _, _ = route_topk(logits, 2)
    assert w2.sum().item() == pytest.approx(1.0)


def _table_digest(seed: int) -> str:
    code = (
        "import hashlib, torch; from sectional_moe.models.routers import hash_table; "
        f"t = hash_table(rows=1000, cols=4, num_experts=8, seed={seed}); "
        "print(hashlib.sha1(t.numpy().tobytes()).hexdigest())"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_hash_table_identical_across_processes_and_leaves_global_rng_alone():
    import hashlib

    state = torch.get_rng_state()
    here = hashlib.sha1(hash_table(rows=1000, cols=4, num_experts=8, seed=3).numpy().tobytes()).hexdigest()
    assert torch.equal(state, torch.get_rng_state()), "hash_table must not touch the global RNG"
    assert _table_digest(3) == here
    assert _table_digest(4) != here


@pytest.mark.parametrize("family", ["moe", "sectional"])
def test_hash_table_survives_checkpoint_restore(family):
    spec = tiny_spec(family, "hash", hash_seed=11)
    model = build_model(spec)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    other = build_model(tiny_spec(family, "hash", hash_seed=99))
    tables = [n for n, _ in model.named_buffers() if n.endswith("table")]
    assert tables, "hash routing must store its table as a buffer"
    before = {n: b.clone() for n, b in other.named_buffers() if n.endswith("table")}
    other.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    for name in tables:
        assert torch.equal(dict(other.named_buffers())[name], dict(model.named_buffers())[name])
        assert not torch.equal(before[name], dict(other.named_buffers())[name])


def _per_slice_routed_ffn(experts, s: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Plain loop reference of SectionExperts' routed FFN: for every token (b, t) and section e, the
    slice s[b, t, e*S:(e+1)*S] is normed with section e's norm weight and sent to its experts, chosen
    by the shared router (softmax, top k, renormalised for k > 1) or by the hash table at
    (token id, section); the output slice is the weighted sum of their FFNs."""
    B, T, D = s.shape
    E, S, ffn = experts.E, D // experts.E, experts.ffn
    out = torch.zeros_like(s)
    for b in range(B):
        for t in range(T):
            for e in range(E):
                h = rms_norm(s[b, t, e * S : (e + 1) * S], experts.ffn_norm[e, 0], experts.eps)  # (S,)
                if experts.router.rule.name == "topk":
                    probs = torch.softmax(experts.router.weight @ h, dim=-1)  # (E,)
                    top, chosen = probs.topk(experts.router.top_k)
                    weights = top / top.sum() if experts.router.top_k > 1 else top
                else:
                    chosen, weights = experts.router.table[ids[b, t], e].view(1), torch.ones(1)
                for w, x in zip(weights, chosen):
                    out[b, t, e * S : (e + 1) * S] += w * ref.expert_ffn(ffn.w13[x], ffn.w2[x], h)
    return out


@pytest.mark.parametrize("routing,k", [("topk", 1), ("topk", 2), ("topk", 3), ("hash", 1)])
@pytest.mark.parametrize("expert_attention", [False, True])
def test_routed_section_experts_equal_a_per_slice_loop(routing, k, expert_attention):
    """The full routed path (section-major reshape, routing or table lookup per (token id, section),
    grouped GEMM dispatch, weighted sum, back to (B, T, D)) against one slice at a time."""
    torch.manual_seed(k)
    spec = tiny_spec("sectional", routing, top_k=k, seq_reduction=2, expert_attention=expert_attention)
    experts = SectionExperts(spec, layer=0, rope_stride=2)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(std=0.5 if p.dim() == 3 and p.shape[1] == 1 else 0.3)  # random norms, a decisive router
    B, T = 2, 6
    s, ids = torch.randn(B, T, spec.d_model), torch.randint(0, spec.vocab_size, (B, T))
    rope = Rope({spec.section_head_dim}, spec.seq_len)
    got, aux = experts(s, ids, rope)
    expected = torch.zeros_like(s)
    with torch.no_grad():
        x = s
        if expert_attention:  # the attention part by its own loop reference, token by token back to (B, T, D)
            x_ENS = torch.stack([s[:, :, e * spec.section_dim : (e + 1) * spec.section_dim].reshape(B * T, -1) for e in range(4)])
            x_ENS = rms_norm(x_ENS, experts.attn_norm, experts.eps)
            attn = ref.section_attention(experts.attn, x_ENS, B, T, rope, 2)  # (E, B*T, S)
            expected = torch.cat([attn[e].view(B, T, -1) for e in range(4)], dim=-1)
            x = s + expected
        expected = expected + _per_slice_routed_ffn(experts, x, ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (aux.counts > 0).sum() >= 2 and aux.counts.sum() == B * T * 4 * k  # really routed, K per slice


@pytest.mark.parametrize("family", ["moe", "sectional"])
def test_hash_tables_survive_a_lightning_checkpoint(family, tmp_path):
    """Tables saved by a Trainer come back from the checkpoint, not from the seed of whoever loads it."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from sectional_moe.training.module import LMModule

    optim = dict(lr=1e-3, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1, fused=False, schedule="constant",
                 warmup_steps=1, min_lr_ratio=0.1)
    spec = tiny_spec(family, "hash", hash_seed=11)
    data = torch.randint(0, spec.vocab_size, (8, spec.seq_len + 1), generator=torch.Generator().manual_seed(0))

    def trainer(max_steps: int) -> pl.Trainer:
        return pl.Trainer(accelerator="cpu", max_steps=max_steps, max_epochs=-1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))

    torch.manual_seed(0)
    module = LMModule(spec.to_dict(), optim, 2)
    fitted = trainer(2)
    fitted.fit(module, DataLoader(data, batch_size=4))
    ckpt = tmp_path / "hash.ckpt"
    fitted.save_checkpoint(ckpt)
    tables = {n: b.clone() for n, b in module.model.named_buffers() if n.endswith("table")}
    assert len(tables) == spec.n_layers  # one table per routed layer (every layer here)
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert all(torch.equal(saved[f"model.{n}"], t) for n, t in tables.items())

    other = tiny_spec(family, "hash", hash_seed=99).to_dict()  # fresh modules draw different tables
    fresh = LMModule(other, optim, 3)
    assert all(not torch.equal(dict(fresh.model.named_buffers())[n], t) for n, t in tables.items())
    trainer(3).fit(fresh, DataLoader(data, batch_size=4), ckpt_path=ckpt)  # resume: one more step
    loaded = LMModule.load_from_checkpoint(ckpt, spec=other, weights_only=True)  # explicit spec, other seed
    for restored in (fresh, loaded):
        buffers = dict(restored.model.named_buffers())
        for name, table in tables.items():
            assert torch.equal(buffers[name], table), name
    ids = data[:2, :-1]
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids)[0], module.eval()(ids)[0])


def test_bf16_autocast_forward_backward_on_cpu():
    torch.manual_seed(0)
    for family, routing in FAMILY_ROUTING:
        spec = tiny_spec(family, routing)
        model = build_model(spec)
        ids = torch.randint(0, spec.vocab_size, (2, spec.seq_len))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, _ = model(ids)
        assert logits.dtype == torch.bfloat16
        logits.float().logsumexp(-1).mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------------------------- KV-cached decoding
def decode_cases():
    """Every family x routing; for the sectional family r in {1, 2, E}, expert attention on/off,
    mean/linear pooling (r > 1) and sectional_every 1/2, plus pre_expert off and merge_proj, and the
    full and cross readings of the pre-expert layer."""
    yield pytest.param("dense", None, {}, id="dense")
    for routing, kw in (("topk", {}), ("topk", dict(top_k=1)), ("topk", dict(top_k=3, shared_expert=True)), ("hash", {})):
        yield pytest.param("moe", routing, kw, id=f"moe-{routing}-{'-'.join(f'{k}{v}' for k, v in kw.items()) or 'default'}")
    for routing in ("segment_fixed", "topk", "hash"):
        for r in (1, 2, 4):  # E = 4
            for pool in (("mean",) if r == 1 else ("mean", "linear")):
                for attn in (True, False):
                    for every in (1, 2):
                        kw = dict(seq_reduction=r, seq_pool=pool, expert_attention=attn, sectional_every=every)
                        yield pytest.param("sectional", routing, kw, id=f"sectional-{routing}-r{r}-{pool}-attn{int(attn)}-every{every}")
        yield pytest.param("sectional", routing, dict(seq_reduction=2, pre_expert=False, merge_proj=True), id=f"sectional-{routing}-nopre-merge")
        yield pytest.param("sectional", routing, dict(experts=8, seq_reduction=8, top_k=1), id=f"sectional-{routing}-E8-r8")
        for resolution in ("full", "cross"):  # the other readings of where the pre-expert layer runs
            for r, pool in ((1, "mean"), (2, "linear"), (4, "mean")):
                kw = dict(pre_expert_resolution=resolution, seq_reduction=r, seq_pool=pool)
                yield pytest.param("sectional", routing, kw, id=f"sectional-{routing}-{resolution}-r{r}-{pool}")


def _cached_logits(model, ids: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Logits of ids (B, T) fed through one cache in chunks of the given sizes, then one token at a time."""
    cache = model.init_cache()
    outs, pos = [], 0
    for n in chunks + [1] * (ids.shape[1] - sum(chunks)):
        outs.append(model(ids[:, pos : pos + n], cache=cache)[0])
        pos += n
    assert cache.pos == ids.shape[1]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("family,routing,kw", list(decode_cases()))
def test_cached_decoding_equals_the_full_forward_at_every_position(family, routing, kw):
    torch.manual_seed(0)
    # a larger init than training's so every block moves the logits well above the tolerance
    spec = tiny_spec(family, routing, init_std=0.1, **kw)
    model = build_model(spec).eval()
    ids = torch.randint(0, spec.vocab_size, (2, spec.seq_len))
    with torch.no_grad():
        full, _ = model(ids)
        # prefill 3 tokens (not a multiple of r), then single steps; and a chunked schedule
        # whose chunk borders fall inside and on short-position groups
        for chunks in ([3], [1, 6, 2, 9]):
            torch.testing.assert_close(_cached_logits(model, ids, chunks), full, atol=1e-5, rtol=1e-5)
        # the check has teeth: every sectional block's delta matters at this tolerance
        if family == "sectional":
            for block in model.blocks:
                if isinstance(block, SectionalMoEBlock):
                    with torch.no_grad():
                        saved = {n: p.clone() for n, p in block.experts.named_parameters()}
                        for p in block.experts.parameters():
                            p.mul_(1.01)
                        assert (model(ids)[0] - full).abs().max().item() > 1e-4
                        for n, p in block.experts.named_parameters():
                            p.copy_(saved[n])


def test_sectional_decode_state_advances_one_short_position_per_r_tokens():
    """After t tokens the short caches hold ceil(t / r) positions and the tail the last r-1 inputs."""
    torch.manual_seed(0)
    spec = tiny_spec("sectional", "hash", n_layers=1, seq_reduction=4, init_std=0.1)
    model = build_model(spec).eval()
    ids = torch.randint(0, spec.vocab_size, (1, spec.seq_len))
    with torch.no_grad():
        full, _ = model(ids)
        cache = model.init_cache()
        model(ids[:, :9], cache=cache)  # positions 0..8: short positions 0, 1, 2 done, the tail holds 6..8
        block_cache = cache.layers[0]
        assert block_cache.pre.length == block_cache.experts.length == 3 and block_cache.length == 9
        x = model.embed(ids)
        torch.testing.assert_close(block_cache.tail, x[:, 6:9])
        # positions 9..11 only add the stored delta of short position 2: no new short position
        model(ids[:, 9:12], cache=cache)
        assert block_cache.pre.length == 3
        step = model(ids[:, 12:13], cache=cache)[0]  # 12 % 4 == 0: short position 3 completes
        assert block_cache.pre.length == 4
        torch.testing.assert_close(step, full[:, 12:13], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(block_cache.tail, x[:, 10:13])


def test_cache_refuses_more_positions_than_it_holds():
    spec = tiny_spec("sectional", "segment_fixed")
    model = build_model(spec).eval()
    ids = torch.zeros(1, spec.seq_len, dtype=torch.long)
    with torch.no_grad():
        cache = model.init_cache(8)
        model(ids[:, :8], cache=cache)
        with pytest.raises(ValueError, match="max_len"):
            model(ids[:, :1], cache=cache)
        cache.reset()
        torch.testing.assert_close(model(ids[:, :8], cache=cache)[0], model(ids[:, :8])[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="seq_len"):
        model.init_cache(spec.seq_len + 1)


@pytest.mark.parametrize("resolution,sees_in_group_predecessor", [("short", False), ("cross", False), ("full", True)])
def test_what_each_pre_expert_reading_lets_a_position_see(resolution, sees_in_group_predecessor):
    """One sectional layer, r = 4: position 7 is x_7 plus the update of short position 1, which
    covers tokens up to 4. Only the full-length reading lets it see tokens 5 and 6 (the gradient
    test behind docs/results: with every layer sectional the short reading hides t-1 from 3 of 4
    positions); all three still never see a later token."""
    torch.manual_seed(0)
    spec = tiny_spec("sectional", "segment_fixed", n_layers=1, seq_reduction=4, pre_expert_resolution=resolution)
    model = build_model(spec)
    ids = torch.randint(0, spec.vocab_size, (1, spec.seq_len))
    embedded = {}

    def keep(module, inputs, output):
        output.retain_grad()
        embedded["x"] = output

    model.embed.register_forward_hook(keep)
    logits, _ = model(ids)
    logits[0, 7].pow(2).sum().backward()
    grad = embedded["x"].grad[0].abs().sum(-1)  # (T,): how much each input position moves logit 7
    assert (grad[6] > 0) == sees_in_group_predecessor and (grad[5] > 0) == sees_in_group_predecessor
    assert grad[4] > 0 and grad[7] > 0  # the group's last token (pooled) and the token itself (residual)
    assert torch.all(grad[8:] == 0)  # never a later token


@pytest.mark.parametrize("n_tokens, top_k", [(1, 1), (1, 2), (2, 2), (4, 2)])
def test_the_few_token_expert_path_of_decoding_equals_the_grouped_gemm(n_tokens, top_k):
    """Decoding's per-assignment path (fewer assignments than experts, no grad) gives the grouped
    GEMM's output, repeated expert ids included."""
    torch.manual_seed(0)
    ffn = ExpertFFN(num_experts=8, dim=16, hidden=24)
    x = torch.randn(n_tokens, 16)
    ids = torch.randint(0, 8, (n_tokens, top_k))
    ids[0, -1] = ids[-1, 0]  # two assignments to one expert
    weights = torch.rand(n_tokens, top_k)
    counts = torch.bincount(ids.reshape(-1), minlength=8)
    with torch.no_grad():
        few, _ = ffn.forward_routed(x, ids, weights, counts)
        try:
            ExpertFFN.few_token_path = False
            grouped, _ = ffn.forward_routed(x, ids, weights, counts)
        finally:
            ExpertFFN.few_token_path = True
    torch.testing.assert_close(few, grouped, rtol=1e-5, atol=1e-6)
