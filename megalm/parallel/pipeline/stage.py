"""Which layers each pipeline rank holds, and the tied-embedding sum (the layout rules: ``megalm.config.rules``).

The model is cut into ``pp x virtual_stages`` slices ("virtual stages") in pipeline order. With
interleaving (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
Megatron-LM", section 2.2.2) rank ``p`` holds ``virtual_stages`` model chunks, and chunk ``c`` is virtual
stage ``c*pp + p``: with pp=2, v=2 and 8 layers, rank 0 holds layers 0-1 and 4-5, rank 1 holds 2-3 and 6-7.
The embedding lives on the first chunk of rank 0, the final norm, head and loss on the last chunk of rank
pp-1.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megalm.config.rules import check_pipeline_layers


def partition_layers(num_layers: int, pp: int, virtual_stages: int = 1, explicit=None) -> list[list[range]]:
    """Global layer indices of every model chunk, indexed ``[pp_rank][chunk]``.

    ``explicit``: layer counts per (virtual) stage in pipeline order (length pp x virtual_stages); else equal
    slices. Chunk ``c`` of rank ``p`` is slice ``c*pp + p``.
    """
    check_pipeline_layers(num_layers, pp, virtual_stages, explicit)
    slices = pp * virtual_stages
    counts = list(explicit) if explicit is not None else [num_layers // slices] * slices
    starts = [sum(counts[:s]) for s in range(slices)]
    slice_of = [[c * pp + p for c in range(virtual_stages)] for p in range(pp)]
    return [[range(starts[s], starts[s] + counts[s]) for s in row] for row in slice_of]


def sum_tied_gradients(params, topology) -> None:
    """All-reduce (sum) the gradients of tied copies over the first and last stage of this (dp, tp) column.

    The first stage's embedding and the last stage's head hold the same weight; each sees only its own use, so
    the true gradient is the sum of both. Call after the schedule and before the optimizer step, on the ranks
    that hold a copy (both ends of the pipeline); a no-op where ``topology.embed_group`` is None (pp == 1 and
    middle stages). Copies without a gradient contribute zeros.
    """
    group = topology.embed_group
    params = list(params)
    if group is None or not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])  # one collective for all tied tensors
    dist.all_reduce(flat, group=group)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p.grad))
