"""Tensor-parallel layers (Megatron-LM), built from a full layer by keeping this rank's slice.

Notation: a linear layer computes Y = X A^T with A = weight [out, in]; t = tensor-parallel size.

* ColumnParallelLinear keeps the rows [r out/t, (r+1) out/t) of A, i.e. a slice of the output
  features. Input: the whole X (replicated, or all-gathered along the sequence under SP).
  Output: a slice of Y's features, optionally all-gathered.
* RowParallelLinear keeps the columns [r in/t, (r+1) in/t) of A. Input: the matching feature
  slice of X (a column-parallel layer's output). Output: a partial sum, reduced by g
  (all-reduce) or, under SP, reduce-scattered along the sequence; the bias is added once,
  after the reduction.
* VocabParallelEmbedding keeps rows [r V/t, (r+1) V/t) of the table; ids outside the slice
  look up zeros, and the partial rows are summed like a row-parallel output.

Every parameter keeps its name ("weight", "bias"), so checkpoints and plans see the same
names as the unsharded model, and records which part of the full tensor it is in its
``TensorShard`` (``plait.sharding``); replicated parameters whose gradient is a per-rank partial
sum (a row-parallel bias under SP) are marked ``partial_grad`` there.
"""
from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from plait.comm import Collectives, eager
from plait.pipeline.weight_grad import (DeferrableLinear, DeferredWeightGradients, RoutesWeightGradients, input_grad,
                                       save_linear, saved_linear, weight_and_bias_grads)
from plait.tensor_parallel.collectives import (copy_to_tp, gather_from_tp, gather_sequence, reduce_from_tp,
                                               reduce_scatter_sequence)
from plait.sharding import TensorShard, padded_part, set_shard, split_bounds, without_padding

class InputMode(str, Enum):
    """How an activation enters a column-parallel region (the value is the plan's spelling)."""
    COPY = "copy"                        # f: identity forward, all-reduce of the gradient
    GATHER_SEQUENCE = "gather_sequence"  # SP: all-gather along the sequence; reduce-scatter backward
    NONE = "none"                        # already entered (a PrepareInput on the parent did it once)

    def prepare(self, x: torch.Tensor, comm: Collectives) -> torch.Tensor:
        """Bring a replicated or sequence-sharded activation into the region."""
        if self is InputMode.COPY:
            return copy_to_tp(x, comm)
        if self is InputMode.GATHER_SEQUENCE:
            return gather_sequence(x, comm)
        return x


class OutputMode(str, Enum):
    """How row-parallel partial outputs are summed (the value is the plan's spelling)."""
    ALL_REDUCE = "all_reduce"                            # g
    REDUCE_SCATTER_SEQUENCE = "reduce_scatter_sequence"  # SP: each rank keeps its sequence shard

    def reduce(self, y: torch.Tensor, comm: Collectives) -> torch.Tensor:
        if self is OutputMode.REDUCE_SCATTER_SEQUENCE:
            return reduce_scatter_sequence(y, comm)
        return reduce_from_tp(y, comm)


def _linear(x: torch.Tensor, weight: nn.Parameter, bias: torch.Tensor | None,
            weight_gradients: DeferredWeightGradients | None) -> torch.Tensor:
    """F.linear, or its deferrable form under a split-backward pipeline schedule."""
    if weight_gradients is None:
        return F.linear(x, weight, bias)
    return _deferrable_linear(x, weight, bias, weight_gradients)


@eager
def _deferrable_linear(x, weight, bias, weight_gradients: DeferredWeightGradients) -> torch.Tensor:
    return DeferrableLinear.apply(x, weight, bias, weight_gradients)


@eager
def _copy_then_linear(x, weight, bias, comm: Collectives, weight_gradients: DeferredWeightGradients | None):
    return _CopyThenLinear.apply(x, weight, bias, comm, weight_gradients)


class _CopyThenLinear(torch.autograd.Function):
    """f followed by a column-parallel linear, fused so backward can overlap communication.

    forward:  Y = X W^T (+ b)               (X replicated; W this rank's rows)
    backward: dX = dY W, all-reduced over tp (f's transpose) -- launched asynchronously --
              while dW = dY^T X and db = sum dY are computed; then wait.
    Same math and traffic as f + F.linear; the all-reduce hides behind the weight-gradient
    matmul where the backend runs collectives concurrently (NCCL streams, gloo's threads).
    With ``weight_gradients`` deferring (a zero-bubble B), dW is queued for the W instead.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, comm: Collectives,
                weight_gradients: DeferredWeightGradients | None = None):
        ctx.comm = comm
        return save_linear(ctx, x, weight, bias, weight_gradients)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        saved = saved_linear(ctx)
        grad_x = input_grad(ctx, saved, grad_y)  # first: its all-reduce runs while dW (or its deferral) and db are made
        work = ctx.comm.all_reduce(grad_x, tag="tp_bwd", async_op=True)
        grad_w, grad_b = weight_and_bias_grads(ctx, saved, grad_y)
        if work is not None:
            work.wait()
        return grad_x, grad_w, grad_b, None, None


def _sharded_parameter(full: torch.Tensor, dim: int, comm: Collectives) -> nn.Parameter:
    """This rank's part of ``full`` along ``dim`` (a copy; on the meta device, no memory)."""
    shard = TensorShard.split(dim, comm.rank, comm.size, full.shape[dim])
    param = nn.Parameter(shard.local(full.detach()).clone())
    set_shard(param, shard)
    return param


