"""Cutting the model into pipeline chunks, keeping parameter names.

The decoder's blocks are split into S = pp * v contiguous chunks, balanced by FLOPs (each
block costs the same; the head's matmul is charged to the last block), or by an explicit
list of block counts. Chunk c runs on the pipeline rank its schedule's ``Placement`` gives
(c % pp, or the V of ZB-V). Each rank keeps only the blocks
of its chunks (``model.layers`` becomes a ModuleDict keyed by the original indices, so
parameter names -- ``model.layers.5.mlp.up_proj.weight`` -- do not change), the embedding if
it owns chunk 0, and the final norm and head if it owns the last chunk.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from plait.comm import eager
from plait.models.config import LlamaConfig
from plait.pipeline.schedules import Placement
from plait.pipeline.split import StageError, balanced_split
from plait.pipeline.weight_grad import DeferrableLinear, DeferredWeightGradients, RoutesWeightGradients


@dataclass(frozen=True)
class PipelineChunk:
    index: int                # global chunk index
    layers: tuple[int, ...]   # original block indices, in order
    is_first: bool
    is_last: bool


def block_costs(config: LlamaConfig, seq_len: int) -> list[float]:
    """Per-block training FLOPs per token, the head's added to the last block."""
    h, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
    block = 6 * (h * hd * (2 * config.num_attention_heads + 2 * config.num_key_value_heads) + 3 * h * f) \
        + 12 * config.num_attention_heads * hd * seq_len
    costs = [float(block)] * config.num_hidden_layers
    costs[-1] += 6.0 * h * config.vocab_size
    return costs


def plan_chunks(config: LlamaConfig, pp: int, virtual_stages: int, seq_len: int,
                split: list[int] | None = None) -> list[PipelineChunk]:
    parts = pp * virtual_stages
    if split is None:
        counts = balanced_split(block_costs(config, seq_len), parts)
    else:
        if len(split) != parts or sum(split) != config.num_hidden_layers or min(split) < 1:
            raise StageError(f"--pipeline-split needs {parts} positive block counts summing to "
                             f"{config.num_hidden_layers}, got {split}")
        counts = list(split)
    chunks, start = [], 0
    for index, count in enumerate(counts):
        chunks.append(PipelineChunk(index, tuple(range(start, start + count)), index == 0, index == parts - 1))
        start += count
    return chunks


def keep_stage(model: nn.Module, chunks: list[PipelineChunk], pp_rank: int, pp: int,
               placement: Placement = Placement.LOOP) -> list[PipelineChunk]:
    """Drop from ``model`` everything rank ``pp_rank`` does not run; return its chunks in order.
    A rank holding both the first and the last chunk keeps a tied embedding tied."""
    mine = [chunk for chunk in chunks if placement.rank_of(chunk.index, pp) == pp_rank]
    owned = [i for chunk in mine for i in chunk.layers]
    decoder = model.model
    decoder.layers = nn.ModuleDict({str(i): decoder.layers[i] for i in owned})
    if not any(chunk.is_first for chunk in mine):
        decoder.embed_tokens = None
    if not any(chunk.is_last for chunk in mine):
        decoder.norm = None
        model.lm_head = None
    return mine


def named_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(index, block) of the decoder blocks this rank holds (ModuleList or pipeline ModuleDict)."""
    layers = model.model.layers
    if isinstance(layers, nn.ModuleDict):
        return list(layers.items())
    return [(str(i), layer) for i, layer in enumerate(layers)]


def chunk_forward(model: nn.Module, chunk: PipelineChunk, x: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Token ids (first chunk) or the previous chunk's activations -> this chunk's output;
    the last chunk returns the final-norm hidden states (the loss is the caller's)."""
    decoder = model.model
    if chunk.is_first:
        x = decoder.embed_tokens(x)
    cos, sin = decoder.position_tables(seq_len, x)
    for index in chunk.layers:
        x = decoder.layers[str(index)](x, cos, sin)
    if chunk.is_last:
        x = decoder.norm(x)
    return x


@eager  # queues its W from backward: kept out of --compile's graphs, as collectives are
def _deferrable_forward(module: nn.Linear, store: DeferredWeightGradients, x: torch.Tensor) -> torch.Tensor:
    return DeferrableLinear.apply(x, module.weight, module.bias, store)


def defer_weight_gradients(blocks: Iterable[nn.Module], store: DeferredWeightGradients) -> int:
    """Route every linear layer of ``blocks`` through ``store`` (plain ``nn.Linear`` by patching
    its forward, as recomputation patches blocks; tensor-parallel layers by their
    ``weight_gradients`` slot). Returns how many layers were routed."""
    routed = 0
    for block in blocks:
        for module in block.modules():
            if isinstance(module, RoutesWeightGradients):
                module.weight_gradients = store
            elif isinstance(module, nn.Linear):
                module.forward = functools.partial(_deferrable_forward, module, store)
            else:
                continue
            routed += 1
    return routed
