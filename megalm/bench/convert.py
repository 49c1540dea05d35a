"""``megalm bench convert``: conversion throughput against a plain copy of the same bytes on the same disk, and
each conversion's peak memory against the largest tensor, measured in one run.

A synthetic checkpoint (random weights of a Llama-style model of the size asked for) is written first; then
its files are copied with shutil (the baseline), and converted to another layout, to Hugging Face, and back.
Each conversion runs in its own process so that its peak RSS is its own (reported above the RSS of a process
that only imported the converter).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from megalm.bench.harness import output_dir, save_plot, write_result
from megalm.config import Config, ModelConfig


def synthetic_checkpoint(path: Path, model: ModelConfig) -> int:
    from megalm.checkpoint.convert import base_meta, write_checkpoint
    from megalm.checkpoint.layout import meta_chunks

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
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds of copy and conversions")
    ap.add_argument("--workdir", help="where to write (default: a temporary folder on the same disk as --out)")
    ap.add_argument("--out", help="result folder (default runs/bench-convert)")
    args = ap.parse_args(argv)
    model = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                        num_heads=max(1, args.hidden // 64), num_kv_heads=max(1, args.hidden // 256),
                        ffn_hidden_size=args.hidden * 8 // 3 // 64 * 64, max_seq_len=256, norm="rmsnorm",
                        activation="swiglu", position="rope", bias=False, tie_embeddings=False)
    out = output_dir("convert", args.out)
    work = Path(tempfile.mkdtemp(dir=args.workdir or out))
    try:
        src = work / "src"
        largest = synthetic_checkpoint(src, model)
        size = _dir_bytes(src)
        py = [sys.executable, "-m", "megalm"]
        _, idle_rss, _ = _child_peak_rss([sys.executable, "-c", "import megalm.checkpoint.convert"])
        runs = {
            "layout tp1 -> tp2 x pp2": lambda i: py + ["convert", "layout", "--src", str(src), "--dst",
                                                       str(work / f"tp2pp2-{i}"), "--tp", "2", "--pp", "2"],
            "megalm -> Hugging Face": lambda i: py + ["convert", "to-hf", "--src", str(src), "--dst",
                                                      str(work / f"hf-{i}")],
            "Hugging Face -> megalm tp2": lambda i: py + ["convert", "from-hf", "--src", str(work / f"hf-{i}"),
                                                          "--dst", str(work / f"back-{i}"), "--tp", "2"],
        }
        # Each conversion is paired with a durable copy of the same bytes, run just before it in even rounds
        # and just after it in odd ones: a virtual disk whose speed drifts with recent writes (burst credits,
        # host write-back) then touches both sides of each pair alike. Medians over the rounds are reported.
        cached_copy_s = _copy_seconds(src, work / "cached")
        shutil.rmtree(work / "cached")
        results = {name: [] for name in runs}
        for i in range(args.repeat):
            for name, cmd in runs.items():
                copy_dir = work / f"copy-{i}"
                if i % 2 == 0:
                    copy_s = _copy_seconds(src, copy_dir, durable=True)
                seconds, rss, output = _child_peak_rss(cmd(i))
                if i % 2 == 1:
                    copy_s = _copy_seconds(src, copy_dir, durable=True)
                shutil.rmtree(copy_dir)
                results[name].append({"seconds": seconds, "alone": _inner_rate(output), "rss": rss,
                                      "copy": size / copy_s / 1e9})
            for d in work.glob(f"*-{i}"):
                if d.name.startswith(("tp2pp2", "back")):
                    shutil.rmtree(d)
        copies = [r["copy"] for rs in results.values() for r in rs]
        report = {"bytes": size, "largest_tensor_bytes": largest, "repeats": args.repeat,
                  "copy_gb_per_s": statistics.median(copies), "cached_copy_gb_per_s": size / cached_copy_s / 1e9,
                  "idle_rss": idle_rss, "conversions": {}}
        print(f"checkpoint {size / 1e9:.2f} GB, largest tensor {largest / 1e6:.0f} MB; {args.repeat} rounds, each "
              f"conversion paired with a durable copy (fsync, as the converters do) of the same bytes. Plain copy "
              f"{report['copy_gb_per_s']:.2f} GB/s (median; from {min(copies):.2f} to {max(copies):.2f}), "
              f"{report['cached_copy_gb_per_s']:.2f} GB/s into the page cache only")
        print(f"{'conversion':28s} {'GB/s':>6s} {'alone':>6s} {'its copy':>9s} {'vs copy':>8s} "
              f"{'peak RSS above import':>22s} {'/ largest':>10s}")
        for name, rs in results.items():
            rate = size / statistics.median(r["seconds"] for r in rs) / 1e9
            inner = statistics.median(r["alone"] for r in rs)
            copy = statistics.median(r["copy"] for r in rs)
            ratio = statistics.median(r["alone"] / r["copy"] for r in rs)
            extra = max(0, max(r["rss"] for r in rs) - idle_rss)
            report["conversions"][name] = {"gb_per_s": rate, "gb_per_s_alone": inner, "paired_copy_gb_per_s": copy,
                                           "vs_copy": ratio, "rounds": rs, "rss_above_import": extra}
            print(f"{name:28s} {rate:6.2f} {inner:6.2f} {copy:9.2f} {ratio:8.0%} {extra / 1e6:19.0f} MB "
                  f"{extra / largest:9.1f}x")
        print("GB/s: whole command (Python start-up, torch import, sha256 of source and result included); alone: "
              "the conversion itself; its copy: the durable copies paired with it; vs copy: median of alone / its "
              "copy per round. All count the checkpoint's bytes; peak RSS is the largest of the rounds.")
        path = write_result("convert", report, out, context=vars(args))
        plot = save_plot(lambda fig, ax: _draw(ax, report), path.with_suffix(".png"), figsize=(7.5, 3.4))
        print(f"wrote {path}" + (f" and {plot}" if plot else ""))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _draw(ax, report: dict) -> None:
    names = list(report["conversions"])
    convs = report["conversions"].values()
    y = range(len(names))
    ax.barh([i + 0.2 for i in y], [c["paired_copy_gb_per_s"] for c in convs], height=0.4,
            label="plain durable copy (paired)")
    ax.barh([i - 0.2 for i in y], [c["gb_per_s_alone"] for c in convs], height=0.4, label="conversion")
    ax.set_yticks(list(y), names)
    ax.set_xlabel("GB/s (medians)")
    ax.set_title(f"checkpoint conversion, {report['bytes'] / 1e9:.2f} GB, {report['repeats']} rounds")
    ax.legend(loc="lower right", fontsize=8)
