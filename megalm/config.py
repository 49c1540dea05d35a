"""Typed, sectioned run configuration: YAML files plus dotted ``key=value`` overrides, validated up front.

Every rule the parallel code relies on is checked in ``Config.validate`` before any rank allocates memory, and
every message names the numbers and the fix. Field docstrings are the reference for users (``megalm train
--help-config`` prints them).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config value that cannot work; the message says which key, which value and what to do."""


@dataclass
class ModelConfig:
    vocab_size: Optional[int] = None
    """Vocabulary size. None: taken from the dataset's tokenizer and padded to a multiple of 128 x tp."""
    hidden_size: int = 256
    """Width of the residual stream."""
    num_layers: int = 4
    """Number of transformer blocks."""
    num_heads: int = 8
    """Query heads."""
    num_kv_heads: Optional[int] = None
    """Key/value heads (grouped-query attention). None: same as num_heads."""
    ffn_hidden_size: Optional[int] = None
    """MLP width. None: 4 x hidden for GELU, the Llama rule (8/3 x hidden rounded up to 256) for SwiGLU."""
    max_seq_len: int = 256
    """Longest sequence the model accepts (size of learned positions; RoPE tables)."""
    norm: str = "layernorm"
    """layernorm or rmsnorm."""
    norm_eps: float = 1e-5
    """Epsilon inside the norms."""
    activation: str = "gelu"
    """gelu (GPT-2 MLP) or swiglu (Llama MLP: gate, up, down)."""
    position: str = "learned"
    """learned (GPT-2 absolute positions) or rope."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    tie_embeddings: bool = True
    """Share the input embedding with the LM head."""
    bias: bool = True
    """Biases in linear layers and LayerNorm (GPT-2: true, Llama: false)."""
    qkv_bias: bool = False
    """Biases on the query/key/value projections only (Qwen2), whatever model.bias says."""
    dropout: float = 0.0
    """Dropout on attention probabilities, residual branches and embeddings."""
    init_std: float = 0.02
    """Std of the normal initialisation; output projections get std / sqrt(2 x num_layers)."""

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.activation == "swiglu":
            return 256 * math.ceil(int(8 * self.hidden_size / 3) / 256)
        return 4 * self.hidden_size


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size (Megatron column/row-parallel layers)."""
    pp: int = 1
    """Pipeline-parallel stages."""
    dp: Optional[int] = None
    """Data-parallel replicas. None: world size / (tp x pp)."""
    virtual_stages: int = 1
    """Model chunks per pipeline rank (interleaved 1F1B when > 1)."""
    schedule: str = "auto"
    """Pipeline schedule: gpipe, 1f1b or interleaved; auto: interleaved when virtual_stages > 1, else 1f1b."""
    pipeline_layers: Optional[list] = None
    """Explicit layer counts per (virtual) stage in pipeline order; None: even split."""
    sequence_parallel: bool = False
    """Shard activations along the sequence between tensor-parallel regions (needs tp > 1)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 for data parallelism."""
    engine: str = "auto"
    """native (megalm's own optimizer and DP all-reduce) or deepspeed; auto: deepspeed when zero_stage > 0
    or deepspeed_config is set."""
    deepspeed_config: Optional[str] = None
    """A DeepSpeed JSON config used instead of (and overridden by) megalm's own settings."""
    zero_offload: bool = False
    """ZeRO-2/3: keep optimizer state (and ZeRO-3 parameters) in CPU memory."""
    activation_checkpointing: str = "none"
    """none, full (recompute each block) or selective (recompute attention only)."""


@dataclass
class DataConfig:
    prefix: Optional[str] = "data/stdlib"
    """Path prefix of the preprocessed dataset (PREFIX.bin, PREFIX.idx, PREFIX.tokenizer.json)."""
    seq_len: int = 128
    """Tokens per training sample."""
    split: list = field(default_factory=lambda: [98, 1, 1])
    """Train/validation/test weights of the by-document split."""
    seed: int = 1234
    """Seed of the split and the sample shuffle."""


