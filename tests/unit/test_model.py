"""The model against an independent implementation (Hugging Face transformers) and basic invariants."""
import pytest
import torch

from megalm.checkpoint.hf import from_hf, hf_config_from_model, model_config_from_hf, to_hf
from megalm.config import ModelConfig
from megalm.model.transformer import ModelChunk, init_chunk
from megalm.parallel.topology import TensorParallel

transformers = pytest.importorskip("transformers", reason="needs transformers (pip install megalm[test])")

LLAMA = ModelConfig(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=96,
                    max_seq_len=1024, norm="rmsnorm", activation="swiglu", position="rope", rope_theta=500000.0,
                    tie_embeddings=False, bias=False)
QWEN2 = ModelConfig(**{**LLAMA.__dict__, "qkv_bias": True, "tie_embeddings": True})
GPT2 = ModelConfig(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, max_seq_len=1024, norm="layernorm",
                   activation="gelu", position="learned", tie_embeddings=True, bias=True)
# the features of the models people import now: an independent head_dim (Mistral-Nemo), q/k norms with it
# (Qwen3), Llama 3.1's RoPE scaling (original context 64 here, so it acts well inside a 1024-token test), and
# GPT-2 with its own head
NEMO = ModelConfig(**{**LLAMA.__dict__, "head_dim": 24})
QWEN3 = ModelConfig(**{**LLAMA.__dict__, "head_dim": 24, "qk_norm": True, "tie_embeddings": True})
LLAMA3 = ModelConfig(**{**LLAMA.__dict__, "rope_scaling": "llama3", "rope_factor": 8.0, "rope_low_freq_factor": 1.0,
                        "rope_high_freq_factor": 4.0, "rope_original_max_seq_len": 64})
GPT2_UNTIED = ModelConfig(**{**GPT2.__dict__, "tie_embeddings": False})
FAMILIES = {"llama": LLAMA, "gpt2": GPT2, "qwen2": QWEN2, "nemo-head-dim": NEMO, "qwen3": QWEN3,
            "llama3-rope": LLAMA3, "gpt2-untied": GPT2_UNTIED}


def single(cfg: ModelConfig, seed: int = 0) -> ModelChunk:
    model = ModelChunk(cfg, TensorParallel(), range(cfg.num_layers), first=True, last=True)
    init_chunk(model, cfg, seed)
    return model


def hf_model(cfg: ModelConfig, model_type: str | None = None):
    hf = hf_config_from_model(cfg)
    kwargs = {k: v for k, v in hf.items() if k not in ("architectures", "model_type")}
    config = transformers.AutoConfig.for_model(model_type or hf["model_type"], **kwargs)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def assert_logits_close(got, expected):
    """fp32: max |difference| at most 1e-5 of the logits' scale (their largest magnitude)."""
    scale = float(expected.abs().max())
    worst = float((got - expected).abs().max())
    assert worst <= 1e-5 * max(scale, 1.0), (worst, scale)


CASES = [(cfg, None) for cfg in FAMILIES.values()] + [(LLAMA, "mistral")]


@pytest.mark.parametrize("cfg,model_type", CASES, ids=[*FAMILIES, "mistral"])
@pytest.mark.parametrize("seq", [16, 1024])
def test_logits_equal_hugging_face(cfg, model_type, seq):
    torch.manual_seed(0)
    hf = hf_model(cfg, model_type)
    with torch.no_grad():          # random weights everywhere, norms and biases included
        for p in hf.parameters():
            p.normal_(0, 0.1)
    ours = ModelChunk(cfg, TensorParallel(), range(cfg.num_layers), first=True, last=True).eval()
    mapped = dict(from_hf(hf.state_dict().items(), cfg))
    missing, unexpected = ours.load_state_dict(mapped, strict=True)
    assert not missing and not unexpected
    tokens = torch.randint(0, cfg.vocab_size, (1, seq))
    tokens[0, -1] = cfg.vocab_size - 1                          # the end of the vocabulary too
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    assert_logits_close(got, expected)


