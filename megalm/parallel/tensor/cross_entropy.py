"""Cross-entropy over vocabulary-parallel logits, without ever gathering the full (..., V) logits.

Megatron-LM's vocab-parallel loss (Shoeybi et al. 2019, sec. 3): rank r holds logits z[..., r*V/t:(r+1)*V/t].

    m       = max_v z_v                 all-reduce(MAX) of the local maxima (for a stable exp)
    S       = sum_v exp(z_v - m)        all-reduce(SUM) of the local sums
    z_y - m                             the rank owning target y contributes it, the others 0: all-reduce(SUM)
    loss    = log S - (z_y - m)

S and z_y travel in one all-reduce. Backward needs no communication: d loss / d z_v = softmax_v - [v == y],
and each rank holds its own slice of the softmax. Math in fp32; the gradient returns in the logits' dtype.
Collectives are counted under kind "cross_entropy".
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megalm.parallel.tensor import comm
from megalm.parallel.topology import TensorParallel

KIND = "cross_entropy"


class _VocabParallelCrossEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, logits, targets, tp, ignore_index):
        z = logits.float()                                                   # (..., V/t)
        local_vocab = z.shape[-1]
        start = tp.rank * local_vocab
        z_max = comm.all_reduce(z.amax(dim=-1), tp, KIND, op=dist.ReduceOp.MAX)  # (...)
        z = z - z_max.unsqueeze(-1)
        valid = targets != ignore_index
        mine = valid & (targets >= start) & (targets < start + local_vocab)   # my rank owns the target
        local_t = (targets - start).masked_fill(~mine, 0)
        z_target = z.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)
        exp_z = z.exp_()                                                     # z is a fresh fp32 tensor
        sums = comm.all_reduce(torch.stack([exp_z.sum(dim=-1), z_target]), tp, KIND)
        sum_exp, z_target = sums[0], sums[1]
        loss = (sum_exp.log() - z_target).masked_fill(~valid, 0.0)
        softmax = exp_z.div_(sum_exp.unsqueeze(-1))                          # (..., V/t), my slice
        ctx.save_for_backward(softmax, local_t, mine, valid)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_t, mine, valid = ctx.saved_tensors
        grad = softmax                                   # saved for this backward only: reuse its memory
        grad.scatter_add_(-1, local_t.unsqueeze(-1), -mine.to(grad.dtype).unsqueeze(-1))
        grad.mul_((grad_loss.float() * valid).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(logits_local: torch.Tensor, targets: torch.Tensor, tp: TensorParallel,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Per-token loss (shape of ``targets``, fp32) from this rank's vocabulary slice ``logits_local``
    (..., V/t). ``targets`` holds global vocabulary ids (the same on every TP rank); ``ignore_index`` tokens
    get 0 loss and 0 gradient. Average with ``loss.sum() / (targets != ignore_index).sum()``. At tp=1 this is
    ``F.cross_entropy(logits, targets, reduction="none", ignore_index=ignore_index)``, without communication.
    """
    if logits_local.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits_local.shape)} and targets {tuple(targets.shape)} disagree: "
                         f"logits must be targets.shape + (V/tp,)")
    return _VocabParallelCrossEntropy.apply(logits_local, targets, tp, ignore_index)
