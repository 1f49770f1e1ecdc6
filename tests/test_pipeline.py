"""Pipeline parallel: schedules checked as data (no processes), and runs equal to one process."""
from __future__ import annotations

from collections import Counter

import pytest

from plait.mesh import LayoutError, ParallelContext, ParallelDims
from plait.pipeline import (ScheduleError, analytic_bubble, balanced_split, bubble_fraction, build_schedule,
                            peak_in_flight, plan_chunks, simulate)
from plait.pipeline.ordering import check_rendezvous, issue_order, receive_posts
from plait.pipeline.schedules import Action, Op, Placement, Schedule, in_flight_per_rank
from plait.train import Trainer
from helpers import assert_runs_match, block_weight_casts, train_and_collect, tiny_config, tiny_model_config

TOLERANCE = 1e-5
CASES = [("gpipe", 4, 8, 1), ("1f1b", 4, 8, 1), ("interleaved", 4, 8, 2), ("1f1b", 2, 3, 1),
         ("gpipe", 3, 5, 1), ("interleaved", 2, 4, 3), ("1f1b", 4, 2, 1),
         ("zb1p", 2, 8, 1), ("zb1p", 4, 8, 1), ("zb1p", 3, 5, 1), ("zb1p", 8, 13, 1), ("zb1p", 4, 4, 1),
         ("zbv", 2, 8, 2), ("zbv", 4, 8, 2), ("zbv", 3, 5, 2), ("zbv", 8, 16, 2), ("zbv", 4, 4, 2), ("zbv", 2, 1, 2)]


@pytest.mark.parametrize("schedule, pp, m, v", CASES)
def test_schedule_is_complete_matched_and_deadlock_free(schedule, pp, m, v):
    plans = build_schedule(schedule, pp, m, v)
    chunks = pp * v
    kinds = ("F", "B", "W") if Schedule(schedule).splits_backward else ("F", "B")
    for rank, plan in enumerate(plans):
        for kind in kinds:  # each (micro-batch, chunk) of the rank: F, B (and W) exactly once
            done = Counter((a.microbatch, a.chunk) for a in plan if a.kind == kind)
            expected = {(mb, c) for mb in range(m) for c in range(chunks)
                        if Schedule(schedule).placement.rank_of(c, pp) == rank}
            assert set(done) == expected and set(done.values()) == {1}, (rank, kind)
        assert all(a.kind in kinds or not a.kind.is_compute for a in plan)
        # a micro-batch's backward on a chunk comes after its forward, its W after its B
        position = {(a.kind, a.microbatch, a.chunk): i for i, a in enumerate(plan)}
        for (mb, c) in expected:
            assert position[("F", mb, c)] < position[("B", mb, c)]
            if "W" in kinds:
                assert position[("B", mb, c)] < position[("W", mb, c)]
    sends = Counter((a.kind[-1], a.microbatch, a.chunk, rank, a.peer)
                    for rank, plan in enumerate(plans) for a in plan if a.kind.startswith("SEND"))
    receives = Counter()
    for rank, plan in enumerate(plans):
        for a in plan:
            if a.kind.startswith("RECV"):
                source_chunk = a.chunk - 1 if a.kind == "RECV_F" else a.chunk + 1
                receives[(a.kind[-1], a.microbatch, source_chunk, a.peer, rank)] += 1
    assert sends == receives and set(sends.values()) in ({1}, set())
    # a message per boundary between chunks of different ranks, none between chunks of one rank
    placement = Schedule(schedule).placement
    crossing = sum(placement.rank_of(c, pp) != placement.rank_of(c + 1, pp) for c in range(chunks - 1))
    assert len(sends) == 2 * m * crossing
    # the simulator runs every list to completion (it raises on a deadlock), respecting the data flow
    slots = simulate(plans)
    # and so does NCCL's stricter model, where a send waits for its receive, once the receives
    # are posted as the executor posts them
    posts = receive_posts(plans)
    check_rendezvous(plans, posts)
    check_rendezvous(plans, posts, shared_stream=True)
    finish = {(s.kind, s.microbatch, s.chunk): s for s in slots}
    for mb in range(m):
        for c in range(1, chunks):
            assert finish[("F", mb, c)].start >= finish[("F", mb, c - 1)].end
            assert finish[("B", mb, c - 1)].start >= finish[("B", mb, c)].end


