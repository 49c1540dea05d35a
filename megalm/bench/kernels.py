"""Kernel benchmark: ``megalm bench kernels [--quick] [--out DIR]``.

Prints, in one run, the measured peak of the device (a large matmul, a device copy), attention TFLOP/s
(forward and forward+backward, causal and not, head dims 64 and 128, sequence 512 to 16k at 16k tokens per
batch and hidden 2048, as in the FlashAttention papers) and norm GB/s, side by side with torch SDPA (default,
flash backend, cuDNN backend), flash-attn, and torch/apex/Liger norms where installed. Writes bench.csv,
bench_kernels.json and bench_kernels.png under --out (default runs/bench-kernels). Without CUDA it times
the PyTorch references at small shapes and says so.

FLOPs: attention forward 4 B T^2 H D (half when causal), backward 2.5x forward. Norm bytes: forward reads x
and writes y; backward reads x and dy and writes dx (weights are negligible).
"""
from __future__ import annotations

import argparse
import contextlib
import csv

import torch
import torch.nn.functional as F

from megalm.bench.harness import (
    datasheet_peak_flops,
    device_name,
    kernel_timer,
    measured_copy_bytes_per_s,
    measured_matmul_flops,
    output_dir,
    save_plot,
    write_result,
)
from megalm.kernels.attention import attention_reference, flash_attention
from megalm.kernels.norm import layer_norm, layer_norm_reference, rms_norm, rms_norm_reference
from megalm.kernels.utils import HAS_TRITON, interpreting


def measure_peaks(device, quick: bool) -> dict:
    """The card in hand: dense matmul TFLOP/s (bf16 on GPU, fp32 on CPU) and device-copy GB/s, measured now,
    and the datasheet's matmul peak where the device is known."""
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    flops = measured_matmul_flops(device, dtype, n=(8192 if not quick else 4096) if gpu else 512)
    sheet = datasheet_peak_flops(device_name(device), "bf16" if gpu else "fp32")
    return {"matmul_tflops": flops / 1e12, "matmul_dtype": str(dtype).replace("torch.", ""),
            "copy_gbps": measured_copy_bytes_per_s(device) / 1e9,
            "datasheet_matmul_tflops": sheet / 1e12 if sheet else None}


def _attention_providers(gpu: bool) -> dict:
    """name -> fn(q, k, v, causal) for the layout (B, H, T, D); only those that can run here."""
    if not gpu:
        return {"reference": attention_reference}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend=None):
        def fn(q, k, v, causal):
            ctx = sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
            with ctx:
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return fn

    providers = {"triton": lambda q, k, v, c: flash_attention(q, k, v, causal=c), "sdpa": sdpa(),
                 "sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION),
                 "sdpa-cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}
    try:
        from flash_attn import flash_attn_func

        providers["flash-attn"] = lambda q, k, v, c: flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=c).transpose(1, 2)
    except ImportError:
        pass
    return providers


def _norm_providers(gpu: bool) -> dict:
    """name -> (layer_norm fn(x, w, b, eps) or None, rms_norm fn(x, w, eps) or None)."""
    if not gpu:
        return {"reference": (layer_norm_reference, rms_norm_reference)}
    rms_torch = getattr(F, "rms_norm", None)
    providers = {"triton": (layer_norm, rms_norm),
                 "torch": (lambda x, w, b, eps: F.layer_norm(x, x.shape[-1:], w, b, eps),
                           (lambda x, w, eps: rms_torch(x, x.shape[-1:], w, eps)) if rms_torch else None)}
    try:
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine, fused_rms_norm_affine

        providers["apex"] = (lambda x, w, b, eps: fused_layer_norm_affine(x, w, b, x.shape[-1:], eps),
                             lambda x, w, eps: fused_rms_norm_affine(x, w, x.shape[-1:], eps))
    except ImportError:
        pass
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        providers["liger"] = (lambda x, w, b, eps: LigerLayerNormFunction.apply(x, w, b, eps),
                              lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps))
    except ImportError:
        pass
    return providers


