"""DeepSpeed as megalm's data-parallel engine (ZeRO 0-3): the only module that imports deepspeed.

``DeepSpeedEngine`` offers NativeEngine's methods (``forward``, ``backward``, ``step``, ``state_tensors``,
``optimizer_step_count``, ``load_state_tensors``), so the loop and megalm's own pipeline schedules drive it
unchanged. Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models".

How megalm's layout maps onto DeepSpeed (measured facts: /work/shared/notes/pipeline-with-deepspeed.md):
- one DeepSpeed engine per rank wraps all of this rank's model chunks (``_Chunks``);
- the model-parallel unit (``_MPU``) reports the *tensor*-parallel rank as "model-parallel rank" and the
  tp x pp group as the model-parallel group, so every stage counts in the global gradient norm (trap 5);
- the schedules already divide each micro-batch loss by the number of micro-batches, so every backward uses
  ``scale_wrt_gas=False`` (trap 1), non-last stages backpropagate the surrogate ``sum(output * grad)``
  through ``engine.backward`` (trap 2), and the accumulation boundary is the last backward of the step;
- ZeRO-3: ``clear_backward_seen_flag`` before every backward (trap 4), ``zero.Init`` on the stage's DP group
  (trap 6), and with pp > 1 the trace check runs within the DP group (trap 3, ``_pin_zero3_trace_check``);
- tied embeddings (pp > 1): the first stage's copy receives the summed gradient, the last stage's copy a zero
  gradient (so it adds nothing to the norm), and after the step the first stage's updated weight is copied
  over; the same code for every ZeRO stage.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

from megalm.config import Config, ConfigError
from megalm.flops import matmul_params
from megalm.model.transformer import master_init
from megalm.parallel.parallelize import build_chunks, counts_in_norm, is_tied_copy, tied_embedding_params
from megalm.parallel.topology import Topology
from megalm.train.optim import build_optimizer, optimizer_step_count

PINNED_DEEPSPEED = "0.19.8"     # the version the ZeRO-3 trace-check patch was written for and tested with
OPTIM_KEYS = ("exp_avg", "exp_avg_sq")


def import_deepspeed():
    """Import deepspeed, choosing its CPU accelerator by itself when there is no CUDA GPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    return deepspeed


def zero_to_fp32_state_dict(folder, tag: str) -> dict:
    """DeepSpeed's own consolidation (``zero_to_fp32``) of the ZeRO checkpoint ``folder/tag``: the whole fp32
    model of one model-parallel rank, by DeepSpeed's parameter names. Its Python API, not the command, which
    would also import huggingface_hub. Raises ImportError when deepspeed is not installed."""
    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)


# ---- configuration: megalm's settings and an optional user JSON, merged and checked ----------------------

def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else copy.deepcopy(value)
    return out


def _adopt_user_json(cfg: Config, user: dict, source: str) -> None:
    """Settings the JSON gives and megalm left at its default are adopted into cfg; contradictions are errors."""
    p, t = cfg.parallel, cfg.train
    for section in ("optimizer", "scheduler"):
        if section in user:
            raise ConfigError(f"{source} has an {section!r} section; megalm builds the optimizer and learning-rate "
                              f"schedule from optimizer.* and lr.* (remove {section!r} from the JSON)")
    stage = user.get("zero_optimization", {}).get("stage")
    if stage is not None and stage != p.zero_stage:
        if p.zero_stage != 0:
            raise ConfigError(f"{source} sets zero_optimization.stage={stage} but parallel.zero_stage="
                              f"{p.zero_stage}; make them agree or leave one unset")
        p.zero_stage = int(stage)
    zero = user.get("zero_optimization", {})
    if zero.get("offload_optimizer", {}).get("device") == "cpu":
        p.zero_offload = True
    wanted = [name for name in ("bf16", "fp16") if user.get(name, {}).get("enabled")]
    if len(wanted) > 1:
        raise ConfigError(f"{source} enables both bf16 and fp16; enable one")
    if wanted and wanted[0] != t.precision:
        if t.precision != "fp32":
            raise ConfigError(f"{source} enables {wanted[0]} but train.precision={t.precision}; make them agree")
        t.precision = wanted[0]
    if "gradient_clipping" in user:
        t.grad_clip = float(user["gradient_clipping"])
    if p.zero_offload and p.zero_stage < 2:
        raise ConfigError(f"CPU offload needs ZeRO stage 2 or 3 (got {p.zero_stage} from {source})")


BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _resolve_batch(cfg: Config, dp: int, user: dict, source: str) -> None:
    """DeepSpeed's train batch = micro batch x gradient accumulation x dp. The JSON's batch keys are adopted
    where megalm's train.micro_batch_size / train.global_batch_size were left at their defaults (Config keeps
    no record of which keys were given, so a value equal to the default counts as unset); what neither gives is
    completed as DeepSpeed itself would (accumulation 1 when only a train or only a micro batch is known; the
    default micro batch when only an accumulation is). A contradiction names all four numbers of both sides."""
    t, default = cfg.train, type(cfg.train)()
    given = {k: user[k] for k in BATCH_KEYS if user.get(k, "auto") != "auto"}
    if not given:
        return                      # megalm's own numbers, already checked by Config.validate
    set_micro = t.micro_batch_size != default.micro_batch_size
    set_total = t.global_batch_size != default.global_batch_size
    clashes = [f"{key}={given[key]} but train.{name}={mine}" for name, key, mine, is_set in (
        ("micro_batch_size", "train_micro_batch_size_per_gpu", t.micro_batch_size, set_micro),
        ("global_batch_size", "train_batch_size", t.global_batch_size, set_total))
        if key in given and is_set and mine != given[key]]
    micro = given.get("train_micro_batch_size_per_gpu", t.micro_batch_size if set_micro else None)
    total = given.get("train_batch_size", t.global_batch_size if set_total else None)
    accum = given.get("gradient_accumulation_steps")
    if micro is None:
        micro = total / ((accum or 1) * dp) if total is not None else default.micro_batch_size
    if accum is None:
        accum = total / (micro * dp) if total is not None else 1
    if total is None:
        total = micro * accum * dp
    whole = all(float(v).is_integer() and v >= 1 for v in (micro, accum, total))
    if clashes or not whole or total != micro * accum * dp:
        mine = t.global_batch_size / (t.micro_batch_size * dp)
        raise ConfigError(
            f"batch sizes disagree{': ' + '; '.join(clashes) if clashes else ''}. DeepSpeed needs train batch = "
            f"micro batch x gradient accumulation x dp, each a whole number >= 1. {source} (completed with "
            f"megalm's values) gives train_batch_size={total:g}, micro batch {micro:g}, gradient accumulation "
            f"{accum:g}, dp={dp}: {micro:g} x {accum:g} x {dp} = {micro * accum * dp:g}; megalm has "
            f"train.global_batch_size={t.global_batch_size}, train.micro_batch_size={t.micro_batch_size}, "
            f"gradient accumulation {mine:g}, dp={dp}. Make them agree, drop the batch keys from the JSON (megalm "
            f"fills them), or leave train.micro_batch_size and train.global_batch_size at their defaults")
    if (int(micro), int(total)) != (t.micro_batch_size, t.global_batch_size):
        t.micro_batch_size, t.global_batch_size = int(micro), int(total)
        cfg.validate(dp * cfg.parallel.tp * cfg.parallel.pp)    # e.g. the interleaved schedule's rule, again


def _deepspeed_json(name: str) -> Path:
    """A DeepSpeed JSON path, or a packaged one by name (``zero3``, ``zero3.json``, ``configs/deepspeed/zero3.json``
    from outside the repository)."""
    from megalm.config import preset_folder

    packaged = preset_folder() / "deepspeed"
    for candidate in (Path(name), packaged / f"{Path(name).stem}.json"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"parallel.deepspeed_config={name} does not exist; give a path or one of "
                      f"{', '.join(sorted(p.stem for p in packaged.glob('*.json')))}")


