"""One block of attention with its log-sum-exp, and its backward from the merged result.

Ring attention computes a rank's output from several (query block, key/value block) pairs and
merges them with the online softmax. For that it needs, per block, the output O_j and the
row-wise log-sum-exp of the scaled scores, lse_j = log sum_k exp(q . k_k / sqrt(d)); merging is

    lse = log(exp(lse_a) + exp(lse_b)),    O = exp(lse_a - lse) O_a + exp(lse_b - lse) O_b.

The backward of block j, given the *merged* O and lse, is exact: with P_j = exp(S_j - lse) (the
block's share of the global softmax), dV_j = P_j^T dO, dP_j = dO V_j^T,
dS_j = P_j * (dP_j - rowsum(dO * O)), dQ += dS_j K_j / sqrt(d), dK_j = dS_j^T Q / sqrt(d):
the flash-attention backward called with the global O and lse computes exactly this.

``block_attention`` / ``block_attention_backward`` run the ``BlockKernel`` of the inputs
(``kernel_for``): PyTorch's flash-attention kernel for the CPU (the one
``F.scaled_dot_product_attention`` runs there); on CUDA in bf16/fp16, its CUDA flash kernel (no
s_q x s_k score matrix in memory), once a self-check on the device has shown it equal to the
plain-matmul kernel; otherwise that plain fp32 kernel (materialises the block's scores; correct
everywhere). A failed self-check is logged once and falls back: never a silent wrong result.
Shapes: q [b, h, s_q, d], k and v [b, kv, s_k, d] (kv divides h: grouped-query attention),
lse [b, h, s_q] fp32; a ``BlockKernel`` itself sees matched heads unless it is ``grouped_query``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger(__name__)


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, lse) of q against one key/value block (causal: the block is q's own positions); k and v
    may have fewer (kv) heads than q, each serving heads / kv heads query heads."""
    kernel, groups = kernel_for(q), q.shape[1] // k.shape[1]
    if groups > 1 and not kernel.grouped_query:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return kernel.forward(q, k.contiguous(), v.contiguous(), causal)


def block_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor,
                             causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV) of one block, from the merged output ``out`` and ``lse`` of q's rows; dK and dV
    have k's and v's heads (a kv head's gradient is the sum over the query heads it serves)."""
    kernel, groups = kernel_for(q), q.shape[1] // k.shape[1]
    if groups == 1 or kernel.grouped_query:
        return kernel.backward(grad_out, q, k.contiguous(), v.contiguous(), out, lse, causal)
    grad_q, grad_k, grad_v = kernel.backward(grad_out, q, k.repeat_interleave(groups, dim=1),
                                             v.repeat_interleave(groups, dim=1), out, lse, causal)
    return grad_q, grad_k.unflatten(1, (-1, groups)).sum(2), grad_v.unflatten(1, (-1, groups)).sum(2)


def _outside_autocast(kernel):
    """Run ``kernel`` outside any autocast region: the trainer's bf16 autocast would otherwise
    run the plain kernel's "fp32" matmuls in bf16, and the forward's lse would no longer match the
    scores the backward (outside autocast) recomputes; the flash kernels take their dtype as given."""
    def run(q: torch.Tensor, *args):
        if not torch.amp.is_autocast_available(q.device.type):  # meta tensors: shapes only
            return kernel(q, *args)
        with torch.autocast(q.device.type, enabled=False):
            return kernel(q, *args)
    run.__doc__, run.__name__ = kernel.__doc__, kernel.__name__
    return run


@_outside_autocast
def math_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``block_attention`` in plain fp32 matmuls (any device)."""
    scores = _scores(q, k, causal)
    lse = torch.logsumexp(scores, dim=-1)
    return (torch.exp(scores - lse.unsqueeze(-1)) @ v.float()).to(q.dtype), lse


@_outside_autocast
def math_block_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  out: torch.Tensor, lse: torch.Tensor,
                                  causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``block_attention_backward`` in plain fp32 matmuls (any device)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    probs = torch.exp(_scores(q, k, causal) - lse.unsqueeze(-1))
    grad_out32 = grad_out.float()
    grad_v = probs.transpose(-1, -2) @ grad_out32
    grad_probs = grad_out32 @ v.float().transpose(-1, -2)
    delta = (grad_out32 * out.float()).sum(-1, keepdim=True)
    grad_scores = probs * (grad_probs - delta) * scale
    grad_q = grad_scores @ k.float()
    grad_k = grad_scores.transpose(-1, -2) @ q.float()
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)


def _scores(q: torch.Tensor, k: torch.Tensor, causal: bool) -> torch.Tensor:
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores


def merge_block(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Fold one block's (O_j, lse_j) into the running fp32 ``out`` and ``lse``, in place (views allowed)."""
    merged = torch.logaddexp(lse, block_lse)
    out.mul_(torch.exp(lse - merged).unsqueeze(-1)).add_(block_out.float() * torch.exp(block_lse - merged).unsqueeze(-1))
    lse.copy_(merged)


@_outside_autocast
def cpu_flash_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``block_attention`` by the CPU flash kernel."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)


@_outside_autocast
def cpu_flash_block_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                       out: torch.Tensor, lse: torch.Tensor,
                                       causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``block_attention_backward`` by the CPU flash kernel."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out.contiguous(), q, k, v, out.contiguous(), lse.contiguous(), 0.0, causal)


@_outside_autocast
def cuda_flash_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``block_attention`` by the CUDA flash kernel (bf16/fp16; lse [b, h, s_q] fp32)."""
    out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal)
    return out, lse


@_outside_autocast
def cuda_flash_block_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                        out: torch.Tensor, lse: torch.Tensor,
                                        causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``block_attention_backward`` by the CUDA flash kernel. Without dropout its random state is
    never read: a dummy of the forward's shapes stands in (no cumulative lengths: not varlen)."""
    rng_state = torch.zeros(2, dtype=torch.int64, device=q.device)
    unused = torch.zeros((), dtype=torch.int64, device=q.device)
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        grad_out.to(q.dtype).contiguous(), q, k, v, out.to(q.dtype).contiguous(), lse.contiguous(),
        None, None, q.shape[2], k.shape[2], 0.0, causal, rng_state, unused)


