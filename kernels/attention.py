"""Flash attention in Triton (FlashAttention-2, Dao 2023, arXiv:2307.08691), beside its PyTorch reference.

Layout: q (B, Hq, T, D); k, v (B, Hkv, T, D) with Hq % Hkv == 0. Grouped-query attention maps query head h
to key/value head h // (Hq // Hkv) by pointer arithmetic: K/V are never repeated in memory.

Forward: online softmax over key blocks, fp32 accumulators, saving per query row the log-sum-exp of the
scaled scores (in base 2: the kernels use exp2 with the scale folded into log2(e)).
Backward: recomputes the probabilities from the saved log-sum-exp. One kernel owns a key block and walks all
queries of every head in its group (so GQA's dK/dV sums happen in registers, never with atomics); dQ comes
either from a second kernel that owns a query block (deterministic) or from fp32 atomic adds in the first
(one pass fewer, run-to-run bit differences on a GPU).

Every loop over blocks is split: blocks wholly visible (before the causal diagonal, inside the sequence) run
without masks, and only the diagonal blocks and the ragged end pay for the causal and length masks; blocks
wholly above the diagonal are never visited.

Loads carry masks only where a tile can leave the sequence or the head dim (a head dim that is no power of
two), so full tiles compile to vector loads and asynchronous copies. On a GPU the first call for a shape times
a few tile configurations per kernel, and atomic against separate dQ, and keeps the fastest (see ``_pick``);
the deterministic path does not.

fp32 inputs use IEEE fp32 dots (no TF32). bf16 dots are wrong in Triton's interpreter (it multiplies raw
bit patterns), so under the interpreter bf16 tiles are upcast to fp32 before every ``tl.dot``, after the same
rounding the GPU path applies.
"""
from __future__ import annotations

import math
import os

import torch

from megalm.model.documents import document_starts

from .utils import attention_candidates, can_launch, interpreting, next_power_of_2, tl, triton


def _check(q, k, v):
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"expected q (B, Hq, T, D) and k, v (B, Hkv, T, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, T, D = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"k/v shape {tuple(k.shape)} does not match q {tuple(q.shape)} in batch, length "
                         f"or head dim")
    if Hq % k.shape[1] != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({k.shape[1]})")


