"""Where a rank's parameter values come from, read piece by piece, never the whole model.

Each source answers ``read(name, shard, full_shape, kind, flat_range)``: the fp32 values of this
rank's tensor-parallel part ``shard`` of the full tensor ``name``, flattened, and with
``flat_range`` only [lo, hi) of that (a ZeRO shard). A rank's strategy asks for exactly what it
keeps, one parameter at a time, and copies the answer into place before the next question:

- ``InitSource``: plait's layout-invariant initialisation. The full tensor is generated from
  its (seed, name) generator and cut to the part: at most one full parameter exists at a time.
- ``HFSource``: a Hugging Face directory; safetensors reads only the rows and columns asked for.
- ``CheckpointSource``: a plait checkpoint written under any layout. Its pieces are flat ranges
  of tensor-parallel parts; the ranges that overlap what is asked for are read and copied into
  place (no full tensor is assembled). Same tensor-parallel layout: the mapping is one shift of
  the flat index. Otherwise (a row-parallel weight read at another tp size) row by row.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from plait.checkpoint.pieces import Piece
from plait.checkpoint.errors import CheckpointError
from plait.models import LlamaConfig, initial_value
from plait.sharding import TensorShard, flat_slice


class InitSource:
    """Fresh layout-invariant values: ``initial_value(name, ...)`` cut to the part."""

    def __init__(self, config: LlamaConfig, seed: int) -> None:
        self.config, self.seed = config, seed

    def has(self, kind: str) -> bool:
        return kind == "param"

    def read(self, name: str, shard: TensorShard, full_shape: tuple[int, ...], kind: str = "param",
             flat_range: tuple[int, int] | None = None) -> torch.Tensor:
        if kind != "param":
            raise CheckpointError(f"a fresh initialisation has no {kind} for {name}")
        local = shard.local(initial_value(name, full_shape, self.config, self.seed))
        lo, hi = flat_range or (0, local.numel())
        return flat_slice(local, lo, hi)  # may view the full tensor: callers copy it and let go


def weight_files(path: Path) -> dict[str, Path]:
    """parameter name -> the safetensors file holding it (sharded checkpoints via their index)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        mapping = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in mapping.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{path} has no model.safetensors or model.safetensors.index.json")
    with safe_open(str(single), framework="pt") as handle:
        return {name: single for name in handle.keys()}


