"""Context parallelism applied to a model from outside: ``apply_context_parallel``.

The model keeps two seams and knows nothing of cp: each ``LlamaAttention.attend(q, k, v)`` (causal
attention of a whole sequence) and ``LlamaModel.position_tables(seq_len, x)`` (RoPE cos/sin).
The plan replaces, per instance, ``attend`` by ring or all-to-all attention over the cp group,
and ``position_tables`` by the rows of the full sequence's tables at this rank's positions
(``context_positions``), so RoPE follows the load-balanced slice. Parameters, names and hooks are
untouched; the trainer feeds each rank its slice of token ids and targets (``context_slice``).
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from plait.comm import Collectives
from plait.context_parallel.alltoall import alltoall_attention
from plait.context_parallel.ring import ring_attention
from plait.context_parallel.sequence import context_positions
from plait.layout import ContextParallelMode


ATTENTION = {ContextParallelMode.RING: ring_attention, ContextParallelMode.ALLTOALL: alltoall_attention}


def _position_tables(original, cp_rank: int, cp: int):
    rows: dict[tuple[int, torch.device], torch.Tensor] = {}

    def position_tables(seq_len: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The RoPE tables of this rank's ``seq_len`` positions of a sequence cp times as long."""
        cos, sin = original(seq_len * cp, x)
        key = (seq_len, x.device)
        if key not in rows:
            rows[key] = context_positions(seq_len * cp, cp_rank, cp).to(x.device)
        return cos.index_select(0, rows[key]), sin.index_select(0, rows[key])
    return position_tables


def apply_context_parallel(model: nn.Module, comm: Collectives, mode: ContextParallelMode | str) -> None:
    """Make ``model`` (a ``LlamaForCausalLM``, possibly tp-parallelised or a pipeline stage) attend
    over the sequence sharded on ``comm``'s ranks."""
    from plait.models.llama import LlamaAttention, LlamaModel

    if comm.size == 1:
        return
    attention = ATTENTION[ContextParallelMode(mode)]
    for module in model.modules():
        if isinstance(module, LlamaAttention):
            module.attend = functools.partial(attention, comm=comm)
        elif isinstance(module, LlamaModel):
            module.position_tables = _position_tables(module.position_tables, comm.rank, comm.size)
