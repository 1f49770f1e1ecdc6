"""``--compile``: each decoder block's forward compiled by ``torch.compile``, as torchtitan does.

The unit is one block: every block of a Llama has the same shapes, so dynamo compiles the first
one and the others reuse its code (one compilation per distinct block, not per model), and the
graph stays small enough for the compile time to be seconds. Only ``forward`` is compiled, in
place, so parameter names, the module hooks that ZeRO-3 gathers and frees parameters in, and the
pipeline's chunks are unchanged, and it composes with whatever wraps the block from outside.

Order (``Trainer.__init__``): after the tensor-parallel plan replaced the linears and the pipeline
kept this rank's blocks, before recomputation wraps each block's (now compiled) forward in
``torch.utils.checkpoint`` and before the data-parallel strategy registers its hooks.

Collectives stay eager: tensor- and sequence-parallel communication (``plait.tensor_parallel.collectives``) is marked
``torch.compiler.disable`` (``plait.comm.eager``, switched on here), so each is a graph break and runs, is counted and is recorded exactly
as without ``--compile``; the compiled graphs are the math between them. The same holds for the
zero-bubble schedules' deferred weight products (``plait.pipeline.weight_grad``), whose backward
queues work for a later W.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from plait.comm import keep_collectives_eager


def compile_blocks(blocks: Iterable[nn.Module]) -> int:
    """Compile each block's ``forward`` in place; returns how many."""
    keep_collectives_eager()
    count = 0
    for block in blocks:
        block.forward = torch.compile(block.forward)
        count += 1
    return count
