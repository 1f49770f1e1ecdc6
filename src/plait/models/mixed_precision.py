"""One autocast cast of an input that several matmuls share.

Under autocast over fp32 parameters the residual stream is fp32, and so is each RMSNorm's
output x. Three matmuls read the first norm's output (q, k, v) and two the second's (gate, up).
Autocast casts a matmul's input when the matmul runs and caches only casts of leaf tensors,
so each of the n consumers casts x to bf16 on its own:

    forward:   n casts (read 4 + write 2 bytes an element each), n bf16 copies kept for backward
    backward:  n casts of the consumers' bf16 gradients g_i to fp32, n - 1 fp32 sums

``shared_input(x, n)`` casts once and hands each consumer its own alias of the one bf16 copy:

    forward:   y = bf16(x), the same rounding of the same values: the consumers see the same bits
    backward:  dL/dx = sum_i fp32(g_i), accumulated in fp32 as autograd sums the n fp32 casts

(``transformers``' Llama runs the n casts; the two agree to the bit forward, and backward up to
the order of an fp32 sum.) One bf16 copy is kept instead of n, 3 fewer [tokens, h] bf16
tensors a layer (``planner.memory``), and a layer moves about 6 fewer passes of [tokens, h]
forward. Letting autograd sum the aliases' gradients instead would add them in bf16; the
custom backward keeps the fp32 sum.
"""
from __future__ import annotations

import torch


class _CastOnce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dtype: torch.dtype, uses: int) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)
        ctx.input_dtype = x.dtype
        cast = x.to(dtype)
        # distinct output tensors (views of the one cast), so each consumer's gradient arrives apart
        return (cast, *(cast.view_as(cast) for _ in range(uses - 1)))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, None, None]:
        total = None
        for grad in grads:
            if grad is None:
                continue
            if total is None:
                total = grad.to(ctx.input_dtype, copy=True)
            else:
                total.add_(grad)  # promoted to fp32 inside the kernel: one pass, no bf16 sum
        return total, None, None


def shared_input(x: torch.Tensor, uses: int) -> tuple[torch.Tensor, ...]:
    """``uses`` inputs for the matmuls that read ``x``: under autocast, when x is wider than the
    autocast dtype, one cast shared by all (module docstring); otherwise x itself each time."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return (x,) * uses
    dtype = torch.get_autocast_dtype(device)
    if x.dtype == dtype or not x.is_floating_point():
        return (x,) * uses
    if not (torch.is_grad_enabled() and x.requires_grad):
        return (x.to(dtype),) * uses
    return _CastOnce.apply(x, dtype, uses)
