"""Which pieces of which tensors each rank of a target layout owns, computed on the meta device (no memory)."""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from megalm.config import ModelConfig
from megalm.model.transformer import ModelChunk
from megalm.parallel.parallelize import is_tied_copy
from megalm.parallel.pipeline.stage import partition_layers
from megalm.parallel.topology import TensorParallel


@dataclass(frozen=True)
class PlannedPiece:
    name: str              # layout-free tensor name, e.g. "model.layers.3.attn.wq.weight"
    spec: object           # ShardSpec of the target rank
    local_shape: tuple
    global_shape: tuple


def param_name(tensor_name: str) -> str:
    """'model.X' and 'optim.<state>.X' both describe parameter X."""
    head, _, rest = tensor_name.partition(".")
    return rest if head == "model" else rest.partition(".")[2]


def meta_chunks(model: ModelConfig, tp: int, tp_rank: int, pp: int, pp_rank: int, virtual_stages: int = 1,
                explicit=None) -> list[ModelChunk]:
    ids = partition_layers(model.num_layers, pp, virtual_stages, explicit)[pp_rank]
    handle = TensorParallel(size=tp, rank=tp_rank)
    with torch.device("meta"):
        return [ModelChunk(model, handle, list(layers), pp_rank == 0 and c == 0,
                           pp_rank == pp - 1 and c == len(ids) - 1) for c, layers in enumerate(ids)]


def plan_layout(model: ModelConfig, tensor_names, tp: int = 1, pp: int = 1, virtual_stages: int = 1,
                explicit=None) -> dict[str, list[PlannedPiece]]:
    """file name -> the pieces that rank (data-parallel rank 0 of each (pp, tp) cell) writes.

    ``tensor_names``: every stored tensor ("model.*", "optim.*.*"); each is planned where its parameter lives.
    """
    by_param: dict[str, list[str]] = {}
    for name in tensor_names:
        by_param.setdefault(param_name(name), []).append(name)
    plan, placed = {}, set()
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            topo = SimpleNamespace(pp=pp)
            pieces = []
            for chunk in meta_chunks(model, tp, tp_rank, pp, pp_rank, virtual_stages, explicit):
                for pname, param in chunk.named_parameters():
                    spec = param.shard
                    sharded = spec.dim is not None and spec.parts > 1
                    if is_tied_copy(chunk, pname, topo) or (not sharded and tp_rank != 0):
                        continue
                    for name in by_param.get(pname, []):
                        shape = tuple(param.shape)
                        pieces.append(PlannedPiece(name, spec, shape, tuple(spec.global_shape(shape))))
                        placed.add(name)
            if pieces:
                plan[f"shard-{pp_rank * tp + tp_rank:05d}.safetensors"] = pieces
    missing = set(tensor_names) - placed
    if missing:
        raise ValueError(f"the target model has no place for {sorted(missing)[:3]}: the source is another model")
    return plan