class HFSource:
    """A Hugging Face directory (single or sharded safetensors)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.files = weight_files(self.path)
        self.handles: dict[Path, object] = {}

    def has(self, kind: str) -> bool:
        return kind == "param"

    def read(self, name: str, shard: TensorShard, full_shape: tuple[int, ...], kind: str = "param",
             flat_range: tuple[int, int] | None = None) -> torch.Tensor:
        if kind != "param":
            raise CheckpointError(f"{self.path} holds weights only, no {kind}")
        if name not in self.files:
            raise CheckpointError(f"{self.path} has no weight {name}")
        file = self.files[name]
        if file not in self.handles:
            self.handles[file] = safe_open(str(file), framework="pt")
        part = self.handles[file].get_slice(name)
        if tuple(part.get_shape()) != tuple(full_shape):
            raise CheckpointError(f"{self.path}: {name} has shape {tuple(part.get_shape())}, the model "
                                  f"{tuple(full_shape)}")
        box = list(shard.box(full_shape))
        local_shape = shard.local_shape(full_shape)
        numel = math.prod(local_shape)
        lo, hi = flat_range or (0, numel)
        first = 0
        if box and lo < hi:  # only the local rows that hold [lo, hi)
            row = numel // local_shape[0] if local_shape[0] else 1
            first, last = lo // row, -(-hi // row)
            box[0] = (box[0][0] + first, box[0][0] + last)
            lo, hi = lo - first * row, hi - first * row
        values = part[tuple(slice(start, stop) for start, stop in box)] if box else part[:]
        return values.reshape(-1)[lo:hi].to(torch.float32)

    def close(self) -> None:
        self.handles.clear()


def _as_rows(shape: tuple[int, ...], box: tuple[tuple[int, int], ...]) -> tuple[int, int, int, int, int]:
    """A tensor as [rows, columns] (row = dim 0, columns = the rest): (r0, r1, c0, c1, full columns)
    of a box that splits dim 0 or, for a matrix, dim 1."""
    if not shape:
        return 0, 1, 0, 1, 1
    columns = math.prod(shape[1:])
    r0, r1 = box[0]
    if len(shape) == 1:
        return r0, r1, 0, 1, 1
    if len(shape) > 2 and box[1:] != tuple((0, size) for size in shape[1:]):
        raise CheckpointError(f"a tensor of shape {shape} split beyond dim 1 cannot be read")
    c0, c1 = box[1] if len(shape) == 2 else (0, columns)
    return r0, r1, c0, c1, columns


class CheckpointSource:
    """A plait checkpoint directory, read range by range (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.index: dict[tuple[str, str], list[tuple[Piece, Path]]] = {}
        for index_file in sorted(self.path.glob("rank-*.json")):
            try:
                entries = json.loads(index_file.read_text())
            except (OSError, json.JSONDecodeError) as error:
                raise CheckpointError(f"{index_file} cannot be read: {error}") from None
            for entry in entries:
                piece = Piece.from_json(entry)
                self.index.setdefault((piece.name, piece.kind), []).append(
                    (piece, index_file.with_suffix(".safetensors")))
        self.handles: dict[Path, object] = {}

    def has(self, kind: str) -> bool:
        return any(k == kind for _, k in self.index)

    def _tensor(self, piece: Piece, file: Path):
        if file not in self.handles:
            self.handles[file] = safe_open(str(file), framework="pt")
        return self.handles[file].get_slice(piece.key)

    def read(self, name: str, shard: TensorShard, full_shape: tuple[int, ...], kind: str = "param",
             flat_range: tuple[int, int] | None = None) -> torch.Tensor:
        entries = self.index.get((name, kind))
        if not entries:
            raise CheckpointError(f"checkpoint {self.path} has no {kind} of parameter {name}")
        saved = entries[0][0].full_shape
        if tuple(saved) != tuple(full_shape):
            raise CheckpointError(f"checkpoint tensor {name} has shape {tuple(saved)}, the model {tuple(full_shape)}")
        full_shape = tuple(full_shape)
        local_shape = shard.local_shape(full_shape)
        lo, hi = flat_range or (0, math.prod(local_shape))
        out = torch.empty(hi - lo, dtype=torch.float32)
        tr0, _, tc0, tc1, _ = _as_rows(full_shape, shard.box(full_shape))
        width = tc1 - tc0
        copied = 0
        for piece, file in entries:
            sr0, sr1, sc0, sc1, _ = _as_rows(full_shape, piece.shard.box(full_shape))
            source_width = sc1 - sc0
            if (sc0, sc1) == (tc0, tc1):
                # same columns: target flat t is source flat t + (tr0 - sr0) * width
                shift = (tr0 - sr0) * width
                a, b = max(lo, piece.start - shift), min(hi, piece.end - shift)
                if a < b:
                    out[a - lo:b - lo] = self._tensor(piece, file)[a + shift - piece.start:b + shift - piece.start]
                    copied += b - a
                continue
            # other columns (a row-parallel weight at another tp size): row by row
            data = None
            first_row, last_row = lo // width, -(-hi // width)
            for row in range(max(first_row, sr0 - tr0), min(last_row, sr1 - tr0)):
                a, b = max(lo, row * width), min(hi, (row + 1) * width)      # target flat range of this row
                ca, cb = tc0 + a - row * width, tc0 + b - row * width         # its full columns
                ca, cb = max(ca, sc0), min(cb, sc1)
                if ca >= cb:
                    continue
                start = (tr0 + row - sr0) * source_width + (ca - sc0)         # source local flat
                s_a, s_b = max(start, piece.start), min(start + cb - ca, piece.end)
                if s_a >= s_b:
                    continue
                if data is None:
                    data = self._tensor(piece, file)
                t_a = row * width + (ca - tc0) + (s_a - start)
                out[t_a - lo:t_a - lo + s_b - s_a] = data[s_a - piece.start:s_b - piece.start]
                copied += s_b - s_a
        if copied != hi - lo:
            raise CheckpointError(f"checkpoint {self.path} lacks part of {kind} of {name} "
                                  f"({copied} of {hi - lo} values found)")
        return out

    def close(self) -> None:
        self.handles.clear()
