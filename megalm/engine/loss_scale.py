"""fp16 dynamic loss scaling that every rank agrees on (Micikevicius et al. 2018, arXiv:1710.03740).

The loss is multiplied by ``scale`` before backward, so small fp16 gradients do not flush to zero; before the
update the gradients are divided by it again. When any gradient on any rank overflowed, every rank skips the
update and halves the scale; after ``growth_interval`` clean steps in a row the scale doubles.

Why not ``torch.amp.GradScaler``: it decides per process. Under tensor, pipeline or data parallelism an
overflow on one rank would make that rank skip its step while the others update, and the replicas would drift
apart for good. Here the overflow flag is summed over the model-parallel and data-parallel groups first.
The state (scale and clean-step count) goes into checkpoints, so a resumed run scales exactly as an
uninterrupted one.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megalm.parallel.topology import Topology


class DynamicLossScaler:
    def __init__(self, topo: Topology, initial_scale: float = 2.0**16, growth_interval: int = 1000,
                 backoff_factor: float = 0.5, growth_factor: float = 2.0, min_scale: float = 1.0):
        self.topo = topo
        self.scale = float(initial_scale)
        self.growth_interval, self.backoff_factor = growth_interval, backoff_factor
        self.growth_factor, self.min_scale = growth_factor, min_scale
        self.clean_steps = 0        # steps since the last overflow (or the last growth)
        self.skipped_steps = 0      # overflows so far in this process, for the log

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    def unscale_and_check(self, grads: list[torch.Tensor], device: torch.device) -> bool:
        """Divide the gradients by the scale in place; True when any rank saw an inf or NaN (collective)."""
        found = torch.zeros(1, dtype=torch.float32, device=device)
        inv_scale = torch.full((1,), 1.0 / self.scale, dtype=torch.float32, device=device)
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        for group in by_device.values():
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, inv_scale)
        for axis in (self.topo.mp_group, self.topo.dp_group):   # None where that axis has size 1
            if axis is not None:
                dist.all_reduce(found, group=axis)
        return bool(found.item() > 0)

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale = max(self.min_scale, self.scale * self.backoff_factor)
            self.clean_steps = 0
            self.skipped_steps += 1
            return
        self.clean_steps += 1
        if self.clean_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.clean_steps = float(state["scale"]), int(state["clean_steps"])
