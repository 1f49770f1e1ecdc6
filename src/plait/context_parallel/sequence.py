"""Which positions of a sequence a context-parallel rank holds, and cutting tensors to them.

Causal attention is triangular: with the sequence cut into ``cp`` contiguous slices the last rank
would do ``2 cp - 1`` times the work of the first. As Megatron-Core and torchtitan do, the
sequence of length S is cut into ``2 cp`` chunks of L = S / (2 cp) positions, and rank i holds
chunks i and 2 cp - 1 - i, in that order::

    cp = 2, S = 8:   chunks 0 1 2 3   ->   rank 0: positions 0 1 6 7    rank 1: positions 2 3 4 5

so every rank holds one early and one late chunk and does the same attention work. Its local
sequence is increasing, which ring attention relies on (see ``plait.context_parallel.ring``).

``context_positions`` is the one description of the layout; ``context_slice`` (token ids and
targets), the RoPE tables (``plait.context_parallel.plan``) and the all-to-all reordering
(``to_natural_order`` / ``from_natural_order``) all follow it.
"""
from __future__ import annotations

import torch


def context_positions(seq_len: int, cp_rank: int, cp: int) -> torch.Tensor:
    """The positions (int64) of a sequence of ``seq_len`` that cp rank ``cp_rank`` holds, in order."""
    if seq_len % (2 * cp):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2 x cp = {2 * cp}")
    chunk = seq_len // (2 * cp)
    early = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    late = torch.arange((2 * cp - 1 - cp_rank) * chunk, (2 * cp - cp_rank) * chunk)
    return torch.cat((early, late))


def context_slice(x: torch.Tensor, cp_rank: int, cp: int, dim: int = 1) -> torch.Tensor:
    """This rank's positions of ``x`` along ``dim`` (token ids and targets: [batch, seq])."""
    if cp == 1:
        return x
    return x.index_select(dim, context_positions(x.shape[dim], cp_rank, cp).to(x.device))


def to_natural_order(pieces: torch.Tensor) -> torch.Tensor:
    """[cp, b, h, S / cp, d], piece j being rank j's positions -> [b, h, S, d] in sequence order."""
    cp, b, h, local, d = pieces.shape
    halves = pieces.view(cp, b, h, 2, local // 2, d)
    chunks = torch.cat((halves[:, :, :, 0], halves[:, :, :, 1].flip(0)))  # chunks 0 .. 2cp-1
    return chunks.permute(1, 2, 0, 3, 4).reshape(b, h, cp * local, d)


def from_natural_order(x: torch.Tensor, cp: int) -> torch.Tensor:
    """The inverse of ``to_natural_order``: [b, h, S, d] -> [cp, b, h, S / cp, d] (contiguous)."""
    b, h, seq, d = x.shape
    chunks = x.view(b, h, 2 * cp, seq // (2 * cp), d).permute(2, 0, 1, 3, 4)
    pieces = torch.stack((chunks[:cp], chunks[cp:].flip(0)), dim=3)  # [cp, b, h, 2, L, d]
    return pieces.reshape(cp, b, h, seq // cp, d)
