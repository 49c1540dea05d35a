"""Tensor (and sequence) parallelism: comm.py (collectives + CommStats), mappings.py (f/g autograd functions),
layers.py (column/row linear, vocab embedding, ShardSpec), cross_entropy.py (vocab-parallel loss), random.py
(per-TP-rank dropout seeds)."""
from megalm.parallel.tensor.comm import TP_KINDS, CommStats
from megalm.parallel.tensor.cross_entropy import vocab_parallel_cross_entropy
from megalm.parallel.tensor.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    ShardSpec,
    VocabParallelEmbedding,
)
from megalm.parallel.tensor.mappings import (
    copy_to_tp,
    gather_from_sequence,
    gather_from_tp_last_dim,
    reduce_from_tp,
    reduce_grad_over_tp,
    reduce_scatter_to_sequence,
    scatter_to_sequence,
)
from megalm.parallel.tensor.random import tp_rng

__all__ = [
    "TP_KINDS", "CommStats", "ColumnParallelLinear", "RowParallelLinear", "ShardSpec",
    "VocabParallelEmbedding",
    "copy_to_tp", "gather_from_sequence", "gather_from_tp_last_dim",
    "reduce_from_tp", "reduce_grad_over_tp", "reduce_scatter_to_sequence", "scatter_to_sequence", "tp_rng",
    "vocab_parallel_cross_entropy",
]
