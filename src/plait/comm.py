"""Every collective plait issues goes through :class:`Collectives`, which counts bytes.

One ``Collectives`` wraps one process group (one mesh dimension: "dp", "pp", "tp") and
shares a :class:`TrafficCounter` with the other dimensions of the same rank, so tests and
benchmarks can compare the traffic of a step with its analytic minimum.

Byte convention (documented, and what the tests assert exactly). For a collective over
``n`` ranks on a tensor of ``B`` bytes (``B`` = the full tensor for all-reduce, the gathered
output for all-gather, the unreduced input for reduce-scatter) we record, per rank:

* ``payload``: B, the bytes handed to the call;
* ``wire``: what each rank sends under the bandwidth-optimal ring algorithm:
  all-reduce ``2 (n-1)/n B``, all-gather and reduce-scatter ``(n-1)/n B``,
  all-to-all ``(n-1)/n B``, broadcast and send ``B``.

``wire`` is kept as an exact fraction so "bytes counted == formula" can be asserted exactly.
A group of size 1 issues nothing and counts nothing.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.distributed as dist

ReduceOp = dist.ReduceOp


@dataclass
class Traffic:
    calls: int = 0
    payload: int = 0
    wire: Fraction = Fraction(0)


class TrafficCounter:
    """Bytes per (group, op, tag). ``tag`` says what the traffic was for ("grads", "loss", ...)."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str, str], Traffic] = defaultdict(Traffic)

    def add(self, group: str, op: str, tag: str, payload: int, wire: Fraction) -> None:
        record = self.records[(group, op, tag)]
        record.calls += 1
        record.payload += payload
        record.wire += wire

    def reset(self) -> None:
        self.records.clear()

    def select(self, group: str | None = None, op: str | None = None, tag: str | None = None) -> Traffic:
        """Sum of the records matching every given key."""
        total = Traffic()
        for (g, o, t), record in self.records.items():
            if (group is None or g == group) and (op is None or o == op) and (tag is None or t == tag):
                total.calls += record.calls
                total.payload += record.payload
                total.wire += record.wire
        return total

    def summary(self) -> dict[str, dict[str, float]]:
        return {f"{g}/{o}/{t}": {"calls": r.calls, "payload_bytes": r.payload, "wire_bytes": float(r.wire)}
                for (g, o, t), r in sorted(self.records.items())}


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class Collectives:
    """Counted collectives over one process group (``group=None`` with ``size == 1``: no-ops)."""

    def __init__(self, name: str, group: dist.ProcessGroup | None, counter: TrafficCounter,
                 device: torch.device = torch.device("cpu")) -> None:
        self.name = name
        self.device = device
        self.group = group
        self.counter = counter
        self.size = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0

    def _count(self, op: str, tag: str, payload: int, wire: Fraction) -> None:
        self.counter.add(self.name, op, tag, payload, wire)

    def all_reduce(self, tensor: torch.Tensor, op=ReduceOp.SUM, tag: str = "", async_op: bool = False):
        """In-place all-reduce. Returns a work handle when ``async_op`` (else None)."""
        if self.size == 1:
            return None
        n, size = self.size, _nbytes(tensor)
        self._count("all_reduce", tag, size, Fraction(2 * (n - 1) * size, n))
        return dist.all_reduce(tensor, op=op, group=self.group, async_op=async_op)

    def all_gather(self, output: torch.Tensor, shard: torch.Tensor, tag: str = "", async_op: bool = False):
        """``output`` (n x shard along dim 0) receives every rank's ``shard`` in rank order."""
        if self.size == 1:
            output.copy_(shard.view_as(output))
            return None
        n, size = self.size, _nbytes(output)
        self._count("all_gather", tag, size, Fraction((n - 1) * size, n))
        return dist.all_gather_single(output, shard, group=self.group, async_op=async_op)

    def reduce_scatter(self, output: torch.Tensor, full: torch.Tensor, op=ReduceOp.SUM, tag: str = "",
                       async_op: bool = False):
        """``output`` receives this rank's 1/n slice (dim 0) of the sum of every rank's ``full``."""
        if self.size == 1:
            output.copy_(full.view_as(output))
            return None
        n, size = self.size, _nbytes(full)
        self._count("reduce_scatter", tag, size, Fraction((n - 1) * size, n))
        return dist.reduce_scatter_single(output, full, op=op, group=self.group, async_op=async_op)

    def broadcast(self, tensor: torch.Tensor, src_group_rank: int = 0, tag: str = "") -> None:
        if self.size == 1:
            return
        size = _nbytes(tensor)
        self._count("broadcast", tag, size, Fraction(size))
        dist.broadcast(tensor, group_src=src_group_rank, group=self.group)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.group)

    def all_reduce_scalars(self, values: list[float], op=ReduceOp.SUM, tag: str = "metrics") -> list[float]:
        """Reduce a few Python floats in one float64 message (metrics, token counts)."""
        if self.size == 1:
            return list(values)
        buffer = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.all_reduce(buffer, op=op, tag=tag)
        return buffer.tolist()
