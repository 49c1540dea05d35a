"""Hugging Face interop: config and tensor-name mapping for Llama/Mistral-style models and GPT-2.

Tensors stream one at a time in both directions. GPT-2 stores Conv1D weights transposed and q/k/v fused in
``c_attn``: those are transposed and split (or concatenated) here. Llama's rotary convention ("rotate half")
is megalm's own, so its projections map without permutation.
"""
from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch

from megalm.config import ModelConfig

LLAMA_LIKE = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
GPT2 = "GPT2LMHeadModel"

_LLAMA_LAYER = {
    "attn.wq.weight": "self_attn.q_proj.weight", "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight", "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp.w_gate.weight": "mlp.gate_proj.weight", "mlp.w_up.weight": "mlp.up_proj.weight",
    "mlp.w_out.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
    "attn.wq.bias": "self_attn.q_proj.bias", "attn.wk.bias": "self_attn.k_proj.bias",
    "attn.wv.bias": "self_attn.v_proj.bias",                     # Qwen2
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
             "norm.weight": "transformer.ln_f.weight", "norm.bias": "transformer.ln_f.bias"}
_QKV = ("attn.wq", "attn.wk", "attn.wv")


class HFFormatError(ValueError):
    """A Hugging Face checkpoint megalm cannot map; the message names the field."""


def architecture_of(hf_config: dict) -> str:
    arch = (hf_config.get("architectures") or [hf_config.get("model_type", "?")])[0]
    if arch in LLAMA_LIKE or arch == GPT2:
        return arch
    raise HFFormatError(f"Hugging Face architecture {arch!r} is not supported; megalm converts "
                        f"{', '.join(LLAMA_LIKE + (GPT2,))}")


def model_config_from_hf(hf: dict) -> ModelConfig:
    arch = architecture_of(hf)
    if arch == GPT2:
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise HFFormatError(f"GPT-2 activation_function={hf['activation_function']!r}; megalm uses gelu_new")
        return ModelConfig(vocab_size=hf["vocab_size"], hidden_size=hf["n_embd"], num_layers=hf["n_layer"],
                           num_heads=hf["n_head"], ffn_hidden_size=hf.get("n_inner") or 4 * hf["n_embd"],
                           max_seq_len=hf["n_positions"], norm="layernorm", norm_eps=hf["layer_norm_epsilon"],
                           activation="gelu", position="learned", tie_embeddings=True, bias=True, dropout=0.0)
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise HFFormatError("attention_bias/mlp_bias=true is not supported for Llama-style models")
    if hf.get("use_sliding_window") or (arch == "MistralForCausalLM" and hf.get("sliding_window")
                                        and hf["sliding_window"] < hf["max_position_embeddings"]):
        raise HFFormatError(f"sliding-window attention (sliding_window={hf.get('sliding_window')}) is not "
                            f"supported; megalm attends over the whole sequence")
    if (hf.get("rope_scaling") or {}).get("rope_type", "default") not in ("default", None):
        raise HFFormatError(f"rope_scaling={hf['rope_scaling']} is not supported; megalm implements plain RoPE")
    theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return ModelConfig(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                       num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
                       num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                       ffn_hidden_size=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
                       norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), activation="swiglu", position="rope",
                       rope_theta=float(theta), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                       bias=False, qkv_bias=arch == "Qwen2ForCausalLM", dropout=0.0)


def hf_config_from_model(m: ModelConfig) -> dict:
    """A config.json for transformers; GPT-2 for the GPT-2 family, Llama for everything RMSNorm/SwiGLU/RoPE."""
    if m.norm == "layernorm" and m.activation == "gelu" and m.position == "learned" and m.bias:
        return {"architectures": [GPT2], "model_type": "gpt2", "vocab_size": m.vocab_size, "n_embd": m.hidden_size,
                "n_layer": m.num_layers, "n_head": m.num_heads, "n_inner": m.ffn_size, "n_positions": m.max_seq_len,
                "layer_norm_epsilon": m.norm_eps, "activation_function": "gelu_new", "resid_pdrop": 0.0,
                "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": True}
    if not (m.norm == "rmsnorm" and m.activation == "swiglu" and m.position == "rope" and not m.bias):
        raise HFFormatError("only GPT-2-style (layernorm, gelu, learned, bias) and Llama-style (rmsnorm, swiglu, "
                            "rope, no bias) models have a Hugging Face equivalent")
    arch, kind = ("Qwen2ForCausalLM", "qwen2") if m.qkv_bias else ("LlamaForCausalLM", "llama")
    return {"architectures": [arch], "model_type": kind, "vocab_size": m.vocab_size,
            "hidden_size": m.hidden_size, "intermediate_size": m.ffn_size, "num_hidden_layers": m.num_layers,
            "num_attention_heads": m.num_heads, "num_key_value_heads": m.kv_heads, "head_dim": m.head_dim,
            "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
            "tie_word_embeddings": m.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
            "mlp_bias": False, "torch_dtype": "float32"}


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
            yield _GPT2_TOP["pos_embed" if name == "pos_embed" else name], t
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
            continue                                    # tied to wte
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
