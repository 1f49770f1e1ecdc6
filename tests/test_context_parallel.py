"""Context parallelism: the sequence layout, the attention of one block against the full
sequence (outputs, gradients, exact traffic), and training equal to one process across layouts."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from plait.context_parallel import context_positions, context_slice, kernels
from plait.context_parallel.alltoall import alltoall_attention
from plait.context_parallel.kernels import (CPU_FLASH, CUDA_FLASH, MATH, BlockKernel, block_attention,
                                            block_attention_backward, kernel_for, math_block_attention,
                                            math_block_attention_backward, self_check, verified)
from plait.context_parallel.ring import block_of, ring_attention
from plait.context_parallel.sequence import from_natural_order, to_natural_order
from plait.layout import Layout, ModelFacts, alltoall_kv_repeats, layout_problem
from plait.mesh import ParallelContext, ParallelDims
from helpers import TEST_DEVICE, assert_runs_match, relative_error, tiny_config, tiny_model_config, train_and_collect

TOLERANCE = 1e-5


def test_each_rank_holds_an_early_and_a_late_chunk():
    assert context_positions(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert context_positions(8, 1, 2).tolist() == [2, 3, 4, 5]
    for cp in (1, 2, 4):
        every = torch.cat([context_positions(32, rank, cp) for rank in range(cp)])
        assert sorted(every.tolist()) == list(range(32))  # a partition of the sequence
        for rank in range(cp):  # the same causal work on every rank: sum of (position + 1)
            assert int((context_positions(32, rank, cp) + 1).sum()) == 32 * 33 // 2 // cp
    x = torch.arange(2 * 16).view(2, 16)
    assert context_slice(x, 1, 2).tolist() == [[4, 5, 6, 7, 8, 9, 10, 11], [20, 21, 22, 23, 24, 25, 26, 27]]


def test_natural_order_undoes_the_chunk_layout():
    cp, seq = 4, 16
    full = torch.randn(2, 3, seq, 5)
    pieces = torch.stack([full[:, :, context_positions(seq, rank, cp)] for rank in range(cp)])
    assert torch.equal(to_natural_order(pieces), full)
    assert torch.equal(from_natural_order(full, cp), pieces)


def test_ring_blocks_cover_the_causal_triangle_once():
    """Over the c steps of rank i, each (query, key) pair of the causal mask is computed exactly once."""
    cp, seq = 4, 32
    local = seq // cp
    for rank in range(cp):
        seen = torch.zeros(local, seq, dtype=torch.int64)
        q_pos = context_positions(seq, rank, cp)
        for step in range(cp):
            source = (rank - step) % cp
            rows, cols, causal = block_of(rank, source, local)
            k_pos = context_positions(seq, source, cp)[cols]
            block = torch.ones(local, len(k_pos), dtype=torch.int64)[rows]
            if causal:
                block = block.tril()
            seen[torch.arange(local)[rows][:, None], k_pos[None, :]] += block
        assert torch.equal(seen, (q_pos[:, None] >= torch.arange(seq)[None, :]).long())


@pytest.mark.parametrize("kernel", ["chosen", "math"])
@pytest.mark.parametrize("kv_heads", [3, 1])
@pytest.mark.parametrize("causal, keys", [(True, 12), (False, 7)])
def test_block_kernels_agree_with_sdpa(causal, keys, kv_heads, kernel, monkeypatch):
    """On TEST_DEVICE (make gpu-check runs it on CUDA), fp32: the device's kernel and the plain one,
    with k and v of 3 heads, or of 1 head shared by the 3 query heads (grouped-query attention:
    the CPU flash kernel reads it shared, the plain one gets it repeated and sums its gradients)."""
    if kernel == "math":
        monkeypatch.setattr(kernels, "kernel_for", lambda q: MATH)
    generator = torch.Generator().manual_seed(0)
    queries = 12 if causal else 5
    q = torch.randn(2, 3, queries, 8, generator=generator).to(TEST_DEVICE)
    k, v = (torch.randn(2, kv_heads, keys, 8, generator=generator).to(TEST_DEVICE) for _ in range(2))
    grad = torch.randn(2, 3, queries, 8, generator=generator).to(TEST_DEVICE)
    out, lse = block_attention(q, k, v, causal)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want = F.scaled_dot_product_attention(*leaves, is_causal=causal, enable_gqa=True)
    want.backward(grad)
    scores = q @ k.repeat_interleave(3 // kv_heads, dim=1).transpose(-1, -2) / 8 ** 0.5
    if causal:
        scores = scores.masked_fill(torch.ones(queries, keys, dtype=torch.bool, device=q.device).triu(1), -torch.inf)
    close = 1e-6 if TEST_DEVICE.type == "cpu" else 1e-5  # CUDA's SDPA sums in another order
    assert relative_error(out, want) <= close and relative_error(lse, scores.logsumexp(-1)) <= close
    got = block_attention_backward(grad, q, k, v, out, lse, causal)
    assert [g.shape for g in got] == [leaf.shape for leaf in leaves]
    for g, leaf in zip(got, leaves):
        assert relative_error(g, leaf.grad) <= 1e-5


def test_block_kernels_stay_fp32_inside_the_trainers_autocast():
    """Ring attention runs inside the trainer's bf16 autocast; its fp32 arithmetic must not be
    cast down (before: 1e-3 off, and an lse the backward's recomputed scores did not match)."""
    generator = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(2, 3, 16, 8, generator=generator).to(TEST_DEVICE) for _ in range(4))
    plain = math_block_attention(q, k, v, True)
    plain_grads = math_block_attention_backward(grad, q, k, v, *plain, True)
    with torch.autocast(TEST_DEVICE.type, dtype=torch.bfloat16):
        inside = math_block_attention(q, k, v, True)
        inside_grads = math_block_attention_backward(grad, q, k, v, *inside, True)
    for got, want in zip((*inside, *inside_grads), (*plain, *plain_grads)):
        assert got.dtype == torch.float32 and torch.equal(got, want)


