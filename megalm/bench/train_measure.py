"""What ``megalm bench train`` measures on every rank of a launched world: the config's real training step (its
engine, layout, schedule and kernels) over a warm-up, a steady window and a few breakdown steps, at the constant
learning rate optimizer.lr (no warm-up or decay: a sweep over it is a learning-rate range test).

  - the window's step time is the slowest rank's, step by step (one all-reduce of ``steps`` numbers), its noise
    the interquartile range relative to the median;
  - the breakdown steps run with a :class:`~megalm.runtime.phases.PhaseClock` attached (on CUDA it
    synchronises at each phase boundary, so they are kept out of the window), averaged over ranks;
  - peak memory per rank (CUDA: the allocator's peak; CPU: the process's peak resident set), as min and max over
    ranks;
  - ``profile_dir``: a PyTorch profiler trace of the breakdown steps per rank (Chrome/Perfetto JSON), with the
    phases as labelled ranges.
Every reduction is a fixed-size all-reduce: nothing grows with the world size.
"""
from __future__ import annotations

import contextlib
import gc
import json
import resource
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megalm.bench.harness import sync, timing_of
from megalm.config import Config
from megalm.runtime.phases import PHASES, PhaseClock, timed


def attach_phases(clock: PhaseClock | None, engine, p2p) -> None:
    """Hand ``clock`` (or None: detach) to the engine, the P2P and every chunk's tensor-parallel handle."""
    engine.phases = p2p.phases = clock
    for chunk in engine.chunks:
        chunk.tp.phases = clock


def _batches(cfg: Config, topo, data: str):
    """A function returning the next step's micro-batches: random tokens (made once) or the config's dataset."""
    t = cfg.train
    micro = t.global_batch_size // (t.micro_batch_size * topo.dp)
    if data == "real":
        from megalm.data.blend import open_split
        from megalm.data.dataset import BatchSampler

        sampler = BatchSampler(open_split(cfg.data, "train", cfg.model.vocab_size), t.global_batch_size,
                               t.micro_batch_size, topo.dp_rank, topo.dp, 0)
        return sampler.next_batch
    generator = torch.Generator().manual_seed(t.seed + topo.dp_rank)
    fixed = [torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, cfg.data.seq_len + 1), generator=generator)
             for _ in range(micro)]
    return lambda: fixed


def _peak_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024     # Linux reports KiB


def _tensor_bytes_now(device: torch.device) -> float:
    """Bytes of every tensor alive in this process (the allocator's count on CUDA; on a CPU, every distinct storage
    the garbage collector knows, as ``megalm bench memory`` counts them)."""
    if device.type == "cuda":
        return float(torch.cuda.memory_allocated(device))
    from megalm.bench.memory import _live_storages

    gc.collect()
    return float(sum(size for size, _, _ in _live_storages().values()))


