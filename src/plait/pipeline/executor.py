"""Runs a schedule's action list on one pipeline rank with point-to-point sends and receives.

Sends are asynchronous (their buffers are kept until the step ends); a receive is waited on
where the list has it. Because every rank's list is a valid order of the same dependency graph
(``schedules.simulate`` checks it), a rank only ever waits for a send its peer reaches without
waiting on it: no deadlock on gloo, whose sends never wait. NCCL's sends wait for their
receives, and a pair of ranks runs its messages in the order they were issued, so some
receives are posted earlier than they are waited on (``ordering.receive_posts``): then both
ends of each pair issue their messages in one order (``ordering.check_rendezvous`` proves it
for every schedule), and NCCL, which ignores tags, matches each message with the right
receive. Under gloo each message's tag names its boundary and micro-batch as well.
Neighbouring chunks on one rank (ZB-V's turn of the V) exchange no message: the next chunk's
forward takes the previous chunk's output, detached as a received tensor would be, and its
backward leaves the input gradient where the previous chunk's backward looks for it.

Loss: the last chunk returns a token-loss *sum*; its backward seeds ``1 / N`` with N the
global number of target tokens in the step, so micro-batching and pipelining leave the
gradient of the step's loss unchanged.

Split backward (zero-bubble schedules): B runs the chunk's backward while ``weight_gradients``
defers the linear layers' weight products, W computes them (``plait.pipeline.weight_grad``).
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch
from torch import nn

from plait.comm import Collectives
from plait.pipeline.ordering import ReceivePosts
from plait.pipeline.schedules import Action, Message, Op, message_of
from plait.pipeline.stage import PipelineChunk, chunk_forward
from plait.pipeline.weight_grad import DeferredWeightGradients


def message_tag(message: Message, microbatches: int) -> int:
    """Tag of a message (the same at both ends): its boundary between chunks b and b + 1, its
    micro-batch and direction."""
    direction, microbatch, sender = message
    boundary = sender if direction == Op.F else sender - 1
    return ((boundary * microbatches + microbatch) << 1) | (direction == Op.B)


class PipelineExecutor:
    def __init__(self, model: nn.Module, chunks: list[PipelineChunk], plan: list[Action], pp: Collectives,
                 microbatches: int, seq_len: int, activation_shape: tuple[int, ...],
                 activation_dtype: Callable[[], torch.dtype],
                 loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
                 forward_context: Callable[[], contextlib.AbstractContextManager],
                 weight_gradients: DeferredWeightGradients | None = None,
                 receive_posts: ReceivePosts | None = None) -> None:
        self.model, self.pp, self.plan = model, pp, plan
        self.receive_posts = receive_posts or {}
        self.weight_gradients = weight_gradients
        self.chunks = {chunk.index: chunk for chunk in chunks}
        self.microbatches, self.seq_len = microbatches, seq_len
        self.activation_shape = activation_shape
        self.activation_dtype = activation_dtype
        self.loss_fn = loss_fn
        self.forward_context = forward_context
        self.events: list[tuple[str, int, int, float, float]] = []  # last run: (kind, mb, chunk, start, end)

    def _empty_activation(self, device: torch.device) -> torch.Tensor:
        return torch.empty(self.activation_shape, dtype=self.activation_dtype(), device=device)

    def run(self, inputs: list[torch.Tensor], targets: list[torch.Tensor], n_targets: int,
            forward_only: bool = False) -> float:
        """One step (or, ``forward_only``, one evaluation) of the schedule; returns this rank's
        token-loss sum (non-zero on the rank holding the last chunk only)."""
        device = inputs[0].device
        m = self.microbatches
        received: dict[tuple[int, int], torch.Tensor] = {}   # inputs of (mb, chunk) from the previous chunk
        outputs: dict[tuple[int, int], torch.Tensor] = {}    # outputs (or scaled losses) of (mb, chunk)
        grads: dict[tuple[int, int], torch.Tensor] = {}      # gradients of the outputs, from the next chunk
        input_grads: dict[tuple[int, int], torch.Tensor] = {}
        pending_sends: list = []
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.events = []
        origin = time.perf_counter()
        posted: dict = {}  # message -> (buffer, handle) of the receives posted before their wait

        def post(receive: Action) -> None:
            buffer = self._empty_activation(device)
            message = message_of(receive)
            posted[message] = buffer, self.pp.post_recv(buffer, receive.peer, message_tag(message, m))

        def wait_for(receive: Action) -> torch.Tensor:
            if message_of(receive) not in posted:
                post(receive)
            buffer, handle = posted.pop(message_of(receive))
            handle.wait()
            return buffer

        for position, action in enumerate(self.plan):
            for receive in self.receive_posts.get(position, []):
                if not (forward_only and receive.kind == Op.RECV_B):
                    post(receive)
            started = time.perf_counter()
            key = (action.microbatch, action.chunk)
            chunk = self.chunks.get(action.chunk)
            if forward_only and action.kind in (Op.B, Op.W, Op.RECV_B, Op.SEND_B):
                continue
            if action.kind == Op.RECV_F:
                received[key] = wait_for(action).requires_grad_(not forward_only)
            elif action.kind == Op.F:
                previous = (action.microbatch, action.chunk - 1)
                if not chunk.is_first and previous[1] in self.chunks:  # local hand-off, no message
                    handed = outputs[previous] if forward_only else outputs[previous].detach()
                    received[key] = handed if forward_only else handed.requires_grad_()
                    if forward_only:
                        outputs.pop(previous)
                x = inputs[action.microbatch] if chunk.is_first else \
                    (received.pop(key) if forward_only else received[key])
                with self.forward_context():
                    out = chunk_forward(self.model, chunk, x, self.seq_len)
                    if chunk.is_last:
                        loss = self.loss_fn(self.model, out, targets[action.microbatch])
                if chunk.is_last:
                    loss_sum += loss.detach()
                    out = loss / n_targets
                if not forward_only or not chunk.is_last:
                    outputs[key] = out
                self.events.append(("F", action.microbatch, action.chunk, started - origin,
                                    time.perf_counter() - origin))
            elif action.kind == Op.SEND_F:
                tensor = outputs[key] if forward_only else outputs[key].detach()
                if forward_only:
                    outputs.pop(key)
                pending_sends.append((self.pp.send(tensor.contiguous(), action.peer,
                                                   message_tag(message_of(action), m)), tensor))
            elif action.kind == Op.RECV_B:
                grads[key] = wait_for(action)
            elif action.kind == Op.B:
                out = outputs.pop(key)
                deferring = self.weight_gradients.deferring(key) if self.weight_gradients is not None \
                    else contextlib.nullcontext()
                with deferring:
                    if chunk.is_last:
                        out.backward()
                    else:
                        out.backward(grads.pop(key))
                if not chunk.is_first:
                    grad = received.pop(key).grad
                    if action.chunk - 1 in self.chunks:  # the local previous chunk's output gradient
                        grads[(action.microbatch, action.chunk - 1)] = grad
                    else:
                        input_grads[key] = grad
                self.events.append(("B", action.microbatch, action.chunk, started - origin,
                                    time.perf_counter() - origin))
            elif action.kind == Op.W:
                self.weight_gradients.apply(key)
                self.events.append(("W", action.microbatch, action.chunk, started - origin,
                                    time.perf_counter() - origin))
            elif action.kind == Op.SEND_B:
                tensor = input_grads.pop(key).contiguous()
                pending_sends.append((self.pp.send(tensor, action.peer,
                                                   message_tag(message_of(action), m)), tensor))
        for work, _ in pending_sends:
            work.wait()
        return float(loss_sum)
