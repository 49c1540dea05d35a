"""``megalm bench memory``: per-rank bytes of parameters, gradients and optimizer states under ZeRO 0-3, measured
on N gloo processes and printed beside the ZeRO paper's formulas (Rajbhandari et al. 2020, section 5.1).

Formulas for Ψ parameters on N data-parallel ranks with mixed-precision Adam (K = 12 bytes per parameter):
stage 0: 2Ψ + 2Ψ + KΨ; stage 1: 2Ψ + 2Ψ + KΨ/N; stage 2: 2Ψ + 2Ψ/N + KΨ/N; stage 3: (2 + 2 + K)Ψ/N.
The same with the widths of the run: working weights and gradients of ``w`` bytes (4 fp32, 2 bf16), Adam's
moments 8 bytes and an fp32 master copy of 4 bytes where DeepSpeed keeps one (always, except ZeRO-0 in fp32,
where the torch optimizer updates the model's own fp32 weights).

Measured in the second optimizer step (Adam's moments exist from the first), after each backward pass, at the
pass where the four model states add up to most (ZeRO-0/1 hold whole gradients until the accumulation
boundary): the bytes (numel x element size) of the tensors that hold each state, found where DeepSpeed keeps
them (``DeepSpeedEngine.model_states``). Two things beside them:
- buffers: DeepSpeed's gradient-reduction buckets (``ipg_buckets``), the ZeRO paper's constant-size buffers:
  ``reduce_bucket_size`` elements of the gradient width whatever the model's size;
- an independent cross-check: every tensor storage alive in the process (found through the garbage collector,
  each storage once), less those alive before the model was built. "other" = that total minus the states and
  buffers above: whatever the named places miss (padding of flat buffers, step counters, the batch). A state
  that ``model_states`` looked for in the wrong place shows up there.

What it shows with deepspeed 0.19.8 (2 ranks, the model below): every state of ZeRO-0, 1 and 3, fp32 and bf16,
equals the formula to the byte on both ranks, and "other" is 12-144 bytes. ZeRO-2's gradients exceed wΨ/N by
the other rank's share of the one parameter that straddles the two partitions, whose gradient each rank holds
whole during accumulation: +1,024 elements on rank 0, +15,360 on rank 1. Buckets seen after the backward
passes: ZeRO-1 holds one during the accumulation passes (freed at the boundary), ZeRO-3 after every pass,
ZeRO-0 and ZeRO-2 none. ZeRO-1's is 4 MB in fp32 (2 MB in bf16) per rank with megalm's default bucket
(the rank's share of the model, floor 1e6 elements, cap 5e7: ``engine.deepspeed.config.bucket_elements``);
DeepSpeed's own default, 5e8 elements, made it 2 GB (1 GB) whatever the model. The packaged zero3.json's 5e7
gives 200 MB (100 MB). ZeRO-0 in bf16 (DeepSpeed's FP16_UnfusedOptimizer) holds no fp32 gradient buffer between steps.
"""
from __future__ import annotations

import argparse
import gc
import json
import tempfile
from pathlib import Path

import torch

from megalm.bench.harness import save_plot, write_result

MODEL = {"model.vocab_size": 512, "model.hidden_size": 64, "model.num_layers": 2, "model.num_heads": 4,
         "model.ffn_hidden_size": 256, "model.max_seq_len": 32, "data.seq_len": 32, "data.prefix": "null",
         "train.micro_batch_size": 2, "train.global_batch_size": 8}   # 2 micro-batches per rank on 2 ranks
STATES = ("params", "grads", "master", "moments")


def _bytes(tensors) -> int:
    """Bytes of the distinct memory the tensors view: per storage, the union of their byte ranges (a flat
    buffer and views into it count once)."""
    ranges: dict[int, list] = {}
    for t in tensors:
        if t is None or t.numel() == 0 or t.device.type == "meta":
            continue
        start = t.storage_offset() * t.element_size()
        ranges.setdefault(t.untyped_storage().data_ptr(), []).append((start, start + t.numel() * t.element_size()))
    total = 0
    for spans in ranges.values():
        end = 0
        for lo, hi in sorted(spans):
            total += max(0, hi - max(lo, end))
            end = max(end, hi)
    return total


