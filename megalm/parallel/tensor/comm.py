"""The only place tensor parallelism calls torch.distributed: three collectives, a split, their accounting.

Every collective of mappings.py, layers.py and cross_entropy.py goes through ``all_reduce``, ``all_gather`` or
``reduce_scatter`` here. Each returns its input untouched when ``tp.size == 1`` (no process group needed) and,
when ``tp.comm`` holds a :class:`CommStats`, adds the elements this rank sends under the ring model
(Patarasuk & Yuan 2009; the cost model of Megatron-LM, Narayanan et al. 2021, and Korthikanti et al. 2022):

    all-reduce of n elements       2(t-1)/t * n
    all-gather into n elements      (t-1)/t * n
    reduce-scatter of n elements    (t-1)/t * n

so one transformer layer (two column->row pairs) moves 8*b*s*h*(t-1)/t elements per micro-batch, forward plus
backward, with or without sequence parallelism (4 all-reduces, or 4 all-gathers + 4 reduce-scatters).
"""
from __future__ import annotations

from collections import Counter
from fractions import Fraction

import torch
import torch.distributed as dist

from megalm.parallel.topology import TensorParallel
from megalm.runtime.phases import timed

# Kinds that carry the activations of the column->row pairs; other kinds ("embedding", "cross_entropy",
# "replicated_grad", or whatever a layer was labelled) are counted apart from the per-layer formula.
TP_KINDS = ("all_reduce", "all_gather", "reduce_scatter")

# torch >= 2.13 renames the tensor-in/tensor-out collectives; both spellings run on gloo and NCCL.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _eager(collective):
    """Run a collective outside torch.compile's graphs (train.compile): the compiled regions end at each one, so
    every collective is the eager call above, counted and timed exactly as without compiling. (Traced, the counter's
    changing values would become guards and recompile the block at every call.)"""
    return torch.compiler.disable(collective, recursive=True)


class CommStats:
    """Elements (and bytes) this rank sent per kind of collective, under the ring model; calls per kind.

    Counts are exact: a ``Fraction`` where the ring share is not a whole number of elements, else an int.
    Attach one to the handle (``tp.comm = CommStats()``) to count; leave ``tp.comm = None`` to not count.
    Counting is a few integer operations per collective, cheap enough to leave on.
    """

    def __init__(self) -> None:
        self.elements: Counter = Counter()
        self.bytes: Counter = Counter()
        self.calls: Counter = Counter()

    def add(self, kind: str, elements: int | Fraction, element_size: int) -> None:
        elements = _exact(elements)
        self.elements[kind] += elements
        self.bytes[kind] += _exact(elements * element_size)
        self.calls[kind] += 1

    def total(self, *kinds: str) -> int | Fraction:
        """Elements moved under ``kinds`` (all kinds when none are given)."""
        return _exact(sum((v for k, v in self.elements.items() if not kinds or k in kinds), Fraction(0)))

    def reset(self) -> None:
        self.elements.clear()
        self.bytes.clear()
        self.calls.clear()

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={self.elements[k]} ({self.calls[k]} calls)" for k in sorted(self.elements))
        return f"CommStats({parts})"


def _exact(x: int | Fraction) -> int | Fraction:
    x = Fraction(x)
    return int(x) if x.denominator == 1 else x


def _count(tp: TensorParallel, kind: str, shares: int, n: int, x: torch.Tensor) -> None:
    """Add ``shares * (t-1)/t * n`` elements under ``kind`` when counting (ring model: module docstring)."""
    if tp.comm is not None:
        tp.comm.add(kind, Fraction(shares * (tp.size - 1) * n, tp.size), x.element_size())


@_eager
def all_reduce(x: torch.Tensor, tp: TensorParallel, kind: str | None = None,
               op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """Sum (or ``op``) of ``x`` over the TP group, as a new tensor: ``x`` itself is never modified."""
    if tp.size == 1:
        return x
    out = x.clone(memory_format=torch.contiguous_format)
    with timed(tp.phases, "tp_comm", kind or "all_reduce"):
        dist.all_reduce(out, op=op, group=tp.group)
    _count(tp, kind or "all_reduce", 2, x.numel(), x)
    return out


@_eager
def all_gather(x: torch.Tensor, tp: TensorParallel, dim: int, kind: str | None = None) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in TP-rank order: (.., n, ..) -> (.., t*n, ..)."""
    if tp.size == 1:
        return x
    x = x.contiguous()
    out = x.new_empty(tp.size * x.numel())                 # flat: every backend takes 1-D concatenation
    with timed(tp.phases, "tp_comm", kind or "all_gather"):
        _all_gather_single(out, x.view(-1), group=tp.group)
    out = out.view(tp.size, *x.shape)                       # rank r's piece at out[r]
    _count(tp, kind or "all_gather", 1, out.numel(), x)
    dim = dim % x.dim()
    if dim == 0:
        return out.flatten(0, 1)
    return torch.cat(out.unbind(0), dim=dim)


@_eager
def reduce_scatter(x: torch.Tensor, tp: TensorParallel, dim: int, kind: str | None = None) -> torch.Tensor:
    """Sum ``x`` over the TP group and keep this rank's chunk along ``dim``: (.., t*n, ..) -> (.., n, ..)."""
    if tp.size == 1:
        return x
    chunks = _chunks(x, tp, dim)
    inp = torch.stack(chunks)                               # (t, *chunk.shape): chunk r goes to rank r
    out = x.new_empty(chunks[0].shape)
    with timed(tp.phases, "tp_comm", kind or "reduce_scatter"):
        _reduce_scatter_single(out.view(-1), inp.view(-1), group=tp.group)
    _count(tp, kind or "reduce_scatter", 1, x.numel(), x)
    return out


def split(x: torch.Tensor, tp: TensorParallel, dim: int) -> torch.Tensor:
    """This rank's chunk of ``x`` along ``dim`` (no communication), contiguous."""
    if tp.size == 1:
        return x
    return _chunks(x, tp, dim)[tp.rank].contiguous()


def _chunks(x: torch.Tensor, tp: TensorParallel, dim: int) -> tuple[torch.Tensor, ...]:
    n = x.shape[dim]
    if n % tp.size:
        what = "sequence length" if dim % x.dim() == 1 else f"size of dim {dim}"
        raise ValueError(
            f"{what} {n} of a {tuple(x.shape)} tensor is not divisible by tensor-parallel size {tp.size}; "
            f"pad it to a multiple of {tp.size}, or change parallel.tp"
            + (" or turn off parallel.sequence_parallel" if dim % x.dim() == 1 else ""))
    return x.chunk(tp.size, dim)
