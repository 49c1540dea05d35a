"""A tiny model trained with the Triton kernels (interpreter on CPU) follows the PyTorch path's losses: attention,
norms, RoPE, SwiGLU and the fused linear + cross entropy head all switched at once."""
import pytest

from megalm.config import load_config
from megalm.model.ops import build_ops
from megalm.train.loop import train
from megalm.train.metrics import read_metrics
from tests.conftest import STRESS, tiny_overrides


def curve(prefix, run_dir, kernel, style):
    extra = {f"kernels.{op}": kernel for op in ("attention", "norm", "rope", "swiglu", "cross_entropy")}
    extra.update({"train.steps": 3, "train.device": "cpu"})
    extra.update(style)
    train(load_config(None, tiny_overrides(prefix, run_dir, **extra)))
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("style", [
    # Llama's features are a subset of the third style's: its own run only with MEGALM_STRESS=1
    pytest.param({"model.norm": "rmsnorm", "model.activation": "swiglu", "model.position": "rope",
                  "model.num_kv_heads": 2}, marks=pytest.mark.skipif(not STRESS, reason="set MEGALM_STRESS=1 "
                  "(the qwen3-llama3-rope style covers its kernels)")),
    pytest.param({"model.norm": "layernorm", "model.activation": "gelu", "model.position": "learned"},
                 marks=pytest.mark.skipif(not STRESS, reason="set MEGALM_STRESS=1 (LayerNorm's kernel is checked "
                                          "against its reference in test_norm.py)")),
    # Qwen3's q/k norms (through the norm kernel, per head) and a head_dim apart from hidden/heads (12: the
    # attention kernel pads it), with Llama 3.1 RoPE scaling (its tables feed the RoPE kernel)
    {"model.norm": "rmsnorm", "model.activation": "swiglu", "model.position": "rope", "model.num_kv_heads": 2,
     "model.qk_norm": "true", "model.head_dim": 12, "model.rope_scaling": "llama3",
     "model.rope_original_max_seq_len": 8},
], ids=["llama", "gpt2", "qwen3-llama3-rope"])
def test_triton_kernels_train_like_torch(tiny_corpus, tmp_path, style):
    ops = build_ops("triton", "triton", rope="triton", swiglu="triton", cross_entropy="triton")
    assert set(ops.impls.values()) == {"triton"}                       # really the kernels, not a fallback
    torch_losses = curve(tiny_corpus, tmp_path / "torch", "torch", style)
    triton_losses = curve(tiny_corpus, tmp_path / "triton", "triton", style)
    assert len(torch_losses) == len(triton_losses) == 3
    for a, b in zip(torch_losses, triton_losses):
        assert b == pytest.approx(a, rel=1e-5), (torch_losses, triton_losses)


def test_model_calls_every_fused_kernel(monkeypatch):
    """With every kernel on triton, one forward with targets goes through each fused op (not a fallback):
    attention and norms, RoPE on q and k, SwiGLU, and the fused head + loss."""
    import torch

    from megalm.config import ModelConfig
    from megalm.kernels import attention, cross_entropy, norm, rope, swiglu
    from megalm.model.transformer import ModelChunk, init_chunk
    from megalm.parallel.topology import TensorParallel

    calls = {}

    def counting(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    for module, name in ((attention, "flash_attention"), (norm, "rms_norm"), (rope, "apply_rope"),
                         (swiglu, "swiglu"), (cross_entropy, "linear_cross_entropy")):
        counting(module, name)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, ffn_hidden_size=64,
                      max_seq_len=16, norm="rmsnorm", activation="swiglu", position="rope", bias=False)
    ops = build_ops("triton", "triton", rope="triton", swiglu="triton", cross_entropy="triton")
    model = ModelChunk(cfg, TensorParallel(), range(1), first=True, last=True, ops=ops)
    init_chunk(model, cfg, seed=0)
    tokens = torch.randint(0, 64, (2, 9))
    loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    assert calls == {"flash_attention": 1, "rms_norm": 3, "apply_rope": 2, "swiglu": 1, "linear_cross_entropy": 1}


def _train(rank, world, overrides):
    train(load_config(None, overrides))


@pytest.mark.slow
def test_triton_kernels_under_tensor_and_sequence_parallelism(tiny_corpus, tmp_path):
    """tp = 2 with sequence parallelism, attention, norms, RoPE and SwiGLU on Triton (each rank runs its heads
    and its slice of the MLP through the kernels), follows the single-process PyTorch run (rel 1e-5)."""
    from megalm.runtime.spawn import run_distributed

    llama = {"model.norm": "rmsnorm", "model.activation": "swiglu", "model.position": "rope",
             "model.num_kv_heads": 2}
    expected = curve(tiny_corpus, tmp_path / "torch", "torch", llama)
    kernels = {f"kernels.{op}": "triton" for op in ("attention", "norm", "rope", "swiglu")}
    run_dir = tmp_path / "tp2"
    run_distributed(_train, 2, tiny_overrides(tiny_corpus, run_dir, **llama, **kernels, **{
        "parallel.tp": 2, "parallel.sequence_parallel": "true", "train.steps": 3, "train.device": "cpu"}))
    got = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    assert len(got) == len(expected) == 3
    assert got == pytest.approx(expected, rel=1e-5), (expected, got)
