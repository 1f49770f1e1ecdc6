"""Sequence parallel without keeping gathered activations: save the shard, re-gather in backward.

Under sequence parallelism a column-parallel layer's input is all-gathered along the sequence
(``GatherSequence``), and autograd would keep that full [b, s, h] tensor until backward to
compute the weight gradient -- undoing the 1/t saving of SP for every linear input. As in
Megatron-LM (Korthikanti et al. 2022), this module keeps only the local [b, s/t, h] shard and
all-gathers it again when backward needs it: one more all-gather per region in backward, no
extra bytes kept.

Mechanism: inside ``keep_sequence_shards(comm)``, ``GatherSequence`` registers each gathered
tensor with the shard it came from; a ``saved_tensors_hooks`` pack hook recognises tensors
that live in a registered storage (q, k and v save views of the same one), and stores a
shared ``_Regather`` record instead. The first unpack in backward gathers the full tensor,
which is then shared by the other views that saved it and dropped after the last one.
Backward runs the same graph on every tp rank, so the re-gathers are issued in the same
order everywhere.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch

from plait.comm import Collectives
from plait.tensor_parallel.collectives import gather_dim


@dataclass
class _Regather:
    shard: torch.Tensor
    comm: Collectives
    pending: int = 0
    full: torch.Tensor | None = None

    def materialise(self) -> torch.Tensor:
        if self.full is None:
            self.full = gather_dim(self.shard, self.comm, 1, "sp_regather")
        return self.full


@dataclass
class _SavedView:
    record: _Regather
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


class SequenceShardRegistry:
    def __init__(self, comm: Collectives) -> None:
        self.comm = comm
        self._entries: dict[int, tuple[weakref.ref, _Regather]] = {}

    def register(self, full: torch.Tensor, shard: torch.Tensor) -> None:
        storage = full.untyped_storage()
        self._entries[storage.data_ptr()] = (weakref.ref(full), _Regather(shard.detach(), self.comm))

    def pack(self, tensor: torch.Tensor):
        entry = self._entries.get(tensor.untyped_storage().data_ptr()) if tensor.device.type != "meta" else None
        if entry is None:
            return tensor
        full_ref, record = entry
        full = full_ref()
        # A stale entry (the gathered tensor is gone and its memory reused) must not match.
        if full is None or full.untyped_storage().nbytes() != tensor.untyped_storage().nbytes():
            return tensor
        record.pending += 1
        return _SavedView(record, tensor.size(), tensor.stride(), tensor.storage_offset())

    @staticmethod
    def unpack(saved):
        if not isinstance(saved, _SavedView):
            return saved
        record = saved.record
        full = record.materialise()
        record.pending -= 1
        if record.pending == 0:
            record.full = None  # the last view that needed it: free the gathered copy
        return full.as_strided(saved.size, saved.stride, saved.offset)


@contextlib.contextmanager
def keep_sequence_shards(comm: Collectives):
    """Within this context, sequence-gathered activations are saved as shards (see module doc)."""
    if comm.size == 1:
        yield
        return
    registry = SequenceShardRegistry(comm)
    comm.sequence_shards = registry
    try:
        with torch.autograd.graph.saved_tensors_hooks(registry.pack, registry.unpack):
            yield
    finally:
        comm.sequence_shards = None
