"""The rule book: every rule a config, a layout or a command-line value must obey, in one place.

Validation (``validate``), the pipeline partitioner (``check_pipeline_layers``), the topology
(``data_parallel_size``), ``megalm generate`` (``check_sampling``) and the tests all call these functions; no
other module repeats a rule. Each rule raises ``ConfigError`` with one line that names the value and the fix,
and every rank evaluates it on the same numbers, so all ranks fail together before anything is allocated.
"""
from __future__ import annotations

import importlib.util
import math
from typing import Optional

from megalm.config.schema import Config, ConfigError

SCHEDULE_NAMES = ("gpipe", "1f1b", "interleaved")
KERNEL_CHOICES = ("auto", "triton", "torch")

CHOICES = {
    ("model", "norm"): ("layernorm", "rmsnorm"),
    ("model", "activation"): ("gelu", "swiglu"),
    ("model", "position"): ("learned", "rope"),
    ("model", "rope_scaling"): ("none", "llama3"),
    ("parallel", "schedule"): ("auto", *SCHEDULE_NAMES),
    ("parallel", "engine"): ("auto", "native", "deepspeed"),
    ("parallel", "activation_checkpointing"): ("none", "full", "selective"),
    ("parallel", "zero_stage"): (0, 1, 2, 3),
    ("train", "precision"): ("fp32", "bf16", "fp16"),
    ("train", "device"): ("auto", "cpu", "cuda"),
    ("optimizer", "name"): ("adamw", "sgd"),
    ("lr", "decay"): ("cosine", "linear", "constant"),
    ("checkpoint", "on_error"): ("stop", "continue"),
    ("train", "on_non_finite"): ("stop", "skip", "rollback"),
    **{("kernels", op): KERNEL_CHOICES for op in ("attention", "norm", "rope", "swiglu", "cross_entropy")},
}

# key -> (lowest, whether the lowest itself is allowed, highest or None, whether the highest is allowed).
# A key whose value is None (unset, where the schema allows it) is not checked.
RANGES = {
    "model.vocab_size": (1, True, None, False),
    "model.hidden_size": (1, True, None, False),
    "model.num_layers": (1, True, None, False),
    "model.num_heads": (1, True, None, False),
    "model.num_kv_heads": (1, True, None, False),
    "model.ffn_hidden_size": (1, True, None, False),
    "model.max_seq_len": (1, True, None, False),
    "model.norm_eps": (0.0, False, None, False),
    "model.head_dim": (1, True, None, False),
    "model.rope_theta": (0.0, False, None, False),
    "model.rope_factor": (1.0, True, None, False),
    "model.rope_low_freq_factor": (0.0, False, None, False),
    "model.rope_high_freq_factor": (0.0, False, None, False),
    "model.rope_original_max_seq_len": (1, True, None, False),
    "model.dropout": (0.0, True, 1.0, False),
    "model.init_std": (0.0, False, None, False),
    "parallel.tp": (1, True, None, False),
    "parallel.pp": (1, True, None, False),
    "parallel.dp": (1, True, None, False),
    "parallel.virtual_stages": (1, True, None, False),
    "parallel.timeout_s": (0.0, False, None, False),
    "parallel.heartbeat_timeout": (0.0, True, None, False),
    "parallel.stall_timeout": (0.0, True, None, False),
    "parallel.join_timeout": (0.0, False, None, False),
    "parallel.straggler_factor": (0.0, True, None, False),
    "data.seq_len": (1, True, None, False),
    "data.seed": (0, True, None, False),
    "train.steps": (1, True, None, False),
    "train.micro_batch_size": (1, True, None, False),
    "train.global_batch_size": (1, True, None, False),
    "train.seed": (0, True, None, False),
    "train.eval_interval": (0, True, None, False),
    "train.eval_samples": (1, True, None, False),
    "train.log_interval": (1, True, None, False),
    "train.grad_clip": (0.0, True, None, False),
    "train.loss_scale_window": (1, True, None, False),
    "train.loss_spike_factor": (0.0, True, None, False),
    "train.loss_spike_window": (2, True, None, False),
    "train.stop_at_step": (1, True, None, False),
    "train.time_limit": (0.0, False, None, False),
    "train.time_limit_margin": (0.0, True, None, False),
    "optimizer.lr": (0.0, True, None, False),
    "optimizer.min_lr": (0.0, True, None, False),
    "optimizer.weight_decay": (0.0, True, None, False),
    "optimizer.beta1": (0.0, True, 1.0, False),
    "optimizer.beta2": (0.0, True, 1.0, False),
    "optimizer.eps": (0.0, False, None, False),
    "lr.warmup_steps": (0, True, None, False),
    "checkpoint.interval": (0, True, None, False),
    "checkpoint.keep": (1, True, None, False),
    "lora.rank": (0, True, None, False),
    "lora.alpha": (0.0, False, None, False),
    "lora.dropout": (0.0, True, 1.0, False),
}

