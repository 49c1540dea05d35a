"""Hugging Face ``config.json`` <-> megalm's ``ModelConfig``, by a table that classifies every key.

For each supported architecture every key of a config is one of:
- mapped: read into ModelConfig exactly (and written back by ``to_hf``);
- fixed: accepted only at the value(s) megalm implements (e.g. ``hidden_act: silu``); any other value is refused;
- inert: known to change neither the weights nor the logits (dropout rates, token ids, bookkeeping), listed with
  the reason.
Any other key is refused, before anything is written, with one line naming the key, its value and what megalm
supports. ``to_hf`` writes only mapped and fixed keys and reads its own output back through the same table,
so an export can never say something megalm's model does not compute.
"""
from __future__ import annotations

import dataclasses

from megalm.config import ModelConfig

LLAMA, MISTRAL, QWEN2, QWEN3, GPT2 = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                      "Qwen3ForCausalLM", "GPT2LMHeadModel")
MODEL_TYPES = {LLAMA: "llama", MISTRAL: "mistral", QWEN2: "qwen2", QWEN3: "qwen3", GPT2: "gpt2"}


class HFFormatError(ValueError):
    """A Hugging Face config or checkpoint megalm cannot represent exactly; the message names the key."""


# Keys every architecture may carry that change neither weights nor logits, with the reason.
INERT_COMMON = {
    "_name_or_path": "where the model was loaded from", "architectures": "checked on its own",
    "model_type": "checked on its own", "transformers_version": "bookkeeping", "dtype": "storage dtype only",
    "torch_dtype": "storage dtype only", "use_cache": "inference caching", "output_attentions": "extra outputs",
    "output_hidden_states": "extra outputs", "return_dict": "output container", "id2label": "classifier labels",
    "label2id": "classifier labels", "problem_type": "classifier loss", "num_labels": "classifier labels",
    "initializer_range": "only for fresh weights", "chunk_size_feed_forward": "the same MLP, computed in chunks",
    "bos_token_id": "tokenizer metadata (kept with the tokenizer)", "eos_token_id": "tokenizer metadata",
    "pad_token_id": "tokenizer metadata", "sep_token_id": "tokenizer metadata",
    "decoder_start_token_id": "encoder-decoder generation only", "tokenizer_class": "tokenizer metadata",
    "torchscript": "export flag", "pruned_heads": "must be empty (checked)", "tie_encoder_decoder": "encoders only",
    "task_specific_params": "pipeline defaults", "finetuning_task": "bookkeeping", "prefix": "generation prompt",
    "max_length": "generation default", "min_length": "generation default", "do_sample": "generation default",
    "early_stopping": "generation default", "num_beams": "generation default", "temperature": "generation default",
    "top_k": "generation default", "top_p": "generation default", "repetition_penalty": "generation default",
    "length_penalty": "generation default", "no_repeat_ngram_size": "generation default",
    "num_return_sequences": "generation default", "bad_words_ids": "generation default",
    "cross_attention_hidden_size": "encoder-decoder only (add_cross_attention is checked)",
}
# Accepted only at these values (a value not listed is refused).
FIXED_COMMON = {"is_encoder_decoder": (False,), "add_cross_attention": (False,), "is_decoder": (False, True)}

LLAMA_MAPPED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                "rope_theta", "rope_scaling", "rope_parameters")
LLAMA_INERT = {"attention_dropout": "dropout: training only (megalm's model.dropout)"}
LLAMA_FIXED = {"hidden_act": ("silu",), "mlp_bias": (False,), "pretraining_tp": (1,)}
GPT2_MAPPED = ("vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "n_positions", "n_ctx", "layer_norm_epsilon",
               "tie_word_embeddings")
GPT2_INERT = {
    "attn_pdrop": "dropout: training only", "embd_pdrop": "dropout: training only",
    "resid_pdrop": "dropout: training only",
    "reorder_and_upcast_attn": "the same scores, computed in fp32 (matters for fp16 rounding only)",
    **{k: "the sequence-summary head of double-heads models; the LM head does not use it" for k in (
        "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels", "summary_first_dropout")},
}
GPT2_FIXED = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "scale_attn_weights": (True,),
              "scale_attn_by_inverse_layer_idx": (False,)}
ARCH_KEYS = {   # architecture -> (mapped, fixed, inert) beyond the common ones
    LLAMA: (LLAMA_MAPPED, {**LLAMA_FIXED, "attention_bias": (False,)}, LLAMA_INERT),
    MISTRAL: (LLAMA_MAPPED + ("sliding_window",), LLAMA_FIXED, LLAMA_INERT),
    QWEN2: (LLAMA_MAPPED + ("sliding_window", "use_sliding_window", "layer_types", "max_window_layers"),
            LLAMA_FIXED, LLAMA_INERT),
    QWEN3: (LLAMA_MAPPED + ("sliding_window", "use_sliding_window", "layer_types", "max_window_layers"),
            {**LLAMA_FIXED, "attention_bias": (False,)}, LLAMA_INERT),
    GPT2: (GPT2_MAPPED, GPT2_FIXED, GPT2_INERT),
}
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def classification(arch: str) -> dict[str, str]:
    """key -> "mapped" | "fixed" | "inert" for an architecture (what the README's table lists)."""
    mapped, fixed, inert = ARCH_KEYS[arch]
    table = {k: "inert" for k in {**INERT_COMMON, **inert}}
    table.update({k: "fixed" for k in {**FIXED_COMMON, **fixed}})
    table.update({k: "mapped" for k in mapped})
    return table


