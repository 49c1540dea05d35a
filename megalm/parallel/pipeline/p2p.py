"""Point-to-point exchange of activations (forward) and their gradients (backward) between pipeline stages.

Every message has one shape, fixed ahead: ``(micro_batch, seq, hidden)``, or
``(micro_batch, seq / tp, hidden)`` under sequence parallelism, where the pipeline carries the
sequence-sharded activation (see ``activation_shape``); nothing about shapes is exchanged per micro-batch.

Stages form a ring. Virtual stage ``c*pp + p`` (chunk ``c`` of rank ``p``) sends its activation to virtual
stage ``c*pp + p + 1``: rank ``p + 1``'s chunk ``c``, or, from the last rank, rank 0's chunk ``c + 1`` (the
interleaved wraparound). So the forward peer is always the next rank on the ring and the backward peer the
previous one; the chunk only decides whether a peer exists at all (none before the first chunk of rank 0, none
after the last chunk of rank pp-1). With pp == 1 the ring closes on this rank: messages between its own
chunks go through a local queue, and with a single chunk every call does nothing.

Sends are posted (``batch_isend_irecv``) and not waited on: a rank only ever blocks on a receive it needs,
so no ordering of sends across ranks can deadlock. After ``begin(num_microbatches)`` each channel keeps one
receive posted ahead, so a message lands while the rank computes. Per (pair of ranks, direction) the
receiver consumes messages in the order the sender produced them, which every schedule guarantees; forward
and backward messages carry different tags because with pp == 2 and interleaving both travel from rank 0 to
rank 1.
"""
from __future__ import annotations

import time
from collections import deque

import torch
import torch.distributed as dist

from megalm.runtime.phases import timed

FORWARD_TAG, BACKWARD_TAG = 0, 1


