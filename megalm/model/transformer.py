"""One decoder-only Transformer family: GPT-2 style and Llama style, chosen by ``ModelConfig``.

The model is built from megalm's tensor-parallel layers and holds no process group of its own: it receives a
``TensorParallel`` handle (group, size, rank, sequence-parallel flag) and an ``Ops`` kernel choice. At tp = 1
every communication is a no-op, so this file is also the single-process model.

Pipeline parallelism cuts the model into chunks: a ``ModelChunk`` holds the layers ``layer_ids`` (global indices,
so parameter names are the same in every layout), the embedding when it is the first chunk and the final norm,
head and loss when it is the last. Shapes: activations are (B, T, H) batch-first; under sequence parallelism the
residual stream between blocks is (B, T/tp, H).
"""
from __future__ import annotations

import math
import zlib
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megalm.config import ModelConfig
from megalm.model.documents import Documents, document_positions
from megalm.model.lora import lora_update
from megalm.model.ops import Ops, reference_ops, torch_rope
from megalm.parallel.tensor.cross_entropy import vocab_parallel_cross_entropy
from megalm.parallel.tensor.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    ShardSpec,
    VocabParallelEmbedding,
)
from megalm.parallel.tensor.mappings import (
    copy_to_tp,
    gather_from_sequence,
    gather_from_tp_last_dim,
    reduce_grad_over_tp,
)
from megalm.parallel.tensor.random import tp_rng
from megalm.parallel.topology import TensorParallel

REPLICATED = ShardSpec(dim=None, parts=1, index=0)


def enter_tp(x, tp: TensorParallel, kind=None):
    """Into a tensor-parallel region: Megatron's f, or the sequence all-gather under sequence parallelism."""
    return gather_from_sequence(x, tp, kind=kind) if tp.sequence_parallel else copy_to_tp(x, tp, kind=kind)


def sharded_dropout(x, p: float, training: bool, tp: TensorParallel, sharded: bool):
    """Dropout with a per-TP-rank stream on sharded activations (each rank must draw its own mask) and the
    shared stream on replicated ones (every rank must draw the same)."""
    if p == 0.0 or not training:
        return x
    if sharded and tp.size > 1:
        with tp_rng(0, tp, x.device):
            return F.dropout(x, p, True)
    return F.dropout(x, p, True)


