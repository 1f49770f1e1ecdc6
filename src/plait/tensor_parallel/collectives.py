"""Autograd-aware collectives of tensor and sequence parallelism: Megatron's f and g and the
sequence-parallel pair. Each is a ``torch.autograd.Function`` whose backward is its forward's
transpose, the forward of one being the backward of its partner:

==========================  ===========================================  ==============================
function                    forward                                      backward
==========================  ===========================================  ==============================
``copy_to_tp`` (f)          identity                                     all-reduce
``reduce_from_tp`` (g)      all-reduce                                   identity
``gather_from_tp``          all-gather along the last dim                this rank's slice
``gather_sequence``         all-gather along the sequence                reduce-scatter along it
``reduce_scatter_sequence`` reduce-scatter along the sequence            all-gather along it
==========================  ===========================================  ==============================

``comm`` is the tensor-parallel ``plait.comm.Collectives`` (which counts and records each
collective); with ``comm.size == 1`` all are the identity. Each is ``plait.comm.eager``: under
``--compile`` a graph break that runs as written.
"""
from __future__ import annotations

import torch

from plait.comm import Collectives, eager


def _split_last_dim(x: torch.Tensor, comm: Collectives) -> torch.Tensor:
    size = x.shape[-1] // comm.size
    return x[..., comm.rank * size:(comm.rank + 1) * size].contiguous()


def gather_dim(x: torch.Tensor, comm: Collectives, dim: int, tag: str) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (all-gather); the result is contiguous."""
    x = x.movedim(dim, 0).contiguous()
    out = torch.empty((comm.size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    comm.all_gather(out, x, tag=tag)
    return out.movedim(0, dim).contiguous()


def _reduce_scatter_dim(x: torch.Tensor, comm: Collectives, dim: int, tag: str) -> torch.Tensor:
    """Sum ``x`` over ranks and keep this rank's 1/n slice along ``dim`` (reduce-scatter)."""
    x = x.movedim(dim, 0).contiguous()
    out = torch.empty((x.shape[0] // comm.size, *x.shape[1:]), dtype=x.dtype, device=x.device)
    comm.reduce_scatter(out, x, tag=tag)
    return out.movedim(0, dim)


class CopyToTensorParallel(torch.autograd.Function):
    """f: forward identity; backward all-reduce (SUM) of the input gradient.

    Placed where a replicated activation enters column-parallel layers: each rank's layers
    see the whole X, but contribute only their columns' part of dL/dX, which must be summed.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Collectives) -> torch.Tensor:
        ctx.comm = comm
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        ctx.comm.all_reduce(grad, tag="tp_bwd")
        return grad, None


class ReduceFromTensorParallel(torch.autograd.Function):
    """g: forward all-reduce (SUM) of partial outputs; backward identity.

    Placed after a row-parallel layer: Y = sum_r X_r A_r over the ranks' rows of A.

    The sum goes into a new tensor, never into ``x``: ``x`` is a matmul output, which selective
    recomputation keeps and hands back when the block is recomputed; summed in place, the
    recomputed block would sum it a second time (tp x the output; found by the randomized layout
    tests).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Collectives) -> torch.Tensor:
        out = x.clone(memory_format=torch.contiguous_format)
        comm.all_reduce(out, tag="tp_fwd")
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class GatherFromTensorParallel(torch.autograd.Function):
    """Forward all-gather along the last dim (e.g. vocabulary-sharded logits); backward keeps
    this rank's slice of the gradient (no communication)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Collectives) -> torch.Tensor:
        ctx.comm = comm
        return gather_dim(x, comm, x.dim() - 1, "tp_fwd")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _split_last_dim(grad, ctx.comm), None


class GatherSequence(torch.autograd.Function):
    """Sequence parallel, entering a tensor-parallel region: forward all-gather along the
    sequence (dim 1 of [batch, seq, hidden]); backward reduce-scatter along the sequence.

    It replaces f: the reduce-scatter both sums the ranks' partial input gradients (f's job)
    and hands each rank the slice of its own sequence shard.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Collectives) -> torch.Tensor:
        ctx.comm = comm
        full = gather_dim(x, comm, 1, "sp_fwd")
        if comm.sequence_shards is not None:  # layers saving `full` will keep `x` and re-gather it
            comm.sequence_shards.register(full, x)
        return full

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _reduce_scatter_dim(grad, ctx.comm, 1, "sp_bwd"), None


class ReduceScatterSequence(torch.autograd.Function):
    """Sequence parallel, leaving a tensor-parallel region: forward reduce-scatter along the
    sequence (sums row-parallel partial outputs, keeps this rank's shard); backward all-gather.

    It replaces g, with the same traffic as g's all-reduce (an all-reduce is a reduce-scatter
    followed by an all-gather).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Collectives) -> torch.Tensor:
        ctx.comm = comm
        return _reduce_scatter_dim(x, comm, 1, "sp_fwd")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return gather_dim(grad, ctx.comm, 1, "sp_bwd"), None


@eager
def copy_to_tp(x: torch.Tensor, comm: Collectives) -> torch.Tensor:
    return x if comm.size == 1 else CopyToTensorParallel.apply(x, comm)


@eager
def reduce_from_tp(x: torch.Tensor, comm: Collectives) -> torch.Tensor:
    return x if comm.size == 1 else ReduceFromTensorParallel.apply(x, comm)


@eager
def gather_from_tp(x: torch.Tensor, comm: Collectives) -> torch.Tensor:
    return x if comm.size == 1 else GatherFromTensorParallel.apply(x, comm)


@eager
def gather_sequence(x: torch.Tensor, comm: Collectives) -> torch.Tensor:
    return x if comm.size == 1 else GatherSequence.apply(x, comm)


@eager
def reduce_scatter_sequence(x: torch.Tensor, comm: Collectives) -> torch.Tensor:
    return x if comm.size == 1 else ReduceScatterSequence.apply(x, comm)