def test_nccl_needs_the_early_receives_and_they_keep_few_buffers():
    """As built, 1F1B's two ranks name their messages in different orders (rank 0: F0, F1, B0;
    rank 1: F0, B0, F1): under NCCL, whose sends wait for their receives, that hangs on any
    tensor above its buffer size, whether torch gives each pair of ranks a stream or each rank
    one for all its peers. The early posts fix it at the cost of a few receive buffers."""
    plans = build_schedule("1f1b", 2, 4)
    for shared_stream in (False, True):
        with pytest.raises(ScheduleError, match="deadlocks: .*rank 0 send SEND_F1c0->1 to rank 1"):
            check_rendezvous(plans, [{}, {}], shared_stream)
    deeper = build_schedule("1f1b", 4, 8)  # middle ranks: one stream for two peers
    with pytest.raises(ScheduleError, match="deadlocks"):
        check_rendezvous(deeper, [{} for _ in deeper], shared_stream=True)
    check_rendezvous(deeper, receive_posts(deeper), shared_stream=True)
    posts = receive_posts(plans)
    # rank 1 posts F1's receive before it sends B0 (and F3's before B2); rank 0 B1's before F2
    assert posts == [{7: [Action(Op.RECV_B, 1, 0, 1)]},
                     {3: [Action(Op.RECV_F, 1, 1, 0)], 11: [Action(Op.RECV_F, 3, 1, 0)]}]
    check_rendezvous(plans, posts)
    for schedule, pp, m, v, most in [("1f1b", 4, 8, 1, 2), ("zb1p", 8, 13, 1, 2), ("interleaved", 4, 8, 2, 3),
                                     ("zbv", 8, 16, 2, 3)]:
        plans = build_schedule(schedule, pp, m, v)
        for plan, mine in zip(plans, receive_posts(plans)):
            live = peak = 0
            for item in issue_order(plan, mine):
                live += {"post": 1, "wait": -1}.get(item.what, 0)
                peak = max(peak, live)
            assert peak <= most, (schedule, peak)


@pytest.mark.parametrize("schedule, pp, m, v", CASES)
def test_bubble_and_in_flight_activations(schedule, pp, m, v):
    plans = build_schedule(schedule, pp, m, v)
    bubble = bubble_fraction(simulate(plans), pp)
    peaks = [peak_in_flight(plan) for plan in plans]
    if schedule == "zbv":  # each chunk's F = B = W = 1: idle p - 1 per rank once m >= 2p - 1
        bubble = bubble_fraction(simulate(plans, 1.0, 1.0, weight_cost=1.0), pp)
        if m >= 2 * pp - 1:
            assert abs(bubble - (pp - 1) / (6 * m + pp - 1)) < 1e-9
            assert abs(bubble - analytic_bubble(schedule, pp, m, v)) < 1e-9
        if m % pp == 0:  # interleaved 1F1B on the same two chunks per rank, B + W as one backward
            interleaved = bubble_fraction(simulate(build_schedule("interleaved", pp, m, 2), 1.0, 2.0), pp)
            assert bubble < interleaved
        zb1p = bubble_fraction(simulate(build_schedule("zb1p", pp, m), 2.0, 2.0, weight_cost=2.0), pp)
        assert bubble <= zb1p
        # in flight: at most 2p half-size chunks, 1F1B's p whole stages (its rank 0's peak)
        one_f_one_b = [peak_in_flight(plan) for plan in build_schedule("1f1b", pp, m)]
        assert max(peaks) == 2 * max(one_f_one_b) if m >= 2 * pp - 1 else max(peaks) <= 2 * max(one_f_one_b)
        assert peaks == in_flight_per_rank(schedule, pp, m, v)
        return
    if Schedule(schedule).splits_backward:  # unit F = B = W: Qi et al.'s (p-1)(T_F + T_B - T_W) per rank
        bubble = bubble_fraction(simulate(plans, 1.0, 1.0, weight_cost=1.0), pp)
        assert abs(bubble - (pp - 1) / (3 * m + pp - 1)) < 1e-9
        assert abs(bubble - analytic_bubble(schedule, pp, m, v)) < 1e-9
        one_f_one_b = build_schedule("1f1b", pp, m)
        assert bubble < bubble_fraction(simulate(one_f_one_b, 1.0, 2.0), pp)  # 1F1B with B + W as one
        assert peaks == [peak_in_flight(plan) for plan in one_f_one_b]  # 1F1B's activations in flight
        return
    if schedule == "interleaved":
        assert bubble < (pp - 1) / (m + pp - 1)  # lower than 1F1B's
        assert abs(bubble - analytic_bubble(schedule, pp, m, v)) < 1e-9
    else:
        assert abs(bubble - (pp - 1) / (m + pp - 1)) < 1e-9
    if schedule == "gpipe":
        assert peaks == [m] * pp
    elif schedule == "1f1b":
        assert max(peaks) <= pp and peaks[0] == min(pp, m)


