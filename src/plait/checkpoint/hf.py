"""Hugging Face Llama import and export.

plait's parameter names are ``LlamaForCausalLM``'s, so the mapping is the identity; only the
config needs translating. Export writes ``config.json`` + ``model.safetensors`` that
``transformers.LlamaForCausalLM.from_pretrained`` loads; import reads a Hugging Face Llama
directory (single or sharded safetensors, with its ``model.safetensors.index.json``).

    from plait.checkpoint.hf import export_hf, load_hf_config, load_hf_weights
    export_hf("runs/x/checkpoints/step-00000300", "exported/")   # a plait checkpoint -> HF directory
    config = load_hf_config("path/to/hf-llama")                   # -> LlamaConfig
    load_hf_weights(model, "path/to/hf-llama")                    # into an unsharded plait model
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from plait.checkpoint.store import CheckpointError, read_full_state, read_meta
from plait.models import LlamaConfig

_HF_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
              "tie_word_embeddings", "initializer_range")


def hf_config_dict(config: LlamaConfig) -> dict:
    values = {field: getattr(config, field) for field in _HF_FIELDS}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32", **values}


def export_hf(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """A plait checkpoint (any layout) -> a Hugging Face Llama directory (fp32 weights)."""
    meta = read_meta(checkpoint)
    config = LlamaConfig(**meta["model"])
    full = read_full_state(checkpoint)
    weights = {name: tensor.contiguous() for (name, kind), tensor in full.items() if kind == "param"}
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config_dict(config), indent=2) + "\n")
    return out


def is_hf_directory(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


def load_hf_config(path: str | Path) -> LlamaConfig:
    path = Path(path)
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}/config.json cannot be read: {error}") from None
    if raw.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{path} holds a {raw.get('model_type')!r} model; plait reads Llama models")
    if raw.get("rope_scaling"):
        raise CheckpointError(f"{path}: rope_scaling {raw['rope_scaling']} is not supported yet")
    values = {field: raw[field] for field in _HF_FIELDS if raw.get(field) is not None}
    values.setdefault("num_key_value_heads", raw.get("num_attention_heads"))
    return LlamaConfig(**values)


def _weight_files(path: Path) -> dict[str, Path]:
    """parameter name -> the safetensors file holding it (sharded checkpoints via their index)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        mapping = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in mapping.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{path} has no model.safetensors or model.safetensors.index.json")
    with safe_open(str(single), framework="pt") as handle:
        return {name: single for name in handle.keys()}


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Copy a Hugging Face Llama's weights into a plait model, by name, reading only what this
    rank holds: the parameters of its pipeline stage, and of a tensor-parallel parameter only
    its slice (``safetensors`` slices the file; the rest is never read)."""
    path = Path(path)
    files = _weight_files(path)
    handles: dict[Path, object] = {}
    try:
        for name, param in model.named_parameters():
            if name not in files:
                raise CheckpointError(f"{path} has no weight {name}")
            file = files[name]
            if file not in handles:
                handles[file] = safe_open(str(file), framework="pt")
            dim = getattr(param, "_plait_shard_dim", None)
            if dim is None:
                tensor = handles[file].get_tensor(name)
            else:
                part = handles[file].get_slice(name)
                size = param.shape[dim]
                start = getattr(param, "_plait_shard_index", 0) * size
                index = tuple(slice(start, start + size) if d == dim else slice(None)
                              for d in range(len(part.get_shape())))
                tensor = part[index]
            if tuple(tensor.shape) != tuple(param.shape):
                raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model "
                                      f"{tuple(param.shape)}")
            param.copy_(tensor.to(param.dtype))
    finally:
        handles.clear()
