"""A ZeRO-partitioned fp32 value (a master weight or an Adam moment) assembled on the one data-parallel rank that
writes it to a checkpoint, and on no other.

DeepSpeed's ``safe_get_full_fp32_param`` all-reduces (ZeRO-1/2) or all-gathers (ZeRO-3) the value, so every rank
of the data-parallel group builds the whole tensor although only data-parallel rank 0 stores it. Here:
- ZeRO-3: every rank holds an equal partition of the flattened parameter; one ``gather`` to rank 0 of the
  group brings them together there;
- ZeRO-1/2 (and DeepSpeed's bf16 optimizer): rank r holds a contiguous fragment (start, numel) of the flattened
  parameter, of any size, possibly none. The fragments' addresses are the same for a parameter's weight and its
  moments and do not change during training, so they are gathered to rank 0 once per save (one small tensor
  per rank); each rank then sends its fragment to rank 0, which receives it straight into its place.
A non-writing rank sends what it holds and allocates nothing of the parameter's size.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _fragment(p):
    """(start, numel) of this rank's fragment of ZeRO-1/2 parameter ``p`` (numel 0: none)."""
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:
        return 0, 0
    return mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel


class WriterGather:
    """Assembles fp32 values of ``params`` on rank 0 of ``group``. Collective: every rank of the group calls
    ``value`` for the same parameters in the same order; rank 0 gets the tensor (flat), the others None."""

    def __init__(self, params: list, group, device: torch.device):
        self.group, self.device = group, device
        self.size = dist.get_world_size(group)
        self.is_writer = dist.get_rank(group) == 0
        self.writer = dist.get_global_rank(group, 0)
        partitioned = [p for p in params if hasattr(p, "_hp_mapping") and not hasattr(p, "ds_id")]
        self.index = {id(p): i for i, p in enumerate(partitioned)}
        self.fragments = self._gather_fragments(partitioned)

    def _gather_fragments(self, partitioned: list):
        """On the writer: [rank][param index] -> (start, numel) for the ZeRO-1/2 parameters; one gather."""
        if not partitioned or self.size == 1:
            return None
        mine = torch.tensor([_fragment(p) for p in partitioned], dtype=torch.long, device=self.device)
        table = [torch.empty_like(mine) for _ in range(self.size)] if self.is_writer else None
        dist.gather(mine, table, dst=self.writer, group=self.group)
        return [t.tolist() for t in table] if self.is_writer else None

    def handles(self, p) -> bool:
        """Whether DeepSpeed partitions p's fp32 value over the group (else each rank holds it whole, or none)."""
        return (hasattr(p, "ds_id") and p.requires_grad) or id(p) in self.index

    def value(self, p, key: str | None = None) -> torch.Tensor | None:
        """p's fp32 master (``key`` None) or its optimizer state ``key``, flat, on the writer; None elsewhere."""
        return self._zero3(p, key) if hasattr(p, "ds_id") else self._fragments(p, key)

    def _zero3(self, p, key):
        part = p._z3_optimizer.get_local_fp32_param(p, key).float().contiguous()
        pieces = [torch.empty_like(part) for _ in range(self.size)] if self.is_writer else None
        dist.gather(part, pieces, dst=self.writer, group=self.group)
        return torch.cat(pieces)[:p.ds_numel] if self.is_writer else None

    def _fragments(self, p, key):
        start, numel = _fragment(p)
        # on the device the group communicates on: with optimizer offload DeepSpeed keeps the fragment on the CPU,
        # which NCCL cannot send
        held = p._hp_mapping.get_hp_fragment(key).float().to(self.device).contiguous() if numel else None
        if self.size == 1:
            return held
        if not self.is_writer:
            if numel:
                dist.send(held, dst=self.writer, group=self.group)
            return None
        full = torch.zeros(p.numel(), dtype=torch.float32, device=self.device)
        if numel:
            full[start:start + numel] = held
        pending = []
        for rank, row in enumerate(self.fragments):
            start, numel = row[self.index[id(p)]]
            if rank and numel:
                source = dist.get_global_rank(self.group, rank)
                pending.append(dist.irecv(full[start:start + numel], src=source, group=self.group))
        for request in pending:
            request.wait()
        return full
