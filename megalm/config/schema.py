"""The run configuration's shape: typed sections, a docstring per field (``megalm config`` prints them).

A ``Config`` is built by ``megalm.config.load`` (YAML and dotted overrides), then turned once into the run's
config by ``megalm.config.resolve`` (checkpoint, tokenizer, DeepSpeed JSON, validation by the rule book), which
freezes it: assigning to a resolved config raises ``FrozenConfigError``. Every key the user gave (in the YAML
file or on the command line) is recorded, so "explicitly set" is never guessed from "equal to the default".
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from dataclasses import dataclass, field, fields
from typing import Any, Optional, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config value that cannot work; the message says which key, which value and what to do."""


class FrozenConfigError(AttributeError):
    """A resolved config was assigned to; resolution is the only place a config changes."""


class _Freezable:
    """Sections and the config refuse assignment once ``freeze()`` ran."""
    _frozen = False

    def __setattr__(self, name: str, value: Any) -> None:
        if self._frozen:
            raise FrozenConfigError(f"the config is resolved and frozen: {type(self).__name__}.{name} cannot be "
                                    f"assigned; change the YAML or the overrides instead")
        object.__setattr__(self, name, value)


@dataclass
class ModelConfig(_Freezable):
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
    head_dim: Optional[int] = None
    """Width of one attention head. None: hidden_size / num_heads (Mistral-Nemo and Qwen3 set it apart)."""
    qk_norm: bool = False
    """RMSNorm over each head's query and key before RoPE (Qwen3), with one weight of head_dim per layer."""
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
    rope_scaling: str = "none"
    """none, or llama3 (Llama 3.1-3.3's frequency-dependent stretch of the RoPE wavelengths)."""
    rope_factor: float = 8.0
    """llama3 scaling: how much longer than the original context the long wavelengths are stretched."""
    rope_low_freq_factor: float = 1.0
    """llama3 scaling: wavelengths above original_max_seq_len / low_freq_factor are divided by rope_factor."""
    rope_high_freq_factor: float = 4.0
    """llama3 scaling: wavelengths below original_max_seq_len / high_freq_factor are kept; between, smoothed."""
    rope_original_max_seq_len: int = 8192
    """llama3 scaling: the context length the model was pretrained with before scaling."""
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
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.activation == "swiglu":
            return 256 * math.ceil(int(8 * self.hidden_size / 3) / 256)
        return 4 * self.hidden_size


@dataclass
class ParallelConfig(_Freezable):
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
    timeout_s: float = 600.0
    """Seconds a collective may wait before the process group gives up (torch.distributed's timeout)."""
    heartbeat_timeout: float = 6.0
    """Seconds without a heartbeat before a rank is declared dead (killed, stopped, host lost) and every other
    rank stops, naming it; 0 turns the watchdog off. Beats come every timeout/5 s (at most 1 s), so a death is
    named within about timeout + 1 s."""
    stall_timeout: float = 1800.0
    """Seconds a rank may beat without finishing a step or an operation before it is reported as stuck; 0: never."""
    join_timeout: float = 300.0
    """Seconds every rank waits for all the others to join at start-up before naming those missing and stopping."""
    straggler_factor: float = 1.5
    """A rank whose own work per log interval takes this many times the other ranks' mean is named in the log
    (and metrics.jsonl); 0 turns the check off."""


@dataclass
class DataConfig(_Freezable):
    prefix: Optional[str] = "data/stdlib"
    """Path prefix of the preprocessed dataset (PREFIX.bin, PREFIX.idx, PREFIX.tokenizer.json)."""
    seq_len: int = 128
    """Tokens per training sample."""
    split: list = field(default_factory=lambda: [98, 1, 1])
    """Train/validation/test weights of the by-document split."""
    seed: int = 1234
    """Seed of the split and the sample shuffle."""
    blend: Optional[list] = None
    """Several datasets drawn in fixed proportions instead of data.prefix: Megatron's [0.3, data/a, 0.7, data/b],
    or [{prefix: data/a, weight: 0.3}, ...] or [{prefix: data/a, tokens: 2e9}, ...] (weights from token counts);
    every source needs the same tokenizer. Samples are assigned to sources greedily by largest deficit, so after
    n samples each source has its weight times n within one sample."""
    document_mask: bool = False
    """Pretraining data: attention stays within each document of a sample (a block-diagonal causal mask, positions
    restarting at each document, as Llama 3 trains) and the end-of-document token predicts nothing; off: the
    documents of a sample see each other, as GPT-2 and Megatron's default train."""
    pack: bool = False
    """Chat data: pack several conversations into each sample (in order, as many as fit), each attending only to
    itself, positions restarting; off: one conversation per sample, padded."""