def project(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x W^T + b of a column-parallel projection, plus its LoRA update when it has one."""
    y = F.linear(x, layer.weight, layer.bias)
    update = lora_update(layer, x)
    return y if update is None else y + update


def replicated(tensor: torch.Tensor) -> nn.Parameter:
    param = nn.Parameter(tensor)
    param.shard = REPLICATED
    return param


class Norm(nn.Module):
    """LayerNorm or RMSNorm, replicated on every TP rank (statistics in fp32)."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, ops: Ops):
        super().__init__()
        self.kind, self.eps, self.tp, self.ops = cfg.norm, cfg.norm_eps, tp, ops
        self.weight = replicated(torch.ones(cfg.hidden_size))
        use_bias = cfg.bias and cfg.norm == "layernorm"
        self.bias = replicated(torch.zeros(cfg.hidden_size)) if use_bias else None

    def forward(self, x):
        w, b = self.weight, self.bias
        if self.tp.sequence_parallel:
            # Each rank sees only its sequence slice, so its weight gradient is partial: sum it over TP.
            w = reduce_grad_over_tp(w, self.tp)
            b = reduce_grad_over_tp(b, self.tp) if b is not None else None
        return self.ops.norm(self.kind, x, w, b, self.eps)


class HeadNorm(nn.Module):
    """RMSNorm over the last dim of (B, T, heads, head_dim), one weight shared by all heads (Qwen3's q/k norm).
    Each TP rank normalises its own heads, so the weight's gradient is partial there and summed over TP."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, ops: Ops):
        super().__init__()
        self.eps, self.tp, self.ops = cfg.norm_eps, tp, ops
        self.weight = replicated(torch.ones(cfg.dim_per_head))

    def forward(self, x):
        return self.ops.norm("rmsnorm", x, reduce_grad_over_tp(self.weight, self.tp), None, self.eps)


def rope_frequencies(cfg: ModelConfig, device=None) -> torch.Tensor:
    """The D/2 rotation frequencies theta^(-2i/D); under llama3 scaling (Llama 3.1, section "context length" of
    its report), wavelengths 2 pi / f longer than L / low_freq_factor (L: the original context) are stretched by
    ``factor``, those shorter than L / high_freq_factor are kept, and the band between is interpolated linearly
    in L / wavelength."""
    d = cfg.dim_per_head
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    if cfg.rope_scaling == "none":
        return freqs
    old, factor = cfg.rope_original_max_seq_len, cfg.rope_factor
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / freqs
    stretched = torch.where(wavelen > old / low, freqs / factor, freqs)
    smooth = (old / wavelen - low) / (high - low)                    # 0 at the long end of the band, 1 at the short
    between = (1 - smooth) * stretched / factor + smooth * stretched
    in_band = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(in_band, between, stretched)


def rope_tables(positions: torch.Tensor, freqs: torch.Tensor):
    """cos, sin of shape (T, head_dim) in the Hugging Face Llama ("rotate half") convention; for positions of
    shape (B, T) (packed documents, each restarting at 0), (B, 1, T, head_dim)."""
    angles = positions.float()[..., None] * freqs                # (..., T, D/2)
    angles = torch.cat([angles, angles], dim=-1)                # (..., T, D)
    if positions.dim() == 2:
        angles = angles[:, None]
    return angles.cos(), angles.sin()


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads split over the TP group.

    Query heads are split evenly. K/V heads are split too when there are at least tp of them; with fewer, the
    K/V projections are replicated and each rank uses the one K/V head its query heads belong to (its weight
    gradient is partial and summed over TP).
    """

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, ops: Ops):
        super().__init__()
        self.cfg, self.tp, self.ops = cfg, tp, ops
        h, hd = cfg.hidden_size, cfg.dim_per_head
        self.local_heads = cfg.num_heads // tp.size
        self.kv_split = cfg.kv_heads >= tp.size
        self.local_kv = cfg.kv_heads // tp.size if self.kv_split else 1
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.wq = ColumnParallelLinear(h, cfg.num_heads * hd, tp, bias=qkv_bias)
        if self.kv_split:
            self.wk = ColumnParallelLinear(h, cfg.kv_heads * hd, tp, bias=qkv_bias)
            self.wv = ColumnParallelLinear(h, cfg.kv_heads * hd, tp, bias=qkv_bias)
        else:
            self.wk = _ReplicatedLinear(h, cfg.kv_heads * hd, qkv_bias)
            self.wv = _ReplicatedLinear(h, cfg.kv_heads * hd, qkv_bias)
            self.kv_index = tp.rank * cfg.kv_heads // tp.size
        self.wo = RowParallelLinear(cfg.num_heads * hd, h, tp, bias=cfg.bias)
        if cfg.qk_norm:        # one weight per layer over each head's dim, replicated; its gradient summed over TP
            self.q_norm = HeadNorm(cfg, tp, ops)
            self.k_norm = HeadNorm(cfg, tp, ops)

    def _kv(self, layer, x):
        if self.kv_split:
            return project(layer, x)
        hd, j = self.cfg.dim_per_head, self.kv_index
        w = reduce_grad_over_tp(layer.weight, self.tp)[j * hd:(j + 1) * hd]
        b = reduce_grad_over_tp(layer.bias, self.tp)[j * hd:(j + 1) * hd] if layer.bias is not None else None
        y = F.linear(x, w, b)
        update = lora_update(layer, x, slice(j * hd, (j + 1) * hd))
        return y if update is None else y + update

    def core(self, q, k, v, mask=None):
        drop = self.cfg.dropout if self.training else 0.0
        if drop and self.tp.size > 1:
            with tp_rng(0, self.tp, q.device):      # my heads' probabilities: a mask of their own
                return self.ops.attention(q, k, v, causal=True, dropout_p=drop, mask=mask)
        return self.ops.attention(q, k, v, causal=True, dropout_p=drop, mask=mask)

    def forward(self, x, rope=None, cache: Optional[dict] = None, selective_checkpoint: bool = False, mask=None):
        x = enter_tp(x, self.tp)                                   # (B, T, H) on every TP rank
        B, T, _ = x.shape
        hd = self.cfg.dim_per_head
        q = project(self.wq, x).view(B, T, self.local_heads, hd)
        k = self._kv(self.wk, x).view(B, T, self.local_kv, hd)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)                 # (B, heads, T, hd), (B, kv, T, hd)
        v = self._kv(self.wv, x).view(B, T, self.local_kv, hd).transpose(1, 2)
        if rope is not None:
            rotate = self.ops.rope if rope[0].dim() == 2 else torch_rope     # per-document positions: reference
            q, k = rotate(q, *rope), rotate(k, *rope)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        if selective_checkpoint and torch.is_grad_enabled():
            y = checkpoint(self.core, q, k, v, mask, use_reentrant=False)
        else:
            y = self.core(q, k, v, mask)                           # (B, heads/tp, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.local_heads * hd)
        return self.wo(y)