def attention_reference(q, k, v, causal=True, softmax_scale=None, segments=None):
    """Softmax attention in plain PyTorch, in the inputs' dtype (scores and softmax in fp32, probabilities
    rounded to the value dtype as the kernel does). GQA by repeating K/V: it is the reference."""
    _check(q, k, v)
    B, Hq, T, D = q.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    group = Hq // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # (B, Hq, T, T)
    if causal:
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    if segments is not None:                                 # packed documents: block-diagonal
        s = s.masked_fill((segments[:, :, None] != segments[:, None, :])[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1).to(v.dtype)
    return torch.matmul(p, v)


# ----------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # fp32 accumulation always; IEEE: fp32 operands without TF32; UPCAST: interpreter-safe bf16.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _key_range(start_m, T, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # For the query block at start_m: key blocks [0, mid) are wholly visible (before the causal diagonal, inside
    # T) and run without masks; [mid, hi) holds the diagonal and the ragged end, masked.
    if CAUSAL:
        mid = (start_m // BLOCK_N) * BLOCK_N
        hi = tl.minimum(T, start_m + BLOCK_M)
    else:
        mid = (T // BLOCK_N) * BLOCK_N
        hi = T
    return mid, hi


@triton.jit
def _load_tile(base, rows, offs_d, d_ok, T, stride, ROWS: tl.constexpr, PAD_D: tl.constexpr):
    # A (rows, BLOCK_D) tile; ROWS: rows past the sequence end read as zeros; PAD_D: so do the columns past the
    # head dim (BLOCK_D > D). Without either, the load carries no mask at all.
    ptrs = base + rows[:, None] * stride + offs_d[None, :]
    if ROWS and PAD_D:
        return tl.load(ptrs, mask=(rows[:, None] < T) & d_ok[None, :], other=0.0)
    elif ROWS:
        return tl.load(ptrs, mask=rows[:, None] < T, other=0.0)
    elif PAD_D:
        return tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _load_kv(k_base, v_base, cols, offs_d, d_ok, T, skt, svt, MASKED: tl.constexpr, PAD_D: tl.constexpr):
    # One (BLOCK_N, BLOCK_D) tile of K and of V; MASKED: rows past the sequence end read as zeros.
    k = _load_tile(k_base, cols, offs_d, d_ok, T, skt, MASKED, PAD_D)
    v = _load_tile(v_base, cols, offs_d, d_ok, T, svt, MASKED, PAD_D)
    return k, v


@triton.jit
def _visible(offs_m, cols, T, CAUSAL: tl.constexpr):
    # (BLOCK_M, BLOCK_N) mask of the scores that exist: query row and key inside T, key not after the query.
    ok = (offs_m[:, None] < T) & (cols[None, :] < T)
    if CAUSAL:
        ok = ok & (offs_m[:, None] >= cols[None, :])
    return ok


@triton.jit
def _same_document(seg_base, offs_m, cols, T):
    # (BLOCK_M, BLOCK_N): query row and key lie in one packed document (rows and keys past T in none).
    seg_q = tl.load(seg_base + offs_m, mask=offs_m < T, other=-1)
    seg_k = tl.load(seg_base + cols, mask=cols < T, other=-2)
    return seg_q[:, None] == seg_k[None, :]


@triton.jit
def _first_key(start_base, offs_m, T, BLOCK_N: tl.constexpr):
    # The first key block any row of this query block can see: where the earliest of its documents starts.
    first = tl.min(tl.load(start_base + tl.minimum(offs_m, T - 1)), 0)
    return (first // BLOCK_N) * BLOCK_N


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, seg_base, lo, hi, offs_m, offs_n, offs_d, d_ok, T, skt, svt,
                qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, SEGMENTS: tl.constexpr, BLOCK_N: tl.constexpr,
                UPCAST: tl.constexpr, IEEE: tl.constexpr, PAD_D: tl.constexpr):
    # Online softmax over the key blocks [lo, hi); MASKED: apply the sequence end and the causal mask;
    # SEGMENTS: and each row's document.
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k, v = _load_kv(k_base, v_base, cols, offs_d, d_ok, T, skt, svt, MASKED, PAD_D)
        qk = _dot(q, tl.trans(k), UPCAST, IEEE)  # (BLOCK_M, BLOCK_N) unscaled scores
        if MASKED:  # rows past T keep their scores: key 0 stays visible to them, so m_i stays finite
            rows = tl.minimum(offs_m, T - 1)
            ok = _visible(rows, cols, T, CAUSAL)
            if SEGMENTS:
                ok = ok & _same_document(seg_base, rows, cols, T)
            qk = tl.where(ok, qk, float("-inf"))
        # the scale (> 0) applied to the row max, and inside one fused multiply-add per score
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_ref = m_new
        if SEGMENTS:  # a row may see no key yet (blocks before its document): keep exp2 off -inf - -inf
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(qk * qk_scale - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, IEEE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q,  # (B, Hq, T, D) queries, any strides with the last dim contiguous
    K,  # (B, Hkv, T, D) keys, any strides with the last dim contiguous
    V,  # (B, Hkv, T, D) values, any strides with the last dim contiguous
    O,  # (B, Hq, T, D) output, contiguous
    LSE,  # (B * Hq, T) fp32 output: log2(sum_j exp2(s_ij)) of the base-2 scaled scores s, for the backward
    SEG,  # (B, T) int32 document of each position (packed sequences), when SEGMENTS
    START,  # (B, T) int32 first position of each position's document, when SEGMENTS
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,  # strides of Q, K, V (batch, head, time)
    H, T, D,  # query heads, sequence length, head dim
    qk_scale,  # softmax_scale * log2(e)
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, SEGMENTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, PAD_D: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: B * H * T * D may pass 2^31
    b, h = bh // H, bh % H
    hk = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    d_ok = offs_d < D
    q = _load_tile(Q + b * sqb + h * sqh, offs_m, offs_d, d_ok, T, sqt, True, PAD_D)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max of s
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Key 0 comes first, in whichever loop, visible to every row: m_i is finite after one step. Packed
    # documents: from the block where the earliest row's document starts, every block masked.
    mid, hi = _key_range(start_m, T, CAUSAL, BLOCK_M, BLOCK_N)
    seg_base = SEG + b * T
    if SEGMENTS:
        lo = _first_key(START + b * T, offs_m, T, BLOCK_N)
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, seg_base, lo, hi, offs_m, offs_n, offs_d,
                                    d_ok, T, skt, svt, qk_scale, True, CAUSAL, True, BLOCK_N, UPCAST, IEEE, PAD_D)
    else:
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, seg_base, 0, mid, offs_m, offs_n, offs_d,
                                    d_ok, T, skt, svt, qk_scale, False, CAUSAL, False, BLOCK_N, UPCAST, IEEE, PAD_D)
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, seg_base, mid, hi, offs_m, offs_n, offs_d,
                                    d_ok, T, skt, svt, qk_scale, True, CAUSAL, False, BLOCK_N, UPCAST, IEEE, PAD_D)
    acc = acc / l_i[:, None]
    tl.store(LSE + bh * T + offs_m, m_i + tl.log2(l_i), mask=m_ok)
    tl.store(O + bh * T * D + offs_m[:, None] * D + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _attn_bwd_delta_kernel(
    O,  # (B, Hq, T, D) forward output, contiguous
    DO,  # (B, Hq, T, D) output gradient, contiguous
    DELTA,  # (B * Hq, T) fp32 output: delta_i = sum_d O_id * dO_id
    T, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: B * H * T * D may pass 2^31
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
    ptrs = bh * T * D + offs_m[:, None] * D + offs_d[None, :]
    o = tl.load(O + ptrs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


# Backward math, per (batch, query head), with c = softmax_scale:
#   S = c Q K^T,  P = softmax(S) = exp(S - LSE),  O = P V
#   dV = P^T dO                      (summed over the query heads sharing a K/V head)
#   dP = dO V^T
#   dS = P * (dP - delta),  delta_i = sum_j P_ij dP_ij = sum_d O_id dO_id
#   dQ = c dS K,   dK = c dS^T Q     (dK also summed over the group)
# P, dS are rounded to the input dtype before their dots, as in the forward.


@triton.jit
def _dkdv_blocks(dk, dv, k, v, q_base, DO, LSE, DELTA, DQ_ACC, seg_base, bh, lo, hi, offs_m0, offs_n, offs_d, d_ok,
                 T, D, sqt, qk_scale, sm_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, SEGMENTS: tl.constexpr,
                 ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                 PAD_D: tl.constexpr):
    # dK, dV (and dQ by atomics) over the query blocks [lo, hi) of one query head; MASKED: apply the
    # sequence end and the causal mask; SEGMENTS: and each row's document.
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        q = _load_tile(q_base, offs_m, offs_d, d_ok, T, sqt, MASKED, PAD_D)
        do = _load_tile(DO + bh * T * D, offs_m, offs_d, d_ok, T, D, MASKED, PAD_D)
        if MASKED:
            m_ok = offs_m < T
            lse = tl.load(LSE + bh * T + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(DELTA + bh * T + offs_m, mask=m_ok, other=0.0)
        else:
            lse = tl.load(LSE + bh * T + offs_m)
            delta = tl.load(DELTA + bh * T + offs_m)
        s = _dot(q, tl.trans(k), UPCAST, IEEE) * qk_scale  # (BLOCK_M, BLOCK_N)
        if MASKED:
            ok = _visible(offs_m, offs_n, T, CAUSAL)
            if SEGMENTS:
                ok = ok & _same_document(seg_base, offs_m, offs_n, T)
            p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
        else:
            p = tl.exp2(s - lse[:, None])
        dv += _dot(tl.trans(p.to(do.dtype)), do, UPCAST, IEEE)
        dp = _dot(do, tl.trans(v), UPCAST, IEEE)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds.to(q.dtype)), q, UPCAST, IEEE)
        if ATOMIC_DQ:
            dq = _dot(ds.to(k.dtype), k, UPCAST, IEEE) * sm_scale
            # relaxed: only the sum must be atomic, no ordering against other memory (acq_rel costs fences)
            dq_ptrs = DQ_ACC + bh * T * D + offs_m[:, None] * D + offs_d[None, :]
            if MASKED and PAD_D:
                tl.atomic_add(dq_ptrs, dq, mask=(offs_m[:, None] < T) & d_ok[None, :], sem="relaxed")
            elif MASKED:
                tl.atomic_add(dq_ptrs, dq, mask=offs_m[:, None] < T, sem="relaxed")
            elif PAD_D:
                tl.atomic_add(dq_ptrs, dq, mask=d_ok[None, :], sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs, dq, sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,  # (B, Hq, T, D) queries, strides sq*
    K,  # (B, Hkv, T, D) keys, strides sk*
    V,  # (B, Hkv, T, D) values, strides sv*
    DO,  # (B, Hq, T, D) output gradient, contiguous
    DK,  # (B, Hkv, T, D) output: key gradient, contiguous
    DV,  # (B, Hkv, T, D) output: value gradient, contiguous
    LSE,  # (B * Hq, T) fp32 base-2 log-sum-exp from the forward
    DELTA,  # (B * Hq, T) fp32 rowsum(O * dO)
    DQ_ACC,  # (B, Hq, T, D) fp32 zeros, accumulated with atomics when ATOMIC_DQ (else unused)
    SEG,  # (B, T) int32 document of each position, when SEGMENTS
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
    H_KV, T, D,
    qk_scale, sm_scale,  # softmax_scale * log2(e), softmax_scale
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, SEGMENTS: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, PAD_D: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1).to(tl.int64)
    b, hk = bhk // H_KV, bhk % H_KV
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_mask = (offs_n[:, None] < T) & d_ok[None, :]
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:  # queries before this key block cannot see it
        lo = (start_n // BLOCK_M) * BLOCK_M
    # Query blocks [mid, full_end) see every key of this block and lie inside T: no masks there. [lo, mid)
    # holds the diagonal, [full_end, T) the ragged end; a ragged last key block is masked throughout.
    full_end = lo + ((T - lo) // BLOCK_M) * BLOCK_M
    mid = lo
    if CAUSAL:
        mid = tl.minimum(lo + tl.cdiv(start_n + BLOCK_N - 1 - lo, BLOCK_M) * BLOCK_M, full_end)
    ragged = start_n + BLOCK_N > T  # selects rather than a runtime `if`, which must keep each variable's type
    if SEGMENTS:  # packed documents: every query block masked
        ragged = True
    mid = tl.where(ragged, lo, mid)
    full_end = tl.where(ragged, lo, full_end)
    seg_base = SEG + b * T
    H = H_KV * GROUP
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + b * sqb + h * sqh
        bh = b * H + h
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, DO, LSE, DELTA, DQ_ACC, seg_base, bh, lo, mid, offs_m0,
                              offs_n, offs_d, d_ok, T, D, sqt, qk_scale, sm_scale, True, CAUSAL, SEGMENTS, ATOMIC_DQ,
                              BLOCK_M, UPCAST, IEEE, PAD_D)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, DO, LSE, DELTA, DQ_ACC, seg_base, bh, mid, full_end, offs_m0,
                              offs_n, offs_d, d_ok, T, D, sqt, qk_scale, sm_scale, False, CAUSAL, SEGMENTS, ATOMIC_DQ,
                              BLOCK_M, UPCAST, IEEE, PAD_D)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, DO, LSE, DELTA, DQ_ACC, seg_base, bh, full_end, T, offs_m0,
                              offs_n, offs_d, d_ok, T, D, sqt, qk_scale, sm_scale, True, CAUSAL, SEGMENTS, ATOMIC_DQ,
                              BLOCK_M, UPCAST, IEEE, PAD_D)
    out = bhk * T * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, k_base, v_base, seg_base, lo, hi, offs_m, offs_n0, offs_d, d_ok, T, skt,
               svt, qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, SEGMENTS: tl.constexpr,
               BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, PAD_D: tl.constexpr):
    # dQ += dS K over the key blocks [lo, hi); MASKED: apply the sequence end and the causal mask; SEGMENTS:
    # and each row's document.
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k, v = _load_kv(k_base, v_base, offs_n, offs_d, d_ok, T, skt, svt, MASKED, PAD_D)
        s = _dot(q, tl.trans(k), UPCAST, IEEE) * qk_scale
        if MASKED:
            ok = _visible(offs_m, offs_n, T, CAUSAL)
            if SEGMENTS:
                ok = ok & _same_document(seg_base, offs_m, offs_n, T)
            p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
        else:
            p = tl.exp2(s - lse[:, None])
        dp = _dot(do, tl.trans(v), UPCAST, IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, UPCAST, IEEE)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q,  # (B, Hq, T, D) queries, strides sq*
    K,  # (B, Hkv, T, D) keys, strides sk*
    V,  # (B, Hkv, T, D) values, strides sv*
    DO,  # (B, Hq, T, D) output gradient, contiguous
    DQ,  # (B, Hq, T, D) output: query gradient, contiguous
    LSE,  # (B * Hq, T) fp32 base-2 log-sum-exp from the forward
    DELTA,  # (B * Hq, T) fp32 rowsum(O * dO)
    SEG,  # (B, T) int32 document of each position, when SEGMENTS
    START,  # (B, T) int32 first position of each position's document, when SEGMENTS
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
    H, T, D,
    qk_scale, sm_scale,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, SEGMENTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, PAD_D: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: B * H * T * D may pass 2^31
    b, h = bh // H, bh % H
    hk = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    d_ok = offs_d < D
    q_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + bh * T * D + offs_m[:, None] * D + offs_d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh * T + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + bh * T + offs_m, mask=m_ok, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    mid, hi = _key_range(start_m, T, CAUSAL, BLOCK_M, BLOCK_N)
    seg_base = SEG + b * T
    if SEGMENTS:
        lo = _first_key(START + b * T, offs_m, T, BLOCK_N)
        dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, seg_base, lo, hi, offs_m, offs_n0, offs_d, d_ok, T,
                        skt, svt, qk_scale, True, CAUSAL, True, BLOCK_N, UPCAST, IEEE, PAD_D)
    else:
        dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, seg_base, 0, mid, offs_m, offs_n0, offs_d, d_ok, T,
                        skt, svt, qk_scale, False, CAUSAL, False, BLOCK_N, UPCAST, IEEE, PAD_D)
        dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, seg_base, mid, hi, offs_m, offs_n0, offs_d, d_ok, T,
                        skt, svt, qk_scale, True, CAUSAL, False, BLOCK_N, UPCAST, IEEE, PAD_D)
    tl.store(DQ + bh * T * D + offs_m[:, None] * D + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=q_mask)