def test_the_cuda_flash_kernels_call_torch_with_its_signature():
    """No GPU here: on meta tensors (PyTorch's shape functions of the CUDA kernels) the calls
    match the installed torch's signatures and give ring attention's shapes: lse [b, h, s_q] fp32,
    gradients shaped as q, k, v (their values are checked on CUDA by the self-check)."""
    q = torch.empty(2, 4, 64, 64, device="meta", dtype=torch.bfloat16)
    kv = torch.empty(2, 4, 32, 64, device="meta", dtype=torch.bfloat16)
    out, lse = CUDA_FLASH.forward(q, kv, kv, False)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (2, 4, 64) and lse.dtype == torch.float32
    grads = CUDA_FLASH.backward(q, q, kv, kv, out.float(), lse, False)  # ring attention's merged O is fp32
    assert [g.shape for g in grads] == [q.shape, kv.shape, kv.shape]


def test_the_device_flash_kernel_passes_its_self_check_and_a_wrong_one_falls_back(caplog):
    """bf16 on TEST_DEVICE (make gpu-check runs it on CUDA, where the CUDA flash kernel must be the
    one chosen, not the plain fallback): the chosen kernel agrees with the plain one; a kernel that
    computes a wrong lse, or raises, is refused with one warning and the plain kernel runs instead."""
    chosen = kernel_for(torch.zeros(1, 1, 4, 64, dtype=torch.bfloat16, device=TEST_DEVICE))
    assert chosen is (CUDA_FLASH if TEST_DEVICE.type == "cuda" else CPU_FLASH)
    assert self_check(chosen, TEST_DEVICE, torch.bfloat16, 64) is None
    assert kernel_for(torch.zeros(1, 1, 4, 64, device=TEST_DEVICE)) is (MATH if TEST_DEVICE.type == "cuda"
                                                                        else CPU_FLASH)

    def shifted_lse(q, k, v, causal):
        out, lse = MATH.forward(q, k, v, causal)
        return out, lse + 1

    def unsupported(*args):
        raise RuntimeError("no kernel for head size 24")

    assert "lse differs" in self_check(BlockKernel("shifted", shifted_lse, MATH.backward), TEST_DEVICE,
                                       torch.bfloat16, 24)
    assert "RuntimeError: no kernel" in self_check(BlockKernel("missing", unsupported, unsupported), TEST_DEVICE,
                                                   torch.bfloat16, 24)
    with caplog.at_level(logging.WARNING, logger="plait.context_parallel.kernels"):
        assert verified(BlockKernel("shifted", shifted_lse, MATH.backward), TEST_DEVICE, torch.bfloat16, 24) is MATH
    assert "shifted failed its self-check" in caplog.text and "using math" in caplog.text