@dataclass(frozen=True)
class BlockKernel:
    """One implementation of a block's attention: forward (O, lse) and backward (dQ, dK, dV).
    ``grouped_query``: it reads k and v with fewer heads than q itself (and returns dK, dV so);
    the others get them repeated to q's heads."""
    name: str
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    grouped_query: bool = False


MATH = BlockKernel("math (fp32 matmuls)", math_block_attention, math_block_attention_backward)
# The CPU flash kernel shares kv heads forward and backward (as SDPA's enable_gqa uses it). The
# CUDA one could too, but its self-check has only run with matched heads: it gets them repeated.
CPU_FLASH = BlockKernel("flash (cpu)", cpu_flash_block_attention, cpu_flash_block_attention_backward,
                        grouped_query=True)
CUDA_FLASH = BlockKernel("flash (cuda)", cuda_flash_block_attention, cuda_flash_block_attention_backward)

# (device, dtype, head dim) -> the kernel that passed its self-check there (MATH where none did)
_verified: dict[tuple[str, torch.dtype, int], BlockKernel] = {}


def kernel_for(q: torch.Tensor) -> BlockKernel:
    """The kernel for blocks of queries like ``q``: the CPU flash kernel on the CPU; the CUDA
    flash kernel in bf16/fp16 on CUDA where it passed its self-check; the plain one otherwise."""
    if q.device.type == "cpu":
        return CPU_FLASH
    if q.device.type == "cuda" and q.dtype in (torch.bfloat16, torch.float16):
        return verified(CUDA_FLASH, q.device, q.dtype, q.shape[-1])
    return MATH


def verified(kernel: BlockKernel, device: torch.device, dtype: torch.dtype, head_dim: int) -> BlockKernel:
    """``kernel`` if it passed ``self_check`` for this device, dtype and head size (checked once per
    process), else ``MATH``, with one warning that says why."""
    key = (str(device), dtype, head_dim)
    if key not in _verified:
        problem = self_check(kernel, device, dtype, head_dim)
        if problem is not None:
            log.warning("ring attention: %s failed its self-check on %s (%s, head size %d): %s; using %s",
                        kernel.name, device, dtype, head_dim, problem, MATH.name)
        _verified[key] = kernel if problem is None else MATH
    return _verified[key]


SELF_CHECK_TOLERANCE = 2e-2  # relative; bf16 keeps 8 bits of mantissa (2^-8 = 4e-3 per rounding)


def self_check(kernel: BlockKernel, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """None if ``kernel`` agrees with ``MATH`` (O, lse, dQ, dK, dV) on two small random blocks of
    this device and dtype (a causal one, and an unmasked one of half the keys, as ring attention
    uses them), else why not (the error it raised, or the first quantity that differs)."""
    generator = torch.Generator().manual_seed(0)
    for causal, keys in ((True, 64), (False, 32)):
        q, k, v = (torch.randn(2, 4, n, head_dim, generator=generator).to(device, dtype) for n in (64, keys, keys))
        grad = torch.randn(2, 4, 64, head_dim, generator=generator).to(device, dtype)
        try:
            out, lse = kernel.forward(q, k, v, causal)
            got = (out, lse, *kernel.backward(grad, q, k, v, out, lse, causal))
        except Exception as error:  # unsupported here (head size, architecture, build): not fatal
            return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        want_out, want_lse = MATH.forward(q, k, v, causal)
        want = (want_out, want_lse, *MATH.backward(grad, q, k, v, want_out, want_lse, causal))
        for name, a, b in zip(("O", "lse", "dQ", "dK", "dV"), got, want):
            if a.shape != b.shape:
                return f"{name} has shape {tuple(a.shape)}, not {tuple(b.shape)}"
            error = float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))
            if not error <= SELF_CHECK_TOLERANCE:
                return f"{name} differs by {error:.1e} (relative; causal={causal})"
    return None
