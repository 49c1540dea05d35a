"""Optimizer parameter groups and the learning-rate schedule."""
from __future__ import annotations

import math

import torch

from megalm.config import Config


def param_groups(named_params, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices only; norms, biases (every tensor of rank < 2) get none."""
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            shape = getattr(p, "ds_shape", p.shape)        # ZeRO-3 has flattened p; ds_shape is its real shape
            (decay if len(shape) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: Config, named_params) -> torch.optim.Optimizer:
    o = cfg.optimizer
    groups = param_groups(named_params, o.weight_decay)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr)
    # foreach=False keeps the update order fixed, so a resumed run repeats the same floats.
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=False)


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine/linear/constant decay."""
    peak, floor, warmup, total = cfg.optimizer.lr, cfg.optimizer.min_lr, cfg.lr.warmup_steps, cfg.train.steps
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if cfg.lr.decay == "constant" or total <= warmup:
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if cfg.lr.decay == "linear":
        return floor + (peak - floor) * (1.0 - progress)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def optimizer_step_count(optimizer: torch.optim.Optimizer) -> int:
    """Optimizer steps taken so far, as torch's AdamW counts them (0 before the first step, and for SGD)."""
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0
