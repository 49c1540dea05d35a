"""What every benchmark shares: one timer (warm-up, then a steady window: median and spread), the device's peak
(measured in the same run, and looked up by name), the environment, one JSON result schema, one plot helper and
one output convention (``runs/bench-<name>/``, or ``--out``).

Result files look like::

    {"schema": "megalm-bench/1", "name": "train", "created": "2026-12-02T05:00:00Z",
     "environment": {"torch": ..., "deepspeed": ..., "triton": ..., "cuda": ..., "device": ..., ...},
     "context": {... what the benchmark ran: config, layout, arguments ...},
     "results": {... its figures ...}}
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import socket
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

SCHEMA = "megalm-bench/1"

# Dense peak TFLOP/s per device by name (vendor datasheets, without sparsity): a matched substring of the
# device's name -> {dtype: TFLOP/s}. fp32 is the non-tensor-core rate; tf32 the tensor-core one.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0, "fp8": 1979.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0, "fp8": 1513.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0, "fp8": 1979.0},
    "GH200": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0, "fp8": 1979.0},
    "B200": {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 80.0, "fp8": 4500.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6, "fp8": 733.0},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 31.2},
    "MI300X": {"bf16": 1307.0, "fp16": 1307.0, "tf32": 654.0, "fp32": 163.4, "fp8": 2615.0},
    "MI250X": {"bf16": 383.0, "fp16": 383.0, "fp32": 47.9},
}


@dataclass(frozen=True)
class Timing:
    """Seconds per call over the steady window: the median, and the spread as the interquartile range relative
    to the median (0.05 = the middle half of the calls lies within 5% of the median's size)."""
    median_s: float
    spread: float
    calls: int

    def as_dict(self) -> dict:
        return asdict(self)


def figure(value: float, spread: float, better: str) -> dict:
    """One comparable figure of a result (``megalm bench compare`` reads them): "higher" or "lower" is better."""
    assert better in ("higher", "lower")
    return {"value": value, "spread": spread, "better": better}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steady(fn: Callable[[], object], steps: int, warmup: int = 2, device: torch.device | None = None) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``steps`` times, each timed on its own (device synchronised)."""
    device = device or torch.device("cpu")
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(max(1, steps)):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return timing_of(times)


def timing_of(times: list[float]) -> Timing:
    """The median of ``times`` and their spread (interquartile range over the median; the full range under 4)."""
    median = statistics.median(times)
    if len(times) >= 4:
        q = statistics.quantiles(times, n=4)
        spread = (q[2] - q[0]) / median
    else:
        spread = (max(times) - min(times)) / median
    return Timing(median, spread, len(times))


def kernel_timer(device: torch.device):
    """Milliseconds per call of a short kernel: Triton's ``do_bench`` (median, caches flushed) on a GPU, the median
    of a steady window on a CPU. ``timer(fn, grads=None)``; ``grads``: tensors whose .grad to clear between calls."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn, grads=None: triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grads,
                                                              return_mode="median")
    return lambda fn, grads=None: 1e3 * steady(fn, steps=3, warmup=1, device=device).median_s


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, n: int | None = None) -> float:
    """FLOP/s of a dense n x n matmul on this device, measured now (4096 on a GPU, 1024 on a CPU)."""
    n = n or (4096 if device.type == "cuda" else 1024)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    timing = steady(lambda: a @ b, steps=20 if device.type == "cuda" else 5, warmup=3, device=device)
    return 2 * n ** 3 / timing.median_s


def measured_copy_bytes_per_s(device: torch.device, numel: int | None = None) -> float:
    """Bytes moved per second by a device-to-device copy (read + write) of fp32, measured now."""
    numel = numel or ((1 << 28) if device.type == "cuda" else (1 << 23))
    src = torch.ones(numel, device=device, dtype=torch.float32)   # touched, so no page faults are timed
    dst = torch.zeros_like(src)
    timing = steady(lambda: dst.copy_(src), steps=10 if device.type == "cuda" else 3, warmup=1, device=device)
    return 2 * numel * 4 / timing.median_s


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def datasheet_peak_flops(name: str, dtype: str) -> float | None:
    """The datasheet's dense FLOP/s for a device name and dtype ("bf16", "fp16", "tf32", "fp32"); None when the
    device is not in the table (a CPU, an unlisted card)."""
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):       # "H100 PCIe" before "H100"
        if key.lower() in name.lower():
            value = PEAK_TFLOPS[key].get(dtype)
            return value * 1e12 if value is not None else None
    return None


def device_peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """(FLOP/s, where it came from) for MFU: the datasheet's dense peak of this GPU at ``precision`` (fp32 counts
    at the tf32 rate only where torch allows TF32), else a matmul measured now in that precision."""
    if device.type == "cuda":
        kind = precision if precision != "fp32" else ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32")
        sheet = datasheet_peak_flops(device_name(device), kind)
        if sheet:
            return sheet, f"{device_name(device)} datasheet, {kind}"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32                 # CPU fp16 matmuls are emulated: no peak worth the name
    measured = measured_matmul_flops(device, dtype, n=None if device.type == "cuda" else 512)   # ~0.1 s on a CPU
    return measured, f"measured {str(dtype).replace('torch.', '')} matmul on {device_name(device)}"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device | None = None) -> dict:
    """Versions and the machine: what a reader needs to compare two result files."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {
        "megalm": _version("megalm"), "torch": torch.__version__, "deepspeed": _version("deepspeed"),
        "triton": _version("triton"), "transformers": _version("transformers"),
        "cuda": torch.version.cuda, "device": device_name(device), "device_type": device.type,
        "gpus": torch.cuda.device_count(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "host": socket.gethostname(), "python": platform.python_version(),
    }


def output_dir(name: str, out: str | os.PathLike | None = None) -> Path:
    """``--out`` when given, else ``runs/bench-<name>``; created."""
    path = Path(out) if out else Path("runs") / f"bench-{name}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _clean(value):
    """JSON without NaN (written as null) and with tensors/paths/dtypes as plain values."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_result(name: str, results: dict, out: str | os.PathLike | None = None, context: dict | None = None,
                 device: torch.device | None = None, file_name: str | None = None) -> Path:
    """Write one result file in the common schema; returns its path."""
    record = {"schema": SCHEMA, "name": name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "environment": environment(device), "context": context or {}, "results": results}
    path = output_dir(name, out) / (file_name or f"bench_{name}.json")
    path.write_text(json.dumps(_clean(record), indent=1))
    return path


def read_result(path: str | os.PathLike) -> dict:
    """A result file written by ``write_result``; another file is refused with its name."""
    record = json.loads(Path(path).read_text())
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a megalm benchmark result (schema {SCHEMA})")
    return record


def save_plot(draw: Callable, path: str | os.PathLike, figsize=(7, 3.5), **subplots) -> Path | None:
    """``draw(fig, axes)`` fills a new figure, saved as a PNG at ``path``; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(figsize=figsize, **subplots)
    draw(fig, axes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
