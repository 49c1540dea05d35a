"""A tiny model trained with the Triton kernels (interpreter on CPU) follows the PyTorch path's losses."""
import pytest

from megalm.config import load_config
from megalm.model.ops import build_ops
from megalm.train.loop import train
from megalm.train.metrics import read_metrics
from tests.conftest import tiny_overrides


def curve(prefix, run_dir, kernel, style):
    extra = {"kernels.attention": kernel, "kernels.norm": kernel, "train.steps": 4, "train.device": "cpu"}
    extra.update(style)
    train(load_config(None, tiny_overrides(prefix, run_dir, **extra)))
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("style", [
    {"model.norm": "rmsnorm", "model.activation": "swiglu", "model.position": "rope", "model.num_kv_heads": 2},
    {"model.norm": "layernorm", "model.activation": "gelu", "model.position": "learned"},
], ids=["llama", "gpt2"])
def test_triton_kernels_train_like_torch(tiny_corpus, tmp_path, style):
    assert build_ops("triton", "triton").attention_impl == "triton"   # really the kernels, not a fallback
    torch_losses = curve(tiny_corpus, tmp_path / "torch", "torch", style)
    triton_losses = curve(tiny_corpus, tmp_path / "triton", "triton", style)
    assert len(torch_losses) == len(triton_losses) == 4
    for a, b in zip(torch_losses, triton_losses):
        assert b == pytest.approx(a, rel=1e-5), (torch_losses, triton_losses)
