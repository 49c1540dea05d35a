"""LayerNorm and RMSNorm kernels against their fp32 references: awkward hidden sizes (primes, 2^k - 1, up to
16k), several leading shapes, weight/bias gradients summed across rows, deterministic gradients.

Nothing in the norms uses tl.dot, so every dtype runs in the interpreter; only large shapes are GPU-only.
"""
import pytest
import torch
from kernel_checks import DEVICE, check_fwd_bwd

from megalm.kernels import norm as norm_mod
from megalm.kernels.norm import layer_norm, layer_norm_reference, rms_norm, rms_norm_reference

# (dtype, atol, rtol). bf16: the interpreter truncates fp32 -> bf16 (the GPU rounds to nearest), so allow
# an extra ulp at the output's magnitude.
TOLS = [(torch.float32, 1e-5, 1e-6), (torch.float16, 1e-3, 0.0), (torch.bfloat16, 1e-2, 4e-3)]
IDS = ["fp32", "fp16", "bf16"]
gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                         reason="needs CUDA: large shapes are too slow to interpret")
EPS = 1e-5


def _inputs(shape, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(DEVICE, dtype)
    w = (1 + 0.2 * torch.randn(n, generator=g)).to(DEVICE, dtype)
    b = (0.1 * torch.randn(n, generator=g)).to(DEVICE, dtype) if bias else None
    return x, w, b


def _check_layer(shape, dtype, atol, rtol, bias=True):
    x, w, b = _inputs(shape, dtype, bias)
    if b is None:
        return check_fwd_bwd(lambda x, w: layer_norm(x, w, None, EPS),
                             lambda x, w: layer_norm_reference(x, w, None, EPS), [x, w], atol, rtol)
    return check_fwd_bwd(lambda x, w, b: layer_norm(x, w, b, EPS),
                         lambda x, w, b: layer_norm_reference(x, w, b, EPS), [x, w, b], atol, rtol)


def _check_rms(shape, dtype, atol, rtol):
    x, w, _ = _inputs(shape, dtype, False)
    return check_fwd_bwd(lambda x, w: rms_norm(x, w, EPS), lambda x, w: rms_norm_reference(x, w, EPS),
                         [x, w], atol, rtol)


# hidden sizes: primes (3, 31, 4093), 2^k - 1 (127, 255), a power of two, 16k; leading shapes 1-d to 3-d.
# Hidden size 1 only for RMSNorm: LayerNorm's output there is exactly the bias, and PyTorch's own fp32 dw
# comes out as rounding noise (5e-5) where the kernel gives the true 0.
SHAPES = [(4, 3), (3, 7, 127), (5, 31), (67, 255), (2, 4093), (1, 2, 1024), (2, 16384)]


@pytest.mark.parametrize("dtype,atol,rtol", TOLS, ids=IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_layer_norm(shape, dtype, atol, rtol):
    out, grads = _check_layer(shape, dtype, atol, rtol)
    assert out.shape == shape and grads[2].shape == shape[-1:]


@pytest.mark.parametrize("dtype,atol,rtol", TOLS, ids=IDS)
@pytest.mark.parametrize("shape", [(3, 7, 127), (67, 255)], ids=str)
def test_layer_norm_without_bias(shape, dtype, atol, rtol):
    _check_layer(shape, dtype, atol, rtol, bias=False)


@pytest.mark.parametrize("dtype,atol,rtol", TOLS, ids=IDS)
@pytest.mark.parametrize("shape", SHAPES + [(4, 1)], ids=str)
def test_rms_norm(shape, dtype, atol, rtol):
    out, grads = _check_rms(shape, dtype, atol, rtol)
    assert out.shape == shape and grads[1].shape == shape[-1:]


def test_weight_grad_sums_all_rows():
    """67 rows over 4 backward programs of 17 rows (the last one short): dw, db equal the fp32 sums."""
    x, w, b = _inputs((67, 255), torch.float32)
    w.requires_grad_(), b.requires_grad_()
    dy = torch.randn(67, 255, device=DEVICE)
    layer_norm(x, w, b, EPS).backward(dy)
    xhat = (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + EPS)
    torch.testing.assert_close(w.grad, (dy * xhat).sum(0), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(b.grad, dy.sum(0), atol=1e-4, rtol=1e-5)


def test_backward_is_bit_identical():
    x, w, b = _inputs((67, 255), torch.bfloat16)
    dy = torch.randn(67, 255).to(DEVICE, torch.bfloat16)

    def grads():
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        return torch.autograd.grad(layer_norm(*leaves, EPS), leaves, dy)

    assert all(torch.equal(a, b) for a, b in zip(grads(), grads()))


def test_strided_rows():
    """x a column slice of a wider tensor (row stride != hidden size)."""
    wide, w, b = _inputs((6, 64), torch.float32)
    x = wide[:, :31]
    assert not x.is_contiguous()
    w, b = w[:31], b[:31]
    expected = layer_norm_reference(x, w, b, EPS)
    torch.testing.assert_close(layer_norm(x, w, b, EPS), expected, atol=1e-5, rtol=1e-5)


def test_falls_back_beyond_one_row_kernel(monkeypatch):
    """fp32 rows over 16k columns exceed the 64 KB row kernel: the reference runs (and is exact)."""
    calls = []
    monkeypatch.setattr(norm_mod.NormFunction, "apply", lambda *a: calls.append(a))
    x, w, b = _inputs((2, 16385), torch.float32)
    assert torch.equal(rms_norm(x, w, EPS), rms_norm_reference(x, w, EPS))
    assert torch.equal(layer_norm(x, w, b, EPS), layer_norm_reference(x, w, b, EPS))
    assert not calls


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [4095, 8192, 16383, 32768])
def test_gpu_large(hidden):
    _check_layer((4096, hidden), torch.bfloat16, 1e-2, 4e-3)
    _check_rms((4096, hidden), torch.bfloat16, 1e-2, 4e-3)