def _live_storages(extra=()) -> dict[int, tuple]:
    """data_ptr -> (bytes, dtype, shape) of every tensor storage alive in this process: the garbage collector
    tracks every Python tensor object (a type test, not isinstance, which would touch deprecated objects);
    ``extra`` adds tensors that may live in C++ only (.grad)."""
    live = {}
    for obj in [*gc.get_objects(), *extra]:
        if issubclass(type(obj), torch.Tensor) and obj.device.type != "meta":
            storage = obj.untyped_storage()
            if storage.nbytes():
                live.setdefault(storage.data_ptr(), (storage.nbytes(), str(obj.dtype), tuple(obj.shape)))
    return live


def _snapshot(engine, before: dict) -> dict:
    states = engine.model_states()
    row = {name: _bytes(tensors) for name, tensors in states.items()}
    grads = [p.grad for chunk in engine.chunks for p in chunk.parameters() if p.grad is not None]
    new = {ptr: v for ptr, v in _live_storages(grads).items() if ptr not in before}
    row["live"] = sum(v[0] for v in new.values())
    row["other"] = row["live"] - sum(row[name] for name in (*STATES, "buffers"))
    named = {t.untyped_storage().data_ptr() for ts in states.values() for t in ts if t is not None}
    row["largest_other"] = sorted((v for ptr, v in new.items() if ptr not in named), reverse=True)[:5]
    return row


def _measure(rank, world, overrides, out_dir):
    from megalm.config import load_config, resolve
    from megalm.engine import build_engine
    from megalm.parallel.topology import build_topology

    cfg = resolve(load_config(None, overrides), world)
    topo = build_topology()
    gc.collect()
    before_objects = [o for o in gc.get_objects() if issubclass(type(o), torch.Tensor)]   # kept alive: no address
    before = _live_storages()                                                          # is reused by a new one
    engine = build_engine(cfg, topo, torch.device("cpu"))
    gen = torch.Generator().manual_seed(rank)
    peak = None
    for step in range(2):
        for _ in range(cfg.grad_accumulation_steps(topo.dp) * len(engine.chunks)):
            tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len + 1),
                                   generator=gen)
            engine.backward(0, engine.forward(0, tokens[:, :-1], tokens[:, 1:]))
            del tokens
            if step == 1:
                gc.collect()
                row = _snapshot(engine, before)
                if peak is None or sum(row[k] for k in STATES) > sum(peak[k] for k in STATES):
                    peak = row
        engine.step(1e-3)
    peak["psi"] = engine.parameter_count()
    peak["reduce_bucket_size"] = engine.reduce_bucket_elements()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(peak))
    del before_objects


def formula(stage: int, precision: str, psi: int, n: int) -> dict:
    """Expected bytes per rank: working weights w, gradients w, fp32 master 4 (when kept), Adam moments 8."""
    w = 4 if precision == "fp32" else 2
    master = 0 if (stage == 0 and precision == "fp32") else 4
    return {"params": w * psi / (n if stage == 3 else 1), "grads": w * psi / (n if stage >= 2 else 1),
            "master": master * psi / (n if stage >= 1 else 1), "moments": 8 * psi / (n if stage >= 1 else 1)}


def measure(stage: int, precision: str, world: int = 2, model: dict | None = None) -> list[dict]:
    """One measurement per rank (a list indexed by rank) on ``world`` gloo processes."""
    from megalm.config import preset_folder
    from megalm.runtime.spawn import run_distributed

    with tempfile.TemporaryDirectory() as tmp:
        extra = {**MODEL, **(model or {}), "parallel.zero_stage": stage, "train.precision": precision,
                 "train.run_dir": tmp, "parallel.engine": "deepspeed"}
        if stage == 3:     # persistence threshold 0: every parameter is partitioned, as the formula assumes
            extra["parallel.deepspeed_config"] = str(preset_folder() / "deepspeed" / "zero3.json")
        run_distributed(_measure, world, [f"{k}={v}" for k, v in extra.items()], tmp)
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


