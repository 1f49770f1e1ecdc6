"""A trainer's state as layout-free *pieces*.

Whatever the layout, every number of the training state belongs to one parameter of the
unsharded model (names as in Hugging Face) and one kind: ``param`` (fp32 master value),
``exp_avg`` or ``exp_avg_sq`` (AdamW moments). A rank holds, for a parameter, its tensor-parallel
part (the *local* tensor: split along ``tp_dim`` into ``tp_count`` parts, part ``tp_index``), and
of that local tensor either all of it or, under ZeRO, a flat range [start, end) of its
flattening. A piece records exactly that, so pieces from any layout rebuild the full tensors
(``assemble``, for export) and any other layout reads just its own ranges from them
(``plait.checkpoint.sources.CheckpointSource``).

The data-parallel strategy says which pieces a rank writes (``state_pieces``); each number is
written once: plain data parallel writes from dp rank 0 only, tensor-parallel replicated
parameters (norm weights) from tp rank 0 only, a weight tied across pipeline stages from the
first stage only; ZeRO's dp ranks write disjoint ranges; pipeline stages hold disjoint parameters.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from plait.sharding import TensorShard

KINDS = ("param", "exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class Piece:
    name: str
    kind: str
    local_shape: tuple[int, ...]
    tp_dim: int | None
    tp_index: int
    tp_count: int
    start: int  # flat range within the local tensor
    end: int
    tp_full: int | None = None  # the split dimension's full length when tp_count does not divide it

    @classmethod
    def of(cls, name: str, kind: str, shard: TensorShard, local_shape: tuple[int, ...], start: int,
           end: int) -> "Piece":
        """A piece of a rank's part ``shard``; replicated tensors are recorded as one whole part."""
        if shard.is_split:
            return cls(name, kind, tuple(local_shape), shard.dim, shard.index, shard.count, start, end,
                       shard.full_size)
        return cls(name, kind, tuple(local_shape), None, 0, 1, start, end)

    @property
    def shard(self) -> TensorShard:
        return TensorShard(self.tp_dim, self.tp_index, self.tp_count, full_size=self.tp_full)

    @property
    def full_shape(self) -> tuple[int, ...]:
        return self.shard.full_shape(self.local_shape)

    @property
    def key(self) -> str:
        return f"{self.name}|{self.kind}|{self.tp_index}|{self.start}"

    def to_json(self) -> dict:
        record = asdict(self)
        if record["tp_full"] is None:  # even parts: the record checkpoints had before uneven ones existed
            del record["tp_full"]
        return record

    @classmethod
    def from_json(cls, data: dict) -> "Piece":
        return cls(**{**data, "local_shape": tuple(data["local_shape"])})


def assemble(pieces: list[tuple[Piece, torch.Tensor]]) -> dict[tuple[str, str], torch.Tensor]:
    """Full (unsharded) tensors from pieces of any layout: {(name, kind): tensor}."""
    locals_: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    layout: dict[tuple[str, str], Piece] = {}
    for piece, data in pieces:
        key = (piece.name, piece.kind)
        layout[key] = piece
        parts = locals_.setdefault(key, {})
        local = parts.setdefault(piece.tp_index, torch.zeros(piece.local_shape, dtype=torch.float32))
        local.view(-1)[piece.start:piece.end] = data
    full = {}
    for key, parts in locals_.items():
        piece = layout[key]
        if piece.tp_dim is None:
            full[key] = parts[0]
        else:
            missing = set(range(piece.tp_count)) - set(parts)
            if missing:
                raise ValueError(f"checkpoint lacks tensor-parallel parts {sorted(missing)} of {key[0]}")
            full[key] = torch.cat([parts[i] for i in range(piece.tp_count)], dim=piece.tp_dim)
    return full
