"""SwiGLU (Shazeer 2020, arXiv:2002.05202) in Triton: silu(gate) * up in one pass, recomputed in the
backward."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .utils import can_launch, tl, triton


def swiglu_reference(gate, up):
    return F.silu(gate) * up


# With sg = sigmoid(g), silu(g) = g sg and silu'(g) = sg (1 + g (1 - sg)):
#   out = silu(g) u,   du = dy silu(g),   dg = dy u sg (1 + g (1 - sg))
# The backward reads gate and up again instead of saving silu(g): one stored tensor fewer.


@triton.jit
def _swiglu_fwd_kernel(
    G,  # (n,) gate, contiguous
    U,  # (n,) up projection, contiguous
    OUT,  # (n,) output silu(gate) * up
    n, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, (g * tl.sigmoid(g) * u).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    G,  # (n,) gate from the forward
    U,  # (n,) up from the forward
    DY,  # (n,) output gradient
    DG,  # (n,) output: gate gradient
    DU,  # (n,) output: up gradient
    n, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    sg = tl.sigmoid(g)
    tl.store(DU + offs, (dy * g * sg).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + offs, (dy * u * sg * (1.0 + g * (1.0 - sg))).to(DG.dtype.element_ty), mask=mask)


_BLOCK = 1024


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        n = gate.numel()
        _swiglu_fwd_kernel[(triton.cdiv(n, _BLOCK),)](gate, up, out, n, BLOCK=_BLOCK)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _swiglu_bwd_kernel[(triton.cdiv(n, _BLOCK),)](gate, up, dy.contiguous(), dg, du, n, BLOCK=_BLOCK)
        return dg, du


def swiglu(gate, up):
    """silu(gate) * up for same-shaped tensors, fused; falls back to the reference where Triton cannot run."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate and up must match: {tuple(gate.shape)} {gate.dtype} vs "
                         f"{tuple(up.shape)} {up.dtype}")
    if not can_launch(gate, up):
        return swiglu_reference(gate, up)
    return SwiGLUFunction.apply(gate, up)
