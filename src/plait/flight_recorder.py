"""Each rank's ring buffer of its last collectives, and the summary of a hang made from them.

Every collective plait issues goes through ``plait.comm.Collectives``, which records it here:
a sequence number over all of the rank's collectives, one per process group (the n-th
collective of a group is the same collective on every member), the group's name and global
ranks, the op, its tag, its bytes, the peer of a send or receive, and the wall-clock start and
end (an asynchronous collective ends when its handle is waited on; under NCCL, whose calls
return as soon as the GPU has them queued, when the GPU has run it: ``end_when_done``). The buffer keeps the last
``capacity`` entries: recording is a lock and a deque append, cheap beside any collective.

When a run stops making progress (``plait.train.watchdog``), every live rank writes
``snapshot()`` and one rank prints ``summarize(snapshots)``: the ranks outside any collective
(computing, or stuck) or silent (dead, stopped) hold the others back; each waiting rank says in
which collective it waits and for how long.
"""
from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class Entry:
    seq: int                 # this rank's n-th collective, over all groups
    group_seq: int           # the n-th collective of this process group (equal on its members)
    group: str               # "dp", "pp", "tp", "world"
    ranks: tuple[int, ...]   # global ranks of the group
    op: str
    tag: str
    bytes: int
    peer: int | None         # global rank of a send's destination or a receive's source
    start: float             # time.time()
    end: float | None = None

    def describe(self) -> str:
        what = f"{self.group}/{self.op}" + (f" '{self.tag}'" if self.tag else "")
        peer = f" {'to' if self.op == 'send' else 'from'} rank {self.peer}" if self.peer is not None else ""
        return f"{what}{peer} #{self.group_seq} ({self.bytes:,} bytes, ranks {list(self.ranks)})"


class FlightRecorder:
    """The last ``capacity`` collectives of this rank (thread-safe: the watchdog reads it)."""

    def __init__(self, rank: int = 0, capacity: int = 256) -> None:
        self.rank = rank
        self.entries: deque[Entry] = deque(maxlen=capacity)
        self.step: int | None = None
        self._seq = 0
        self._group_seq: dict[tuple[str, tuple[int, ...]], int] = {}
        self._lock = threading.Lock()
        self.last_progress = time.time()
        self.hung = False  # set by the hang watchdog once the job is being ended
        self._on_device: deque[tuple[Entry, Any]] = deque()  # entries that end when their work is done

    def begin(self, group: str, ranks: tuple[int, ...], op: str, tag: str, nbytes: int,
              peer: int | None = None) -> Entry:
        with self._lock:
            key = (group, ranks) if peer is None else (f"{group}:{op}", (peer,))
            self._group_seq[key] = self._group_seq.get(key, 0) + 1
            self._seq += 1
            entry = Entry(self._seq, self._group_seq[key], group, ranks, op, tag, nbytes, peer, time.time())
            self.entries.append(entry)
            self.last_progress = entry.start
            return entry

    def end(self, entry: Entry) -> None:
        with self._lock:
            entry.end = self.last_progress = time.time()

    def end_when_done(self, entry: Entry, work) -> None:
        """``entry`` ends once ``work`` (a torch.distributed handle) reports it completed on its
        device: found by ``poll`` (the watchdog's). Here only the oldest finished handles are let
        go, up to the first one still running, so a collective costs O(1) event queries, not one
        per handle in flight."""
        with self._lock:
            while self._on_device and _finished(self._on_device[0][1]):
                self._on_device.popleft()[0].end = self.last_progress = time.time()
            self._on_device.append((entry, work))

    def poll(self) -> None:
        """End every entry whose device work has completed (CUDA event queries: no waiting)."""
        with self._lock:
            pending: deque[tuple[Entry, Any]] = deque()
            for entry, work in self._on_device:
                if _finished(work):
                    entry.end = self.last_progress = time.time()
                else:
                    pending.append((entry, work))
            self._on_device = pending

    def set_step(self, step: int) -> None:
        with self._lock:
            self.step = step
            self.last_progress = time.time()

    def stalled_for(self, now: float | None = None) -> float:
        """Seconds this rank has waited in a collective without any progress (0 if none is in flight)."""
        now = time.time() if now is None else now
        self.poll()
        with self._lock:
            waiting = any(entry.end is None for entry in self.entries)
            return now - self.last_progress if waiting else 0.0

    def in_flight(self) -> list[Entry]:
        """Collectives started and not finished, oldest first."""
        self.poll()
        with self._lock:
            return [entry for entry in self.entries if entry.end is None]

    def write(self, folder: Path) -> Path | None:
        """``snapshot()`` as ``folder/rank-00003.json`` (rank 3); None if it cannot be written."""
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"rank-{self.rank:05d}.json"
            path.write_text(json.dumps(self.snapshot()) + "\n")
            return path
        except OSError:
            return None

    def snapshot(self) -> dict[str, Any]:
        self.poll()
        with self._lock:
            return {"rank": self.rank, "step": self.step, "time": time.time(), "last_progress": self.last_progress,
                    "entries": [asdict(entry) for entry in self.entries]}


