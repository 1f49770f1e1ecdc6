"""Data parallel (ZeRO-0) equals one process: loss, every gradient, 20 optimizer steps."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from plait.mesh import ParallelContext, ParallelDims
from plait.train import Trainer
from helpers import block_weight_casts, relative_error, tiny_config, tiny_model_config

TOLERANCE = 1e-5


def train_losses_and_params(ctx: ParallelContext, cfg, data, model_config):
    trainer = Trainer(cfg, ctx, data, model_config)
    losses = [trainer.train_step(step)["loss"] for step in range(cfg.steps)]
    params = {name: p.detach().cpu().clone() for name, p in trainer.model.named_parameters()}
    return losses, params


def first_step_gradients(ctx: ParallelContext, cfg, data, model_config):
    trainer = Trainer(cfg, ctx, data, model_config)
    ctx.counter.reset()
    loss_sum, n_targets = trainer.compute_gradients(0)
    grads = {name: p.grad.detach().cpu().clone() for name, p in trainer.model.named_parameters()}
    traffic = ctx.counter.select(group="dp", op="all_reduce", tag="grads")
    param_bytes = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    return loss_sum / n_targets, grads, traffic.wire, traffic.payload, param_bytes


@pytest.mark.parametrize("dp, micro_batch, tied", [(2, 2, False), (4, 1, True), (2, 4, True)])
def test_training_matches_one_process(pool, data, dp, micro_batch, tied):
    cfg = tiny_config(micro_batch=micro_batch)
    model_config = tiny_model_config(tie_word_embeddings=tied)
    ref_losses, ref_params = train_losses_and_params(ParallelContext.single(), cfg, data, model_config)
    assert ref_losses[-1] < ref_losses[0] - 0.5  # the run actually learns
    results = pool.run(train_losses_and_params, ParallelDims(dp=dp), cfg, data, model_config)
    for rank, (losses, params) in enumerate(results):
        for step, (got, want) in enumerate(zip(losses, ref_losses)):
            assert abs(got - want) <= TOLERANCE * abs(want), f"rank {rank} step {step}: {got} vs {want}"
        for name, want in ref_params.items():
            assert relative_error(params[name], want) <= TOLERANCE, f"rank {rank} {name}"


def test_gradients_and_traffic_of_one_step(pool, data):
    cfg = tiny_config()
    model_config = tiny_model_config()
    ref_loss, ref_grads, *_ = first_step_gradients(ParallelContext.single(), cfg, data, model_config)
    dp = 2
    results = pool.run(first_step_gradients, ParallelDims(dp=dp), cfg, data, model_config)
    for rank, (loss, grads, wire, payload, param_bytes) in enumerate(results):
        assert abs(loss - ref_loss) <= TOLERANCE * ref_loss
        for name, want in ref_grads.items():
            assert relative_error(grads[name], want) <= TOLERANCE, f"rank {rank} grad {name}"
        # Documented ring convention: an all-reduce of B bytes costs 2 (n-1)/n B per rank.
        assert payload == param_bytes
        assert wire == Fraction(2 * (dp - 1) * param_bytes, dp)


def test_accumulation_without_dp_matches_one_big_batch(data):
    """Micro-batching changes nothing: the loss is normalised by the global token count."""
    model_config = tiny_model_config()
    whole = first_step_gradients(ParallelContext.single(), tiny_config(micro_batch=8), data, model_config)
    pieces = first_step_gradients(ParallelContext.single(), tiny_config(micro_batch=2), data, model_config)
    assert abs(whole[0] - pieces[0]) <= TOLERANCE * whole[0]
    for name in whole[1]:
        assert relative_error(pieces[1][name], whole[1][name]) <= TOLERANCE, name


def test_bucket_overlap_launches_during_backward(pool, data):
    results = pool.run(count_buckets_launched_in_backward, ParallelDims(dp=2), data)
    for launched_early, total in results:
        assert total > 1 and launched_early >= total - 1


def count_buckets_launched_in_backward(ctx: ParallelContext, data):
    """With small buckets, all but the last bucket are launched from hooks before backward returns."""
    cfg = tiny_config(bucket_mb=0.25, micro_batch=4)
    trainer = Trainer(cfg, ctx, data, tiny_model_config())
    inputs, targets = trainer.sampler.shard(0, ctx.dp_rank, 2)
    from plait.train.trainer import token_loss_sum
    token_loss_sum(trainer.model, inputs, targets).backward()
    buckets = trainer.strategy.buckets
    launched = sum(bucket.launched for bucket in buckets.buckets)
    total = len(buckets.buckets)
    buckets.finish()
    return launched, total


def test_activation_checkpointing_gives_identical_gradients(data):
    model_config = tiny_model_config()
    plain = first_step_gradients(ParallelContext.single(), tiny_config(), data, model_config)
    recomputed = first_step_gradients(ParallelContext.single(), tiny_config(activation_checkpointing=True), data,
                                      model_config)
    assert recomputed[0] == plain[0]
    for name in plain[1]:
        assert torch.equal(recomputed[1][name], plain[1][name]), name


def test_bfloat16_data_parallel_tracks_one_process(pool, data):
    """bf16 autocast: same losses as one process to bf16 precision, and training still learns."""
    cfg = tiny_config(dtype="bfloat16", steps=10)
    model_config = tiny_model_config()
    ref_losses, _ = train_losses_and_params(ParallelContext.single(), cfg, data, model_config)
    (losses, _), _ = pool.run(train_losses_and_params, ParallelDims(dp=2), cfg, data, model_config)
    assert ref_losses[-1] < ref_losses[0] - 0.3
    for got, want in zip(losses, ref_losses):
        assert abs(got - want) <= 2e-2 * want


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_bf16_weights_are_cast_once_a_step_not_once_a_micro_batch(data, recompute):
    """Under bf16 autocast each matmul weight is cast once per step, however many micro-batches
    (autocast's cache, kept alive by the trainer's step-wide region), and once per evaluation;
    under recomputation, which frees the casts with the rest of a block, once per forward and
    once more per backward."""
    cfg = tiny_config(dtype="bfloat16", micro_batch=2, activation_checkpointing=recompute)  # 4 micro-batches
    trainer = Trainer(cfg, ParallelContext.single(), data, tiny_model_config())
    trainer.set_validation(data.val, max_windows=8)
    recast = recompute != "none"
    for run, casts in ((lambda: trainer.compute_gradients(0), 8 if recast else 1), (trainer.evaluate, 4 if recast else 1)):
        blocks = block_weight_casts(trainer, run)
        assert trainer.n_micro == 4
        assert len(blocks) == 7 * trainer.model_config.num_hidden_layers and set(blocks.values()) == {casts}, blocks
