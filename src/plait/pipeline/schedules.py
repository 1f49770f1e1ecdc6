"""Pipeline schedules as data: pure functions from (pp, microbatches, virtual stages) to, for
every pipeline rank, the ordered list of actions it performs in one training step.

The model's blocks are cut into S = pp * v consecutive *chunks*, placed on ranks by the
schedule's ``Placement``: in a loop, chunk c on rank c % pp (with v > 1 each rank holds v
chunks, pp apart: Megatron's interleaving); in a V (ZB-V, v = 2), chunks c and 2p-1-c on rank
c, so the first and the last chunk -- embedding and head -- share rank 0, and chunks p-1 and p
share rank p-1, which hands its activations from one to the other without a message. Actions
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

ZB-V (``zbv``; Qi et al. 2023, section 6) runs two half-size chunks per rank in the V
placement: rank r holds the "down" chunk r and the "up" chunk 2p-1-r. Its order (the paper's
hand-made schedule, as PyTorch's ``ScheduleZBVZeroBubble`` builds it) warms up with
2(p-r)-1 down forwards, then r pairs (up F, down F), then p-r triples (up F, B, W); the steady
state repeats (down F, B, W, up F, B, W); the cool-down runs r pairs of B (down, up) and p-r
(down B, down W), then the deferred W's. The construction assumes m >= 2p-1 and drops the
actions of micro-batches beyond m. Counting each chunk's F, B and W as one unit (a
rank's whole F is then 2), a rank's work is 6m and, for m >= 2p-1, the step takes
6m + p - 1: each rank idles p - 1 units, the time the first forward needs to reach it, so the
bubble is (p-1) / (6m + p - 1), half of ZB-H1's idle time at the same work and below
interleaved 1F1B's. Each rank keeps at most 2p half-size chunks in flight: the p stages' worth
of 1F1B's rank 0.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

from plait.errors import PlaitError

class Placement(str, enum.Enum):
    """Which rank runs chunk c of S = p * v: LOOP c % p; V (v = 2) c or 2p-1-c, whichever is < p."""

    LOOP = "loop"
    V = "v"

    def rank_of(self, chunk: int, pp: int) -> int:
        if self is Placement.V:
            return chunk if chunk < pp else 2 * pp - 1 - chunk
        return chunk % pp

    def chunks_of(self, rank: int, pp: int, virtual_stages: int) -> list[int]:
        """The global chunks of ``rank``, in model order."""
        if self is Placement.V:
            return [rank, 2 * pp - 1 - rank]
        return [rank + k * pp for k in range(virtual_stages)]


class Schedule(str, enum.Enum):
    """The pipeline schedules, by their ``--schedule`` names, and what each implies."""

    GPIPE = "gpipe"
    ONE_F_ONE_B = "1f1b"
    INTERLEAVED = "interleaved"
    ZB1P = "zb1p"  # ZB-H1
    ZBV = "zbv"

    @property
    def placement(self) -> Placement:
        """ZB-V's V (two chunks per rank); a loop for every other schedule."""
        return Placement.V if self is Schedule.ZBV else Placement.LOOP

    @property
    def splits_backward(self) -> bool:
        """The zero-bubble schedules: a backward is B (input gradients), its W (weights) later."""
        return self in (Schedule.ZB1P, Schedule.ZBV)


SCHEDULES = tuple(schedule.value for schedule in Schedule)  # the --schedule choices


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


Message = tuple[Op, int, int]  # (direction, micro-batch, chunk of the sender): one tensor between two ranks


def message_of(action: Action) -> Message:
    """The message a send or a receive carries, named alike at both ends."""
    direction = action.kind.direction
    if action.kind.is_send:
        return (direction, action.microbatch, action.chunk)
    return (direction, action.microbatch, action.chunk - 1 if direction == Op.F else action.chunk + 1)


