"""The order in which pipeline ranks issue their messages, as NCCL needs it.

gloo buffers a send: it never waits for the receiver, so every set of action lists that
``schedules.simulate`` runs to completion also runs on gloo. NCCL is stricter. torch runs a
pair of ranks' unbatched sends and receives on one CUDA stream, in the order they were issued
(one communicator per pair; torch releases that eagerly initialise a group may use the group's
own communicator, one stream for all of a rank's peers), and a send larger than NCCL's buffer
(a few MB: any real activation) waits until the receiver's matching receive runs. If rank a
issues [send x, recv y] while rank b issues [send y, recv x], both sends wait forever
(NVIDIA/nccl#479).

The schedules as built break this: under 1F1B with p = 2, rank 0 sends F0, F1 and then
receives B0, while rank 1 receives F0, sends B0 and only then receives F1. The fix keeps every
rank's compute order and moves nothing but receive *posts*: a receive can be posted (``irecv``)
early, and the compute that needs its tensor still waits where it did.

1. ``simulate`` the schedule (gloo's model) and order all the step's messages by the time they
   are sent: the order in which they actually flow (``message_order``).
2. Each rank issues its own messages in that order: before a send or a receive, it posts every
   earlier message of the order that is one of its receives and not yet posted (``receive_posts``).

Only receives ever move, and only earlier: a rank's own sends already come in that order. If a
rank's list puts its send of y after its receive of x, y is sent after x arrived, so x precedes
y; sends of equal time are ordered by rank, then list position. With every rank following one
global order, both models of the streams are safe: the first message not yet done heads its
sender's and its receiver's streams, whether a stream serves one peer or all of them, and the
compute its send waits for needs only messages before it. At most 3 receive buffers are
outstanding on any rank (ZB-V, p = 8).

``check_rendezvous`` proves it under NCCL's model. Each rank has a compute stream and one
stream per peer (or, ``shared_stream``, one for all peers). Compute runs in list order, and the
compute after a receive's wait needs that receive done. A message needs the compute issued
before it (NCCL's stream waits on the current one), and it completes only when it heads both
ends' streams, as a send at one end and a receive at the other. The tests run every schedule
through both models, and show them catching 1F1B without the early posts.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from plait.pipeline.schedules import Action, Message, Op, ScheduleError, message_of, simulate

ReceivePosts = dict[int, list[Action]]  # position in a rank's list -> receives to post just before it


def message_order(plans: list[list[Action]]) -> list[Message]:
    """Every message of the step, in the order it is sent in the simulated step."""
    sends: dict[Message, tuple[float, int, int]] = {}
    # any positive costs give a valid order; a message takes time so that a send after a
    # receive is strictly later than the received message's send
    simulate(plans, forward_cost=1.0, backward_cost=2.0, comm_cost=0.5, weight_cost=1.0, send_log=sends)
    return [message for message, _ in sorted(sends.items(), key=lambda item: item[1])]


def receive_posts(plans: list[list[Action]]) -> list[ReceivePosts]:
    """For every rank, the receives it posts before an action so that it issues its messages in
    the step's order (a receive not listed is posted where it is waited on)."""
    order = message_order(plans)
    posts: list[ReceivePosts] = []
    for rank, plan in enumerate(plans):
        receives = {message_of(action): action for action in plan if action.kind in (Op.RECV_F, Op.RECV_B)}
        involved = {message_of(action) for action in plan if not action.kind.is_compute}
        mine_in_order = [message for message in order if message in involved]
        issued: set[Message] = set()
        cursor = 0  # the rank's messages before it are issued
        mine: ReceivePosts = {}
        for position, action in enumerate(plan):
            if action.kind.is_compute:
                continue
            message = message_of(action)
            if message in issued:  # a receive posted early: waited on here
                continue
            while mine_in_order[cursor] != message:
                earlier = mine_in_order[cursor]
                if earlier not in issued:
                    if earlier not in receives:  # cannot happen for a list simulate ran (see above)
                        raise ScheduleError(f"rank {rank}: the message order needs {earlier} sent before {action}")
                    mine.setdefault(position, []).append(receives[earlier])
                    issued.add(earlier)
                cursor += 1
            issued.add(message)
            while cursor < len(mine_in_order) and mine_in_order[cursor] in issued:
                cursor += 1
        posts.append(mine)
    return posts


