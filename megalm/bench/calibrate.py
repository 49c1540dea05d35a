"""``megalm plan --calibrate``: what this machine does, measured in under a minute and saved for the planner.

  - the matmul rate (FLOP/s) of one device at the config's precision: on a CPU at one thread and at all of
    them, since several ranks on one host share its cores;
  - the fraction of that rate the config's own training step reaches in its forward and backward, and the
    optimizer's seconds per parameter, from one process's step divided into phases (``megalm.runtime.phases``);
  - on a CPU, the same step with one rank per core, data-parallel (megalm's engine, then ZeRO 1-3: DeepSpeed's
    cost beyond megalm's engine, per parameter) and tensor-parallel (its collectives inside a step against the
    same all-reduces alone);
  - the collective's cost between two ranks on this host (gloo on a CPU, NCCL between two GPUs): all-reduces
    of 1 KiB to 8 MiB, kept as a table of seconds against ring bytes (interpolated between its sizes; beyond
    them, latency + bytes / bandwidth from the two ends), since a message's cost is not one straight line.
"""
from __future__ import annotations

import os
import time

import torch

from megalm.bench.machine import Machine

SIZES = (1 << 10, 1 << 16, 1 << 18, 1 << 20, 1 << 22, 8 << 20)


def _matmul(device: torch.device, dtype: torch.dtype, threads: int | None = None) -> float:
    from megalm.bench.harness import measured_matmul_flops

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        measured_matmul_flops(device, dtype)                     # warm: a cold first call reads slow
        return measured_matmul_flops(device, dtype)
    finally:
        torch.set_num_threads(before)


def _matmul_worker(rank, world, dtype, queue):
    """One thread per rank, every rank multiplying at once (as ranks sharing a host train)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.barrier()
    rate = _matmul(torch.device("cpu"), dtype)
    if rank == 0:
        queue.put(rate)


def concurrent_matmul_flops(ranks: int, dtype: torch.dtype) -> float:
    """The one-thread matmul rate of each of ``ranks`` processes multiplying at the same time on this host."""
    from megalm.runtime.spawn import run_distributed

    queue = torch.multiprocessing.get_context("spawn").SimpleQueue()
    run_distributed(_matmul_worker, ranks, dtype, queue, timeout_s=120)
    return queue.get()


def _busy_worker(rank, world, cfg_dicts, queue):
    """Each layout's seconds per phase and per step, one after another in one process group."""
    from megalm.bench.train_measure import measure
    from megalm.config import Config, resolve
    from megalm.parallel.topology import build_topology
    from megalm.runtime import discover, finish, start

    configs = {name: resolve(Config.from_dict(data), world) for name, data in cfg_dicts.items()}
    rt = start(next(iter(configs.values())), discover())
    out = {}
    for name, cfg in configs.items():
        p = cfg.parallel
        topo = build_topology(p.tp, p.pp, p.dp, p.sequence_parallel)
        result = measure(cfg, rt, steps=3, warmup=1, breakdown_steps=2, topo=topo)
        out[name] = (result["breakdown"], result["timing"].median_s)
    finish(rt)
    if rank == 0:
        queue.put(out)


def busy_host_runs(cfg, ranks: int) -> tuple[dict, dict]:
    """``cfg``'s step on ``ranks`` processes, one per core: data-parallel (megalm's engine and ZeRO 1-3) and
    tensor-parallel; {name: (seconds per phase, seconds per step)} and the configs run (as dicts)."""
    from megalm.config import Config, ConfigError, resolve
    from megalm.runtime.spawn import run_distributed

    base = cfg.to_dict()
    t = base["train"]
    if t["global_batch_size"] % (t["micro_batch_size"] * ranks):
        t["global_batch_size"] = t["micro_batch_size"] * ranks
    variants = {"dp": {"dp": ranks}, "tp": {"tp": ranks},
                **{f"zero{k}": {"dp": ranks, "zero_stage": k, "engine": "deepspeed"} for k in (1, 2, 3)}}
    runs = {}
    for name, change in variants.items():
        data = {**base, "parallel": {**base["parallel"], "tp": 1, "pp": 1, "dp": None, "zero_stage": 0,
                                     "engine": "native", **change}}
        try:
            resolve(Config.from_dict(data), ranks)
        except ConfigError:          # a model this tp cannot split, say: that figure stays uncalibrated
            continue
        runs[name] = data
    queue = torch.multiprocessing.get_context("spawn").SimpleQueue()
    run_distributed(_busy_worker, ranks, runs, queue, timeout_s=600)
    return queue.get(), runs