def _zero_bubble_v_order(pp: int, m: int, rank: int) -> list[tuple[str, int, int]]:
    """ZB-V's order on ``rank`` (see the module docstring), built for max(m, 2p-1) micro-batches
    and cut to the first m."""
    down, up = rank, 2 * pp - 1 - rank
    n = max(m, 2 * pp - 1)
    order: list[tuple[str, int, int]] = []
    done = {("F", down): 0, ("F", up): 0, ("B", down): 0, ("B", up): 0, ("W", down): 0, ("W", up): 0}

    def run(*steps: tuple[str, int]) -> None:
        for kind, chunk in steps:
            order.append((kind, done[(kind, chunk)], chunk))
            done[(kind, chunk)] += 1

    run(*[("F", down)] * (2 * (pp - rank) - 1))
    run(*[("F", up), ("F", down)] * rank)
    run(*[("F", up), ("B", up), ("W", up)] * (pp - rank))
    while done[("F", up)] < done[("F", down)] or done[("F", down)] < n:
        if done[("F", down)] < n:
            run(("F", down))
        run(("B", down), ("W", down), ("F", up), ("B", up), ("W", up))
    run(*[("B", down), ("B", up)] * rank)
    run(*[("B", down), ("W", down)] * (pp - rank))
    run(*[("W", up)] * (done[("B", up)] - done[("W", up)]))
    run(*[("W", down)] * (done[("B", down)] - done[("W", down)]))
    return [step for step in order if step[1] < m]


def _compute_order(schedule: Schedule, pp: int, m: int, v: int, rank: int,
                   placement: Placement = Placement.LOOP) -> list[tuple[str, int, int]]:
    """The F/B(/W) order of one rank, as (kind, microbatch, chunk)."""
    chunks = placement.chunks_of(rank, pp, v)
    if schedule is Schedule.ZBV:
        return _zero_bubble_v_order(pp, m, rank)
    if schedule is Schedule.GPIPE:
        forwards = [("F", mb, c) for c in chunks for mb in range(m)]
        backwards = [("B", mb, c) for c in reversed(chunks) for mb in range(m)]
        return forwards + backwards
    if schedule is Schedule.ZB1P:  # ZB-H1, see the module docstring
        chunk = chunks[0]
        order = [("F", mb, chunk) for mb in range(min(pp - rank, m))]
        for k in range(m):
            order.append(("B", k, chunk))
            if k + pp - rank < m:
                order.append(("F", k + pp - rank, chunk))
            if k >= rank:
                order.append(("W", k - rank, chunk))
        return order + [("W", mb, chunk) for mb in range(max(0, m - rank), m)]
    if schedule is Schedule.ONE_F_ONE_B and v == 1:
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
    schedule = Schedule(schedule)
    if pp < 1 or microbatches < 1 or virtual_stages < 1:
        raise ScheduleError("pp, microbatches and virtual stages must be >= 1")
    if schedule is Schedule.INTERLEAVED:
        if virtual_stages < 2:
            raise ScheduleError("the interleaved schedule needs --virtual-stages >= 2")
        if microbatches % pp:
            raise ScheduleError(f"the interleaved schedule needs the micro-batch count {microbatches} "
                                f"to be a multiple of pp={pp}")
    elif schedule is Schedule.ZBV and virtual_stages != 2:
        raise ScheduleError("--schedule zbv places two chunks on each rank; set --virtual-stages 2")
    elif schedule in (Schedule.ONE_F_ONE_B, Schedule.ZB1P) and virtual_stages != 1:
        raise ScheduleError(f"--virtual-stages > 1 needs --schedule interleaved (or gpipe), not {schedule.value}")


