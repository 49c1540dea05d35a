"""Pipeline schedules: GPipe, 1F1B and interleaved 1F1B, one function each, with one signature.

    schedule(p2p, num_microbatches, num_chunks, forward_step, backward_step, stats=None) -> list of losses

The caller owns the model and how backward runs (plain autograd, or a DeepSpeed engine's backward), through
two callbacks:

    forward_step(chunk, microbatch, input_or_None) -> output
        the first chunk of rank 0 gets None and reads its own micro-batch; the last chunk of rank pp-1 returns
        the loss, already scaled by 1/num_microbatches.
    backward_step(chunk, microbatch, input, output, output_grad_or_None) -> input_grad_or_None
        output_grad is None on the last chunk of rank pp-1 (output is the loss); return input.grad, or None
        where input is None. ``autograd_backward_step`` is the plain-autograd version.

Received inputs are marked requires_grad by the schedule. Each schedule returns the detached losses of the
micro-batches on the last stage (an empty list elsewhere). With pp == 1 every schedule is plain gradient
accumulation. With equal stages, forward time t_f and backward t_b, the idle fraction of wall time is
(p-1)/(m+p-1) for GPipe and 1F1B and (p-1)/(v*m+p-1) for interleaved 1F1B (Narayanan et al. 2021, sec. 2.2).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from megalm.config.rules import check_schedule


@dataclass
class ScheduleStats:
    """What one schedule run did on this rank. Times are time.perf_counter seconds (CLOCK_MONOTONIC on Linux,
    so comparable between processes on one host)."""
    peak_alive: int = 0
    """Most micro-batches whose activations (input, output and graph) this rank held at once, all chunks."""
    peak_alive_per_chunk: list = field(default_factory=list)
    busy_s: float = 0.0
    """Time inside forward_step and backward_step."""
    wait_s: float = 0.0
    """Time blocked on receives (and on the final flush of sends)."""
    start: float = 0.0
    end: float = 0.0
    events: list = field(default_factory=list)
    """(kind "F"/"B", chunk, microbatch, t0, t1) per callback: the timeline."""

    def reset(self, num_chunks: int) -> None:
        self.__init__(peak_alive_per_chunk=[0] * num_chunks, start=time.perf_counter())

    @property
    def wall_s(self) -> float:
        return self.end - self.start

    @property
    def idle_s(self) -> float:
        return self.wall_s - self.busy_s


def autograd_backward_step(chunk, microbatch, input_tensor, output_tensor, output_grad):
    """backward_step for plain modules: backpropagate output_grad (None: output is the loss)."""
    torch.autograd.backward(output_tensor, output_grad)
    return None if input_tensor is None else input_tensor.grad


class _Steps:
    """Runs the callbacks, holds each micro-batch's (input, output) from its forward to its backward, and
    keeps the statistics. The schedules below only decide the order and the communication."""

    def __init__(self, p2p, num_microbatches, num_chunks, forward_step, backward_step, stats):
        self.p2p, self.forward_step, self.backward_step = p2p, forward_step, backward_step
        self.stats = stats if stats is not None else ScheduleStats()
        self.stats.reset(num_chunks)
        p2p.begin(num_microbatches)
        self.wait0 = p2p.wait_s
        self.held, self.alive, self.losses = {}, [0] * num_chunks, []

    def forward(self, chunk, mb, x):
        if x is not None:
            x.requires_grad_()
        y = self._timed("F", chunk, mb, self.forward_step, chunk, mb, x)
        self.held[chunk, mb] = (x, y)
        self.alive[chunk] += 1
        s = self.stats
        s.peak_alive = max(s.peak_alive, sum(self.alive))
        s.peak_alive_per_chunk[chunk] = max(s.peak_alive_per_chunk[chunk], self.alive[chunk])
        if self.p2p.is_last(chunk):
            self.losses.append(y.detach())
        return y

    def backward(self, chunk, mb, output_grad):
        x, y = self.held.pop((chunk, mb))
        self.alive[chunk] -= 1
        return self._timed("B", chunk, mb, self.backward_step, chunk, mb, x, y, output_grad)

    def _timed(self, kind, chunk, mb, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        t1 = time.perf_counter()
        self.stats.busy_s += t1 - t0
        self.stats.events.append((kind, chunk, mb, t0, t1))
        return out

    def finish(self):
        self.p2p.flush()
        self.stats.end = time.perf_counter()
        self.stats.wait_s = self.p2p.wait_s - self.wait0
        return self.losses


def gpipe(p2p, num_microbatches, num_chunks, forward_step, backward_step, stats=None):
    """GPipe (Huang et al. 2019): every micro-batch forward, then every one backward; holds m activations."""
    check_schedule("gpipe", p2p.pp, num_chunks, num_microbatches)
    steps = _Steps(p2p, num_microbatches, num_chunks, forward_step, backward_step, stats)
    for i in range(num_microbatches):
        p2p.send_forward(steps.forward(0, i, p2p.recv_forward(0)), 0)
    for i in range(num_microbatches):
        p2p.send_backward(steps.backward(0, i, p2p.recv_backward(0)), 0)
    return steps.finish()


def one_f_one_b(p2p, num_microbatches, num_chunks, forward_step, backward_step, stats=None):
    """1F1B (PipeDream-Flush, Narayanan et al. 2021): rank r runs pp-r-1 warm-up forwards, then alternates one
    forward and one backward, then drains; it never holds more than pp micro-batches of activations."""
    check_schedule("1f1b", p2p.pp, num_chunks, num_microbatches)
    steps = _Steps(p2p, num_microbatches, num_chunks, forward_step, backward_step, stats)
    warmup = min(p2p.pp - p2p.pp_rank - 1, num_microbatches)
    steady = num_microbatches - warmup
    for i in range(warmup):
        p2p.send_forward(steps.forward(0, i, p2p.recv_forward(0)), 0)
    x = p2p.recv_forward(0) if steady else None
    for j in range(steady):
        # forward micro-batch warmup+j, backward micro-batch j
        grad = p2p.send_forward_recv_backward(steps.forward(0, warmup + j, x), 0, 0)
        input_grad = steps.backward(0, j, grad)
        if j + 1 < steady:
            x = p2p.send_backward_recv_forward(input_grad, 0, 0)
        else:
            p2p.send_backward(input_grad, 0)
    for j in range(steady, num_microbatches):
        p2p.send_backward(steps.backward(0, j, p2p.recv_backward(0)), 0)
    return steps.finish()


def _virtual_microbatch(k, pp, num_chunks, forward):
    """(chunk, microbatch) of the k-th forward (or backward) of a rank in the interleaved schedule:
    micro-batches go in groups of pp through chunk 0, 1, ..., v-1 (backward: v-1, ..., 0), then the next
    group."""
    group, r = divmod(k, pp * num_chunks)
    chunk = r // pp
    return (chunk if forward else num_chunks - 1 - chunk), group * pp + r % pp


def interleaved_1f1b(p2p, num_microbatches, num_chunks, forward_step, backward_step, stats=None):
    """Interleaved 1F1B (Narayanan et al. 2021, sec. 2.2.2) over num_chunks model chunks per rank, as in
    Megatron-LM: rank r runs 2(pp-r-1) + (v-1)pp warm-up forwards (capped at m*v), then one forward and one
    backward at a time, then drains. Needs num_microbatches to be a multiple of pp."""
    pp, v = p2p.pp, num_chunks
    check_schedule("interleaved", pp, v, num_microbatches)
    steps = _Steps(p2p, num_microbatches, v, forward_step, backward_step, stats)
    total = num_microbatches * v
    warmup = min(2 * (pp - p2p.pp_rank - 1) + (v - 1) * pp, total)
    steady = total - warmup
    fwd = [_virtual_microbatch(k, pp, v, True) for k in range(total)]
    bwd = [_virtual_microbatch(k, pp, v, False) for k in range(total)]
    for k in range(warmup):
        c, i = fwd[k]
        p2p.send_forward(steps.forward(c, i, p2p.recv_forward(c)), c)
    x = p2p.recv_forward(fwd[warmup][0]) if steady else None
    for j in range(steady):
        (c, i), (cb, ib) = fwd[warmup + j], bwd[j]
        grad = p2p.send_forward_recv_backward(steps.forward(c, i, x), c, cb)
        input_grad = steps.backward(cb, ib, grad)
        if j + 1 < steady:
            x = p2p.send_backward_recv_forward(input_grad, cb, fwd[warmup + j + 1][0])
        else:
            p2p.send_backward(input_grad, cb)
    for j in range(steady, total):
        cb, ib = bwd[j]
        p2p.send_backward(steps.backward(cb, ib, p2p.recv_backward(cb)), cb)
    return steps.finish()


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b, "interleaved": interleaved_1f1b}
