"""Pipeline schedules on gloo: a tiny tied-embedding LM (embedding, a stack of Linear+tanh layers, tied head,
cross-entropy) split over pp ranks must give the losses and gradients of the same model in one process.

Each spawned run packs many cases (schedules x micro-batch counts x layouts) because a spawn costs seconds.
"""
from __future__ import annotations

import weakref

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megalm.parallel.pipeline import (
    P2P,
    SCHEDULES,
    ScheduleStats,
    activation_shape,
    autograd_backward_step,
    partition_layers,
    sum_tied_gradients,
)
from megalm.parallel.topology import build_topology
from megalm.runtime.spawn import run_distributed
from tests.conftest import validate_pipeline

V, H, B, S, L = 11, 8, 2, 4, 8   # vocab, hidden, micro-batch, sequence, layers
TOL = dict(rtol=1e-5, atol=1e-7)


class TinyLM(nn.Module):
    """Same init whatever the layout: every rank builds the whole model from one seed and uses its slices."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, H)
        self.layers = nn.ModuleList(nn.Linear(H, H) for _ in range(L))

    def block(self, h, layer_ids):
        for j in layer_ids:
            h = torch.tanh(self.layers[j](h))
        return h

    def loss(self, h, targets, num_microbatches):
        # tied head; sum over this rank's tokens / all tokens, so tp sequence shards add up to the mean
        logits = h @ self.emb.weight.t()                                  # (B, S or S/tp, V)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / (B * S) \
            / num_microbatches


def make_data(m):
    g = torch.Generator().manual_seed(1)
    return torch.randint(V, (m, B, S), generator=g), torch.randint(V, (m, B, S), generator=g)


def reference(m):
    """Plain gradient accumulation over m micro-batches in one process."""
    model, (tokens, targets) = TinyLM(), make_data(m)
    losses = []
    for i in range(m):
        loss = model.loss(model.block(model.emb(tokens[i]), range(L)), targets[i], m)
        loss.backward()
        losses.append(loss.detach())
    return torch.stack(losses), model


class LiveCounter:
    """Counts output tensors still alive (held by the schedule) with weakref finalizers: an independent
    check of ScheduleStats.peak_alive, on the objects themselves rather than the schedule's bookkeeping."""

    def __init__(self):
        self.alive = self.peak = self.calls = 0

    def track(self, t):
        self.alive += 1
        self.calls += 1
        self.peak = max(self.peak, self.alive)
        weakref.finalize(t, self._dec)

    def _dec(self):
        self.alive -= 1


def run_case(topo, schedule, m, v=1, explicit=None):
    """Run one schedule on this rank, check losses and grads against ``reference``; return the peaks."""
    tp = topo.tensor_parallel
    chunks = partition_layers(L, topo.pp, v, explicit)[topo.pp_rank]
    model, (tokens, targets) = TinyLM(), make_data(m)
    n = S // tp.size if tp.sequence_parallel else S
    shard = slice(tp.rank * n, (tp.rank + 1) * n) if tp.sequence_parallel else slice(None)
    p2p = P2P(topo, activation_shape(B, S, H, topo), num_chunks=v)
    live = LiveCounter()

    def forward_step(chunk, i, x):
        h = model.emb(tokens[i][:, shard]) if p2p.is_first(chunk) else x      # (B, S or S/tp, H)
        out = model.block(h, chunks[chunk])
        if p2p.is_last(chunk):
            out = model.loss(out, targets[i][:, shard], m)
        live.track(out)
        return out

    stats = ScheduleStats()
    losses = SCHEDULES[schedule](p2p, m, v, forward_step, autograd_backward_step, stats)
    assert live.alive == 0, f"{live.alive} outputs still alive after the schedule"
    assert stats.peak_alive == live.peak, (stats.peak_alive, live.peak)

    ref_losses, ref = reference(m)
    mine = [j for r in chunks for j in r]
    grads = [model.layers[j].weight.grad for j in mine] + [model.layers[j].bias.grad for j in mine]
    holds_emb = topo.is_first_stage or topo.is_last_stage
    if tp.sequence_parallel:  # each tp rank saw its own tokens: weight grads and losses add up over tp
        for g in grads + ([model.emb.weight.grad] if holds_emb else []):
            dist.all_reduce(g, group=topo.tp_group)
        for loss in losses:
            dist.all_reduce(loss, group=topo.tp_group)
    if holds_emb:
        sum_tied_gradients([model.emb.weight], topo)
        torch.testing.assert_close(model.emb.weight.grad, ref.emb.weight.grad, **TOL)
    if topo.is_last_stage:
        torch.testing.assert_close(torch.stack(losses), ref_losses, **TOL)
    else:
        assert losses == []
    for j in range(L):
        if j in mine:
            torch.testing.assert_close(model.layers[j].weight.grad, ref.layers[j].weight.grad, **TOL)
            torch.testing.assert_close(model.layers[j].bias.grad, ref.layers[j].bias.grad, **TOL)
        else:
            assert model.layers[j].weight.grad is None
    return {"peak": stats.peak_alive, "per_chunk": stats.peak_alive_per_chunk}