LORA_TARGETS = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
                "w_gate": "swiglu", "w_up": "swiglu", "w_in": "gelu", "w_out": "mlp"}


def _value(cfg: Config, dotted: str):
    section, _, key = dotted.partition(".")
    return getattr(getattr(cfg, section), key)


def check_range(name: str, value, low, low_ok: bool, high=None, high_ok: bool = False) -> None:
    """One value against its range; the message names the value, the range and a valid example."""
    too_low = value < low if low_ok else value <= low
    too_high = high is not None and (value > high if high_ok else value >= high)
    if too_low or too_high:
        lo = f"{'>=' if low_ok else '>'} {low}"
        hi = f" and {'<=' if high_ok else '<'} {high}" if high is not None else ""
        raise ConfigError(f"{name}={value} is out of range: it must be {lo}{hi}")


def check_choices_and_ranges(cfg: Config) -> None:
    for (section, key), allowed in CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"{section}.{key}={value!r} is not one of {', '.join(map(str, allowed))}")
    for dotted, bounds in RANGES.items():
        value = _value(cfg, dotted)
        if value is not None:
            check_range(dotted, value, *bounds)
    o = cfg.optimizer
    if o.min_lr > o.lr:
        raise ConfigError(f"optimizer.min_lr={o.min_lr} is above optimizer.lr={o.lr}; the schedule decays from lr "
                          f"down to min_lr, so set min_lr <= lr")
    split = cfg.data.split
    if len(split) != 3 or any(not isinstance(w, (int, float)) or w < 0 for w in split) or sum(split) <= 0:
        raise ConfigError(f"data.split={list(split)} must be three non-negative weights (train, valid, test) with "
                          f"a positive sum, e.g. [98, 1, 1]")
    scale = cfg.train.initial_loss_scale
    if not (scale >= 1 and math.log2(scale).is_integer()):
        raise ConfigError(f"train.initial_loss_scale={scale} must be a power of two of at least 1 (e.g. 65536), "
                          f"so that scaling and unscaling are exact")


def check_model(cfg: Config) -> None:
    m, p = cfg.model, cfg.parallel
    if m.head_dim is None and m.hidden_size % m.num_heads:
        raise ConfigError(f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}; "
                          f"pick a hidden size that is a multiple of {m.num_heads}, or set model.head_dim")
    if m.num_heads % m.kv_heads:
        raise ConfigError(f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.kv_heads}; "
                          f"grouped-query attention needs whole groups")
    if m.position == "rope" and m.dim_per_head % 2:
        raise ConfigError(f"RoPE needs an even head dim; got {m.dim_per_head} (model.head_dim, or hidden_size / "
                          f"num_heads when unset)")
    if m.rope_scaling != "none" and m.position != "rope":
        raise ConfigError(f"model.rope_scaling={m.rope_scaling} needs model.position=rope")
    if m.rope_scaling == "llama3" and not m.rope_low_freq_factor < m.rope_high_freq_factor:
        raise ConfigError(f"model.rope_low_freq_factor={m.rope_low_freq_factor} must be below "
                          f"model.rope_high_freq_factor={m.rope_high_freq_factor} (Llama 3 uses 1 and 4)")
    if cfg.data.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}; "
                          f"lower data.seq_len or raise model.max_seq_len")
    check_tensor_parallel(cfg)
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1")
    if p.sequence_parallel and cfg.data.seq_len % p.tp:
        raise ConfigError(f"sequence parallelism splits data.seq_len={cfg.data.seq_len} over parallel.tp={p.tp}; "
                          f"use a sequence length divisible by {p.tp}")


