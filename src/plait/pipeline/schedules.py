"""Pipeline schedules as data: pure functions from (pp, microbatches, virtual stages) to, for
every pipeline rank, the ordered list of actions it performs in one training step.

The model's blocks are cut into S = pp * v consecutive *chunks*; chunk c lives on rank
c % pp (so with v > 1 each rank holds v chunks, pp apart: Megatron's interleaving). Actions
(``Op``):

    F(mb, c)        forward micro-batch mb through chunk c
    B(mb, c)        backward of the same: the whole backward, or under a zero-bubble schedule
                    only the gradient with respect to the chunk's input (the critical path)
    W(mb, c)        zero-bubble schedules: the weight gradients of B(mb, c), deferred
    SEND_F / RECV_F activations of (mb, c) to / from the rank of the neighbouring chunk
    SEND_B / RECV_B gradients of the same, the other way

No processes or tensors are involved: the executor runs these lists, the tests check them,
and the simulator (``simulate``) turns them into a timeline, so the bubble in a picture, a
test and the planner all come from the same code.

Bubble with unit costs (Narayanan et al. 2021): GPipe and 1F1B (p - 1) / (m + p - 1) of each
rank's time idle; interleaving divides the warm-up and cool-down by v. 1F1B keeps at most p
micro-batches' activations per rank in flight, GPipe all m.

ZB-H1 (``zb1p``; Qi et al. 2023, "Zero Bubble Pipeline Parallelism") splits the backward into
B and W. Rank r runs min(p - r, m) forwards, then for k = 0 .. m-1: B(k), the forward of
micro-batch k + p - r, and W(k - r) once k >= r; the W's left over close the step. The first
B's reach rank r as in 1F1B, so F - B in flight is 1F1B's p - r; rank r keeps r W's back and
runs them in the cool-down, where 1F1B idles. With costs T_F, T_B, T_W the bubble shrinks
from 1F1B's (p-1)(T_F + T_B + T_W) per rank to (p-1)(T_F + T_B - T_W): with all three equal,
(p-1) / (3m + p - 1) of the step.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

from plait.errors import PlaitError

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb1p")
SPLIT_BACKWARD = frozenset({"zb1p"})  # schedules whose backward is B (inputs) + W (weights)


class ScheduleError(PlaitError):
    """A schedule that cannot be built for these sizes; one line."""


class Op(str, enum.Enum):
    """What an action does: compute (F, B, W) or move a tensor (SEND/RECV of the F or B direction)."""

    F = "F"
    B = "B"
    W = "W"
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"

    @property
    def is_compute(self) -> bool:
        return self in (Op.F, Op.B, Op.W)

    @property
    def is_send(self) -> bool:
        return self in (Op.SEND_F, Op.SEND_B)

    @property
    def direction(self) -> "Op":
        """Of a message: F (activations, to the next chunk) or B (gradients, to the previous)."""
        return Op.F if self in (Op.SEND_F, Op.RECV_F) else Op.B


@dataclass(frozen=True)
class Action:
    kind: Op
    microbatch: int
    chunk: int           # global chunk index, 0 .. pp * v - 1
    peer: int | None = None  # pipeline rank at the other end of a send / receive

    def __str__(self) -> str:
        text = f"{self.kind.value}{self.microbatch}c{self.chunk}"
        return text if self.peer is None else f"{text}->{self.peer}" if self.kind.is_send else f"{text}<-{self.peer}"


def splits_backward(schedule: str) -> bool:
    return schedule in SPLIT_BACKWARD


def chunk_rank(chunk: int, pp: int) -> int:
    return chunk % pp


def _compute_order(schedule: str, pp: int, m: int, v: int, rank: int) -> list[tuple[str, int, int]]:
    """The F/B order of one rank, as (kind, microbatch, chunk)."""
    chunks = [rank + k * pp for k in range(v)]
    if schedule == "gpipe":
        forwards = [("F", mb, c) for c in chunks for mb in range(m)]
        backwards = [("B", mb, c) for c in reversed(chunks) for mb in range(m)]
        return forwards + backwards
    if schedule == "zb1p":  # ZB-H1, see the module docstring
        chunk = chunks[0]
        order = [("F", mb, chunk) for mb in range(min(pp - rank, m))]
        for k in range(m):
            order.append(("B", k, chunk))
            if k + pp - rank < m:
                order.append(("F", k + pp - rank, chunk))
            if k >= rank:
                order.append(("W", k - rank, chunk))
        return order + [("W", mb, chunk) for mb in range(max(0, m - rank), m)]
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
    elif schedule in ("1f1b", "zb1p") and virtual_stages != 1:
        raise ScheduleError(f"--virtual-stages > 1 needs --schedule interleaved (or gpipe), not {schedule}")


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
                    actions.append(Action(Op.RECV_F, mb, chunk, chunk_rank(chunk - 1, pp)))
                actions.append(Action(Op.F, mb, chunk))
                if chunk < last_chunk:
                    actions.append(Action(Op.SEND_F, mb, chunk, chunk_rank(chunk + 1, pp)))
            elif kind == "B":
                if chunk < last_chunk:
                    actions.append(Action(Op.RECV_B, mb, chunk, chunk_rank(chunk + 1, pp)))
                actions.append(Action(Op.B, mb, chunk))
                if chunk > 0:
                    actions.append(Action(Op.SEND_B, mb, chunk, chunk_rank(chunk - 1, pp)))
            else:  # W: local, nothing to send
                actions.append(Action(Op.W, mb, chunk))
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
             comm_cost: float = 0.0, weight_cost: Cost = 0.0) -> list[Slot]:
    """Run the action lists against each other: each rank executes its list in order; a
    receive waits for the matching send; compute takes its cost (a number, or a function of
    the chunk index: the planner charges the embedding and head to the first and last chunk);
    a message arrives ``comm_cost`` after its send. Under a split backward, ``backward_cost``
    is B's (input gradients) and ``weight_cost`` W's. Returns the compute slots.

    Raises ScheduleError on a deadlock (a rank waits on a receive that is never sent).
    """
    pp = len(plans)
    position = [0] * pp
    clock = [0.0] * pp
    costs = {Op.F: forward_cost, Op.B: backward_cost, Op.W: weight_cost}
    sent: dict[tuple[Op, int, int], float] = {}  # (direction, mb, chunk of the sender) -> arrival time
    slots: list[Slot] = []
    progressed = True
    while progressed:
        progressed = False
        for rank in range(pp):
            while position[rank] < len(plans[rank]):
                action = plans[rank][position[rank]]
                if action.kind.is_compute:
                    cost = costs[action.kind]
                    cost = cost(action.chunk) if callable(cost) else cost
                    slots.append(Slot(rank, action.kind.value, action.microbatch, action.chunk, clock[rank],
                                      clock[rank] + cost))
                    clock[rank] += cost
                elif action.kind.is_send:
                    sent[(action.kind.direction, action.microbatch, action.chunk)] = clock[rank] + comm_cost
                else:
                    direction = action.kind.direction
                    source = action.chunk - 1 if direction == Op.F else action.chunk + 1
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
        if action.kind == Op.F:
            live += 1
            peak = max(peak, live)
        elif action.kind == Op.B:
            live -= 1
    return peak


def in_flight_per_rank(schedule: str, pp: int, microbatches: int, virtual_stages: int = 1) -> list[int]:
    """``peak_in_flight`` of every rank, read from the same compute order ``build_schedule``
    uses, without building the send / receive actions (the planner's search calls it often)."""
    peaks = []
    for rank in range(pp):
        live = peak = 0
        for kind, _, _ in _compute_order(schedule, pp, microbatches, virtual_stages, rank):
            live += {"F": 1, "B": -1, "W": 0}[kind]
            peak = max(peak, live)
        peaks.append(peak)
    return peaks


def analytic_bubble(schedule: str, pp: int, microbatches: int, virtual_stages: int = 1) -> float:
    """Idle fraction with equal forward and backward costs: (p-1)/(v m + p - 1); ZB-H1 with
    equal F, B and W: (p-1)/(3m + p - 1)."""
    if splits_backward(schedule):
        return (pp - 1) / (3 * microbatches + pp - 1)
    v = virtual_stages if schedule == "interleaved" else 1
    return (pp - 1) / (v * microbatches + pp - 1)


def analytic_bubble_formula(schedule: str, pp: int, microbatches: int, virtual_stages: int = 1) -> str:
    """``analytic_bubble``'s formula with the numbers in (for printing)."""
    if splits_backward(schedule):
        return f"(p-1)/(3m+p-1) = {pp - 1}/(3*{microbatches}+{pp - 1})"
    if schedule == "interleaved" and virtual_stages > 1:
        return f"(p-1)/(v*m+p-1) = {pp - 1}/({virtual_stages}*{microbatches}+{pp - 1})"
    return f"(p-1)/(m+p-1) = {pp - 1}/({microbatches}+{pp - 1})"
