"""Measure the pipeline bubble of each schedule with equal-cost synthetic stages and compare with the formula.

    megalm bench bubble --pp 4 --microbatches 4 8 16 --virtual-stages 2

Spawns pp gloo processes. Each stage sleeps ``stage_ms`` per forward and twice that per backward (a chunk
of an interleaved rank holds 1/v of the stage, so it sleeps stage_ms/v and 2 stage_ms/v): sleeping needs no
CPU, so the stages cost the same however few cores the machine has. Messages are tiny tensors.

Measured: the idle fraction of stage r is 1 - busy_r / T, where busy_r is its time inside the callbacks and
T the wall time of the whole step, from the barrier that starts it to the end of the last stage (perf_counter
is CLOCK_MONOTONIC, shared by the processes of one host); the median over --repeats runs is shown.

Expected, with p stages, m micro-batches, per-stage forward t_f and backward t_b = 2 t_f:
  GPipe and 1F1B: T = (m + p - 1)(t_f + t_b), busy = m(t_f + t_b)  ->  idle = (p-1) / (m + p - 1).
  Interleaved, v chunks per rank: a chunk step costs (t_f + t_b)/v and fill plus drain take p-1 of them, so
  T = m(t_f + t_b) + (p-1)(t_f + t_b)/v  ->  idle = (p-1) / (v m + p - 1), which is Megatron's bubble ratio
  (p-1)/(v m) of ideal compute expressed as a fraction of wall time (r / (1 + r)). An event-level simulation
  of these exact schedule orders gives the same numbers for p <= 4, v <= 3, m <= 16.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from megalm.bench.harness import save_plot, write_result
from megalm.config.rules import check_schedule
from megalm.parallel.pipeline.p2p import P2P
from megalm.parallel.pipeline.schedules import SCHEDULES, ScheduleStats
from megalm.parallel.topology import build_topology
from megalm.runtime.spawn import run_distributed

SHAPE = (1, 1, 4)


def expected_idle(schedule: str, p: int, m: int, v: int) -> float:
    return (p - 1) / ((v if schedule == "interleaved" else 1) * m + p - 1)


def _sleep(seconds):
    end = time.perf_counter() + seconds
    while (left := end - time.perf_counter()) > 0:
        time.sleep(left)


def _worker(rank, world, cfg, out_dir):
    topo = build_topology(pp=world)
    results, warmup = [], 1
    for schedule in cfg["schedules"]:
        v = cfg["virtual_stages"] if schedule == "interleaved" else 1
        t_f = cfg["stage_ms"] / 1000 / v
        p2p = P2P(topo, SHAPE, num_chunks=v)

        def forward_step(chunk, i, x):
            _sleep(t_f)
            return torch.zeros(()) if p2p.is_last(chunk) else (torch.zeros(SHAPE) if x is None else x)

        def backward_step(chunk, i, x, y, grad):
            _sleep(2 * t_f)
            return None if x is None else torch.zeros(SHAPE)

        for m in cfg["microbatches"]:
            try:
                check_schedule(schedule, world, v, m)
            except ValueError as err:
                results.append((schedule, m, v, str(err), []))
                continue
            runs = []
            for repeat in range(-warmup, cfg["repeats"]):   # a first unrecorded run warms the connections up
                stats = ScheduleStats()
                dist.barrier(group=topo.pp_group)
                SCHEDULES[schedule](p2p, m, v, forward_step, backward_step, stats)
                if repeat >= 0:
                    runs.append((stats.start, stats.end, stats.busy_s, stats.events))
            warmup = 0
            results.append((schedule, m, v, None, runs))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:   # a pipe would fill up and block
        json.dump(results, f)


def measure(pp, microbatches, virtual_stages, stage_ms, schedules, repeats):
    """Run the benchmark; return rows (schedule, m, v, skip_reason, expected, [idle per stage], timeline)."""
    cfg = dict(microbatches=microbatches, virtual_stages=virtual_stages, stage_ms=stage_ms,
               schedules=schedules, repeats=repeats)
    with tempfile.TemporaryDirectory() as tmp:
        run_distributed(_worker, pp, cfg, tmp)
        per_rank = {}
        for r in range(pp):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                per_rank[r] = json.load(f)
    rows = []
    for k, (schedule, m, v, skip, _) in enumerate(per_rank[0]):
        idle, timeline = [], None
        if skip is None:
            runs = [per_rank[r][k][4] for r in range(pp)]          # [rank][repeat]
            fractions = [[] for _ in range(pp)]
            for rep in range(repeats):
                t0 = min(runs[r][rep][0] for r in range(pp))
                wall = max(runs[r][rep][1] for r in range(pp)) - t0
                for r in range(pp):
                    fractions[r].append(1 - runs[r][rep][2] / wall)
            idle = [statistics.median(f) for f in fractions]
            timeline = [[(kind, c, i, a - t0, b - t0) for kind, c, i, a, b in runs[r][-1][3]]
                        for r in range(pp)]
        rows.append((schedule, m, v, skip, expected_idle(schedule, pp, m, v), idle, timeline))
    return rows


def format_table(rows, pp):
    stages = "".join(f"{'stage ' + str(r):>9}" for r in range(pp))
    head = f"{'schedule':<12}{'m':>4}{'v':>3}{'formula':>9}" + stages
    lines = [head + f"{'max |diff|':>12}", "-" * (len(head) + 12)]
    for schedule, m, v, skip, want, idle, _ in rows:
        if skip:
            lines.append(f"{schedule:<12}{m:>4}{v:>3}  skipped: {skip}")
            continue
        diff = max(abs(x - want) for x in idle)
        lines.append(f"{schedule:<12}{m:>4}{v:>3}{want:>9.1%}" + "".join(f"{x:>9.1%}" for x in idle)
                     + f"{100 * diff:>9.2f} pp")
    return "\n".join(lines)


def _draw(fig, axes, rows, pp) -> None:
    axes = list(axes.flat)
    done = [r for r in rows if not r[3]]
    names = list(dict.fromkeys(r[0] for r in done))
    ax = axes[0]
    for n, name in enumerate(names):
        mine = [r for r in done if r[0] == name]
        ms = [r[1] for r in mine]
        ax.plot(ms, [100 * r[4] for r in mine], "-", color=f"C{n}", label=f"{name} formula")
        for stage in range(pp):
            ax.plot(ms, [100 * r[5][stage] for r in mine], "o", color=f"C{n}", alpha=0.6,
                    label=f"{name} measured (each stage)" if stage == 0 else None)
    ax.set(xlabel="micro-batches m", ylabel="idle % of wall time", title=f"pipeline bubble, pp={pp}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))      # beside the axes, over no point
    for ax, name in zip(axes[1:], names):   # timeline of the largest m of each schedule
        schedule, m, v, _, _, _, timeline = [r for r in done if r[0] == name][-1]
        for stage, events in enumerate(timeline):
            for kind, chunk, i, a, b in events:
                ax.broken_barh([(a, b - a)], (stage - 0.4, 0.8), color=f"C{chunk}" if kind == "F" else "0.6",
                               edgecolor="k", linewidth=0.3)
        ax.set_yticks(range(len(timeline)))                                  # whole stage numbers
        ax.set(ylabel="stage", title=f"{schedule}, m={m}, v={v}: forward (colour = chunk), backward (grey)")
        ax.invert_yaxis()
    axes[-1].set_xlabel("seconds")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="megalm bench bubble", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pp", type=int, default=4, help="pipeline stages (processes)")
    parser.add_argument("--microbatches", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--virtual-stages", type=int, default=2, help="model chunks per rank (interleaved)")
    parser.add_argument("--stage-ms", type=float, default=50.0,
                        help="forward time of one stage in ms; backward is twice that")
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (median shown)")
    parser.add_argument("--out", help="result folder (default runs/bench-bubble)")
    args = parser.parse_args(argv)
    rows = measure(args.pp, args.microbatches, args.virtual_stages, args.stage_ms, args.schedules,
                   args.repeats)
    print(f"idle fraction of wall time per stage, pp={args.pp}, forward {args.stage_ms} ms, backward "
          f"{2 * args.stage_ms} ms per stage; formula (p-1)/(m+p-1), interleaved (p-1)/(v*m+p-1)")
    print(format_table(rows, args.pp))
    results = [{"schedule": sc, "microbatches": m, "virtual_stages": v, "skipped": skip, "formula": want,
                "idle_per_stage": idle} for sc, m, v, skip, want, idle, _ in rows]
    path = write_result("bubble", {"pp": args.pp, "rows": results}, args.out, context=vars(args))
    names = len({r[0] for r in rows if not r[3]})
    plot = save_plot(lambda fig, axes: _draw(fig, axes, rows, args.pp), path.with_suffix(".png"),
                     figsize=(10, 3 + 2.2 * names), nrows=1 + names, ncols=1, squeeze=False)
    print(f"wrote {path}" + (f" and {plot}" if plot else ""))
    return rows


if __name__ == "__main__":
    main()
