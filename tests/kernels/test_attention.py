"""Flash attention against its PyTorch reference: forward and backward, GQA, awkward lengths, determinism.

On CPU these run through Triton's interpreter with 16x16 tiles, so T=17 and T=129 end mid-block.
GPU-only (marked): bf16 ``tl.dot`` itself (the interpreter multiplies bf16 bit patterns, triton issue 11584,
so on CPU bf16 goes through the fp32-upcast path instead), TF32 exclusion for fp32 (the interpreter has no
TF32 to exclude), the atomic-dQ path's nondeterminism, and long sequences (too slow to interpret).
"""
import pytest
import torch
from kernel_checks import DEVICE, check_fwd_bwd, max_err

from megalm.kernels import attention as attn_mod
from megalm.kernels.attention import attention_reference, flash_attention
from megalm.kernels.utils import interpreting

# (dtype, atol, rtol). bf16 needs more atol on CPU: the interpreter truncates fp32 -> bf16 casts (measured;
# the GPU rounds to nearest), a 1-ulp error where PyTorch has half an ulp.
TOLS = [(torch.float32, 1e-5, 0.0), (torch.float16, 2e-3, 0.0), (torch.bfloat16, 1.5e-2, 0.0)]
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: see the module docstring")


def _qkv(B, Hq, Hkv, T, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(B, h, T, D, generator=g).to(DEVICE, dtype)
    return mk(Hq), mk(Hkv), mk(Hkv)


def _run(shape, dtype, atol, rtol, causal, deterministic=False, scale=None):
    q, k, v = _qkv(*shape, dtype)
    fn = lambda q, k, v: flash_attention(q, k, v, causal=causal, softmax_scale=scale,
                                         deterministic=deterministic)
    ref = lambda q, k, v: attention_reference(q, k, v, causal=causal, softmax_scale=scale)
    return check_fwd_bwd(fn, ref, [q, k, v], atol, rtol)


@pytest.mark.parametrize("dtype,atol,rtol", TOLS, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 64), (2, 3, 1, 17, 64), (1, 3, 1, 17, 128),
                                   (1, 2, 2, 33, 128)], ids=lambda s: "B{}_Hq{}_Hkv{}_T{}_D{}".format(*s))
def test_matches_reference(shape, causal, dtype, atol, rtol):
    """Output and dq/dk/dv within 2x PyTorch's own low-precision error (+atol); GQA 3 q heads / 1 kv head."""
    out, grads = _run(shape, dtype, atol, rtol, causal)
    assert out.shape == (shape[0], shape[1], shape[3], shape[4])
    assert grads[1].shape == (shape[0], shape[2], shape[3], shape[4])


@pytest.mark.parametrize("dtype,atol,rtol,causal",
                         [(torch.bfloat16, 1.5e-2, 0.0, True), (torch.float32, 1e-5, 0.0, False)],
                         ids=["bf16-causal", "fp32-full"])
def test_sequence_129_gqa(dtype, atol, rtol, causal):
    """T=129 = 8 full 16-row tiles + 1 row, 3 query heads sharing one K/V head, both backward paths."""
    _run((1, 3, 1, 129, 64), dtype, atol, rtol, causal, deterministic=(dtype == torch.float32))


@pytest.mark.parametrize("tiles", [(16, 32), (32, 16)], ids=["M16_N32", "M32_N16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("deterministic", [True, False], ids=["det", "atomic"])
def test_unequal_tiles(monkeypatch, tiles, causal, deterministic):
    """The GPU configurations use unequal query and key tiles (e.g. 128 x 64 forward, 32 x 128 dK/dV): the
    split into unmasked blocks and masked diagonal / ragged-end blocks must hold for any ratio. T=77 ends
    mid-tile for both sizes."""
    block_m, block_n = tiles
    monkeypatch.setattr(attn_mod, "attention_candidates", lambda *a: [dict(BLOCK_M=block_m, BLOCK_N=block_n,
                                                                            num_warps=1, num_stages=1)])
    _run((1, 2, 1, 77, 32), torch.float32, 1e-5, 0.0, causal, deterministic=deterministic)


def _segments(T, lengths, pad_id=0):
    """(1, T) document ids: consecutive documents of ``lengths``, the rest padding (its own segment, as packed
    chat samples carry it)."""
    ids = torch.full((T,), pad_id, dtype=torch.long)
    start = 0
    for i, n in enumerate(lengths, start=1):
        ids[start:start + n] = i
        start += n
    return ids[None].to(DEVICE)


@pytest.mark.parametrize("dtype,atol,rtol", TOLS[:1] + TOLS[2:], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lengths,T", [((9, 7), 21), ((40, 3, 30), 77), ((77,), 77), ((1, 1, 1, 20), 33)],
                         ids=["two+pad", "three-long", "one", "singletons"])
@pytest.mark.parametrize("deterministic", [True, False], ids=["det", "atomic"])
def test_packed_documents_match_the_block_diagonal_reference(lengths, T, dtype, atol, rtol, deterministic):
    """Variable-length documents in one sequence (segment ids): forward and dq/dk/dv equal the reference with
    a block-diagonal causal mask, across tile boundaries (16x16 tiles under the interpreter), with GQA; and
    each document equals that document run alone."""
    seg = _segments(T, lengths).expand(2, T).contiguous()
    q, k, v = _qkv(2, 4, 2, T, 32, dtype)
    fn = lambda q, k, v: flash_attention(q, k, v, causal=True, deterministic=deterministic, segments=seg)
    ref = lambda q, k, v: attention_reference(q, k, v, causal=True, segments=seg)
    out, _ = check_fwd_bwd(fn, ref, [q, k, v], atol, rtol)
    a, n = sum(lengths[:1]), lengths[0]
    alone = flash_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], causal=True)
    assert max_err(out[:, :, :n], alone) <= 2 * atol + (1e-2 if dtype != torch.float32 else 0)
    if len(lengths) > 1:
        b = lengths[1]
        second = flash_attention(q[:, :, a:a + b], k[:, :, a:a + b], v[:, :, a:a + b], causal=True)
        assert max_err(out[:, :, a:a + b], second) <= 2 * atol + (1e-2 if dtype != torch.float32 else 0)