def _collective_worker(rank, world, sizes, queue):
    import torch.distributed as dist

    device = torch.device("cuda", rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    out = []
    for size in sizes:
        t = torch.ones(size // 4, device=device)
        for _ in range(5):
            dist.all_reduce(t)
        times = []
        for _ in range(25):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            began = time.perf_counter()
            dist.all_reduce(t)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - began)
        out.append(sorted(times)[len(times) // 2])
    if rank == 0:
        queue.put(out)


def collective_table() -> list[list[float]]:
    """[ring bytes, seconds] of all-reduces between two gloo processes on this host (ring bytes = the size)."""
    from megalm.runtime.spawn import run_distributed

    queue = torch.multiprocessing.get_context("spawn").SimpleQueue()
    run_distributed(_collective_worker, 2, list(SIZES), queue, timeout_s=120)
    return [[float(size), seconds] for size, seconds in zip(SIZES, queue.get())]


def calibrate(cfg, device: torch.device, say=print) -> Machine:
    """Measure this machine with ``cfg`` (resolved for one process) as the training step."""
    from megalm.bench.plan_model import parameters_per_rank, shared_embedding
    from megalm.bench.train_measure import measure
    from megalm.config import Config, resolve
    from megalm.flops import flops_per_token
    from megalm.runtime import discover, finish, start

    began = time.perf_counter()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32
    machine = Machine(device=device.type, source=f"measured {time.strftime('%Y-%m-%d %H:%M')}")
    machine.matmul_flops = _matmul(device, dtype)
    if device.type == "cpu":
        machine.cores = os.cpu_count() or 1
        alone = _matmul(device, dtype, threads=1)
        machine.matmul_flops_one_thread = concurrent_matmul_flops(machine.cores, dtype) if machine.cores > 1 \
            else alone
    say(f"calibrate: matmul {machine.matmul_flops / 1e12:.3f} TFLOP/s"
        + (f" ({machine.matmul_flops_one_thread / 1e12:.3f} per one-thread rank while {machine.cores} multiply at "
           f"once; {alone / 1e12:.3f} alone)" if device.type == "cpu" else ""))
    rt = start(cfg, discover())
    first, block, last = parameters_per_rank(cfg.model, 1)
    parameters = first + cfg.model.num_layers * block + last - shared_embedding(cfg.model, 1)
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    flops = flops_per_token(cfg.model, cfg.data.seq_len, cfg.parallel.activation_checkpointing).hardware * tokens

    phases = measure(cfg, rt, steps=1, warmup=1, breakdown_steps=2)["breakdown"]
    finish(rt)
    machine.efficiency = flops / (phases["forward"] + phases["backward"]) / machine.matmul_flops
    machine.optimizer_s_per_param = phases["optimizer"] / parameters
    busy = {}
    if device.type == "cpu" and machine.cores > 1:       # one rank per core, all computing at once
        busy, runs = busy_host_runs(cfg, machine.cores)
        phases = busy["dp"][0]
        tokens_per_rank = runs["dp"]["train"]["global_batch_size"] // machine.cores * cfg.data.seq_len
        machine.efficiency_one_thread = (flops / tokens * tokens_per_rank / (phases["forward"] + phases["backward"])
                                         / machine.matmul_flops_one_thread)
        machine.optimizer_s_per_param_busy = phases["optimizer"] / parameters
        for stage in (1, 2, 3):                             # DeepSpeed's own cost beyond megalm's engine
            if f"zero{stage}" in busy:
                extra = busy[f"zero{stage}"][1] - busy["dp"][1]
                machine.zero_overhead_s_per_param[str(stage)] = max(0.0, extra) / parameters
    say(f"calibrate: the training step's forward and backward reach {machine.efficiency:.0%} of it"
        + (f" ({machine.efficiency_one_thread:.0%} at one thread)" if device.type == "cpu" else "")
        + f"; the optimizer takes {machine.optimizer_s_per_param * 1e9:.2f} ns per parameter")
    if device.type == "cpu" or torch.cuda.device_count() >= 2:
        table = collective_table()
        if "dp" in busy and machine.cores == 2:              # the step's gradient all-reduce: one more size
            grads = parameters * (4 if cfg.train.precision == "fp32" else 2)
            table = sorted(table + [[float(grads), busy["dp"][0]["dp_comm"]]])
        machine.collective_table = table
        if "tp" in busy:                # a collective inside a step against the same one alone
            from megalm.bench.plan_model import layout_of, tp_collectives

            tp_cfg = resolve(Config.from_dict(runs["tp"]), machine.cores)
            lay = layout_of(tp_cfg, machine.cores)
            micro = tp_cfg.train.global_batch_size // lay.micro_batch_size
            calls, ring_bytes = tp_collectives(tp_cfg, lay, micro)
            alone = calls * machine.collective_seconds(ring_bytes, True)
            machine.tp_in_step_factor = max(1.0, busy["tp"][0]["tp_comm"] / alone)
            say(f"calibrate: a tensor-parallel step's collectives take {machine.tp_in_step_factor:.1f}x what the "
                f"same all-reduces take alone")
        (b0, t0), (b1, t1) = table[0], table[-1]
        latency, bandwidth = t0, (b1 - b0) / max(t1 - t0, 1e-9)
        machine.latency_s = {"intra": latency, "inter": latency}
        machine.bandwidth = {"intra": bandwidth, "inter": bandwidth}
        say(f"calibrate: all-reduce {', '.join(f'{b / 2**10:.0f} KiB {t * 1e3:.2f} ms' for b, t in table)} "
            f"({'gloo' if device.type == 'cpu' else 'NCCL'}, 2 ranks on this host; across nodes: "
            f"{latency * 1e6:.0f} us + bytes at {bandwidth / 1e9:.2f} GB/s)")
    say(f"calibrate: done in {time.perf_counter() - began:.0f} s")
    return machine

