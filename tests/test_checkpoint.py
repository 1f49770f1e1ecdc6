"""Checkpoints: bitwise resume, resharding between layouts, atomic commits, clear errors."""
from __future__ import annotations

import pytest
import torch

from plait.checkpoint import (CheckpointError, complete_checkpoints, latest_checkpoint, load_checkpoint,
                              save_checkpoint)
from plait.mesh import ParallelContext, ParallelDims
from plait.train import Trainer
from helpers import tiny_config

TOLERANCE = 1e-5
TOTAL, SPLIT = 8, 4


def train_and_save(ctx: ParallelContext, cfg, data, model_config, run_dir, steps):
    trainer = Trainer(cfg, ctx, data, model_config)
    losses = [trainer.train_step(step)["loss"] for step in range(steps)]
    save_checkpoint(trainer, run_dir, steps, keep=2)
    return losses


def load_and_train(ctx: ParallelContext, cfg, data, model_config, run_dir, steps):
    trainer = Trainer(cfg, ctx, data, model_config)
    start = load_checkpoint(trainer, latest_checkpoint(run_dir))
    return [trainer.train_step(step)["loss"] for step in range(start, steps)]


@pytest.fixture(scope="module")
def uninterrupted(data, model_config):
    trainer = Trainer(tiny_config(steps=TOTAL, micro_batch=1), ParallelContext.single(), data, model_config)
    return [trainer.train_step(step)["loss"] for step in range(TOTAL)]


def test_resume_is_bitwise_identical(tmp_path, data, model_config, uninterrupted):
    cfg = tiny_config(steps=TOTAL, micro_batch=1)
    first = train_and_save(ParallelContext.single(), cfg, data, model_config, tmp_path, SPLIT)
    rest = load_and_train(ParallelContext.single(), cfg, data, model_config, tmp_path, TOTAL)
    assert first + rest == uninterrupted  # exact float equality, step by step


LAYOUTS = {
    "tp2": (ParallelDims(tp=2), dict()),
    "dp2-zero3": (ParallelDims(dp=2), dict(zero=3)),
    "dp2-zero1": (ParallelDims(dp=2), dict(zero=1)),
    "tp2-sp": (ParallelDims(tp=2), dict(sequence_parallel=True, loss_parallel=True)),
    "pp2": (ParallelDims(pp=2), dict(microbatches=8, micro_batch=None)),
    "single": (ParallelDims(), dict()),
    "2x2x2": (ParallelDims(dp=2, pp=2, tp=2), dict(microbatches=4, micro_batch=None, sequence_parallel=True,
                                                   zero=1)),
    "tp4": (ParallelDims(tp=4), dict()),
    "dp2-cp2-zero3": (ParallelDims(dp=2, cp=2), dict(cp=2, zero=3)),
    "cp2-alltoall": (ParallelDims(cp=2), dict(cp=2, cp_mode="alltoall")),
    "hsdp-2x2-zero3": (ParallelDims(dp=4, dp_shard=2), dict(zero=3, dp_shard=2)),
}


@pytest.mark.parametrize("source, target", [
    # tp2 -> ZeRO-3 to make test-large: make test loads ZeRO-3 from dp2-zero1 (hsdp) and saves it under tp
    # (the uneven-vocabulary reshard below)
    pytest.param("tp2", "dp2-zero3", marks=pytest.mark.large), ("dp2-zero1", "tp2-sp"), ("pp2", "single"),
                                            ("dp2-cp2-zero3", "cp2-alltoall"), ("hsdp-2x2-zero3", "dp2-zero1"),
                                            ("dp2-zero1", "hsdp-2x2-zero3"),
                                            pytest.param("2x2x2", "tp4", marks=pytest.mark.large)])  # 22 s
def test_reshard_between_layouts(pool, tmp_path, data, model_config, uninterrupted, source, target):
    def run(layout, fn):
        dims, options = LAYOUTS[layout]
        cfg = tiny_config(**{"steps": TOTAL, "micro_batch": 1, "tp": dims.tp, **options})
        if dims.world_size == 1:
            return [fn(ParallelContext.single(), cfg, data, model_config, tmp_path, steps)]
        return pool.run(fn, dims, cfg, data, model_config, tmp_path, steps, timeout_s=300)

    steps = SPLIT
    first = run(source, train_and_save)[0]
    steps = TOTAL
    for rest in run(target, load_and_train):
        for step, (got, want) in enumerate(zip(first + rest, uninterrupted)):
            assert abs(got - want) <= TOLERANCE * want, f"{source} -> {target}, step {step}: {got} vs {want}"


