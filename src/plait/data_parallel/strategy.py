"""The one interface the trainer and checkpoints have to data parallelism.

A strategy owns the rank's copy of the training state that data parallelism decides about
(gradients and how they are reduced, the optimizer and its moments, and under ZeRO-3 the
parameters at rest) and nothing else. Two implement it: ``Replicated`` (every dp rank holds
the whole state; bucketed all-reduce) and ``Sharded`` (ZeRO-1/2/3). The trainer calls, per step:

    communicate_in_backward(flag)   before each micro-batch's backward (a hint; ZeRO ignores it)
    finish()                        after the last backward: gradients complete on this rank
    clip_grad_norm(max_norm)        the global norm over every element, each counted once
    step(lr); zero_grad()

and checkpoints call ``state_pieces()`` / ``load_state(source, step)``. ``load_parameters(source)``
fills the parameters, which may still be on the meta device: each rank materialises only its
pieces, reading them from ``source`` (layout-invariant initialisation, a Hugging Face
directory or a checkpoint; ``plait.checkpoint.sources``).

What every strategy must also do, and is shared here:
- sequence-parallel partial gradients (``TensorShard.partial_grad``) are summed over tp;
- a weight tied across pipeline stages (the embedding of the first, the head of the last) has
  its gradient summed between the two stages (``TiedWeights``), as Megatron-LM does, and is
  counted and written by the first stage only.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from plait.comm import Collectives
from plait.sharding import TensorShard, shard_of

if TYPE_CHECKING:
    from plait.checkpoint.pieces import Piece

class ParameterSource(Protocol):
    """Where parameter values (and, for checkpoints, AdamW moments) come from."""

    def read(self, name: str, shard: TensorShard, full_shape: tuple[int, ...], kind: str = "param",
             flat_range: tuple[int, int] | None = None) -> torch.Tensor:
        """fp32 values of this rank's part (``shard``) of the full tensor ``name``, flattened;
        with ``flat_range`` only [lo, hi) of that part's flattening."""

    def has(self, kind: str) -> bool:
        """Does the source hold tensors of ``kind`` (checkpoints of step > 0 hold moments)?"""


@dataclass
class TiedWeights:
    """One weight held by two pipeline stages (the first's embedding, the last's head)."""

    param: nn.Parameter
    pp: Collectives
    peer: int            # the other stage's pp rank
    owner: bool          # the first stage counts and writes it

    def sum_between_stages(self, tensor: torch.Tensor) -> None:
        """tensor <- tensor + the peer's tensor (the same bits on both stages: a + b = b + a)."""
        received = torch.empty_like(tensor)
        self.pp.exchange(tensor.contiguous(), received, self.peer, tag=_TIED_TAG, what="tied_grads")
        tensor.add_(received)


_TIED_TAG = 1 << 30  # above every pipeline boundary tag


@dataclass(frozen=True)
class ParameterInfo:
    """A parameter of this rank: its name in the full model, its tensor-parallel part, its full shape."""

    name: str
    param: nn.Parameter
    shard: TensorShard
    full_shape: tuple[int, ...]
    counted: bool        # counted in the gradient norm and written to checkpoints by this rank


def reduce_squares(squares: torch.Tensor, *comms: Collectives | None) -> torch.Tensor:
    """Sum a rank's partial sum of squares over every group that holds other elements."""
    for comm in comms:
        if comm is not None and comm.size > 1:
            comm.all_reduce(squares, tag="grad_norm")
    return squares


class DataParallelStrategy(ABC):
    """See the module docstring."""

    model: nn.Module

    def communicate_in_backward(self, enabled: bool) -> None:
        """Whether the coming backward may launch gradient communication (else it waits for
        ``finish``). Replicated uses it to reduce once per step; ZeRO to start hybrid sharding's
        all-reduce of each complete shard during the last backward."""

    @abstractmethod
    def load_parameters(self, source: ParameterSource) -> None: ...

    @abstractmethod
    def finish(self) -> None: ...

    @abstractmethod
    def clip_grad_norm(self, max_norm: float) -> float: ...

    @abstractmethod
    def step(self, lr: float) -> None: ...

    @abstractmethod
    def zero_grad(self) -> None: ...

    def materialize(self) -> None:
        """Make every parameter of the model readable (ZeRO-3 gathers; others hold them)."""

    @abstractmethod
    def state_pieces(self) -> list[tuple["Piece", torch.Tensor]]: ...

    @abstractmethod
    def load_state(self, source: ParameterSource, step: int) -> None: ...

    @abstractmethod
    def state_bytes(self) -> dict[str, int]: ...


def describe_parameters(named: list[tuple[str, nn.Parameter]], tied: TiedWeights | None) -> list[ParameterInfo]:
    infos = []
    for name, param in named:
        shard = shard_of(param)
        counted = shard.owns_elements and (tied is None or param is not tied.param or tied.owner)
        infos.append(ParameterInfo(name, param, shard, shard.full_shape(tuple(param.shape)), counted))
    return infos


def clip_scale(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)
