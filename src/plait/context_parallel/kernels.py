"""One block of attention with its log-sum-exp, and its backward from the merged result.

Ring attention computes a rank's output from several (query block, key/value block) pairs and
merges them with the online softmax. For that it needs, per block, the output O_j and the
row-wise log-sum-exp of the scaled scores, lse_j = log sum_k exp(q . k_k / sqrt(d)); merging is

    lse = log(exp(lse_a) + exp(lse_b)),    O = exp(lse_a - lse) O_a + exp(lse_b - lse) O_b.

The backward of block j, given the *merged* O and lse, is exact: with P_j = exp(S_j - lse) (the
block's share of the global softmax), dV_j = P_j^T dO, dP_j = dO V_j^T,
dS_j = P_j * (dP_j - rowsum(dO * O)), dQ += dS_j K_j / sqrt(d), dK_j = dS_j^T Q / sqrt(d):
the flash-attention backward called with the global O and lse computes exactly this.

``block_attention`` / ``block_attention_backward`` use PyTorch's flash-attention kernel for the
CPU (the one ``F.scaled_dot_product_attention`` runs there) and, on other devices, the same
arithmetic in plain matmuls (materialises the block's scores; correct everywhere).
Shapes: q [b, h, s_q, d], k and v [b, h, s_k, d] (heads already matched), lse [b, h, s_q] fp32.
"""
from __future__ import annotations

import math

import torch


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, lse) of q against one key/value block (causal: the block is q's own positions)."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
    return math_block_attention(q, k, v, causal)


def block_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor,
                             causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV) of one block, from the merged output ``out`` and ``lse`` of q's rows."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out.contiguous(), q, k, v, out.contiguous(), lse.contiguous(), 0.0, causal)
    return math_block_attention_backward(grad_out, q, k, v, out, lse, causal)


def _fp32(kernel):
    """Run ``kernel`` outside any autocast region: the trainer's bf16 autocast would otherwise
    run its "fp32" matmuls in bf16, and the forward's lse would no longer match the scores the
    backward (outside autocast) recomputes."""
    def run(q: torch.Tensor, *args):
        with torch.autocast(q.device.type, enabled=False):
            return kernel(q, *args)
    run.__doc__, run.__name__ = kernel.__doc__, kernel.__name__
    return run


@_fp32
def math_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``block_attention`` in plain fp32 matmuls (any device)."""
    scores = _scores(q, k, causal)
    lse = torch.logsumexp(scores, dim=-1)
    return (torch.exp(scores - lse.unsqueeze(-1)) @ v.float()).to(q.dtype), lse


@_fp32
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
