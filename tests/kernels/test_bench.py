"""The shipped benchmark (CPU: references only) and the package without Triton."""
import json
import os
import subprocess
import sys

import torch

from megalm.bench import kernels as bench
from megalm.kernels.utils import interpreting, triton_available


def test_bench_runs_references_on_cpu(tmp_path, capsys):
    if torch.cuda.is_available():
        import pytest

        pytest.skip("on a GPU the benchmark runs the full sweep; run it by hand")
    rows, peaks = bench.main(["--quick", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert "references only" in text and "TFLOP/s" in text and "GB/s" in text
    assert {r["provider"] for r in rows} == {"reference"}
    assert {r["kind"] for r in rows} == {"attention", "layernorm", "rmsnorm"}
    assert {(r["mode"], r["causal"], r["head_dim"]) for r in rows if r["kind"] == "attention"} == {
        (m, c, d) for m in ("fwd", "fwd+bwd") for c in (False, True) for d in (64, 128)}
    assert peaks["matmul_tflops"] > 0 and peaks["copy_gbps"] > 0
    for name in ("bench.csv", "bench_kernels.json", "bench_kernels.png"):
        assert (tmp_path / name).stat().st_size > 0
    record = json.loads((tmp_path / "bench_kernels.json").read_text())
    assert record["schema"] == "megalm-bench/1" and record["name"] == "kernels"
    assert record["environment"]["torch"] == torch.__version__
    meta = record["results"]
    assert meta["references_only"] is True and len(meta["rows"]) == len(rows)
    assert meta["attention_tiles"] == []                  # no Triton attention ran, so nothing was tuned


def test_triton_available_under_interpreter():
    assert triton_available() == (interpreting() or torch.cuda.is_available())


def test_imports_and_falls_back_without_triton():
    """With triton unimportable, every module imports and every wrapper returns its reference's result."""
    code = """
import sys
sys.modules["triton"] = None
import torch
from megalm.kernels import attention, cross_entropy, norm, rope, swiglu, utils
from megalm.bench import kernels as bench
assert not utils.HAS_TRITON and not utils.triton_available()
q = torch.randn(1, 3, 5, 16); k = torch.randn(1, 1, 5, 16)
assert torch.equal(attention.flash_attention(q, k, k), attention.attention_reference(q, k, k))
x, w = torch.randn(4, 7), torch.randn(7)
assert torch.equal(norm.rms_norm(x, w, 1e-5), norm.rms_norm_reference(x, w, 1e-5))
assert torch.equal(norm.layer_norm(x, w, None, 1e-5), norm.layer_norm_reference(x, w, None, 1e-5))
assert torch.equal(swiglu.swiglu(x, x), swiglu.swiglu_reference(x, x))
cos, sin = torch.randn(5, 16), torch.randn(5, 16)
assert torch.equal(rope.apply_rope(q, cos, sin), rope.rope_reference(q, cos, sin))
t, wv = torch.tensor([1, 2, 3, -100]), torch.randn(11, 7)
torch.testing.assert_close(cross_entropy.linear_cross_entropy(x, wv, t, chunk_rows=2),
                           cross_entropy.linear_cross_entropy_reference(x, wv, t))
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_table_and_plot_render_a_gpu_sweep(tmp_path, capsys):
    """The GPU run's rendering, fed a small sweep shaped like a GPU's (several providers, a backend that refused
    a shape): every provider gets a column, the refusal shows as nan, and the plot is written."""
    rows = []
    for provider, tflops in (("triton", 300.0), ("sdpa-flash", 280.0), ("sdpa-cudnn", float("nan"))):
        for mode in ("fwd", "fwd+bwd"):
            for seq in (1024, 4096):
                rows.append(dict(kind="attention", provider=provider, mode=mode, causal=True, head_dim=128,
                                 seq=seq, batch=1, heads=16, dtype="bfloat16", metric="TFLOP/s", value=tflops,
                                 note="" if tflops == tflops else "RuntimeError: no kernel"))
    for provider, gbps in (("triton", 2800.0), ("torch", 2000.0), ("liger", 2600.0)):
        for hidden in (2048, 8192):
            rows.append(dict(kind="rmsnorm", provider=provider, mode="fwd", hidden=hidden, rows=16384,
                             dtype="bfloat16", metric="GB/s", value=gbps, note=""))
    peaks = {"matmul_tflops": 750.0, "matmul_dtype": "bfloat16", "copy_gbps": 3200.0}
    bench._print(rows, peaks)
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("attention TFLOP/s"))
    assert all(p in header for p in ("triton", "sdpa-flash", "sdpa-cudnn"))
    assert "nan" in text and "( 88%)" in text                  # 2800 of 3200 GB/s
    from megalm.bench.harness import save_plot

    assert save_plot(lambda fig, axes: bench._draw(fig, axes, rows, peaks), tmp_path / "bench.png", nrows=1,
                     ncols=3) is not None
    assert (tmp_path / "bench.png").stat().st_size > 0
