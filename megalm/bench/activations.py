"""The bytes a micro-batch's forward keeps for backward, counted on megalm's own modules on the meta device (no
memory, no process group): what ``megalm plan`` charges per layer and for the head, instead of a published
formula for another implementation (Korthikanti et al.'s 34 s b h assumes Megatron's choices; megalm keeps,
for example, the gathered sequence that its sequence-parallel linears were fed).

How: one forward of a chunk with one layer and of a chunk with two (so one layer is their difference), with
``saved_tensors_hooks`` recording every distinct storage autograd saves. Three stand-ins make the meta run
faithful to a real one:
  - attention is a flash-style kernel (Triton's or SDPA's): it keeps q, k, v, the output and the fp32
    log-sum-exp, never the s x s scores (the meta device would otherwise pick the math path);
  - tensor-parallel collectives return tensors of the shape the real ones would (``tp`` ranks, no group);
  - activation checkpointing keeps what ``torch.utils.checkpoint`` keeps: the inputs of the checkpointed call;
  - on a GPU at tp = 1 the head's loss is the fused linear + cross entropy kernel, which keeps the two gradients
    it computes in its forward and never the logits.
Counts are at the model's fp32 width; mixed precision halves the block's (the head's logits stay fp32).
"""
from __future__ import annotations

import contextlib
from unittest import mock

import torch

from megalm.config import ModelConfig


class _FlashLike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _FusedLossLike(torch.autograd.Function):
    """What the fused linear + cross entropy kernel keeps (``kernels/cross_entropy.py``): the gradients of x and
    of the head's weight, computed during its forward; never the logits."""
    @staticmethod
    def forward(ctx, x, weight, targets):
        ctx.save_for_backward(torch.empty_like(x), torch.empty_like(weight))
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        dx, dw = ctx.saved_tensors
        return dx, dw, None


def _shape_only(tp_size: int):
    """The three tensor-parallel collectives as shape computations for ``tp_size`` ranks."""
    def all_reduce(x, tp, kind=None, op=None):
        return x.clone()

    def all_gather(x, tp, dim, kind=None):
        return torch.cat([x] * tp_size, dim=dim)

    def reduce_scatter(x, tp, dim, kind=None):
        return x.chunk(tp_size, dim)[0].contiguous()
    return all_reduce, all_gather, reduce_scatter


class _Saved:
    def __init__(self):
        self.storages: dict[int, int] = {}
        self.suppressed = 0

    def add(self, t: torch.Tensor) -> None:
        if self.suppressed == 0 and isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            self.storages[storage._cdata] = storage.nbytes()

    def pack(self, t):
        self.add(t)
        return t

    def checkpoint(self, fn, *args, **kwargs):
        """What non-reentrant checkpointing keeps: the call's tensor inputs; nothing of the ops inside."""
        for a in args:
            self.add(a)
        self.suppressed += 1
        try:
            return fn(*args)
        finally:
            self.suppressed -= 1


def _count(model: ModelConfig, tp: int, sequence_parallel: bool, checkpointing: str, micro_batch: int,
           seq_len: int, layers: int, fused_loss: bool = False) -> int:
    from megalm.model import transformer
    from megalm.model.transformer import ModelChunk, reference_ops
    from megalm.parallel.tensor import comm
    from megalm.parallel.topology import TensorParallel

    saved = _Saved()
    ops = reference_ops()
    ops._attention = lambda q, k, v, causal, documents=None: _FlashLike.apply(q, k, v)
    if fused_loss:
        ops._linear_cross_entropy = _FusedLossLike.apply
    reduce, gather, scatter = _shape_only(tp)
    patches = [mock.patch.object(comm, "all_reduce", reduce), mock.patch.object(comm, "all_gather", gather),
               mock.patch.object(comm, "reduce_scatter", scatter),
               mock.patch.object(transformer, "checkpoint", saved.checkpoint)]
    shard = TensorParallel(size=tp, sequence_parallel=sequence_parallel)
    with contextlib.ExitStack() as stack, torch.device("meta"):
        for patch in patches:
            stack.enter_context(patch)
        chunk = ModelChunk(model, shard, range(layers), True, True, ops, checkpointing)
        tokens = torch.zeros(micro_batch, seq_len, dtype=torch.long)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            chunk(tokens, tokens)
        weights = {p.untyped_storage()._cdata for p in chunk.parameters()}   # model states, counted apart
    return sum(size for key, size in saved.storages.items() if key not in weights)


def saved_activation_bytes(model: ModelConfig, tp: int, sequence_parallel: bool, checkpointing: str,
                           micro_batch: int, seq_len: int, precision: str = "fp32",
                           fused_loss: bool = False) -> tuple[float, float]:
    """(per layer, head and embedding) bytes one micro-batch's forward keeps on one tensor-parallel rank;
    ``fused_loss``: the head's loss through the fused linear + cross entropy kernel (tp = 1 on a GPU)."""
    key = (repr(model), tp, sequence_parallel, checkpointing, micro_batch, seq_len, fused_loss)
    if key not in _CACHE:
        one, two = (_count(model, tp, sequence_parallel, checkpointing, micro_batch, seq_len, n, fused_loss)
                    for n in (1, 2))
        _CACHE[key] = (two - one, 2 * one - two)
    per_layer, rest = _CACHE[key]
    return (per_layer / 2 if precision in ("bf16", "fp16") else per_layer), rest


_CACHE: dict = {}
