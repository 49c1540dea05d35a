"""megalm's own engine: torch AdamW/SGD, data-parallel gradient all-reduce, tied-embedding sums, clipping, and
fp16 loss scaling agreed over all ranks (``megalm.engine.base.Engine`` is the interface)."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megalm.config import Config
from megalm.engine.base import Engine
from megalm.engine.loss_scale import DynamicLossScaler
from megalm.engine.optim import build_optimizer, optimizer_step_count
from megalm.engine.precision import activation_dtype, autocast_for
from megalm.parallel.pipeline.stage import sum_tied_gradients
from megalm.parallel.shard import counts_in_norm, is_tied_copy, tied_embedding_params
from megalm.parallel.topology import Topology
from megalm.runtime.phases import timed

OPTIM_KEYS = ("exp_avg", "exp_avg_sq", "momentum_buffer")


class NativeEngine(Engine):
    def __init__(self, cfg: Config, topo: Topology, chunks, device: torch.device):
        self.cfg, self.topo, self.chunks, self.device = cfg, topo, chunks, device
        self.activation_dtype = activation_dtype(cfg)
        self.named = [(f"{c}:{n}", n, p, chunk) for c, chunk in enumerate(chunks) for n, p in chunk.named_parameters()]
        self.optimizer = build_optimizer(cfg, [(key, p) for key, _, p, _ in self.named])
        self.scaler = None
        if cfg.train.precision == "fp16":
            self.scaler = DynamicLossScaler(topo, cfg.train.initial_loss_scale, cfg.train.loss_scale_window)

    def forward(self, chunk: int, x, targets=None, segments=None):
        with autocast_for(self.cfg.train.precision, self.device):
            return self.chunks[chunk](x, targets, segments=segments)

    def backward(self, chunk: int, output, output_grad=None):
        if output_grad is None:
            output = self.scaler.scale_loss(output) if self.scaler else output
            output.backward()   # on earlier pipeline stages the received gradient carries the scale already
        else:
            torch.autograd.backward(output, output_grad)

    def params(self):
        return [p for _, _, p, _ in self.named]

    def _all_reduce_data_parallel(self) -> None:
        if self.topo.dp == 1:
            return
        grads = [p.grad for p in self.params() if p.grad is not None]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.topo.dp_group)
        flat /= self.topo.dp
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)

    def grad_norm(self) -> float:
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for _, name, p, chunk in self.named:
            if p.grad is not None and counts_in_norm(chunk, name, p, self.topo.pp, self.topo.tp_rank):
                total += p.grad.double().pow(2).sum()
        if self.topo.mp_group is not None:
            dist.all_reduce(total, group=self.topo.mp_group)
        return float(total.sqrt())

    def step(self, lr: float) -> float:
        """Reduce gradients, clip, update, zero. Returns the global gradient norm before clipping; under fp16,
        inf when some rank's gradients overflowed (every rank then skips the update and lowers the scale)."""
        with timed(self.phases, "dp_comm"):
            sum_tied_gradients(tied_embedding_params(self.chunks, self.topo.pp), self.topo)
            self._all_reduce_data_parallel()
        with timed(self.phases, "optimizer"):
            return self._clip_and_update(lr)

    def _clip_and_update(self, lr: float) -> float:
        if self.scaler:
            overflow = self.scaler.unscale_and_check([p.grad for p in self.params() if p.grad is not None],
                                                     self.device)
            self.scaler.update(overflow)
            if overflow:
                self.optimizer.zero_grad(set_to_none=True)
                return float("inf")
        norm = self.grad_norm()
        if not math.isfinite(norm):          # a NaN or inf gradient somewhere: the weights stay as they are
            self.optimizer.zero_grad(set_to_none=True)
            return norm
        clip = self.cfg.train.grad_clip
        if clip > 0 and norm > clip:
            for p in self.params():
                if p.grad is not None:
                    p.grad.mul_(clip / (norm + 1e-6))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def discard_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # ---- checkpoint seam: (global name, local tensor, shard spec) triples ----
    def state_tensors(self, with_optimizer: bool = True, trainable_only: bool = False):
        """Model weights and, per weight, its optimizer state, under layout-free names."""
        for _, name, p, chunk in self.named:
            if is_tied_copy(chunk, name, self.topo.pp) or (trainable_only and not p.requires_grad):
                continue
            yield f"model.{name}", p.detach(), p.shard
            if not with_optimizer:
                continue
            state = self.optimizer.state.get(p, {})
            for key in OPTIM_KEYS:
                if key in state and state[key] is not None:
                    yield f"optim.{key}.{name}", state[key], p.shard

    def optimizer_step_count(self) -> int:
        return optimizer_step_count(self.optimizer)

    def model_states(self) -> dict[str, list]:
        params = self.params()
        return {"params": params, "grads": [p.grad for p in params], "master": [],
                "moments": [v for state in self.optimizer.state.values() for k, v in state.items() if k in OPTIM_KEYS],
                "buffers": []}

    @property
    def loss_scale(self) -> float | None:
        return self.scaler.scale if self.scaler else None

    def loss_scale_state(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler else None

    def load_loss_scale_state(self, state: dict | None) -> None:
        if self.scaler and state:
            self.scaler.load_state_dict(state)

    @torch.no_grad()
    def load_state_tensors(self, read, step_count: int, with_optimizer: bool = True) -> None:
        """``read(name, shard_spec, local_shape)`` returns this rank's slice of a stored tensor, or None."""
        for _, name, p, _ in self.named:
            p.copy_(read(f"model.{name}", p.shard, tuple(p.shape)))
            if not with_optimizer or step_count == 0:
                continue
            state = {}
            for key in OPTIM_KEYS:
                value = read(f"optim.{key}.{name}", p.shard, tuple(p.shape), optional=True)
                if value is not None:
                    state[key] = value.to(device=p.device, dtype=torch.float32).clone()
            if self.cfg.optimizer.name == "adamw":
                state["step"] = torch.tensor(float(step_count))
            if state:
                self.optimizer.state[p] = state