@dataclass(frozen=True)
class _Issued:
    what: str                # "compute", "wait" (compute stream), "send" or "post" (a pair's stream)
    action: Action
    message: Message | None = None
    after_compute: int = 0   # compute-stream items issued before it (a pair item waits for them)


def issue_order(plan: list[Action], posts: ReceivePosts) -> list[_Issued]:
    """What one rank's host issues, in order: the executor's sequence of calls."""
    items: list[_Issued] = []
    posted: set[Message] = set()
    computed = 0

    def post(receive: Action) -> None:
        posted.add(message_of(receive))
        items.append(_Issued("post", receive, message_of(receive), computed))

    for position, action in enumerate(plan):
        for receive in posts.get(position, []):
            post(receive)
        if action.kind.is_compute:
            items.append(_Issued("compute", action))
            computed += 1
        elif action.kind.is_send:
            items.append(_Issued("send", action, message_of(action), computed))
        else:
            if message_of(action) not in posted:
                post(action)
            items.append(_Issued("wait", action, message_of(action)))
            computed += 1
    return items


def check_rendezvous(plans: list[list[Action]], posts: list[ReceivePosts], shared_stream: bool = False) -> None:
    """Raise ScheduleError unless the lists, posting receives as ``posts`` says, complete under
    NCCL's model (see the module docstring): every send waits for its receive. Each pair of
    ranks has its own stream, or with ``shared_stream`` each rank one stream for all its peers."""
    pp = len(plans)
    compute: list[list[_Issued]] = [[] for _ in range(pp)]
    streams: list[dict[int | None, list[_Issued]]] = [defaultdict(list) for _ in range(pp)]

    def stream_of(peer: int) -> int | None:
        return None if shared_stream else peer

    for rank in range(pp):
        for item in issue_order(plans[rank], posts[rank]):
            if item.what in ("compute", "wait"):
                compute[rank].append(item)
            else:
                streams[rank][stream_of(item.action.peer)].append(item)
    computed = [0] * pp                                      # compute-stream items done, per rank
    done = [defaultdict(int) for _ in range(pp)]             # per rank and stream: items done
    received: list[set[Message]] = [set() for _ in range(pp)]

    def head(rank: int, stream: int | None) -> _Issued | None:
        items = streams[rank][stream]
        return items[done[rank][stream]] if done[rank][stream] < len(items) else None

    progressed = True
    while progressed:
        progressed = False
        for rank in range(pp):
            while computed[rank] < len(compute[rank]):
                item = compute[rank][computed[rank]]
                if item.what == "wait" and item.message not in received[rank]:
                    break
                computed[rank] += 1
                progressed = True
        for a in range(pp):
            for stream in list(streams[a]):
                mine = head(a, stream)
                if mine is None or mine.action.peer < a:  # each pair looked at once, from its lower rank
                    continue
                b = mine.action.peer
                theirs = head(b, stream_of(a))
                if theirs is None or theirs.message != mine.message or theirs.what == mine.what:
                    continue
                if computed[a] < mine.after_compute or computed[b] < theirs.after_compute:
                    continue
                for rank, item in ((a, mine), (b, theirs)):
                    done[rank][stream_of(item.action.peer)] += 1
                    if item.what == "post":
                        received[rank].add(item.message)
                progressed = True
    stuck = [f"rank {rank} at {compute[rank][computed[rank]].action}" for rank in range(pp)
             if computed[rank] < len(compute[rank])]
    stuck += [f"rank {rank} {item.what} {item.action} to rank {item.action.peer}" for rank in range(pp)
              for stream in streams[rank] if (item := head(rank, stream)) is not None]
    if stuck:
        raise ScheduleError(f"under NCCL's ordering the schedule deadlocks: {'; '.join(stuck)}")
