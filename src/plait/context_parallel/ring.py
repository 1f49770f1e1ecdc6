"""Ring attention: each rank keeps its queries; keys and values travel around the cp ranks.

Rank i holds chunks i and 2c-1-i of the sequence (``plait.context_parallel.sequence``), so its
local positions increase, and its local queries Q = [Q_a; Q_b] (early chunk a = i, late chunk
b = 2c-1-i) see the key/value block of rank s, whose chunks are s and 2c-1-s, as follows:

    s = i       the local causal attention of the whole local sequence (the chunks are in order);
    s < i       chunk s precedes both a and b, chunk 2c-1-s follows both: all of Q against the
                first half of the block, no mask;
    s > i       both chunks of the block, s and 2c-1-s, lie between a and b: Q_a sees none of
                it, Q_b all of it, no mask.

Every step after the first is half a block of work on every rank: the causal load is balanced.

Forward, c steps: at step j rank i computes against the block of rank (i - j) mod c while it
sends that block to rank i + 1 and receives the next from rank i - 1 (double-buffered, so the
exchange overlaps the computation); the partial outputs are merged with the online softmax
(``plait.context_parallel.kernels``). Keys and values travel with the model's kv heads, one
message per step ([2, b, kv heads, S / c, d]), and the block kernels take them so (grouped-query
attention: the CPU flash kernel shares each kv head between its query heads, the others repeat
them for the local computation only).

Backward, c steps: the blocks travel the ring again (recomputed from nothing: the forward kept
only this rank's own q, k, v, O and lse), and with each block an fp32 accumulator of its dK/dV:
rank i adds its part for the block of rank s and passes the accumulator on, so after c steps it
arrives back at its owner. dQ stays local.

Traffic per attention and rank (each counted as a send on the cp group): forward c - 1 key/value
blocks (tag ``cp_kv``); backward c - 1 key/value blocks (``cp_kv``) and c dK/dV accumulators
(``cp_grad_kv``, fp32). A recomputed block (full or selective recomputation) runs the forward's
ring once more in its backward.
"""
from __future__ import annotations

import torch

from plait.comm import Collectives, eager
from plait.context_parallel.kernels import block_attention, block_attention_backward, merge_block

KV_TAG, GRAD_KV_TAG = 1, 2


def block_of(rank: int, source: int, local: int) -> tuple[slice, slice, bool]:
    """(query rows, key/value columns, causal) of the block of rank ``source`` on rank ``rank``."""
    half = local // 2
    if source == rank:
        return slice(None), slice(None), True
    if source < rank:
        return slice(None), slice(0, half), False
    return slice(half, None), slice(None), False


def ring_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 comm: Collectives) -> tuple[torch.Tensor, torch.Tensor]:
    c, rank = comm.size, comm.rank
    kv, incoming = torch.stack((k, v)), torch.empty((2, *k.shape), dtype=k.dtype, device=k.device)
    # laid out [b, s, heads, d], as SDPA's output: the o_proj input (transpose + reshape) is then a view
    # of it, not a copy kept beside it for backward
    batch, heads, local, dim = q.shape
    out = torch.zeros((batch, local, heads, dim), dtype=torch.float32, device=q.device).transpose(1, 2)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    for step in range(c):
        pending = comm.ring_exchange(kv, incoming, KV_TAG, "cp_kv") if step < c - 1 else None
        rows, cols, causal = block_of(rank, (rank - step) % c, q.shape[2])
        block_out, block_lse = block_attention(q[:, :, rows].contiguous(), kv[0][:, :, cols], kv[1][:, :, cols], causal)
        merge_block(out[:, :, rows], lse[:, :, rows], block_out, block_lse)
        if pending is not None:
            pending.wait()
            kv, incoming = incoming, kv
    return out.to(q.dtype), lse


def ring_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, comm: Collectives) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c, rank = comm.size, comm.rank
    kv, incoming = torch.stack((k, v)), torch.empty((2, *k.shape), dtype=k.dtype, device=k.device)
    grad_q = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    arriving, grad_pending = None, None
    for step in range(c):
        pending = comm.ring_exchange(kv, incoming, KV_TAG, "cp_kv") if step < c - 1 else None
        rows, cols, causal = block_of(rank, (rank - step) % c, q.shape[2])
        block_q, block_out = q[:, :, rows].contiguous(), out[:, :, rows]
        dq, dk, dv = block_attention_backward(grad_out[:, :, rows], block_q, kv[0][:, :, cols], kv[1][:, :, cols],
                                              block_out, lse[:, :, rows], causal)
        grad_q[:, :, rows] += dq
        grad_kv = torch.zeros(kv.shape, dtype=torch.float32, device=k.device)
        grad_kv[0][:, :, cols] = dk
        grad_kv[1][:, :, cols] = dv
        if grad_pending is not None:  # the accumulator of this block, from the ranks before us
            grad_pending.wait()
            grad_kv += arriving
        arriving = torch.empty_like(grad_kv)
        grad_pending = comm.ring_exchange(grad_kv, arriving, GRAD_KV_TAG, "cp_grad_kv")
        if pending is not None:
            pending.wait()
            kv, incoming = incoming, kv
    grad_pending.wait()  # our own block's accumulator, back from the last rank that used it
    return grad_q.to(q.dtype), arriving[0].to(k.dtype), arriving[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, comm: Collectives) -> torch.Tensor:
        out, lse = ring_forward(q, k, v, comm)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.comm = comm
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        return (*ring_backward(grad_out, q, k, v, out, lse, ctx.comm), None)


@eager
def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, comm: Collectives) -> torch.Tensor:
    """Causal attention of this rank's queries over the whole (cp-sharded) sequence:
    q [b, heads, S / c, d], k and v [b, kv heads, S / c, d] -> [b, heads, S / c, d]."""
    return _RingAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), comm)
