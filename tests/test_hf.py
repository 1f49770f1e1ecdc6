"""Hugging Face round trips: models saved by transformers load with its logits (scaled RoPE, tied,
GQA, head_dim), export loads in transformers with equal logits and the source's files; import trains."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

from plait.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from plait.checkpoint.hf_config import load_hf_config
from plait.cli import main
from plait.mesh import ParallelContext, ParallelDims
from plait.models import build_model
from plait.sharding import shard_of
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
            shard = shard_of(param)
            want = full[name].chunk(2, dim=shard.dim)[rank] if shard.is_split else full[name]
            assert torch.equal(param, want), (rank, name)


# Models as users bring them: config and weights written by the installed transformers itself.
HF_CASES = {
    "theta-1e5-tied-gqa": dict(rope_parameters=dict(rope_type="default", rope_theta=100000.0),
                               tie_word_embeddings=True),
    "llama3-scaled": dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0, original_max_position_embeddings=32)),
    "linear-scaled": dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0)),
    "head-dim-32": dict(head_dim=32, rope_parameters=dict(rope_type="default", rope_theta=500000.0)),
}


def save_hf_model(path, seed: int, **fields) -> transformers.LlamaForCausalLM:
    """A small Llama saved with save_pretrained; q and k scaled up so attention, and so RoPE, matters."""
    hf_config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                         **fields)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    model.save_pretrained(path)
    return transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def model_logits(ctx: ParallelContext, cfg, data, ids):
    trainer = Trainer(cfg, ctx, data)
    with torch.no_grad():
        return trainer.model(ids)


@pytest.mark.parametrize("case", HF_CASES)
def test_models_saved_by_transformers_give_its_logits_at_tp1_tp2_and_after_export(case, pool, tmp_path):
    source = tmp_path / "source"
    theirs = save_hf_model(source, seed=5, **HF_CASES[case])
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = theirs(ids).logits
    data = synthetic_data()
    cfg = tiny_config(model=str(source))
    single = Trainer(cfg, ParallelContext.single(), data)
    with torch.no_grad():
        assert relative_error(single.model(ids), expected) <= 1e-5
        # The check can fail: the same weights with theta 10000, or without the scaling, are far off.
        for wrong in ({"rope_theta": 10000.0, "rope_scaling": None}, {"rope_scaling": None}):
            if single.model_config.replace(**wrong) != single.model_config:
                plain = build_model(single.model_config.replace(**wrong))
                plain.load_state_dict(single.model.state_dict())
                assert relative_error(plain(ids), expected) > 1e-2, wrong
    for logits in pool.run(model_logits, ParallelDims(tp=2), tiny_config(model=str(source), tp=2), data, ids):
        assert relative_error(logits, expected) <= 1e-5
    save_checkpoint(single, tmp_path / "run", 0)
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--hf", str(tmp_path / "export")]) == 0
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported["rope_parameters"] == json.loads((source / "config.json").read_text())["rope_parameters"]
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager").eval()
    with torch.no_grad():
        assert relative_error(again(ids).logits, expected) <= 1e-5
    assert load_hf_config(tmp_path / "export") == single.model_config


def saved_tokenizer(path) -> None:
    """A BPE tokenizer trained here and saved by transformers, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["<s>", "</s>"])
    tokenizer.train_from_iterator([f"def f{i}(x): return x + {i}\n" for i in range(200)], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    fast.save_pretrained(path)


def test_plait_train_one_step_at_tiny_lr_then_export_is_the_source_model(tmp_path):
    """The user's path: plait train --model DIR (lr 1e-30, one step), plait export; transformers sees the
    source's logits, the source's token ids, generation config, chat template and tokenizer."""
    import numpy as np

    source = tmp_path / "source"
    theirs = save_hf_model(source, seed=9, bos_token_id=0, eos_token_id=1, tie_word_embeddings=True,
                           rope_parameters=dict(rope_type="default", rope_theta=100000.0))
    saved_tokenizer(source)
    transformers.GenerationConfig(bos_token_id=0, eos_token_id=1, max_new_tokens=7).save_pretrained(source)
    np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint16).tofile(tmp_path / "ids.bin")
    env = {**os.environ, "PLAIT_CACHE": str(tmp_path / "cache")}
    env.pop("WORLD_SIZE", None)
    run = subprocess.run([sys.executable, "-m", "plait", "train", "--model", str(source), "--data",
                          str(tmp_path / "ids.bin"), "--steps", "1", "--lr", "1e-30", "--global-batch", "2",
                          "--seq-len", "32", "--dtype", "float32", "--checkpoint-every", "1", "--eval-every", "0",
                          "--out", str(tmp_path / "run"), "--no-progress", "--no-tensorboard", "--no-plot"],
                         capture_output=True, text=True, env=env, timeout=240)
    assert run.returncode == 0, run.stderr
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--hf", str(tmp_path / "export")]) == 0
    export = tmp_path / "export"
    for name in ("generation_config.json", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"):
        assert (export / name).read_bytes() == (source / name).read_bytes(), name
    config = json.loads((export / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (0, 1)
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 100000.0}
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(4))
    again = transformers.LlamaForCausalLM.from_pretrained(export, attn_implementation="eager").eval()
    with torch.no_grad():
        assert relative_error(again(ids).logits, theirs(ids).logits) <= 1e-5
    assert transformers.GenerationConfig.from_pretrained(export).max_new_tokens == 7
    # The transformers 4.4x form, which transformers 5 reads too.
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--hf", str(tmp_path / "v4"),
                 "--config-form", "4"]) == 0
    legacy = json.loads((tmp_path / "v4" / "config.json").read_text())
    assert (legacy["rope_theta"], legacy["rope_scaling"]) == (100000.0, None) and "rope_parameters" not in legacy
    with torch.no_grad():
        old_form = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "v4", attn_implementation="eager").eval()
        assert relative_error(old_form(ids).logits, theirs(ids).logits) <= 1e-5
    tokenizers = [transformers.AutoTokenizer.from_pretrained(path) for path in (source, export)]
    text, chat = "def f3(x): return x + 3", [{"role": "user", "content": "def f1"}]
    assert tokenizers[1].eos_token == "</s>" and tokenizers[1](text) == tokenizers[0](text)
    assert tokenizers[1].apply_chat_template(chat, tokenize=False) == "def f1"
