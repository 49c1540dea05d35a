"""The Hugging Face config table: every key of every supported architecture is mapped, fixed or inert; anything
else, and any setting megalm does not compute, is refused with the key named (random weights, nothing
downloaded)."""
import pytest

from megalm.checkpoint.hf_config import (
    ARCH_KEYS,
    GPT2,
    LLAMA,
    MISTRAL,
    QWEN2,
    QWEN3,
    HFFormatError,
    classification,
    hf_config_from_model,
    model_config_from_hf,
)
from megalm.config import ModelConfig

transformers = pytest.importorskip("transformers", reason="needs transformers (pip install megalm[test])")
CLASSES = {LLAMA: "LlamaConfig", MISTRAL: "MistralConfig", QWEN2: "Qwen2Config", QWEN3: "Qwen3Config",
           GPT2: "GPT2Config"}


def transformers_config(arch: str, **kwargs) -> dict:
    """The config.json transformers itself writes for ``arch`` (its defaults, then ``kwargs``)."""
    config = getattr(transformers, CLASSES[arch])(**kwargs)
    config.architectures = [arch]
    return config.to_dict()


@pytest.mark.parametrize("arch", list(ARCH_KEYS))
def test_every_key_transformers_writes_is_classified(arch):
    """A key a future transformers adds fails here until the table says what it is."""
    table = classification(arch)
    unclassified = sorted(set(transformers_config(arch)) - set(table))
    assert unclassified == [], f"{arch}: classify {unclassified} in megalm/checkpoint/hf_config.py"


@pytest.mark.parametrize("arch", list(ARCH_KEYS))
def test_transformers_defaults_import(arch):
    # Mistral's default sliding window (4096 of 131072 positions) binds: refused (below), so import without it
    m = model_config_from_hf(transformers_config(arch, **({"sliding_window": None} if arch == MISTRAL else {})))
    assert m.vocab_size > 0 and m.num_layers > 0
    assert model_config_from_hf(hf_config_from_model(m)) == model_config_from_hf(hf_config_from_model(
        model_config_from_hf(hf_config_from_model(m))))


LLAMA_SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)


@pytest.mark.parametrize("arch,kwargs,needle", [
    # RoPE scaling in every spelling: v5's rope_parameters, v4's rope_scaling with rope_type and with type
    (LLAMA, {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}, "rope_type='linear'"),
    (LLAMA, {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                 "original_max_position_embeddings": 256}}, "rope_type='yarn'"),
    (LLAMA, {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}, "rope_type='dynamic'"),
    (LLAMA, {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    (LLAMA, {"attention_bias": True}, "attention_bias=True"),
    (LLAMA, {"mlp_bias": True}, "mlp_bias=True"),
    (MISTRAL, {"sliding_window": 256}, "sliding_window=256"),
    (QWEN2, {"use_sliding_window": True, "sliding_window": 128, "max_window_layers": 1}, "sliding_window"),
    (GPT2, {"scale_attn_weights": False}, "scale_attn_weights=False"),
    (GPT2, {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
    (GPT2, {"activation_function": "relu"}, "activation_function='relu'"),
])
def test_settings_megalm_does_not_compute_are_refused(arch, kwargs, needle):
    base = {} if arch == GPT2 else LLAMA_SMALL
    with pytest.raises(HFFormatError) as err:
        model_config_from_hf(transformers_config(arch, **base, **kwargs))
    assert needle in str(err.value), str(err.value)


@pytest.mark.parametrize("legacy", [{"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "rope_theta": 1e4},
                                    {"rope_scaling": {"type": "dynamic", "factor": 2.0}, "rope_theta": 1e4}])
def test_legacy_rope_scaling_spellings_are_read(legacy):
    hf = {"architectures": [LLAMA], "model_type": "llama", **LLAMA_SMALL, **legacy}
    with pytest.raises(HFFormatError, match="rope_type="):
        model_config_from_hf(hf)


def test_an_unknown_key_is_refused_with_its_name():
    hf = {**transformers_config(LLAMA, **LLAMA_SMALL), "quantization_config": {"quant_method": "gptq"}}
    with pytest.raises(HFFormatError, match=r"quantization_config=\{'quant_method': 'gptq'\} is not supported"):
        model_config_from_hf(hf)


def test_llama3_rope_is_read_in_both_spellings():
    llama3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    v5 = model_config_from_hf(transformers_config(LLAMA, **LLAMA_SMALL, rope_parameters={
        "rope_type": "llama3", "rope_theta": 5e5, **llama3}))
    v4 = model_config_from_hf({"architectures": [LLAMA], "model_type": "llama", **LLAMA_SMALL, "rope_theta": 5e5,
                               "rope_scaling": {"rope_type": "llama3", **llama3}})
    assert v5 == v4 and v5.rope_scaling == "llama3" and v5.rope_original_max_seq_len == 64
    assert v5.rope_theta == 5e5


def test_export_reads_back_as_the_same_model():
    m = ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=24,
                    ffn_hidden_size=96, max_seq_len=1024, norm="rmsnorm", activation="swiglu", position="rope",
                    tie_embeddings=False, bias=False, qk_norm=True)
    hf = hf_config_from_model(m)
    assert hf["architectures"] == [QWEN3] and hf["head_dim"] == 24
    config = transformers.AutoConfig.for_model("qwen3", **{k: v for k, v in hf.items()
                                                           if k not in ("architectures", "model_type")})
    assert config.head_dim == 24
    with pytest.raises(HFFormatError, match="Qwen2 has no head_dim key"):
        hf_config_from_model(ModelConfig(**{**m.__dict__, "qk_norm": False, "qkv_bias": True}))