@dataclass
class TrainConfig:
    steps: int = 200
    """Optimizer steps to train (the run stops at this step; a resumed run continues to it)."""
    micro_batch_size: int = 8
    """Samples per micro-batch on one data-parallel rank."""
    global_batch_size: int = 8
    """Samples per optimizer step over all data-parallel ranks (= micro x accumulation x dp)."""
    precision: str = "fp32"
    """fp32, bf16 or fp16 (fp16: dynamic loss scaling, agreed over all ranks; with DeepSpeed it needs a GPU)."""
    seed: int = 1234
    """Seed of initialisation and dropout."""
    run_dir: str = "runs/tiny"
    """Where metrics, plots and checkpoints go; rerunning on it resumes."""
    eval_interval: int = 50
    """Evaluate every this many steps (and at the end); 0: only at the end."""
    eval_samples: int = 64
    """Validation/test samples per evaluation."""
    log_interval: int = 10
    """Print a progress line every this many steps."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables."""
    initial_loss_scale: float = 65536.0
    """fp16: the first loss scale, a power of two (halved at every overflow, when that step is skipped)."""
    loss_scale_window: int = 1000
    """fp16: double the loss scale after this many steps in a row without overflow."""
    device: str = "auto"
    """auto (CUDA when available), cuda or cpu."""
    stop_at_step: Optional[int] = None
    """Stop after this step with a checkpoint, as if interrupted (the schedule still ends at train.steps);
    rerunning the same command resumes. For jobs that must fit a time slot."""


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Learning rate at the end of the decay."""
    weight_decay: float = 0.1
    """AdamW weight decay (never applied to norms and biases)."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    name: str = "adamw"
    """adamw or sgd (sgd is for exactness tests)."""


@dataclass
class LRConfig:
    warmup_steps: int = 20
    """Linear warmup from 0 to optimizer.lr."""
    decay: str = "cosine"
    """cosine, linear or constant decay after warmup, down to optimizer.min_lr at train.steps."""


@dataclass
class CheckpointConfig:
    interval: int = 100
    """Save every this many steps (and at the end); 0: only at the end."""
    keep: int = 2
    """Keep this many most recent checkpoints."""
    load: Optional[str] = None
    """Start from this checkpoint (a run dir or a step folder) when train.run_dir has none of its own yet;
    its model settings are adopted. Used for fine-tuning (megalm finetune) and for moving a run."""
    load_weights_only: bool = False
    """With checkpoint.load: take the weights only (fresh optimizer, step 0, data from the start)."""
    save_optimizer: bool = True
    """Save optimizer state (needed for exact resume)."""
    deepspeed_native: bool = False
    """Under DeepSpeed, also write DeepSpeed's own ZeRO checkpoint at each save, to train.run_dir/deepspeed/
    (tag global_stepN), for DeepSpeed's tools; `megalm convert from-deepspeed` reads it back. Needs pp = 1."""


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    """Write TensorBoard events when tensorboard is installed."""
    plot: bool = True
    """Write loss_curve.png into the run dir at the end."""


@dataclass
class KernelConfig:
    attention: str = "auto"
    """auto (Triton on CUDA, PyTorch on CPU), triton or torch."""
    norm: str = "auto"
    """auto, triton or torch."""
    rope: str = "auto"
    """Rotary embedding: auto, triton (fused, one pass) or torch."""
    swiglu: str = "auto"
    """SwiGLU activation: auto, triton (fused silu(gate) * up) or torch."""
    cross_entropy: str = "auto"
    """The head's loss at tp = 1: auto, triton (fused linear + cross entropy, never the full logits) or torch."""


SECTIONS = {
    "model": ModelConfig, "parallel": ParallelConfig, "data": DataConfig, "train": TrainConfig,
    "optimizer": OptimizerConfig, "lr": LRConfig, "checkpoint": CheckpointConfig,
    "logging": LoggingConfig, "kernels": KernelConfig,
}