def check_tensor_parallel(cfg: Config) -> None:
    m, tp = cfg.model, cfg.parallel.tp
    if m.num_heads % tp:
        raise ConfigError(f"model.num_heads={m.num_heads} is not divisible by parallel.tp={tp}; "
                          f"use a tp that divides {m.num_heads}")
    if m.kv_heads >= tp and m.kv_heads % tp:
        raise ConfigError(f"model.num_kv_heads={m.kv_heads} is not divisible by parallel.tp={tp}; "
                          f"use a tp that divides it (or fewer kv heads than tp, which are then replicated)")
    if m.kv_heads < tp and tp % m.kv_heads:
        raise ConfigError(f"parallel.tp={tp} is not a multiple of model.num_kv_heads={m.kv_heads}; "
                          f"with fewer kv heads than tp each kv head must serve whole tp ranks")
    if m.ffn_size % tp:
        raise ConfigError(f"MLP width {m.ffn_size} is not divisible by parallel.tp={tp}; "
                          f"set model.ffn_hidden_size to a multiple of {tp}")
    if m.vocab_size is not None and m.vocab_size % tp:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is not divisible by parallel.tp={tp}; "
                          f"pad it to a multiple of {tp} (or leave it unset to take the padded tokenizer size)")


def check_pipeline_layers(num_layers: int, pp: int, virtual_stages: int = 1, explicit=None) -> None:
    """The layer partition: even over pp x virtual_stages slices, or explicit whole counts that sum up."""
    check_range("parallel.pp", pp, 1, True)
    check_range("parallel.virtual_stages", virtual_stages, 1, True)
    chunks = pp * virtual_stages
    if explicit is not None:
        counts = explicit
        if not isinstance(counts, (list, tuple)) or not all(type(c) is int and c >= 0 for c in counts):
            raise ConfigError(f"parallel.pipeline_layers={counts} must be a list of non-negative whole layer "
                              f"counts, one per (virtual) stage in pipeline order, e.g. [1, 3]")
        if len(counts) != chunks or sum(counts) != num_layers:
            raise ConfigError(f"parallel.pipeline_layers={list(counts)} must list {chunks} counts "
                              f"(pp x virtual_stages = {pp} x {virtual_stages}) that sum to "
                              f"model.num_layers={num_layers} (they sum to {sum(counts)})")
    elif num_layers % chunks:
        raise ConfigError(f"model.num_layers={num_layers} is not divisible by parallel.pp x "
                          f"parallel.virtual_stages = {pp} x {virtual_stages} = {chunks}; "
                          f"change one of them or give parallel.pipeline_layers explicitly")


