"""The one module that imports deepspeed, and what megalm needs to fit under it: the import (with the CPU
accelerator chosen when there is no GPU), a process group for a world of one, the model-parallel unit over
megalm's topology, DeepSpeed's own ZeRO consolidation, and one version-pinned patch.

How megalm's layout maps onto DeepSpeed (measured with deepspeed 0.19.8):
- the model-parallel unit (``MPU``) reports the *tensor*-parallel rank as "model-parallel rank" and the
  tp x pp group as the model-parallel group, so every pipeline stage counts in the global gradient norm;
- ZeRO-3 checks at each step that its recorded module trace is the same on all ranks, by a broadcast over the
  whole world; pipeline stages hold different modules, so with pp > 1 that check runs within the stage's
  data-parallel group instead (``pin_zero3_trace_check``).
"""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from megalm.config import ConfigError
from megalm.parallel.topology import Topology
from megalm.runtime.env import LaunchInfo, export_launch_env

PINNED_DEEPSPEED = "0.19.8"     # the version the ZeRO-3 trace-check patch was written for and tested with


def import_deepspeed():
    """Import deepspeed, choosing its CPU accelerator by itself when there is no CUDA GPU."""
    export_launch_env(deepspeed=True)
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


def announce_jit_builds(builder_names: list[str]) -> list[str]:
    """Say, before DeepSpeed goes quiet for minutes, which of its ops it is about to compile (once per machine:
    torch caches the build under TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions); returns the names of
    the ops that will be compiled. Printed by local rank 0 only; the other local ranks wait on torch's lock."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import _get_build_directory

    pending = []
    for builder_name in builder_names:
        builder = get_accelerator().create_op_builder(builder_name)
        if builder is None or installed_ops.get(builder.name, False):
            continue
        folder = _get_build_directory(builder.name, verbose=False)
        if not any(f.endswith(".so") for f in os.listdir(folder)):
            pending.append((builder.name, folder))
    if pending and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        for name, folder in pending:
            print(f"megalm: DeepSpeed is compiling its {name} op, once per machine (1-2.5 minutes on 2 CPU cores); "
                  f"later starts load it from {folder} (set TORCH_EXTENSIONS_DIR to keep the cache elsewhere)",
                  flush=True)
    return [name for name, _ in pending]


def ensure_distributed():
    """DeepSpeed needs a process group even for one process: make a gloo world of one when none exists."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    # read by DeepSpeed's rank-consistency checks
    export_launch_env(LaunchInfo(rank, world, int(os.environ.get("LOCAL_RANK", 0)), "127.0.0.1", 29500, "group"))
    deepspeed = import_deepspeed()
    announce_jit_builds(["ShareMemCommBuilder"])            # init_distributed loads it (compiling it the first time)
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)   # adopts our group
    return deepspeed


def singleton_groups_if_needed(topo: Topology) -> dict:
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


class MPU:
    """Megatron-style model-parallel unit over megalm's Topology, as DeepSpeed reads it: the
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


def pin_zero3_trace_check(deepspeed, dp_group) -> None:
    """ZeRO-3 checks at each step that its recorded module trace is the same on all ranks by a broadcast
    from global rank 0 over the whole world; pipeline stages hold different modules and never meet there. Run
    the same check within this stage's data-parallel group. A DeepSpeed internal: pinned to the version it was
    written for, covered by test_pp2_dp2_equals_one_process (ZeRO-3) in tests/distributed/test_deepspeed.py."""
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
