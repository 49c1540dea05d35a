"""Where a training step's time goes, and the labels a profiler trace shows.

A :class:`PhaseClock` is handed to the pieces that do the work: the train step (forward and backward per
micro-batch, data loading), the tensor-parallel handle (``tp.phases``: its collectives), the pipeline's P2P
(``p2p.phases``: posting sends and receives, and the waits of the bubble) and the engine (``engine.phases``:
data-parallel gradient reduction, optimizer). Each phase's time is *exclusive*: a tensor-parallel all-reduce
inside a forward counts as ``tp_comm``, not ``forward``, so the phases of a step add up to the step.

Nothing is handed out by default (``None``): each hook is then one attribute test. On CUDA the clock
synchronises the device at every phase boundary (kernels are asynchronous, so host time would misattribute
them); that costs throughput, which is why ``megalm bench train`` measures its headline figures on steps
without a clock and the breakdown on separate steps. Each phase is also a ``torch.profiler.record_function``
range, so a ``--profile`` trace names the same phases.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch

PHASES = ("data", "forward", "backward", "tp_comm", "pp_comm", "pp_wait", "dp_comm", "optimizer")
"""What a step is divided into. ``pp_wait``: a stage blocked on a receive, which is the pipeline bubble (and, on
gloo, also the message's transfer, which completes inside the wait); ``pp_comm``: posting messages and the
final wait for sends."""


class PhaseClock:
    def __init__(self, device: torch.device | None = None, label: bool = True):
        self.synchronize = device is not None and device.type == "cuda"
        self.device, self.label = device, label
        self.totals: dict[str, float] = defaultdict(float)
        self._children: list[float] = []      # per open phase: the time its nested phases took

    @contextlib.contextmanager
    def phase(self, name: str, detail: str = ""):
        """Time ``name`` (exclusive of nested phases); ``detail`` only labels the profiler range."""
        if self.synchronize:
            torch.cuda.synchronize(self.device)
        ranged = (torch.profiler.record_function(f"{name} {detail}".strip()) if self.label
                  else contextlib.nullcontext())
        self._children.append(0.0)
        start = time.perf_counter()
        try:
            with ranged:
                yield
                if self.synchronize:
                    torch.cuda.synchronize(self.device)
        finally:
            elapsed = time.perf_counter() - start
            nested = self._children.pop()
            self.totals[name] += elapsed - nested
            if self._children:
                self._children[-1] += elapsed

    def take(self) -> dict[str, float]:
        """Seconds per phase since the last take, and reset."""
        out = {name: self.totals.get(name, 0.0) for name in PHASES}
        out.update({k: v for k, v in self.totals.items() if k not in out})
        self.totals.clear()
        return out


def timed(clock: PhaseClock | None, name: str, detail: str = ""):
    """``clock.phase(name)``, or nothing when no clock is attached."""
    return clock.phase(name, detail) if clock is not None else contextlib.nullcontext()
