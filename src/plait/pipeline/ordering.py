"""The order of the messages between two pipeline ranks, as NCCL needs it.

gloo buffers a send: it never waits for the receiver, so every set of action lists that
``schedules.simulate`` runs to completion also runs on gloo. NCCL is stricter. torch gives each
pair of ranks one communicator with one CUDA stream for both directions, so a pair's sends and
receives run one after the other in the order they were issued; and a send larger than NCCL's
buffer (a few MB: any real activation) waits until the receiver's matching receive runs. If
rank a issues [send x, recv y] while rank b issues [send y, recv x], both sends wait forever
(NVIDIA/nccl#479). **Both ends of a pair must issue their messages in the same order.**

The schedules as built do not: under 1F1B with p = 2, rank 0 sends F0, F1 and then receives
B0, while rank 1 receives F0, sends B0 and only then receives F1. The fix keeps every rank's
compute order and moves nothing but receive *posts*: a receive can be posted (``irecv``) early,
and the compute that needs its tensor still waits where it did.

1. ``simulate`` the schedule (gloo's model) and order each pair's messages by the time they
   are sent: the order in which they actually flow.
2. Walk each rank's list: before a send or a receive to peer q, post every message of the pair's
   order before it that is one of our receives and not yet posted (``receive_posts``).

Only receives ever move, and only earlier: a rank's own sends already come in the pair's order.
If rank a's list puts its send of y after its receive of x, y is sent after x arrived, so x
precedes y in the pair's order; sends of equal time are ordered by rank, then list position.

``check_rendezvous`` proves the result under NCCL's model. Each rank has a compute stream and
one stream per peer. Compute runs in list order, and the compute after a receive's wait needs
that receive done. A message on a pair stream needs the compute issued before it (NCCL's
stream waits on the current one), and it completes only when it heads both ends' streams, as a
send at one end and a receive at the other. The tests run every schedule through it, and show
it catches 1F1B without the early posts.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from plait.pipeline.schedules import Action, Message, Op, ScheduleError, message_of, simulate

ReceivePosts = dict[int, list[Action]]  # position in a rank's list -> receives to post just before it


def pair_orders(plans: list[list[Action]]) -> dict[frozenset[int], list[Message]]:
    """Every pair of ranks' messages, in the order they are sent in the simulated step."""
    sends: dict[Message, tuple[float, int, int]] = {}
    # any positive costs give a valid order; a message takes time so that a send after a
    # receive is strictly later than the received message's send
    simulate(plans, forward_cost=1.0, backward_cost=2.0, comm_cost=0.5, weight_cost=1.0, send_log=sends)
    peer_of = {message_of(action): action.peer for plan in plans for action in plan if action.kind.is_send}
    orders: dict[frozenset[int], list[Message]] = defaultdict(list)
    for message, (_, rank, _) in sorted(sends.items(), key=lambda item: item[1]):
        orders[frozenset((rank, peer_of[message]))].append(message)
    return dict(orders)


def receive_posts(plans: list[list[Action]]) -> list[ReceivePosts]:
    """For every rank, the receives it posts before an action so that both ends of each pair
    issue their messages in the pair's order (a receive not listed is posted where it is waited on)."""
    orders = pair_orders(plans)
    posts: list[ReceivePosts] = []
    for rank, plan in enumerate(plans):
        receives = {message_of(action): action for action in plan
                    if action.kind in (Op.RECV_F, Op.RECV_B)}
        issued: set[Message] = set()
        cursor: dict[int, int] = defaultdict(int)  # per peer: the pair's messages before it are issued
        mine: ReceivePosts = {}
        for position, action in enumerate(plan):
            if action.kind.is_compute:
                continue
            message = message_of(action)
            if message in issued:  # a receive posted early: waited on here
                continue
            order = orders[frozenset((rank, action.peer))]
            while order[cursor[action.peer]] != message:
                earlier = order[cursor[action.peer]]
                if earlier not in issued:
                    if earlier not in receives:  # cannot happen for a list simulate ran (see above)
                        raise ScheduleError(f"rank {rank}: the message order with rank {action.peer} needs "
                                            f"{earlier} sent before {action}")
                    mine.setdefault(position, []).append(receives[earlier])
                    issued.add(earlier)
                cursor[action.peer] += 1
            issued.add(message)
            cursor[action.peer] += 1
            while cursor[action.peer] < len(order) and order[cursor[action.peer]] in issued:
                cursor[action.peer] += 1
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


def check_rendezvous(plans: list[list[Action]], posts: list[ReceivePosts]) -> None:
    """Raise ScheduleError unless the lists, posting receives as ``posts`` says, complete under
    NCCL's model (see the module docstring): every send waits for its receive."""
    pp = len(plans)
    compute: list[list[_Issued]] = [[] for _ in range(pp)]
    streams: list[dict[int, list[_Issued]]] = [defaultdict(list) for _ in range(pp)]
    for rank in range(pp):
        for item in issue_order(plans[rank], posts[rank]):
            (compute[rank] if item.what in ("compute", "wait") else streams[rank][item.action.peer]).append(item)
    computed = [0] * pp                                      # compute-stream items done, per rank
    done = [defaultdict(int) for _ in range(pp)]             # per rank and peer: pair items done
    received: list[set[Message]] = [set() for _ in range(pp)]

    def head(rank: int, peer: int) -> _Issued | None:
        stream = streams[rank][peer]
        return stream[done[rank][peer]] if done[rank][peer] < len(stream) else None

    pairs = {frozenset((rank, peer)) for rank in range(pp) for peer in streams[rank]}
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
        for a, b in (sorted(pair) for pair in pairs):
            ends = head(a, b), head(b, a)
            if None in ends or ends[0].message != ends[1].message or ends[0].what == ends[1].what:
                continue
            if computed[a] < ends[0].after_compute or computed[b] < ends[1].after_compute:
                continue
            for rank, peer, item in ((a, b, ends[0]), (b, a, ends[1])):
                done[rank][peer] += 1
                if item.what == "post":
                    received[rank].add(item.message)
            progressed = True
    stuck = [f"rank {rank} at {compute[rank][computed[rank]].action}" for rank in range(pp)
             if computed[rank] < len(compute[rank])]
    stuck += [f"rank {rank} {item.what} {item.action} to rank {peer}" for rank in range(pp)
              for peer in streams[rank] if (item := head(rank, peer)) is not None]
    if stuck:
        raise ScheduleError(f"under NCCL's ordering the schedule deadlocks: {'; '.join(stuck)}")