def test_layout_rules_of_context_parallel():
    tiny = ModelFacts(heads=8, kv_heads=4, ffn=384, vocab=256, layers=4, seq_len=32)
    assert layout_problem(tiny, Layout(cp=2)) is None
    assert "divisible by 2 x cp = 8" in layout_problem(ModelFacts(8, 4, 384, 256, 4, 36), Layout(cp=4))
    assert layout_problem(tiny, Layout(cp=8, cp_mode="alltoall")) is None  # 4 kv heads repeated twice
    assert "attention heads per tp rank divisible by cp=4" in layout_problem(
        ModelFacts(6, 2, 384, 256, 4, 32), Layout(cp=4, cp_mode="alltoall"))
    assert "kv heads" in layout_problem(ModelFacts(12, 4, 384, 256, 4, 48), Layout(cp=6, cp_mode="alltoall"))
    assert "positions" in layout_problem(ModelFacts(8, 4, 384, 256, 4, 36), Layout(tp=4, cp=2,
                                                                                   sequence_parallel=True))
    assert "--cp-mode" in layout_problem(tiny, Layout(cp=2, cp_mode="zigzag"))
    assert alltoall_kv_repeats(4, 2) == 1 and alltoall_kv_repeats(2, 4) == 2 and alltoall_kv_repeats(1, 4) == 4


def attention_under_cp(ctx: ParallelContext, mode: str, q, k, v, grad):
    """This rank's slice of the full inputs through cp attention; its output, the gradients of its
    slices, and the cp traffic of one forward and one backward."""
    comm, cp = ctx.comm("cp"), ctx.dims.cp
    mine = [context_slice(t, ctx.cp_rank, cp, dim=2).clone().requires_grad_() for t in (q, k, v)]
    attend = ring_attention if mode == "ring" else alltoall_attention
    ctx.counter.reset()
    out = attend(*mine, comm)
    forward = {key: (r.calls, r.wire) for key, r in ctx.counter.records.items()}
    ctx.counter.reset()
    out.backward(context_slice(grad, ctx.cp_rank, cp, dim=2))
    backward = {key: (r.calls, r.wire) for key, r in ctx.counter.records.items()}
    return out.detach(), [t.grad for t in mine], forward, backward


@pytest.mark.parametrize("mode, cp, kv_heads", [("ring", 2, 2), ("ring", 4, 2), ("alltoall", 2, 4),
                                                ("alltoall", 4, 2)])
