"""Kernel tests run on CUDA when present, else through Triton's CPU interpreter.

TRITON_INTERPRET must be set before the kernel modules are imported (``triton.jit`` reads it when a kernel is
defined), so it is set here, at collection, and only when there is no GPU. On a GPU, attention's per-shape tile
tuning is off by default here (each of the many test shapes would compile and time every candidate);
``test_gpu_every_tile_candidate_matches_reference`` runs each candidate instead.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MEGALM_ATTENTION_TUNING", "0")
