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
``megalm.bench.calibrate``). Not modelled: kernel workspaces and the transient buffers of tensor-parallel
collectives. Measured on this CPU over 24 layouts (``tests/integration/test_plan_accuracy.py``): memory within
5.6% and step time within 8.6% (mean absolute errors).
"""
from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import dataclass

from megalm.bench.activations import saved_activation_bytes
from megalm.bench.calibrate import Machine
from megalm.config import Config, ConfigError, ModelConfig, load_config
from megalm.config.rules import validate
from megalm.flops import flops_per_token, matmul_params

GIB = 1024 ** 3
SEARCH = {"tp": (1, 2, 4, 8), "virtual_stages": (1, 2, 4), "zero_stage": (0, 1, 2, 3),
          "sequence_parallel": (False, True), "activation_checkpointing": ("none", "selective", "full"),
          "micro_batch_size": (1, 2, 4)}


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    virtual_stages: int
    zero_stage: int
    sequence_parallel: bool
    activation_checkpointing: str
    micro_batch_size: int

    def label(self) -> str:
        return (f"tp{self.tp} pp{self.pp}" + (f"v{self.virtual_stages}" if self.virtual_stages > 1 else "")
                + f" dp{self.dp} zero{self.zero_stage}" + (" sp" if self.sequence_parallel else "")
                + f" rc={self.activation_checkpointing} mb{self.micro_batch_size}")


def parameters_per_rank(model: ModelConfig, tp: int) -> tuple[int, int, int]:
    """(first-stage extras, one block, last-stage extras): parameter counts on one tensor-parallel rank, from the
    real modules built on the meta device (so every model feature is counted as megalm builds it)."""
    key = (repr(model), tp)
    if key not in _COUNTS:
        _COUNTS[key] = _count_parameters(model, tp)
    return _COUNTS[key]


_COUNTS: dict = {}


def _count_parameters(model: ModelConfig, tp: int) -> tuple[int, int, int]:
    import torch

    from megalm.model.transformer import Block, ModelChunk, reference_ops
    from megalm.parallel.topology import TensorParallel

    shard = TensorParallel(size=tp)
    with torch.device("meta"):
        first = ModelChunk(model, shard, [], True, False)
        last = ModelChunk(model, shard, [], False, True)
        block = Block(model, shard, reference_ops())

    def count(module):
        return sum(p.numel() for p in module.parameters())
    return count(first), count(block), count(last)


def shared_embedding(model: ModelConfig, tp: int) -> int:
    """The embedding a tied LM head reuses: counted once when the first and last stage are one rank."""
    return model.vocab_size // tp * model.hidden_size if model.tie_embeddings else 0


def state_bytes(precision: str, zero_stage: int, dp: int) -> tuple[float, float, float]:
    """ZeRO's model states per parameter: (weights, gradients, optimizer: fp32 master + Adam moments). In fp32,
    DeepSpeed's ZeRO optimizers keep a master copy as well (12 bytes); megalm's engine and ZeRO-0 do not (8)."""
    weights, grads, optimizer = (4, 4, 12 if zero_stage else 8) if precision == "fp32" else (2, 2, 12)
    if zero_stage >= 1:
        optimizer /= dp
    if zero_stage >= 2:
        grads /= dp
    if zero_stage >= 3:
        weights /= dp
    return weights, grads, optimizer


def state_bytes_per_parameter(precision: str, zero_stage: int, dp: int) -> float:
    return sum(state_bytes(precision, zero_stage, dp))


def activation_bytes(cfg: Config, lay: Layout, micro_batches: int) -> tuple[float, float]:
    """(first stage, last stage) activation bytes at the peak of the schedule: the micro-batches in flight times
    the bytes a micro-batch's forward keeps per layer (counted on megalm's modules: ``bench.activations``), plus
    on the last stage the head's and, during its backward, two logits-sized fp32 buffers (the logits' gradient
    and the softmax backward's output at tp = 1, or the head's weight-gradient product at tp > 1: where this
    machine's measured peaks fall), and under full recomputation one layer's activations, rebuilt during its
    backward."""
    m, s, b = cfg.model, cfg.data.seq_len, lay.micro_batch_size
    per_layer, head = saved_activation_bytes(m, lay.tp, lay.sequence_parallel, lay.activation_checkpointing, b, s,
                                             cfg.train.precision)
    in_flight = min(lay.pp, micro_batches)
    if lay.virtual_stages > 1:
        in_flight *= 1 + (lay.pp - 1) / (lay.pp * lay.virtual_stages)
    layers = m.num_layers / lay.pp
    rebuilt = 0.0
    if lay.activation_checkpointing == "full":
        rebuilt = saved_activation_bytes(m, lay.tp, lay.sequence_parallel, "none", b, s, cfg.train.precision)[0]
    logits_grad = 2 * 4 * s * b * m.vocab_size / lay.tp
    first = per_layer * layers * in_flight + rebuilt
    last = per_layer * layers * (1 if lay.pp > 1 else in_flight) + rebuilt + head + logits_grad
    return first, last


def buffer_bytes(cfg: Config, lay: Layout, block_params: int) -> float:
    """DeepSpeed's communication buckets (``engine.deepspeed.config.bucket_elements`` elements at the gradient's
    width): ZeRO 1-3 reduce gradients through one; ZeRO-3 also gathers parameters ahead through another and
    holds a block's parameters whole while it computes."""
    if lay.zero_stage == 0:
        return 0.0
    from megalm.engine.deepspeed.config import bucket_elements

    width = 4 if cfg.train.precision == "fp32" else 2
    gathered = 0 if lay.zero_stage < 3 else bucket_elements(cfg) + block_params
    return (bucket_elements(cfg) + gathered) * width