# ----------------------------------------------------------------------------------------------------------
# Host launchers


def _strides(*ts):
    return [s for t in ts for s in t.stride()[:3]]


def _flags(q):
    upcast = interpreting() and q.dtype == torch.bfloat16
    D = q.shape[-1]
    return dict(UPCAST=upcast, IEEE=q.dtype == torch.float32, BLOCK_D=_block_d(D), PAD_D=_block_d(D) != D)


def _block_d(head_dim):
    return max(16, next_power_of_2(head_dim))


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------------------------------------
# Tile tuning: on a GPU, the first call for a shape times each candidate configuration once and keeps the
# fastest for the life of the process. The deterministic path launches the defaults only, so its results do not
# depend on which configuration won a timing race in this process. MEGALM_ATTENTION_TUNING=0 turns tuning off.

_TUNED: dict[tuple, dict] = {}


def _tuning() -> bool:
    return os.environ.get("MEGALM_ATTENTION_TUNING", "1") != "0" and not interpreting()


def _time_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")


def _pick(key: tuple, candidates: list[dict], launch) -> dict:
    """The fastest of ``candidates`` for ``key`` (timed by running ``launch(cfg)``, once per process). A
    candidate that fails to compile or to fit this GPU's shared memory is skipped; the default may not fail."""
    if len(candidates) == 1 or not _tuning():
        return candidates[0]
    if key not in _TUNED:
        timings = {}
        for i, cfg in enumerate(candidates):
            try:
                timings[i] = _time_ms(lambda cfg=cfg: launch(cfg))
            except Exception:  # noqa: BLE001 - triton's OutOfResources and compile errors have no common base
                if i == 0:
                    raise
        _TUNED[key] = candidates[min(timings, key=timings.get)]
    return _TUNED[key]


