"""DeepSpeed as megalm's data-parallel engine (ZeRO 0-3), behind megalm's ``Engine`` interface.
Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models".

How megalm's layout maps onto DeepSpeed (measured with deepspeed 0.19.8):
- one DeepSpeed engine per rank wraps all of this rank's model chunks (``_Chunks``);
- the model-parallel unit (``compat.MPU``) reports the tensor-parallel rank as "model-parallel rank" and the
  tp x pp group as the model-parallel group, so every stage counts in the global gradient norm;
- the schedules already divide each micro-batch loss by the number of micro-batches, so every backward uses
  ``scale_wrt_gas=False``; non-last stages backpropagate the surrogate ``sum(output * grad)`` through
  ``engine.backward`` (DeepSpeed's hooks see only what goes through it); the accumulation boundary is the last
  backward of the step;
- ZeRO-3: ``clear_backward_seen_flag`` before every backward (several backwards per step otherwise trip its
  reentrancy check), ``zero.Init`` on the stage's data-parallel group (``zero3.py``), and with pp > 1 the
  trace check runs within the data-parallel group (``compat.pin_zero3_trace_check``);
- tied embeddings (pp > 1): the first stage's copy receives the summed gradient, the last stage's copy a zero
  gradient (so it adds nothing to the norm), and after the step the first stage's updated weight is copied
  over; the same code for every ZeRO stage.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megalm.config import Config
from megalm.engine.base import Engine
from megalm.engine.deepspeed.compat import MPU, ensure_distributed, pin_zero3_trace_check, singleton_groups_if_needed
from megalm.engine.deepspeed.config import deepspeed_config_dict
from megalm.engine.deepspeed.writer_gather import WriterGather
from megalm.engine.deepspeed.zero3 import register_external_parameters
from megalm.engine.optim import build_optimizer, optimizer_step_count
from megalm.engine.precision import activation_dtype
from megalm.parallel.shard import counts_in_norm, is_tied_copy, tied_embedding_params
from megalm.parallel.topology import Topology
from megalm.runtime.phases import timed

OPTIM_KEYS = ("exp_avg", "exp_avg_sq")
# where DeepSpeed 0.19 keeps gradients besides .grad: ZeRO-1/2 partitions at the boundary, ZeRO-2 during
# accumulation, ZeRO-3 partitions, BF16_Optimizer's fp32 accumulation buffer
GRAD_HOLDERS = ("averaged_gradients", "all_grad_tensors", "grad_partitions_flat_buffer", "fp32_groups_gradients_flat")


def _tensors(obj):
    """The tensors in nested lists, tuples and dict values."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


class _Chunks(torch.nn.Module):
    """All model chunks of this rank as one module, so one DeepSpeed engine (one optimizer, one gradient norm,
    one ZeRO partitioning) covers them; ``forward(index, x, targets, segments)`` runs chunk ``index``."""

    def __init__(self, chunks):
        super().__init__()
        self.chunks = torch.nn.ModuleList(chunks)

    def forward(self, index: int, x, targets=None, segments=None):
        return self.chunks[index](x, targets, segments=segments)


def _stage0_masters(opt) -> dict:
    """ZeRO-0 in bf16/fp16 wraps megalm's torch optimizer in DeepSpeed's FP16_UnfusedOptimizer, which keeps each
    parameter's fp32 master (``fp32_groups``, what the torch optimizer steps and keys its state by) outside the
    safe_get/set_* API. id(param) -> its master; empty for every other optimizer."""
    if not hasattr(opt, "fp16_groups") or not hasattr(opt, "fp32_groups"):
        return {}
    return {id(p): master for lp, fp32 in zip(opt.fp16_groups, opt.fp32_groups) for p, master in zip(lp, fp32)}


def _shape(param) -> tuple:
    """The (local, tensor-parallel) shape of a parameter, also when ZeRO-3 has partitioned it away."""
    return tuple(param.ds_shape) if hasattr(param, "ds_shape") else tuple(param.shape)


