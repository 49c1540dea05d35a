"""Which pieces of which tensors each rank of a target layout owns, computed on the meta device (no memory)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from megalm.checkpoint.load import param_name
from megalm.config import ModelConfig
from megalm.model.transformer import ModelChunk
from megalm.parallel.pipeline.stage import partition_layers
from megalm.parallel.shard import is_tied_copy, writes_piece
from megalm.parallel.topology import TensorParallel


class ConvertError(ValueError):
    """A conversion that cannot start; the message names the file or the numbers."""


def check_target_layout(model: ModelConfig, tp: int, pp: int, vs: int) -> None:
    """The rule book's verdict on (tp, pp, virtual stages) for ``model``, before anything is written."""
    from megalm.config import Config
    from megalm.config.rules import validate

    pp_layers = {"pp": pp, "virtual_stages": vs, "tp": tp}
    cfg = Config.from_dict({"model": dataclasses.asdict(model), "parallel": pp_layers,
                            "train": {"global_batch_size": 8 * max(pp, 1), "micro_batch_size": 8},
                            "data": {"seq_len": min(128, model.max_seq_len)}}, explicit=False)
    try:
        validate(cfg, tp * pp, cuda=False)
    except ValueError as e:
        raise ConvertError(f"target layout tp={tp} pp={pp} virtual_stages={vs} does not fit the model: {e}") from e


@dataclass(frozen=True)
class PlannedPiece:
    name: str              # layout-free tensor name, e.g. "model.layers.3.attn.wq.weight"
    spec: object           # ShardSpec of the target rank
    local_shape: tuple
    global_shape: tuple


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
            pieces = []
            for chunk in meta_chunks(model, tp, tp_rank, pp, pp_rank, virtual_stages, explicit):
                for pname, param in chunk.named_parameters():
                    spec = param.shard
                    if is_tied_copy(chunk, pname, pp) or not writes_piece(spec, tp_rank):
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