CHOICES = {
    ("model", "norm"): ("layernorm", "rmsnorm"),
    ("model", "activation"): ("gelu", "swiglu"),
    ("model", "position"): ("learned", "rope"),
    ("parallel", "schedule"): ("auto", "gpipe", "1f1b", "interleaved"),
    ("parallel", "engine"): ("auto", "native", "deepspeed"),
    ("parallel", "activation_checkpointing"): ("none", "full", "selective"),
    ("train", "precision"): ("fp32", "bf16", "fp16"),
    ("train", "device"): ("auto", "cpu", "cuda"),
    ("optimizer", "name"): ("adamw", "sgd"),
    ("lr", "decay"): ("cosine", "linear", "constant"),
    ("kernels", "attention"): ("auto", "triton", "torch"),
    ("kernels", "norm"): ("auto", "triton", "torch"),
    ("kernels", "rope"): ("auto", "triton", "torch"),
    ("kernels", "swiglu"): ("auto", "triton", "torch"),
    ("kernels", "cross_entropy"): ("auto", "triton", "torch"),
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr: LRConfig = field(default_factory=LRConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Config":
        cfg = cls()
        for section, values in (data or {}).items():
            if section not in SECTIONS:
                raise ConfigError(f"unknown config section {section!r}{_suggest(section, SECTIONS)}")
            for key, value in (values or {}).items():
                cfg.set(f"{section}.{key}", value)
        return cfg

    def set(self, dotted: str, value: Any) -> None:
        """Set ``section.key`` to ``value`` (a string from the command line is parsed as YAML, then typed)."""
        section, _, key = dotted.partition(".")
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r} in {dotted!r}{_suggest(section, SECTIONS)}")
        obj = getattr(self, section)
        names = {f.name for f in fields(obj)}
        if key not in names:
            raise ConfigError(f"unknown config key {dotted!r}{_suggest(key, names, section + '.')}")
        hint = get_type_hints(type(obj))[key]
        setattr(obj, key, _coerce(dotted, value, hint))

    @property
    def world_size(self) -> int:
        return self.parallel.tp * self.parallel.pp * (self.parallel.dp or 1)

    @property
    def uses_deepspeed(self) -> bool:
        p = self.parallel
        if p.engine == "auto":
            return p.zero_stage > 0 or p.deepspeed_config is not None
        return p.engine == "deepspeed"

    @property
    def schedule(self) -> str:
        if self.parallel.schedule == "auto":
            return "interleaved" if self.parallel.virtual_stages > 1 else "1f1b"
        return self.parallel.schedule

    def grad_accumulation_steps(self, dp: int) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * dp)

    def validate(self, world_size: Optional[int] = None) -> "Config":
        """Check every rule before anything is allocated; raise ConfigError naming the numbers and the fix."""
        _validate(self, world_size)
        return self


