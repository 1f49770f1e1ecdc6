"""Replicated data parallelism (ZeRO-0): bucketed gradient all-reduce overlapped with backward.

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

``Replicated`` is the data-parallel strategy (``strategy.py``) around the buckets: one fused
torch AdamW over the rank's parameters (decay on matrices only), global-norm clipping that
counts every element once, and the state as checkpoint pieces.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from plait.checkpoint.pieces import KINDS, Piece
from plait.comm import Collectives
from plait.data_parallel.strategy import (DataParallelStrategy, ParameterSource, TiedWeights, clip_scale,
                                          describe_parameters, reduce_squares)
from plait.sharding import swap_parameter_data
from plait.tensor_parallel.plan import sum_partial_grads

DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024


@dataclass
class _Bucket:
    buffer: torch.Tensor
    params: list[nn.Parameter] = field(default_factory=list)
    pending: int = 0
    work: object | None = None
    launched: bool = False


class GradientBuckets:
    """Attach bucketed, overlapped gradient all-reduce over ``comm`` to ``params``."""

    def __init__(self, params: list[nn.Parameter], comm: Collectives, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        self.comm = comm
        self.sync = True
        params = [p for p in params if p.requires_grad]
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


class Replicated(DataParallelStrategy):
    """Every dp rank holds the whole (tp/pp-local) model, its gradients and AdamW state."""

    def __init__(self, model: nn.Module, named: list[tuple[str, nn.Parameter]], dp: Collectives, tp: Collectives,
                 pp: Collectives, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 device: torch.device, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 tied: TiedWeights | None = None) -> None:
        self.model, self.dp, self.tp, self.pp, self.tied = model, dp, tp, pp, tied
        self.infos = describe_parameters(named, tied)
        self.device = device
        self.hyper = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.bucket_bytes = bucket_bytes
        self.optimizer: torch.optim.AdamW | None = None
        self.buckets: GradientBuckets | None = None

    def load_parameters(self, source: ParameterSource) -> None:
        """Materialise each parameter as this rank's tp part, read from ``source``."""
        for info in self.infos:
            values = source.read(info.name, info.shard, info.full_shape).view(info.param.shape)
            swap_parameter_data(info.param, values.to(self.device, torch.float32).clone())
        params = [info.param for info in self.infos]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        hyper = self.hyper
        # fused: one kernel over all tensors, ~6x faster than foreach on this CPU (and the CUDA path)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hyper["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hyper["lr"], betas=hyper["betas"], eps=hyper["eps"], fused=True)
        if self.dp.size > 1:
            self.buckets = GradientBuckets(params, self.dp, self.bucket_bytes)

    def communicate_in_backward(self, enabled: bool) -> None:
        if self.buckets is not None:
            self.buckets.sync = enabled

    def finish(self) -> None:
        if self.buckets is not None:
            self.buckets.finish()
        sum_partial_grads([i.param.grad for i in self.infos if i.shard.partial_grad and i.param.grad is not None],
                          self.tp)
        if self.tied is not None and self.tied.param.grad is not None:
            self.tied.sum_between_stages(self.tied.param.grad)

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip to the global L2 norm; returns the norm before clipping. Elements every tp rank
        holds count on tp rank 0, a tied weight on the first stage; dp replicas are identical."""
        grads = [i.param.grad for i in self.infos if i.param.grad is not None]
        if not grads:
            return 0.0
        counted = [i.param.grad for i in self.infos if i.counted and i.param.grad is not None]
        squares = torch.zeros((), dtype=torch.float64, device=grads[0].device)
        if counted:
            # one foreach call: on CUDA one kernel for every tensor, not one launch each
            squares = torch.stack(torch._foreach_norm(counted, 2, dtype=torch.float32)).double().square().sum()
        norm = reduce_squares(squares, self.tp, self.pp).sqrt()
        if max_norm > 0:
            torch._foreach_mul_(grads, clip_scale(norm, max_norm).to(grads[0].dtype))
        return float(norm)

    def step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()

    def zero_grad(self) -> None:
        if self.buckets is not None:
            self.buckets.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def state_pieces(self) -> list[tuple[Piece, torch.Tensor]]:
        if self.dp.rank != 0:
            return []
        pieces = []
        for info in self.infos:
            if not info.counted:
                continue
            state = self.optimizer.state.get(info.param, {})
            sources = {"param": info.param.detach(), **{k: state[k] for k in KINDS[1:] if k in state}}
            for kind, tensor in sources.items():
                piece = Piece.of(info.name, kind, info.shard, tuple(info.param.shape), 0, info.param.numel())
                pieces.append((piece, tensor.detach().float().reshape(-1).cpu().clone()))
        return pieces

    @torch.no_grad()
    def load_state(self, source: ParameterSource, step: int) -> None:
        moments = step > 0 and source.has("exp_avg")
        step_tensor = torch.tensor(float(step), dtype=torch.float32)
        for info in self.infos:
            def read(kind: str) -> torch.Tensor:
                values = source.read(info.name, info.shard, info.full_shape, kind)
                return values.view(info.param.shape).to(info.param.device, torch.float32)
            info.param.copy_(read("param"))
            if moments:  # one step tensor per parameter: the fused kernel increments each
                self.optimizer.state[info.param] = {"step": step_tensor.to(info.param.device).clone(),
                                                    "exp_avg": read("exp_avg").clone(),
                                                    "exp_avg_sq": read("exp_avg_sq").clone()}

    def state_bytes(self) -> dict[str, int]:
        def size(tensors) -> int:
            return sum(t.untyped_storage().nbytes() for t in tensors if isinstance(t, torch.Tensor) and t.dim() > 0)
        params = size(i.param for i in self.infos)
        grads = size(b.buffer for b in self.buckets.buckets) if self.buckets is not None else \
            size(i.param.grad for i in self.infos if i.param.grad is not None)
        optimizer = size(v for state in self.optimizer.state.values() for v in state.values())
        return {"params": params, "grads": grads, "optimizer": optimizer}