class ColumnParallelLinear(nn.Module, RoutesWeightGradients):
    def __init__(self, linear: nn.Linear, comm: Collectives, input_mode: InputMode = InputMode.COPY,
                 gather_output: bool = False) -> None:
        super().__init__()
        self.comm = comm
        self.input_mode = InputMode(input_mode)
        self.gather_output = gather_output
        self.in_features = linear.in_features
        self.out_features = linear.out_features // comm.size  # local
        self.weight = _sharded_parameter(linear.weight, 0, comm)
        self.bias = _sharded_parameter(linear.bias, 0, comm) if linear.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_mode is InputMode.COPY and self.comm.size > 1 and torch.is_grad_enabled():
            y = _copy_then_linear(x, self.weight, self.bias, self.comm, self.weight_gradients)
        else:
            y = _linear(self.input_mode.prepare(x, self.comm), self.weight, self.bias, self.weight_gradients)
        return gather_from_tp(y, self.comm) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features} of {self.out_features * self.comm.size}, "
                f"input={self.input_mode.value}, gather_output={self.gather_output}")


class RowParallelLinear(nn.Module, RoutesWeightGradients):
    def __init__(self, linear: nn.Linear, comm: Collectives,
                 output_mode: OutputMode = OutputMode.ALL_REDUCE) -> None:
        super().__init__()
        self.comm = comm
        self.output_mode = OutputMode(output_mode)
        self.in_features = linear.in_features // comm.size  # local
        self.out_features = linear.out_features
        self.weight = _sharded_parameter(linear.weight, 1, comm)
        self.bias = None
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone())
            # under SP the bias is added on each rank's sequence shard: its gradient is partial
            set_shard(self.bias, TensorShard.replicated(comm.rank, comm.size,
                                                        partial_grad=self.output_mode is OutputMode.REDUCE_SCATTER_SEQUENCE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.output_mode.reduce(_linear(x, self.weight, None, self.weight_gradients), self.comm)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in={self.in_features} of {self.in_features * self.comm.size}, out={self.out_features}, "
                f"output={self.output_mode.value}")


class VocabParallelEmbedding(nn.Module):
    def __init__(self, embedding: nn.Embedding, comm: Collectives,
                 output_mode: OutputMode = OutputMode.ALL_REDUCE) -> None:
        super().__init__()
        self.comm = comm
        self.output_mode = OutputMode(output_mode)
        # this rank's rows: a vocabulary tp does not divide leaves the first ranks one row more
        self.vocab_start, stop = split_bounds(embedding.num_embeddings, comm.size, comm.rank)
        self.num_embeddings = stop - self.vocab_start  # local
        self.vocab_size = embedding.num_embeddings
        self.weight = _sharded_parameter(embedding.weight, 0, comm)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        rows = F.embedding(local.masked_fill(outside, 0), self.weight)
        rows = rows.masked_fill(outside.unsqueeze(-1), 0.0)
        return self.output_mode.reduce(rows, self.comm)

    def extra_repr(self) -> str:
        return f"rows {self.vocab_start}..{self.vocab_start + self.num_embeddings} of " \
               f"{self.vocab_size}, output={self.output_mode.value}"


class ParallelLMHead(ColumnParallelLinear):
    """The output layer, vocabulary split over tp.

    ``forward`` returns full-vocabulary logits (gathered) for evaluation and generation;
    training calls ``loss_sum``, which with ``loss_parallel`` never gathers the logits.
    """

    def __init__(self, linear: nn.Linear, comm: Collectives, input_mode: InputMode = InputMode.COPY,
                 loss_parallel: bool = True) -> None:
        super().__init__(linear, comm, input_mode=input_mode, gather_output=False)
        self.loss_parallel = loss_parallel
        self.vocab_size = linear.out_features
        # this rank's columns of the logits (uneven when tp does not divide the vocabulary)
        self.vocab_start, stop = split_bounds(self.vocab_size, comm.size, comm.rank)
        self.out_features = stop - self.vocab_start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits (evaluation, generation): this rank's columns, then every rank's."""
        return self.gather_vocabulary(super().forward(x))

    def gather_vocabulary(self, local_logits: torch.Tensor) -> torch.Tensor:
        """Every rank's logit columns in vocabulary order (an all-gather). Parts of a vocabulary tp
        does not divide are padded to the longest for the collective and cut back after it."""
        last, size, t = local_logits.dim() - 1, self.vocab_size, self.comm.size
        gathered = gather_from_tp(padded_part(local_logits, last, size, t), self.comm)
        return without_padding(gathered, last, size, t)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, vocabulary {self.vocab_start}..{self.vocab_start + self.out_features} "
                f"of {self.vocab_size}, input={self.input_mode.value}, loss_parallel={self.loss_parallel}")

    def loss_sum(self, hidden: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        from plait.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy_sum
        from plait.loss import IGNORE_INDEX

        if self.input_mode is InputMode.COPY and self.comm.size > 1:
            local_logits = _copy_then_linear(hidden, self.weight, self.bias, self.comm, None)
        else:
            local_logits = F.linear(self.input_mode.prepare(hidden, self.comm), self.weight, self.bias)
        if self.loss_parallel:
            return vocab_parallel_cross_entropy_sum(local_logits, targets, self.comm, self.vocab_start,
                                                    self.vocab_size, label_smoothing)
        logits = self.gather_vocabulary(local_logits).float()
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                               label_smoothing=label_smoothing, reduction="sum")
