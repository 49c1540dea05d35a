"""Engines: the optimizer, the data-parallel reduction and the precision policy behind one interface
(``base.Engine``). ``native`` is megalm's own; ``deepspeed/`` wraps DeepSpeed ZeRO 0-3 (its ``compat`` module is
the only one in megalm that imports deepspeed)."""
from __future__ import annotations

import torch

from megalm.config import Config
from megalm.engine.base import Engine, ForwardEngine
from megalm.parallel.topology import Topology


def build_engine(cfg: Config, topo: Topology, device: torch.device, init: bool = True) -> Engine:
    """This rank's model chunks and the engine that trains them. ``init``: initialise the weights (False when a
    checkpoint will fill them). Under ZeRO-3 the chunks are built already partitioned over data parallelism."""
    if cfg.uses_deepspeed:
        from megalm.engine.deepspeed.engine import DeepSpeedEngine
        from megalm.engine.deepspeed.zero3 import build_deepspeed_chunks

        return DeepSpeedEngine(cfg, topo, build_deepspeed_chunks(cfg, topo, device, init), device)
    from megalm.engine.native import NativeEngine
    from megalm.parallel.parallelize import build_chunks

    return NativeEngine(cfg, topo, build_chunks(cfg, topo, device, init=init), device)


__all__ = ["Engine", "ForwardEngine", "build_engine"]
