"""Models no rank holds: ZeRO-3 with recomputation, ZeRO-2/3 and tied embeddings with pipelines,
selective recomputation, construction of only a rank's pieces. Each equals one process."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from plait.mesh import ParallelContext, ParallelDims
from plait.models import get_preset, model_parameters
from plait.train import Trainer
from helpers import assert_runs_match, tiny_config, tiny_model_config, train_and_collect

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def reference(data, model_config):
    return train_and_collect(ParallelContext.single(), tiny_config(micro_batch=1), data, model_config)


@pytest.fixture(scope="module")
def tied_config():
    return tiny_model_config(num_hidden_layers=8, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def tied_reference(data, tied_config):
    return train_and_collect(ParallelContext.single(), tiny_config(micro_batch=1), data, tied_config)


@pytest.mark.parametrize("dims, recompute, extra", [
    (ParallelDims(dp=2), "full", {}),
    (ParallelDims(dp=2), "selective", {}),
    pytest.param(ParallelDims(dp=2, tp=2), "selective", {"sequence_parallel": True, "loss_parallel": True},
                 marks=pytest.mark.large),  # 28 s; tp2 + selective: test_tensor_parallel, composed: random layouts
], ids=["dp2-zero3-full", "dp2-zero3-selective", "dp2-tp2-sp-zero3-selective"])
def test_zero3_with_recomputation_matches_one_process(pool, data, model_config, reference, dims, recompute, extra):
    cfg = tiny_config(micro_batch=2, zero=3, tp=dims.tp, activation_checkpointing=recompute, **extra)
    assert_runs_match(pool.run(train_and_collect, dims, cfg, data, model_config), reference, TOLERANCE)


@pytest.mark.parametrize("zero, schedule", [(2, "1f1b"), pytest.param(3, "1f1b", marks=pytest.mark.large),
                                            pytest.param(2, "interleaved", marks=pytest.mark.large),
                                            (3, "interleaved"), pytest.param(2, "zb1p", marks=pytest.mark.large),
                                            (3, "zb1p"), (2, "zbv"),
                                            pytest.param(3, "zbv", marks=pytest.mark.large)])  # all in test-large
def test_zero2_and_zero3_with_pipelines_match_one_process(pool, data, model_config, reference, zero, schedule):
    """Under zb1p / zbv a unit's linear weights get their gradients in W, after its norms' in B:
    the unit is reduced when all of them hold one, and finish() reduces what is left over."""
    cfg = tiny_config(micro_batch=None, microbatches=4, zero=zero, schedule=schedule,
                      virtual_stages=2 if schedule in ("interleaved", "zbv") else 1)
    results = pool.run(train_and_collect, ParallelDims(dp=2, pp=2), cfg, data, model_config, timeout_s=240)
    assert_runs_match(results, reference, TOLERANCE)


@pytest.mark.parametrize("dims, zero, schedule", [(ParallelDims(pp=2), 0, "1f1b"), (ParallelDims(dp=2, pp=2), 1, "1f1b"),
                                                  (ParallelDims(pp=2), 0, "zbv")],
                         ids=["pp2", "dp2-pp2-zero1", "pp2-zbv"])
def test_tied_embeddings_with_pipelines_match_one_process(pool, data, tied_config, tied_reference, dims, zero,
                                                          schedule):
    """The first stage's table and the last stage's head stay one weight: both end equal to it.
    Under ZB-V both are rank 0's: one parameter, nothing exchanged."""
    v = 2 if schedule == "zbv" else 1
    cfg = tiny_config(micro_batch=None, microbatches=4, zero=zero, schedule=schedule, virtual_stages=v)
    results = pool.run(train_and_collect, dims, cfg, data, tied_config, timeout_s=240)
    assert_runs_match(results, tied_reference, TOLERANCE)
    holders = [rank for rank, (_, _, params, _) in enumerate(results) if "model.embed_tokens.weight" in params]
    assert len(holders) == (1 if schedule == "zbv" else 2) * dims.dp  # first and last stage of every replica