def _suggest(word: str, candidates, prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    return f"; did you mean {prefix + close[0]!r}?" if close else f"; valid: {', '.join(sorted(candidates))}"


def _coerce(dotted: str, value: Any, hint) -> Any:
    if isinstance(value, str) and hint is not str:
        value = yaml.safe_load(value) if value != "" else None
    optional = get_origin(hint) is not None and type(None) in get_args(hint)
    base = next((a for a in get_args(hint) if a is not type(None)), hint) if optional else hint
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{dotted} may not be empty")
    if base is bool and not isinstance(value, bool):
        raise ConfigError(f"{dotted}={value!r} must be true or false")
    if base is int and (isinstance(value, bool) or not isinstance(value, int)):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{dotted}={value!r} must be an integer")
    if base is float and isinstance(value, str):
        try:
            value = float(value)      # YAML 1.1 reads "1e-2" (no dot) as a string
        except ValueError:
            pass
    if base is float and not isinstance(value, (int, float)):
        raise ConfigError(f"{dotted}={value!r} must be a number")
    if base is float:
        return float(value)
    if base is str and not isinstance(value, str):
        return str(value)
    if base is list and not isinstance(value, list):
        raise ConfigError(f"{dotted}={value!r} must be a list, e.g. [1, 2]")
    return value


def _validate(cfg: Config, world_size: Optional[int]) -> None:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    for (section, key), allowed in CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"{section}.{key}={value!r} is not one of {', '.join(allowed)}")
    positive = [("model.hidden_size", m.hidden_size), ("model.num_layers", m.num_layers),
                ("model.num_heads", m.num_heads), ("model.kv_heads", m.kv_heads),
                ("model.max_seq_len", m.max_seq_len), ("data.seq_len", cfg.data.seq_len),
                ("train.steps", t.steps), ("train.micro_batch_size", t.micro_batch_size),
                ("train.global_batch_size", t.global_batch_size), ("parallel.tp", p.tp), ("parallel.pp", p.pp),
                ("parallel.virtual_stages", p.virtual_stages), ("train.loss_scale_window", t.loss_scale_window)]
    for name, value in positive:
        if value < 1:
            raise ConfigError(f"{name}={value} must be at least 1")
    if m.hidden_size % m.num_heads:
        raise ConfigError(f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}; "
                          f"pick a hidden size that is a multiple of {m.num_heads}")
    if m.num_heads % m.kv_heads:
        raise ConfigError(f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.kv_heads}; "
                          f"grouped-query attention needs whole groups")
    if m.position == "rope" and m.head_dim % 2:
        raise ConfigError(f"RoPE needs an even head dim; hidden_size/num_heads = {m.head_dim}")
    if cfg.data.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}; "
                          f"lower data.seq_len or raise model.max_seq_len")
    if m.num_heads % p.tp:
        raise ConfigError(f"model.num_heads={m.num_heads} is not divisible by parallel.tp={p.tp}; "
                          f"use a tp that divides {m.num_heads}")
    if m.kv_heads >= p.tp and m.kv_heads % p.tp:
        raise ConfigError(f"model.num_kv_heads={m.kv_heads} is not divisible by parallel.tp={p.tp}; "
                          f"use a tp that divides it (or fewer kv heads than tp, which are then replicated)")
    if m.kv_heads < p.tp and p.tp % m.kv_heads:
        raise ConfigError(f"parallel.tp={p.tp} is not a multiple of model.num_kv_heads={m.kv_heads}; "
                          f"with fewer kv heads than tp each kv head must serve whole tp ranks")
    if m.ffn_size % p.tp:
        raise ConfigError(f"MLP width {m.ffn_size} is not divisible by parallel.tp={p.tp}; "
                          f"set model.ffn_hidden_size to a multiple of {p.tp}")
    if m.vocab_size is not None and m.vocab_size % p.tp:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is not divisible by parallel.tp={p.tp}; "
                          f"pad it to a multiple of {p.tp} (or leave it unset to take the padded tokenizer size)")
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1")
    if p.sequence_parallel and cfg.data.seq_len % p.tp:
        raise ConfigError(f"sequence parallelism splits data.seq_len={cfg.data.seq_len} over parallel.tp={p.tp}; "
                          f"use a sequence length divisible by {p.tp}")
    _validate_pipeline(cfg)
    _validate_batch(cfg, world_size)
    if cfg.kernels.cross_entropy == "triton" and p.tp > 1:
        raise ConfigError(f"kernels.cross_entropy=triton fuses the whole-vocabulary head and loss, which needs "
                          f"parallel.tp=1 (got {p.tp}); at tp > 1 the vocabulary-parallel loss runs. Use "
                          f"kernels.cross_entropy=auto or torch")
    scale = t.initial_loss_scale
    if not (scale >= 1 and math.log2(scale).is_integer()):
        raise ConfigError(f"train.initial_loss_scale={scale} must be a power of two of at least 1 (e.g. 65536), "
                          f"so that scaling and unscaling are exact")
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage={p.zero_stage} must be 0, 1, 2 or 3")
    if p.zero_offload and p.zero_stage < 2:
        raise ConfigError(f"parallel.zero_offload needs parallel.zero_stage 2 or 3 (got {p.zero_stage})")
    if cfg.checkpoint.deepspeed_native and not (cfg.uses_deepspeed and p.pp == 1):
        raise ConfigError(f"checkpoint.deepspeed_native=true needs the DeepSpeed engine (parallel.engine=deepspeed "
                          f"or a ZeRO stage) and parallel.pp=1 (got pp={p.pp}): DeepSpeed names its files by "
                          f"model-parallel rank only, so pipeline stages would overwrite each other")


def _validate_pipeline(cfg: Config) -> None:
    m, p = cfg.model, cfg.parallel
    chunks = p.pp * p.virtual_stages
    if p.pipeline_layers is not None:
        counts = p.pipeline_layers
        if not isinstance(counts, list) or not all(type(c) is int and c >= 0 for c in counts):
            raise ConfigError(f"parallel.pipeline_layers={counts} must be a list of non-negative whole layer "
                              f"counts, one per (virtual) stage in pipeline order, e.g. [1, 3]")
        if len(counts) != chunks or sum(counts) != m.num_layers:
            raise ConfigError(f"parallel.pipeline_layers={counts} must list {chunks} counts "
                              f"(pp x virtual_stages = {p.pp} x {p.virtual_stages}) that sum to "
                              f"model.num_layers={m.num_layers} (they sum to {sum(counts)})")
    elif m.num_layers % chunks:
        raise ConfigError(f"model.num_layers={m.num_layers} is not divisible by parallel.pp x "
                          f"parallel.virtual_stages = {p.pp} x {p.virtual_stages} = {chunks}; "
                          f"change one of them or give parallel.pipeline_layers explicitly")
    if p.virtual_stages > 1 and p.pp == 1:
        raise ConfigError("parallel.virtual_stages > 1 needs parallel.pp > 1")
    if p.schedule in ("gpipe", "1f1b") and p.virtual_stages > 1:
        raise ConfigError(f"parallel.schedule={p.schedule} runs one model chunk per rank but "
                          f"parallel.virtual_stages={p.virtual_stages}; set parallel.schedule=interleaved (or auto) "
                          f"or parallel.virtual_stages=1")
    if p.schedule == "interleaved" and p.virtual_stages == 1:
        raise ConfigError("parallel.schedule=interleaved needs parallel.virtual_stages >= 2 model chunks per rank; "
                          "set parallel.virtual_stages=2 (or use parallel.schedule=1f1b)")
    if p.virtual_stages > 1 and p.pp == 2 and _will_use_cuda(cfg):
        raise ConfigError("interleaved pipelining with parallel.pp=2 is not supported on NCCL yet (both "
                          "directions' messages travel between the same two ranks, and NCCL matches them by "
                          "order, not tag); use parallel.pp >= 3, or parallel.virtual_stages=1")


