"""Hugging Face Llama import and export.

plait's parameter names are ``LlamaForCausalLM``'s, so the mapping is the identity; the config
is translated by ``plait.checkpoint.hf_config``. Export writes ``config.json`` +
``model.safetensors`` (and the source directory's tokenizer and generation files) that
``transformers.LlamaForCausalLM.from_pretrained`` loads; import reads a Hugging Face Llama
directory (single or sharded safetensors, with its ``model.safetensors.index.json``).

    from plait.checkpoint.hf import export_hf, load_hf_weights
    from plait.checkpoint.hf_config import load_hf_config
    export_hf("runs/x/checkpoints/step-00000300", "exported/")   # a plait checkpoint -> HF directory
    config = load_hf_config("path/to/hf-llama")                   # -> LlamaConfig, or a one-line ConfigError
    load_hf_weights(model, "path/to/hf-llama")                    # this rank's part of the weights
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from plait.checkpoint.hf_config import (SOURCE_DIR, SOURCE_FILES, ConfigForm, carried_fields, hf_config_dict,
                                        read_json)
from plait.checkpoint.sources import HFSource
from plait.checkpoint.store import TOKENIZER_DIR, read_full_state, read_meta
from plait.data.hf_tokenizer import PretrainedTokenizer, has_tokenizer
from plait.files import atomic_path, atomic_write_text
from plait.models import LlamaConfig, model_parameters
from plait.sharding import shard_of


def export_hf(checkpoint: str | Path, out_dir: str | Path, form: ConfigForm | None = None) -> Path:
    """A plait checkpoint (any layout) -> a Hugging Face Llama directory (fp32 weights).

    config.json is written in ``form`` (default: what the installed transformers reads), RoPE
    settings included; a run that started from a Hugging Face directory also gets back that
    directory's token ids, generation config, chat template and tokenizer files. The tokenizer
    the run encoded its text with (the checkpoint's ``tokenizer/``, plait's BPE included) is
    written beside the weights, with a ``generation_config.json`` of its BOS/EOS ids where the
    source had none: ``AutoTokenizer`` and ``AutoModelForCausalLM`` load the export and generate."""
    meta = read_meta(checkpoint)
    config = LlamaConfig(**meta["model"])
    source = Path(checkpoint) / SOURCE_DIR
    carried = carried_fields(read_json(source / "config.json")) if (source / "config.json").is_file() else {}
    tokenizer_dir = Path(checkpoint) / TOKENIZER_DIR
    tokenizer = PretrainedTokenizer(tokenizer_dir) if has_tokenizer(tokenizer_dir) else None
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
        carried = {**{key: value for key, value in ids.items() if value is not None}, **carried}
    full = read_full_state(checkpoint)
    weights = {name: tensor.contiguous() for (name, kind), tensor in full.items() if kind == "param"}
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "model.safetensors") as temp:  # safetensors writes owner-only files
        save_file(weights, str(temp), metadata={"format": "pt"})
    atomic_write_text(out / "config.json", json.dumps(hf_config_dict(config, form, carried), indent=2) + "\n")
    for name in SOURCE_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
        if not (out / "generation_config.json").is_file():
            generation = {key: carried[key] for key in ("bos_token_id", "eos_token_id") if key in carried}
            atomic_write_text(out / "generation_config.json", json.dumps(generation, indent=2) + "\n")
    return out


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Copy a Hugging Face Llama's weights into a (possibly tensor-parallel) plait model, by name,
    reading only what each parameter holds: of a tensor-parallel parameter only its part."""
    source = HFSource(path)
    try:
        for name, param in model_parameters(model):
            shard = shard_of(param)
            values = source.read(name, shard, shard.full_shape(tuple(param.shape)))
            param.copy_(values.view(param.shape).to(param.dtype))
    finally:
        source.close()
