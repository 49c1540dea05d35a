"""Tensor-parallel layers of Megatron-LM (Shoeybi et al. 2019), with sequence parallelism (Korthikanti 2022).

Each layer keeps only its slice of the weight, described by ``param.shard`` (a ``ShardSpec``, from
``megalm.parallel.shard``). Parameters start as zeros; initialise them by building the master weight the same way
on every rank and keeping your slice (``param.shard.take(master)``), so that a model initialised at tp=t equals
the one initialised at tp=1.

Activations are (B, T, H). Under sequence parallelism the input of a column layer and the output of a row
layer are sequence shards (B, T/t, H); otherwise they are replicated (B, T, H).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megalm.config.rules import tp_share
from megalm.parallel.shard import ShardSpec
from megalm.parallel.tensor.mappings import (
    copy_to_tp,
    gather_from_sequence,
    gather_from_tp_last_dim,
    reduce_from_tp,
    reduce_grad_over_tp,
    reduce_scatter_to_sequence,
)
from megalm.parallel.topology import TensorParallel


def _rows(param, dim: int) -> int:
    """Local size along ``dim``, also for a ZeRO-3 parameter whose storage is partitioned away (ds_shape)."""
    return tuple(getattr(param, "ds_shape", param.shape))[dim]


def _new_param(shape, tp: TensorParallel, dim: int | None, dtype, device) -> nn.Parameter:
    """Zeros (deterministic) tagged with its ShardSpec and the attributes DeepSpeed/Megatron read."""
    p = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
    p.shard = ShardSpec(dim, tp.size, tp.rank) if dim is not None else ShardSpec(None)  # dim kept at tp=1 too
    sharded = dim is not None and tp.size > 1
    p.tensor_model_parallel = sharded       # DeepSpeed: if False, counted once per TP group in the grad norm
    p.partition_dim = dim if sharded else -1
    p.partition_stride = 1
    return p


def _divide(n: int, tp: TensorParallel, what: str, layer: str) -> int:
    """The rule book's tensor-parallel split, checked again where a layer is built directly (library use)."""
    return tp_share(n, tp.size, what, layer)


class ColumnParallelLinear(nn.Module):
    """Y = X A^T + b with A (out, in) split by rows (output features): rank r holds A_r (out/t, in), b_r.

    Input (B, T, in) replicated, or (B, T/t, in) under sequence parallelism (all-gathered here). Output
    (B, T, out/t), or (B, T, out) with ``gather_output`` (all-gathered along the last dim).
    ``kind`` labels this layer's collectives in CommStats (default: by collective, e.g. "all_gather").
    """

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel, bias: bool = True,
                 gather_output: bool = False, dtype=None, device=None, kind: str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.tp, self.gather_output, self.kind = tp, gather_output, kind
        local_out = _divide(out_features, tp, "out_features", type(self).__name__)
        self.weight = _new_param((local_out, in_features), tp, 0, dtype, device)
        self.bias = _new_param((local_out,), tp, 0, dtype, device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tp = self.tp
        if tp.sequence_parallel:
            x = gather_from_sequence(x, tp, kind=self.kind)     # (B, T/t, in) -> (B, T, in)
        else:
            x = copy_to_tp(x, tp, kind=self.kind)
        y = F.linear(x, self.weight, self.bias)                 # (B, T, out/t)
        return gather_from_tp_last_dim(y, tp, kind=self.kind) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features} (local {_rows(self.weight, 0)}), "
                f"tp={self.tp.size}, bias={self.bias is not None}, gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    """Y = X A^T + b with A (out, in) split by columns (input features): rank r holds A_r (out, in/t).

    Input (B, T, in/t), already parallel (e.g. a ColumnParallelLinear's output). The partial products are
    summed across ranks (all-reduce, or reduce-scatter to (B, T/t, out) under sequence parallelism); the
    replicated bias is added once, after the reduction.
    """

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel, bias: bool = True,
                 dtype=None, device=None, kind: str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.tp, self.kind = tp, kind
        local_in = _divide(in_features, tp, "in_features", type(self).__name__)
        self.weight = _new_param((out_features, local_in), tp, 1, dtype, device)
        self.bias = _new_param((out_features,), tp, None, dtype, device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tp = self.tp
        y = F.linear(x, self.weight)                            # (B, T, out), partial sum over ranks
        adapter = getattr(self, "lora", None)                   # megalm.model.lora: its partial sum too
        if adapter is not None:
            y = y + adapter(x)
        if tp.sequence_parallel:
            y = reduce_scatter_to_sequence(y, tp, kind=self.kind)   # (B, T/t, out)
        else:
            y = reduce_from_tp(y, tp, kind=self.kind)
        if self.bias is None:
            return y
        # Under SP each rank adds the bias to its own sequence chunk: its gradient is partial per rank.
        bias = reduce_grad_over_tp(self.bias, tp) if tp.sequence_parallel else self.bias
        return y + bias

    def extra_repr(self) -> str:
        return (f"in={self.in_features} (local {_rows(self.weight, 1)}), out={self.out_features}, "
                f"tp={self.tp.size}, bias={self.bias is not None}")


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by rows (vocabulary): rank r holds rows [r*V/t, (r+1)*V/t).

    Input ids (B, T), the same on every TP rank. Each rank looks up the ids it owns, zeros the others, and the
    ranks sum: all-reduce to (B, T, D), or reduce-scatter to (B, T/t, D) under sequence parallelism.
    Collectives are counted under kind "embedding".
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, tp: TensorParallel, dtype=None, device=None,
                 kind: str | None = "embedding"):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.tp, self.kind = num_embeddings, embedding_dim, tp, kind
        local = _divide(num_embeddings, tp, "num_embeddings (vocab size)", type(self).__name__)
        self.vocab_start = tp.rank * local
        self.vocab_end = self.vocab_start + local
        self.weight = _new_param((local, embedding_dim), tp, 0, dtype, device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        tp = self.tp
        if tp.size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)  # (B, T, D)
        if tp.sequence_parallel:
            return reduce_scatter_to_sequence(out, tp, kind=self.kind)                    # (B, T/t, D)
        return reduce_from_tp(out, tp, kind=self.kind)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings} (local {self.vocab_start}:{self.vocab_end}), {self.embedding_dim}, "
                f"tp={self.tp.size}")
