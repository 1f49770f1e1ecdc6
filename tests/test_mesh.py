"""Layout validation, rank coordinates, mesh groups, and the worker pool's failure handling."""
from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from plait.layout import Layout, ModelFacts, check_layout
from plait.mesh import LayoutError, ParallelContext, ParallelDims
from plait.models import get_preset
from plait.testing import DistributedRunError


def test_coordinates_put_tp_innermost():
    dims = ParallelDims(dp=2, pp=3, tp=4)
    seen = set()
    for rank in range(dims.world_size):
        coords = dims.coordinates(rank)
        assert dims.rank_of(*coords) == rank
        seen.add(coords)
    assert len(seen) == 24
    assert [dims.coordinates(r).tp for r in range(4)] == [0, 1, 2, 3]  # consecutive ranks share tp group
    assert dims.coordinates(12).dp == 1 and dims.coordinates(4).pp == 1


def _tiny_layout(**layout):
    check_layout(ModelFacts.of_llama(get_preset("tiny"), 64), Layout(**{"global_batch": 8, **layout}))


def test_a_vocabulary_tp_does_not_divide_is_a_layout():
    """32001 tokens at tp 2 (a fine-tune's added pad token): split unevenly, not refused."""
    check_layout(ModelFacts(8, 4, 384, 32001, 4, 64), Layout(tp=2, global_batch=8))


@pytest.mark.parametrize("build, message", [
    (lambda: ParallelDims.from_world_size(4, dp=3), "dp x pp x tp = 3 x 1 x 1 = 3 does not equal the world size 4"),
    (lambda: ParallelDims(dp=0), "--dp must be an integer >= 1"),
    (lambda: ParallelDims.from_world_size(6, pp=4), "world size 6 is not divisible by pp x tp = 4"),
    (lambda: _tiny_layout(tp=3), "tp=3 does not divide the model's num_attention_heads"),
    (lambda: _tiny_layout(tp=8), "tp=8 does not divide the model's num_key_value_heads"),
    (lambda: check_layout(ModelFacts(8, 4, 385, 1024, 4, 64), Layout(tp=2)), "FFN width"),
    (lambda: _tiny_layout(pp=5, micro_batch=1), "pp=5 is larger than the model's 4 layers"),
    (lambda: _tiny_layout(dp=2, global_batch=7), "--global-batch 7 is not divisible by dp=2"),
    (lambda: _tiny_layout(pp=2, micro_batch=8), "--pp 2 needs at least 2 micro-batches per step, got 1"),
    (lambda: _tiny_layout(pp=2, micro_batch=2, virtual_stages=2, schedule="1f1b"), "needs --schedule interleaved"),
    (lambda: _tiny_layout(pp=2, micro_batch=1, virtual_stages=4, schedule="interleaved"),
     "cannot split 4 layers into 8 pipeline chunks"),
    (lambda: _tiny_layout(sequence_parallel=True), "need --tp > 1"),
])
def test_layout_errors_are_one_line(build, message):
    with pytest.raises(LayoutError) as error:
        build()
    assert message in str(error.value) and "\n" not in str(error.value)


def report_groups(ctx: ParallelContext):
    """Every rank's view of who is in each of its groups (gathered global ranks)."""
    members = {}
    for name in ("dp", "pp", "tp"):
        comm = ctx.comm(name)
        if comm.size == 1:
            members[name] = [ctx.rank]
            continue
        gathered = torch.zeros(comm.size, dtype=torch.int64)
        comm.all_gather(gathered, torch.tensor([ctx.rank]))
        members[name] = gathered.tolist()
    return ctx.rank, tuple(ctx.coords), members


def test_mesh_groups_follow_the_layout(pool):
    dims = ParallelDims(dp=2, pp=1, tp=2)
    for rank, coords, members in pool.run(report_groups, dims):
        assert coords == tuple(dims.coordinates(rank))
        assert members["tp"] == [dims.rank_of(coords[0], coords[1], t) for t in range(2)]
        assert members["dp"] == [dims.rank_of(d, coords[1], coords[2]) for d in range(2)]
        assert members["pp"] == [rank]


def fail_on_rank_one(ctx: ParallelContext):
    if ctx.rank == 1:
        raise ValueError("rank one is broken")
    dist.barrier()  # the healthy rank waits for the broken one: must not hang the test
    return ctx.rank


def hang_forever(ctx: ParallelContext):
    time.sleep(3600)


def test_pool_reports_a_failing_rank_and_recovers(pool):
    with pytest.raises(DistributedRunError, match="rank one is broken") as error:
        pool.run(fail_on_rank_one, ParallelDims(dp=2), timeout_s=20)
    assert "--- rank 1 ---" in str(error.value)
    assert [r for r, *_ in pool.run(report_groups, ParallelDims(dp=2))] == [0, 1]


def test_pool_times_out_a_hang_and_recovers(pool):
    start = time.monotonic()
    with pytest.raises(DistributedRunError, match="did not finish within 3 s"):
        pool.run(hang_forever, ParallelDims(dp=2), timeout_s=3)
    assert time.monotonic() - start < 15
    assert [r for r, *_ in pool.run(report_groups, ParallelDims(dp=2))] == [0, 1]


def test_single_process_context_has_no_op_collectives():
    ctx = ParallelContext.single(torch.device("cpu"))
    tensor = torch.ones(3)
    assert ctx.comm("dp").all_reduce(tensor) is None and torch.equal(tensor, torch.ones(3))
    assert ctx.comm("tp").all_reduce_scalars([1.5, 2.0]) == [1.5, 2.0]
    assert ctx.counter.records == {}


def collectives_results(ctx: ParallelContext):
    """Every rank contributes rank-dependent data; results are checked against the definitions."""
    comm = ctx.comm("dp")
    n, r = comm.size, comm.rank
    full = torch.arange(n * 6, dtype=torch.float32).view(n * 2, 3) * (r + 1)
    scattered = torch.empty(2, 3)
    comm.reduce_scatter(scattered, full)
    gathered = torch.empty(n * 2, 3)
    comm.all_gather(gathered, torch.full((2, 3), float(r)))
    summed = full.clone()
    comm.all_reduce(summed)
    return r, scattered, gathered, summed


@pytest.mark.parametrize("n", [2, 4])
def test_collectives_compute_their_definitions(pool, n):
    base = torch.arange(n * 6, dtype=torch.float32).view(n * 2, 3)
    total = base * sum(range(1, n + 1))
    for r, scattered, gathered, summed in pool.run(collectives_results, ParallelDims(dp=n)):
        assert torch.equal(summed, total)
        assert torch.equal(scattered, total[2 * r:2 * r + 2])
        assert torch.equal(gathered, torch.arange(n, dtype=torch.float32).repeat_interleave(2)[:, None].expand(-1, 3))
