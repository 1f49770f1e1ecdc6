"""``--compile``: each decoder block compiled by ``torch.compile`` trains as eager does.

fp32, 20 steps, against the eager single-process run: losses and every final parameter within
1e-5 relative (measured: losses 1e-7, parameters 6e-6 in one process; inductor's fused kernels
sum in another order than eager's, and Adam's 1/sqrt(v) amplifies that in rarely seen
embedding rows, as for every layout: ``tests/helpers.tiny_config``). Collectives stay eager, so
under tensor parallelism the traffic of a compiled run is the eager run's, call for call.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from helpers import assert_runs_match, tiny_config, train_and_collect
from plait.mesh import ParallelContext, ParallelDims

TOLERANCE = 1e-5
STEPS = 20  # the bar for --compile (the other equivalence tests run ten)
COMPILE_TIMEOUT_S = 420.0  # a cold inductor cache compiles each rank's block graphs first (~20-60 s here)


def train_counting_traffic(ctx: ParallelContext, cfg, data, model_config):
    ctx.counter.reset()
    result = train_and_collect(ctx, cfg, data, model_config)
    return result, {key: (record.calls, record.wire) for key, record in ctx.counter.records.items()}


@pytest.fixture(scope="module")
def eager_reference(data, model_config):
    return train_and_collect(ParallelContext.single(), tiny_config(steps=STEPS), data, model_config)


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_one_process_compiled_equals_eager(data, model_config, eager_reference, recompute):
    torch._dynamo.reset()  # compile afresh here, whatever ran before in this process
    graphs_before = counters["stats"]["unique_graphs"]
    cfg = tiny_config(steps=STEPS, compile=True, activation_checkpointing=recompute)
    assert_runs_match([train_and_collect(ParallelContext.single(), cfg, data, model_config)], eager_reference,
                      TOLERANCE)
    assert counters["stats"]["unique_graphs"] > graphs_before  # dynamo captured the blocks, not a silent eager run


def test_tp2_sequence_parallel_compiled_equals_eager_with_the_same_traffic(pool, data, model_config,
                                                                           eager_reference):
    dims = ParallelDims(tp=2)
    cfg = tiny_config(steps=STEPS, tp=2, sequence_parallel=True, loss_parallel=True)
    eager = pool.run(train_counting_traffic, dims, cfg, data, model_config)
    compiled = pool.run(train_counting_traffic, dims, cfg.replace(compile=True), data, model_config,
                        timeout_s=COMPILE_TIMEOUT_S)
    assert_runs_match([result for result, _ in compiled], eager_reference, TOLERANCE)
    for (_, eager_traffic), (_, compiled_traffic) in zip(eager, compiled):
        assert compiled_traffic == eager_traffic and compiled_traffic  # every collective issued and counted


@pytest.mark.parametrize("dims, layout", [
    (ParallelDims(dp=2), dict(zero=3)),
    (ParallelDims(pp=2), dict(microbatches=4, micro_batch=None, schedule="1f1b")),
], ids=["dp2-zero3", "pp2-1f1b"])
def test_compiled_layouts_equal_one_eager_process(pool, data, model_config, eager_reference, dims, layout):
    cfg = tiny_config(steps=STEPS, compile=True, **layout)
    results = pool.run(train_and_collect, dims, cfg, data, model_config, timeout_s=COMPILE_TIMEOUT_S)
    assert_runs_match(results, eager_reference, TOLERANCE)
