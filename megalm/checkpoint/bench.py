"""``megalm bench convert``: conversion throughput against a plain copy of the same bytes on the same disk, and
each conversion's peak memory against the largest tensor, measured in one run.

A synthetic checkpoint (random weights of a Llama-style model of the size asked for) is written first; then
its files are copied with shutil (the baseline), and converted to another layout, to Hugging Face, and back.
Each conversion runs in its own process so that its peak RSS is its own (reported above the RSS of a process
that only imported the converter).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from megalm.config import Config, ModelConfig


def synthetic_checkpoint(path: Path, model: ModelConfig) -> int:
    from megalm.checkpoint.convert import base_meta, write_checkpoint
    from megalm.checkpoint.plan import meta_chunks

    chunk = meta_chunks(model, 1, 0, 1, 0)[0]
    tensors = {f"model.{n}": ("float32", tuple(p.shape)) for n, p in chunk.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    write_checkpoint(path, model, tensors, lambda name, spec, shape: torch.randn(shape, generator=gen) * 0.02,
                     base_meta(Config(model=model)), label="write synthetic")
    return max(torch.Size(s).numel() * 4 for _, s in tensors.values())


def _child_peak_rss(cmd: list[str]) -> tuple[float, int, str]:
    """Run ``cmd``; return (seconds, peak RSS in bytes, output) of that process alone."""
    os.sync()                  # start with no dirty pages of earlier steps being written back meanwhile
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    out = proc.stdout.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out}")
    return seconds, usage.ru_maxrss * 1024, out


def _inner_rate(output: str) -> float:
    """The converter's own GB/s line (the conversion without interpreter start-up)."""
    rates = re.findall(r"\(([0-9.]+) GB/s\)", output)
    return float(rates[-1]) if rates else float("nan")


def _copy_seconds(src: Path, dst: Path, durable: bool = False) -> float:
    """shutil.copyfile of every file (the kernel's copy_file_range); durable: fsync each, as converters do."""
    dst.mkdir()
    os.sync()
    start = time.perf_counter()
    for f in src.iterdir():
        shutil.copyfile(f, dst / f.name)
        if durable:
            fd = os.open(dst / f.name, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    return time.perf_counter() - start


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="megalm bench convert", description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--workdir", help="where to write (default: a temporary folder on the same disk as --out)")
    ap.add_argument("--out", default="runs/bench-convert")
    args = ap.parse_args(argv)
    model = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                        num_heads=max(1, args.hidden // 64), num_kv_heads=max(1, args.hidden // 256),
                        ffn_hidden_size=args.hidden * 8 // 3 // 64 * 64, max_seq_len=256, norm="rmsnorm",
                        activation="swiglu", position="rope", bias=False, tie_embeddings=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=args.workdir or out))
    try:
        src = work / "src"
        largest = synthetic_checkpoint(src, model)
        size = _dir_bytes(src)
        copy_s, cached_copy_s = _copy_seconds(src, work / "copy", durable=True), _copy_seconds(src, work / "copy2")
        py = [sys.executable, "-m", "megalm"]
        _, idle_rss, _ = _child_peak_rss([sys.executable, "-c", "import megalm.checkpoint.convert"])
        runs = {
            "layout tp1 -> tp2 x pp2": py + ["convert", "layout", "--src", str(src), "--dst", str(work / "tp2pp2"),
                                             "--tp", "2", "--pp", "2"],
            "megalm -> Hugging Face": py + ["convert", "to-hf", "--src", str(src), "--dst", str(work / "hf")],
            "Hugging Face -> megalm tp2": py + ["convert", "from-hf", "--src", str(work / "hf"), "--dst",
                                               str(work / "back"), "--tp", "2"],
        }
        report = {"bytes": size, "largest_tensor_bytes": largest, "copy_seconds": copy_s,
                  "copy_gb_per_s": size / copy_s / 1e9, "cached_copy_gb_per_s": size / cached_copy_s / 1e9,
                  "idle_rss": idle_rss, "conversions": {}}
        print(f"checkpoint {size / 1e9:.2f} GB, largest tensor {largest / 1e6:.0f} MB; plain copy "
              f"{size / copy_s / 1e9:.2f} GB/s durable (fsync, as the converters do), "
              f"{size / cached_copy_s / 1e9:.2f} GB/s into the page cache only")
        print(f"{'conversion':28s} {'GB/s':>6s} {'alone':>6s} {'vs copy':>8s} {'peak RSS above import':>22s} "
              f"{'/ largest':>10s}")
        for name, cmd in runs.items():
            seconds, rss, output = _child_peak_rss(cmd)
            rate, inner = size / seconds / 1e9, _inner_rate(output)
            extra = max(0, rss - idle_rss)
            report["conversions"][name] = {"seconds": seconds, "gb_per_s": rate, "gb_per_s_alone": inner,
                                           "peak_rss": rss, "rss_above_import": extra}
            print(f"{name:28s} {rate:6.2f} {inner:6.2f} {inner / report['copy_gb_per_s']:8.0%} "
                  f"{extra / 1e6:19.0f} MB {extra / largest:9.1f}x")
        print("GB/s: whole command (Python start-up, torch import, sha256 of source and result included); alone: "
              "the conversion itself; vs copy: alone against the durable copy. All count the checkpoint's bytes.")
        (out / "bench_convert.json").write_text(json.dumps(report, indent=1))
        _plot(report, out / "bench_convert.png")
        print(f"wrote {out / 'bench_convert.json'} and {out / 'bench_convert.png'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["plain copy"] + list(report["conversions"])
    rates = [report["copy_gb_per_s"]] + [c["gb_per_s"] for c in report["conversions"].values()]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.barh(names, rates)
    ax.set_xlabel("GB/s")
    ax.set_title(f"checkpoint conversion, {report['bytes'] / 1e9:.2f} GB")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