def _finished(work) -> bool:
    try:
        return work.is_completed()
    except RuntimeError:  # a failed collective has ended too; its error surfaces at its wait
        return True


def _entry(data: dict) -> Entry:
    return Entry(**{**data, "ranks": tuple(data["ranks"])})


def summarize(snapshots: dict[int, dict | None], world_size: int, stalled_s: float) -> list[str]:
    """Lines saying which ranks hold the job back and where every rank is; the first line alone
    is the diagnosis."""
    silent = sorted(rank for rank in range(world_size) if snapshots.get(rank) is None)
    waiting: dict[int, Entry] = {}
    last: dict[int, Entry | None] = {}
    for rank, snap in snapshots.items():
        if snap is None:
            continue
        entries = [_entry(e) for e in snap["entries"]]
        pending = [e for e in entries if e.end is None]
        if pending:
            waiting[rank] = pending[0]
        done = [e for e in entries if e.end is not None]
        last[rank] = done[-1] if done else None
    computing = sorted(rank for rank in last if rank not in waiting)
    now = max((snap["time"] for snap in snapshots.values() if snap), default=time.time())
    steps = sorted({snap["step"] for snap in snapshots.values() if snap and snap["step"] is not None})
    where = f" at step {steps[0]}" if len(steps) == 1 else (f" at steps {steps}" if steps else "")
    lines = []
    behind = computing + silent
    if behind:
        parts = []
        for rank in behind:
            awaited = [f"rank {r} in {e.describe()}" for r, e in sorted(waiting.items())
                       if rank in e.ranks and (e.peer is None or e.peer == rank)]
            joined = f"; waiting for it: {', '.join(awaited[:3])}" if awaited else ""
            if rank in silent:
                parts.append(f"rank {rank} did not report (dead, stopped, or stuck holding the interpreter){joined}")
            else:
                previous = last[rank]
                since = f"{now - previous.end:.0f} s" if previous else "the start"
                after = f" after {previous.describe()}" if previous else ""
                parts.append(f"rank {rank} is outside any collective (computing, or stuck) for {since}{after}{joined}")
        lines.append(f"no progress for {stalled_s:.0f} s{where}: " + "; ".join(parts))
    else:
        lines.append(f"no progress for {stalled_s:.0f} s{where}: every rank waits in a collective that some member "
                     "of its group is not in (mismatched collectives: a deadlock)")
    for rank in sorted(waiting):
        entry = waiting[rank]
        lines.append(f"  rank {rank} waits in {entry.describe()} for {now - entry.start:.0f} s")
    for rank in computing:
        lines.append(f"  rank {rank} is computing (last collective: {last[rank].describe() if last[rank] else 'none'})")
    for rank in silent:
        lines.append(f"  rank {rank}: no report")
    return lines
