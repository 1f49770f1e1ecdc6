"""Optimizer, learning-rate schedule and global-norm gradient clipping."""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from plait.comm import Collectives


def build_adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                eps: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains and other vectors are not decayed)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel over all tensors, ~6x faster than foreach on this CPU (and the CUDA path)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)


def learning_rate(step: int, base_lr: float, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup over ``warmup_steps`` (step 0 already > 0), then cosine to ``base_lr * min_lr_ratio``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float, tp_comm: Collectives | None = None,
                   pp_comm: Collectives | None = None) -> float:
    """Clip gradients to their global L2 norm; returns the norm before clipping.

    Each gradient element of the model must be counted exactly once. Tensor-parallel shards
    (``_plait_shard_dim``) hold different elements on each tp rank: their squares are summed over
    tp. Parameters replicated over tp (norm weights) hold the same gradient on every tp rank:
    only tp rank 0 counts them. Data-parallel replicas are identical after the all-reduce and
    need no reduction. Pipeline stages hold different parameters: summed over pp.
    ``max_norm <= 0`` only measures.
    """
    grads, sharded, replicated = [], [], []
    for param in params:
        if param.grad is None:
            continue
        grads.append(param.grad)
        (sharded if hasattr(param, "_plait_shard_dim") else replicated).append(param.grad)
    if not grads:
        return 0.0

    def sum_of_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
        if not tensors:
            return torch.zeros((), dtype=torch.float64, device=grads[0].device)
        return torch.stack([torch.linalg.vector_norm(t, dtype=torch.float32).double().square()
                            for t in tensors]).sum()

    squares = sum_of_squares(sharded)
    if tp_comm is None or tp_comm.rank == 0:
        squares = squares + sum_of_squares(replicated)
    for comm in (tp_comm, pp_comm):
        if comm is not None and comm.size > 1:
            comm.all_reduce(squares, tag="grad_norm")
    total_norm = squares.sqrt()
    if max_norm > 0:
        scale = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, scale.to(grads[0].dtype))
    return float(total_norm)
