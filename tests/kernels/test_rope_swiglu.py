"""Fused RoPE and SwiGLU against their references (elementwise kernels: no tl.dot, so every dtype runs in the
interpreter; only large shapes are GPU-only)."""
import pytest
import torch
from kernel_checks import DEVICE, check_fwd_bwd

from megalm.kernels import swiglu as swiglu_mod
from megalm.kernels.rope import apply_rope, rope_reference
from megalm.kernels.swiglu import swiglu, swiglu_reference

# (dtype, atol, rtol); bf16 allows the interpreter's truncating fp32 -> bf16 cast (one extra ulp).
TOLS = [(torch.float32, 1e-6, 1e-6), (torch.float16, 1e-3, 0.0), (torch.bfloat16, 1e-2, 4e-3)]
IDS = ["fp32", "fp16", "bf16"]
gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                         reason="needs CUDA: large shapes are too slow to interpret")


def _cos_sin(T, D, base=10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    angles = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq)  # (T, D/2)
    emb = torch.cat([angles, angles], dim=-1)  # Hugging Face Llama layout
    return emb.cos().to(DEVICE), emb.sin().to(DEVICE)


def _rand(*shape, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype,atol,rtol", TOLS, ids=IDS)
@pytest.mark.parametrize("T", [1, 17, 129])
@pytest.mark.parametrize("D", [64, 128])
def test_rope(T, D, dtype, atol, rtol):
    cos, sin = _cos_sin(T, D)
    x = _rand(2, 3, T, D, dtype=dtype)
    check_fwd_bwd(lambda x: apply_rope(x, cos, sin), lambda x: rope_reference(x, cos, sin), [x], atol, rtol)


def test_rope_matches_complex_rotation():
    """Independent check of the convention: dims (i, i + D/2) rotate by angle t * f_i as a complex number."""
    T, D = 17, 64
    cos, sin = _cos_sin(T, D)
    x = _rand(1, 2, T, D, dtype=torch.float64).float()
    z = torch.complex(x[..., : D // 2], x[..., D // 2:])
    angles = torch.atan2(sin[:, : D // 2], cos[:, : D // 2])
    rot = z * torch.polar(torch.ones_like(angles), angles)
    expected = torch.cat([rot.real, rot.imag], -1)
    torch.testing.assert_close(apply_rope(x, cos, sin), expected, atol=1e-5, rtol=1e-5)


def test_rope_strided_input_and_batched_cos():
    """x as a transposed (B, T, H, D) view and cos/sin given as (1, T, D) both work."""
    T, D = 17, 64
    cos, sin = _cos_sin(T, D)
    x = _rand(2, T, 3, D, dtype=torch.float32).transpose(1, 2)
    torch.testing.assert_close(apply_rope(x, cos[None], sin[None]), rope_reference(x, cos, sin))


@pytest.mark.parametrize("dtype,atol,rtol", TOLS, ids=IDS)
@pytest.mark.parametrize("shape", [(1,), (3, 37), (2, 5, 127), (2047,), (1025, 3)], ids=str)
def test_swiglu(shape, dtype, atol, rtol):
    gate, up = _rand(*shape, dtype=dtype, seed=1) * 3, _rand(*shape, dtype=dtype, seed=2)
    check_fwd_bwd(swiglu, swiglu_reference, [gate, up], atol, rtol)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy, interpreter only
def test_swiglu_extreme_gates():
    """Saturated sigmoid: silu(-100) = 0 and silu(100) = 100 with finite gradients."""
    gate = torch.tensor([-100.0, -20.0, 0.0, 20.0, 100.0], device=DEVICE, requires_grad=True)
    up = torch.ones(5, device=DEVICE, requires_grad=True)
    out = swiglu(gate, up)
    out.sum().backward()
    torch.testing.assert_close(out, swiglu_reference(gate.detach(), up.detach()))
    assert torch.isfinite(gate.grad).all() and torch.isfinite(up.grad).all()


def test_swiglu_falls_back_without_triton(monkeypatch):
    monkeypatch.setattr(swiglu_mod, "can_launch", lambda *t: False)
    gate, up = _rand(3, 5, dtype=torch.float32), _rand(3, 5, dtype=torch.float32, seed=1)
    assert torch.equal(swiglu(gate, up), swiglu_reference(gate, up))


@gpu
@pytest.mark.gpu
def test_gpu_large():
    cos, sin = _cos_sin(4096, 128)
    x = _rand(2, 16, 4096, 128, dtype=torch.bfloat16)
    check_fwd_bwd(lambda x: apply_rope(x, cos, sin), lambda x: rope_reference(x, cos, sin), [x], 1e-2, 4e-3)
    gate, up = _rand(8192, 11008, dtype=torch.bfloat16), _rand(8192, 11008, dtype=torch.bfloat16, seed=1)
    check_fwd_bwd(swiglu, swiglu_reference, [gate, up], 1e-2, 4e-3)
