"""LayerNorm (Ba et al. 2016) and RMSNorm (Zhang & Sennrich 2019) in Triton, beside their references.

x has any leading shape and is normalised over its last dim (N columns, up to 16k fp32 / 32k bf16 in one
row kernel). Row statistics are kept in fp32 and saved for the backward. The weight/bias gradients are summed
without atomics: each backward program owns a contiguous range of rows and writes one fp32 partial sum, and
the partials are added in a fixed order, so the gradients are deterministic.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .utils import can_launch, device_sms, row_kernel_settings, tl, triton


def layer_norm_reference(x, weight, bias, eps):
    """LayerNorm computed in fp32 and cast back to x's dtype."""
    w32 = weight.float()
    b32 = bias.float() if bias is not None else None
    return F.layer_norm(x.float(), (x.shape[-1],), w32, b32, eps).to(x.dtype)


def rms_norm_reference(x, weight, eps):
    """RMSNorm computed in fp32 (Llama convention) and cast back to x's dtype."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


@triton.jit
def _norm_fwd_kernel(
    X,  # (M, N) input rows, row stride stride_x, columns contiguous
    Y,  # (M, N) output, contiguous
    W,  # (N,) weight
    B,  # (N,) bias; read only when HAS_BIAS
    MEAN,  # (M,) fp32 output: row means; written only for LayerNorm
    RSTD,  # (M,) fp32 output: 1 / sqrt(var + eps), or 1 / sqrt(mean(x^2) + eps) for RMSNorm
    stride_x, N, eps,
    IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, 0) / N
        tl.store(MEAN + row, mean)
        xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / N + eps)
    tl.store(RSTD + row, rstd)
    y = xc * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=mask)


# Backward math, per row, with xhat = (x - mean) * rstd (RMSNorm: xhat = x * rstd) and g = w * dy:
#   LayerNorm: dx = rstd * (g - xhat * mean(xhat * g) - mean(g))
#   RMSNorm:   dx = rstd * (g - xhat * mean(xhat * g))
#   dw = sum over rows of dy * xhat,  db = sum over rows of dy
# (mean over the N columns). Each program sums dw/db over its rows in fp32 and writes one partial row.


@triton.jit
def _norm_bwd_kernel(
    X,  # (M, N) forward input, row stride stride_x
    DY,  # (M, N) output gradient, contiguous
    DX,  # (M, N) output: input gradient, contiguous
    W,  # (N,) weight
    MEAN,  # (M,) fp32 row means from the forward (LayerNorm only)
    RSTD,  # (M,) fp32 reciprocal std from the forward
    DW,  # (programs, N) fp32 output: per-program partial weight gradient
    DB,  # (programs, N) fp32 output: per-program partial bias gradient; written only when HAS_BIAS
    stride_x, M, N, rows_per_program,
    IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], tl.float32)
    db = tl.zeros([BLOCK_N], tl.float32)
    row0 = pid.to(tl.int64) * rows_per_program  # 64-bit offsets: M * N may pass 2^31
    X += row0 * stride_x
    DY += row0 * N
    DX += row0 * N
    for r in range(row0, tl.minimum(row0 + rows_per_program, M)):
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + r)
        if IS_RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(mask, (x - tl.load(MEAN + r)) * rstd, 0.0)
        g = w * dy
        c1 = tl.sum(xhat * g, 0) / N
        if IS_RMS:
            dx = (g - xhat * c1) * rstd
        else:
            dx = (g - xhat * c1 - tl.sum(g, 0) / N) * rstd
        tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        if HAS_BIAS:
            db += dy
        X += stride_x
        DY += N
        DX += N
    tl.store(DW + pid * N + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB + pid * N + cols, db, mask=mask)


def _rows(x):
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _norm_forward(x2, weight, bias, eps, is_rms):
    M, N = x2.shape
    block, warps = row_kernel_settings(N, x2.element_size())
    y = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    mean = torch.empty(M, dtype=torch.float32, device=x2.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x2.device)
    _norm_fwd_kernel[(M,)](x2, y, weight, bias if bias is not None else weight, mean, rstd, x2.stride(0), N,
                           eps, IS_RMS=is_rms, HAS_BIAS=bias is not None, BLOCK_N=block, num_warps=warps)
    return y, mean, rstd


def _norm_backward(dy2, x2, weight, has_bias, mean, rstd, is_rms):
    M, N = x2.shape
    block, warps = row_kernel_settings(N, x2.element_size())
    # Enough programs per SM to keep ~16 KB of rows in flight each: a program holds one row of x and one of dy
    # at a time, so narrow rows need more programs (more fp32 partial rows of dw to sum, a few MB at most).
    programs = max(1, min(M, device_sms(x2) * max(2, min(8, 8192 // block))))
    rows_per_program = triton.cdiv(M, programs)
    dx = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    dw = torch.empty((programs, N), dtype=torch.float32, device=x2.device)
    db = torch.empty((programs, N), dtype=torch.float32, device=x2.device) if has_bias else dw
    _norm_bwd_kernel[(programs,)](x2, dy2, dx, weight, mean, rstd, dw, db, x2.stride(0), M, N,
                                  rows_per_program, IS_RMS=is_rms, HAS_BIAS=has_bias, BLOCK_N=block,
                                  num_warps=warps)
    return dx, dw.sum(0), (db.sum(0) if has_bias else None)


class NormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, is_rms):
        x2 = _rows(x)
        y, mean, rstd = _norm_forward(x2, weight, bias, eps, is_rms)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.is_rms, ctx.has_bias, ctx.x_shape = is_rms, bias is not None, x.shape
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        dy2 = dy.reshape(x2.shape).contiguous()
        dx, dw, db = _norm_backward(dy2, x2, weight, ctx.has_bias, mean, rstd, ctx.is_rms)
        db = db.to(ctx.bias_dtype) if db is not None else None
        return dx.view(ctx.x_shape), dw.to(weight.dtype), db, None, None


def layer_norm(x, weight, bias, eps):
    """Fused LayerNorm over the last dim; ``bias`` may be None. Falls back to the reference without Triton."""
    if not can_launch(x) or x.shape[-1] * x.element_size() > 65536:
        return layer_norm_reference(x, weight, bias, eps)
    return NormFunction.apply(x, weight, bias, eps, False)


def rms_norm(x, weight, eps):
    """Fused RMSNorm over the last dim. Falls back to the reference without Triton."""
    if not can_launch(x) or x.shape[-1] * x.element_size() > 65536:
        return rms_norm_reference(x, weight, eps)
    return NormFunction.apply(x, weight, None, eps, True)
