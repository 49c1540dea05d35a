"""``megalm bench memory``: per-rank bytes of parameters, gradients and optimizer states under ZeRO 0-3, measured
on 2 gloo processes and printed beside the ZeRO paper's formulas (Rajbhandari et al. 2020, section 5.1).

Formulas for Ψ parameters on N data-parallel ranks with mixed-precision Adam (anchors.md, K = 12):
stage 0: 2Ψ + 2Ψ + KΨ; stage 1: 2Ψ + 2Ψ + KΨ/N; stage 2: 2Ψ + 2Ψ/N + KΨ/N; stage 3: (2 + 2 + K)Ψ/N.
The same with the widths of the run: working weights and gradients of ``w`` bytes (4 fp32, 2 bf16), Adam's
moments 8 bytes and an fp32 master copy of 4 bytes where DeepSpeed keeps one (always, except ZeRO-0 in fp32,
where the torch optimizer updates the model's own fp32 weights). Measured after one step; gradients after
each of the step's two backward passes, the larger kept (their peak). Fragment padding and bf16-ZeRO-0's fp32 gradient
accumulation buffer show up as differences, which is the point of measuring.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

MODEL = {"model.vocab_size": 512, "model.hidden_size": 64, "model.num_layers": 2, "model.num_heads": 4,
         "model.ffn_hidden_size": 256, "model.max_seq_len": 32, "data.seq_len": 32, "data.prefix": "null",
         "train.micro_batch_size": 2, "train.global_batch_size": 8}   # 2 micro-batches per rank


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is not None and torch.is_tensor(t) and t.dim() > 0 and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _grad_bytes(engine) -> int:
    """Gradient memory held at the boundary: .grad tensors plus ZeRO's/bf16's own gradient buffers."""
    opt = engine.ds.optimizer
    held = [p.grad for _, p, _ in engine.named]
    for attr in ("fp32_groups_gradients_flat",):                           # bf16 ZeRO-0: fp32 accumulation
        held += list(getattr(opt, attr, None) or [])
    averaged = getattr(opt, "averaged_gradients", None)                    # ZeRO-1/2: partitioned gradients
    if isinstance(averaged, dict) and engine.stage in (1, 2):
        held += [g for grads in averaged.values() for g in (grads or [])]
    if engine.stage == 3:
        held.append(getattr(opt, "grad_partitions_flat_buffer", None))    # ZeRO-3: this rank's partitions
    return _bytes(held)


def _measure(rank, world, overrides, out):
    from megalm.config import load_config
    from megalm.engine import DeepSpeedEngine, build_deepspeed_chunks
    from megalm.parallel.topology import build_topology

    cfg = load_config(None, overrides)
    topo = build_topology()
    engine = DeepSpeedEngine(cfg, topo, build_deepspeed_chunks(cfg, topo, torch.device("cpu")), torch.device("cpu"))
    gen = torch.Generator().manual_seed(rank)
    grads = 0
    for _ in range(engine.backwards_per_step):     # peak over accumulation (ZeRO-0/1 hold full .grad there)
        tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len + 1),
                               generator=gen)
        engine.backward(0, engine.forward(0, tokens[:, :-1], tokens[:, 1:]))
        grads = max(grads, _grad_bytes(engine))
    engine.step(1e-3)
    opt = engine.torch_optimizer
    flat = getattr(engine.ds.optimizer, "fp32_partitioned_groups_flat", None)
    master = flat if engine.stage == 3 else [q for g in opt.param_groups for q in g["params"]]
    own_weights = engine.stage == 0 and cfg.train.precision == "fp32"
    result = {
        "psi": sum(getattr(p, "ds_numel", p.numel()) for _, p, _ in engine.named),
        "params": _bytes(p.ds_tensor if hasattr(p, "ds_tensor") else p for _, p, _ in engine.named),
        "grads": grads,
        "master": 0 if own_weights else _bytes(master),
        "moments": _bytes(v for s in opt.state.values() for v in s.values()),
    }
    if rank == 0:
        Path(out).write_text(json.dumps(result))


def formula(stage: int, precision: str, psi: int, n: int) -> dict:
    """Expected bytes per rank: working weights w, gradients w, fp32 master 4 (when kept), Adam moments 8."""
    w = 4 if precision == "fp32" else 2
    master = 0 if (stage == 0 and precision == "fp32") else 4
    return {"params": w * psi / (n if stage == 3 else 1), "grads": w * psi / (n if stage >= 2 else 1),
            "master": master * psi / (n if stage >= 1 else 1), "moments": 8 * psi / (n if stage >= 1 else 1)}


def measure(stage: int, precision: str, world: int = 2) -> dict:
    from megalm.testing import run_distributed

    with tempfile.TemporaryDirectory() as tmp:
        extra = {**MODEL, "parallel.zero_stage": stage, "train.precision": precision,
                 "train.run_dir": tmp, "parallel.engine": "deepspeed"}
        if stage == 3:
            extra["parallel.deepspeed_config"] = str(Path(__file__).resolve().parents[1] / "configs" / "deepspeed" /
                                                     "zero3.json")
        out = Path(tmp) / "result.json"
        run_distributed(_measure, world, [f"{k}={v}" for k, v in extra.items()], str(out))
        return json.loads(out.read_text())


def table(rows) -> str:
    head = (f"{'prec':5} {'ZeRO':>4} | {'params':>17} | {'grads':>17} | {'fp32 master':>17} | {'Adam m+v':>17} | "
            f"{'total':>17}")
    lines = [head, "       (bytes per rank, measured / formula)", "-" * len(head)]
    for precision, stage, got, want in rows:
        cells = [f"{got[k]:>8,} / {want[k]:>8,.0f}" for k in ("params", "grads", "master", "moments")]
        total = f"{sum(got[k] for k in want):>8,} / {sum(want.values()):>8,.0f}"
        lines.append(f"{precision:5} {stage:>4} | " + " | ".join(cells) + f" | {total}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megalm bench memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", default="0,1,2,3", help="ZeRO stages to measure")
    parser.add_argument("--precisions", default="fp32,bf16", help="fp32 and/or bf16")
    parser.add_argument("--world", type=int, default=2, help="data-parallel processes (gloo)")
    args = parser.parse_args(argv)
    rows = []
    for precision in args.precisions.split(","):
        for stage in (int(s) for s in args.stages.split(",")):
            got = measure(stage, precision, args.world)
            want = formula(stage, precision, got["psi"], args.world)
            rows.append((precision, stage, got, want))
    print(f"model states per rank, N = {args.world} data-parallel ranks, Ψ = {rows[0][2]['psi']:,} parameters")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