def activation_shape(micro_batch: int, seq_len: int, hidden: int, topology) -> tuple[int, int, int]:
    """Shape of one pipeline message: the sequence is sharded over tp ranks under sequence parallelism (the rule
    book has checked that it divides)."""
    tp = topology.tensor_parallel
    return (micro_batch, seq_len // tp.size if tp.sequence_parallel else seq_len, hidden)


class P2P:
    """Send and receive one pipeline message shape between this rank's chunks and their ring neighbours."""

    def __init__(self, topology, shape, dtype=torch.float32, device="cpu", num_chunks: int = 1):
        self.pp, self.pp_rank, self.num_chunks = topology.pp, topology.pp_rank, num_chunks
        self.nccl = topology.pp_group is not None and dist.get_backend(topology.pp_group) == "nccl"
        self.shape, self.dtype, self.device = tuple(shape), dtype, torch.device(device)
        self.rank = topology.rank
        self.group = topology.pp_group
        self.next_rank = topology.stage_rank((self.pp_rank + 1) % self.pp)
        self.prev_rank = topology.stage_rank((self.pp_rank - 1) % self.pp)
        self._loopback = {FORWARD_TAG: deque(), BACKWARD_TAG: deque()}
        self._pending = []   # (work, tensor): posted sends, tensor kept alive until the send completes
        self._expected, self._ahead = {}, {}   # per tag: receives still to post; the receive posted ahead
        self.wait_s = 0.0    # time blocked in receives and flush, for ScheduleStats
        self.phases = None   # a megalm.runtime.phases.PhaseClock timing sends, receives and waits; None = not timing

    def is_first(self, chunk: int) -> bool:
        """Virtual stage 0: reads its own micro-batch, receives no activation, sends no gradient."""
        return self.pp_rank == 0 and chunk == 0

    def is_last(self, chunk: int) -> bool:
        """Last virtual stage: computes the loss, sends no activation, receives no gradient."""
        return self.pp_rank == self.pp - 1 and chunk == self.num_chunks - 1

    # The six calls the schedules use. A "None" tensor to send means nothing to send (no peer).
    def send_forward(self, output, chunk: int) -> None:
        self._exchange(sends=[self._fwd_send(output, chunk)])

    def recv_forward(self, chunk: int):
        return self._exchange(recvs=[self._fwd_recv(chunk)])[0]

    def send_backward(self, input_grad, chunk: int) -> None:
        self._exchange(sends=[self._bwd_send(input_grad, chunk)])

    def recv_backward(self, chunk: int):
        return self._exchange(recvs=[self._bwd_recv(chunk)])[0]

    def send_forward_recv_backward(self, output, send_chunk: int, recv_chunk: int):
        """1F1B steady state: pass this forward on and get the next backward's gradient, in one batch."""
        return self._exchange([self._fwd_send(output, send_chunk)], [self._bwd_recv(recv_chunk)])[0]

    def send_backward_recv_forward(self, input_grad, send_chunk: int, recv_chunk: int):
        """1F1B steady state: pass this gradient back and get the input of the next forward, in one batch."""
        return self._exchange([self._bwd_send(input_grad, send_chunk)], [self._fwd_recv(recv_chunk)])[0]

    def flush(self) -> None:
        """Wait for every posted send (end of a schedule: buffers may be reused after this)."""
        t0 = time.perf_counter()
        with timed(self.phases if self._pending else None, "pp_comm", "flush"):
            for work, _ in self._pending:
                work.wait()
        self._pending.clear()
        self.wait_s += time.perf_counter() - t0
        if self._ahead or any(self._expected.values()):
            raise RuntimeError(f"pipeline schedule ended with receives outstanding: {self._expected}, "
                               f"posted ahead for tags {list(self._ahead)}")

    # (peer, tag, tensor) for a send, (peer, tag) for a receive; None where the chunk has no neighbour.
    def _fwd_send(self, output, chunk):
        return None if self.is_last(chunk) else (self.next_rank, FORWARD_TAG, output)

    def _bwd_send(self, input_grad, chunk):
        return None if self.is_first(chunk) else (self.prev_rank, BACKWARD_TAG, input_grad)

    def _fwd_recv(self, chunk):
        return None if self.is_first(chunk) else (self.prev_rank, FORWARD_TAG)

    def _bwd_recv(self, chunk):
        return None if self.is_last(chunk) else (self.next_rank, BACKWARD_TAG)

    def _exchange(self, sends=(), recvs=()):
        """Post the sends and receives as one batch; wait for the receives only. Returns received tensors."""
        talking = any(m is not None for m in (*sends, *recvs))   # the first or last stage: no neighbour that way
        with timed(self.phases if talking else None, "pp_comm"):
            return self._post_and_wait(sends, recvs)

    def _post_and_wait(self, sends, recvs):
        ops, out, waits, received = [], [None] * len(recvs), [], []
        for send in sends:
            if send is None:
                continue
            peer, tag, tensor = send
            tensor = tensor.detach()
            if tuple(tensor.shape) != self.shape:
                raise ValueError(f"pipeline message of shape {tuple(tensor.shape)} != the fixed {self.shape}")
            if peer == self.rank:
                self._loopback[tag].append(tensor.clone())
            else:
                ops.append(dist.P2POp(dist.isend, tensor.contiguous(), peer, self.group, tag))
        n_sends = len(ops)
        for i, recv in enumerate(recvs):
            if recv is None:
                continue
            peer, tag = recv
            if peer == self.rank:
                out[i] = self._loopback[tag].popleft()
            elif self._ahead.get(tag):
                works, out[i] = self._ahead.pop(tag)
                waits += works
                received.append((tag, peer))
            else:
                out[i] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
                ops.append(dist.P2POp(dist.irecv, out[i], peer, self.group, tag))
        works = dist.batch_isend_irecv(ops) if ops else []
        if len(works) == len(ops):
            self._pending += [(w, op.tensor) for w, op in zip(works[:n_sends], ops)]
            waits += works[n_sends:]
        else:  # a backend that coalesces the batch into one handle (NCCL): wait orders the stream only
            waits += works
        t0 = time.perf_counter()
        with timed(self.phases if waits else None, "pp_wait", "receive"):    # the bubble (and the transfer)
            for w in waits:
                w.wait()
        self.wait_s += time.perf_counter() - t0
        for tag, peer in received:
            self._post_ahead(tag, peer)
        self._pending = [(w, t) for w, t in self._pending if not w.is_completed()]
        return out

    def begin(self, num_microbatches: int) -> None:
        """Start of a schedule run: count the messages each channel will deliver (every forward receives
        except chunk 0 of rank 0, every backward except the last chunk of rank pp-1) and post the first
        receive of each. Each receive is then posted one message ahead, so data lands while this rank
        computes instead of waiting for a rendezvous when it is needed."""
        if self.pp == 1 or self.nccl:
            # NCCL runs point-to-point operations in order on one stream per communicator: a receive posted
            # alone, ahead of its sender, would hold back this rank's own sends. Receive when needed instead.
            return
        m, v = num_microbatches, self.num_chunks
        self._expected = {FORWARD_TAG: m * v - (m if self.pp_rank == 0 else 0),
                          BACKWARD_TAG: m * v - (m if self.pp_rank == self.pp - 1 else 0)}
        self._post_ahead(FORWARD_TAG, self.prev_rank)
        self._post_ahead(BACKWARD_TAG, self.next_rank)

    def _post_ahead(self, tag, peer):
        if self._expected.get(tag, 0) > 0:
            self._expected[tag] -= 1
            buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            op = dist.P2POp(dist.irecv, buf, peer, self.group, tag)
            self._ahead[tag] = (dist.batch_isend_irecv([op]), buf)