class _ReplicatedLinear(nn.Module):
    """A full linear layer kept on every TP rank (K/V projections when kv heads < tp)."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = replicated(torch.empty(out_features, in_features))
        self.bias = replicated(torch.zeros(out_features)) if bias else None


class MLP(nn.Module):
    """GELU MLP (w_in, w_out) or SwiGLU (w_gate, w_up, w_out): column-parallel in, row-parallel out."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, ops: Ops):
        super().__init__()
        self.tp, self.swiglu, self.ops = tp, cfg.activation == "swiglu", ops
        h, f = cfg.hidden_size, cfg.ffn_size
        if self.swiglu:
            self.w_gate = ColumnParallelLinear(h, f, tp, bias=cfg.bias)
            self.w_up = ColumnParallelLinear(h, f, tp, bias=cfg.bias)
        else:
            self.w_in = ColumnParallelLinear(h, f, tp, bias=cfg.bias)
        self.w_out = RowParallelLinear(f, h, tp, bias=cfg.bias)

    def forward(self, x):
        x = enter_tp(x, self.tp)
        if self.swiglu:
            hidden = self.ops.swiglu(project(self.w_gate, x), project(self.w_up, x))
        else:
            hidden = F.gelu(project(self.w_in, x), approximate="tanh")
        return self.w_out(hidden)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel, ops: Ops, checkpointing: str = "none"):
        super().__init__()
        self.attn_norm, self.attn = Norm(cfg, tp, ops), Attention(cfg, tp, ops)
        self.mlp_norm, self.mlp = Norm(cfg, tp, ops), MLP(cfg, tp, ops)
        self.dropout, self.checkpointing, self.tp = cfg.dropout, checkpointing, tp

    def _drop(self, x):
        return sharded_dropout(x, self.dropout, self.training, self.tp, self.tp.sequence_parallel)

    def _body(self, x, rope, cache, mask=None):
        selective = self.checkpointing == "selective"
        x = x + self._drop(self.attn(self.attn_norm(x), rope, cache, selective, mask))
        return x + self._drop(self.mlp(self.mlp_norm(x)))

    def forward(self, x, rope=None, cache=None, mask=None):
        if self.checkpointing == "full" and torch.is_grad_enabled() and cache is None:
            return checkpoint(self._body, x, rope, None, mask, use_reentrant=False)
        return self._body(x, rope, cache, mask)