def bucket_elements(cfg: Config) -> int:
    """DeepSpeed's reduce/all-gather bucket when the user's JSON names none: the configs/deepspeed/ value (5e7
    elements), but never much more than this rank's share of the model. DeepSpeed's own default (5e8) makes
    ZeRO-1 hold a 2 GB fp32 bucket per rank whatever the model's size."""
    m = cfg.model
    per_rank = sum(matmul_params(m).values()) // (cfg.parallel.tp * cfg.parallel.pp) if m.vocab_size else 0
    return int(min(50_000_000, max(per_rank, 1_000_000)))


def resolve_deepspeed_config(cfg: Config, dp: int) -> dict:
    """The DeepSpeed config dict for this run; a user JSON (parallel.deepspeed_config) wins where it speaks,
    megalm's batch, precision, ZeRO and clipping settings fill what it leaves out. Updates cfg to match."""
    user, source = {}, "megalm's settings"
    if cfg.parallel.deepspeed_config:
        path = _deepspeed_json(cfg.parallel.deepspeed_config)
        user, source = json.loads(path.read_text()), f"DeepSpeed config {path}"
        _adopt_user_json(cfg, user, source)
        _resolve_batch(cfg, dp, user, source)
    p, t = cfg.parallel, cfg.train
    bucket = bucket_elements(cfg)
    zero = {"stage": p.zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if p.zero_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if p.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ours = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accumulation_steps(dp),
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        # fp16: dynamic loss scaling (loss_scale 0) as megalm's own engine does it: halved at every overflow
        # (hysteresis 1), doubled after train.loss_scale_window clean steps
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0,
                 "initial_scale_power": int(math.log2(t.initial_loss_scale)),
                 "loss_scale_window": t.loss_scale_window, "hysteresis": 1, "min_loss_scale": 1},
        "zero_allow_untested_optimizer": True,   # megalm hands DeepSpeed a torch.optim instance (no JIT build)
        "zero_force_ds_cpu_optimizer": False,    # ... also under offload (no cpu_adam build)
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    merged = _deep_merge(ours, user)
    merged.update({k: ours[k] for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                         "gradient_accumulation_steps")})
    merged["zero_optimization"]["stage"] = p.zero_stage
    return merged


# ---- process groups and the model-parallel unit ---------------------------------------------------------

def _singleton_groups_if_needed(topo: Topology) -> dict:
    """Real group objects for every axis DeepSpeed asks about. Topology leaves size-1 axes as None (meaning
    "no communication"), but DeepSpeed would read None as the whole world. Collective: all ranks call it."""
    if not dist.is_initialized():
        raise RuntimeError("DeepSpeed needs torch.distributed; megalm.engine initialises it for a world of one")
    world, rank = dist.get_world_size(), dist.get_rank()
    single = None
    if (topo.dp == 1 or topo.tp * topo.pp == 1) and world > 1:
        for r in range(world):      # every rank creates every singleton group, in the same order
            g = dist.new_group([r])
            single = g if r == rank else single
    elif world == 1:
        single = dist.group.WORLD
    return {"dp": topo.dp_group if topo.dp > 1 else single,
            "mp": topo.mp_group if topo.tp * topo.pp > 1 else single}


class _MPU:
    """Megatron-style model-parallel unit over megalm's Topology, as DeepSpeed reads it (trap 5): the
    "model-parallel rank" is the tensor-parallel rank (so every pipeline stage counts in the gradient norm) and
    the model-parallel group is tp x pp (the norm is summed over it)."""

    def __init__(self, topo: Topology, groups: dict):
        self.topo, self.groups = topo, groups

    def get_model_parallel_rank(self):
        return self.topo.tp_rank

    def get_model_parallel_world_size(self):
        return self.topo.tp * self.topo.pp

    def get_model_parallel_group(self):
        return self.groups["mp"]

    def get_data_parallel_rank(self):
        return self.topo.dp_rank

    def get_data_parallel_world_size(self):
        return self.topo.dp

    def get_data_parallel_group(self):
        return self.groups["dp"]


