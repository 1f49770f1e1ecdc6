"""Reading a rank's part of a checkpoint written under another layout: exactly the values of that
part, and no more than them read (no full tensor assembled). No processes."""
from __future__ import annotations

import itertools
import json

import pytest
import torch
from safetensors.torch import save_file

from plait.checkpoint import CheckpointError, Piece
from plait.checkpoint.sources import CheckpointSource
from plait.sharding import TensorShard

FULL = torch.arange(12 * 8, dtype=torch.float32).reshape(12, 8) / 7.0
BIAS = torch.arange(12, dtype=torch.float32) * 0.5


def layouts(shape):
    """(tp dim or None, tp count) a tensor of ``shape`` can be written under."""
    yield None, 1
    for dim in range(len(shape)):
        for count in (2, 4):
            if shape[dim] % count == 0:
                yield dim, count


def write_checkpoint(path, tensors: dict[str, torch.Tensor], dim, count, zero_parts: int) -> None:
    """One file per (tp part, zero part), as ranks would write them."""
    path.mkdir(parents=True, exist_ok=True)
    rank = 0
    for index in range(count):
        for part in range(zero_parts):
            pieces, data = [], {}
            for name, full in tensors.items():
                use_dim = dim if dim is not None and dim < full.dim() and full.shape[dim] % count == 0 else None
                shard = TensorShard(use_dim, index if use_dim is not None else 0, count if use_dim is not None else 1)
                if use_dim is None and index > 0:
                    continue  # replicas are written by tp rank 0 only
                local = shard.local(full).reshape(-1)
                size = -(-local.numel() // zero_parts)
                lo, hi = min(part * size, local.numel()), min((part + 1) * size, local.numel())
                if lo == hi:
                    continue
                piece = Piece.of(name, "param", shard, tuple(shard.local_shape(tuple(full.shape))), lo, hi)
                pieces.append(piece.to_json())
                data[piece.key] = local[lo:hi].clone()
            save_file(data, str(path / f"rank-{rank:05d}.safetensors"))
            (path / f"rank-{rank:05d}.json").write_text(json.dumps(pieces))
            rank += 1


class CountingSource(CheckpointSource):
    """Counts the values read from the files."""

    read_values = 0

    def _tensor(self, piece, file):
        inner = super()._tensor(piece, file)
        owner = self

        class Counted:
            def __getitem__(self, index):
                values = inner[index]
                owner.read_values += values.numel()
                return values
        return Counted()


@pytest.mark.parametrize("written, zero_parts", list(itertools.product(list(layouts(FULL.shape)), (1, 3))))
def test_any_part_reads_exactly_its_values(tmp_path, written, zero_parts):
    write_checkpoint(tmp_path, {"w": FULL, "b": BIAS}, *written, zero_parts)
    for name, full in (("w", FULL), ("b", BIAS)):
        for dim, count in layouts(full.shape):
            for index in range(count):
                shard = TensorShard(dim, index, count)
                local = shard.local(full).reshape(-1)
                n = local.numel()
                for lo, hi in ((0, n), (1, n - 1), (n // 2, n // 2 + 1)):
                    source = CountingSource(tmp_path)
                    got = source.read(name, shard, tuple(full.shape), flat_range=(lo, hi))
                    assert torch.equal(got, local[lo:hi]), (name, written, zero_parts, shard, lo, hi)
                    assert source.read_values == hi - lo  # nothing outside the part is read


def test_missing_parts_and_shapes_are_one_line(tmp_path):
    write_checkpoint(tmp_path, {"w": FULL}, 0, 2, 1)
    (tmp_path / "rank-00001.json").write_text("[]")  # tp part 1 lost
    source = CheckpointSource(tmp_path)
    with pytest.raises(CheckpointError, match="lacks part of param of w"):
        source.read("w", TensorShard(), tuple(FULL.shape))
    with pytest.raises(CheckpointError, match="has shape \\(12, 8\\), the model \\(12, 9\\)"):
        source.read("w", TensorShard(), (12, 9))
    with pytest.raises(CheckpointError, match="has no param of parameter v"):
        source.read("v", TensorShard(), (3,))