def _documents(segments, q):
    """(segment ids, document starts) as the kernels read them, or dummies when there are no segments."""
    if segments is None:
        dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
        return dummy, dummy
    return segments.to(torch.int32).contiguous(), document_starts(segments).to(torch.int32).contiguous()


def _attn_forward(q, k, v, causal, scale, deterministic=False, segments=None):
    B, Hq, T, D = q.shape
    o = torch.empty((B, Hq, T, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B * Hq, T), dtype=torch.float32, device=q.device)
    seg, starts = _documents(segments, q)

    def launch(cfg):
        grid = (triton.cdiv(T, cfg["BLOCK_M"]), B * Hq)
        _attn_fwd_kernel[grid](q, k, v, o, lse, seg, starts, *_strides(q, k, v), Hq, T, D,
                               scale * math.log2(math.e), GROUP=Hq // k.shape[1], CAUSAL=causal,
                               SEGMENTS=segments is not None, **_flags(q), **cfg)

    candidates = attention_candidates(D, q.dtype, "fwd")[:1 if deterministic else None]
    launch(_pick(("fwd", B, Hq, k.shape[1], T, D, q.dtype, causal, segments is not None), candidates, launch))
    return o, lse


def _attn_backward(do, q, k, v, o, lse, causal, scale, deterministic, segments=None):
    """dQ comes either from atomics in the dK/dV kernel or from a kernel of its own (deterministic); when
    tuning, both ways are timed, the atomic one with each dK/dV tile candidate."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    do = do.contiguous()
    delta = torch.empty_like(lse)
    _attn_bwd_delta_kernel[(triton.cdiv(T, 64), B * Hq)](o, do, delta, T, D, BLOCK_M=64, BLOCK_D=_block_d(D))
    dk = torch.empty((B, Hkv, T, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, Hkv, T, D), dtype=v.dtype, device=v.device)
    common = dict(GROUP=Hq // Hkv, CAUSAL=causal, SEGMENTS=segments is not None, **_flags(q))
    seg, starts = _documents(segments, q)
    qk_scale = scale * math.log2(math.e)
    dq_out = {}     # "acc" (fp32, atomic path) or "dq" (q's dtype, own kernel): allocated only when a path runs

    def dq_buffer(name, dtype):
        if name not in dq_out:
            dq_out[name] = torch.empty((B, Hq, T, D), dtype=dtype, device=q.device)
        return dq_out[name]

    def run(plan):
        cfg = plan["dkdv"]
        acc = dq_buffer("acc", torch.float32) if plan["atomic"] else dk      # dk: unused when not atomic
        _attn_bwd_dkdv_kernel[(triton.cdiv(T, cfg["BLOCK_N"]), B * Hkv)](
            q, k, v, do, dk, dv, lse, delta, acc, seg, *_strides(q, k, v),
            Hkv, T, D, qk_scale, scale, ATOMIC_DQ=plan["atomic"], **common, **cfg)
        if not plan["atomic"]:
            cfg = plan["dq"]
            _attn_bwd_dq_kernel[(triton.cdiv(T, cfg["BLOCK_M"]), B * Hq)](
                q, k, v, do, dq_buffer("dq", q.dtype), lse, delta, seg, starts, *_strides(q, k, v), Hq, T, D, qk_scale,
                scale, **common, **cfg)

    dkdv = attention_candidates(D, q.dtype, "dkdv")
    split = dict(atomic=False, dkdv=dkdv[0], dq=attention_candidates(D, q.dtype, "dq")[0])
    plans = [split] if deterministic else [dict(atomic=True, dkdv=cfg) for cfg in dkdv] + [split]
    plan = _pick(("bwd", B, Hq, Hkv, T, D, q.dtype, causal, segments is not None), plans, run)
    if plan["atomic"]:
        dq_buffer("acc", torch.float32).zero_()   # after any timing runs, which accumulated into it too
    run(plan)
    return (dq_out["acc"].to(q.dtype) if plan["atomic"] else dq_out["dq"]), dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, deterministic, segments):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        o, lse = _attn_forward(q, k, v, causal, scale, deterministic, segments)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale, ctx.deterministic, ctx.segments = causal, scale, deterministic, segments
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _attn_backward(do, q, k, v, o, lse, ctx.causal, ctx.scale, ctx.deterministic, ctx.segments)
        return dq, dk, dv, None, None, None, None


def flash_attention(q, k, v, causal=True, softmax_scale=None, deterministic=False, segments=None):
    """Fused attention: q (B, Hq, T, D), k/v (B, Hkv, T, D) -> (B, Hq, T, D) in q's dtype.

    ``segments`` (B, T): the packed document of each position; a query sees only keys of its own document
    (block-diagonal, and causal when ``causal``). Key blocks before the earliest document of a query block are
    skipped; the others are masked by segment id.

    ``deterministic=True`` computes dQ in its own pass, never with atomics, and launches the default tiles
    only, so gradients are bit-identical run to run; otherwise a GPU takes whichever tiles and dQ path it
    timed fastest for the shape. Falls back to ``attention_reference`` where Triton cannot run.
    """
    _check(q, k, v)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if segments is not None and tuple(segments.shape) != (q.shape[0], q.shape[2]):
        raise ValueError(f"segments must be (B, T) = {(q.shape[0], q.shape[2])}; got {tuple(segments.shape)}")
    if not can_launch(q, k, v):
        return attention_reference(q, k, v, causal, scale, segments)
    return FlashAttentionFunction.apply(q, k, v, causal, scale, deterministic, segments)
