"""This rank's model chunks for a DeepSpeed run. Under ZeRO-3 the layers are built inside ``zero.Init`` on the
stage's data-parallel group, so each parameter is partitioned the moment its module exists and is then
initialised one tensor at a time: no rank ever holds the whole model, not even its tensor-parallel slice."""
from __future__ import annotations

import torch

from megalm.config import Config
from megalm.engine.deepspeed.compat import MPU, ensure_distributed, singleton_groups_if_needed
from megalm.engine.deepspeed.config import deepspeed_config_dict
from megalm.engine.precision import weight_dtype
from megalm.model.transformer import master_init
from megalm.parallel.parallelize import build_chunks
from megalm.parallel.topology import Topology


def build_deepspeed_chunks(cfg: Config, topo: Topology, device: torch.device, init: bool = True):
    """The chunks in DeepSpeed's working precision (ZeRO-3: partitioned as they are built)."""
    deepspeed = ensure_distributed()
    if cfg.parallel.zero_stage != 3:
        return build_chunks(cfg, topo, device, init=init, dtype=weight_dtype(cfg))
    groups = singleton_groups_if_needed(topo)
    with deepspeed.zero.Init(data_parallel_group=groups["dp"], config_dict_or_path=deepspeed_config_dict(cfg, topo.dp),
                             mpu=MPU(topo, groups), remote_device="cpu" if cfg.parallel.zero_offload else None):
        # no dtype=: deepspeed 0.19.8 reads an explicit dtype as bf16 on a CPU without fp16; the config's
        # bf16/fp16 flags give the right one
        chunks = build_chunks(cfg, topo, device, init=False, dtype=weight_dtype(cfg))
    if init:
        for chunk in chunks:
            for name, param in chunk.named_parameters():
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    master = master_init(name, param.shard.global_shape(param.shape), cfg.model, cfg.train.seed)
                    param.data.copy_(param.shard.take(master))
    return chunks


def register_external_parameters(deepspeed, chunks) -> None:
    """ZeRO-3 gathers a module's parameters around its forward. megalm's layers often read a child's weight
    directly (``F.linear(x, self.wq.weight)``, the tied head reading ``embed.weight``), so every parameter is
    also registered with its owner's parent: gathered for the parent's forward, and again when activation
    checkpointing recomputes it."""
    for parent in (m for chunk in chunks for m in chunk.modules()):
        for child in parent.children():
            for param in child.parameters(recurse=False):
                deepspeed.zero.register_external_parameter(parent, param)
