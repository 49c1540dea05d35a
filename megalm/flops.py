"""FLOPs per token, counted exactly for megalm's model (GQA, SwiGLU, LM head), for TFLOP/s and MFU.

A matmul of (m x k) by (k x n) costs 2mkn and training is forward + backward = 3 x forward. Two conventions for
the attention core disagree, and published MFU figures use both, so megalm reports both and names them:

- ``model`` (PaLM, TorchTitan): the full s x s score matrix, 6N + 12 L h s per token for a plain GPT, as
  FlopCounterMode counts a causal SDPA call;
- ``model_causal`` (Megatron-LM since 2023): only the lower triangle a causal kernel computes, half of it.

Hardware FLOPs (PaLM convention) add what activation recomputation runs again: a whole forward (full) or the
attention core (selective).
"""
from __future__ import annotations

from dataclasses import dataclass

from megalm.config import ModelConfig


def matmul_params(m: ModelConfig) -> dict[str, int]:
    """Weights that take part in matrix multiplies, by part (the embedding lookup is not one)."""
    h, hd = m.hidden_size, m.dim_per_head
    attention = h * m.num_heads * hd + 2 * h * m.kv_heads * hd + m.num_heads * hd * h
    mlp = (3 if m.activation == "swiglu" else 2) * h * m.ffn_size
    return {"attention": m.num_layers * attention, "mlp": m.num_layers * mlp, "lm_head": h * m.vocab_size}


@dataclass(frozen=True)
class FlopsPerToken:
    forward: float
    model: float          # forward + backward, no recomputation; attention's score matrix counted in full
    hardware: float       # what actually runs, recomputation included (same attention convention as ``model``)
    model_causal: float   # as ``model``, with the attention core halved (causal: only the lower triangle)


def flops_per_token(m: ModelConfig, seq_len: int, recompute: str = "none",
                    attention_span: float | None = None) -> FlopsPerToken:
    """``attention_span``: the keys a token attends to on average, when not ``seq_len``: for packed documents,
    sum(L_i^2) / T over the documents of lengths L_i in T tokens (``attention_span_of``)."""
    n = sum(matmul_params(m).values())
    span = seq_len if attention_span is None else attention_span
    attention_core = 2 * 2 * span * m.num_heads * m.dim_per_head * m.num_layers   # QK^T and PV
    forward = 2 * n + attention_core
    model = 3 * forward
    extra = {"none": 0, "full": forward - 2 * matmul_params(m)["lm_head"], "selective": attention_core}[recompute]
    return FlopsPerToken(forward, model, model + extra, model - 3 * attention_core / 2)


def document_squares(segments) -> int:
    """sum(L_i^2) over the documents of a (B, T) tensor of document ids, each attending only to itself (id 0,
    padding, is no document: its positions cost matmuls but no useful attention)."""
    import torch

    total = 0
    for row in segments:
        ids, counts = torch.unique_consecutive(row, return_counts=True)
        total += int((counts[ids != 0].long() ** 2).sum())
    return total


def attention_span_of(segments) -> float:
    """sum(L_i^2) / T: the keys a token of these packed documents attends to on average."""
    return document_squares(segments) / max(segments.numel(), 1)


def mfu(tokens_per_s: float, per_token: FlopsPerToken, peak_flops: float, causal: bool = False) -> float:
    """Model FLOPs utilisation; ``causal`` picks Megatron's convention (attention halved), else PaLM's."""
    return tokens_per_s * (per_token.model_causal if causal else per_token.model) / peak_flops
