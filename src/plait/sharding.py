"""How a rank's parameter relates to the full tensor of the same name: one typed description.

A model parameter on a rank is either the whole tensor or its tensor-parallel part: the full
tensor split along ``dim`` into ``count`` contiguous parts, of which this is part ``index``.
``TensorShard`` says which, and is the only record of it: layers write it when they shard,
and ZeRO, gradient clipping, checkpoints and the Hugging Face import read it. Cutting a full
tensor down to a rank's part is ``TensorShard.local`` (written once, here).

    full  [out, in]   dim 0, count t   ->  part i: rows    [i out/t, (i+1) out/t)  (column-parallel)
                      dim 1, count t   ->  part i: columns [i in/t,  (i+1) in/t)   (row-parallel)
                      dim None         ->  the whole tensor on every tp rank      (norms)

A dimension t does not divide (only a vocabulary: 32001 tokens at tp 2) splits as
``torch.tensor_split`` does, the first n mod t parts one longer (``split_bounds``); such a shard
also records the dimension's full length (``full_size``), which its part alone cannot tell.

For a replicated tensor ``index``/``count`` are the tp rank and size: elements that every tp
rank holds are counted (gradient norm) and written (checkpoints) by tp rank 0 alone, which is
``owns_elements``. ``partial_grad`` marks a replicated tensor whose gradient is a per-tp-rank
partial sum (norm weights under sequence parallelism): it is summed over tp after backward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorShard:
    dim: int | None = None
    index: int = 0
    count: int = 1
    partial_grad: bool = False
    full_size: int | None = None  # the split dimension's length, when count does not divide it

    @classmethod
    def split(cls, dim: int, index: int, count: int, size: int) -> "TensorShard":
        """Part ``index`` of ``count`` of a dimension of ``size`` (even or not)."""
        return cls(dim, index, count, full_size=size if size % count else None)

    @classmethod
    def replicated(cls, tp_rank: int = 0, tp_size: int = 1, partial_grad: bool = False) -> "TensorShard":
        return cls(None, tp_rank, tp_size, partial_grad)

    @property
    def is_split(self) -> bool:
        return self.dim is not None and self.count > 1

    @property
    def owns_elements(self) -> bool:
        """Does this rank count (and write) these elements? Split parts: always; replicas: tp rank 0."""
        return self.is_split or self.index == 0

    def local_shape(self, full_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(stop - start for start, stop in self.box(full_shape))

    def full_shape(self, local_shape: tuple[int, ...]) -> tuple[int, ...]:
        if not self.is_split:
            return tuple(local_shape)
        full = self.full_size if self.full_size is not None else local_shape[self.dim] * self.count
        return tuple(full if d == self.dim else size for d, size in enumerate(local_shape))

    def box(self, full_shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
        """Per dimension, the [start, stop) of this part in the full tensor."""
        return tuple(split_bounds(size, self.count, self.index) if self.is_split and d == self.dim
                     else (0, size) for d, size in enumerate(full_shape))

    def local(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of ``full`` (a view)."""
        if not self.is_split:
            return full
        start, stop = split_bounds(full.shape[self.dim], self.count, self.index)
        return full.narrow(self.dim, start, stop - start)


def padded_part(part: torch.Tensor, dim: int, size: int, count: int) -> torch.Tensor:
    """``part`` (of a dimension of ``size`` split into ``count``) zero-padded along ``dim`` to the
    longest part's length: what an all-gather, which needs equal parts, sends."""
    longest = -(-size // count)
    if part.shape[dim] == longest:
        return part
    padding = list(part.shape)
    padding[dim] = longest - part.shape[dim]
    return torch.cat([part, part.new_zeros(padding)], dim=dim)


def without_padding(gathered: torch.Tensor, dim: int, size: int, count: int) -> torch.Tensor:
    """The full tensor from an all-gather of ``padded_part``s: each part cut back to its length."""
    longest = -(-size // count)
    if longest * count == size:
        return gathered
    return torch.cat([gathered.narrow(dim, index * longest, stop - start)
                      for index, (start, stop) in enumerate(split_bounds(size, count, i) for i in range(count))],
                     dim=dim)


def split_bounds(size: int, count: int, index: int) -> tuple[int, int]:
    """[start, stop) of part ``index`` when ``size`` elements are cut into ``count`` contiguous
    parts, the first ``size % count`` of them one longer (``torch.tensor_split``'s rule)."""
    base, longer = divmod(size, count)
    start = index * base + min(index, longer)
    return start, start + base + (index < longer)


_ATTRIBUTE = "plait_shard"


def shard_of(param: torch.Tensor) -> TensorShard:
    """The tensor-parallel description of ``param`` (a whole, unsplit tensor when none was set)."""
    return param.__dict__.get(_ATTRIBUTE, _WHOLE)


def set_shard(param: torch.Tensor, shard: TensorShard) -> None:
    param.__dict__[_ATTRIBUTE] = shard


_WHOLE = TensorShard()


def swap_parameter_data(param: torch.nn.Parameter, data: torch.Tensor) -> None:
    """Make ``param`` (possibly on the meta device) hold ``data`` (possibly a view of a flat
    buffer), in place: the Python object, and so every module slot and tie that refers to it,
    stays the same. ``.data`` assignment (not a new tensor) keeps the parameter's autograd version
    counter its own, so refilling a flat buffer in place does not invalidate saved activations."""
    if param.device != data.device:  # meta -> a real device: swap in a real, empty tensor first
        shard = shard_of(param)
        empty = torch.nn.Parameter(torch.empty(0, dtype=data.dtype, device=data.device),
                                   requires_grad=param.requires_grad)
        torch.utils.swap_tensors(param, empty)
        set_shard(param, shard)
    param.data = data


def flat_slice(tensor: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Elements [lo, hi) of ``tensor``'s row-major flattening, copying only the rows that hold
    them (``tensor`` may be a strided view of a larger one: never flattened whole)."""
    if tensor.dim() == 0:
        return tensor.reshape(1)[lo:hi]
    row = tensor[0].numel() if tensor.shape[0] else 1
    first, last = lo // row, -(-hi // row)
    return tensor[first:last].reshape(-1)[lo - first * row:hi - first * row]