def check_pipeline(cfg: Config, cuda: Optional[bool] = None) -> None:
    p = cfg.parallel
    check_pipeline_layers(cfg.model.num_layers, p.pp, p.virtual_stages, p.pipeline_layers)
    if p.virtual_stages > 1 and p.pp == 1:
        raise ConfigError("parallel.virtual_stages > 1 needs parallel.pp > 1")
    if p.schedule in ("gpipe", "1f1b") and p.virtual_stages > 1:
        raise ConfigError(f"parallel.schedule={p.schedule} runs one model chunk per rank but "
                          f"parallel.virtual_stages={p.virtual_stages}; set parallel.schedule=interleaved (or auto) "
                          f"or parallel.virtual_stages=1")
    if p.schedule == "interleaved" and p.virtual_stages == 1:
        raise ConfigError("parallel.schedule=interleaved needs parallel.virtual_stages >= 2 model chunks per rank; "
                          "set parallel.virtual_stages=2 (or use parallel.schedule=1f1b)")
    if p.virtual_stages > 1 and p.pp == 2 and (will_use_cuda(cfg) if cuda is None else cuda):
        raise ConfigError("interleaved pipelining with parallel.pp=2 is not supported on NCCL yet (both "
                          "directions' messages travel between the same two ranks, and NCCL matches them by "
                          "order, not tag); use parallel.pp >= 3, or parallel.virtual_stages=1")


def will_use_cuda(cfg: Config) -> bool:
    """Whether this run will train on CUDA with NCCL (train.device, or auto with a visible GPU)."""
    if cfg.train.device != "auto":
        return cfg.train.device == "cuda"
    import torch

    return torch.cuda.is_available()


def data_parallel_size(world_size: int, tp: int, pp: int, dp: Optional[int] = None) -> int:
    """dp = world / (tp x pp), which must be whole and agree with an explicit parallel.dp."""
    mp_size = tp * pp
    if world_size % mp_size:
        raise ConfigError(f"world size {world_size} is not divisible by tp x pp = {tp} x {pp} = {mp_size}; "
                          f"launch a multiple of {mp_size} processes or change parallel.tp/parallel.pp")
    derived = world_size // mp_size
    if dp is not None and dp != derived:
        raise ConfigError(f"world size {world_size} != tp x pp x dp = {tp} x {pp} x {dp} = "
                          f"{mp_size * dp}; launch {mp_size * dp} processes or set parallel.dp={derived}")
    return derived


def tp_share(n: int, tp: int, what: str, where: str = "") -> int:
    """A size split over tensor-parallel ranks (the layers' own guard uses this rule): n / tp, whole."""
    if n % tp:
        raise ConfigError(f"{where + ': ' if where else ''}{what}={n} is not divisible by tensor-parallel size "
                          f"tp={tp}; make {what} a multiple of {tp} (e.g. {(n // tp + 1) * tp}) or change parallel.tp")
    return n // tp


def micro_batches_per_rank(global_batch: int, micro_batch: int, dp: int, prefix: str = "train.") -> int:
    """The global batch split into whole micro-batches over dp replicas (the data sampler's guard uses this rule)."""
    per_step = micro_batch * dp
    if global_batch % per_step:
        raise ConfigError(
            f"{prefix}global_batch_size={global_batch} is not divisible by {prefix}micro_batch_size x dp = "
            f"{micro_batch} x {dp} = {per_step}: use a global batch that is a multiple of {per_step} (e.g. "
            f"{max(per_step, global_batch // per_step * per_step)}) or change the micro batch")
    return global_batch // per_step


def check_batch(cfg: Config, world_size: Optional[int]) -> None:
    p, t = cfg.parallel, cfg.train
    dp = data_parallel_size(world_size, p.tp, p.pp, p.dp) if world_size is not None else (p.dp or 1)
    count = micro_batches_per_rank(t.global_batch_size, t.micro_batch_size, dp)
    check_schedule(cfg.schedule, p.pp, p.virtual_stages, count,
                   f"train.global_batch_size {t.global_batch_size} / (train.micro_batch_size {t.micro_batch_size} "
                   f"x dp {dp}) = {count}")