class ModelChunk(nn.Module):
    """The part of the model one pipeline (virtual) stage holds."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, layer_ids, first: bool, last: bool,
                 ops: Optional[Ops] = None, checkpointing: str = "none"):
        super().__init__()
        ops = ops or reference_ops()
        self.cfg, self.tp, self.first, self.last, self.ops = cfg, tp, first, last, ops
        self.layer_ids = list(layer_ids)
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size must be resolved (from the tokenizer) before building the model")
        tied_head = last and cfg.tie_embeddings
        if first or tied_head:
            self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        if first and cfg.position == "learned":
            self.pos_embed = replicated(torch.empty(cfg.max_seq_len, cfg.hidden_size))
        self.layers = nn.ModuleDict({str(i): Block(cfg, tp, ops, checkpointing) for i in self.layer_ids})
        if last:
            self.norm = Norm(cfg, tp, ops)
            if not cfg.tie_embeddings:
                self.head = ColumnParallelLinear(cfg.hidden_size, cfg.vocab_size, tp, bias=False)

    def embed_tokens(self, tokens, start_pos: int, positions=None):
        h = self.embed(tokens)                                     # (B, T, H), or (B, T/tp, H) under SP
        if self.cfg.position == "learned":
            T = h.shape[1]
            offset = start_pos + (self.tp.rank * T if self.tp.sequence_parallel else 0)
            pos = self.pos_embed
            if self.tp.sequence_parallel:
                pos = reduce_grad_over_tp(pos, self.tp)            # each rank uses only its slice of positions
            h = h + (pos[offset:offset + T] if positions is None else pos[positions[:, offset:offset + T]])
        return sharded_dropout(h, self.cfg.dropout, self.training, self.tp, self.tp.sequence_parallel)

    def rope(self, seq_len: int, start_pos: int, device, positions=None):
        if self.cfg.position != "rope":
            return None
        if positions is None:
            positions = torch.arange(start_pos, start_pos + seq_len, device=device)
        return rope_tables(positions, rope_frequencies(self.cfg, device))

    @property
    def head_weight(self):
        """The LM head's (vocabulary-parallel) weight: the embedding's when tied."""
        return self.embed.weight if self.cfg.tie_embeddings else self.head.weight

    def head_logits(self, h):
        """Vocabulary-parallel logits (B, T, V/tp) of the final hidden states."""
        return F.linear(enter_tp(self.norm(h), self.tp, kind="lm_head"), self.head_weight)

    def forward(self, x, targets=None, cache: Optional[dict] = None, start_pos: int = 0, segments=None):
        """First chunk: x is tokens (B, T). Others: hidden states. Last chunk returns the mean loss when
        targets are given, else vocabulary-parallel logits; other chunks return hidden states. ``segments``
        (B, T), the document of each position of a packed sequence: attention stays within a document and
        positions restart at each (every chunk gets them)."""
        if segments is not None and (cache is not None or start_pos):
            raise ValueError("packed documents (segments) are for training and scoring, not KV-cached decoding")
        positions = document_positions(segments) if segments is not None else None
        mask = Documents(segments) if segments is not None else None
        h = self.embed_tokens(x, start_pos, positions) if self.first else x
        # The full sequence length: tokens on the first chunk, sequence shards elsewhere under SP.
        seq_len = x.shape[1] * (self.tp.size if self.tp.sequence_parallel and not self.first else 1)
        rope = self.rope(seq_len, start_pos, h.device, positions)
        for i, layer in self.layers.items():
            h = layer(h, rope, None if cache is None else cache.setdefault(int(i), {}), mask)
        if not self.last:
            return h
        if targets is not None and self.tp.size == 1:          # fused (never the full logits) or the reference
            return self.ops.linear_cross_entropy(self.norm(h), self.head_weight, targets)
        logits = self.head_logits(h)
        if targets is None:
            return logits
        losses = vocab_parallel_cross_entropy(logits.float(), targets, self.tp)     # 0 where a target is ignored
        return losses.sum() / (targets != IGNORE_INDEX).sum().clamp(min=1)


IGNORE_INDEX = -100
"""A target the loss skips (a prompt token of a chat example, or padding): ``megalm.data.chat_dataset.IGNORE``."""


def full_logits(logits_local, tp: TensorParallel):
    """Gather vocabulary-parallel logits into (…, V) on every TP rank (evaluation of samples, generation)."""
    return gather_from_tp_last_dim(logits_local, tp)


# ---- Initialisation: every tensor from its own seeded generator, by global name, then sliced ---------------

def _name_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)


def master_init(name: str, shape, cfg: ModelConfig, seed: int) -> torch.Tensor:
    """The full (tp = 1) value of parameter ``name``: independent of layout, pipeline stage and rank."""
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith(".lora.b"):
        return torch.zeros(shape)                                     # LoRA: the model starts as its base
    if name.endswith(".lora.a"):                                      # PEFT's kaiming-uniform bound 1/sqrt(in)
        gen = torch.Generator().manual_seed(_name_seed(seed, name))
        return (torch.rand(shape, generator=gen) * 2 - 1) / math.sqrt(shape[1])
    if "norm" in name:
        return torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
    if leaf == "bias":
        return torch.zeros(shape)
    std = cfg.init_std
    if name.endswith(("attn.wo.weight", "mlp.w_out.weight")):
        std = cfg.init_std / math.sqrt(2 * cfg.num_layers)          # scaled residual init (GPT-2)
    gen = torch.Generator().manual_seed(_name_seed(seed, name))
    return torch.randn(shape, generator=gen) * std


@torch.no_grad()
def init_chunk(chunk: nn.Module, cfg: ModelConfig, seed: int) -> None:
    """Fill every parameter with its slice of the layout-free master value."""
    for name, param in chunk.named_parameters():
        spec = param.shard
        master = master_init(name, spec.global_shape(tuple(param.shape)), cfg, seed)
        param.copy_(spec.take(master))