def first_step_gradients(ctx, cfg, data, model_config):
    trainer = Trainer(cfg, ctx, data, model_config)
    trainer.compute_gradients(0)
    return {name: param.grad.clone() for name, param in model_parameters(trainer.model)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_recomputation_gives_the_gradients_without_it(data, model_config, recompute, dtype):
    """Bitwise; in bf16 the autocast casts are recomputed too (q/k/v's shared one included)."""
    plain = first_step_gradients(ParallelContext.single(), tiny_config(dtype=dtype), data, model_config)
    again = first_step_gradients(ParallelContext.single(), tiny_config(activation_checkpointing=recompute, dtype=dtype),
                                 data, model_config)
    for name, grad in plain.items():
        assert torch.equal(again[name], grad), name


def zero3_traffic(ctx, cfg, data, model_config):
    trainer = Trainer(cfg, ctx, data, model_config)
    ctx.counter.reset()
    trainer.train_step(0)
    units = trainer.strategy.units
    blocks = sum(u.padded * u.flat.element_size() for u in units if u.module is not None)
    root = sum(u.padded * u.flat.element_size() for u in units if u.module is None)
    records = {key: (r.calls, r.wire) for key, r in ctx.counter.records.items() if key[2] in ("grads", "params")}
    return records, blocks, root


@pytest.mark.parametrize("recompute", ["none", "full", "selective"])
def test_zero3_traffic_is_unchanged_by_recomputation(pool, data, recompute):
    """A recomputed block recomputes inside its own backward, after the gather that backward needs:
    3x the blocks' bytes + 2x the root's, whatever the recomputation."""
    dp = 2
    cfg = tiny_config(zero=3, micro_batch=4, activation_checkpointing=recompute)
    for records, blocks, root in pool.run(zero3_traffic, ParallelDims(dp=dp), cfg, data, tiny_model_config()):
        total = sum((wire for _, wire in records.values()), Fraction(0))
        assert total == Fraction(dp - 1, dp) * (3 * blocks + 2 * root), records
        assert records[("dp", "all_gather", "params")][0] == 2 * 4 + 1


def test_zero3_pipeline_traffic_per_micro_batch(pool, data, model_config):
    """Under a pipeline, ZeRO-3 gathers a block for each micro-batch's forward and backward and
    reduce-scatters its gradients each time; the root (embedding / norm, head) is gathered once
    per step and reduce-scattered after each micro-batch's backward (as ZeRO-2 does)."""
    dp, m = 2, 4
    cfg = tiny_config(micro_batch=None, microbatches=m, zero=3)
    for records, blocks, root in pool.run(zero3_traffic, ParallelDims(dp=dp, pp=2), cfg, data, model_config):
        total = sum((wire for _, wire in records.values()), Fraction(0))
        assert total == Fraction(dp - 1, dp) * (3 * m * blocks + (1 + m) * root), records
        assert records[("dp", "all_gather", "params")][0] == 2 * m * 4 + 1  # 4 blocks per stage


# ------------------------------------------------------------------ construction without the full model
def constructed_pieces(ctx, cfg, data, model_config):
    """This rank's parameter pieces right after construction (what a checkpoint would write)."""
    trainer = Trainer(cfg, ctx, data, model_config)
    return [(piece, values) for piece, values in trainer.strategy.state_pieces() if piece.kind == "param"]


def assert_pieces_are_the_full_model(results, full: dict[str, torch.Tensor]) -> None:
    """Every piece equals its part of the full tensor, and the pieces cover each element once."""
    from plait.sharding import TensorShard

    covered = {name: 0 for name in full}
    for pieces in results:
        for piece, values in pieces:
            part = TensorShard(piece.tp_dim, piece.tp_index, piece.tp_count).local(full[piece.name])
            assert torch.equal(part.reshape(-1)[piece.start:piece.end], values), piece
            covered[piece.name] += piece.end - piece.start
    assert covered == {name: tensor.numel() for name, tensor in full.items()}


@pytest.mark.parametrize("dims, extra, tied", [
    (ParallelDims(dp=2), {"zero": 3}, False),
    (ParallelDims(tp=2, pp=2), {"microbatches": 2, "micro_batch": None}, True),
    (ParallelDims(dp=2, tp=2), {"zero": 1, "sequence_parallel": True}, False),
    (ParallelDims(dp=2, pp=2), {"zero": 3, "microbatches": 2, "micro_batch": None}, True),
], ids=["dp2-zero3", "tp2-pp2-tied", "dp2-tp2-zero1", "dp2-pp2-zero3-tied"])
def test_every_layout_constructs_the_same_model(pool, data, dims, extra, tied):
    """Built on the meta device, each rank materialises only its pieces; together they are exactly
    the model one process builds whole (``build_model``, an independent code path)."""
    from plait.models import build_model

    model_config = tiny_model_config(num_hidden_layers=8, tie_word_embeddings=tied)
    cfg = tiny_config(tp=dims.tp, pp=dims.pp, **extra)
    full = {name: param.detach() for name, param in build_model(model_config, seed=cfg.seed).named_parameters()}
    assert_pieces_are_the_full_model(pool.run(constructed_pieces, dims, cfg, data, model_config), full)


def test_hf_weights_read_into_zero3_shards(pool, data, tmp_path):
    """From a Hugging Face directory, ZeRO-3 x tp ranks read just their ranges of the file."""
    import transformers
    from safetensors.torch import load_file

    model_config = tiny_model_config()
    hf = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(hf).save_pretrained(tmp_path)
    full = load_file(str(tmp_path / "model.safetensors"))
    cfg = tiny_config(model=str(tmp_path), zero=3, tp=2)
    assert_pieces_are_the_full_model(pool.run(constructed_pieces, ParallelDims(dp=2, tp=2), cfg, data, None), full)
    assert model_config.num_hidden_layers == hf.num_hidden_layers


def construction_peak(ctx, cfg, data, model_config):
    """Peak resident bytes added while building the trainer, against this rank's own pieces, the
    largest full parameter, and (as a control) building the whole model."""
    from plait.models import build_model
    from plait.train.metrics import release_free_memory, reset_resident_peak, resident_peak_bytes

    def added_peak(build):
        release_free_memory()  # what was freed before does not hide new pages
        reset_resident_peak()
        base = resident_peak_bytes()
        built = build()
        return built, resident_peak_bytes() - base

    Trainer(cfg, ctx, data, tiny_model_config())  # code paths (meta device, optimizer, hooks) load once
    trainer, constructed = added_peak(lambda: Trainer(cfg, ctx, data, model_config))
    own = sum(trainer.strategy.state_bytes().values())
    largest = max(p.numel() for p in trainer.model.parameters()) * 4  # tp = 1: local shapes are full
    del trainer
    whole, whole_peak = added_peak(lambda: build_model(model_config))
    return constructed, own, largest, whole_peak, sum(p.numel() for p in whole.parameters()) * 4


def test_construction_peak_is_own_pieces_plus_one_parameter(pool, data):
    """ZeRO-3 on 4 ranks: building the trainer adds at most the rank's master shards (gradient
    shards come with the first reduction) and one full parameter, where building the whole model
    adds all of it."""
    model_config = get_preset("tiny").replace(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                                              num_attention_heads=8, num_key_value_heads=4, vocab_size=16384)
    cfg = tiny_config(zero=3, micro_batch=1, global_batch=4)
    # RSS, not live bytes: glibc keeps a freed parameter's pages for the next allocation, so an
    # earlier (smaller) full parameter can still be resident when the largest one is generated
    slack = 40 * 2 ** 20
    for constructed, own, largest, whole_peak, whole in pool.run(construction_peak, ParallelDims(dp=4), cfg, data,
                                                                 model_config):
        assert constructed <= own + largest + slack, (constructed / 2 ** 20, own / 2 ** 20, largest / 2 ** 20)
        assert whole_peak >= whole, (whole_peak / 2 ** 20, whole / 2 ** 20)  # the control: the old way
        assert own + largest + slack < whole


def piece_checksums(ctx, cfg, data, model_config):
    """(piece, sum, index-weighted sum) in float64 of this rank's constructed pieces: the values
    stay on the workers (528M parameters), only their checksums travel."""
    checksums = []
    for piece, values in constructed_pieces(ctx, cfg, data, model_config):
        values = values.double()
        weights = torch.arange(piece.start, piece.end, dtype=torch.float64)
        checksums.append((piece, float(values.sum()), float((values * weights).sum())))
    return checksums


@pytest.mark.large
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("dims, extra", [
    (ParallelDims(dp=8), {"zero": 3, "micro_batch": 1}),
    (ParallelDims(tp=2, pp=2), {"microbatches": 2, "micro_batch": None}),
], ids=["dp8-zero3", "tp2-pp2"])
def test_medium_constructs_the_same_model_on_every_layout(pool, data, dims, extra):
    """`medium` (528M) built piece by piece on 8 ZeRO-3 ranks, and on tp2 x pp2, has the values of
    the model one process builds whole: checksums of every piece against the same of its part."""
    from plait.models import build_model
    from plait.sharding import TensorShard

    model_config = get_preset("medium").replace(vocab_size=tiny_model_config().vocab_size)
    cfg = tiny_config(model="medium", dtype="bfloat16", global_batch=8, seq_len=16, tp=dims.tp, pp=dims.pp,
                      **extra)
    results = pool.run(piece_checksums, dims, cfg, data, model_config, timeout_s=1500)
    full = {name: param.detach() for name, param in build_model(model_config, seed=cfg.seed).named_parameters()}
    covered = {name: 0 for name in full}
    for checksums in results:
        for piece, total, weighted in checksums:
            part = TensorShard(piece.tp_dim, piece.tp_index, piece.tp_count).local(full[piece.name])
            expected = part.reshape(-1)[piece.start:piece.end].double()
            weights = torch.arange(piece.start, piece.end, dtype=torch.float64)
            assert total == pytest.approx(float(expected.sum()), rel=1e-12, abs=1e-9), piece
            assert weighted == pytest.approx(float((expected * weights).sum()), rel=1e-12, abs=1e-6), piece
            covered[piece.name] += piece.end - piece.start
    assert covered == {name: tensor.numel() for name, tensor in full.items()}
