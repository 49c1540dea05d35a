"""The conjugate communication operators of tensor and sequence parallelism, as autograd functions.

Megatron-LM (Shoeybi et al. 2019, sec. 3) writes a tensor-parallel MLP as ``g(row(act(col(f(X)))))`` where

    f: identity forward, all-reduce backward    (``copy_to_tp``: enters a TP region)
    g: all-reduce forward, identity backward    (``reduce_from_tp``: leaves a TP region)

Sequence parallelism (Korthikanti et al. 2022, sec. 4.2.2) keeps activations outside TP regions sharded along
the sequence (dim 1 of a (B, T, H) tensor) and replaces f and g by

    g-bar: all-gather forward, reduce-scatter backward   (``gather_from_sequence``)
    g-bar': reduce-scatter forward, all-gather backward  (``reduce_scatter_to_sequence``)

Every wrapper takes the ``TensorParallel`` handle, returns its input untouched when ``tp.size == 1``, and
sends its collectives through comm.py (counted there under ``kind``; default: the collective's name).
"""
from __future__ import annotations

import torch

from megalm.parallel.tensor import comm
from megalm.parallel.topology import TensorParallel

SEQ_DIM = 1  # activations are (B, T, H), batch first


class _CopyToTP(torch.autograd.Function):
    """f: identity forward; backward sums the partial input gradients of the TP ranks."""

    @staticmethod
    def forward(ctx, x, tp, kind):
        ctx.tp, ctx.kind = tp, kind
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_reduce(grad, ctx.tp, ctx.kind), None, None


class _ReduceFromTP(torch.autograd.Function):
    """g: all-reduce forward (sum of the partial outputs); identity backward."""

    @staticmethod
    def forward(ctx, x, tp, kind):
        return comm.all_reduce(x, tp, kind)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _ScatterToSequence(torch.autograd.Function):
    """Keep this rank's sequence chunk forward; all-gather the chunk gradients backward."""

    @staticmethod
    def forward(ctx, x, tp, kind):
        ctx.tp, ctx.kind = tp, kind
        return comm.split(x, tp, SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather(grad, ctx.tp, SEQ_DIM, ctx.kind), None, None


class _GatherFromSequence(torch.autograd.Function):
    """g-bar: all-gather along the sequence forward; reduce-scatter (or split) backward."""

    @staticmethod
    def forward(ctx, x, tp, reduce_scatter_grad, kind):
        ctx.tp, ctx.reduce_scatter_grad, ctx.kind = tp, reduce_scatter_grad, kind
        return comm.all_gather(x, tp, SEQ_DIM, kind)

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduce_scatter_grad:       # consumers on each rank contributed a partial gradient
            return comm.reduce_scatter(grad, ctx.tp, SEQ_DIM, ctx.kind), None, None, None
        return comm.split(grad, ctx.tp, SEQ_DIM), None, None, None  # gradient already whole on every rank


class _ReduceScatterToSequence(torch.autograd.Function):
    """g-bar': reduce-scatter along the sequence forward; all-gather backward."""

    @staticmethod
    def forward(ctx, x, tp, kind):
        ctx.tp, ctx.kind = tp, kind
        return comm.reduce_scatter(x, tp, SEQ_DIM, kind)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather(grad, ctx.tp, SEQ_DIM, ctx.kind), None, None


class _GatherFromTPLastDim(torch.autograd.Function):
    """All-gather along the last dim forward (e.g. vocab-parallel logits); keep my slice backward."""

    @staticmethod
    def forward(ctx, x, tp, kind):
        ctx.tp = tp
        return comm.all_gather(x, tp, -1, kind)

    @staticmethod
    def backward(ctx, grad):
        return comm.split(grad, ctx.tp, -1), None, None


def copy_to_tp(x: torch.Tensor, tp: TensorParallel, kind: str | None = None) -> torch.Tensor:
    """f: enter a TP region with a replicated input (identity forward, all-reduce backward)."""
    return x if tp.size == 1 else _CopyToTP.apply(x, tp, kind)


def reduce_from_tp(x: torch.Tensor, tp: TensorParallel, kind: str | None = None) -> torch.Tensor:
    """g: leave a TP region by summing partial outputs (all-reduce forward, identity backward)."""
    return x if tp.size == 1 else _ReduceFromTP.apply(x, tp, kind)


def scatter_to_sequence(x: torch.Tensor, tp: TensorParallel, kind: str | None = None) -> torch.Tensor:
    """(B, T, H) replicated -> (B, T/t, H) my chunk; backward all-gathers. T must divide by t."""
    return x if tp.size == 1 else _ScatterToSequence.apply(x, tp, kind)


def gather_from_sequence(x: torch.Tensor, tp: TensorParallel, reduce_scatter_grad: bool = True,
                         kind: str | None = None) -> torch.Tensor:
    """(B, T/t, H) -> (B, T, H) by all-gather. Backward reduce-scatters the gradient (the consumer is a TP
    region whose ranks each hold a partial gradient), or, with ``reduce_scatter_grad=False``, keeps this
    rank's chunk of a gradient that is already whole on every rank."""
    return x if tp.size == 1 else _GatherFromSequence.apply(x, tp, reduce_scatter_grad, kind)


def reduce_scatter_to_sequence(x: torch.Tensor, tp: TensorParallel, kind: str | None = None) -> torch.Tensor:
    """(B, T, H) partial sums -> (B, T/t, H) my chunk of the sum; backward all-gathers."""
    return x if tp.size == 1 else _ReduceScatterToSequence.apply(x, tp, kind)


def gather_from_tp_last_dim(x: torch.Tensor, tp: TensorParallel, kind: str | None = None) -> torch.Tensor:
    """(..., V/t) -> (..., V) by all-gather (generation: full logits); backward keeps my slice."""
    return x if tp.size == 1 else _GatherFromTPLastDim.apply(x, tp, kind)


def reduce_grad_over_tp(param: torch.Tensor, tp: TensorParallel,
                        kind: str | None = "replicated_grad") -> torch.Tensor:
    """Use a replicated parameter through this when each TP rank sees only part of its gradient (a norm weight
    applied to a sequence shard; a bias added after a reduce-scatter; K/V weights replicated because
    num_kv_heads < tp): ``w = reduce_grad_over_tp(self.weight, tp)``. Backward sums the gradient over the TP
    group, so every rank's ``param.grad`` is the full gradient and the replicas stay equal."""
    return param if tp.size == 1 else _CopyToTP.apply(param, tp, kind)       # the same f, on a parameter
