"""Linear + cross entropy that never materialises the full (N, V) logits (as in Liger-Kernel's fused linear
cross entropy, Hsu et al. 2024, arXiv:2410.10989).

The tokens are processed in chunks: logits of one chunk = x_c W^T (a cuBLAS matmul), then one Triton program
per row computes the loss and overwrites that row of logits with its gradient in place, and two more matmuls
turn it into dx_c and a dW contribution. The gradients are thus finished during the forward; the backward only
scales them by the incoming gradient. Peak extra memory: one chunk of logits plus an fp32 dW.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .utils import can_launch, next_power_of_2, tl, triton


def linear_cross_entropy_reference(x, weight, targets, ignore_index=-100):
    """Mean cross entropy of x @ weight^T over the non-ignored targets; the full logits, in fp32 softmax."""
    logits = (x @ weight.t()).float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index)


# Per row with logits z (V,), target t, p = softmax(z), and scale = 1 / (number of non-ignored rows):
#   loss = logsumexp(z) - z_t
#   dz   = scale * (p - onehot(t))      (zero for an ignored row)
# Two passes over the row in BLOCK_V steps: an online max / sum-of-exp, then the gradient written in place.


@triton.jit
def _ce_fwd_bwd_kernel(
    Z,  # (n, V) logits of one chunk, row stride stride_z; overwritten with dloss/dz
    TARGETS,  # (n,) int64 target ids
    LOSS,  # (n,) fp32 output: per-row loss, 0 for ignored rows
    stride_z, V, ignore_index, scale,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    t = tl.load(TARGETS + row)
    cols = tl.arange(0, BLOCK_V)
    if t == ignore_index:
        for start in range(0, V, BLOCK_V):
            tl.store(z_row + start + cols, tl.zeros([BLOCK_V], tl.float32).to(Z.dtype.element_ty),
                     mask=start + cols < V)
        tl.store(LOSS + row, 0.0)
    else:
        m = float("-inf")
        d = 0.0
        for start in range(0, V, BLOCK_V):
            z = tl.load(z_row + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, 0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
            m = m_new
        lse = m + tl.log(d)
        z_t = tl.load(z_row + t).to(tl.float32)
        for start in range(0, V, BLOCK_V):
            c = start + cols
            z = tl.load(z_row + c, mask=c < V, other=float("-inf")).to(tl.float32)
            grad = tl.exp(z - lse) - tl.where(c == t, 1.0, 0.0)
            tl.store(z_row + c, (grad * scale).to(Z.dtype.element_ty), mask=c < V)
        tl.store(LOSS + row, lse - z_t)


def _ce_chunk_torch(z, targets, ignore_index, scale):
    """The kernel's job in PyTorch, for machines without Triton: per-row losses; z becomes dloss/dz."""
    z32 = z.float()
    lse = torch.logsumexp(z32, dim=-1)
    keep = targets != ignore_index
    safe = torch.where(keep, targets, torch.zeros_like(targets))
    loss = (lse - z32.gather(1, safe[:, None]).squeeze(1)) * keep
    grad = torch.softmax(z32, dim=-1)
    grad[torch.arange(len(z), device=z.device), safe] -= 1.0
    z.copy_(grad * (scale * keep[:, None]))
    return loss


def _chunk_rows(n, hidden, vocab):
    # Chunk logits about as large as x itself (n * hidden elements), as Liger does; 16 to 8192 rows.
    cdiv = lambda a, b: -(-a // b)
    return max(16, min(8192, next_power_of_2(cdiv(n, cdiv(vocab, hidden)))))


def _linear_ce_forward(x, weight, targets, ignore_index, chunk_rows=None):
    """Returns (loss, dx, dw) for loss = mean cross entropy; dx, dw already scaled by 1/#valid."""
    n, hidden = x.shape
    vocab = weight.shape[0]
    n_valid = int((targets != ignore_index).sum())
    scale = 1.0 / max(n_valid, 1)  # all rows ignored: loss 0 and zero grads (PyTorch would give nan)
    chunk = chunk_rows or _chunk_rows(n, hidden, vocab)
    use_kernel = can_launch(x, weight)
    dx = torch.empty_like(x)
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
    loss = torch.empty(n, dtype=torch.float32, device=x.device)
    for start in range(0, n, chunk):
        xc, tc = x[start:start + chunk], targets[start:start + chunk]
        z = xc @ weight.t()  # (chunk, V) in x's dtype
        if use_kernel:
            _ce_fwd_bwd_kernel[(len(xc),)](z, tc, loss[start:start + chunk], z.stride(0), vocab, ignore_index,
                                           scale, BLOCK_V=min(4096, next_power_of_2(vocab)), num_warps=8)
        else:
            loss[start:start + chunk] = _ce_chunk_torch(z, tc, ignore_index, scale)
        dx[start:start + chunk] = z @ weight
        dw += (z.t() @ xc).float()
    return loss.sum() * scale, dx, dw.to(weight.dtype)


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, chunk_rows):
        loss, dx, dw = _linear_ce_forward(x, weight, targets, ignore_index, chunk_rows)
        ctx.save_for_backward(dx, dw)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dw = ctx.saved_tensors
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):
            dx, dw = dx * grad_loss.to(dx.dtype), dw * grad_loss.to(dw.dtype)
        return dx, dw, None, None, None


def linear_cross_entropy(x, weight, targets, ignore_index=-100, chunk_rows=None):
    """Mean cross entropy of the logits x @ weight^T, x (N, H), weight (V, H), targets (N,), chunked.

    Gradients for x and weight. ``chunk_rows`` overrides the rows per chunk (tests use it to force several).
    Runs the chunked PyTorch path (still without full logits) where Triton cannot run.
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1] or targets.shape != x.shape[:1]:
        raise ValueError(f"expected x (N, H), weight (V, H), targets (N,); got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    return LinearCrossEntropyFunction.apply(x, weight, targets.contiguous(), ignore_index, chunk_rows)
