"""Hugging Face interop: config and tensor-name mapping for Llama/Mistral-style models and GPT-2.

Tensors stream one at a time in both directions. GPT-2 stores Conv1D weights transposed and q/k/v fused in
``c_attn``: those are transposed and split (or concatenated) here. Llama's rotary convention ("rotate half")
is megalm's own, so its projections map without permutation.
"""
from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch

from megalm.checkpoint.hf_config import HFFormatError, hf_config_from_model, model_config_from_hf
from megalm.config import ModelConfig

__all__ = ["HFFormatError", "from_hf", "hf_config_from_model", "model_config_from_hf", "to_hf"]

_LLAMA_LAYER = {
    "attn.wq.weight": "self_attn.q_proj.weight", "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight", "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp.w_gate.weight": "mlp.gate_proj.weight", "mlp.w_up.weight": "mlp.up_proj.weight",
    "mlp.w_out.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
    "attn.wq.bias": "self_attn.q_proj.bias", "attn.wk.bias": "self_attn.k_proj.bias",
    "attn.wv.bias": "self_attn.v_proj.bias",                     # Qwen2
    "attn.q_norm.weight": "self_attn.q_norm.weight", "attn.k_norm.weight": "self_attn.k_norm.weight",   # Qwen3
}
_LLAMA_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "head.weight": "lm_head.weight"}
_GPT2_LAYER = {  # megalm name -> (hf name, transpose)
    "attn.wo.weight": ("attn.c_proj.weight", True), "attn.wo.bias": ("attn.c_proj.bias", False),
    "mlp.w_in.weight": ("mlp.c_fc.weight", True), "mlp.w_in.bias": ("mlp.c_fc.bias", False),
    "mlp.w_out.weight": ("mlp.c_proj.weight", True), "mlp.w_out.bias": ("mlp.c_proj.bias", False),
    "attn_norm.weight": ("ln_1.weight", False), "attn_norm.bias": ("ln_1.bias", False),
    "mlp_norm.weight": ("ln_2.weight", False), "mlp_norm.bias": ("ln_2.bias", False),
}
_GPT2_TOP = {"embed.weight": "transformer.wte.weight", "pos_embed": "transformer.wpe.weight",
             "norm.weight": "transformer.ln_f.weight", "norm.bias": "transformer.ln_f.bias",
             "head.weight": "lm_head.weight"}                    # an untied head only
_QKV = ("attn.wq", "attn.wk", "attn.wv")


def _split_layer(name: str):
    m = re.match(r"layers\.(\d+)\.(.+)$", name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def to_hf(tensors: Iterable[tuple[str, torch.Tensor]], m: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """megalm (name, full tensor) pairs -> Hugging Face pairs. GPT-2's q/k/v are held until all three came."""
    gpt2 = hf_config_from_model(m)["model_type"] == "gpt2"
    pending: dict = {}
    for name, t in tensors:
        layer, rest = _split_layer(name)
        if not gpt2:
            if layer is None:
                if name == "head.weight" and m.tie_embeddings:
                    continue
                yield _LLAMA_TOP[name], t
            else:
                yield f"model.layers.{layer}.{_LLAMA_LAYER[rest]}", t
            continue
        if layer is None:
            yield _GPT2_TOP[name], t
        elif rest.startswith(_QKV):
            pending.setdefault((layer, rest.rsplit(".", 1)[1]), {})[rest.split(".")[1]] = t
            parts = pending[(layer, rest.rsplit(".", 1)[1])]
            if len(parts) == 3:
                kind = rest.rsplit(".", 1)[1]
                fused = torch.cat([parts["wq"], parts["wk"], parts["wv"]], dim=0)
                yield f"transformer.h.{layer}.attn.c_attn.{kind}", fused.t().contiguous() if kind == "weight" else fused
                del pending[(layer, kind)]
        else:
            hf_name, transpose = _GPT2_LAYER[rest]
            yield f"transformer.h.{layer}.{hf_name}", t.t().contiguous() if transpose else t


def from_hf(tensors: Iterable[tuple[str, torch.Tensor]], m: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Hugging Face (name, tensor) pairs -> megalm pairs (full tensors)."""
    gpt2 = hf_config_from_model(m)["model_type"] == "gpt2"
    llama_top = {v: k for k, v in _LLAMA_TOP.items()}
    llama_layer = {v: k for k, v in _LLAMA_LAYER.items()}
    gpt2_top = {v: k for k, v in _GPT2_TOP.items()}
    gpt2_layer = {v[0]: (k, v[1]) for k, v in _GPT2_LAYER.items()}
    for name, t in tensors:
        if name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
            continue                                    # buffers, not weights
        if not gpt2:
            if name in llama_top:
                if name == "lm_head.weight" and m.tie_embeddings:
                    continue
                yield llama_top[name], t
                continue
            mm = re.match(r"model\.layers\.(\d+)\.(.+)$", name)
            if not mm or mm.group(2) not in llama_layer:
                raise HFFormatError(f"unexpected tensor {name!r} in a Llama-style checkpoint")
            yield f"layers.{mm.group(1)}.{llama_layer[mm.group(2)]}", t
            continue
        name = name[len("transformer."):] if name.startswith("transformer.") else name
        if "transformer." + name in gpt2_top:
            yield gpt2_top["transformer." + name], t
            continue
        if name == "lm_head.weight":
            if not m.tie_embeddings:
                yield "head.weight", t
            continue                                    # else tied to wte: the same tensor
        mm = re.match(r"h\.(\d+)\.(.+)$", name)
        if not mm:
            raise HFFormatError(f"unexpected tensor {name!r} in a GPT-2 checkpoint")
        layer, rest = mm.group(1), mm.group(2)
        if rest.startswith("attn.c_attn."):
            kind = rest.rsplit(".", 1)[1]
            fused = t.t() if kind == "weight" else t
            for part, chunk in zip(_QKV, fused.split(m.hidden_size, dim=0)):
                yield f"layers.{layer}.{part}.{kind}", chunk.contiguous()
            continue
        megalm_name, transpose = gpt2_layer[rest]
        yield f"layers.{layer}.{megalm_name}", t.t().contiguous() if transpose else t