def _step_peak_tensor_bytes(one_step, step: int, device: torch.device) -> float:
    """The most tensor bytes alive at once during one step: on CUDA the allocator's peak; on a CPU (which keeps
    no such count) the tensors alive at the step's start plus the peak of the profiler's allocation record."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        one_step(step, None)
        return float(torch.cuda.max_memory_allocated(device))
    alive = _tensor_bytes_now(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        one_step(step, None)
    with tempfile.TemporaryDirectory() as folder:
        prof.export_chrome_trace(str(Path(folder) / "trace.json"))
        events = json.loads((Path(folder) / "trace.json").read_text())["traceEvents"]
    return alive + peak_live_bytes((e["ts"], e["args"]["Addr"], e["args"]["Bytes"]) for e in events
                                   if e.get("name") == "[memory]")


def peak_live_bytes(events) -> int:
    """The peak of the bytes allocated and not yet freed, from (time, address, bytes) allocation (+) and free (-)
    events. The profiler records only the frees made on the threads it follows: gloo's worker threads release a
    collective's output themselves (when they take the next collective), and those frees never appear, so a plain
    running sum grows by every tensor-parallel all-reduce output of the step (12 MiB at tp = 2 on the planner's
    test model). An address handed out again was freed before, so its earlier block is counted free from then
    (an upper bound: it was freed at some moment before)."""
    live: dict[int, int] = {}
    now = peak = 0
    for _, address, size in sorted(events):
        if size > 0:
            now += size - live.pop(address, 0)
            live[address] = size
        else:                           # a free: of a block allocated in the trace, or before it (counted alive)
            live.pop(address, None)
            now += size
        peak = max(peak, now)
    return peak


def _reduce(values: list[float], op, device) -> list[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def measure(cfg: Config, rt, steps: int, warmup: int, breakdown_steps: int = 3, data: str = "random",
            profile_dir: str | None = None, topo=None, measure_memory: bool = False) -> dict:
    """Collective over the world. ``cfg`` resolved for it; ``topo`` (default ``rt.topo``) its layout.
    ``measure_memory``: one more step measures the peak of the bytes of tensors this rank holds, less those alive
    before the model was built (what ``megalm plan`` predicts), as ``peak_tensor_bytes_max``/``_min``."""
    from megalm.engine import build_engine
    from megalm.parallel.pipeline.p2p import P2P, activation_shape
    from megalm.train.step import train_step

    topo, device, t = topo or rt.topo, rt.device, cfg.train
    before_model = _tensor_bytes_now(device) if measure_memory else 0.0
    engine = build_engine(cfg, topo, device)
    p2p = P2P(topo, activation_shape(t.micro_batch_size, cfg.data.seq_len, cfg.model.hidden_size, topo),
              engine.activation_dtype, device, num_chunks=len(engine.chunks))
    next_batch = _batches(cfg, topo, data)
    losses: list[float] = []

    def one_step(step: int, clock: PhaseClock | None) -> None:
        with timed(clock, "data"):
            micro = [b.to(device) for b in next_batch()]
        loss, _ = train_step(engine, p2p, cfg.schedule, micro, topo, cfg.optimizer.lr, step, phases=clock)
        losses.append(loss)

    for step in range(1, warmup + 1):
        one_step(step, None)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(warmup + 1, warmup + steps + 1):
        began = time.perf_counter()
        one_step(step, None)
        sync(device)
        times.append(time.perf_counter() - began)
    slowest = _reduce(times, dist.ReduceOp.MAX, device)
    breakdown = _breakdown(one_step, engine, p2p, device, warmup + steps, breakdown_steps, profile_dir,
                           rt.info.rank)
    memory = _peak_memory(device)
    high, low = _max_min(memory, device)
    window = losses[warmup:warmup + steps]
    out = {"timing": timing_of(slowest), "step_seconds": slowest, "breakdown": breakdown,
           "peak_memory_max": high, "peak_memory_min": low, "loss_first": window[0] if window else None,
           "loss_last": window[-1] if window else None}
    if measure_memory:
        held = _step_peak_tensor_bytes(one_step, warmup + steps + breakdown_steps + 1, device) - before_model
        out["peak_tensor_bytes_max"], out["peak_tensor_bytes_min"] = _max_min(held, device)
    return out


def _max_min(value: float, device) -> tuple[float, float]:
    high = _reduce([value], dist.ReduceOp.MAX, device)[0]
    return high, -_reduce([-value], dist.ReduceOp.MAX, device)[0]


def _breakdown(one_step, engine, p2p, device, done: int, steps: int, profile_dir, rank: int) -> dict:
    """Seconds per phase per step, averaged over the breakdown steps and over ranks, and the step's own time."""
    if steps <= 0:
        return {}
    clock = PhaseClock(device)
    attach_phases(clock, engine, p2p)
    profiler = _profiler(device) if profile_dir else None
    began = time.perf_counter()
    try:
        with profiler or contextlib.nullcontext():
            for step in range(done + 1, done + steps + 1):
                one_step(step, clock)
    finally:
        attach_phases(None, engine, p2p)
    sync(device)
    per_step = (time.perf_counter() - began) / steps
    totals = clock.take()
    names = list(PHASES)
    values = [totals.get(n, 0.0) / steps for n in names] + [per_step]
    world = dist.get_world_size() if dist.is_initialized() else 1
    mean = [v / world for v in _reduce(values, dist.ReduceOp.SUM, device)]
    out = dict(zip(names, mean[:-1]))
    out["step"] = mean[-1]
    out["other"] = max(0.0, out["step"] - sum(mean[:-1]))
    if profiler is not None:
        folder = Path(profile_dir)
        folder.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(folder / f"trace_rank{rank}.json"))
    return out


def _profiler(device: torch.device):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities, record_shapes=False)

