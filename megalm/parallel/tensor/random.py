"""Dropout seeds under tensor parallelism (Megatron-LM's ``model_parallel_cuda_manual_seed``, no tracker).

Two random streams:

- shared: the default generators, seeded by ``torch.manual_seed(seed)`` with the same ``seed`` on every TP
  rank (the trainer does this once, before building the model). Dropout on replicated activations (outside TP
  regions, without sequence parallelism) draws from it, so every TP rank draws the same mask and the replicas
  stay equal.
- per TP rank: inside ``with tp_rng(seed, tp):`` the default generator of the device is forked and reseeded
  with ``seed + 2718 + tp.rank`` (plus a multiple of one draw from the shared CPU stream, so each block gets
  fresh masks). Dropout on sharded activations draws from it, so each shard gets its own mask: attention
  probabilities of my heads, and, under sequence parallelism, the residual-stream dropout on my sequence
  chunk.

How the model uses it (dropout is the only consumer; ``seed`` is the run's seed from the config):

    with tp_rng(seed, tp):                                   # attention probs (B, heads/t, T, T)
        probs = F.dropout(probs, p, self.training)
    if tp.sequence_parallel:                                 # residual branch (B, T/t, H): my chunk
        with tp_rng(seed, tp):
            y = F.dropout(y, p, self.training)
    else:                                                    # residual branch (B, T, H): replicated
        y = F.dropout(y, p, self.training)

Nothing is stored between calls: the per-rank stream is derived from the shared CPU stream, whose state
``torch.utils.checkpoint`` saves and restores, so a recomputed forward draws the same masks as the first one.
Enter ``tp_rng`` only when dropout is active (p > 0 and training), or the draw shifts the shared stream for
nothing (harmless, but it changes the masks of later shared-stream dropout).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from megalm.parallel.topology import TensorParallel

TP_SEED_OFFSET = 2718  # Megatron-LM's offset between the shared seed and the per-TP-rank seeds
_MAX_DRAW = 2**40
_STRIDE = 4099


@contextmanager
def tp_rng(seed: int, tp: TensorParallel, device: torch.device | str | None = None):
    """Run the body with the default generator of ``device`` (default: the current CUDA device if CUDA is
    available, else the CPU) seeded per TP rank; restore the outer state on exit.

    Every TP rank draws one number from the shared CPU stream on entry, so the shared stream stays identical
    across TP ranks and successive ``tp_rng`` blocks get different seeds. That draw already carries the run's
    seed and step (the loop seeds the shared stream with both), so ``seed`` is only an extra offset: the model
    passes 0.
    """
    draw = int(torch.randint(_MAX_DRAW, (), dtype=torch.long))     # shared CPU stream: same on all TP ranks
    # _STRIDE exceeds any TP size, so distinct (draw, rank) pairs give distinct seeds.
    local_seed = (seed + TP_SEED_OFFSET + tp.rank + draw * _STRIDE) % 2**63
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    cuda = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda):                    # restores CPU (+ that CUDA device) on exit
        torch.default_generator.manual_seed(local_seed)
        if cuda:
            torch.cuda.default_generators[cuda[0]].manual_seed(local_seed)
        yield
