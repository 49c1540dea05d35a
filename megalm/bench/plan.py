"""``megalm plan --config FILE --gpus N --gpu-memory 80GB``: every layout the rule book accepts, its memory per rank
and estimated step time, ranked; and why each other layout fails (the rule, or memory: by how much).

Memory per rank (the first pipeline stage, the fullest; the last when its LM head weighs more):
  - model states: parameters counted exactly on the meta device at the rank's tensor-parallel shard, times the
    bytes of ZeRO's formulas (mixed precision: 2 + 2 + 12 bytes per parameter, divided by dp as the stage says;
    fp32: 4 + 4 + 8, or + 12 where DeepSpeed keeps an fp32 master);
  - DeepSpeed's communication buckets (ZeRO 1-3) and, under ZeRO-3, the prefetch bucket and one block gathered;
  - activations: the bytes a micro-batch's forward keeps per layer and for the head, counted on megalm's own
    modules on the meta device (``megalm.bench.activations``: a flash-style attention, sequence parallelism and
    recomputation as megalm implements them), times the micro-batches in flight (min(pp, m) on the first stage
    under 1F1B, times 1 + (p-1)/(p v) interleaved), plus the head's backward buffers on the last stage.
Step time: the slowest stage's FLOPs at the machine's rate, the pipeline bubble (p-1)/(v m), every collective as
calls x the machine's cost of one message of its size, DeepSpeed's extra cost per parameter, and the optimizer;
no overlap is assumed. The machine is the datasheet and flags, or measured (``--calibrate``,
``megalm.bench.calibrate``). Kernel workspaces: the fused loss kernel's (GPU, tp = 1); not modelled: the
transient buffers of tensor-parallel collectives. Measured on this CPU over 24 layouts
(``tests/integration/test_plan_accuracy.py``): memory within 5.6-6.9% and step time within 8.6-13.7% (mean
absolute errors, four runs).
"""
from __future__ import annotations

import argparse
import itertools
import time

from megalm.bench.machine import Machine
from megalm.bench.plan_model import GIB, Layout, predict
from megalm.config import Config, ConfigError, load_config
from megalm.config.rules import validate

SEARCH = {"tp": (1, 2, 4, 8), "virtual_stages": (1, 2, 4), "zero_stage": (0, 1, 2, 3),
          "sequence_parallel": (False, True), "activation_checkpointing": ("none", "selective", "full"),
          "micro_batch_size": (1, 2, 4)}


