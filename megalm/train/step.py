"""One training step and one evaluation pass, through whichever pipeline schedule and engine the run uses."""
from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from megalm.data.chat_dataset import IGNORE, inputs_and_targets
from megalm.parallel.pipeline.schedules import SCHEDULES
from megalm.parallel.topology import Topology
from megalm.runtime.phases import timed


class NonFiniteLoss(RuntimeError):
    """The loss was NaN or infinite: the run stops before the optimizer step."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def _callbacks(engine, p2p, micro_batches, poison: str = "", phases=None):
    """``poison`` (MEGALM_FAULTS): "loss" makes the loss NaN, "gradient" the gradients only (the loss stays)."""
    m = len(micro_batches)

    def forward_step(chunk, i, x):
        inputs, targets, segments = inputs_and_targets(micro_batches[i])
        inputs = inputs if p2p.is_first(chunk) else x
        targets = targets if p2p.is_last(chunk) else None
        with timed(phases, "forward", f"micro-batch {i} chunk {chunk}"):
            out = engine.forward(chunk, inputs, targets, segments=segments)
        if poison == "loss" and p2p.is_last(chunk):
            out = out * float("nan")
        elif poison == "gradient" and p2p.is_last(chunk) and out.requires_grad:
            out.register_hook(lambda grad: grad * float("nan"))
        return out / m if p2p.is_last(chunk) else out

    def backward_step(chunk, i, x, out, out_grad):
        with timed(phases, "backward", f"micro-batch {i} chunk {chunk}"):
            engine.backward(chunk, out, out_grad)
        return None if x is None else x.grad

    return forward_step, backward_step


def global_mean(value: float, topo: Topology, device) -> float:
    """Sum over pipeline stages (only the last one holds a loss), mean over data-parallel replicas."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if topo.pp_group is not None:
        dist.all_reduce(t, group=topo.pp_group)
    if topo.dp_group is not None:
        dist.all_reduce(t, group=topo.dp_group)
        t /= topo.dp
    return float(t)


def train_step(engine, p2p, schedule: str, micro_batches, topo: Topology, lr: float, step: int,
               clock: dict | None = None, on_non_finite: str = "stop", poison: str = "", phases=None):
    """Forward and backward every micro-batch, check the loss, then let the engine step. Returns (loss, norm);
    a non-finite loss (agreed over all ranks), or a finite loss with a non-finite gradient norm (global), raises
    NonFiniteLoss, or under ``on_non_finite="skip"`` drops the gradients and returns (loss, nan) with no optimizer
    step. ``clock``: receives ``schedule_done``
    (perf_counter), the end of this rank's own work before the first data-parallel collective. ``phases``: a
    ``megalm.runtime.phases.PhaseClock`` timing forward and backward per micro-batch (the engine, the P2P and the
    tensor-parallel handle take theirs as attributes)."""
    fwd, bwd = _callbacks(engine, p2p, micro_batches, poison, phases)
    losses = SCHEDULES[schedule](p2p, len(micro_batches), len(engine.chunks), fwd, bwd)
    if clock is not None:
        clock["schedule_done"] = time.perf_counter()
    local = float(sum(loss.double() for loss in losses)) if losses else 0.0
    loss = global_mean(local, topo, p2p.device)
    if not math.isfinite(loss):
        if on_non_finite == "skip":
            engine.discard_gradients()
            return loss, float("nan")
        raise NonFiniteLoss(_non_finite_message(loss, step, losses, topo, engine.cfg.train.precision), step)
    norm = engine.step(lr)
    if not math.isfinite(norm) and engine.loss_scale is None:        # fp16's overflow skip is not this
        if on_non_finite == "skip":
            return loss, float("nan")
        raise NonFiniteLoss(f"non-finite gradient (norm {norm}) at step {step} with a finite loss {loss:.4f}; no "
                            f"optimizer step was taken on any rank, so the weights and the last checkpoint are "
                            f"intact. To continue: lower optimizer.lr or train.grad_clip, or set "
                            f"train.on_non_finite=skip", step)
    return loss, norm


def _non_finite_message(loss: float, step: int, losses, topo: Topology, precision: str) -> str:
    """Where the loss went bad: this rank's non-finite micro-batches, or the ranks that hold the loss."""
    bad = [i for i, value in enumerate(losses) if not math.isfinite(float(value))]
    if bad:
        where = f"micro-batch(es) {bad} of data-parallel rank {topo.dp_rank} on pipeline stage {topo.pp_rank}"
    elif losses:
        where = (f"another data-parallel rank (this rank's {len(losses)} micro-batches, data-parallel rank "
                 f"{topo.dp_rank}, are finite)")
    else:
        where = "the last pipeline stage"
    advice = "lower optimizer.lr or raise lr.warmup_steps" + ("" if precision == "fp32" else ", or train in fp32")
    return (f"non-finite loss {loss} at step {step} (computed on {where}); stopping before the optimizer step, so "
            f"the last checkpoint is intact. To continue: {advice}")


@torch.no_grad()
def evaluate(engine, p2p, batches, topo: Topology) -> float:
    """Mean loss per scored token over ``batches`` (this data-parallel rank's share), forward only through the
    pipeline."""
    for chunk in engine.chunks:
        chunk.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            inputs, targets, segments = inputs_and_targets(batch)
            scored = int((targets != IGNORE).sum())         # every token of pretraining data; a chat's answers
            for c in range(len(engine.chunks)):
                x = inputs if p2p.is_first(c) else p2p.recv_forward(c)
                out = engine.forward(c, x, targets if p2p.is_last(c) else None, segments=segments)
                if p2p.is_last(c):
                    total += float(out) * scored
                else:
                    p2p.send_forward(out, c)
            count += scored
        p2p.flush()
    finally:
        for chunk in engine.chunks:
            chunk.train()
    stats = torch.tensor([total, count], dtype=torch.float64, device=p2p.device)
    if topo.pp_group is not None:   # the loss lives on the last stage; counts are the same on every stage
        loss_only = torch.tensor([stats[0].item(), 0.0], dtype=torch.float64, device=p2p.device)
        dist.all_reduce(loss_only, group=topo.pp_group)
        stats[0] = loss_only[0]
    if topo.dp_group is not None:
        dist.all_reduce(stats, group=topo.dp_group)
    return float(stats[0] / stats[1])
