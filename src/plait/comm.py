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

Every collective is also recorded, with its start and end time, in the rank's
``plait.flight_recorder.FlightRecorder`` (the last few hundred), so a hang can be located.

Per-backend choice (measured here, torch 2.13, gloo, 2 and 4 ranks, 1-67 MB): gloo's
``all_to_all_single`` moves 2-4x more bytes per second than its ``reduce_scatter`` and
``all_gather`` (e.g. 67 MB over 2 ranks: all-to-all 26 ms, all-reduce 55 ms, all-gather 124 ms,
reduce-scatter 90 ms), and point-to-point sends are faster still for all-gather (24 MB over 2
ranks: isend/irecv 11 ms, all-to-all of n shard copies 18 ms, all_gather 21 ms). On gloo,
reduce-scatter is therefore an all-to-all of the n chunks followed by a local sum, and
all-gather one isend/irecv pair per peer straight into the output; both send exactly the ring
volume (n-1)/n B, so the counted bytes are unchanged. NCCL keeps its native ops.
"""
from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.distributed as dist

from plait.flight_recorder import Entry, FlightRecorder

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


# NCCL's native tensor collectives; torch 2.13 names them *_single, earlier releases (the 2.11 of
# the GPU machines) only *_into_tensor / *_tensor, with the same arguments
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


_GATHER_TAG = 1 << 20  # point-to-point all-gathers; distinct from pipeline message tags


class _WaitAll:
    """Work handle over several point-to-point operations (keeps the send buffer alive)."""

    def __init__(self, works: list, keep: torch.Tensor) -> None:
        self.works, self.keep = works, keep
        self.issued = list(works)

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.works, self.keep = [], None

    def is_completed(self) -> bool:
        return all(work.is_completed() for work in self.issued)


class _SumAfter:
    """Work handle of an all-to-all reduce-scatter: wait for the exchange, then sum the chunks."""

    def __init__(self, work, received: torch.Tensor, output: torch.Tensor) -> None:
        self.work, self.received, self.output = work, received, output

    def wait(self) -> None:
        if self.received is None:
            return
        if self.work is not None:
            self.work.wait()
        torch.sum(self.received, dim=0, out=self.output.view(-1))
        self.work = self.received = None


class _Recorded:
    """Work handle that marks its flight-recorder entry done once waited on."""

    def __init__(self, work, recorder: FlightRecorder, entry: Entry) -> None:
        self.work, self.recorder, self.entry = work, recorder, entry

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None
            self.recorder.end(self.entry)


class Collectives:
    """Counted and recorded collectives over one process group (``group=None`` with ``size == 1``:
    no-ops)."""

    def __init__(self, name: str, group: dist.ProcessGroup | None, counter: TrafficCounter,
                 device: torch.device = torch.device("cpu"), recorder: FlightRecorder | None = None) -> None:
        self.name = name
        self.device = device
        self.group = group
        self.counter = counter
        self.recorder = recorder if recorder is not None else FlightRecorder()
        self.size = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        self.ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else (0,)
        # See the module docstring: gloo's all-to-all beats its reduce-scatter and all-gather.
        self.via_all_to_all = group is not None and dist.get_backend(group) == "gloo"
        # Set while plait.tensor_parallel.sequence.keep_sequence_shards is active.
        self.sequence_shards = None
        # NCCL's calls return once the GPU has them queued, and the host only waits later, at some
        # .item(): a collective's record ends when the GPU has run it (the hang watchdog polls)
        self.ends_on_device = group is not None and dist.get_backend(group) == "nccl"

    def _count(self, op: str, tag: str, payload: int, wire: Fraction, peer: int | None = None) -> Entry:
        """Count the collective and record its start; returns the entry to end."""
        self.counter.add(self.name, op, tag, payload, wire)
        return self.recorder.begin(self.name, self.ranks, op, tag, payload,
                                   None if peer is None else self.ranks[peer])

    def _issued(self, entry: Entry, work):
        """An asynchronous handle that ends ``entry`` when waited on; a finished call ends it now."""
        if work is None:
            self.recorder.end(entry)
            return None
        return _Recorded(work, self.recorder, entry)

    def _launch(self, entry: Entry, launch, async_op: bool):
        """Issue ``launch(async_op)`` (a torch.distributed call) and record ``entry``'s end: when
        the call or its handle's wait returns, or under NCCL (``ends_on_device``) when the GPU has
        run it. Returns the handle to wait on when ``async_op``, else None."""
        if not self.ends_on_device:
            return self._issued(entry, launch(async_op))
        work = launch(True)
        self.recorder.end_when_done(entry, work)
        if async_op:
            return work
        work.wait()  # the current CUDA stream waits for it, the host does not
        return None

    def all_reduce(self, tensor: torch.Tensor, op=ReduceOp.SUM, tag: str = "", async_op: bool = False):
        """In-place all-reduce. Returns a work handle when ``async_op`` (else None)."""
        if self.size == 1:
            return None
        n, size = self.size, _nbytes(tensor)
        entry = self._count("all_reduce", tag, size, Fraction(2 * (n - 1) * size, n))
        return self._launch(entry, lambda run_async: dist.all_reduce(tensor, op=op, group=self.group,
                                                                     async_op=run_async), async_op)

    def all_gather(self, output: torch.Tensor, shard: torch.Tensor, tag: str = "", async_op: bool = False):
        """``output`` (n x shard along dim 0) receives every rank's ``shard`` in rank order."""
        if self.size == 1:
            output.copy_(shard.view_as(output))
            return None
        n, size = self.size, _nbytes(output)
        entry = self._count("all_gather", tag, size, Fraction((n - 1) * size, n))
        if self.via_all_to_all:  # point-to-point: send our shard to each peer, receive theirs in place
            chunks = output.view(n, -1)
            flat = shard.contiguous().view(-1)
            chunks[self.rank].copy_(flat)
            works = []
            for peer in range(n):
                if peer != self.rank:
                    works.append(dist.isend(flat, group_dst=peer, group=self.group, tag=_GATHER_TAG))
                    works.append(dist.irecv(chunks[peer], group_src=peer, group=self.group, tag=_GATHER_TAG))
            pending = _WaitAll(works, keep=flat)
            if async_op:
                return self._issued(entry, pending)
            pending.wait()
            return self._issued(entry, None)
        return self._launch(entry, lambda run_async: _all_gather_tensor(output, shard, group=self.group,
                                                                        async_op=run_async), async_op)

    def reduce_scatter(self, output: torch.Tensor, full: torch.Tensor, op=ReduceOp.SUM, tag: str = "",
                       async_op: bool = False):
        """``output`` receives this rank's 1/n slice (dim 0) of the sum of every rank's ``full``."""
        if self.size == 1:
            output.copy_(full.view_as(output))
            return None
        n, size = self.size, _nbytes(full)
        entry = self._count("reduce_scatter", tag, size, Fraction((n - 1) * size, n))
        if self.via_all_to_all and op == ReduceOp.SUM:
            # chunk j of every rank's input goes to rank j, which sums the n chunks it receives
            received = torch.empty_like(full).view(n, -1)
            work = dist.all_to_all_single(received.view(-1), full.contiguous().view(-1), group=self.group,
                                          async_op=async_op)
            pending = _SumAfter(work, received, output)
            if async_op:
                return self._issued(entry, pending)
            pending.wait()
            return self._issued(entry, None)
        return self._launch(entry, lambda run_async: _reduce_scatter_tensor(output, full, op=op, group=self.group,
                                                                            async_op=run_async), async_op)

    def all_to_all(self, output: torch.Tensor, full: torch.Tensor, tag: str = "") -> None:
        """Equal-split all-to-all along dim 0: chunk j of ``full`` goes to rank j, and chunk j of
        ``output`` arrives from rank j (both contiguous, n chunks)."""
        if self.size == 1:
            output.copy_(full)
            return
        n, size = self.size, _nbytes(full)
        entry = self._count("all_to_all", tag, size, Fraction((n - 1) * size, n))
        self._launch(entry, lambda run_async: dist.all_to_all_single(
            output.view(-1), full.contiguous().view(-1), group=self.group, async_op=run_async), False)

    def ring_exchange(self, outgoing: torch.Tensor, incoming: torch.Tensor, tag: int, what: str):
        """Send ``outgoing`` to the next group rank and receive ``incoming`` from the previous one,
        asynchronously (a ring step); returns the handle to wait on. Counted as a send of ``B`` bytes."""
        n = self.size
        following, previous = (self.rank + 1) % n, (self.rank - 1) % n
        entry = self._count("send", what, _nbytes(outgoing), Fraction(_nbytes(outgoing)), peer=following)
        # one batch: with n = 2 both messages cross one pair, and NCCL runs a pair's unbatched
        # sends and receives in issue order, so send-then-receive on both ends would wait forever
        # on any tensor above its buffer size; every rank of the ring takes part in every step,
        # as torch requires of a batch. gloo issues the two as they are.
        works = dist.batch_isend_irecv([
            dist.P2POp(dist.isend, outgoing, group=self.group, tag=tag, group_peer=following),
            dist.P2POp(dist.irecv, incoming, group=self.group, tag=tag, group_peer=previous)])
        return self._launch(entry, lambda _: _WaitAll(works, keep=outgoing), True)

    def broadcast(self, tensor: torch.Tensor, src_group_rank: int = 0, tag: str = "") -> None:
        if self.size == 1:
            return
        size = _nbytes(tensor)
        entry = self._count("broadcast", tag, size, Fraction(size))
        self._launch(entry, lambda run_async: dist.broadcast(tensor, group_src=src_group_rank, group=self.group,
                                                             async_op=run_async), False)

    def send(self, tensor: torch.Tensor, peer: int, tag: int, what: str = "activations"):
        """Asynchronous point-to-point send to group rank ``peer``; returns the work handle.
        Counted on the sender only (``B`` bytes, under ``what``); the matching ``recv`` counts nothing."""
        entry = self._count("send", what, _nbytes(tensor), Fraction(_nbytes(tensor)), peer=peer)
        return self._launch(entry, lambda _: dist.isend(tensor, group_dst=peer, group=self.group, tag=tag), True)

    def post_recv(self, tensor: torch.Tensor, peer: int, tag: int):
        """Asynchronous receive into ``tensor`` from group rank ``peer``; wait on the handle before
        reading it (recorded from the post to the wait, not counted)."""
        entry = self.recorder.begin(self.name, self.ranks, "recv", "", _nbytes(tensor), self.ranks[peer])
        return self._launch(entry, lambda _: dist.irecv(tensor, group_src=peer, group=self.group, tag=tag), True)

    def recv(self, tensor: torch.Tensor, peer: int, tag: int) -> None:
        """Blocking receive into ``tensor`` from group rank ``peer`` (recorded, not counted)."""
        self.post_recv(tensor, peer, tag).wait()

    def exchange(self, outgoing: torch.Tensor, incoming: torch.Tensor, peer: int, tag: int, what: str) -> None:
        """Swap tensors with group rank ``peer``: ``incoming`` receives the peer's ``outgoing``.
        The lower rank sends first and the higher receives first, so both ends issue the two
        messages in one order, which NCCL needs (``plait.pipeline.ordering``). Counted as a send."""
        if self.rank < peer:
            work = self.send(outgoing, peer, tag, what)
            self.recv(incoming, peer, tag)
        else:
            self.recv(incoming, peer, tag)
            work = self.send(outgoing, peer, tag, what)
        work.wait()

    def barrier(self) -> None:
        if self.size > 1:
            entry = self.recorder.begin(self.name, self.ranks, "barrier", "", 0)
            dist.barrier(group=self.group)
            self.recorder.end(entry)

    def all_reduce_scalars(self, values: list[float], op=ReduceOp.SUM, tag: str = "metrics") -> list[float]:
        """Reduce a few Python floats in one float64 message (metrics, token counts)."""
        if self.size == 1:
            return list(values)
        buffer = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.all_reduce(buffer, op=op, tag=tag)
        return buffer.tolist()


_EAGER: dict = {}  # function -> what a call of it runs: itself, or once --compile is on, its disabled form


def eager(fn):
    """Keep ``fn`` out of ``torch.compile``'s graphs (``--compile``): a call is a graph break and
    runs as written, so its collectives are issued, counted and recorded as in eager mode, and an
    autograd node it makes has its own (eager) backward.

    ``torch.compiler.disable`` imports ``torch._dynamo``, about a second of every process's start;
    so a call goes through ``_EAGER``, which ``keep_collectives_eager`` switches to the disabled
    forms before anything is compiled, and an eager run never imports dynamo."""
    _EAGER[fn] = fn

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return _EAGER[fn](*args, **kwargs)
    return call


def keep_collectives_eager() -> None:
    """Make every ``eager`` function a graph break; called before the first ``torch.compile``."""
    for fn in list(_EAGER):
        _EAGER[fn] = torch.compiler.disable(fn)
