"""Tensor-parallel mappings, layers and vocab-parallel cross-entropy against their single-device references.

One gloo run per world size (2 and 4) executes every ``check_*`` below on each rank, with and without sequence
parallelism, and reports a traceback per check; the pytest cases read those reports. Tolerances: fp32,
rtol 1e-5, atol 1e-6.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
import traceback
from fractions import Fraction

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megalm.parallel.tensor import (
    TP_KINDS,
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
    vocab_parallel_cross_entropy,
)
from megalm.parallel.topology import TensorParallel, build_topology
from megalm.runtime.spawn import run_distributed
from tests.conftest import load_masters

B, T = 2, 4          # T divisible by every tested tp
IN, OUT, V = 8, 12, 16     # all divisible by every tested tp
LAYERS = 2


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _mine(x, tp, dim):
    return x.chunk(tp.size, dim)[tp.rank]


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def _seq(x, tp):
    """My sequence chunk under SP, else the whole (replicated) tensor."""
    return _mine(x, tp, 1) if tp.sequence_parallel else x


def check_mappings(tp, sp):
    s = sum(range(1, tp.size + 1))
    scale = tp.rank + 1
    X, G = _rand(B, T, IN, seed=1), _rand(B, T, IN, seed=2)

    def run(fn, x, grad):
        x = x.clone().requires_grad_()
        y = fn(x)
        y.backward(grad)
        return y.detach(), x.grad

    y, gx = run(lambda x: copy_to_tp(x, tp), X * scale, G * scale)
    _close(y, X * scale), _close(gx, G * s)
    y, gx = run(lambda x: reduce_from_tp(x, tp), X * scale, G)
    _close(y, X * s), _close(gx, G)
    y, gx = run(lambda x: scatter_to_sequence(x, tp), X, _mine(G, tp, 1) * scale)
    _close(y, _mine(X, tp, 1))
    _close(gx, torch.cat([c * (r + 1) for r, c in enumerate(G.chunk(tp.size, 1))], 1))
    y, gx = run(lambda x: gather_from_sequence(x, tp), _mine(X, tp, 1), G * scale)
    _close(y, X), _close(gx, _mine(G * s, tp, 1))
    y, gx = run(lambda x: gather_from_sequence(x, tp, reduce_scatter_grad=False), _mine(X, tp, 1), G)
    _close(y, X), _close(gx, _mine(G, tp, 1))
    y, gx = run(lambda x: reduce_scatter_to_sequence(x, tp), X * scale, _mine(G, tp, 1))
    _close(y, _mine(X * s, tp, 1)), _close(gx, G)
    y, gx = run(lambda x: gather_from_tp_last_dim(x, tp), _mine(X, tp, -1), G)
    _close(y, X), _close(gx, _mine(G, tp, -1))
    with pytest.raises(ValueError, match=f"sequence length {T + 1} .* not divisible by tensor-parallel size"):
        scatter_to_sequence(_rand(B, T + 1, IN), tp)


def check_reduce_grad_over_tp(tp, sp):
    w = nn.Parameter(_rand(IN, seed=3))
    xs = [_rand(IN, seed=10 + r) for r in range(tp.size)]
    out = reduce_grad_over_tp(w, tp)
    _close(out.detach(), w.detach())
    (out * xs[tp.rank]).sum().backward()
    _close(w.grad, sum(xs))


def check_column_parallel_linear(tp, sp):
    ref = nn.Linear(IN, OUT)
    load_masters(ref, {"weight": _rand(OUT, IN, seed=4), "bias": _rand(OUT, seed=5)})
    X, G = _rand(B, T, IN, seed=6), _rand(B, T, OUT, seed=7)
    x_ref = X.clone().requires_grad_()
    (ref(x_ref) * G).sum().backward()
    for handle in (tp, sp):
        for gather_output in (False, True):
            layer = ColumnParallelLinear(IN, OUT, handle, gather_output=gather_output)
            load_masters(layer, dict(ref.named_parameters()))
            x = _seq(X, handle).clone().requires_grad_()
            y = layer(x)
            expected = ref(X) if gather_output else _mine(ref(X), handle, -1)
            _close(y, expected.detach())
            (y * (G if gather_output else _mine(G, handle, -1))).sum().backward()
            _close(x.grad, _seq(x_ref.grad, handle))
            _close(layer.weight.grad, _mine(ref.weight.grad, handle, 0))
            _close(layer.bias.grad, _mine(ref.bias.grad, handle, 0))


def check_row_parallel_linear(tp, sp):
    ref = nn.Linear(OUT, IN)
    load_masters(ref, {"weight": _rand(IN, OUT, seed=8), "bias": _rand(IN, seed=9)})
    X, G = _rand(B, T, OUT, seed=10), _rand(B, T, IN, seed=11)
    x_ref = X.clone().requires_grad_()
    y_ref = ref(x_ref)
    (y_ref * G).sum().backward()
    for handle in (tp, sp):
        layer = RowParallelLinear(OUT, IN, handle)
        load_masters(layer, dict(ref.named_parameters()))
        x = _mine(X, handle, -1).clone().requires_grad_()
        y = layer(x)
        _close(y, _seq(y_ref, handle).detach())
        (y * _seq(G, handle)).sum().backward()
        _close(x.grad, _mine(x_ref.grad, handle, -1))
        _close(layer.weight.grad, _mine(ref.weight.grad, handle, 1))
        _close(layer.bias.grad, ref.bias.grad)


def check_vocab_parallel_embedding(tp, sp):
    ref = nn.Embedding(V, IN)
    load_masters(ref, {"weight": _rand(V, IN, seed=12)})
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(13))
    G = _rand(B, T, IN, seed=14)
    y_ref = ref(ids)
    (y_ref * G).sum().backward()
    for handle in (tp, sp):
        layer = VocabParallelEmbedding(V, IN, handle)
        load_masters(layer, dict(ref.named_parameters()))
        y = layer(ids)
        _close(y, _seq(y_ref, handle).detach())
        (y * _seq(G, handle)).sum().backward()
        _close(layer.weight.grad, _mine(ref.weight.grad, handle, 0))


def check_vocab_parallel_cross_entropy(tp, sp):
    gen = torch.Generator().manual_seed(15)
    logits = _rand(B, T, V, seed=16) * 30.0           # large logits: exercises the max subtraction
    weights = _rand(B, T, seed=17)
    for ignore_index in (-100, 5):                     # outside, and inside, the vocabulary
        targets = torch.randint(0, V, (B, T), generator=gen)
        targets[0, 1] = targets[1, 3] = ignore_index
        ref_in = logits.clone().requires_grad_()
        ref = F.cross_entropy(ref_in.view(-1, V), targets.view(-1), reduction="none",
                              ignore_index=ignore_index).view(B, T)
        (ref * weights).sum().backward()
        local = _mine(logits, tp, -1).clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(local, targets, tp, ignore_index=ignore_index)
        _close(loss, ref.detach())
        assert loss[0, 1] == 0 and loss[1, 3] == 0
        (loss * weights).sum().backward()
        _close(local.grad, _mine(ref_in.grad, tp, -1))
        assert not local.grad[0, 1].any() and not local.grad[1, 3].any()


def check_parameter_attributes(tp, sp):
    col, row = ColumnParallelLinear(IN, OUT, tp), RowParallelLinear(OUT, IN, tp)
    emb = VocabParallelEmbedding(V, IN, tp)
    for p, dim in ((col.weight, 0), (col.bias, 0), (row.weight, 1), (emb.weight, 0)):
        assert p.shard == ShardSpec(dim, tp.size, tp.rank)
        assert p.tensor_model_parallel and p.partition_dim == dim and p.partition_stride == 1
        assert p.shard.global_shape(p.shape)[dim] == p.shape[dim] * tp.size
    assert row.bias.shard == ShardSpec(None) and not row.bias.tensor_model_parallel
    assert row.bias.partition_dim == -1 and row.bias.partition_stride == 1


class _Block(nn.Module):
    """Two column->row pairs (attention-like, MLP-like) with residuals and norm-like scales."""

    def __init__(self, tp):
        super().__init__()
        self.tp = tp
        self.norm1, self.norm2 = nn.Parameter(torch.zeros(IN)), nn.Parameter(torch.zeros(IN))
        self.qkv, self.proj = ColumnParallelLinear(IN, 2 * IN, tp), RowParallelLinear(2 * IN, IN, tp)
        self.up, self.down = ColumnParallelLinear(IN, 4 * IN, tp), RowParallelLinear(4 * IN, IN, tp)

    def forward(self, x):                                  # (B, T, H), or (B, T/t, H) under SP
        x = x + self.proj(torch.tanh(self.qkv(x * _replicated(self.norm1, self.tp))))
        return x + self.down(F.gelu(self.up(x * _replicated(self.norm2, self.tp))))


def _replicated(w, tp):
    """A replicated weight applied to a sequence shard has a partial gradient on each rank."""
    return reduce_grad_over_tp(w, tp) if tp.sequence_parallel else w


class _TinyLM(nn.Module):
    def __init__(self, tp, layers=LAYERS):
        super().__init__()
        self.tp = tp
        self.emb = VocabParallelEmbedding(V, IN, tp)
        self.blocks = nn.ModuleList(_Block(tp) for _ in range(layers))
        self.norm = nn.Parameter(torch.zeros(IN))
        self.head = ColumnParallelLinear(IN, V, tp, bias=False, kind="lm_head")

    def forward(self, ids, targets):
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        logits = self.head(x * _replicated(self.norm, self.tp))     # (B, T, V/t)
        return vocab_parallel_cross_entropy(logits, targets, self.tp).mean()


def check_tiny_lm_and_comm_counts(tp, sp, counts):
    """tp=t equals tp=1 for a small LM built from the layers; record what one training step moved."""
    ref = _TinyLM(TensorParallel())
    gen = torch.Generator().manual_seed(20)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    ids, targets = torch.randint(0, V, (2, B, T), generator=gen)
    ref(ids, targets).backward()
    for handle in (tp, sp):
        handle = dataclasses.replace(handle, comm=CommStats())
        model = _TinyLM(handle)
        load_masters(model, ref.state_dict())
        loss = model(ids, targets)
        loss.backward()
        _close(loss, ref(ids, targets).detach())
        ref_params = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            _close(p.grad, getattr(p, "shard", ShardSpec(None)).take(ref_params[name].grad))
        stats = handle.comm
        key = f"sp={handle.sequence_parallel}"
        counts[key] = {k: [str(n), stats.calls[k]] for k, n in stats.elements.items()}


CHECKS = {name[len("check_"):]: fn for name, fn in dict(globals()).items() if name.startswith("check_")}


def _worker(rank, world_size, out_dir):
    tp = build_topology(tp=world_size).tensor_parallel
    sp = dataclasses.replace(tp, sequence_parallel=True)   # same group; SP changes only the layers' mappings
    report, counts = {}, {}
    for name, fn in CHECKS.items():
        try:
            fn(tp, sp, counts) if name == "tiny_lm_and_comm_counts" else fn(tp, sp)
            report[name] = None
        except Exception:  # noqa: BLE001 - every check reports; pytest shows the traceback
            report[name] = traceback.format_exc()
        dist.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"checks": report, "counts": counts}, f)


@functools.cache
def _reports(world_size):
    with tempfile.TemporaryDirectory(prefix="megalm_tp_") as out_dir:
        run_distributed(_worker, world_size, out_dir, timeout_s=120)
        reports = []
        for r in range(world_size):
            with open(os.path.join(out_dir, f"rank{r}.json")) as f:
                reports.append(json.load(f))
    return reports


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("check", sorted(CHECKS))
def test_matches_single_device(check, world_size):
    reports = [rep["checks"] for rep in _reports(world_size)]
    failures = [f"rank {r}:\n{rep[check]}" for r, rep in enumerate(reports) if rep[check]]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_comm_counts_match_formula(world_size, sequence_parallel):
    """One training step moves 8*b*s*h*(t-1)/t elements per layer in the TP regions, and the
    embedding, LM head, loss and replicated-gradient collectives are counted apart under their own kinds."""
    t, bsh, e = world_size, B * T * IN, Fraction(world_size - 1, world_size)
    expected = {
        "embedding": 2 * e * bsh,                 # all-reduce fwd; or reduce-scatter fwd + all-gather bwd
        "lm_head": 2 * e * bsh,                   # its input: all-reduce bwd; or all-gather fwd + r-s bwd
        "cross_entropy": 2 * e * 3 * B * T,       # all-reduce of the max, then of (sum exp, target logit)
    }
    if sequence_parallel:                         # 2 norms + 2 row biases per block, + the final norm
        expected["replicated_grad"] = 2 * e * (LAYERS * 4 * IN + IN)
    for rank, rep in enumerate(_reports(world_size)):
        assert rep["checks"]["tiny_lm_and_comm_counts"] is None, rep["checks"]["tiny_lm_and_comm_counts"]
        got = rep["counts"][f"sp={sequence_parallel}"]
        elements = {k: Fraction(v[0]) for k, v in got.items()}
        calls = {k: v[1] for k, v in got.items()}
        in_layers = sum(v for k, v in elements.items() if k in TP_KINDS)
        assert in_layers == LAYERS * 8 * bsh * (t - 1) / Fraction(t), f"rank {rank}: {got}"
        if sequence_parallel:
            assert calls.get("all_gather") == calls.get("reduce_scatter") == 4 * LAYERS
            assert "all_reduce" not in calls
        else:
            assert calls.get("all_reduce") == 4 * LAYERS and not {"all_gather", "reduce_scatter"} & set(calls)
        assert {k: v for k, v in elements.items() if k not in TP_KINDS} == expected, f"rank {rank}: {got}"
