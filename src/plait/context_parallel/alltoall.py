"""All-to-all context parallelism (DeepSpeed-Ulysses): trade the sequence shard for a head shard.

Around attention each rank gives up its sequence shard of every head for the whole sequence of
1/c of the heads: q [b, H, S / c, d] -> [b, H / c, S, d] by one all-to-all (and k, v alike),
plain causal attention on those heads, and the output back to [b, H, S / c, d] by a fourth. The
all-to-all of a tensor is its own transpose's inverse, so the backward is the same four
exchanges in reverse: eight all-to-alls per attention and step (tag ``cp_a2a``), each sending
(c - 1)/c of the tensor.

The pieces arrive in rank order, each rank's being its two load-balanced chunks; they are put
into sequence order before attention and back after (``plait.context_parallel.sequence``).

Heads: the query heads (per tensor-parallel rank) must divide by c. Key/value heads that c
divides are split like the queries; fewer kv heads than c (c a multiple of them) are repeated
c / kv times before the exchange, so that rank j receives the one kv head its query heads use
(its query heads all belong to one kv group): the exchange then carries the repeated heads.
"""
from __future__ import annotations

import torch

from plait.comm import Collectives, eager
from plait.context_parallel.sequence import from_natural_order, to_natural_order
from plait.layout import alltoall_kv_repeats
from plait.models.llama import causal_attention


def _sequence_to_heads(x: torch.Tensor, comm: Collectives) -> torch.Tensor:
    c = comm.size
    b, h, local, d = x.shape
    outgoing = x.view(b, c, h // c, local, d).transpose(0, 1).contiguous()  # piece j: rank j's heads
    incoming = torch.empty_like(outgoing)
    comm.all_to_all(incoming, outgoing, tag="cp_a2a")
    return to_natural_order(incoming)


def _heads_to_sequence(x: torch.Tensor, comm: Collectives) -> torch.Tensor:
    c = comm.size
    outgoing = from_natural_order(x, c)  # piece j: rank j's positions of our heads
    incoming = torch.empty_like(outgoing)
    comm.all_to_all(incoming, outgoing, tag="cp_a2a")
    cp, b, h, local, d = incoming.shape
    # laid out [b, s, heads, d], as SDPA's output, so that the o_proj input is a view of it
    return incoming.permute(1, 3, 0, 2, 4).reshape(b, local, cp * h, d).transpose(1, 2)


class _SequenceToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Collectives) -> torch.Tensor:
        ctx.comm = comm
        return _sequence_to_heads(x, comm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _heads_to_sequence(grad.contiguous(), ctx.comm), None


class _HeadsToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Collectives) -> torch.Tensor:
        ctx.comm = comm
        return _heads_to_sequence(x.contiguous(), comm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _sequence_to_heads(grad.contiguous(), ctx.comm), None


@eager
def alltoall_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, comm: Collectives) -> torch.Tensor:
    """Causal attention of the whole (cp-sharded) sequence on 1/c of the heads:
    q [b, heads, S / c, d], k and v [b, kv heads, S / c, d] -> [b, heads, S / c, d]."""
    repeats = alltoall_kv_repeats(k.shape[1], comm.size)
    if repeats > 1:
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
    q, k, v = (_SequenceToHeads.apply(t.contiguous(), comm) for t in (q, k, v))
    out = causal_attention(q, k, v)
    return _HeadsToSequence.apply(out, comm)
