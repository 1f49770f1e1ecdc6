"""Deferred weight gradients: zero-bubble's split of a backward into B and W.

For a linear layer Y = X A^T the backward is two products: dX = dY A (B: the gradient the
previous chunk waits for) and dA = dY^T X (W: needed only by the optimizer step). Under a
split-backward schedule each linear layer of the rank's blocks runs through
``DeferrableLinear``: while ``DeferredWeightGradients.deferring(key)`` is active (the executor's
B of micro-batch/chunk ``key``), its backward computes dX and the bias gradient and queues
(A, X, dY); the executor's W of ``key`` then computes each dA and accumulates it into A.grad
through autograd (``A.backward(dA)``), so the data-parallel strategy's gradient hooks fire
exactly as for an undeferred backward. Outside ``deferring`` (evaluation, other schedules)
the layers compute both products at once.

What W keeps alive between B and W is X and dY of every deferred product: the price of moving
W into the bubbles. Norm weights, the embedding and the head keep their gradients in B (the
head's is fused with the loss), so W is the blocks' matmul weights: about half of a block's
backward FLOPs.

The layers cast their weights to the compute dtype themselves (autocast's cache does not see
these casts); within ``casting_once`` (the trainer's step) each weight is cast once and the
copy shared by every micro-batch, as autocast's cache does for ``nn.Linear``.
"""
from __future__ import annotations

import contextlib
from typing import Hashable, Iterator

import torch
import torch.nn.functional as F
from torch import nn



def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer computes in: autocast's, else the input's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class DeferredWeightGradients:
    """The weight-gradient products of each B, queued until its W."""

    def __init__(self) -> None:
        self._collecting: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] | None = None
        self._pending: dict[Hashable, list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]]] = {}
        self._casts: dict[tuple[int, torch.dtype], torch.Tensor] | None = None

    @contextlib.contextmanager
    def casting_once(self) -> Iterator[None]:
        """Within: each weight is cast to a dtype once and the copy shared (``cast``); the
        weights must not change meanwhile (one step's forwards and backwards)."""
        self._casts = {}
        try:
            yield
        finally:
            self._casts = None

    def cast(self, weight: nn.Parameter, dtype: torch.dtype) -> torch.Tensor:
        """``weight`` in ``dtype``: within ``casting_once`` the step's one copy, else a fresh one."""
        if self._casts is None or weight.dtype == dtype:
            return weight.to(dtype)
        key = (id(weight), dtype)
        if key not in self._casts:
            self._casts[key] = weight.to(dtype)
        return self._casts[key]

    @contextlib.contextmanager
    def deferring(self, key: Hashable) -> Iterator[None]:
        """Within: linear layers queue their dA under ``key`` instead of computing it."""
        self._collecting = []
        try:
            yield
        finally:
            self._pending[key] = self._collecting
            self._collecting = None

    def defer(self, weight: nn.Parameter, x: torch.Tensor, grad_y: torch.Tensor) -> bool:
        """Queue dA = grad_y^T x for ``weight``; False (compute it now) when not deferring."""
        if self._collecting is None:
            return False
        self._collecting.append((weight, x, grad_y))
        return True

    def apply(self, key: Hashable) -> None:
        """W of ``key``: every queued dA, accumulated into its weight's ``.grad``."""
        for weight, x, grad_y in self._pending.pop(key):
            grad_2d = grad_y.reshape(-1, grad_y.shape[-1])
            grad_w = grad_2d.t() @ x.reshape(-1, x.shape[-1])
            weight.backward(grad_w.to(weight.dtype))

    @property
    def pending(self) -> int:
        return len(self._pending)


def save_linear(ctx, x: torch.Tensor, weight: nn.Parameter, bias: torch.Tensor | None,
                store: DeferredWeightGradients | None) -> torch.Tensor:
    """Y = X W^T (+ b) in the compute dtype, keeping on ``ctx`` what ``linear_grads`` needs."""
    dtype = compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        x_c = x.to(dtype)
        w_c = store.cast(weight, dtype) if store is not None else weight.to(dtype)
        y = F.linear(x_c, w_c, bias.to(dtype) if bias is not None else None)
    ctx.save_for_backward(x_c, w_c)
    ctx.weight, ctx.weight_gradients, ctx.has_bias = weight, store, bias is not None
    ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None)
    return y


def saved_linear(ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """(X, W) in the compute dtype, as ``save_linear`` kept them. Read once per backward:
    under recomputation a saved tensor may be unpacked only once."""
    return ctx.saved_tensors


def input_grad(ctx, saved: tuple[torch.Tensor, torch.Tensor], grad_y: torch.Tensor) -> torch.Tensor:
    """dX = dY W of a ``save_linear`` (B's part, on the critical path)."""
    _, w_c = saved
    return (grad_y.to(w_c.dtype) @ w_c).to(ctx.dtypes[0]).contiguous()


def weight_and_bias_grads(ctx, saved: tuple[torch.Tensor, torch.Tensor],
                          grad_y: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dW, db) of a ``save_linear``; dW is None when the store defers it to W."""
    x_c, w_c = saved
    _, w_dtype, b_dtype = ctx.dtypes
    grad_y = grad_y.to(w_c.dtype)
    grad_2d = grad_y.reshape(-1, grad_y.shape[-1])
    grad_b = grad_2d.sum(0).to(b_dtype) if ctx.has_bias else None
    grad_w = None
    store = ctx.weight_gradients
    if ctx.needs_input_grad[1] and (store is None or not store.defer(ctx.weight, x_c, grad_y)):
        grad_w = (grad_2d.t() @ x_c.reshape(-1, x_c.shape[-1])).to(w_dtype)
    return grad_w, grad_b


class RoutesWeightGradients:
    """A linear layer that computes through ``DeferrableLinear`` itself (the tensor-parallel ones,
    whose backward also communicates): a split-backward schedule hands it the store in
    ``weight_gradients`` rather than patching its forward (``pipeline.stage.defer_weight_gradients``)."""

    weight_gradients: DeferredWeightGradients | None = None  # None: dA computed with dX, as usual


class DeferrableLinear(torch.autograd.Function):
    """Y = X A^T (+ b) whose dA may be deferred to ``store``'s W (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: nn.Parameter, bias: torch.Tensor | None,
                store: DeferredWeightGradients) -> torch.Tensor:
        return save_linear(ctx, x, weight, bias, store)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        saved = saved_linear(ctx)
        return (input_grad(ctx, saved, grad_y), *weight_and_bias_grads(ctx, saved, grad_y), None)
