"""Cross-entropy of the language-model head, fused with the head's matmul and chunked.

For hidden states H [N, h], head weight W [V, h] and targets y, the loss sum is

    L = sum_{i: y_i != ignore} ( logsumexp_v z_iv - z_{i,y_i} ),   z = H W^T

and its gradients are dL/dz = softmax(z) - onehot(y) (zero rows for ignored targets),
dL/dH = (dL/dz) W, dL/dW = (dL/dz)^T H. Because L is a scalar, all three can be computed in
the forward pass, a chunk of rows at a time: the [N, V] logits (and their fp32 copy, softmax
and softmax gradient, each N x V) never exist at once. On the CPU that avoids re-faulting
hundreds of MB of fresh pages per step; everywhere it caps the head's activation memory at
one chunk. Backward only scales the stored gradients by the incoming scalar.

Precision: each chunk's logits are computed in the compute dtype (bf16 under autocast, as a
plain ``lm_head`` would), then softmax and loss in fp32; dL/dW sums the chunks' partial
products (each in the compute dtype) in fp32. In fp32 this is the unfused math up to the
order of summation.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 23  # logits per chunk: 32 MB in fp32


def _compute_dtype(device_type: str, default: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return default


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(hidden.device.type, weight.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(dtype)
            w = weight.to(dtype)
            n_rows, vocab = h.shape[0], w.shape[0]
            chunk = max(1, CHUNK_ELEMENTS // vocab)
            need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
            grad_hidden = torch.empty_like(h) if need_grad else None
            grad_weight = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_grad else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for start in range(0, n_rows, chunk):
                rows = slice(start, min(start + chunk, n_rows))
                y = targets[rows]
                valid = y != IGNORE_INDEX
                safe_y = torch.where(valid, y, 0).unsqueeze(1)
                logits = (h[rows] @ w.t()).float()
                log_norm = torch.logsumexp(logits, dim=1, keepdim=True)
                target_logit = logits.gather(1, safe_y)
                total += ((log_norm - target_logit).squeeze(1) * valid).sum()
                if need_grad:
                    # softmax - onehot, in place on the chunk's logits
                    grad_logits = logits.sub_(log_norm).exp_()
                    grad_logits.scatter_add_(1, safe_y, torch.full_like(target_logit, -1.0))
                    grad_logits.mul_(valid.unsqueeze(1))
                    grad_logits = grad_logits.to(dtype)
                    torch.mm(grad_logits, w, out=grad_hidden[rows])
                    grad_weight += grad_logits.t() @ h[rows]  # the chunk's partial, summed in fp32
        if need_grad:
            ctx.save_for_backward(grad_hidden, grad_weight)
            ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        scale = grad_output.to(torch.float32)
        dh = (grad_hidden.float() * scale).to(hidden_dtype) if ctx.needs_input_grad[0] else None
        dw = (grad_weight * scale).to(weight_dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over non-ignored tokens of -log softmax(hidden @ weight^T)[target], in fp32.

    ``hidden``: [..., h]; ``weight``: [V, h]; ``targets``: [...] (``IGNORE_INDEX`` skipped).
    """
    return _LinearCrossEntropySum.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1))