def layouts(cfg: Config, gpus: int, gpus_per_node: int):
    """Every combination searched: tp within a node, pp dividing what is left, dp the rest."""
    for tp in (t for t in SEARCH["tp"] if t <= gpus_per_node and gpus % t == 0):
        for pp in (p for p in range(1, gpus // tp + 1) if (gpus // tp) % p == 0 and p <= cfg.model.num_layers):
            for v, z, sp, rc, mb in itertools.product(*(SEARCH[k] for k in ("virtual_stages", "zero_stage",
                                                                           "sequence_parallel",
                                                                           "activation_checkpointing",
                                                                           "micro_batch_size"))):
                if (sp and tp == 1) or (v > 1 and pp == 1):
                    continue
                yield Layout(tp, pp, gpus // (tp * pp), v, z, sp, rc, mb)


def apply(base: Config, lay: Layout) -> Config:
    cfg = base.mutable_copy()
    for key in ("tp", "pp", "virtual_stages", "zero_stage", "sequence_parallel", "activation_checkpointing"):
        cfg.set(f"parallel.{key}", getattr(lay, key))
    cfg.set("parallel.dp", lay.dp)
    cfg.set("parallel.engine", "deepspeed" if lay.zero_stage else "native")
    cfg.set("train.micro_batch_size", lay.micro_batch_size)
    return cfg


def plan(base: Config, gpus: int, gpu_memory: float, gpus_per_node: int = 8, machine: Machine | None = None) -> dict:
    """{"fits": [rows ranked by step time], "rejected": {reason: count}, "searched": n}."""
    machine = machine or Machine()
    fits, rejected, searched = [], {}, 0
    for lay in layouts(base, gpus, gpus_per_node):
        searched += 1
        cfg = apply(base, lay)
        try:
            validate(cfg, world_size=gpus, cuda=True)
        except ConfigError as e:
            reason = str(e).split("\n")[0]
            rejected[reason] = rejected.get(reason, 0) + 1
            continue
        row = {"layout": lay, **predict(cfg, lay, machine, gpus_per_node)}
        if row["memory"]["total"] > gpu_memory:
            key = f"memory: needs more than {gpu_memory / GIB:.0f} GiB per rank"
            rejected[key] = rejected.get(key, 0) + 1
            del row["time"]
            row["over_bytes"] = row["memory"]["total"] - gpu_memory
        fits.append(row)
    fitting = sorted((r for r in fits if "time" in r), key=lambda r: r["time"]["step_s"])
    too_big = sorted((r for r in fits if "over_bytes" in r), key=lambda r: r["over_bytes"])
    return {"fits": fitting, "too_big": too_big, "rejected": rejected, "searched": searched}


def _size(text: str) -> float:
    units = {"gb": GIB, "gib": GIB, "g": GIB, "mb": 1024 ** 2, "mib": 1024 ** 2}
    low = text.strip().lower()
    for unit in sorted(units, key=len, reverse=True):
        if low.endswith(unit):
            return float(low[: -len(unit)]) * units[unit]
    return float(low) * GIB


def _machine(args, cfg: Config) -> Machine:
    """The machine planned for: measured now (--calibrate), saved (--machine), or the datasheet and flags."""
    from megalm.bench.harness import datasheet_peak_flops, output_dir

    if args.calibrate is not None:
        import torch

        from megalm.bench.calibrate import calibrate
        from megalm.config import resolve

        small = load_config(args.calibrate) if args.calibrate else cfg.mutable_copy()
        if small.model.vocab_size is None:
            small.set("model.vocab_size", 8192)
        for key in ("tp", "pp", "dp", "virtual_stages", "zero_stage", "sequence_parallel"):   # one process
            small.set(f"parallel.{key}", {"dp": None, "sequence_parallel": False, "zero_stage": 0}.get(key, 1))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        machine = calibrate(resolve(small, 1), device)
        print(f"calibration saved to {machine.save(output_dir('plan', args.out) / 'machine.json')}")
        return machine
    if args.machine:
        return Machine.load(args.machine)
    peak = datasheet_peak_flops(args.gpu, "bf16")
    if peak is None:
        raise ConfigError(f"megalm plan: --gpu {args.gpu!r} is not in the datasheet table "
                          "(megalm/bench/harness.py PEAK_TFLOPS); name a listed part such as H100 or A100")
    return Machine(matmul_flops=peak, efficiency=args.efficiency, source=f"{args.gpu} datasheet x {args.efficiency}",
                   bandwidth={"intra": args.intra_node_gbps * 1e9, "inter": args.inter_node_gbps * 1e9})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="megalm plan", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--gpus", type=int, required=True)
    ap.add_argument("--gpu-memory", default="80GB", help="per device, e.g. 80GB (GiB)")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--gpu", default="H100", help="device name for the datasheet peak (bf16), e.g. H100, A100")
    ap.add_argument("--efficiency", type=float, default=0.45, help="fraction of peak the matmuls reach")
    ap.add_argument("--intra-node-gbps", type=float, default=400.0, help="GB/s within a node (NVLink)")
    ap.add_argument("--inter-node-gbps", type=float, default=50.0, help="GB/s per GPU across nodes")
    ap.add_argument("--calibrate", nargs="?", const="", metavar="CONFIG",
                    help="measure this machine first (matmul rate, the training step's efficiency, collectives) "
                         "with the planned config's step, or CONFIG's (one that fits this machine, e.g. tiny); "
                         "save it as machine.json in --out and plan with it")
    ap.add_argument("--machine", metavar="FILE", help="plan with a saved calibration (machine.json)")
    ap.add_argument("--vocab-size", type=int, default=128256, help="used when the config leaves it unset")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", help="result folder (default runs/bench-plan)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    from megalm.bench.harness import save_plot, write_result

    if args.gpus < 1 or args.gpus_per_node < 1:
        raise ConfigError(f"megalm plan: --gpus {args.gpus} and --gpus-per-node {args.gpus_per_node} must be >= 1")
    cfg = load_config(args.config, args.overrides)
    if cfg.model.vocab_size is None:
        cfg.set("model.vocab_size", args.vocab_size)
    machine = _machine(args, cfg)
    started = time.perf_counter()
    result = plan(cfg, args.gpus, _size(args.gpu_memory), args.gpus_per_node, machine)
    print(f"megalm plan: {result['searched']} layouts searched on {args.gpus} x {args.gpu} "
          f"({args.gpu_memory}, {args.gpus_per_node} per node; machine: {machine.source}) in "
          f"{time.perf_counter() - started:.1f} s; {len(result['fits'])} fit")
    print(f"{'layout':44s} {'GiB/rank':>8s} {'states':>7s} {'activ.':>7s} {'step s':>7s} {'bubble':>7s} "
          f"{'comm s':>7s} {'MFU':>6s}")
    for row in result["fits"][: args.top]:
        mem, t = row["memory"], row["time"]
        comm = t["tp_comm_s"] + t["pp_comm_s"] + t["dp_comm_s"]
        print(f"{row['layout'].label():44s} {mem['total'] / GIB:8.1f} {mem['states'] / GIB:7.1f} "
              f"{mem['activations'] / GIB:7.1f} {t['step_s']:7.2f} {t['bubble_s']:7.2f} {comm:7.2f} "
              f"{t['mfu']:6.1%}")
    for row in result["too_big"][:3]:
        print(f"closest that does not fit: {row['layout'].label()}: {row['memory']['total'] / GIB:.1f} GiB, "
              f"{row['over_bytes'] / GIB:.1f} GiB over")
    reasons = sorted(result["rejected"].items(), key=lambda kv: -kv[1])
    print(f"rejected ({sum(result['rejected'].values())} layouts, {len(reasons)} reasons; all in the JSON):")
    for reason, count in reasons[:12]:
        print(f"  {count:6d}  {reason}")
    rows = [{"layout": r["layout"].label(), **{k: v for k, v in r["memory"].items()}, **r["time"]}
            for r in result["fits"]]
    path = write_result("plan", {"fits": rows, "rejected": result["rejected"], "searched": result["searched"]},
                        args.out, context={"config": cfg.to_dict(), "gpus": args.gpus, "gpu": args.gpu,
                                           "gpu_memory_bytes": _size(args.gpu_memory)})
    plot = save_plot(lambda fig, ax: _draw(ax, rows, _size(args.gpu_memory), args.top), path.with_suffix(".png"))
    print(f"wrote {path}" + (f" and {plot}" if plot else ""))
    return 0 if result["fits"] else 1


def _draw(ax, rows: list[dict], gpu_memory: float, top: int) -> None:
    """Every layout that fits: memory per rank against estimated step time, the best three named."""
    ax.scatter([r["total"] / GIB for r in rows], [r["step_s"] for r in rows], s=8, alpha=0.4, color="grey")
    for rank, r in enumerate(rows[:min(top, 3)], 1):               # ranked by step time: the best three named
        ax.scatter([r["total"] / GIB], [r["step_s"]], s=30, marker="*", label=f"{rank}. {r['layout']}")
    ax.axvline(gpu_memory / GIB, color="red", lw=0.8, label="device memory")
    ax.set_xlabel("memory per rank (GiB)")
    ax.set_ylabel("estimated step time (s)")
    ax.set_title(f"megalm plan: {len(rows)} layouts fit")
    ax.legend(fontsize=7)