@dataclass
class TrainConfig(_Freezable):
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
    time_limit: Optional[float] = None
    """Wall-clock budget of this run in seconds: it stops in time to save a checkpoint, and exits with status 75
    (rerun to resume). None: no budget."""
    time_limit_margin: float = 60.0
    """Seconds kept free at the end of train.time_limit for the last step and the save (at least twice the
    slowest step plus the last save's duration, whichever is more)."""
    on_non_finite: str = "stop"
    """A NaN or infinite loss on any rank: stop (before the optimizer step, the last checkpoint intact), skip
    (every rank drops the step's gradients and takes no optimizer step; counted and logged) or rollback (reload
    the latest checkpoint and skip the data from it up to the bad step, as PaLM did). skip and rollback need the
    native engine."""
    loss_spike_factor: float = 3.0
    """Flag a step whose loss exceeds this multiple of the median of the last train.loss_spike_window steps (in
    the log and metrics.jsonl as loss_spike); 0: never."""
    loss_spike_window: int = 50
    """Steps of the window train.loss_spike_factor compares against (flags start once it is full)."""
    compile: bool = False
    """Compile each Transformer block with torch.compile (in place, so parameter names and checkpoints are
    unchanged), as TorchTitan does; tensor-parallel collectives run eagerly between the compiled regions. Composes
    with tensor and pipeline parallelism, activation checkpointing and ZeRO 0-3 (equal losses to eager, tested).
    The first steps pay the compilation (on a CPU a C++ compiler is needed)."""


@dataclass
class OptimizerConfig(_Freezable):
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
class LRConfig(_Freezable):
    warmup_steps: int = 20
    """Linear warmup from 0 to optimizer.lr."""
    decay: str = "cosine"
    """cosine, linear or constant decay after warmup, down to optimizer.min_lr at train.steps."""


@dataclass
class CheckpointConfig(_Freezable):
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
    on_error: str = "stop"
    """A save that fails (disk full, no permission): stop the run (the previous checkpoint stays the latest), or
    continue training without that checkpoint (each failure is printed and counted)."""
    async_save: bool = True
    """Write checkpoints in the background: the step is blocked only while each rank copies what it owns into
    host memory; writing, hashing and the commit follow on a thread, committed at a later step boundary (at most
    one save in flight; the next waits for it, and says so). Off: the step waits for the whole save. Under
    DeepSpeed the snapshot includes gathering each value over data parallelism; with checkpoint.deepspeed_native
    saves stay synchronous (DeepSpeed's own save is collective)."""
    deepspeed_native: bool = False
    """Under DeepSpeed, also write DeepSpeed's own ZeRO checkpoint at each save, to train.run_dir/deepspeed/
    (tag global_stepN), for DeepSpeed's tools; `megalm convert from-deepspeed` reads it back. Needs pp = 1."""


@dataclass
class LoggingConfig(_Freezable):
    tensorboard: bool = True
    """Write TensorBoard events when tensorboard is installed."""
    plot: bool = True
    """Write loss_curve.png into the run dir at the end."""
    wandb: Optional[str] = None
    """A Weights & Biases project to send the metrics to as well (every metrics.jsonl number; the run is named
    after train.run_dir and a rerun resumes the same W&B run; WANDB_MODE=offline writes locally). None: off."""


@dataclass
class KernelConfig(_Freezable):
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


@dataclass
class LoRAConfig(_Freezable):
    rank: int = 0
    """LoRA (Hu et al. 2021): the rank r of the trainable update B A beside each targeted frozen projection W
    (y = x W^T + alpha/r * x A^T B^T); 0: off (full fine-tuning). Needs checkpoint.load (the base model)."""
    alpha: float = 16.0
    """The update's scale is alpha / rank (PEFT's lora_alpha)."""
    dropout: float = 0.0
    """Dropout on the update's input (PEFT's lora_dropout)."""
    targets: list = field(default_factory=lambda: ["all"])
    """The block projections that get an update: any of wq, wk, wv, wo (attention), w_gate, w_up, w_in, w_out
    (MLP; w_gate/w_up for SwiGLU, w_in for GELU), or [all] for every one the model has."""


