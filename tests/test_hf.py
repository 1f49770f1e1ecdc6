"""Hugging Face round trips: export loads in transformers with equal logits; import trains."""
from __future__ import annotations

import torch
import transformers

from plait.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from plait.cli import main
from plait.mesh import ParallelContext, ParallelDims
from plait.train import Trainer
from helpers import relative_error, synthetic_data, tiny_config, tiny_model_config


def test_export_loads_in_transformers_with_equal_logits(tmp_path):
    data = synthetic_data()
    config = tiny_model_config(tie_word_embeddings=True, num_key_value_heads=2)
    trainer = Trainer(tiny_config(steps=3), ParallelContext.single(), data, config)
    for step in range(3):
        trainer.train_step(step)
    save_checkpoint(trainer, tmp_path / "run", 3)
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--hf", str(tmp_path / "hf")]) == 0
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trainer.model(ids)
        actual = theirs(ids).logits
    assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-5)


def import_logits(ctx: ParallelContext, cfg, data, ids):
    trainer = Trainer(cfg, ctx, data)
    with torch.no_grad():
        logits = trainer.model(ids)
    loss = trainer.train_step(0)["loss"]
    return logits, loss


def test_train_from_a_sharded_hf_directory_at_tp2(pool, tmp_path):
    config = tiny_model_config()
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(3)
    theirs = transformers.LlamaForCausalLM(hf_config).eval()
    theirs.save_pretrained(tmp_path / "hf", max_shard_size="300KB")  # several files + an index
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ids = torch.randint(0, config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(ids).logits
    data = synthetic_data()
    cfg = tiny_config(model=str(tmp_path / "hf"))
    single_logits, single_loss = import_logits(ParallelContext.single(), cfg, data, ids)
    assert relative_error(single_logits, expected) <= 1e-5
    for logits, loss in pool.run(import_logits, ParallelDims(tp=2), tiny_config(model=str(tmp_path / "hf"), tp=2),
                                 data, ids):
        assert relative_error(logits, expected) <= 1e-5
        assert abs(loss - single_loss) <= 1e-5 * single_loss


def test_checkpoint_from_one_layout_exports_identically(pool, tmp_path):
    """A tp=2 checkpoint exports to the same weights as the single-process model it equals."""
    data = synthetic_data()
    config = tiny_model_config()
    single = Trainer(tiny_config(steps=2), ParallelContext.single(), data, config)
    for step in range(2):
        single.train_step(step)
    pool.run(save_after_two_steps, ParallelDims(tp=2), tiny_config(steps=2, tp=2), data, config, tmp_path / "tp")
    assert main(["export", "--checkpoint", str(tmp_path / "tp"), "--hf", str(tmp_path / "hf")]) == 0
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    for name, param in single.model.named_parameters():
        assert relative_error(theirs[name], param) <= 1e-5, name
    fresh = Trainer(tiny_config(steps=2), ParallelContext.single(), data, config)
    assert load_checkpoint(fresh, latest_checkpoint(tmp_path / "tp")) == 2


def save_after_two_steps(ctx, cfg, data, config, run_dir):
    trainer = Trainer(cfg, ctx, data, config)
    for step in range(2):
        trainer.train_step(step)
    save_checkpoint(trainer, run_dir, 2)


def test_hf_import_reads_this_ranks_slices(tmp_path):
    """With a tensor-parallel plan applied, each parameter receives exactly its slice of the file."""
    import types

    from plait.checkpoint.hf import load_hf_weights
    from plait.models import build_model
    from plait.tensor_parallel import llama_plan, parallelize

    config = tiny_model_config()
    source = build_model(config, seed=11)
    from safetensors.torch import save_file
    (tmp_path / "hf").mkdir()
    save_file({n: p.detach().contiguous() for n, p in source.named_parameters()}, str(tmp_path / "hf" / "model.safetensors"))
    for rank in range(2):
        model = build_model(config, seed=0)
        parallelize(model, types.SimpleNamespace(size=2, rank=rank), llama_plan(True, True))
        load_hf_weights(model, tmp_path / "hf")
        full = dict(source.named_parameters())
        for name, param in model.named_parameters():
            dim = getattr(param, "_plait_shard_dim", None)
            want = full[name] if dim is None else full[name].chunk(2, dim=dim)[rank]
            assert torch.equal(param, want), (rank, name)