def table(rows) -> str:
    cols = ("params", "grads", "fp32 master", "Adam m+v", "total")
    head = (f"{'prec':5} {'ZeRO':>4} {'rank':>4} | " + " | ".join(f"{c:>19}" for c in cols) +
            f" | {'buffers':>13} | {'all live (gc)':>13} | {'other':>9}")
    lines = ["bytes per rank, measured / formula; buffers: DeepSpeed's reduction buckets; all live: every tensor "
             "storage in the process, found by the garbage collector; other = all live - the rest", head,
             "-" * len(head)]
    for precision, stage, rank, got, want in rows:
        cells = [f"{got[k]:>9,} / {want[k]:>7,.0f}" for k in STATES]
        cells.append(f"{sum(got[k] for k in STATES):>9,} / {sum(want.values()):>7,.0f}")
        lines.append(f"{precision:5} {stage:>4} {rank:>4} | " + " | ".join(cells) +
                     f" | {got['buffers']:>13,} | {got['live']:>13,} | {got['other']:>9,}")
    return "\n".join(lines)


def _draw(ax, rows) -> None:
    """Stacked bars of the measured states per run (rank 0), a marker at the formula's total."""
    rows = [r for r in rows if r[2] == 0]
    labels = [f"{p}\nZeRO-{s}" for p, s, *_ in rows]
    bottom = [0.0] * len(rows)
    for key, name in zip(STATES, ("params", "grads", "fp32 master", "Adam m+v")):
        values = [got[key] / 2 ** 20 for *_, got, _ in rows]
        ax.bar(labels, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.scatter(labels, [sum(want.values()) / 2 ** 20 for *_, want in rows], color="black", marker="_", s=400,
               label="formula total", zorder=3)
    ax.set_ylabel("MiB per rank (rank 0)")
    ax.set_title("ZeRO model states per rank, measured vs formula")
    ax.legend(fontsize=8)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megalm bench memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", default="0,1,2,3", help="ZeRO stages to measure")
    parser.add_argument("--precisions", default="fp32,bf16", help="fp32 and/or bf16")
    parser.add_argument("--world", type=int, default=2, help="data-parallel processes (gloo)")
    parser.add_argument("--out", help="result folder (default runs/bench-memory)")
    args = parser.parse_args(argv)
    rows = []
    for precision in args.precisions.split(","):
        for stage in (int(s) for s in args.stages.split(",")):
            for rank, got in enumerate(measure(stage, precision, args.world)):
                rows.append((precision, stage, rank, got, formula(stage, precision, got["psi"], args.world)))
    print(f"model states per rank, N = {args.world} data-parallel ranks, Ψ = {rows[0][3]['psi']:,} parameters")
    print(table(rows))
    buckets = {f"ZeRO-{s}": got["reduce_bucket_size"] for _, s, r, got, _ in rows if r == 0}
    print("reduce_bucket_size (elements): " + ", ".join(f"{k} {v:,}" for k, v in buckets.items()))
    report = {"world": args.world, "psi": rows[0][3]["psi"], "model": MODEL,
              "rows": [{"precision": p, "stage": s, "rank": r, "measured": got, "formula": want}
                       for p, s, r, got, want in rows]}
    path = write_result("memory", report, args.out, context={"stages": args.stages, "precisions": args.precisions})
    plot = save_plot(lambda fig, ax: _draw(ax, rows), path.with_suffix(".png"),
                     figsize=(max(6, len(rows) * 0.45), 4))
    print(f"wrote {path}" + (f" and {plot}" if plot else " (no matplotlib: no chart)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
