"""Chunked linear + cross entropy against the full-logits reference: awkward sizes, ignore_index, several
chunks, the PyTorch fallback, and that no (N, V) logits tensor is ever allocated.

The kernel has no tl.dot (the matmuls are PyTorch's), so every dtype runs in the interpreter."""
import pytest
import torch
from kernel_checks import DEVICE, check_fwd_bwd
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from megalm.kernels import cross_entropy as ce_mod
from megalm.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

# (dtype, atol, rtol): the per-chunk dW products are rounded to the input dtype before the fp32 sum; bf16 also
# allows the interpreter's truncating fp32 -> bf16 cast of the logit gradients (the GPU rounds to nearest).
TOLS = [(torch.float32, 1e-6, 1e-6), (torch.float16, 2e-4, 0.0), (torch.bfloat16, 2e-3, 4e-3)]
IDS = ["fp32", "fp16", "bf16"]
gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                         reason="needs CUDA: large vocabularies are too slow to interpret")


def _inputs(N, H, V, dtype, ignore_every=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g).to(DEVICE, dtype)
    w = (torch.randn(V, H, generator=g) / H**0.5 * 2).to(DEVICE, dtype)
    t = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        t[::ignore_every] = -100
    return x, w, t.to(DEVICE)


@pytest.mark.parametrize("dtype,atol,rtol", TOLS, ids=IDS)
@pytest.mark.parametrize("N,H,V,chunk", [(1, 31, 127, None), (17, 31, 257, 16), (129, 64, 255, 32)],
                         ids=lambda v: str(v))
def test_matches_reference(N, H, V, chunk, dtype, atol, rtol):
    x, w, t = _inputs(N, H, V, dtype, ignore_every=5 if N > 1 else 0)
    loss, (dx, dw) = check_fwd_bwd(lambda x, w: linear_cross_entropy(x, w, t, chunk_rows=chunk),
                                   lambda x, w: linear_cross_entropy_reference(x, w, t), [x, w], atol, rtol)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    if N > 1:
        assert torch.all(dx[::5] == 0), "ignored rows get no gradient"


def test_custom_ignore_index_and_grad_scale():
    x, w, t = _inputs(17, 31, 127, torch.float32)
    t[3:6] = 7
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ws = [w.clone().requires_grad_() for _ in range(2)]
    (3 * linear_cross_entropy(xs[0], ws[0], t, ignore_index=7, chunk_rows=16)).backward()
    (3 * linear_cross_entropy_reference(xs[1], ws[1], t, ignore_index=7)).backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad)
    torch.testing.assert_close(ws[0].grad, ws[1].grad)


def test_all_ignored_gives_zero_not_nan():
    x, w, t = _inputs(5, 31, 127, torch.float32)
    x.requires_grad_()
    loss = linear_cross_entropy(x, w, torch.full_like(t, -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0


def test_torch_chunk_path_matches(monkeypatch):
    """Without Triton the same chunked algorithm runs in PyTorch."""
    monkeypatch.setattr(ce_mod, "can_launch", lambda *t: False)
    x, w, t = _inputs(17, 31, 257, torch.float32, ignore_every=4)
    check_fwd_bwd(lambda x, w: linear_cross_entropy(x, w, t, chunk_rows=16),
                  lambda x, w: linear_cross_entropy_reference(x, w, t), [x, w], 1e-6, 1e-6)


def test_never_allocates_full_logits():
    """No tensor made in the forward or backward has N x V elements: the logits live one chunk at a time."""
    N, V, chunk = 129, 257, 32

    class ShapeLog(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numels = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # floating tensors only: the interpreter moves kernel arguments as uint8 views of their storage
            self.numels += [t.numel() for t in tree_flatten(out)[0]
                            if isinstance(t, torch.Tensor) and t.is_floating_point()]
            return out

    x, w, t = _inputs(N, 31, V, torch.float32)
    x.requires_grad_()
    log = ShapeLog()
    with log:
        linear_cross_entropy(x, w, t, chunk_rows=chunk).backward()
    assert log.numels and max(log.numels) <= chunk * V < N * V


@gpu
@pytest.mark.gpu
def test_gpu_llama_vocab():
    x, w, t = _inputs(4096, 2048, 32000, torch.bfloat16, ignore_every=7)
    check_fwd_bwd(lambda x, w: linear_cross_entropy(x, w, t),
                  lambda x, w: linear_cross_entropy_reference(x, w, t), [x, w], 2e-3, 4e-3)
