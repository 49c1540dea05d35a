"""The planner's model of one layout: exact parameter counts, model states, activations and buffers per rank,
and the step time on a ``Machine``; ``predict`` puts them together. ``megalm.bench.plan`` searches layouts with
it; ``megalm.bench.calibrate`` measures the machine with it (what the formulas are: ``megalm.bench.plan``)."""
from __future__ import annotations

from dataclasses import dataclass

from megalm.bench.activations import saved_activation_bytes
from megalm.bench.machine import Machine
from megalm.config import Config, ModelConfig
from megalm.flops import flops_per_token, matmul_params

GIB = 1024 ** 3


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


def fused_loss(cfg: Config, lay: Layout, device: str) -> bool:
    """Whether the head's loss runs through the fused linear + cross entropy kernel (``kernels`` on a GPU, tp 1)."""
    return device == "cuda" and lay.tp == 1 and cfg.kernels.cross_entropy in ("auto", "triton")


def kernel_workspace_bytes(cfg: Config, lay: Layout, device: str) -> float:
    """The fused loss kernel's working memory during its forward: the weight gradient's fp32 accumulator and one
    chunk of logits (``kernels/cross_entropy.py``); 0 where the kernel does not run."""
    if not fused_loss(cfg, lay, device):
        return 0.0
    from megalm.kernels.cross_entropy import _chunk_rows

    m, width = cfg.model, 4 if cfg.train.precision == "fp32" else 2
    rows = lay.micro_batch_size * cfg.data.seq_len
    return 4 * m.vocab_size * m.hidden_size + _chunk_rows(rows, m.hidden_size, m.vocab_size) * m.vocab_size * width


def activation_bytes(cfg: Config, lay: Layout, micro_batches: int, device: str = "cuda") -> tuple[float, float]:
    """(first stage, last stage) activation bytes at the peak of the schedule: the micro-batches in flight times
    the bytes a micro-batch's forward keeps per layer (counted on megalm's modules: ``bench.activations``), plus
    on the last stage the head's and, during its backward, two logits-sized fp32 buffers (the logits' gradient
    and the softmax backward's output at tp = 1, or the head's weight-gradient product at tp > 1: where this
    machine's measured peaks fall; with the fused loss kernel, its workspace instead), and under full
    recomputation one layer's activations, rebuilt during its backward."""
    m, s, b = cfg.model, cfg.data.seq_len, lay.micro_batch_size
    fused = fused_loss(cfg, lay, device)
    per_layer, head = saved_activation_bytes(m, lay.tp, lay.sequence_parallel, lay.activation_checkpointing, b, s,
                                             cfg.train.precision, fused)
    in_flight = min(lay.pp, micro_batches)
    if lay.virtual_stages > 1:
        in_flight *= 1 + (lay.pp - 1) / (lay.pp * lay.virtual_stages)
    layers = m.num_layers / lay.pp
    rebuilt = 0.0
    if lay.activation_checkpointing == "full":
        rebuilt = saved_activation_bytes(m, lay.tp, lay.sequence_parallel, "none", b, s, cfg.train.precision)[0]
    logits_grad = kernel_workspace_bytes(cfg, lay, device) if fused else 2 * 4 * s * b * m.vocab_size / lay.tp
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


def embedding_gradient_bytes(cfg: Config, lay: Layout, micro_batches: int) -> float:
    """The first pipeline stage's transient during its embedding's backward: the dense gradient of the (vocabulary
    shard of the) embedding, made whole and then added into the gradient the earlier micro-batches accumulated.
    The peak of that stage when pp > 1 (measured); with pp = 1 the head's backward, earlier, is higher."""
    if lay.pp == 1 or micro_batches == 1:
        return 0.0
    width = 4 if cfg.train.precision == "fp32" else 2
    return cfg.model.vocab_size // lay.tp * cfg.model.hidden_size * width


def memory_per_rank(cfg: Config, lay: Layout, micro_batches: int, device: str = "cuda") -> dict:
    """The fuller pipeline stage's bytes. With one micro-batch per step the blocks' gradients are made while their
    activations are freed, so at the peak (the head's backward) only the head's own gradients exist. ``transient``:
    what a stage holds only for a moment at its peak (``embedding_gradient_bytes``)."""
    first_extra, block, last_extra = parameters_per_rank(cfg.model, lay.tp)
    layers = cfg.model.num_layers // lay.pp
    weights, grads, optimizer = state_bytes(cfg.train.precision, lay.zero_stage, lay.dp)
    act_first, act_last = activation_bytes(cfg, lay, micro_batches, device)
    first_params = first_extra + layers * block + (last_extra - shared_embedding(cfg.model, lay.tp)
                                                   if lay.pp == 1 else 0)
    last_params = last_extra + layers * block
    buffers = buffer_bytes(cfg, lay, block)

    def states(params: int) -> float:
        without_block_grads = params - layers * block if micro_batches == 1 else params
        return params * (weights + optimizer) + without_block_grads * grads
    first = {"parameters": first_params, "states": states(first_params), "activations": act_first,
             "transient": embedding_gradient_bytes(cfg, lay, micro_batches), "buffers": buffers}
    last = {"parameters": last_params, "states": states(last_params), "activations": act_last,
            "transient": 0.0, "buffers": buffers}
    worst = max((first, last), key=lambda d: d["states"] + d["activations"] + d["transient"])
    return {**worst, "total": worst["states"] + worst["activations"] + worst["transient"] + buffers}


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
    zero3 = 1.5 if lay.zero_stage == 3 else 1.0          # ZeRO-3 also gathers the weights in backward (ZeRO paper)
    dp_comm = cost(1 if lay.dp > 1 else 0, 2 * grads * zero3, world <= gpus_per_node)   # one all-reduce's bytes
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


def predict(cfg: Config, lay: Layout, machine: Machine, gpus_per_node: int) -> dict:
    """Memory per rank and step time of one layout (``cfg`` holding it), and the MFU it implies."""
    m = cfg.train.global_batch_size // (lay.micro_batch_size * lay.dp)
    memory = memory_per_rank(cfg, lay, m, machine.device)
    times = step_seconds(cfg, lay, m, machine, gpus_per_node, memory["parameters"])
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    per_token = flops_per_token(cfg.model, cfg.data.seq_len).model
    world = lay.tp * lay.pp * lay.dp
    times["mfu"] = tokens * per_token / times["step_s"] / world / machine.matmul_flops
    return {"memory": memory, "time": times, "micro_batches": m}
