"""Activation recomputation of decoder blocks: full or selective (Korthikanti et al. 2022).

Per layer and micro-batch a block keeps, for backward, about s b h (34 + 5 a s / h) bytes in
half precision (Korthikanti's count; /t with tensor + sequence parallel). Two ways to trade
compute for it:

- ``full``: keep only the block's input (2 s b h bytes); backward reruns the whole block's
  forward first (+1 forward per layer: 33% more FLOPs of the blocks).
- ``selective``: keep the outputs of the matmuls (q, k, v, the attention output projection,
  gate, up and down) and recompute everything between them: the attention core, the norms,
  RoPE and the elementwise SwiGLU. The FLOPs recomputed are the attention core's
  (4 s^2 h per layer forward, about s / 6h of the layer's) and a few elementwise passes;
  the bytes kept are those of the matmul outputs, not of the norm and elementwise tensors.

Both wrap the block's ``forward`` in ``torch.utils.checkpoint`` (non-reentrant), in place, so
parameter names and module hooks (ZeRO-3's gather and free around each block) are unchanged:
the recomputation runs inside the block's backward, after its parameters were gathered for it.
Selective uses PyTorch's selective checkpoint policy: matmul results must be saved, every other
operation is recomputed.
"""
from __future__ import annotations

import functools
from typing import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from plait.layout import Recompute

_SAVED_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
              torch.ops.aten.baddbmm.default}


def _keep_matmul_outputs(_ctx, op, *_args, **_kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_context():
    return create_selective_checkpoint_contexts(_keep_matmul_outputs)


def apply_recomputation(blocks: Iterable[nn.Module], mode: Recompute) -> None:
    """Recompute each block's activations in its backward (``mode`` full or selective)."""
    if mode is Recompute.NONE:
        return
    options = {"use_reentrant": False}
    if mode is Recompute.SELECTIVE:
        options["context_fn"] = selective_context
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, **options)
