"""Loss parallel: cross-entropy over vocabulary-sharded logits, never gathering them.

Rank r holds the logits z[:, V_r] of its vocabulary slice V_r = [start, start + V/t). With
label smoothing eps the per-token loss is

    loss_i = log sum_v exp(z_iv) - (1 - eps) z_{i,y_i} - (eps / V) sum_v z_iv

and, after shifting every row by its global max m_i (the loss is shift-invariant because
the coefficients of z sum to one), each term is a sum over the vocabulary, i.e. a sum of
per-rank partial sums. Communication per call, for N tokens:

    all-reduce MAX of m           (N floats)
    all-reduce SUM of [sum_v exp(z - m), z_{i,y_i} - m, sum_v (z - m)]  (2N floats, 3N with eps)

where only the rank owning y_i contributes the target logit. The gradient

    dloss_i / dz_iv = softmax(z_i)_v - (1 - eps) [v = y_i] - eps / V

is local to each rank's slice: backward needs no communication.
"""
from __future__ import annotations

import torch

from plait.comm import Collectives, ReduceOp
from plait.loss import IGNORE_INDEX


class _VocabParallelCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, comm: Collectives, vocab_start: int,
                vocab_size: int, label_smoothing: float) -> torch.Tensor:
        z = logits.float()
        local_vocab = z.shape[1]
        row_max = z.amax(dim=1)
        comm.all_reduce(row_max, op=ReduceOp.MAX, tag="loss")
        z = z - row_max.unsqueeze(1)  # a fresh buffer: it becomes the gradient below

        valid = targets != IGNORE_INDEX
        local_target = targets - vocab_start
        owned = valid & (local_target >= 0) & (local_target < local_vocab)
        safe_target = torch.where(owned, local_target, 0).unsqueeze(1)
        target_logit = z.gather(1, safe_target).squeeze(1) * owned

        partials = [None, target_logit]
        if label_smoothing:
            partials.append(z.sum(dim=1))
        z.exp_()
        partials[0] = z.sum(dim=1)
        stats = torch.stack(partials)
        comm.all_reduce(stats, tag="loss")
        sum_exp, target_logit = stats[0], stats[1]

        row_loss = sum_exp.log() - (1.0 - label_smoothing) * target_logit
        if label_smoothing:
            row_loss = row_loss - (label_smoothing / vocab_size) * stats[2]
        total = (row_loss * valid).sum()

        if ctx.needs_input_grad[0]:
            grad = z.div_(sum_exp.unsqueeze(1))
            if label_smoothing:
                grad.sub_(label_smoothing / vocab_size)
            grad.scatter_add_(1, safe_target, torch.full_like(safe_target, -(1.0 - label_smoothing),
                                                              dtype=grad.dtype) * owned.unsqueeze(1))
            grad.mul_(valid.unsqueeze(1))
            ctx.save_for_backward(grad)
            ctx.logits_dtype = logits.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output.float()).to(ctx.logits_dtype), None, None, None, None, None


def vocab_parallel_cross_entropy_sum(local_logits: torch.Tensor, targets: torch.Tensor, comm: Collectives,
                                     vocab_start: int, vocab_size: int, label_smoothing: float = 0.0) -> torch.Tensor:
    """Sum over non-ignored tokens of the cross-entropy, from this rank's vocabulary slice.

    ``local_logits``: [..., V/t] (columns ``vocab_start`` onward of the full logits);
    ``targets``: [...] global token ids or ``IGNORE_INDEX``. Every tp rank returns the same sum.
    """
    return _VocabParallelCrossEntropySum.apply(local_logits.reshape(-1, local_logits.shape[-1]), targets.reshape(-1),
                                               comm, vocab_start, vocab_size, float(label_smoothing))
