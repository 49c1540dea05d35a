"""Kernel tests run on CUDA when present, else through Triton's CPU interpreter.

TRITON_INTERPRET must be set before the kernel modules are imported (``triton.jit`` reads it when a kernel is
defined), so it is set here, at collection, and only when there is no GPU.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