def architecture_of(hf: dict) -> str:
    names = hf.get("architectures") or []
    arch = names[0] if names else {v: k for k, v in MODEL_TYPES.items()}.get(hf.get("model_type"))
    if len(names) > 1 or arch not in ARCH_KEYS:
        raise HFFormatError(f"Hugging Face architectures={names or hf.get('model_type')!r} are not supported; megalm "
                            f"converts {', '.join(ARCH_KEYS)}")
    if hf.get("model_type", MODEL_TYPES[arch]) != MODEL_TYPES[arch]:
        raise HFFormatError(f"model_type={hf['model_type']!r} does not match architectures={names}")
    return arch


def _refuse(key, value, supported: str):
    raise HFFormatError(f"Hugging Face config key {key}={value!r} is not supported: {supported}")


def check_keys(hf: dict, arch: str) -> None:
    """Every key classified, every fixed key at a value megalm implements."""
    table = classification(arch)
    fixed = {**FIXED_COMMON, **ARCH_KEYS[arch][1]}
    for key, value in hf.items():
        kind = table.get(key)
        if kind is None:
            _refuse(key, value, f"megalm does not implement it for {arch} (its known keys: mapped, fixed or inert; "
                                f"see the README's conversion table)")
        if kind == "fixed" and value not in fixed[key]:
            _refuse(key, value, f"megalm implements {' or '.join(map(repr, fixed[key]))}")
    if hf.get("pruned_heads"):
        _refuse("pruned_heads", hf["pruned_heads"], "megalm has every head of every layer")


