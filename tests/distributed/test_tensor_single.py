"""Single-process checks of the tensor-parallel room: the size-1 bypass (no process group at all), size
validation, ShardSpec, CommStats arithmetic and tp_rng at tp=1."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megalm.parallel.tensor import (
    ColumnParallelLinear,
    CommStats,
    RowParallelLinear,
    ShardSpec,
    VocabParallelEmbedding,
    copy_to_tp,
    gather_from_sequence,
    gather_from_tp_last_dim,
    reduce_from_tp,
    reduce_grad_over_tp,
    reduce_scatter_to_sequence,
    scatter_to_sequence,
    tp_rng,
    vocab_parallel_cross_entropy,
)
from megalm.parallel.topology import TensorParallel
from tests.conftest import load_masters

B, T, IN, OUT, V = 2, 4, 8, 12, 16


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_size_one_bypasses_communication():
    assert not dist.is_initialized()
    tp = TensorParallel(comm=CommStats())                 # no process group at all
    x = _rand(B, T, IN, seed=1)
    for fn in (copy_to_tp, reduce_from_tp, scatter_to_sequence, gather_from_sequence,
               reduce_scatter_to_sequence, gather_from_tp_last_dim, reduce_grad_over_tp):
        assert fn(x, tp) is x
    ref = nn.Linear(IN, OUT)
    col = ColumnParallelLinear(IN, OUT, tp, gather_output=True)
    load_masters(col, dict(ref.named_parameters()))
    row = RowParallelLinear(OUT, IN, tp)
    load_masters(row, {"weight": ref.weight.T, "bias": torch.zeros(IN)})
    _close(col(x), ref(x))
    _close(row(ref(x)), ref(x) @ ref.weight)
    emb, ids = VocabParallelEmbedding(V, IN, tp), torch.arange(V).view(2, V // 2)
    load_masters(emb, {"weight": _rand(V, IN)})
    _close(emb(ids), _rand(V, IN)[ids])
    logits, targets = _rand(3, V, seed=2), torch.tensor([1, -100, 11])
    expected = F.cross_entropy(logits, targets, reduction="none")
    _close(vocab_parallel_cross_entropy(logits, targets, tp), expected)
    assert col.weight.shard == ShardSpec(0, 1, 0) and not col.weight.tensor_model_parallel
    assert not tp.comm.elements and not tp.comm.calls


@pytest.mark.parametrize("make, what", [
    (lambda tp: ColumnParallelLinear(8, 6, tp), "out_features=6"),
    (lambda tp: RowParallelLinear(6, 8, tp), "in_features=6"),
    (lambda tp: VocabParallelEmbedding(10, 8, tp), "num_embeddings \\(vocab size\\)=10"),
])
def test_sizes_not_divisible_by_tp_raise(make, what):
    tp = TensorParallel(size=4, rank=1)                   # layers check sizes before any communication
    with pytest.raises(ValueError, match=f"{what} is not divisible by tensor-parallel size tp=4; make"):
        make(tp)


def test_shard_spec_take_and_global_shape():
    master = torch.arange(24.0).view(4, 6)
    spec = ShardSpec(1, 3, 2)
    assert torch.equal(spec.take(master), master[:, 4:6])
    assert spec.global_shape(torch.Size([4, 2])) == master.shape
    assert torch.equal(ShardSpec(None).take(master), master)
    with pytest.raises(ValueError, match="cannot cut dim 1"):
        ShardSpec(1, 4, 0).take(master)
    layer = ColumnParallelLinear(6, 4, TensorParallel(size=2, rank=1))
    load_masters(layer, {"weight": master, "bias": torch.arange(4.0)})
    assert torch.equal(layer.weight, master[2:]) and torch.equal(layer.bias, torch.tensor([2.0, 3.0]))
    with pytest.raises(ValueError, match="cannot cut dim 0"):          # a master of another shape
        layer.weight.shard.take(torch.zeros(5, 6))


def test_comm_stats_counts_exactly():
    stats = CommStats()
    stats.add("all_reduce", Fraction(2 * 3 * 10, 4), element_size=4)    # t=4, n=10: 15 elements
    stats.add("all_gather", Fraction(3 * 7, 4), element_size=2)         # not whole: kept as a fraction
    stats.add("embedding", 6, element_size=4)
    assert stats.elements["all_reduce"] == 15 and isinstance(stats.elements["all_reduce"], int)
    assert stats.total("all_reduce", "all_gather") == Fraction(81, 4)
    assert stats.total() == Fraction(105, 4) and stats.bytes["all_reduce"] == 60
    assert stats.calls == {"all_reduce": 1, "all_gather": 1, "embedding": 1}
    assert "embedding=6 (1 calls)" in repr(stats)
    stats.reset()
    assert stats.total() == 0 and not stats.calls


def test_tp_rng_at_size_one_is_reproducible_and_takes_one_outer_draw():
    tp = TensorParallel()
    torch.manual_seed(0)
    torch.randint(2**40, (), dtype=torch.long)            # the one draw tp_rng takes from the outer stream
    expected_after = torch.rand(4)
    torch.manual_seed(0)
    with tp_rng(0, tp):
        inner = torch.rand(4)
    assert torch.equal(torch.rand(4), expected_after)
    torch.manual_seed(0)
    with tp_rng(0, tp):
        assert torch.equal(torch.rand(4), inner)


def test_tp_rng_seeds_differ_per_tp_rank_and_leave_the_shared_stream_alone():
    """tp_rng talks to no one, so one process can play every TP rank of a tp=4 group."""
    inside, after = [], []
    for rank in range(4):
        tp = TensorParallel(size=4, rank=rank)
        torch.manual_seed(1234)                          # the shared seed, the same on every TP rank
        with tp_rng(1234, tp):
            inside.append(torch.rand(16))
        with tp_rng(1234, tp):
            assert not torch.equal(torch.rand(16), inside[-1]), "each tp_rng block must draw fresh numbers"
        after.append(torch.rand(16))
    assert all(torch.equal(a, after[0]) for a in after), "shared stream differs per rank"
    assert all(not torch.equal(inside[i], inside[j]) for i in range(4) for j in range(i)), \
        "TP ranks drew the same numbers inside tp_rng"


def test_tp_rng_masks_survive_activation_recompute():
    tp = TensorParallel(size=2, rank=1)

    def dropout(x):
        with tp_rng(1234, tp):
            return F.dropout(x, 0.5, training=True)

    torch.manual_seed(0)
    x = torch.ones(256, requires_grad=True)
    y = checkpoint(dropout, x, use_reentrant=False)    # backward recomputes the forward, mask included
    y.sum().backward()
    _close(x.grad, y.detach())                          # same mask in recompute: grad == mask / (1 - p)
