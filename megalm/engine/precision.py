"""The precision policy, owned by the engines: which dtype the weights are held in, and which dtype flows
between pipeline stages.

megalm's own engine keeps fp32 weights and runs the forward under autocast, so the residual stream between
stages is fp32; DeepSpeed's bf16/fp16 modes hold the model itself in the low precision, and so do its
activations.
"""
from __future__ import annotations

import contextlib

import torch

from megalm.config import Config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def weight_dtype(cfg: Config) -> torch.dtype:
    """The dtype the model's parameters are built in."""
    return DTYPES[cfg.train.precision] if cfg.uses_deepspeed else torch.float32


def activation_dtype(cfg: Config) -> torch.dtype:
    """The dtype of the activations (and their gradients) sent between pipeline stages."""
    return weight_dtype(cfg)


def autocast_for(precision: str, device: torch.device):
    """megalm's own engine: low-precision compute over fp32 weights."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])
