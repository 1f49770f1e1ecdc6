"""The validation loss is a property of the weights, not of the layout (issue 19, items 1 and 4).

Evaluation reads a fixed set of windows (the first ``eval_batches x global_batch`` of the held-out
split) and shares it over the dp ranks in micro-batches; every rank runs as many forwards as the
busiest one (ZeRO-3 gathers in each forward: an uneven share must not hang). At the same weights,
every layout must give the same number as one process.
"""
from __future__ import annotations

import pytest
import torch

from helpers import synthetic_data, tiny_config
from plait.data import DataError, validation_windows
from plait.loss import IGNORE_INDEX
from plait.mesh import ParallelContext, ParallelDims
from plait.train import Trainer
from plait.train.trainer import evaluation_batch, evaluation_share


def validation_loss(ctx, cfg, data, model_config):
    """(windows evaluated, validation loss) of the initial weights (the same under every layout)."""
    trainer = Trainer(cfg, ctx, data, model_config)
    return len(trainer.val_windows), trainer.evaluate()


def test_validation_windows_are_consecutive_and_capped():
    tokens = torch.arange(200).numpy()
    windows = validation_windows(tokens, seq_len=10, max_windows=7)
    assert len(windows) == 7
    inputs, targets = windows.rows(range(7))
    assert inputs.shape == targets.shape == (7, 10)
    assert inputs[:, 0].tolist() == [10 * index for index in range(7)]
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert windows.rows([5])[0][0, 0] == 50  # any window, read on its own
    assert len(validation_windows(tokens, seq_len=10, max_windows=100)) == 19  # (200 - 1) // 10
    with pytest.raises(DataError, match="fewer than seq_len"):
        validation_windows(tokens[:10], seq_len=10, max_windows=2)


def test_evaluation_share_covers_every_window_once_in_equal_micro_batches():
    shares = [evaluation_share(5, dp=2, dp_rank=rank, micro_batch=2) for rank in range(2)]
    assert shares == [[[0, 2], [4, None]], [[1, 3], [None, None]]]  # 3 windows each, padded: 2 full micro-batches
    windows = validation_windows(torch.arange(60).numpy(), seq_len=10, max_windows=5)
    inputs, targets = evaluation_batch(windows, [4, None])
    assert inputs[:, 0].tolist() == [40, 0] and targets[0, 0] == 41
    assert (targets[1] == IGNORE_INDEX).all()  # a padding row counts no token


@pytest.fixture(scope="module")
def val_data():
    """A held-out split of 31 windows of 32 tokens: shares over 2 and 4 ranks are uneven."""
    return synthetic_data()


@pytest.fixture(scope="module")
def one_process(val_data, model_config):
    return validation_loss(ParallelContext.single(), tiny_config(eval_every=1), val_data, model_config)


@pytest.mark.parametrize("dims, options", [
    (ParallelDims(), dict(micro_batch=None)),
    (ParallelDims(dp=2), dict(zero=3)),  # 16 + 15 windows: rank 1 pads one ignored row
    (ParallelDims(dp=4), dict(micro_batch=1)),
    (ParallelDims(dp=2, pp=2), dict(zero=3, micro_batch=None, microbatches=2)),
    (ParallelDims(tp=2), dict(sequence_parallel=True, loss_parallel=True)),
    (ParallelDims(cp=2), dict()),
], ids=["one-process-mb8", "dp2-zero3", "dp4-mb1", "dp2-pp2-zero3", "tp2-sp-lp", "cp2"])
def test_validation_loss_is_the_same_under_every_layout(pool, val_data, model_config, one_process, dims, options):
    windows, expected = one_process
    assert windows == 31
    cfg = tiny_config(eval_every=1, **options)
    if dims.world_size == 1:
        results = [validation_loss(ParallelContext.single(), cfg, val_data, model_config)]
    else:
        results = pool.run(validation_loss, dims, cfg, val_data, model_config, timeout_s=120)
    for count, loss in results:
        assert count == windows
        assert loss == pytest.approx(expected, rel=1e-6)