class DeepSpeedEngine(Engine):
    """megalm's Engine interface on a DeepSpeed engine; see the module docstring for the mapping."""

    def __init__(self, cfg: Config, topo: Topology, chunks, device: torch.device):
        deepspeed = self._ds_module = ensure_distributed()
        self.cfg, self.topo, self.chunks, self.device = cfg, topo, chunks, device
        self.activation_dtype = activation_dtype(cfg)
        self.ds_config = deepspeed_config_dict(cfg, topo.dp)
        self.stage = cfg.parallel.zero_stage
        self.groups = singleton_groups_if_needed(topo)
        if self.stage == 3 and topo.pp > 1:
            pin_zero3_trace_check(deepspeed, self.groups["dp"])
        self.named = [(n, p, chunk) for chunk in chunks for n, p in chunk.named_parameters()]
        self.torch_optimizer = build_optimizer(cfg, [(f"{i}:{n}", p) for i, (n, p, _) in enumerate(self.named)])
        if self.stage == 3:
            register_external_parameters(deepspeed, chunks)
        self.ds, *_ = deepspeed.initialize(model=_Chunks(chunks), optimizer=self.torch_optimizer,
                                           config=self.ds_config, mpu=MPU(topo, self.groups),
                                           dist_init_required=False)
        self.backwards_per_step = cfg.grad_accumulation_steps(topo.dp) * len(chunks)
        self._backwards = 0
        self._tied = tied_embedding_params(chunks, topo.pp)
        self._masters = _stage0_masters(self.ds.optimizer) if self.stage == 0 else {}
        if self._masters:
            self._undo_state_initialising_step()

    @torch.no_grad()
    def _undo_state_initialising_step(self) -> None:
        """DeepSpeed's FP16_UnfusedOptimizer (ZeRO-0 in bf16/fp16) creates the optimizer state by a real step
        with zero gradients (``initialize_optimizer_states``, deepspeed 0.19.8). For AdamW that decays the fp32
        masters once and puts the step count one ahead, which shrinks the early updates through the bias
        correction (0.73x at the first step). Undo both: masters back to the weights they were copied from, the
        state dropped (AdamW creates it at the first real step)."""
        for _, p, _ in self.named:
            self._masters[id(p)].copy_(p.detach().float())
        self.torch_optimizer.state.clear()

    # ---- the step ---------------------------------------------------------------------------------------
    def forward(self, chunk: int, x, targets=None, segments=None):
        return self.ds(chunk, x, targets, segments)

    def backward(self, chunk: int, output, output_grad=None):
        """The loss (last stage; already divided by the micro-batch count) or the surrogate sum(out * grad)."""
        self._backwards += 1
        self.ds.set_gradient_accumulation_boundary(self._backwards == self.backwards_per_step)
        if self.stage == 3:
            self.ds.optimizer.clear_backward_seen_flag()
        if output_grad is None:
            loss = output
        else:
            loss = (output * output_grad).sum()
            if self.cfg.train.precision == "fp16":               # the received gradient is already loss-scaled
                opt = self.ds.optimizer
                loss = loss / float(getattr(opt, "loss_scale", None) or getattr(opt, "cur_scale", 1.0))
        self.ds.backward(loss, scale_wrt_gas=False)

    def step(self, lr: float) -> float:
        """Tied sum, clip (DeepSpeed, at train.grad_clip), update, zero. Returns the global norm before clipping."""
        if self._backwards != self.backwards_per_step:
            raise RuntimeError(f"DeepSpeedEngine.step after {self._backwards} backward passes; expected "
                               f"{self.backwards_per_step} (micro-batches x chunks) per optimizer step")
        self._backwards = 0
        with timed(self.phases, "dp_comm", "tied embedding sum"):
            self._gather_tied_gradients()
        with timed(self.phases, "optimizer", "deepspeed step"):   # its data-parallel reduction ran in backward
            own_norm = self._fp32_stage0_norm()
            if own_norm is not None and not math.isfinite(own_norm):
                return own_norm     # ZeRO-0 fp32's plain torch optimizer would step with it; DeepSpeed's own
                                    # optimizers skip such a step and report the norm non-finite (tested)
            for group in self.torch_optimizer.param_groups:
                group["lr"] = lr
            self.ds.step()
            self._copy_tied_weights()
        norm = own_norm if own_norm is not None else self.ds.get_global_grad_norm()
        return float(norm)

    def _fp32_stage0_norm(self):
        """ZeRO-0 in fp32 runs a plain torch optimizer, which reports no norm: compute it as megalm does."""
        if self.stage != 0 or self.cfg.train.precision != "fp32":
            return None
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for name, p, chunk in self.named:
            if p.grad is not None and counts_in_norm(chunk, name, p, self.topo.pp, self.topo.tp_rank):
                total += p.grad.double().pow(2).sum()
        if self.topo.tp * self.topo.pp > 1:
            dist.all_reduce(total, group=self.groups["mp"])
        return float(total.sqrt())

    def _gather_tied_gradients(self) -> None:
        """The first stage's copy gets the sum of both copies' gradients, the last stage's copy zero."""
        if not self._tied:
            return
        utils = self._ds_module.utils
        for p in self._tied:
            grad = utils.safe_get_full_grad(p)
            grad = torch.zeros(_shape(p), dtype=torch.float32, device=self.device) if grad is None else grad
            total = grad.float().clone()
            dist.all_reduce(total, group=self.topo.embed_group)
            keep = self.topo.is_first_stage
            utils.safe_set_full_grad(p, (total if keep else torch.zeros_like(total)).to(grad.dtype))

    def _copy_tied_weights(self) -> None:
        if not self._tied:
            return
        src = dist.get_global_rank(self.topo.embed_group, 0)
        for p in self._tied:
            value = self._full_fp32(p) if self.topo.is_first_stage else torch.empty(_shape(p))
            value = value.contiguous()
            dist.broadcast(value, src=src, group=self.topo.embed_group)
            if not self.topo.is_first_stage:
                self._set_weight(p, value)

    # ---- checkpoint seam --------------------------------------------------------------------------------
    def _stage0_master(self, p, key: str | None = None):
        """ZeRO-0 bf16/fp16: p's fp32 master (key None) or that master's optimizer state ``key``."""
        master = self._masters.get(id(p))
        if master is None or key is None:
            return master
        return self.torch_optimizer.state.get(master, {}).get(key)

    def _full_fp32(self, p) -> torch.Tensor:
        """The fp32 master value of this rank's (TP) slice; a collective over the DP group for ZeRO 1-3."""
        value = self._ds_module.utils.safe_get_full_fp32_param(p)
        value = self._stage0_master(p) if value is None else value
        return (p.detach() if value is None else value).float().reshape(_shape(p))

    def _full_state(self, p, key: str):
        value = self._ds_module.utils.safe_get_full_optimizer_state(p, key)
        if value is None:
            value = self._stage0_master(p, key)
        if value is None:
            value = self.torch_optimizer.state.get(p, {}).get(key)
        return None if value is None else value.float().reshape(_shape(p))

    def state_tensors(self, with_optimizer: bool = True, trainable_only: bool = False):
        """fp32 master weights and Adam moments under layout-free names. Every DP rank must run it to the end: a
        value ZeRO partitions is assembled on data-parallel rank 0 alone (``WriterGather``), and the other ranks
        yield None for it."""
        with_moments = with_optimizer and self.cfg.optimizer.name == "adamw" and self.optimizer_step_count() > 0
        if with_moments:
            self._link_optimizer_state()
        saved = [(name, p) for name, p, chunk in self.named
                 if not is_tied_copy(chunk, name, self.topo.pp) and (p.requires_grad or not trainable_only)]
        gather = WriterGather([p for _, p in saved], self.groups["dp"], self.device)
        for name, p in saved:
            yield f"model.{name}", self._value_for_writer(gather, p), p.shard
            for key in OPTIM_KEYS if with_moments else ():
                yield f"optim.{key}.{name}", self._value_for_writer(gather, p, key), p.shard

    def _value_for_writer(self, gather: WriterGather, p, key: str | None = None) -> torch.Tensor | None:
        if not gather.handles(p):                           # ZeRO-0: each rank holds the whole value
            return self._full_fp32(p) if key is None else self._full_state(p, key)
        value = gather.value(p, key)
        return None if value is None else value.reshape(_shape(p))

    def optimizer_step_count(self) -> int:
        return optimizer_step_count(self.torch_optimizer)

    _SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")

    @property
    def loss_scale(self) -> float | None:
        state = self.loss_scale_state()
        return float(state["cur_scale"]) if state and "cur_scale" in state else None

    def loss_scale_state(self) -> dict | None:
        """DeepSpeed's fp16 dynamic loss scaler (the same on every rank: it reduces overflow over dp and mp)."""
        scaler = getattr(self.ds.optimizer, "loss_scaler", None)
        if self.cfg.train.precision != "fp16" or scaler is None:
            return None
        return {k: getattr(scaler, k) for k in self._SCALER_FIELDS if hasattr(scaler, k)}

    def load_loss_scale_state(self, state: dict | None) -> None:
        scaler = getattr(self.ds.optimizer, "loss_scaler", None)
        if self.cfg.train.precision == "fp16" and scaler is not None and state:
            for key in self._SCALER_FIELDS:
                if key in state and hasattr(scaler, key):
                    setattr(scaler, key, state[key])

    @torch.no_grad()
    def _set_weight(self, p, value: torch.Tensor) -> None:
        """Set both the working (possibly bf16, possibly partitioned) weight and its fp32 master."""
        if hasattr(p, "ds_id"):
            with self._ds_module.zero.GatheredParameters([p], modifier_rank=0):
                p.data.copy_(value.reshape(p.shape).to(p.dtype))
        else:
            p.data.copy_(value.to(p.dtype))
        self._ds_module.utils.safe_set_full_fp32_param(p, value.float().to(self.device))
        master = self._stage0_master(p)
        if master is not None:
            master.copy_(value.reshape(master.shape))

    def _create_optimizer_state(self, step_count: int) -> None:
        """torch Adam creates its state at the first step; a resumed run needs it before, to fill it."""
        flat = getattr(self.ds.optimizer, "fp32_partitioned_groups_flat", None)     # ZeRO-3 steps these
        params = flat if self.stage == 3 else [q for g in self.torch_optimizer.param_groups for q in g["params"]]
        for q in params:
            state = self.torch_optimizer.state[q]
            for key in OPTIM_KEYS:
                state.setdefault(key, torch.zeros_like(q, memory_format=torch.preserve_format))
            state["step"] = torch.tensor(float(step_count))
        self._link_optimizer_state()

    def _link_optimizer_state(self) -> None:
        """ZeRO-1/2 and bf16 give each parameter views of its optimizer state for the safe_get/set_* API once,
        after the first step, but they step one parameter group at a time and link after the first group:
        the no-decay group stays unlinked ("exp_avg not found in optimizer state fragment", deepspeed 0.19.8).
        Link again, now that every group has state."""
        opt = self.ds.optimizer
        if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()

    @torch.no_grad()
    def load_state_tensors(self, read, step_count: int, with_optimizer: bool = True) -> None:
        """``read(name, shard_spec, local_shape, optional=False)`` returns this rank's slice of a stored tensor."""
        moments = with_optimizer and step_count > 0 and self.cfg.optimizer.name == "adamw"
        if moments:
            self._create_optimizer_state(step_count)
        utils = self._ds_module.utils
        for name, p, _ in self.named:
            self._set_weight(p, read(f"model.{name}", p.shard, _shape(p)).float())
            for key in OPTIM_KEYS if moments else ():
                value = read(f"optim.{key}.{name}", p.shard, _shape(p), optional=True)
                if value is None:
                    continue
                if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
                    utils.safe_set_full_optimizer_state(p, value.float().to(self.device), key)
                elif id(p) in self._masters:
                    self._stage0_master(p, key).copy_(value.reshape(p.shape))
                else:
                    self.torch_optimizer.state[p][key].copy_(value)

    # ---- DeepSpeed's own checkpoints (for `megalm convert` and its test) ----------------------------------
    def save_native_checkpoint(self, folder, tag=None) -> None:
        """DeepSpeed's native ZeRO checkpoint (collective). With pp > 1 give each stage its own folder: DeepSpeed
        names files by the model-parallel rank, which here is the tensor-parallel rank."""
        self.ds.save_checkpoint(str(folder), tag=tag)

    # ---- what the memory benchmark measures --------------------------------------------------------------
    def model_states(self) -> dict[str, list]:
        opt, torch_opt = self.ds.optimizer, self.torch_optimizer
        params = [p.ds_tensor if hasattr(p, "ds_tensor") else p for _, p, _ in self.named]
        flat = getattr(opt, "fp32_partitioned_groups_flat", None)     # ZeRO-3 puts these in param_groups to step
        stepped = flat if flat is not None else [q for group in torch_opt.param_groups for q in group["params"]]
        own_weights = {id(p) for p in params}
        return {
            "params": params,
            "grads": [p.grad for _, p, _ in self.named] + [q.grad for q in stepped] +
                     [t for name in GRAD_HOLDERS for t in _tensors(getattr(opt, name, None))],
            "master": [q for q in stepped if id(q) not in own_weights],   # ZeRO-0 fp32 steps the model's weights
            "moments": [v for state in torch_opt.state.values() for k, v in state.items() if k in OPTIM_KEYS],
            "buffers": [t for bucket in (getattr(opt, "ipg_buckets", None) or {}).values()
                        for t in _tensors(getattr(bucket, "buffer", None))],
        }

    def reduce_bucket_elements(self) -> int:
        return self.ds.zero_reduce_bucket_size()