def _rope(hf: dict) -> dict:
    """RoPE settings from every spelling transformers reads: ``rope_parameters`` (v5), ``rope_scaling`` with
    ``rope_type`` or ``type`` and a top-level ``rope_theta`` (v4)."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
    kind = params.pop("rope_type", None) or params.pop("type", None)
    legacy_kind = legacy.pop("rope_type", None) or legacy.pop("type", None)
    if kind and legacy_kind and kind != legacy_kind:
        _refuse("rope_scaling", hf.get("rope_scaling"), f"it contradicts rope_parameters.rope_type={kind!r}")
    kind = kind or legacy_kind or "default"
    extra = {**legacy, **params}
    if kind == "default":
        if extra.pop("partial_rotary_factor", 1.0) != 1.0:
            _refuse("partial_rotary_factor", hf, "megalm rotates every dimension of a head (factor 1.0)")
        if extra:
            _refuse("rope_parameters", extra, "plain RoPE takes rope_theta only")
        return {"rope_theta": float(theta), "rope_scaling": "none"}
    if kind != "llama3":
        _refuse("rope_type", kind, "megalm implements default and llama3 RoPE (linear, dynamic, yarn, longrope and "
                                   "others are refused)")
    unknown = set(extra) - set(LLAMA3_KEYS) - {"attention_factor"}
    if unknown or extra.get("attention_factor", 1.0) != 1.0 or set(LLAMA3_KEYS) - set(extra):
        _refuse("rope_parameters", extra, f"llama3 RoPE takes exactly {', '.join(LLAMA3_KEYS)}")
    return {"rope_theta": float(theta), "rope_scaling": "llama3", "rope_factor": float(extra["factor"]),
            "rope_low_freq_factor": float(extra["low_freq_factor"]),
            "rope_high_freq_factor": float(extra["high_freq_factor"]),
            "rope_original_max_seq_len": int(extra["original_max_position_embeddings"])}


def _sliding_window(hf: dict, arch: str) -> None:
    """megalm attends over the whole sequence: any window that can bind is refused."""
    window, longest = hf.get("sliding_window"), hf["max_position_embeddings"]
    uses = arch == MISTRAL or hf.get("use_sliding_window", False)
    if uses and window is not None and window < longest:
        _refuse("sliding_window", window, f"megalm attends over the whole sequence (max_position_embeddings="
                                          f"{longest}); sliding-window attention is not implemented")
    if any(t != "full_attention" for t in hf.get("layer_types") or []):
        _refuse("layer_types", sorted(set(hf["layer_types"])), "megalm implements full_attention layers only")


def model_config_from_hf(hf: dict) -> ModelConfig:
    """The ModelConfig a Hugging Face config describes, or HFFormatError naming the first key it cannot keep."""
    arch = architecture_of(hf)
    check_keys(hf, arch)
    if arch == GPT2:
        if hf.get("n_ctx", hf["n_positions"]) != hf["n_positions"]:
            _refuse("n_ctx", hf["n_ctx"], f"it must equal n_positions={hf['n_positions']}")
        return ModelConfig(vocab_size=hf["vocab_size"], hidden_size=hf["n_embd"], num_layers=hf["n_layer"],
                           num_heads=hf["n_head"], num_kv_heads=hf["n_head"],
                           ffn_hidden_size=hf.get("n_inner") or 4 * hf["n_embd"],
                           max_seq_len=hf["n_positions"], norm="layernorm", norm_eps=hf["layer_norm_epsilon"],
                           activation="gelu", position="learned", bias=True, dropout=0.0,
                           tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
    _sliding_window(hf, arch)
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    return ModelConfig(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                       num_layers=hf["num_hidden_layers"], num_heads=heads,
                       num_kv_heads=hf.get("num_key_value_heads") or heads,
                       head_dim=None if head_dim * heads == hf["hidden_size"] else head_dim,
                       ffn_hidden_size=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
                       norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), activation="swiglu", position="rope",
                       tie_embeddings=bool(hf.get("tie_word_embeddings", False)), bias=False,
                       qkv_bias=arch == QWEN2, qk_norm=arch == QWEN3, dropout=0.0, **_rope(hf))


def _architecture_for(m: ModelConfig) -> str:
    if m.norm == "layernorm" and m.activation == "gelu" and m.position == "learned" and m.bias and not m.qkv_bias:
        if m.head_dim is not None and m.head_dim * m.num_heads != m.hidden_size or m.qk_norm:
            raise HFFormatError("GPT-2 has neither model.head_dim apart from hidden/heads nor model.qk_norm")
        return GPT2
    if not (m.norm == "rmsnorm" and m.activation == "swiglu" and m.position == "rope" and not m.bias):
        raise HFFormatError("only GPT-2-style (layernorm, gelu, learned, bias) and Llama-style (rmsnorm, swiglu, "
                            "rope, no bias) models have a Hugging Face equivalent")
    if m.qk_norm and m.qkv_bias:
        raise HFFormatError("model.qk_norm with model.qkv_bias matches no Hugging Face architecture (Qwen3 has no "
                            "q/k/v biases, Qwen2 no q/k norms)")
    return QWEN3 if m.qk_norm else QWEN2 if m.qkv_bias else LLAMA


def hf_config_from_model(m: ModelConfig) -> dict:
    """A config.json that transformers reads as the model megalm computes (checked by reading it back)."""
    arch = _architecture_for(m)
    if arch == GPT2:
        hf = {"n_embd": m.hidden_size, "n_layer": m.num_layers, "n_head": m.num_heads, "n_inner": m.ffn_size,
              "n_positions": m.max_seq_len, "layer_norm_epsilon": m.norm_eps, "activation_function": "gelu_new",
              "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False}
    else:
        hf = {"hidden_size": m.hidden_size, "intermediate_size": m.ffn_size, "num_hidden_layers": m.num_layers,
              "num_attention_heads": m.num_heads, "num_key_value_heads": m.kv_heads,
              "head_dim": m.dim_per_head, "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
              "hidden_act": "silu", "mlp_bias": False, "rope_parameters": _rope_parameters(m)}
        if arch in (LLAMA, QWEN3):
            hf["attention_bias"] = False
        if arch == QWEN2:
            if m.head_dim is not None and m.head_dim * m.num_heads != m.hidden_size:
                raise HFFormatError("Qwen2 has no head_dim key: model.head_dim must be hidden/heads for a Qwen2 export")
            del hf["head_dim"]
    hf = {"architectures": [arch], "model_type": MODEL_TYPES[arch], "vocab_size": m.vocab_size,
          "tie_word_embeddings": m.tie_embeddings, **hf}
    back = model_config_from_hf(hf)
    if back != _normalised(m):
        raise HFFormatError(f"the {arch} config megalm would write reads back as another model: {back} vs {m}")
    return hf


def _rope_parameters(m: ModelConfig) -> dict:
    if m.rope_scaling == "none":
        return {"rope_type": "default", "rope_theta": m.rope_theta}
    return {"rope_type": "llama3", "rope_theta": m.rope_theta, "factor": m.rope_factor,
            "low_freq_factor": m.rope_low_freq_factor, "high_freq_factor": m.rope_high_freq_factor,
            "original_max_position_embeddings": m.rope_original_max_seq_len}


def _normalised(m: ModelConfig) -> ModelConfig:
    """``m`` as a Hugging Face config can state it: derived sizes written out, dropout 0, unused settings at their
    defaults (the llama3 numbers when there is no scaling, RoPE's theta for learned positions)."""
    default = ModelConfig()
    out = dataclasses.replace(m, dropout=0.0, ffn_hidden_size=m.ffn_size, num_kv_heads=m.kv_heads,
                              init_std=default.init_std)
    if m.head_dim is not None and m.head_dim * m.num_heads == m.hidden_size:
        out = dataclasses.replace(out, head_dim=None)
    if m.rope_scaling == "none":
        out = dataclasses.replace(out, **{k: getattr(default, k) for k in (
            "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_seq_len")})
    if m.position == "learned":
        out = dataclasses.replace(out, rope_theta=default.rope_theta, num_kv_heads=m.num_heads)
    return out