SECTIONS = {
    "model": ModelConfig, "parallel": ParallelConfig, "data": DataConfig, "train": TrainConfig,
    "optimizer": OptimizerConfig, "lr": LRConfig, "checkpoint": CheckpointConfig,
    "logging": LoggingConfig, "kernels": KernelConfig, "lora": LoRAConfig,
}



@dataclass
class Config(_Freezable):
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr: LRConfig = field(default_factory=LRConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_explicit", set())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, explicit: bool = True) -> "Config":
        """``explicit``: the values count as given by the user (False for a saved config being reused)."""
        cfg = cls()
        for section, values in (data or {}).items():
            if section not in SECTIONS:
                raise ConfigError(f"unknown config section {section!r}{_suggest(section, SECTIONS)}")
            if not isinstance(values, dict):
                raise ConfigError(f"config section {section!r} must be a mapping of keys to values, got "
                                  f"{values!r}")
            for key, value in values.items():
                cfg.set(f"{section}.{key}", value, explicit=explicit)
        return cfg

    def set(self, dotted: str, value: Any, explicit: bool = True) -> None:
        """Set ``section.key`` to ``value`` (a string from the command line is parsed as YAML, then typed)."""
        section, _, key = dotted.partition(".")
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r} in {dotted!r}{_suggest(section, SECTIONS)}")
        obj = getattr(self, section)
        names = {f.name for f in fields(obj)}
        if key not in names:
            raise ConfigError(f"unknown config key {dotted!r}{_suggest(key, names, section + '.')}")
        hint = _type_hints(type(obj))[key]
        setattr(obj, key, _coerce(dotted, value, hint))
        if explicit:
            self._explicit.add(dotted)

    def is_set(self, dotted: str) -> bool:
        """Whether the user gave ``section.key`` (in the YAML file or an override), whatever its value."""
        return dotted in self._explicit

    @property
    def explicit_keys(self) -> frozenset:
        return frozenset(self._explicit)

    def freeze(self) -> "Config":
        """Make this config and its sections read-only (lists become tuples); returns self."""
        for f in fields(self):
            section = getattr(self, f.name)
            for sf in fields(section):
                value = getattr(section, sf.name)
                if isinstance(value, list):
                    object.__setattr__(section, sf.name, tuple(value))
            object.__setattr__(section, "_frozen", True)
        object.__setattr__(self, "_explicit", frozenset(self._explicit))
        object.__setattr__(self, "_frozen", True)
        return self

    @property
    def frozen(self) -> bool:
        return self._frozen

    def mutable_copy(self) -> "Config":
        """An unfrozen copy with the same values and the same record of explicitly set keys."""
        copy = Config()
        for f in fields(self):
            section, target = getattr(self, f.name), getattr(copy, f.name)
            for sf in fields(section):
                value = getattr(section, sf.name)
                setattr(target, sf.name, list(value) if isinstance(value, tuple) else value)
        copy._explicit.update(self._explicit)
        return copy

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


@functools.lru_cache(maxsize=None)
def _type_hints(section_class: type) -> dict:
    """A section's field types, resolved once (get_type_hints re-evaluates every annotation on each call)."""
    return get_type_hints(section_class)


def _suggest(word: str, candidates, prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    return f"; did you mean {prefix + close[0]!r}?" if close else f"; valid: {', '.join(sorted(candidates))}"


def _coerce(dotted: str, value: Any, hint) -> Any:
    if isinstance(value, str) and hint is not str:
        try:
            value = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError:
            raise ConfigError(f"{dotted}={value!r} cannot be read as a value; quote it or fix its syntax") from None
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
    if base is list and isinstance(value, tuple):
        value = list(value)
    if base is list and not isinstance(value, list):
        raise ConfigError(f"{dotted}={value!r} must be a list, e.g. [1, 2]")
    return value