def ensure_distributed():
    """DeepSpeed needs a process group even for one process: make a gloo world of one when none exists."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    os.environ.setdefault("LOCAL_RANK", "0")    # read by DeepSpeed's rank-consistency checks
    os.environ.setdefault("RANK", str(dist.get_rank()))
    os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
    deepspeed = import_deepspeed()
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)   # adopts our group
    return deepspeed


def _pin_zero3_trace_check(deepspeed, dp_group) -> None:
    """Trap 3: ZeRO-3 checks at each step that its recorded module trace is the same on all ranks by a
    broadcast from global rank 0 over the whole world; pipeline stages hold different modules and never meet
    there. Run the same check within this stage's data-parallel group. A DeepSpeed internal: pinned to the
    version it was written for, covered by test_pp2_dp2_equals_one_process (ZeRO-3) in
    tests/distributed/test_deepspeed.py."""
    from deepspeed.runtime.zero import partitioned_param_coordinator as ppc

    if deepspeed.__version__ != PINNED_DEEPSPEED or not hasattr(ppc, "assert_ints_same_as_other_ranks"):
        raise ConfigError(f"ZeRO-3 with pipeline parallelism needs a patch tested on deepspeed "
                          f"{PINNED_DEEPSPEED}, found {deepspeed.__version__}; install deepspeed=={PINNED_DEEPSPEED} "
                          f"or use parallel.zero_stage=1 with pp > 1")

    def same_in_dp_group(ints):
        n = torch.tensor([len(ints)], dtype=torch.long)
        longest = n.clone()
        dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=dp_group)
        values = torch.tensor(list(ints), dtype=torch.long)
        theirs = values.clone()
        if int(longest) == len(ints):
            dist.broadcast(theirs, src=dist.get_global_rank(dp_group, 0), group=dp_group)
        if int(longest) != len(ints) or not torch.equal(theirs, values):
            raise RuntimeError(f"ZeRO-3 module trace differs within the data-parallel group on rank "
                               f"{dist.get_rank()}: {ints}")

    ppc.assert_ints_same_as_other_ranks = same_in_dp_group


def _check_precision(precision: str, device: torch.device) -> None:
    """DeepSpeed's fp16 optimizers need a GPU (megalm's own engine also runs fp16 on a CPU)."""
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("train.precision=fp16 with DeepSpeed needs a CUDA GPU; on this CPU use "
                         "train.precision=bf16, or megalm's own engine (parallel.engine=native, zero_stage=0)")


# ---- building the model: ZeRO-3 layers partitioned as they are built --------------------------------------

def model_dtype(cfg: Config) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.precision]


def build_deepspeed_chunks(cfg: Config, topo: Topology, device: torch.device, init: bool = True):
    """This rank's model chunks for a DeepSpeed run. Under ZeRO-3 the layers are built inside ``zero.Init`` on
    the stage's data-parallel group, so each parameter is partitioned the moment its module exists and is then
    initialised one tensor at a time: no rank ever holds the whole model, not even its tensor-parallel slice."""
    _check_precision(cfg.train.precision, device)
    deepspeed = ensure_distributed()
    ds_config = resolve_deepspeed_config(cfg, topo.dp)
    if cfg.parallel.zero_stage != 3:
        return build_chunks(cfg, topo, device, init=init, dtype=model_dtype(cfg))
    groups = _singleton_groups_if_needed(topo)
    offload = cfg.parallel.zero_offload
    with deepspeed.zero.Init(data_parallel_group=groups["dp"], config_dict_or_path=ds_config,
                             mpu=_MPU(topo, groups), remote_device="cpu" if offload else None):
        # no dtype=: deepspeed 0.19.8 reads an explicit dtype as bf16 on a CPU without fp16; the config's
        # bf16/fp16 flags give the right one
        chunks = build_chunks(cfg, topo, device, init=False, dtype=model_dtype(cfg))
    if init:
        for chunk in chunks:
            for name, param in chunk.named_parameters():
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    master = master_init(name, param.shard.global_shape(param.shape), cfg.model, cfg.train.seed)
                    param.data.copy_(param.shard.take(master))
    return chunks


def _register_external_parameters(deepspeed, chunks) -> None:
    """ZeRO-3 gathers a module's parameters around its forward. megalm's layers often read a child's weight
    directly (``F.linear(x, self.wq.weight)``, the tied head reading ``embed.weight``), so every parameter is
    also registered with its owner's parent: gathered for the parent's forward, and again when activation
    checkpointing recomputes it."""
    for parent in (m for chunk in chunks for m in chunk.modules()):
        for child in parent.children():
            for param in child.parameters(recurse=False):
                deepspeed.zero.register_external_parameter(parent, param)


class _Chunks(torch.nn.Module):
    """All model chunks of this rank as one module, so one DeepSpeed engine (one optimizer, one gradient norm,
    one ZeRO partitioning) covers them; ``forward(index, x, targets)`` runs chunk ``index``."""

    def __init__(self, chunks):
        super().__init__()
        self.chunks = torch.nn.ModuleList(chunks)

    def forward(self, index: int, x, targets=None):
        return self.chunks[index](x, targets)


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


class DeepSpeedEngine:
    """NativeEngine's interface on a DeepSpeed engine; see the module docstring for the mapping."""

    def __init__(self, cfg: Config, topo: Topology, chunks, device: torch.device):
        _check_precision(cfg.train.precision, device)
        deepspeed = self._ds_module = ensure_distributed()
        self.cfg, self.topo, self.chunks, self.device = cfg, topo, chunks, device
        self.ds_config = resolve_deepspeed_config(cfg, topo.dp)
        self.stage = cfg.parallel.zero_stage
        self.groups = _singleton_groups_if_needed(topo)
        if self.stage == 3 and topo.pp > 1:
            _pin_zero3_trace_check(deepspeed, self.groups["dp"])
        self.named = [(n, p, chunk) for chunk in chunks for n, p in chunk.named_parameters()]
        self.torch_optimizer = build_optimizer(cfg, [(f"{i}:{n}", p) for i, (n, p, _) in enumerate(self.named)])
        if self.stage == 3:
            _register_external_parameters(deepspeed, chunks)
        self.ds, *_ = deepspeed.initialize(model=_Chunks(chunks), optimizer=self.torch_optimizer,
                                           config=self.ds_config, mpu=_MPU(topo, self.groups),
                                           dist_init_required=False)
        self.backwards_per_step = cfg.grad_accumulation_steps(topo.dp) * len(chunks)
        self._backwards = 0
        self._tied = tied_embedding_params(chunks, topo)
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
    def forward(self, chunk: int, x, targets=None):
        return self.ds(chunk, x, targets)

    def backward(self, chunk: int, output, output_grad=None):
        """The loss (last stage; already divided by the micro-batch count) or the surrogate sum(out * grad)."""
        self._backwards += 1
        self.ds.set_gradient_accumulation_boundary(self._backwards == self.backwards_per_step)
        if self.stage == 3:
            self.ds.optimizer.clear_backward_seen_flag()        # trap 4
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
        self._gather_tied_gradients()
        own_norm = self._fp32_stage0_norm()
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
            if p.grad is not None and counts_in_norm(chunk, name, p, self.topo):
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

    def state_tensors(self, with_optimizer: bool = True):
        """fp32 master weights and Adam moments under layout-free names. Every DP rank must run it to the end
        (each value is gathered over the DP group); the caller keeps what its rank owns."""
        with_moments = with_optimizer and self.cfg.optimizer.name == "adamw" and self.optimizer_step_count() > 0
        if with_moments:
            self._link_optimizer_state()
        for name, p, chunk in self.named:
            if is_tied_copy(chunk, name, self.topo):
                continue
            yield f"model.{name}", self._full_fp32(p), p.shard
            for key in OPTIM_KEYS if with_moments else ():
                yield f"optim.{key}.{name}", self._full_state(p, key), p.shard

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
    def save_deepspeed_checkpoint(self, folder, tag=None) -> None:
        """DeepSpeed's native ZeRO checkpoint (collective). With pp > 1 give each stage its own folder: DeepSpeed
        names files by the model-parallel rank, which here is the tensor-parallel rank (trap 5)."""
        self.ds.save_checkpoint(str(folder), tag=tag)
