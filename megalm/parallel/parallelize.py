"""The one place where parallelism is composed: which layers this rank holds, which TP slice, which kernels.

``build_chunks`` turns (config, topology) into this rank's model chunks: pipeline partition first (global layer
ids per virtual stage), then the tensor-parallel handle, then LoRA adapters (the base frozen), then activation
checkpointing, then layout-free initialisation (every tensor from its own seeded generator, sliced for this rank).
"""
from __future__ import annotations

import torch

from megalm.config import Config
from megalm.config.rules import lora_targets
from megalm.model.lora import add_lora
from megalm.model.ops import build_ops
from megalm.model.transformer import ModelChunk, init_chunk
from megalm.parallel.pipeline.stage import partition_layers
from megalm.parallel.topology import Topology


def chunk_layer_ids(cfg: Config, topo: Topology) -> list[list[int]]:
    """Global layer indices of each model chunk this rank holds."""
    p = cfg.parallel
    parts = partition_layers(cfg.model.num_layers, p.pp, p.virtual_stages, p.pipeline_layers)
    return [list(r) for r in parts[topo.pp_rank]]


def build_chunks(cfg: Config, topo: Topology, device: torch.device, init: bool = True,
                 dtype: torch.dtype = torch.float32) -> list[ModelChunk]:
    k = cfg.kernels
    ops = build_ops(k.attention, k.norm, device, rope=k.rope, swiglu=k.swiglu, cross_entropy=k.cross_entropy)
    ids = chunk_layer_ids(cfg, topo)
    chunks = []
    for c, layer_ids in enumerate(ids):
        first = topo.is_first_stage and c == 0
        last = topo.is_last_stage and c == len(ids) - 1
        chunk = ModelChunk(cfg.model, topo.tensor_parallel, layer_ids, first, last, ops,
                           cfg.parallel.activation_checkpointing)
        if cfg.lora.rank:
            add_lora(chunk, lora_targets(cfg), cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout)
        if init:
            init_chunk(chunk, cfg.model, cfg.train.seed)
        chunk = chunk.to(device=device, dtype=dtype)
        if cfg.train.compile:
            compile_blocks(chunk)
        chunks.append(chunk)
    return chunks


def compile_blocks(chunk: ModelChunk) -> None:
    """torch.compile each Transformer block in place (``Module.compile``: the parameters keep their names). The
    blocks share one code object, so the compiled graph is reused from the second block on."""
    for block in chunk.layers.values():
        block.compile()