def test_segments_of_the_wrong_shape_are_refused():
    q, k, v = _qkv(1, 2, 2, 17, 32, torch.float32)
    with pytest.raises(ValueError, match="segments must be"):
        flash_attention(q, k, v, segments=torch.zeros(1, 16, dtype=torch.long))


TILES = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=1, num_stages=1) for m, n in ((16, 16), (32, 16), (16, 32))]


@pytest.fixture
def tuning(monkeypatch):
    """Tuning switched on under the interpreter with three tile candidates per kernel. The fake timer runs a
    candidate once (do_bench would run it many times) and calls it fast when its first launch is in
    ``winners``. Yields (launches, winners): every launch in order as (kernel, BLOCK_M, BLOCK_N, atomic dQ)."""
    launches, winners = [], set()

    def fake_time(fn):
        before = len(launches)
        fn()
        return 1.0 if launches[before] in winners else 5.0

    monkeypatch.setattr(attn_mod, "_TUNED", {})
    monkeypatch.setattr(attn_mod, "_tuning", lambda: True)
    monkeypatch.setattr(attn_mod, "_time_ms", fake_time)
    monkeypatch.setattr(attn_mod, "attention_candidates", lambda *a: [dict(c) for c in TILES])

    def recording(name):
        kernel = getattr(attn_mod, name)

        class Recorder:
            def __getitem__(self, grid):
                def call(*args, **kwargs):
                    launches.append((name.split("_")[-2], kwargs["BLOCK_M"], kwargs["BLOCK_N"],
                                     kwargs.get("ATOMIC_DQ")))
                    return kernel[grid](*args, **kwargs)
                return call
        monkeypatch.setattr(attn_mod, name, Recorder())

    for name in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
        recording(name)
    yield launches, winners


@pytest.mark.parametrize("backward_winner", [("dkdv", 32, 16, True), ("dkdv", 16, 16, False)],
                         ids=["atomic-dq", "separate-dq"])
def test_tuning_times_each_candidate_once_and_keeps_the_fastest(tuning, backward_winner):
    """Forward: three tiles timed. Backward: atomic dQ with each dK/dV tile, then dK/dV + its own dQ kernel
    with the defaults. The winners run for real and the gradients still match the reference (the atomic dQ,
    which every timing run accumulated into, is cleared first). The same shape again times nothing."""
    launches, winners = tuning
    winners.update({("fwd", 16, 32, None), backward_winner})
    _run((1, 2, 1, 40, 32), torch.float32, 1e-5, 0.0, causal=True)
    timing = [("fwd", 16, 16, None), ("fwd", 32, 16, None), ("fwd", 16, 32, None), ("fwd", 16, 32, None),
              ("dkdv", 16, 16, True), ("dkdv", 32, 16, True), ("dkdv", 16, 32, True),
              ("dkdv", 16, 16, False), ("dq", 16, 16, None)]
    final = [backward_winner] + ([] if backward_winner[3] else [("dq", 16, 16, None)])
    assert launches == timing + final
    assert len(attn_mod._TUNED) == 2
    launches.clear()
    _run((1, 2, 1, 40, 32), torch.float32, 1e-5, 0.0, causal=True)
    assert launches == [("fwd", 16, 32, None)] + final


def test_deterministic_path_launches_only_the_defaults(tuning):
    launches, _ = tuning
    _run((1, 2, 1, 40, 32), torch.float32, 1e-5, 0.0, causal=False, deterministic=True)
    assert launches == [("fwd", 16, 16, None), ("dkdv", 16, 16, False), ("dq", 16, 16, None)]
    assert attn_mod._TUNED == {}