def _will_use_cuda(cfg: Config) -> bool:
    """Whether this run will train on CUDA with NCCL (train.device, or auto with a visible GPU)."""
    if cfg.train.device != "auto":
        return cfg.train.device == "cuda"
    import torch

    return torch.cuda.is_available()


def _validate_batch(cfg: Config, world_size: Optional[int]) -> None:
    p, t = cfg.parallel, cfg.train
    mp_size = p.tp * p.pp
    if world_size is not None:
        if world_size % mp_size:
            raise ConfigError(f"world size {world_size} is not divisible by tp x pp = {p.tp} x {p.pp} = {mp_size}; "
                              f"launch a multiple of {mp_size} processes")
        dp = world_size // mp_size
        if p.dp is not None and p.dp != dp:
            raise ConfigError(f"world size {world_size} != tp x pp x dp = {p.tp} x {p.pp} x {p.dp} = "
                              f"{mp_size * p.dp}; launch {mp_size * p.dp} processes or set parallel.dp={dp}")
    else:
        dp = p.dp or 1
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size x dp = "
            f"{t.micro_batch_size} x {dp} = {per_step}; use a global batch that is a multiple of {per_step}")
    microbatches = t.global_batch_size // per_step
    if cfg.schedule == "interleaved" and (microbatches < p.pp or microbatches % p.pp):
        raise ConfigError(
            f"the interleaved schedule needs a number of micro-batches per step that is a multiple of "
            f"parallel.pp={p.pp}; global {t.global_batch_size} / (micro {t.micro_batch_size} x dp {dp}) = "
            f"{microbatches}: raise train.global_batch_size")


def resolve_config_file(path: str) -> Path:
    """A YAML path, or the name of a preset shipped with megalm (``tiny``, ``llama-7b``, ``deepspeed/zero3.json``).

    A file that exists wins; otherwise the packaged presets (the repository's ``configs/``) are searched, so an
    installed wheel still finds them.
    """
    file = Path(path)
    if file.exists():
        return file
    presets = preset_folder()
    for candidate in (presets / path, presets / f"{path}.yaml", presets / Path(path).name):
        if candidate.is_file():
            return candidate
    names = sorted(p.stem for p in presets.glob("*.yaml"))
    raise ConfigError(f"config file {path} does not exist, and it is not a preset name ({', '.join(names)})")


def preset_folder() -> Path:
    """The folder of the packaged presets (``configs/`` in the repository, ``megalm/presets`` in a wheel)."""
    import importlib.util

    spec = importlib.util.find_spec("megalm.presets")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parent.parent / "configs"     # an editable install older than megalm.presets


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Read a YAML file (or the defaults) and apply ``section.key=value`` overrides in order."""
    data = {}
    if path:
        data = yaml.safe_load(resolve_config_file(path).read_text()) or {}
    cfg = Config.from_dict(data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.steps=100")
        key, _, value = item.partition("=")
        cfg.set(key.strip(), value)
    return cfg


def describe_fields() -> str:
    """Every config key with its default and docstring (for --help-config and the README)."""
    import ast
    import inspect

    lines = []
    for name, cls in SECTIONS.items():
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body
        docs = {}
        for i, node in enumerate(body[:-1]):
            nxt = body[i + 1]
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
        defaults = cls()
        for f in fields(cls):
            lines.append(f"{name}.{f.name} = {getattr(defaults, f.name)!r}  {docs.get(f.name, '')}".rstrip())
    return "\n".join(lines)