def check_schedule(schedule: str, pp: int, num_chunks: int, num_microbatches: int, how: str = "") -> None:
    """A pipeline schedule's own rules (the schedules check them too, on the numbers they are called with).

    gpipe and 1f1b: one model chunk per rank, any number of micro-batches >= 1. interleaved: the micro-batch
    count must be a positive multiple of pp, as in Megatron-LM: it runs micro-batches in groups of pp through
    each chunk in turn.
    """
    if schedule not in SCHEDULE_NAMES:
        raise ConfigError(f"unknown pipeline schedule {schedule!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    if num_microbatches < 1:
        raise ConfigError(f"num_microbatches={num_microbatches} must be at least 1")
    if schedule != "interleaved" and num_chunks != 1:
        raise ConfigError(f"schedule {schedule!r} runs one model chunk per rank but virtual_stages={num_chunks}; "
                          f"set parallel.virtual_stages=1 or parallel.schedule=interleaved")
    if schedule == "interleaved" and num_microbatches % pp:
        raise ConfigError(
            f"the interleaved schedule needs a number of micro-batches per step that is a multiple of "
            f"parallel.pp={pp}, got num_microbatches={num_microbatches} "
            f"({how or 'train.global_batch_size / (train.micro_batch_size x dp)'}); raise train.global_batch_size "
            f"to make it a multiple of {pp} "
            f"(e.g. {pp * -(-num_microbatches // pp)} micro-batches) or use parallel.virtual_stages=1")


def check_engine(cfg: Config) -> None:
    """Kernel, ZeRO and precision combinations."""
    p = cfg.parallel
    if cfg.kernels.cross_entropy == "triton" and p.tp > 1:
        raise ConfigError(f"kernels.cross_entropy=triton fuses the whole-vocabulary head and loss, which needs "
                          f"parallel.tp=1 (got {p.tp}); at tp > 1 the vocabulary-parallel loss runs. Use "
                          f"kernels.cross_entropy=auto or torch")
    if cfg.train.on_non_finite != "stop" and cfg.uses_deepspeed:
        raise ConfigError(f"train.on_non_finite={cfg.train.on_non_finite} needs megalm's native engine (DeepSpeed "
                          f"keeps reduced gradients inside its optimizer, which megalm cannot drop); use "
                          f"train.on_non_finite=stop, or parallel.engine=native with zero_stage=0")
    if p.zero_offload and p.zero_stage < 2:
        raise ConfigError(f"parallel.zero_offload needs parallel.zero_stage 2 or 3 (got {p.zero_stage})")
    if cfg.checkpoint.deepspeed_native and not (cfg.uses_deepspeed and p.pp == 1):
        raise ConfigError(f"checkpoint.deepspeed_native=true needs the DeepSpeed engine (parallel.engine=deepspeed "
                          f"or a ZeRO stage) and parallel.pp=1 (got pp={p.pp}): DeepSpeed names its files by "
                          f"model-parallel rank only, so pipeline stages would overwrite each other")
    if cfg.uses_deepspeed and cfg.train.precision == "fp16" and not will_use_cuda(cfg):
        raise ConfigError("train.precision=fp16 with DeepSpeed needs a CUDA GPU; on this CPU use "
                          "train.precision=bf16, or megalm's own engine (parallel.engine=native, zero_stage=0)")


def blend_sources(blend) -> list[tuple[str, float]]:
    """data.blend as (prefix, weight) pairs, the weights summing to 1; a malformed blend is a ConfigError."""
    how = ("data.blend must be [weight, prefix, weight, prefix, ...] or a list of {prefix: P, weight: W} or of "
           "{prefix: P, tokens: N}")
    if not isinstance(blend, (list, tuple)) or not blend:
        raise ConfigError(f"data.blend={blend!r}: {how}")
    if all(isinstance(e, dict) for e in blend):
        kinds = {"weight" if "weight" in e else "tokens" for e in blend}
        bad = [e for e in blend if set(e) not in ({"prefix", "weight"}, {"prefix", "tokens"})]
        if bad or len(kinds) > 1:
            raise ConfigError(f"data.blend entry {bad[0] if bad else blend!r}: {how}, all weights or all tokens")
        pairs = [(e["prefix"], e.get("weight", e.get("tokens"))) for e in blend]
    elif len(blend) % 2 == 0:
        pairs = list(zip(blend[1::2], blend[0::2]))
    else:
        raise ConfigError(f"data.blend={list(blend)!r} has an odd number of items: {how}")
    pairs = [(p, _number(w)) for p, w in pairs]
    for prefix, weight in pairs:
        if not isinstance(prefix, str) or not prefix:
            raise ConfigError(f"data.blend: {prefix!r} is not a dataset prefix; {how}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
            raise ConfigError(f"data.blend: the weight of {prefix} is {weight!r}; it must be a positive number")
    prefixes = [p for p, _ in pairs]
    if len(set(prefixes)) != len(prefixes):
        raise ConfigError(f"data.blend names a prefix twice ({prefixes}): give each source once, with its total "
                          f"weight")
    total = sum(w for _, w in pairs)
    return [(p, w / total) for p, w in pairs]


def _number(value):
    """YAML 1.1 reads 2e9 (no dot) as a string."""
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def check_data(cfg: Config) -> None:
    if cfg.data.blend is None:
        return
    blend_sources(cfg.data.blend)
    if cfg.is_set("data.prefix") and cfg.data.prefix:
        raise ConfigError(f"data.prefix={cfg.data.prefix} and data.blend are both set: a run reads one or the "
                          f"other; put {cfg.data.prefix} into the blend or drop data.prefix")


def check_logging(cfg: Config) -> None:
    if cfg.logging.wandb is not None:
        if not str(cfg.logging.wandb).strip():
            raise ConfigError("logging.wandb is empty: give a Weights & Biases project name, or leave it unset")
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError(f"logging.wandb={cfg.logging.wandb} needs the wandb package, which is not installed "
                              f"here: pip install wandb (or unset logging.wandb)")


def lora_targets(cfg: Config) -> tuple[str, ...]:
    """The projections lora.targets names, checked against the model ("all": every one it has)."""
    has = [t for t, kind in LORA_TARGETS.items() if kind in ("attention", "mlp", cfg.model.activation)]
    targets = list(cfg.lora.targets)
    if targets == ["all"]:
        return tuple(has)
    for t in targets:
        if t not in has:
            why = (f"a {cfg.model.activation} model has no {t}" if t in LORA_TARGETS else "no such projection")
            raise ConfigError(f"lora.targets names {t!r}: {why}; choose from {', '.join(has)}, or [all]")
    if len(set(targets)) != len(targets) or not targets:
        raise ConfigError(f"lora.targets={targets}: name each projection once (or [all])")
    return tuple(t for t in has if t in targets)


def check_lora(cfg: Config) -> None:
    if cfg.lora.rank:
        lora_targets(cfg)


def validate(cfg: Config, world_size: Optional[int] = None, cuda: Optional[bool] = None) -> None:
    """Every rule, in order; ``world_size`` None checks the layout against parallel.dp (or 1)."""
    check_choices_and_ranges(cfg)
    check_data(cfg)
    check_model(cfg)
    check_pipeline(cfg, cuda)
    check_batch(cfg, world_size)
    check_engine(cfg)
    check_logging(cfg)
    check_lora(cfg)


def check_sampling(temperature: float, top_k: int, top_p: float, max_new_tokens: int) -> None:
    """``megalm generate``'s sampling arguments."""
    for flag, value, low, low_ok, high, high_ok in (
            ("--temperature", temperature, 0.0, True, None, False), ("--top-k", top_k, 0, True, None, False),
            ("--top-p", top_p, 0.0, False, 1.0, True), ("--max-new-tokens", max_new_tokens, 0, True, None, False)):
        try:
            check_range(flag, value, low, low_ok, high, high_ok)
        except ConfigError as e:
            raise ConfigError(f"{e} (temperature 0 decodes greedily; top-k 0 and top-p 1 turn those filters "
                              f"off)") from None