def test_llama3_scaling_changes_the_logits_where_it_acts():
    """The scaled and the plain model differ (so the test above can tell them apart), at long range only."""
    plain, scaled = single(LLAMA).eval(), single(LLAMA3).eval()
    tokens = torch.randint(0, LLAMA.vocab_size, (1, 512))
    with torch.no_grad():
        a, b = plain(tokens), scaled(tokens)
    assert float((a - b).abs().max()) > 1e-3


@pytest.mark.parametrize("cfg", list(FAMILIES.values()), ids=list(FAMILIES))
def test_hugging_face_round_trip_is_exact(cfg):
    ours = single(cfg)
    hf_tensors = dict(to_hf(ours.state_dict().items(), cfg))
    back = dict(from_hf(hf_tensors.items(), cfg))
    assert set(back) == set(ours.state_dict())
    for name, t in ours.state_dict().items():
        assert torch.equal(back[name], t), name
    assert model_config_from_hf(hf_config_from_model(cfg)).ffn_size == cfg.ffn_size


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_causal(cfg):
    model = single(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, 20))
    changed = tokens.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_kv_cache_matches_full_forward():
    model = single(LLAMA).eval()
    tokens = torch.randint(0, LLAMA.vocab_size, (1, 12))
    with torch.no_grad():
        full = model(tokens)
        cache = {}
        first = model(tokens[:, :8], cache=cache)
        steps = [model(tokens[:, i:i + 1], cache=cache, start_pos=i) for i in range(8, 12)]
    torch.testing.assert_close(torch.cat([first] + steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_initialisation_is_deterministic_and_seeded():
    a, b, c = single(LLAMA, 1), single(LLAMA, 1), single(LLAMA, 2)
    for (name, x), y, z in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(x, y), name
        if x.dim() == 2:
            assert not torch.equal(x, z), name


def test_scaled_residual_init():
    model = single(GPT2)
    std_in = model.layers["0"].attn.wq.weight.std().item()
    std_out = model.layers["0"].attn.wo.weight.std().item()
    assert std_out == pytest.approx(std_in / (2 * GPT2.num_layers) ** 0.5, rel=0.15)


def test_loss_is_mean_token_cross_entropy():
    model = single(GPT2)
    tokens = torch.randint(0, GPT2.vocab_size, (2, 9))
    loss = model(tokens[:, :-1], tokens[:, 1:])
    logits = model(tokens[:, :-1]).double()
    # written out, not F.cross_entropy (which the torch path itself calls): log-sum-exp minus the target's logit
    picked = logits.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    ref = (logits.logsumexp(-1) - picked).mean()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)


def test_adamw_decays_matrices_only_and_the_schedule_warms_up_then_decays():
    from megalm.config import load_config
    from megalm.engine.optim import build_optimizer, lr_at

    model = single(GPT2)
    cfg = load_config(None, ["optimizer.lr=1e-3", "optimizer.min_lr=1e-4", "optimizer.weight_decay=0.1",
                             "lr.warmup_steps=4", "train.steps=14"])
    decay, no_decay = build_optimizer(cfg, model.named_parameters()).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in model.named_parameters() if p.dim() < 2}
    assert any(".bias" in names[id(p)] for p in no_decay["params"])
    assert any("norm" in names[id(p)] for p in no_decay["params"])
    assert all(p.dim() == 2 for p in decay["params"])
    lrs = [lr_at(step, cfg) for step in range(14)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])            # linear warmup to the peak
    assert lrs[9] == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + __import__("math").cos(__import__("math").pi / 2)))
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] > 1e-4   # cosine down toward min_lr
    linear = load_config(None, ["optimizer.lr=1e-3", "optimizer.min_lr=0", "lr.warmup_steps=0",
                                "train.steps=10", "lr.decay=linear"])
    assert [lr_at(s, linear) for s in (0, 5)] == pytest.approx([1e-3, 5e-4])