def check_invalid(topo):
    """Invalid layouts raise ValueError on this rank before any message or forward; return the messages."""
    messages = []
    bad_layouts = [dict(num_layers=L + 1, pp=topo.pp, virtual_stages=1, num_microbatches=4),
                   dict(num_layers=L, pp=topo.pp, virtual_stages=2, num_microbatches=topo.pp + 1),
                   dict(num_layers=L, pp=topo.pp, virtual_stages=1, num_microbatches=4, explicit=[L]),
                   dict(num_layers=L, pp=topo.pp, virtual_stages=1, num_microbatches=4,
                        explicit=[1] * topo.pp)]
    for kwargs in bad_layouts:
        with pytest.raises(ValueError) as err:
            validate_pipeline(**kwargs)
        messages.append(str(err.value))
    live = LiveCounter()
    p2p = P2P(topo, (B, S, H), num_chunks=2)
    for name, m, v in [("interleaved", topo.pp + 1, 2), ("1f1b", 4, 2), ("gpipe", 0, 1)]:
        with pytest.raises(ValueError) as err:
            SCHEDULES[name](p2p, m, v, lambda c, i, x: live.track(x), autograd_backward_step)
        messages.append(str(err.value))
    assert live.calls == 0 and p2p._pending == []
    return messages


def _worker(rank, world, layouts, queue):
    report = {}
    for tp, pp, cases in layouts:
        topo = build_topology(tp=tp, pp=pp, sequence_parallel=tp > 1)
        report[tp, pp, "invalid"] = check_invalid(topo)
        for case in cases:
            report[(tp, pp) + case] = run_case(topo, *case)
        dist.barrier()
    queue.put((rank, report))


def _spawn(world, layouts):
    queue = torch.multiprocessing.get_context("spawn").SimpleQueue()
    run_distributed(_worker, world, layouts, queue)
    return dict(queue.get() for _ in range(world))


def _cases(pp, ms=(1, 3, 4, 8)):
    return ([("gpipe", m) for m in ms] + [("1f1b", m) for m in ms]
            + [("interleaved", m, 2) for m in ms if m % pp == 0])


def _check_peaks(reports):
    first = reports[0]
    for key, res in first.items():
        if key[2] == "invalid":
            assert len(res) == 7 and all("num_" in msg or "virtual_stages" in msg for msg in res), res
        elif key[2] == "gpipe":
            assert res["peak"] == key[3], (key, res)            # GPipe holds all m micro-batches
        elif key[2] == "1f1b":
            assert res["peak"] == min(key[1], key[3]) <= key[1], (key, res)   # 1F1B: at most pp
    for report in reports.values():   # every rank rejected the same invalid layouts
        assert [k for k in report if k[2] == "invalid"] == [k for k in first if k[2] == "invalid"]


def test_pp2_matches_one_process():
    explicit = [("1f1b", 3, 1, (3, 5)), ("gpipe", 2, 1, (0, 8)), ("interleaved", 4, 2, (1, 3, 2, 2))]
    cases = _cases(2) + [("interleaved", 4, 1)] + explicit
    reports = _spawn(2, [(1, 2, cases)])
    _check_peaks(reports)
    # interleaved on rank 0: 2(pp-1) + (v-1)pp + 1 = 5 micro-batches of chunk activations at most
    assert reports[0][1, 2, "interleaved", 8, 2]["peak"] == 5


@pytest.mark.slow
def test_pp4_and_tp2_pp2_sequence_parallel_match_one_process():
    tp2 = [("1f1b", 3), ("gpipe", 4), ("interleaved", 4, 2)]
    reports = _spawn(4, [(1, 4, _cases(4)), (2, 2, tp2)])
    _check_peaks(reports)


@pytest.mark.parametrize("schedule,v", [("gpipe", 1), ("1f1b", 1), ("interleaved", 1), ("interleaved", 2)])
def test_single_stage_is_gradient_accumulation(schedule, v):
    topo = build_topology()
    for m in (1, 3):
        res = run_case(topo, schedule, m, v)
        assert res["peak"] == (m if schedule == "gpipe" else v)