def test_a_failing_candidate_is_skipped_but_a_failing_default_is_not(monkeypatch):
    monkeypatch.setattr(attn_mod, "_TUNED", {})
    monkeypatch.setattr(attn_mod, "_tuning", lambda: True)
    monkeypatch.setattr(attn_mod, "_time_ms", lambda fn: fn())

    def launch(cfg):
        if cfg["name"] == "broken":
            raise RuntimeError("out of resources: shared memory")
        return cfg["ms"]

    candidates = [dict(name="default", ms=2.0), dict(name="broken"), dict(name="fast", ms=1.0)]
    assert attn_mod._pick(("k",), candidates, launch)["name"] == "fast"
    with pytest.raises(RuntimeError, match="out of resources"):
        attn_mod._pick(("other",), [dict(name="broken"), dict(name="fast", ms=1.0)], launch)


@pytest.mark.parametrize("head_dim", [32, 256, 80])
def test_other_head_dims(head_dim):
    """Powers of two 32..256 and a non-power of two (80, padded to a 128-wide tile and masked)."""
    _run((1, 2, 1, 17, head_dim), torch.float16, 2e-3, 0.0, causal=True)


def test_softmax_scale():
    _run((1, 2, 1, 17, 64), torch.float32, 1e-5, 0.0, causal=True, scale=0.3)


def test_strided_inputs_match_contiguous():
    """q/k/v as transposed views of (B, T, H, D) give the same bits as contiguous copies."""
    q, k, v = _qkv(1, 3, 1, 17, 64, torch.float16)
    views = [t.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v)]
    assert not views[0].is_contiguous()
    conts = [t.detach().clone().requires_grad_() for t in views]
    do = torch.randn_like(q)
    out_v, out_c = flash_attention(*views, deterministic=True), flash_attention(*conts, deterministic=True)
    assert torch.equal(out_v, out_c)
    gv = torch.autograd.grad(out_v, views, do)
    gc = torch.autograd.grad(out_c, conts, do)
    assert all(torch.equal(a, b) for a, b in zip(gv, gc))


def test_deterministic_backward_is_bit_identical():
    """deterministic=True: two runs give identical bits; the atomic-dQ path agrees to rounding."""
    q, k, v = _qkv(2, 3, 1, 33, 64, torch.bfloat16)
    do = torch.randn(2, 3, 33, 64).to(DEVICE, torch.bfloat16)

    def grads(deterministic):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = flash_attention(*leaves, causal=True, deterministic=deterministic)
        return torch.autograd.grad(out, leaves, do)

    first, second = grads(True), grads(True)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    atomic = grads(False)
    assert all(max_err(a, b) < 5e-2 for a, b in zip(first, atomic))


def test_bf16_uses_upcast_path_under_interpreter():
    q = torch.zeros(1, 1, 1, 16, dtype=torch.bfloat16)
    assert attn_mod._flags(q)["UPCAST"] == interpreting()
    assert attn_mod._flags(q.float())["IEEE"] and not attn_mod._flags(q.half())["IEEE"]


def test_falls_back_to_reference_without_triton(monkeypatch):
    monkeypatch.setattr(attn_mod, "can_launch", lambda *t: False)
    q, k, v = (t.requires_grad_() for t in _qkv(1, 3, 1, 17, 64, torch.float32))
    out = flash_attention(q, k, v)
    assert torch.equal(out, attention_reference(q, k, v))
    out.sum().backward()
    assert q.grad is not None and k.grad.shape == k.shape


def test_rejects_bad_head_counts():
    q, k, v = _qkv(1, 3, 2, 17, 64, torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        flash_attention(q, k, v)


# ---------------------------------------------------------------------------------------------------------
# GPU-only


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype,atol,rtol", TOLS[1:], ids=["fp16", "bf16"])
def test_gpu_native_low_precision_dot(head_dim, causal, dtype, atol, rtol):
    """bf16/fp16 tl.dot on tensor cores at a realistic size and a length that is no multiple of any tile."""
    _run((2, 8, 2, 1000, head_dim), dtype, atol, rtol, causal)


@gpu
@pytest.mark.gpu
def test_gpu_fp32_is_not_tf32():
    """fp32 inputs must use IEEE dots: TF32 would leave errors near 1e-3 at this size."""
    _run((1, 4, 2, 512, 128), torch.float32, 2e-5, 0.0, causal=False)


@gpu
@pytest.mark.gpu
def test_gpu_deterministic_backward_long():
    q, k, v = _qkv(2, 8, 2, 2048, 128, torch.bfloat16)
    do = torch.randn_like(q)

    def grads():
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        return torch.autograd.grad(flash_attention(*leaves, deterministic=True), leaves, do)

    assert all(torch.equal(a, b) for a, b in zip(grads(), grads()))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_every_tile_candidate_matches_reference(monkeypatch, head_dim):
    """Each tuning candidate of the forward and of the atomic dK/dV kernel, forced alone, gives the reference's
    output and gradients on real hardware (tuning only ever picks among these)."""
    from megalm.kernels import utils

    for stage in ("fwd", "dkdv"):
        for cfg in utils.attention_candidates(head_dim, torch.bfloat16, stage):
            def only(d, dtype, s, cfg=cfg, stage=stage):
                return [cfg] if s == stage else utils.attention_candidates(d, dtype, s)[:1]
            monkeypatch.setattr(attn_mod, "attention_candidates", only)
            _run((2, 4, 2, 1000, head_dim), torch.bfloat16, 1.5e-2, 0.0, causal=True)