def test_attention_of_a_block_equals_the_full_sequence(pool, mode, cp, kv_heads):
    """Outputs and q/k/v gradients equal causal SDPA on the whole sequence (fp32, 1e-6), and the
    traffic is the documented count, exactly."""
    torch.manual_seed(1)
    batch, heads, seq, dim = 2, 8, 32, 16
    q = torch.randn(batch, heads, seq, dim)
    k, v = torch.randn(batch, kv_heads, seq, dim), torch.randn(batch, kv_heads, seq, dim)
    grad = torch.randn(batch, heads, seq, dim)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    groups = heads // kv_heads
    want = F.scaled_dot_product_attention(leaves[0], leaves[1].repeat_interleave(groups, 1),
                                          leaves[2].repeat_interleave(groups, 1), is_causal=True)
    want.backward(grad)
    results = pool.run(attention_under_cp, ParallelDims(cp=cp), mode, q, k, v, grad)
    local_kv = batch * kv_heads * (seq // cp) * dim * 4  # bytes of one rank's k (fp32)
    for rank, (out, grads, forward, backward) in enumerate(results):
        assert relative_error(out, context_slice(want, rank, cp, dim=2)) <= 1e-6
        for got, leaf in zip(grads, leaves):
            assert relative_error(got, context_slice(leaf.grad, rank, cp, dim=2)) <= 1e-6
        if mode == "ring":  # (c - 1) blocks [2, b, kv heads, S / c, d] forward; again, and c dK/dV back
            assert forward == {("cp", "send", "cp_kv"): (cp - 1, (cp - 1) * 2 * local_kv)}
            assert backward == {("cp", "send", "cp_kv"): (cp - 1, (cp - 1) * 2 * local_kv),
                                ("cp", "send", "cp_grad_kv"): (cp, cp * 2 * local_kv)}
        else:  # q, k, v there and the output back; the backward the same four; kv repeated to cp heads
            kv_bytes = local_kv * alltoall_kv_repeats(kv_heads, cp)
            wire = (2 * local_kv * heads // kv_heads + 2 * kv_bytes) * (cp - 1) // cp  # q, out; k, v
            assert forward == backward == {("cp", "all_to_all", "cp_a2a"): (4, wire)}


def reference_run(data, **overrides):
    return train_and_collect(ParallelContext.single(), tiny_config(**overrides), data, tiny_model_config())


@pytest.fixture(scope="module")
def reference(data):
    return reference_run(data)


@pytest.mark.parametrize("mode, cp", [("ring", 2), pytest.param("ring", 4, marks=pytest.mark.large),  # 7 s each
                                      ("alltoall", 2), pytest.param("alltoall", 4, marks=pytest.mark.large)])
def test_training_matches_one_process(pool, data, reference, mode, cp):
    cfg = tiny_config(cp=cp, cp_mode=mode)
    assert_runs_match(pool.run(train_and_collect, ParallelDims(cp=cp), cfg, data, tiny_model_config()),
                      reference, TOLERANCE)


@pytest.mark.parametrize("dims, options", [
    pytest.param(ParallelDims(cp=2, tp=2), dict(tp=2, sequence_parallel=True, loss_parallel=True),
                 marks=pytest.mark.large),  # 10 s, 4 ranks: make test-large (make test-random draws cp x tp too)
    (ParallelDims(dp=2, cp=2), dict(zero=3)),
    (ParallelDims(pp=2, cp=2), dict(pp=2, schedule="1f1b", microbatches=4, micro_batch=None)),
], ids=["cp2-tp2-sp", "dp2-cp2-zero3", "pp2-cp2-1f1b"])
def test_composed_layouts_match_one_process(pool, data, reference, dims, options):
    cfg = tiny_config(cp=dims.cp, cp_mode="ring", **options)
    assert_runs_match(pool.run(train_and_collect, dims, cfg, data, tiny_model_config()), reference, TOLERANCE)


def kept_bytes_under_cp(ctx: ParallelContext, mode: str, seq: int):
    """Bytes one decoder layer of this cp rank keeps for backward (fp32, batch 2)."""
    from plait.context_parallel import apply_context_parallel
    from plait.models import build_model

    config = tiny_model_config(num_hidden_layers=1, num_key_value_heads=2)
    model = build_model(config, seed=0)
    apply_context_parallel(model, ctx.comm("cp"), mode)
    ignored = {p.untyped_storage().data_ptr() for p in model.parameters()}
    x = torch.randn(2, seq // ctx.dims.cp, config.hidden_size, requires_grad=True)
    cos, sin = model.model.position_tables(x.shape[1], x)
    ignored |= {cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr()}
    kept: dict[int, int] = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in ignored:
            kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.model.layers[0](x, cos, sin)
    return sum(kept.values())


@pytest.mark.parametrize("mode", ["ring", "alltoall"])
def test_planner_activation_formula_under_cp(pool, mode):
    from plait.planner import ModelShape
    from plait.planner.memory import layer_activation_bytes

    seq, cp = 64, 2
    shape = ModelShape.from_llama_config(tiny_model_config(num_hidden_layers=1, num_key_value_heads=2), seq)
    predicted = layer_activation_bytes(shape, Layout(cp=cp, cp_mode=mode, micro_batch=2, dtype="float32"))
    for kept in pool.run(kept_bytes_under_cp, ParallelDims(cp=cp), mode, seq):
        assert kept == pytest.approx(predicted, rel=0.01)