def _run(timer, fn, leaves, backward: bool):
    """ms of fn() (forward) or fn() then backward with a fixed output gradient."""
    if not backward:
        with torch.no_grad():
            return timer(fn)
    out = fn()
    dout = torch.randn_like(out)
    return timer(lambda: fn().backward(dout), grads=leaves)


def bench_attention(device, timer, gpu: bool, quick: bool) -> list[dict]:
    dtype = torch.bfloat16 if gpu else torch.float32
    seqs = ([1024, 4096] if quick else [512, 1024, 2048, 4096, 8192, 16384]) if gpu else [128, 256]
    tokens, hidden = (16384, 2048) if gpu else (256, 256)
    rows = []
    for name, fn in _attention_providers(gpu).items():
        for d in (64, 128):
            for causal in (False, True):
                for t in seqs:
                    b, h = max(1, tokens // t), hidden // d
                    q, k, v = (torch.randn(b, h, t, d, device=device, dtype=dtype, requires_grad=True)
                               for _ in range(3))
                    flops_fwd = 4 * b * h * t * t * d / (2 if causal else 1)
                    for mode, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):
                        try:
                            ms = _run(timer, lambda: fn(q, k, v, causal), [q, k, v], mode != "fwd")
                            value, note = mult * flops_fwd / ms / 1e9, ""
                        except Exception as e:  # noqa: BLE001 - a backend that refuses a shape is reported
                            value, note = float("nan"), f"{type(e).__name__}: {str(e)[:80]}"
                        rows.append(dict(kind="attention", provider=name, mode=mode, causal=causal,
                                         head_dim=d, seq=t, batch=b, heads=h,
                                         dtype=str(dtype).replace("torch.", ""), metric="TFLOP/s",
                                         value=value, note=note))
    return rows


def bench_norms(device, timer, gpu: bool, quick: bool) -> list[dict]:
    dtype = torch.bfloat16 if gpu else torch.float32
    m = 16384 if gpu else 512
    hiddens = ([2048, 8192] if quick else [1024, 2048, 4096, 8192, 16384]) if gpu else [256, 1024]
    rows = []
    for name, (ln, rms) in _norm_providers(gpu).items():
        for kind, fn in (("layernorm", ln), ("rmsnorm", rms)):
            if fn is None:
                continue
            for n in hiddens:
                x = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True)
                w = torch.ones(n, device=device, dtype=dtype, requires_grad=True)
                b = torch.zeros(n, device=device, dtype=dtype, requires_grad=True)
                call = (lambda: fn(x, w, b, 1e-5)) if kind == "layernorm" else (lambda: fn(x, w, 1e-5))
                leaves = [x, w, b] if kind == "layernorm" else [x, w]
                for mode, passes in (("fwd", 2), ("fwd+bwd", 5)):
                    try:
                        ms = _run(timer, call, leaves, mode != "fwd")
                        value, note = passes * x.numel() * x.element_size() / ms / 1e6, ""
                    except Exception as e:  # noqa: BLE001
                        value, note = float("nan"), f"{type(e).__name__}: {str(e)[:80]}"
                    rows.append(dict(kind=kind, provider=name, mode=mode, hidden=n, rows=m,
                                     dtype=str(dtype).replace("torch.", ""), metric="GB/s", value=value,
                                     note=note))
    return rows


def tuned_tiles() -> list[dict]:
    """The tile configuration each attention kernel kept per shape in this process (empty without tuning)."""
    from megalm.kernels import attention

    rows = []
    for (stage, b, hq, hkv, t, d, dtype, causal), cfg in sorted(attention._TUNED.items(), key=str):
        rows.append(dict(stage=stage, batch=b, heads=hq, kv_heads=hkv, seq=t, head_dim=d,
                         dtype=str(dtype).replace("torch.", ""), causal=causal, **cfg))
    return rows


