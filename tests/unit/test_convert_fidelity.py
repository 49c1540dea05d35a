"""Conversions that cannot be silently wrong: refused settings leave nothing at --dst, every family round-trips
through the converter with verified logits at sequence 16 and 1024, --verify catches what a short batch misses,
and tokenizers keep their special tokens end to end (random weights, nothing downloaded)."""
import json
import sysconfig
from pathlib import Path

import pytest
import torch

from megalm.checkpoint.convert import main
from megalm.checkpoint.verify import VerifyError, compare, fixed_batch, verify
from megalm.config import ModelConfig, load_config
from megalm.model.transformer import ModelChunk, init_chunk
from megalm.parallel.topology import TensorParallel
from megalm.train.loop import train
from tests.conftest import STDLIB_FILES, tiny_overrides

transformers = pytest.importorskip("transformers", reason="needs transformers (pip install megalm[test])")

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024)
FAMILIES = {
    "llama": ("LlamaConfig", dict(SMALL, rope_theta=5e5)),
    "llama3-rope": ("LlamaConfig", dict(SMALL, rope_parameters={
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "mistral-nemo-head-dim": ("MistralConfig", dict(SMALL, head_dim=24, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(SMALL, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(SMALL, head_dim=24, tie_word_embeddings=True)),
    "gpt2": ("GPT2Config", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=1024)),
    "gpt2-untied": ("GPT2Config", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=1024,
                                       tie_word_embeddings=False)),
}


def save_hf(folder: Path, config_class: str, **kwargs) -> Path:
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():                   # norms and biases random too
            p.normal_(0, 0.1)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_through_the_converter(family, tmp_path, capsys):
    """HF -> megalm at tp=2 -> HF, each step verified by default (sequences 16 and 1024, the vocabulary's end):
    the tensors come back bit for bit."""
    config_class, kwargs = FAMILIES[family]
    src = save_hf(tmp_path / "hf", config_class, **kwargs)
    assert main(["from-hf", "--src", str(src), "--dst", str(tmp_path / "megalm"), "--tp", "2"]) == 0
    assert main(["to-hf", "--src", str(tmp_path / "megalm"), "--dst", str(tmp_path / "back")]) == 0
    out = capsys.readouterr().out
    assert out.count("(1, 1024)") == 2 and "committed" in out and "(verified)" in out
    from safetensors.torch import load_file

    original = load_file(next(src.glob("*.safetensors")))
    back = load_file(tmp_path / "back" / "model.safetensors")
    shared = {k for k in original if "lm_head" not in k or k in back}
    assert shared <= set(back), sorted(shared - set(back))
    for key in shared:
        assert torch.equal(back[key], original[key]), key


@pytest.mark.parametrize("kwargs,needle", [
    (dict(SMALL, rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}), "rope_type='linear'"),
    (dict(SMALL, hidden_act="relu"), "hidden_act='relu'"),
])
def test_refused_settings_leave_nothing_at_dst(tmp_path, kwargs, needle):
    src = save_hf(tmp_path / "hf", "LlamaConfig", **kwargs)
    dst = tmp_path / "out"
    with pytest.raises(ValueError, match=needle):
        main(["from-hf", "--src", str(src), "--dst", str(dst)])
    assert not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_gpt2_attention_scaling_flags_are_refused(tmp_path):
    src = save_hf(tmp_path / "hf", "GPT2Config", vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64,
                  scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx=True"):
        main(["from-hf", "--src", str(src), "--dst", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_destination_that_is_a_file_is_refused_before_any_work(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ValueError, match="is a file; give a folder path"):
        main(["to-hf", "--src", str(tmp_path), "--dst", str(target)])


def test_verify_catches_what_one_short_batch_misses():
    """Small weights and a RoPE scaling the converter forgot: the old check (2 x 16 tokens, absolute 1e-5)
    passes the wrong model (4e-6 apart there); the 1024-token batch does not (7e-5 apart)."""
    right = ModelConfig(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=96,
                        max_seq_len=1024, norm="rmsnorm", activation="swiglu", position="rope", bias=False,
                        rope_scaling="llama3", rope_original_max_seq_len=1024, init_std=0.01, tie_embeddings=False)
    wrong = ModelConfig(**{**right.__dict__, "rope_scaling": "none"})
    a = ModelChunk(right, TensorParallel(), range(2), True, True).eval()
    init_chunk(a, right, 0)
    b = ModelChunk(wrong, TensorParallel(), range(2), True, True).eval()
    b.load_state_dict(a.state_dict())
    before, after = (lambda t: a(t)), (lambda t: b(t))
    with torch.no_grad():
        short = fixed_batch(right)
        assert float((before(short) - after(short)).abs().max()) <= 1e-5        # what used to pass
        with pytest.raises(VerifyError, match=r"\(1, 1024\) batch"):
            verify(before, after, right, "planted")
        assert compare(before, before, short, "same")["relative"] == 0.0


# ---- tokenizers -------------------------------------------------------------------------------------------

TEXT = "plain text, <|endoftext|> </s> <|im_end|> <s> literal, then non-ASCII: naïve café 数据 🙂\n"
TOKENIZERS = {
    "endoftext": dict(eos="<|endoftext|>"),
    "llama2-style": dict(eos="</s>", bos="<s>"),
    "chatml": dict(eos="<|im_end|>", extra=["<|im_start|>"], pad="<|endoftext|>",
                   template="{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                            "{% endfor %}"),
}


def hf_tokenizer_folder(folder: Path, eos, bos=None, pad=None, extra=(), template=None) -> Path:
    """A byte-level BPE saved as transformers saves a fast tokenizer: tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    specials = [t for t in dict.fromkeys([eos, bos, pad, *extra]) if t]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([(stdlib / f).read_text() for f in STDLIB_FILES], trainer)
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "clean_up_tokenization_spaces": False}
    config.update({k: v for k, v in (("bos_token", bos), ("pad_token", pad), ("chat_template", template)) if v})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_special_tokens_survive_preprocess_train_and_export(name, tmp_path):
    from megalm.data.indexed import IndexedDataset
    from megalm.data.preprocess import preprocess

    spec = TOKENIZERS[name]
    source = hf_tokenizer_folder(tmp_path / "tokenizer", **spec)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    prefix = str(tmp_path / "data")
    preprocess([str(stdlib / f) for f in STDLIB_FILES], prefix, tokenizer=str(source), workers=1,
               show_progress=False)
    src_tok = transformers.AutoTokenizer.from_pretrained(str(source))
    eos_id = src_tok.convert_tokens_to_ids(spec["eos"])
    data = IndexedDataset(prefix)
    assert int(data[0][-1]) == eos_id                          # documents end with the tokenizer's own eos
    train(load_config(None, tiny_overrides(prefix, tmp_path / "run", **{"train.steps": 2})))
    assert main(["to-hf", "--src", str(tmp_path / "run"), "--dst", str(tmp_path / "hf")]) == 0
    export = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert len(export) == len(src_tok)                         # no token added
    for text in (TEXT, TEXT * 3, "é" * 7):
        assert export(text, add_special_tokens=False)["input_ids"] == src_tok(text, add_special_tokens=False)[
            "input_ids"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert config["eos_token_id"] == generation["eos_token_id"] == eos_id == export.eos_token_id
    if "bos" in spec:
        assert config["bos_token_id"] == src_tok.convert_tokens_to_ids(spec["bos"]) == export.bos_token_id
    if "template" in spec:
        messages = [{"role": "user", "content": "hi"}]
        assert export.apply_chat_template(messages, tokenize=False) == src_tok.apply_chat_template(messages,
                                                                                                   tokenize=False)


def test_literal_special_token_text_is_encoded_as_text(tmp_path):
    from megalm.data.tokenizer import load_tokenizer

    source = hf_tokenizer_folder(tmp_path / "tokenizer", **TOKENIZERS["chatml"])
    as_text, as_special = load_tokenizer(source), load_tokenizer(source, parse_special=True)
    assert as_text.eod_token == "<|im_end|>" and as_text.special.chat_template.startswith("{% for")
    assert as_text.eod_id not in as_text.encode("a <|im_end|> b")
    assert as_special.eod_id in as_special.encode("a <|im_end|> b")