def memory_per_rank(cfg: Config, lay: Layout, micro_batches: int) -> dict:
    """The fuller pipeline stage's bytes. With one micro-batch per step the blocks' gradients are made while their
    activations are freed, so at the peak (the head's backward) only the head's own gradients exist."""
    first_extra, block, last_extra = parameters_per_rank(cfg.model, lay.tp)
    layers = cfg.model.num_layers // lay.pp
    weights, grads, optimizer = state_bytes(cfg.train.precision, lay.zero_stage, lay.dp)
    act_first, act_last = activation_bytes(cfg, lay, micro_batches)
    first_params = first_extra + layers * block + (last_extra - shared_embedding(cfg.model, lay.tp)
                                                   if lay.pp == 1 else 0)
    last_params = last_extra + layers * block
    buffers = buffer_bytes(cfg, lay, block)

    def states(params: int) -> float:
        without_block_grads = params - layers * block if micro_batches == 1 else params
        return params * (weights + optimizer) + without_block_grads * grads
    first = {"parameters": first_params, "states": states(first_params), "activations": act_first,
             "buffers": buffers}
    last = {"parameters": last_params, "states": states(last_params), "activations": act_last,
            "buffers": buffers}
    worst = max((first, last), key=lambda d: d["states"] + d["activations"])
    return {**worst, "total": worst["states"] + worst["activations"] + buffers}