def build_schedule(schedule: Schedule | str, pp: int, microbatches: int, virtual_stages: int = 1,
                   placement: Placement | None = None) -> list[list[Action]]:
    """Per pipeline rank, the ordered actions of one step (compute plus sends / receives).

    ``placement`` defaults to the schedule's own; evaluation runs ``gpipe`` forwards over the
    training schedule's placement. Neighbouring chunks on the same rank exchange nothing: the
    executor hands the tensor over locally."""
    check_schedule(schedule, pp, microbatches, virtual_stages)
    schedule = Schedule(schedule)
    if placement is None:
        placement = schedule.placement
    last_chunk = pp * virtual_stages - 1

    def peer(rank: int, chunk: int) -> int | None:
        """The rank of ``chunk`` when it is another rank's, else None (no message)."""
        other = placement.rank_of(chunk, pp)
        return None if other == rank else other

    plans = []
    for rank in range(pp):
        actions: list[Action] = []
        for kind, mb, chunk in _compute_order(schedule, pp, microbatches, virtual_stages, rank, placement):
            if kind == "F":
                if chunk > 0 and (source := peer(rank, chunk - 1)) is not None:
                    actions.append(Action(Op.RECV_F, mb, chunk, source))
                actions.append(Action(Op.F, mb, chunk))
                if chunk < last_chunk and (target := peer(rank, chunk + 1)) is not None:
                    actions.append(Action(Op.SEND_F, mb, chunk, target))
            elif kind == "B":
                if chunk < last_chunk and (source := peer(rank, chunk + 1)) is not None:
                    actions.append(Action(Op.RECV_B, mb, chunk, source))
                actions.append(Action(Op.B, mb, chunk))
                if chunk > 0 and (target := peer(rank, chunk - 1)) is not None:
                    actions.append(Action(Op.SEND_B, mb, chunk, target))
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
             comm_cost: float = 0.0, weight_cost: Cost = 0.0,
             send_log: dict[Message, tuple[float, int, int]] | None = None) -> list[Slot]:
    """Run the action lists against each other: each rank executes its list in order; a
    receive waits for the matching send; compute takes its cost (a number, or a function of
    the chunk index: the planner charges the embedding and head to the first and last chunk);
    a message arrives ``comm_cost`` after its send. Under a split backward, ``backward_cost``
    is B's (input gradients) and ``weight_cost`` W's. Returns the compute slots; ``send_log``,
    when given, receives each message's (send time, sending rank, position in its list).

    This is gloo's model: a send never waits. NCCL's stricter one is ``pipeline.ordering``'s.

    Raises ScheduleError on a deadlock (a rank waits on a receive that is never sent).
    """
    pp = len(plans)
    position = [0] * pp
    clock = [0.0] * pp
    costs = {Op.F: forward_cost, Op.B: backward_cost, Op.W: weight_cost}
    sent: dict[Message, float] = {}  # -> arrival time
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
                    sent[message_of(action)] = clock[rank] + comm_cost
                    if send_log is not None:
                        send_log[message_of(action)] = (clock[rank], rank, position[rank])
                else:
                    key = message_of(action)
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
    schedule, peaks = Schedule(schedule), []
    for rank in range(pp):
        live = peak = 0
        for kind, _, _ in _compute_order(schedule, pp, microbatches, virtual_stages, rank, schedule.placement):
            live += {"F": 1, "B": -1, "W": 0}[kind]
            peak = max(peak, live)
        peaks.append(peak)
    return peaks


def analytic_bubble(schedule: str, pp: int, microbatches: int, virtual_stages: int = 1) -> float:
    """Idle fraction with equal forward and backward costs: (p-1)/(v m + p - 1); ZB-H1 with
    equal F, B and W: (p-1)/(3m + p - 1); ZB-V, each chunk's F, B and W equal:
    (p-1)/(6m + p - 1), exact for m >= 2p - 1 (with fewer micro-batches the V never fills)."""
    schedule = Schedule(schedule)
    if schedule is Schedule.ZBV:
        return (pp - 1) / (6 * microbatches + pp - 1)
    if schedule.splits_backward:
        return (pp - 1) / (3 * microbatches + pp - 1)
    return (pp - 1) / (virtual_stages * microbatches + pp - 1)  # gpipe over v chunks too


def analytic_bubble_formula(schedule: str, pp: int, microbatches: int, virtual_stages: int = 1) -> str:
    """``analytic_bubble``'s formula with the numbers in (for printing)."""
    schedule = Schedule(schedule)
    if schedule is Schedule.ZBV:
        note = "" if microbatches >= 2 * pp - 1 else f" (exact for m >= 2p-1 = {2 * pp - 1})"
        return f"(p-1)/(6m+p-1) = {pp - 1}/(6*{microbatches}+{pp - 1}){note}"
    if schedule.splits_backward:
        return f"(p-1)/(3m+p-1) = {pp - 1}/(3*{microbatches}+{pp - 1})"
    if virtual_stages > 1:  # interleaved, or gpipe over v chunks per rank
        return f"(p-1)/(v*m+p-1) = {pp - 1}/({virtual_stages}*{microbatches}+{pp - 1})"
    return f"(p-1)/(m+p-1) = {pp - 1}/({microbatches}+{pp - 1})"
