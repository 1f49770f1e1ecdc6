"""Optimizer, learning-rate schedule and global-norm gradient clipping."""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn


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


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float,
                   reduce_squares: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """Clip gradients to a global L2 norm; returns the norm before clipping.

    ``reduce_squares`` sums the local sum of squares over the ranks that hold *different*
    pieces of the gradients (tensor or pipeline shards, ZeRO shards). Replicated gradients
    (plain data parallel) are identical on every rank and need no reduction: each element is
    counted once. ``max_norm <= 0`` only measures.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    squares = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32).square() for g in grads]).sum()
    if reduce_squares is not None:
        squares = reduce_squares(squares)
    total_norm = squares.sqrt()
    if max_norm > 0:
        scale = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, scale.to(grads[0].dtype))
    return float(total_norm)
