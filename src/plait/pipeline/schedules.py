"""Pipeline schedules as data: pure functions from (pp, microbatches, virtual stages) to, for
every pipeline rank, the ordered list of actions it performs in one training step.

The model's blocks are cut into S = pp * v consecutive *chunks*; chunk c lives on rank
c % pp (so with v > 1 each rank holds v chunks, pp apart: Megatron's interleaving). Actions:

    F(mb, c)        forward micro-batch mb through chunk c
    B(mb, c)        backward of the same
    SEND_F / RECV_F activations of (mb, c) to / from the rank of the neighbouring chunk
    SEND_B / RECV_B gradients of the same, the other way

No processes or tensors are involved: the executor runs these lists, the tests check them,
and the simulator (``simulate``) turns them into a timeline, so the bubble in a picture, a
test and the planner all come from the same code.

Bubble with unit costs (Narayanan et al. 2021): GPipe and 1F1B (p - 1) / (m + p - 1) of each
rank's time idle; interleaving divides the warm-up and cool-down by v. 1F1B keeps at most p
micro-batches' activations per rank in flight, GPipe all m.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from plait.errors import PlaitError

SCHEDULES = ("gpipe", "1f1b", "interleaved")


class ScheduleError(PlaitError):
    """A schedule that cannot be built for these sizes; one line."""


@dataclass(frozen=True)
class Action:
    kind: str            # "F", "B", "SEND_F", "RECV_F", "SEND_B", "RECV_B"
    microbatch: int
    chunk: int           # global chunk index, 0 .. pp * v - 1
    peer: int | None = None  # pipeline rank at the other end of a send / receive

    def __str__(self) -> str:
        text = f"{self.kind}{self.microbatch}c{self.chunk}"
        return text if self.peer is None else f"{text}->{self.peer}" if self.kind.startswith("SEND") \
            else f"{text}<-{self.peer}"


def chunk_rank(chunk: int, pp: int) -> int:
    return chunk % pp


def _compute_order(schedule: str, pp: int, m: int, v: int, rank: int) -> list[tuple[str, int, int]]:
    """The F/B order of one rank, as (kind, microbatch, chunk)."""
    chunks = [rank + k * pp for k in range(v)]
    if schedule == "gpipe":
        forwards = [("F", mb, c) for c in chunks for mb in range(m)]
        backwards = [("B", mb, c) for c in reversed(chunks) for mb in range(m)]
        return forwards + backwards
    if schedule == "1f1b" and v == 1:
        chunk = chunks[0]
        warmup = min(pp - rank - 1, m)
        order = [("F", mb, chunk) for mb in range(warmup)]
        next_b = 0
        for mb in range(warmup, m):
            order.append(("F", mb, chunk))
            order.append(("B", next_b, chunk))
            next_b += 1
        order += [("B", mb, chunk) for mb in range(next_b, m)]
        return order
    # Interleaved 1F1B (Megatron-LM): micro-batches go through the local chunks in groups of pp.
    total = m * v

    def forward_of(k: int) -> tuple[str, int, int]:
        local = (k // pp) % v
        return ("F", (k // (pp * v)) * pp + k % pp, chunks[local])

    def backward_of(k: int) -> tuple[str, int, int]:
        local = v - 1 - (k // pp) % v
        return ("B", (k // (pp * v)) * pp + k % pp, chunks[local])

    warmup = min((pp - rank - 1) * 2 + (v - 1) * pp, total)
    order = [forward_of(k) for k in range(warmup)]
    for k in range(warmup, total):
        order.append(forward_of(k))
        order.append(backward_of(k - warmup))
    order += [backward_of(k) for k in range(total - warmup, total)]
    return order


def check_schedule(schedule: str, pp: int, microbatches: int, virtual_stages: int = 1) -> None:
    """Raise a one-line ScheduleError when ``build_schedule`` cannot build these sizes."""
    if schedule not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if pp < 1 or microbatches < 1 or virtual_stages < 1:
        raise ScheduleError("pp, microbatches and virtual stages must be >= 1")
    if schedule == "interleaved":
        if virtual_stages < 2:
            raise ScheduleError("the interleaved schedule needs --virtual-stages >= 2")
        if microbatches % pp:
            raise ScheduleError(f"the interleaved schedule needs the micro-batch count {microbatches} "
                                f"to be a multiple of pp={pp}")
    elif schedule == "1f1b" and virtual_stages != 1:
        raise ScheduleError("--virtual-stages > 1 needs --schedule interleaved (or gpipe), not 1f1b")


def build_schedule(schedule: str, pp: int, microbatches: int, virtual_stages: int = 1) -> list[list[Action]]:
    """Per pipeline rank, the ordered actions of one step (compute plus sends / receives)."""
    check_schedule(schedule, pp, microbatches, virtual_stages)
    last_chunk = pp * virtual_stages - 1
    plans = []
    for rank in range(pp):
        actions: list[Action] = []
        for kind, mb, chunk in _compute_order(schedule, pp, microbatches, virtual_stages, rank):
            if kind == "F":
                if chunk > 0:
                    actions.append(Action("RECV_F", mb, chunk, chunk_rank(chunk - 1, pp)))
                actions.append(Action("F", mb, chunk))
                if chunk < last_chunk:
                    actions.append(Action("SEND_F", mb, chunk, chunk_rank(chunk + 1, pp)))
            else:
                if chunk < last_chunk:
                    actions.append(Action("RECV_B", mb, chunk, chunk_rank(chunk + 1, pp)))
                actions.append(Action("B", mb, chunk))
                if chunk > 0:
                    actions.append(Action("SEND_B", mb, chunk, chunk_rank(chunk - 1, pp)))
        plans.append(actions)
    return plans


@dataclass(frozen=True)
class Slot:
    rank: int
    kind: str
    microbatch: int
    chunk: int
    start: float
    end: float


Cost = float | Callable[[int], float]


def simulate(plans: list[list[Action]], forward_cost: Cost = 1.0, backward_cost: Cost = 1.0,
             comm_cost: float = 0.0) -> list[Slot]:
    """Run the action lists against each other: each rank executes its list in order; a
    receive waits for the matching send; compute takes its cost (a number, or a function of
    the chunk index: the planner charges the embedding and head to the first and last chunk);
    a message arrives ``comm_cost`` after its send. Returns the compute slots.

    Raises ScheduleError on a deadlock (a rank waits on a receive that is never sent).
    """
    pp = len(plans)
    position = [0] * pp
    clock = [0.0] * pp
    sent: dict[tuple[str, int, int], float] = {}  # (kind, mb, chunk of the sender) -> arrival time
    slots: list[Slot] = []
    progressed = True
    while progressed:
        progressed = False
        for rank in range(pp):
            while position[rank] < len(plans[rank]):
                action = plans[rank][position[rank]]
                if action.kind in ("F", "B"):
                    cost = forward_cost if action.kind == "F" else backward_cost
                    cost = cost(action.chunk) if callable(cost) else cost
                    slots.append(Slot(rank, action.kind, action.microbatch, action.chunk, clock[rank],
                                      clock[rank] + cost))
                    clock[rank] += cost
                elif action.kind.startswith("SEND"):
                    direction = action.kind[-1]
                    sent[(direction, action.microbatch, action.chunk)] = clock[rank] + comm_cost
                else:
                    direction = action.kind[-1]
                    source = action.chunk - 1 if direction == "F" else action.chunk + 1
                    key = (direction, action.microbatch, source)
                    if key not in sent:
                        break  # blocked: let the other ranks progress
                    clock[rank] = max(clock[rank], sent[key])
                position[rank] += 1
                progressed = True
    stuck = [rank for rank in range(pp) if position[rank] < len(plans[rank])]
    if stuck:
        blocked = ", ".join(f"rank {r} at {plans[r][position[r]]}" for r in stuck)
        raise ScheduleError(f"schedule deadlocks: {blocked}")
    return slots


def bubble_fraction(slots: list[Slot], pp: int) -> float:
    """Idle share of the ranks' time between the step's start and its end."""
    makespan = max(slot.end for slot in slots)
    busy = sum(slot.end - slot.start for slot in slots)
    return 1.0 - busy / (pp * makespan)


def peak_in_flight(plan: list[Action]) -> int:
    """Most micro-batch-chunks whose forward ran and whose backward has not (activations kept)."""
    live = peak = 0
    for action in plan:
        if action.kind == "F":
            live += 1
            peak = max(peak, live)
        elif action.kind == "B":
            live -= 1
    return peak


def in_flight_per_rank(schedule: str, pp: int, microbatches: int, virtual_stages: int = 1) -> list[int]:
    """``peak_in_flight`` of every rank, read from the same compute order ``build_schedule``
    uses, without building the send / receive actions (the planner's search calls it often)."""
    peaks = []
    for rank in range(pp):
        live = peak = 0
        for kind, _, _ in _compute_order(schedule, pp, microbatches, virtual_stages, rank):
            live += 1 if kind == "F" else -1
            peak = max(peak, live)
        peaks.append(peak)
    return peaks


def analytic_bubble(schedule: str, pp: int, microbatches: int, virtual_stages: int = 1) -> float:
    """Idle fraction with equal forward and backward costs: (p-1)/(v m + p - 1)."""
    v = virtual_stages if schedule == "interleaved" else 1
    return (pp - 1) / (v * microbatches + pp - 1)
