"""Which layers each pipeline rank holds, the rules a pipeline layout must obey, and the tied-embedding sum.

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

SCHEDULE_NAMES = ("gpipe", "1f1b", "interleaved")


def _check_layers(num_layers: int, pp: int, virtual_stages: int, explicit) -> None:
    for name, value in (("parallel.pp", pp), ("parallel.virtual_stages", virtual_stages)):
        if value < 1:
            raise ValueError(f"{name}={value} must be at least 1")
    slices = pp * virtual_stages
    if explicit is not None:
        counts = list(explicit)
        if len(counts) != slices:
            raise ValueError(
                f"parallel.pipeline_layers has {len(counts)} entries but pp x virtual_stages = {pp} x "
                f"{virtual_stages} = {slices} (virtual) stages; give one layer count per stage in pipeline "
                f"order")
        if any(c < 0 for c in counts) or sum(counts) != num_layers:
            raise ValueError(
                f"parallel.pipeline_layers={counts} sums to {sum(counts)} but the model has num_layers="
                f"{num_layers}; the counts must be non-negative and add up to {num_layers}")
    elif num_layers < 1 or num_layers % slices:
        raise ValueError(
            f"num_layers={num_layers} is not divisible by pp x virtual_stages = {pp} x {virtual_stages} = "
            f"{slices}; use a multiple of {slices} layers, change parallel.pp/parallel.virtual_stages, or "
            f"set parallel.pipeline_layers to an explicit split")


def validate_schedule(schedule: str, pp: int, num_chunks: int, num_microbatches: int) -> None:
    """The schedule's own rules; every rank evaluates them on the same numbers, so all fail together.

    gpipe and 1f1b: one model chunk per rank, any num_microbatches >= 1.
    interleaved: num_microbatches must be a positive multiple of pp (hence >= pp), as in Megatron-LM: the
    schedule runs micro-batches in groups of pp through each chunk in turn.
    """
    if schedule not in SCHEDULE_NAMES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches={num_microbatches} must be at least 1")
    if schedule != "interleaved" and num_chunks != 1:
        raise ValueError(
            f"schedule {schedule!r} runs one model chunk per rank but virtual_stages={num_chunks}; "
            f"set parallel.virtual_stages=1 or parallel.schedule=interleaved")
    if schedule == "interleaved" and num_microbatches % pp:
        raise ValueError(
            f"the interleaved schedule needs num_microbatches to be a multiple of pp, got num_microbatches="
            f"{num_microbatches} with pp={pp}; make train.global_batch_size / (train.micro_batch_size x dp) "
            f"a multiple of {pp} (e.g. {pp * -(-num_microbatches // pp)}) or use parallel.virtual_stages=1")


def validate_pipeline(num_layers: int, pp: int, virtual_stages: int, num_microbatches: int,
                      explicit=None, schedule: str | None = None) -> None:
    """Raise ValueError naming the numbers and the fix for any layout the pipeline cannot run.

    Call it on every rank before any communication or allocation. ``schedule`` None means "interleaved when
    virtual_stages > 1, else 1f1b" (megalm.config's rule); the interleaving rule is documented in
    ``validate_schedule``.
    """
    _check_layers(num_layers, pp, virtual_stages, explicit)
    schedule = schedule or ("interleaved" if virtual_stages > 1 else "1f1b")
    validate_schedule(schedule, pp, virtual_stages, num_microbatches)


def partition_layers(num_layers: int, pp: int, virtual_stages: int = 1, explicit=None) -> list[list[range]]:
    """Global layer indices of every model chunk, indexed ``[pp_rank][chunk]``.

    ``explicit``: layer counts per (virtual) stage in pipeline order (length pp x virtual_stages); else equal
    slices. Chunk ``c`` of rank ``p`` is slice ``c*pp + p``.
    """
    _check_layers(num_layers, pp, virtual_stages, explicit)
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