def test_a_vocabulary_tp_does_not_divide_reshards_and_exports(pool, tmp_path, data):
    """259 tokens: saved at tp 2 (rows 130 + 129) under ZeRO-3, resumed at tp 4 (65, 65, 65, 64) and
    at one process, both continuing the one-process run; the export holds all 259 rows."""
    from safetensors.torch import load_file

    from plait.checkpoint.hf import export_hf
    from plait.models import model_parameters
    from helpers import tiny_model_config

    odd = tiny_model_config(vocab_size=259)
    cfg = tiny_config(steps=TOTAL, micro_batch=1)
    single = ParallelContext.single()
    whole = Trainer(cfg, single, data, odd)
    uninterrupted = [whole.train_step(step)["loss"] for step in range(TOTAL)]
    saved = pool.run(train_and_save, ParallelDims(dp=2, tp=2), tiny_config(steps=TOTAL, micro_batch=1, tp=2, zero=3),
                     data, odd, tmp_path, SPLIT)[0]
    continued = [*pool.run(load_and_train, ParallelDims(tp=4), tiny_config(steps=TOTAL, micro_batch=1, tp=4),
                           data, odd, tmp_path, TOTAL),
                 load_and_train(single, cfg, data, odd, tmp_path, TOTAL)]
    for rest in continued:
        for step, (got, want) in enumerate(zip(saved + rest, uninterrupted)):
            assert abs(got - want) <= TOLERANCE * want, f"step {step}: {got} vs {want}"
    exported = load_file(export_hf(latest_checkpoint(tmp_path), tmp_path / "hf") / "model.safetensors")
    loaded = Trainer(cfg, single, data, odd)
    load_checkpoint(loaded, latest_checkpoint(tmp_path))
    for name, param in model_parameters(loaded.model):
        assert torch.equal(exported[name], param.detach().float()), name
    assert exported["model.embed_tokens.weight"].shape == (259, odd.hidden_size)


def test_mismatched_model_is_a_clear_error(tmp_path, data, model_config):
    cfg = tiny_config(steps=2, micro_batch=1)
    train_and_save(ParallelContext.single(), cfg, data, model_config, tmp_path, 1)
    other = Trainer(cfg, ParallelContext.single(), data, model_config.replace(intermediate_size=256))
    with pytest.raises(CheckpointError, match="differs in intermediate_size: checkpoint 384, this run 256"):
        load_checkpoint(other, latest_checkpoint(tmp_path))


def test_commits_are_atomic_and_old_ones_pruned(tmp_path, data, model_config):
    cfg = tiny_config(steps=4, micro_batch=1)
    trainer = Trainer(cfg, ParallelContext.single(), data, model_config)
    for step in range(1, 4):
        trainer.train_step(step - 1)
        save_checkpoint(trainer, tmp_path, step, keep=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    # a checkpoint abandoned mid-write (no COMPLETE, .tmp name) is never picked up
    abandoned = tmp_path / "checkpoints" / "step-00000009.tmp"
    abandoned.mkdir()
    (abandoned / "rank-00000.json").write_text("[]")
    assert latest_checkpoint(tmp_path).name == "step-00000003"
    # nothing in a checkpoint is pickled: the index is JSON, the tensors safetensors
    files = {p.suffix for p in latest_checkpoint(tmp_path).iterdir()}
    assert files <= {".json", ".safetensors", ""}


def test_crash_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path, data, model_config, monkeypatch):
    import plait.checkpoint.store as store

    cfg = tiny_config(steps=4, micro_batch=1)
    trainer = Trainer(cfg, ParallelContext.single(), data, model_config)
    trainer.train_step(0)
    save_checkpoint(trainer, tmp_path, 1)
    trainer.train_step(1)
    real_save = store.save_file

    def dies_halfway(tensors, path, *args, **kwargs):
        half = dict(list(tensors.items())[: len(tensors) // 2])
        real_save(half, path, *args, **kwargs)
        raise KeyboardInterrupt("killed while writing")  # the process dies mid-checkpoint

    monkeypatch.setattr(store, "save_file", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(trainer, tmp_path, 2)
    monkeypatch.setattr(store, "save_file", real_save)
    assert (tmp_path / "checkpoints" / "step-00000002.tmp").exists()
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    fresh = Trainer(cfg, ParallelContext.single(), data, model_config)
    assert load_checkpoint(fresh, latest_checkpoint(tmp_path)) == 1
