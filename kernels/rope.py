"""Rotary position embedding (RoFormer, Su et al. 2021, arXiv:2104.09864) in Triton, in Hugging Face Llama
layout.

x (B, H, T, D); cos, sin (T, D) with cos = cat(cos(t f), cos(t f)) over the D/2 frequencies f ("rotate_half"
convention: dims i and i + D/2 form a rotation pair, not dims 2i and 2i+1).
"""
from __future__ import annotations

import torch

from .utils import can_launch, next_power_of_2, tl, triton


def rotate_half(x):
    d = x.shape[-1] // 2
    return torch.cat((-x[..., d:], x[..., :d]), dim=-1)


def rope_reference(x, cos, sin):
    """out = x * cos + rotate_half(x) * sin, computed in x's dtype."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


# With x = [x1, x2], c = [c1, c2], s = [s1, s2] (halves of the last dim):
#   forward:  o1 = x1 c1 - x2 s1,   o2 = x2 c2 + x1 s2
# out = x*c + R(x)*s with R(x) = [-x2, x1], whose transpose is R^T(g) = [g2, -g1], so
#   backward: dx = g*c + R^T(g*s):  d1 = g1 c1 + g2 s2,   d2 = g2 c2 - g1 s1
# which is the forward with (s1, s2) replaced by (-s2, -s1): one kernel serves both.


@triton.jit
def _rope_kernel(
    X,  # (B, H, T, D) input (or output gradient), strides sxb, sxh, sxt, last dim contiguous
    COS,  # (T, D) cosines, contiguous
    SIN,  # (T, D) sines, contiguous
    OUT,  # (B, H, T, D) output, contiguous
    sxb, sxh, sxt,
    H, T, HALF,  # heads, sequence length, D // 2
    BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_H)
    mask = (rows[:, None] < T) & (cols[None, :] < HALF)
    x_ptr = X + b * sxb + h * sxh + rows[:, None] * sxt + cols[None, :]
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    cs_ptr = rows[:, None] * (2 * HALF) + cols[None, :]
    c1 = tl.load(COS + cs_ptr, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + cs_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + cs_ptr, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + cs_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        s1, s2 = -s2, -s1
    o_ptr = OUT + bh.to(tl.int64) * T * 2 * HALF + cs_ptr
    tl.store(o_ptr, (x1 * c1 - x2 * s1).to(OUT.dtype.element_ty), mask=mask)
    tl.store(o_ptr + HALF, (x2 * c2 + x1 * s2).to(OUT.dtype.element_ty), mask=mask)


def _rope(x, cos, sin, backward):
    B, H, T, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((B, H, T, D), dtype=x.dtype, device=x.device)
    block_h = next_power_of_2(D // 2)
    block_t = max(1, min(next_power_of_2(T), 4096 // block_h))
    _rope_kernel[(triton.cdiv(T, block_t), B * H)](x, cos, sin, out, *x.stride()[:3], H, T, D // 2,
                                                   BACKWARD=backward, BLOCK_T=block_t, BLOCK_H=block_h)
    return out


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rope(dy, cos, sin, backward=True), None, None


def apply_rope(x, cos, sin):
    """Rotary embedding of x (B, H, T, D) with cos/sin (T, D) (leading size-1 dims allowed).

    Gradients flow to x only (cos/sin are buffers). Falls back to the reference where Triton cannot run.
    """
    B, H, T, D = x.shape
    if D % 2:
        raise ValueError(f"rotary embedding needs an even head dim, got {D}")
    cos, sin = cos.reshape(T, D), sin.reshape(T, D)
    if not can_launch(x):
        return rope_reference(x, cos, sin)
    return RopeFunction.apply(x, cos.contiguous(), sin.contiguous())