def _print(rows, peaks):
    print(f"peak: matmul {peaks['matmul_tflops']:.3g} TFLOP/s ({peaks['matmul_dtype']}), "
          f"copy {peaks['copy_gbps']:.4g} GB/s")
    att = [r for r in rows if r["kind"] == "attention"]
    providers = sorted({r["provider"] for r in att})
    if att:
        print("\nattention TFLOP/s  " + " ".join(f"{p:>11}" for p in providers))
        keys = sorted({(r["mode"], r["causal"], r["head_dim"], r["seq"]) for r in att})
        for key in keys:
            vals = {r["provider"]: r["value"] for r in att
                    if (r["mode"], r["causal"], r["head_dim"], r["seq"]) == key}
            label = f"{key[0]:>7} {'causal' if key[1] else 'full':>6} d{key[2]:<3} T{key[3]:<5}"
            print(label + " ".join(f"{vals.get(p, float('nan')):11.3g}" for p in providers))
    norm = [r for r in rows if r["kind"] != "attention"]
    providers = sorted({r["provider"] for r in norm})
    if norm:
        print("\nnorm GB/s (% of copy)   " + " ".join(f"{p:>15}" for p in providers))
        for key in sorted({(r["kind"], r["mode"], r["hidden"]) for r in norm}):
            vals = {r["provider"]: r["value"] for r in norm if (r["kind"], r["mode"], r["hidden"]) == key}
            cells = []
            for p in providers:
                v = vals.get(p, float("nan"))
                cells.append(f"{v:9.4g} ({100 * v / peaks['copy_gbps']:3.0f}%)")
            print(f"{key[0]:>9} {key[1]:>7} N{key[2]:<6}" + " ".join(f"{c:>15}" for c in cells))


def _draw(fig, axes, rows, peaks) -> None:
    for ax, mode in zip(axes[:2], ("fwd", "fwd+bwd")):
        sel = [r for r in rows if r["kind"] == "attention" and r["mode"] == mode]
        for key in sorted({(r["provider"], r["head_dim"], r["causal"]) for r in sel}):
            pts = sorted((r["seq"], r["value"]) for r in sel
                         if (r["provider"], r["head_dim"], r["causal"]) == key)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    label=f"{key[0]} d{key[1]} {'causal' if key[2] else 'full'}")
        ax.axhline(peaks["matmul_tflops"], color="k", ls="--", label="matmul peak")
        ax.set(xscale="log", xlabel="sequence length", ylabel="TFLOP/s", title=f"attention {mode}")
        ax.legend(fontsize=6)
    sel = [r for r in rows if r["kind"] != "attention"]
    for key in sorted({(r["provider"], r["kind"], r["mode"]) for r in sel}):
        pts = sorted((r["hidden"], r["value"]) for r in sel if (r["provider"], r["kind"], r["mode"]) == key)
        axes[2].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=" ".join(key))
    axes[2].axhline(peaks["copy_gbps"], color="k", ls="--", label="copy peak")
    axes[2].set(xscale="log", xlabel="hidden size", ylabel="GB/s", title="norms")
    axes[2].legend(fontsize=6)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="megalm bench kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--out", help="result folder (default runs/bench-kernels)")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available() and HAS_TRITON and not interpreting()
    device = torch.device("cuda" if gpu else "cpu")
    if gpu:
        print(f"device: {torch.cuda.get_device_name()} (torch {torch.__version__})")
    else:
        print("no CUDA device (or Triton missing / interpreting): running the PyTorch references only, at "
              "small shapes; these numbers time the CPU, not the kernels")
    timer = kernel_timer(device)
    peaks = measure_peaks(device, args.quick)
    rows = bench_attention(device, timer, gpu, args.quick) + bench_norms(device, timer, gpu, args.quick)
    _print(rows, peaks)
    out = output_dir("kernels", args.out)
    with open(out / "bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    tiles = tuned_tiles()
    for row in tiles:
        print("attention tile chosen: " + ", ".join(f"{k}={v}" for k, v in row.items()))
    results = {"references_only": not gpu, "peaks": peaks, "attention_tiles": tiles, "rows": rows}
    path = write_result("kernels", results, out, context=vars(args), device=device)
    plot = save_plot(lambda fig, axes: _draw(fig, axes, rows, peaks), path.with_suffix(".png"), figsize=(18, 5),
                     nrows=1, ncols=3)
    print(f"\nwrote {out / 'bench.csv'}, {path}" + (f", {plot}" if plot else ""))
    return rows, peaks


if __name__ == "__main__":
    main()
