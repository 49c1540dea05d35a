"""Compile every Triton kernel, with the tile configurations its GPU path launches, for a CUDA architecture, on
a machine without a GPU. ``python -m megalm.kernels.compile_check [--arch 90]``. Attention's tuning
candidates are all compiled, not only its defaults.

Triton's front end, its MLIR passes and the ptxas it ships run without a driver, so type errors that the
interpreter forgives (a variable whose type differs between the branches of a runtime ``if``, a constexpr
used as a tensor), failed lowerings and shared-memory budgets show here instead of on the first GPU run.
Launches are captured, not made: the real host wrappers run on CPU tensors (only their dtypes and shapes
matter) with ``can_launch`` forced true, and each ``kernel[grid](...)`` call records its arguments. Every
distinct (kernel, argument types, constexprs, warps, stages) is then compiled down to a cubin, and its static
shared memory is checked against the architecture's per-block limit.

Must run without ``TRITON_INTERPRET=1`` (under it, kernels are interpreted functions with nothing to compile).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time

import torch

# Largest shared memory one block may use (opt-in maximum), by compute capability.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}

@contextlib.contextmanager
def captured_launches():
    """Within the block, ``kernel[grid](*args, **kwargs)`` records (kernel, args, kwargs) instead of launching,
    and the kernel modules believe they may launch on CPU tensors."""
    from triton.runtime.jit import JITFunction

    from megalm.kernels import attention, cross_entropy, norm, rope, swiglu

    calls = []
    modules = [attention, cross_entropy, norm, rope, swiglu]
    saved = [(m, m.can_launch) for m in modules if hasattr(m, "can_launch")]
    tuning = (attention._tuning, attention._time_ms, dict(attention._TUNED))
    original = JITFunction.__getitem__
    JITFunction.__getitem__ = lambda fn, grid: (lambda *args, **kwargs: calls.append((fn, args, kwargs)))
    for module, _ in saved:
        module.can_launch = lambda *tensors: True
    # every tuning candidate is "timed" once, so it is captured and compiled too
    attention._tuning, attention._time_ms = (lambda: True), (lambda fn: (fn(), 0.0)[1])
    attention._TUNED.clear()
    try:
        yield calls
    finally:
        JITFunction.__getitem__ = original
        for module, fn in saved:
            module.can_launch = fn
        attention._tuning, attention._time_ms = tuning[:2]
        attention._TUNED.clear()
        attention._TUNED.update(tuning[2])


def _launch_everything(quick: bool = False) -> None:
    """Run each host wrapper over the shapes and dtypes whose GPU configurations differ. ``quick``: bf16 and
    fp32 attention at head dims 64 and 128 only (the configurations a test can afford)."""
    from megalm.kernels import attention, cross_entropy, norm, rope, swiglu

    dtypes = (torch.bfloat16, torch.float32) if quick else (torch.bfloat16, torch.float16, torch.float32)
    for dtype in dtypes:
        for d in (64, 128) if quick else (64, 128, 256):
            cases = ((4, True, False), (1, False, False), (4, True, True)) if quick else \
                ((1, True, False), (4, True, False), (1, False, False), (4, True, True))
            for group, causal, packed in cases:                # packed: document segment ids
                q = torch.empty(1, 4, 256, d, dtype=dtype)
                k = torch.empty(1, 4 // group, 256, d, dtype=dtype)
                segments = torch.arange(256).div(100, rounding_mode="floor")[None] if packed else None
                o, lse = attention._attn_forward(q, k, k, causal, 1 / math.sqrt(d), segments=segments)
                for deterministic in (True, False):
                    attention._attn_backward(torch.empty_like(o), q, k, k, o, lse, causal, 0.1, deterministic,
                                             segments)
        for hidden in (1024, 4096, 16384 if dtype == torch.float32 else 32768):
            x = torch.empty(8, hidden, dtype=dtype)
            w = torch.empty(hidden, dtype=dtype)
            for bias in (w, None):                        # LayerNorm, RMSNorm
                _, mean, rstd = norm._norm_forward(x, w, bias, 1e-5, bias is None)
                norm._norm_backward(torch.empty_like(x), x, w, bias is not None, mean, rstd, bias is None)
        x = torch.empty(2, 4, 128, 128, dtype=dtype)
        cos = torch.empty(128, 64, dtype=torch.float32)
        rope._rope(x, cos, cos, backward=False)
        gate = torch.empty(4096, dtype=dtype)
        swiglu.SwiGLUFunction.apply(gate, gate)
        z = torch.empty(64, 512, dtype=dtype)
        cross_entropy.linear_cross_entropy(z[:, :64].contiguous(), torch.empty(512, 64, dtype=dtype),
                                           torch.zeros(64, dtype=torch.long))


def _specialized(fn, args, kwargs, arch: int):
    """Triton's (signature, constexprs, attrs, options) for one recorded launch, specialised exactly as the JIT
    specialises a launch on a GPU: 16-byte aligned pointers and integers divisible by 16 are marked so. Those
    marks decide vector loads and asynchronous copies, and with them the software pipeline's shared memory;
    without them the same kernel compiles to scalar loads and reports a fraction of its real shared memory."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, parsed = binder(*args, **kwargs)
    _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, parsed)
    options = {k: kwargs[k] for k in ("num_warps", "num_stages", "num_ctas") if k in kwargs}
    return signature, constexprs, attrs, options


