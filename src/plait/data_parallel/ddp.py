"""Data parallelism (ZeRO-0): bucketed gradient all-reduce overlapped with backward.

Every dp rank holds the whole model and computes gradients on its slice of the global batch.
The loss each rank differentiates is already divided by the *global* number of target tokens
of the step, so the gradient of the global loss is the plain **sum** of the ranks' gradients:

    dL/dw = sum_r  d(loss_sum_r / N_global)/dw

(the same number as "averaging" per-rank means when every rank has the same token count, and
still exact when they do not).

Gradients live in flat per-bucket buffers: each parameter's ``.grad`` is a view into its
bucket, so autograd accumulates straight into the buffer and no copy is needed. Buckets are
filled in reverse registration order, roughly the order backward produces gradients. A hook
after each parameter's gradient accumulation counts it; when a bucket is complete its
all-reduce is launched asynchronously (in bucket order, so every rank issues the same
sequence of collectives) and the rest of backward runs while it is in flight.
``finish()`` launches what is left and waits before the optimizer step.

During gradient accumulation, only the last micro-batch's backward communicates
(``sync=False`` for the others).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from plait.comm import Collectives

DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024


@dataclass
class _Bucket:
    buffer: torch.Tensor
    params: list[nn.Parameter] = field(default_factory=list)
    pending: int = 0
    work: object | None = None
    launched: bool = False


class DataParallel:
    """Attach bucketed, overlapped gradient all-reduce over ``comm`` to ``model``'s parameters."""

    def __init__(self, model: nn.Module, comm: Collectives, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        self.comm = comm
        self.sync = True
        params = [p for p in model.parameters() if p.requires_grad]
        self.buckets = self._make_buckets(list(reversed(params)), bucket_bytes)
        self._bucket_of: dict[nn.Parameter, int] = {}
        for index, bucket in enumerate(self.buckets):
            for param in bucket.params:
                self._bucket_of[param] = index
        self._next_to_launch = 0
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in params]
        self._reset_counts()

    @staticmethod
    def _make_buckets(params: list[nn.Parameter], bucket_bytes: int) -> list[_Bucket]:
        groups: list[list[nn.Parameter]] = []
        current: list[nn.Parameter] = []
        current_bytes = 0
        for param in params:
            if current and (current_bytes + param.numel() * param.element_size() > bucket_bytes
                            or param.dtype != current[0].dtype or param.device != current[0].device):
                groups.append(current)
                current, current_bytes = [], 0
            current.append(param)
            current_bytes += param.numel() * param.element_size()
        if current:
            groups.append(current)
        buckets = []
        for group in groups:
            buffer = torch.zeros(sum(p.numel() for p in group), dtype=group[0].dtype, device=group[0].device)
            offset = 0
            for param in group:
                param.grad = buffer[offset:offset + param.numel()].view_as(param)
                offset += param.numel()
            buckets.append(_Bucket(buffer=buffer, params=group))
        return buckets

    def _reset_counts(self) -> None:
        for bucket in self.buckets:
            bucket.pending = len(bucket.params)
            bucket.work = None
            bucket.launched = False
        self._next_to_launch = 0

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        if not self.sync or self.comm.size == 1:
            return
        bucket = self.buckets[self._bucket_of[param]]
        bucket.pending -= 1
        # Launch complete buckets strictly in order: all ranks must issue identical sequences.
        while self._next_to_launch < len(self.buckets) and self.buckets[self._next_to_launch].pending == 0:
            self._launch(self.buckets[self._next_to_launch])
            self._next_to_launch += 1

    def _launch(self, bucket: _Bucket) -> None:
        bucket.work = self.comm.all_reduce(bucket.buffer, tag="grads", async_op=True)
        bucket.launched = True

    def finish(self) -> None:
        """Launch buckets whose parameters got no gradient this step, then wait for all."""
        if self.comm.size == 1:
            return
        for bucket in self.buckets:
            if not bucket.launched:
                self._launch(bucket)
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
        self._reset_counts()

    def zero_grad(self) -> None:
        """Zero the bucket buffers in place (never ``set_to_none``: ``.grad`` views the buffers)."""
        for bucket in self.buckets:
            bucket.buffer.zero_()

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
