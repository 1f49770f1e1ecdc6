"""Hybrid sharded data parallel (--dp-shard): equal to one process, exact traffic, checkpoints
that load into another grouping, and the layout rules."""
from __future__ import annotations

from fractions import Fraction

import pytest

from plait.layout import Layout, ModelFacts, layout_problem
from plait.mesh import LayoutError, ParallelContext, ParallelDims
from helpers import assert_runs_match, tiny_config, tiny_model_config, train_and_collect
from test_zero import one_step_traffic

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def reference(data):
    return train_and_collect(ParallelContext.single(), tiny_config(), data, tiny_model_config())


@pytest.mark.parametrize("zero, dims, options", [
    (3, ParallelDims(dp=4, dp_shard=2), dict(micro_batch=1)),  # two micro-batches: shards accumulate
    (2, ParallelDims(dp=4, dp_shard=2), dict()),
    pytest.param(3, ParallelDims(dp=4, dp_shard=2, tp=2), dict(tp=2, sequence_parallel=True, loss_parallel=True),
                 marks=pytest.mark.large),  # 8 ranks
    (3, ParallelDims(dp=2, dp_shard=1, cp=2), dict(cp=2)),
], ids=["dp4-shard2-zero3", "dp4-shard2-zero2", "dp4-shard2-tp2-zero3", "dp2-shard1-cp2-zero3"])
def test_training_matches_one_process(pool, data, reference, zero, dims, options):
    cfg = tiny_config(zero=zero, dp_shard=dims.dp_shard, **options)
    assert_runs_match(pool.run(train_and_collect, dims, cfg, data, tiny_model_config()), reference, TOLERANCE)


@pytest.mark.parametrize("zero", [2, 3])
def test_traffic_per_step(pool, data, zero):
    """Inside a replica group of N = 2 the ZeRO traffic of dp = 2 (ZeRO-3: 3P less the root's
    second gather; ZeRO-2: 2P, ring factor (N-1)/N); across the R = 2 groups one all-reduce of the
    shard per unit and step, 2 (R-1)/R x P / N."""
    dp, shard, replicas = 4, 2, 2
    cfg = tiny_config(zero=zero, micro_batch=2, dp_shard=shard)  # one micro-batch per rank
    for records, padded, root in pool.run(one_step_traffic, ParallelDims(dp=dp, dp_shard=shard), cfg, data,
                                          tiny_model_config()):
        inside = sum((wire for (group, _, _), (_, wire) in records.items() if group == "dp_shard"), Fraction(0))
        expected = Fraction(shard - 1, shard) * ((3 * padded - root) if zero == 3 else 2 * padded)
        assert inside == expected, records
        units = 4 + 1
        assert records[("dp_replicate", "all_reduce", "grads")] == (
            units, Fraction(2 * (replicas - 1), replicas) * Fraction(padded, shard))
        assert {group for group, _, _ in records} == {"dp_shard", "dp_replicate"}


def test_layout_rules_of_hybrid_sharding():
    tiny = ModelFacts(heads=8, kv_heads=4, ffn=384, vocab=256, layers=4, seq_len=32)
    assert layout_problem(tiny, Layout(dp=4, global_batch=8, zero=3, dp_shard=2)) is None
    assert "must divide" in layout_problem(tiny, Layout(dp=4, global_batch=8, zero=3, dp_shard=3))
    assert "needs --zero" in layout_problem(tiny, Layout(dp=4, global_batch=8, zero=0, dp_shard=2))
    with pytest.raises(LayoutError, match="must divide"):
        ParallelDims(dp=4, dp_shard=3)
    assert ParallelDims(dp=8, dp_shard=2).replicas == 4
    assert ParallelDims(dp=4, dp_shard=2).shard_groups() == [[0, 1], [2, 3]]
    assert ParallelDims(dp=4, dp_shard=2).replicate_groups() == [[0, 2], [1, 3]]