def step_seconds(cfg: Config, lay: Layout, micro_batches: int, machine: Machine, gpus_per_node: int,
                 params: int) -> dict:
    """The slowest stage's compute at the machine's rate, the bubble, and each kind of traffic as calls x the
    machine's cost of one message of its size (tensor-parallel collectives per layer and micro-batch, pipeline
    messages per micro-batch, the gradient reduction: one all-reduce, or DeepSpeed's buckets), plus the optimizer;
    no overlap is assumed. Ranks that outnumber a CPU host's cores wait in turn to move bytes."""
    m, s, b, t = cfg.model, cfg.data.seq_len, lay.micro_batch_size, lay.tp
    world = lay.tp * lay.pp * lay.dp
    ranks_here = min(world, gpus_per_node)
    width = 4 if cfg.train.precision == "fp32" else 2
    tokens = cfg.train.global_batch_size * s / lay.dp                  # per data-parallel replica
    per_token = flops_per_token(m, s, lay.activation_checkpointing).hardware
    head = 6 * matmul_params(m)["lm_head"]
    stage = ((per_token - head) / lay.pp + head) / t                    # the last stage: its layers and the head
    idle = (lay.pp - 1) / (lay.virtual_stages * micro_batches + lay.pp - 1)        # the bubble's share of a step
    compute = tokens * stage / machine.compute_rate(ranks_here, busy=1 - idle)
    bubble = compute * (lay.pp - 1) / (lay.virtual_stages * micro_batches)

    def cost(calls: float, ring_bytes_each: float, within: bool) -> float:
        return calls * machine.collective_seconds(ring_bytes_each, within) if calls else 0.0
    tp_calls, tp_bytes = tp_collectives(cfg, lay, micro_batches)
    tp_comm = cost(tp_calls, tp_bytes, t <= gpus_per_node) * machine.tp_in_step_factor
    message = b * s * m.hidden_size * width / (t if lay.sequence_parallel else 1)
    messages = 2 * micro_batches * lay.virtual_stages if lay.pp > 1 else 0
    pp_comm = cost(messages, message, t * lay.pp <= gpus_per_node)
    grads = params * width * (lay.dp - 1) / lay.dp
    dp_comm = cost(1 if lay.dp > 1 else 0, 2 * grads, world <= gpus_per_node)     # one all-reduce's bytes
    if lay.zero_stage and str(lay.zero_stage) in machine.zero_overhead_s_per_param:   # DeepSpeed's own cost
        dp_comm += params * machine.zero_overhead_s_per_param[str(lay.zero_stage)]
    if machine.cores and ranks_here > machine.cores:                      # ranks wait for a core to move bytes
        tp_comm, pp_comm, dp_comm = (x * ranks_here / machine.cores for x in (tp_comm, pp_comm, dp_comm))
    per_param = machine.optimizer_s_per_param_busy if ranks_here > 1 and machine.optimizer_s_per_param_busy \
        else machine.optimizer_s_per_param
    optimizer = params / (lay.dp if lay.zero_stage else 1) * per_param * max(1.0, ranks_here / (machine.cores or
                                                                                             ranks_here))
    parts = {"compute_s": compute, "bubble_s": bubble, "tp_comm_s": tp_comm, "pp_comm_s": pp_comm,
             "dp_comm_s": dp_comm, "optimizer_s": optimizer}
    return {**parts, "step_s": sum(parts.values())}


def tp_collectives(cfg: Config, lay: Layout, micro_batches: int) -> tuple[float, float]:
    """(calls, ring bytes each) of one step's tensor-parallel collectives on a rank: four per layer and
    micro-batch (each an all-gather and a reduce-scatter under sequence parallelism), six per layer under full
    recomputation, and two more per micro-batch for the embedding and the loss."""
    m, t = cfg.model, lay.tp
    if t == 1:
        return 0.0, 0.0
    width = 4 if cfg.train.precision == "fp32" else 2
    recomputed = 1.5 if lay.activation_checkpointing == "full" else 1.0
    message = lay.micro_batch_size * cfg.data.seq_len * m.hidden_size * width * (t - 1) / t
    calls = (4 * recomputed * m.num_layers / lay.pp + 2) * micro_batches
    return (2 * calls, message) if lay.sequence_parallel else (calls, 2 * message)


def layout_of(cfg: Config, world: int) -> Layout:
    """The layout of a resolved config on ``world`` ranks."""
    p = cfg.parallel
    return Layout(p.tp, p.pp, world // (p.tp * p.pp), p.virtual_stages, p.zero_stage if cfg.uses_deepspeed else 0,
                  p.sequence_parallel, p.activation_checkpointing, cfg.train.micro_batch_size)


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


def predict(cfg: Config, lay: Layout, machine: Machine, gpus_per_node: int) -> dict:
    """Memory per rank and step time of one layout (``cfg`` holding it), and the MFU it implies."""
    m = cfg.train.global_batch_size // (lay.micro_batch_size * lay.dp)
    memory = memory_per_rank(cfg, lay, m)
    times = step_seconds(cfg, lay, m, machine, gpus_per_node, memory["parameters"])
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    per_token = flops_per_token(cfg.model, cfg.data.seq_len).model
    world = lay.tp * lay.pp * lay.dp
    times["mfu"] = tokens * per_token / times["step_s"] / world / machine.matmul_flops
    return {"memory": memory, "time": times, "micro_batches": m}


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
    from megalm.bench.harness import write_result

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
    print(f"wrote {path}")
    return 0 if result["fits"] else 1