def test_schedule_errors():
    with pytest.raises(ScheduleError, match="multiple of pp=4"):
        build_schedule("interleaved", 4, 6, 2)
    with pytest.raises(ScheduleError, match="unknown schedule"):
        build_schedule("zigzag", 2, 4)
    with pytest.raises(ScheduleError, match="needs --schedule interleaved"):
        build_schedule("1f1b", 2, 4, 2)
    with pytest.raises(ScheduleError, match="zbv places two chunks on each rank; set --virtual-stages 2"):
        build_schedule("zbv", 2, 4, 1)


def test_v_placement_puts_embedding_and_head_on_rank_zero_and_turns_locally():
    pp = 4
    assert [Placement.V.rank_of(c, pp) for c in range(2 * pp)] == [0, 1, 2, 3, 3, 2, 1, 0]
    assert [Placement.LOOP.rank_of(c, pp) for c in range(2 * pp)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert Placement.V.chunks_of(1, pp, 2) == [1, 6]
    plans = build_schedule("zbv", pp, 8, 2)
    # chunk 3 -> 4 stays on rank 3: no message crosses that boundary, and rank 3 runs F of 3 before F of 4
    assert not any(a.chunk in (3, 4) and a.kind in (Op.SEND_F, Op.RECV_F) and a.peer == 3
                   for plan in plans for a in plan)
    assert not any(a.kind == Op.RECV_F and a.chunk == 4 or a.kind == Op.RECV_B and a.chunk == 3 for a in plans[3])
    # evaluation's forward-only GPipe order follows the same V
    eval_plans = build_schedule("gpipe", pp, 3, 2, Placement.V)
    assert {a.chunk for a in eval_plans[0] if a.kind == Op.F} == {0, 7}
    simulate(eval_plans)


def test_balanced_split():
    assert balanced_split([1.0] * 8, 4) == [2, 2, 2, 2]
    assert balanced_split([1, 1, 1, 1, 1, 1, 1, 5.0], 2) == [6, 2]  # the heavy last block (head) gets company of one
    chunks = plan_chunks(tiny_model_config(num_hidden_layers=8), 2, 2, 32)
    assert [c.layers for c in chunks][0][0] == 0 and chunks[-1].layers[-1] == 7 and chunks[-1].is_last


@pytest.fixture(scope="module")
def reference(data, model_config):
    return train_and_collect(ParallelContext.single(), tiny_config(micro_batch=1, eval_every=10), data, model_config)


def check_against_reference(results, reference):
    assert_runs_match(results, reference, TOLERANCE)


@pytest.mark.parametrize("pp, schedule, v", [(2, "gpipe", 1), (2, "1f1b", 1), (2, "interleaved", 2),
                                             pytest.param(4, "gpipe", 1, marks=pytest.mark.large),
                                             (4, "1f1b", 1), (4, "interleaved", 2), (2, "zb1p", 1), (4, "zb1p", 1),
                                             (2, "zbv", 2), (4, "zbv", 2)])
def test_training_matches_one_process(pool, data, model_config, reference, pp, schedule, v):
    cfg = tiny_config(micro_batch=None, microbatches=8, schedule=schedule, virtual_stages=v, eval_every=10)
    check_against_reference(pool.run(train_and_collect, ParallelDims(pp=pp), cfg, data, model_config), reference)


@pytest.mark.parametrize("schedule, recompute", [("zbv", "selective"), ("zb1p", "full")])
def test_split_backward_with_recomputation_matches_one_process(pool, data, model_config, reference, schedule,
                                                               recompute):
    """B and W read each linear layer's saved tensors once between them: under recomputation a
    saved tensor unpacks only once (a randomized draw of zbv + selective found the second read)."""
    cfg = tiny_config(micro_batch=None, microbatches=8, schedule=schedule, activation_checkpointing=recompute,
                      virtual_stages=2 if schedule == "zbv" else 1, eval_every=10)
    check_against_reference(pool.run(train_and_collect, ParallelDims(pp=2), cfg, data, model_config), reference)


def test_tensor_parallel_linears_are_handed_the_store_not_patched():
    """Under tp a block's linears are Column/RowParallelLinear, which compute through
    DeferrableLinear themselves: they take the store in their slot (so tp's collectives stay
    theirs), while a plain nn.Linear gets its forward patched."""
    import torch
    from torch import nn

    from plait.comm import Collectives, TrafficCounter
    from plait.pipeline.stage import defer_weight_gradients
    from plait.pipeline.weight_grad import DeferredWeightGradients
    from plait.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    comm = Collectives("tp", None, TrafficCounter())  # a group of one
    block = nn.Sequential(ColumnParallelLinear(nn.Linear(8, 8), comm), RowParallelLinear(nn.Linear(8, 8), comm),
                          nn.Linear(8, 8))
    store = DeferredWeightGradients()
    assert defer_weight_gradients([block], store) == 3
    assert block[0].weight_gradients is store and block[1].weight_gradients is store
    assert "forward" not in vars(block[0]) and "forward" not in vars(block[1]) and "forward" in vars(block[2])
    x = torch.randn(2, 8, requires_grad=True)
    with store.deferring("mb0"):
        block(x).sum().backward()
    assert x.grad is not None and all(layer.weight.grad is None for layer in block) and store.pending == 1
    store.apply("mb0")
    assert store.pending == 0 and all(layer.weight.grad is not None for layer in block)


@pytest.mark.parametrize("schedule", [pytest.param("1f1b", marks=pytest.mark.large),  # 21-30 s each; make test
                                      pytest.param("zb1p", marks=pytest.mark.large),  # draws 3-D random layouts
                                      pytest.param("zbv", marks=pytest.mark.large)])
def test_three_d_with_sequence_parallel_and_zero1(pool, data, model_config, reference, schedule):
    cfg = tiny_config(micro_batch=None, microbatches=4, schedule=schedule, tp=2, sequence_parallel=True,
                      loss_parallel=True, zero=1, eval_every=10, virtual_stages=2 if schedule == "zbv" else 1)
    results = pool.run(train_and_collect, ParallelDims(dp=2, pp=2, tp=2), cfg, data, model_config, timeout_s=300)
    check_against_reference(results, reference)


def boundary_traffic(ctx: ParallelContext, cfg, data, model_config):
    trainer = Trainer(cfg, ctx, data, model_config)
    ctx.counter.reset()
    trainer.compute_gradients(0)
    return {key: (r.calls, r.payload) for key, r in ctx.counter.records.items() if key[0] == "pp"}


def weight_casts_of_a_step(ctx: ParallelContext, cfg, data, model_config):
    trainer = Trainer(cfg, ctx, data, model_config)
    return block_weight_casts(trainer, lambda: trainer.compute_gradients(0))


@pytest.mark.parametrize("schedule, virtual_stages", [("1f1b", 1), ("zb1p", 1), ("zbv", 2)])
def test_bf16_pipeline_casts_weights_once_a_step(pool, data, model_config, schedule, virtual_stages):
    """Under bf16 autocast the micro-batches of a step share one bf16 cast of each block weight:
    autocast's cache, or, for the layers of split-backward schedules, which cast their own, the
    W store's."""
    cfg = tiny_config(dtype="bfloat16", micro_batch=None, microbatches=4, schedule=schedule,
                      virtual_stages=virtual_stages)
    results = pool.run(weight_casts_of_a_step, ParallelDims(pp=2), cfg, data, model_config)
    for rank_casts in results:
        assert len(rank_casts) == 7 * model_config.num_hidden_layers // 2 and set(rank_casts.values()) == {1}


def test_boundary_traffic_is_exact(pool, data, model_config):
    pp, m, v = 2, 4, 2
    cfg = tiny_config(micro_batch=None, microbatches=m, schedule="interleaved", virtual_stages=v)
    per_message = (cfg.global_batch // m) * cfg.seq_len * model_config.hidden_size * 4  # b*s*h fp32
    boundaries = pp * v - 1
    results = pool.run(boundary_traffic, ParallelDims(pp=pp), cfg, data, model_config)
    sends = sum(records.get(("pp", "send", "activations"), (0, 0))[0] for records in results)
    volume = sum(records.get(("pp", "send", "activations"), (0, 0))[1] for records in results)
    assert sends == 2 * boundaries * m  # activations forward and gradients back, per boundary and micro-batch
    assert volume == 2 * boundaries * m * per_message


def test_pipeline_layout_errors(data, model_config):
    ctx = ParallelContext.single()
    with pytest.raises(LayoutError, match="needs 2 positive block counts summing to 8"):
        # validation happens before any communication, so a fake pp size is enough to check it
        Trainer(tiny_config(microbatches=8, micro_batch=None, pipeline_split="3,3"),
                ctx.__class__(dims=ParallelDims(pp=2)), data, model_config)
    with pytest.raises(LayoutError, match="not zb1p"):
        Trainer(tiny_config(microbatches=8, micro_batch=None, schedule="zb1p", virtual_stages=2),
                ctx.__class__(dims=ParallelDims(pp=2)), data, model_config)


def test_split_backward_defers_exactly_the_blocks_weight_products():
    """B computes input gradients and every non-matmul gradient; W adds the linear layers' dW,
    and B + W equal one ordinary backward."""
    import torch

    from plait.models import LlamaForCausalLM
    from plait.pipeline.stage import defer_weight_gradients
    from plait.pipeline.weight_grad import DeferredWeightGradients

    config = tiny_model_config(num_hidden_layers=2)
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config)
    split = LlamaForCausalLM(config)
    split.load_state_dict(reference.state_dict())
    store = DeferredWeightGradients()
    assert defer_weight_gradients(split.model.layers, store) == 2 * 7  # q k v o gate up down per block
    ids = torch.randint(0, 256, (2, 16))
    reference(ids).square().mean().backward()
    x = split(ids).square().mean()
    with store.deferring("mb0"):
        x.backward()
    deferred = {name for name, p in split.named_parameters() if p.grad is None}
    assert deferred == {name for name, p in split.named_parameters() if ".layers." in name and p.dim() == 2}
    store.apply("mb0")
    assert store.pending == 0
    for (name, got), (_, want) in zip(split.named_parameters(), reference.named_parameters()):
        assert torch.allclose(got.grad, want.grad, rtol=1e-5, atol=1e-7), name
