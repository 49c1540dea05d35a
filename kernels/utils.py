"""Shared pieces of the kernels: the guarded Triton import, where kernels can run, and launch heuristics.

Every kernel module does ``from .utils import triton, tl``. When Triton is missing, those names are a small
stand-in whose ``jit`` returns the function unchanged, so the kernel modules still import and their wrappers
fall back to the PyTorch references.
"""
from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # noqa: BLE001 - any failure to import (missing, broken install) means "no Triton"
    HAS_TRITON = False

    class _NoTriton:
        """Enough of ``triton``/``triton.language`` for kernel definitions to parse; never launched."""

        constexpr = None

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton()


def interpreting() -> bool:
    """True when Triton runs kernels through its numpy interpreter (CPU tensors, for tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> bool:
    """Triton imports and has somewhere to run: a CUDA device or the interpreter."""
    return HAS_TRITON and (torch.cuda.is_available() or interpreting())


def can_launch(*tensors: torch.Tensor) -> bool:
    """Whether a kernel can run on these tensors: CUDA tensors with Triton, or any when interpreting."""
    if not HAS_TRITON:
        return False
    if interpreting():
        return True
    return all(t.is_cuda for t in tensors)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int = 0) -> int:
    """Streaming multiprocessors of a CUDA device; a small stand-in count under the interpreter."""
    if interpreting() or not torch.cuda.is_available():
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(t: torch.Tensor) -> int:
    return num_sms(t.device.index or 0) if t.is_cuda else num_sms()


def row_kernel_settings(n_cols: int, element_size: int) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps) for kernels that hold one row of ``n_cols`` in registers.

    A row must fit in 64 KB (as in Triton's layer-norm tutorial): 16k fp32 or 32k bf16 columns.
    """
    block = next_power_of_2(n_cols)
    if block * element_size > 65536:
        raise ValueError(f"rows of {n_cols} columns x {element_size} bytes exceed the 64 KB a fused row "
                         f"kernel holds; use the reference for this hidden size")
    num_warps = 4
    if block >= 2048:
        num_warps = 8
    if block >= 8192:
        num_warps = 16
    return block, num_warps


# (BLOCK_M, BLOCK_N, num_warps, num_stages). bf16/fp16 at head dims up to 128: the default first, then tiles of
# the sizes FlashAttention-2 and Triton's fused-attention tutorial search over on A100/H100. Every one compiles
# for sm_80 and sm_90 within their shared memory (python -m megalm.kernels.compile_check --arch 80|90).
_CANDIDATES = {
    ("fwd", 64): [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4), (64, 128, 4, 3)],
    ("fwd", 128): [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3)],
    ("dkdv", 64): [(32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 4), (64, 64, 4, 3)],
    ("dkdv", 128): [(32, 64, 8, 2), (64, 64, 8, 2), (32, 128, 8, 2), (32, 64, 4, 3)],
    ("dq", 64): [(128, 32, 4, 3)],
    ("dq", 128): [(64, 32, 8, 2)],
}


def attention_candidates(head_dim: int, dtype: torch.dtype, stage: str) -> list[dict]:
    """Tile configurations for one attention stage ("fwd", "dkdv" or "dq"), the default first; more than one
    only where tuning pays (bf16/fp16 at head dims up to 128, on a GPU). fp32 and head dim 256 keep one
    configuration that fits the shared memory (their tiles need twice of it); the dQ kernel keeps one too.
    Under the interpreter, small 16x16 tiles make short test sequences span several blocks, exercising the
    edge masks."""
    if interpreting():
        return [dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)]
    if head_dim > 128 or dtype == torch.float32:
        wide = 8 if head_dim > 128 else 4  # d=256 accumulators need the registers of 8 warps
        if stage == "fwd":
            return [dict(BLOCK_M=64, BLOCK_N=32, num_warps=wide, num_stages=2)]
        return [dict(BLOCK_M=32, BLOCK_N=32, num_warps=wide, num_stages=1)]
    table = _CANDIDATES[(stage, 64 if head_dim <= 64 else 128)]
    return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st) for m, n, w, st in table]