def _compile_one(job: tuple) -> dict:
    """Compile one kernel configuration (runs in a worker process; the kernel is found again by name)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name, signature, constexprs, attrs, options, arch = job
    fn = getattr(importlib.import_module(module), name)
    row = {"kernel": name, "types": sorted({t for t in signature.values() if t.startswith("*")}),
           "constexprs": {fn.arg_names[k[0]]: v for k, v in constexprs.items()}, **options}
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                  options=options)
        row.update(ok=True, shared=compiled.metadata.shared)
    except Exception as e:  # noqa: BLE001 - every failure is reported, then the check fails
        row.update(ok=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}")
    row["seconds"] = time.perf_counter() - start
    return row


def compile_all(arch: int = 90, quick: bool = False, workers: int | None = None) -> list[dict]:
    """Compile every captured launch for sm_{arch}, on all cores; one result row per distinct compilation."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    with captured_launches() as calls, torch.no_grad():
        _launch_everything(quick)
    jobs = {}
    for fn, args, kwargs in calls:
        signature, constexprs, attrs, options = _specialized(fn, args, kwargs, arch)
        key = (fn.__name__, tuple(signature.values()), repr(sorted(constexprs.items())), repr(sorted(attrs.items())),
               tuple(sorted(options.items())))
        jobs.setdefault(key, (fn.__module__, fn.__name__, signature, constexprs, attrs, options, arch))
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile_one, jobs.values()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megalm.kernels.compile_check", description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200, 80: A100)")
    ap.add_argument("--quick", action="store_true", help="bf16 and fp32 attention at head dims 64 and 128 only")
    args = ap.parse_args(argv)
    from megalm.kernels.utils import HAS_TRITON, interpreting

    if not HAS_TRITON or interpreting():
        print("compile_check: needs Triton, and TRITON_INTERPRET unset", file=sys.stderr)
        return 2
    limit = SHARED_LIMIT.get(args.arch)
    rows = compile_all(args.arch, args.quick)
    bad = 0
    print(f"{'kernel':24s} {'dtypes':18s} {'warps':>5s} {'stages':>6s} {'shared KB':>9s} {'s':>5s}  constexprs")
    for r in rows:
        over = r["ok"] and limit is not None and r["shared"] > limit
        bad += (not r["ok"]) or over
        shared = f"{r['shared'] / 1024:9.1f}" if r["ok"] else "   FAILED"
        print(f"{r['kernel']:24s} {','.join(t[1:] for t in r['types']):18s} {r.get('num_warps', '-'):>5} "
              f"{r.get('num_stages', '-'):>6} {shared} {r['seconds']:5.1f}  {r['constexprs']}"
              + ("  OVER the shared-memory limit" if over else "") + (f"\n    {r['error']}" if not r["ok"] else ""))
    print(f"sm_{args.arch}: {len(rows) - bad} of {len(rows)} kernel configurations compiled"
          + (f" within {limit / 1024:.0f} KB of shared memory" if limit else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
