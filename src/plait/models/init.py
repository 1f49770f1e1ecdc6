"""Layout-invariant parameter initialisation.

Every parameter is drawn, as one full tensor, from a generator seeded by
(seed, parameter name) alone. Whatever the layout (1 process, tensor parallel, pipeline
stages, ZeRO-3), a rank that holds a slice of ``name`` computes the full tensor with the same
generator and keeps its slice, so every layout starts from the identical model.
"""
from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from plait.models.config import LlamaConfig
from plait.models.llama import LlamaForCausalLM

_NORM_SUFFIXES = ("norm.weight", "layernorm.weight")
# Residual-branch outputs get std / sqrt(2 * layers) (GPT-2): each block adds two of them.
_RESIDUAL_OUTPUTS = ("o_proj.weight", "down_proj.weight")


def parameter_seed(seed: int, name: str) -> int:
    """A 63-bit seed that depends on (seed, name) only, stable across Python runs."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def initial_value(name: str, shape: torch.Size | tuple[int, ...], config: LlamaConfig, seed: int) -> torch.Tensor:
    """The full fp32 initial value of parameter ``name`` (on the CPU)."""
    if name.endswith(_NORM_SUFFIXES):
        return torch.ones(shape)
    std = config.initializer_range
    if name.endswith(_RESIDUAL_OUTPUTS):
        std /= math.sqrt(2 * config.num_hidden_layers)
    generator = torch.Generator().manual_seed(parameter_seed(seed, name))
    return torch.randn(shape, generator=generator).mul_(std)


@torch.no_grad()
def init_parameters(model: nn.Module, config: LlamaConfig, seed: int) -> None:
    """Fill every (unsharded) parameter of ``model`` with its layout-invariant initial value."""
    for name, param in model.named_parameters():
        param.copy_(initial_value(name, param.shape, config, seed))


def build_model(config: LlamaConfig, seed: int = 0, device: torch.device | str = "cpu") -> LlamaForCausalLM:
    """A freshly initialised model on ``device`` (fp32 master weights)."""
    model = LlamaForCausalLM(config)
    init_parameters(model, config, seed)
    return model.to(device)


def build_meta_model(config: LlamaConfig) -> LlamaForCausalLM:
    """The model with every parameter on the meta device (shapes, no memory): parallel plans
    and pipeline cuts apply to it, then each rank materialises only its own pieces. The RoPE
    tables (a few numbers, not parameters) are real."""
    return LlamaForCausalLM(config, device="meta")  # (not torch.device("meta") as a mode: it imports dynamo)


def model_parameters(model: LlamaForCausalLM) -> list[tuple[str, nn.Parameter]]:
    """(name in the full model, parameter) of what ``model`` holds. A tied head kept without its
    embedding (a pipeline's last stage) goes by the embedding's name, as in Hugging Face files."""
    aliases = {"lm_head.weight": "model.embed_tokens.weight"} if model.config.tie_word_embeddings else {}
    return [(aliases.get(name, name), param) for name, param in model.named_parameters()]
