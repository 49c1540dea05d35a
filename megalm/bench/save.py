"""``megalm bench save``: how long a checkpoint blocks training, asynchronous against synchronous, and the
steps/s of a run that saves every ``--interval`` steps against one that never saves, in one run.

Each model trains three times on the same data: synchronous saves, asynchronous saves, and no saves (only the
final one, not counted). From ``metrics.jsonl``: the step time (tokens per step / tokens/s, which includes any
slowdown from a save writing in the background) and each save's blocking time. A run's effective rate is one
over its median step time plus its saves' blocking time per step (the median keeps the warming-up first steps
out). Models: the tiny preset, and GPT-2 124M (weights and Adam moments in fp32: a 1.5 GB checkpoint) unless
``--no-large``.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from megalm.bench.harness import output_dir, save_plot, write_result

MODELS = {
    "tiny": ["model.num_layers=4", "model.hidden_size=128", "model.num_heads=4", "model.num_kv_heads=2",
             "model.max_seq_len=128", "data.seq_len=128", "train.micro_batch_size=8", "train.global_batch_size=8"],
    "gpt2-124m": ["model.num_layers=12", "model.hidden_size=768", "model.num_heads=12", "model.max_seq_len=64",
                  "data.seq_len=64", "train.micro_batch_size=1", "train.global_batch_size=1", "model.dropout=0"],
}


def _run(prefix: str, run_dir: Path, model: list[str], steps: int, interval: int, asynchronous: bool) -> dict:
    from megalm.config import load_config
    from megalm.train.loop import train
    from megalm.train.metrics import read_metrics
    overrides = model + [f"data.prefix={prefix}", f"train.run_dir={run_dir}", f"train.steps={steps}",
                         f"checkpoint.interval={interval}", f"checkpoint.async_save={str(asynchronous).lower()}",
                         "train.eval_interval=0", "train.eval_samples=8", "train.log_interval=1000",
                         "logging.plot=false", "logging.tensorboard=false", "train.precision=fp32",
                         "checkpoint.keep=1"]
    train(load_config(None, overrides))
    records = read_metrics(run_dir)
    per_step = [1 / r["tokens_per_s"] for r in records if "loss" in r]      # seconds per token of each step
    step_s = [s * _tokens_per_step(model) for s in per_step]
    saves = [r for r in records if "checkpoint_s" in r and r["step"] < steps]     # the final save is not counted
    blocked = sum(r["checkpoint_blocked_s"] for r in saves)
    return {"steps": steps, "step_s_median": statistics.median(step_s), "steps_s_total": sum(step_s),
            "saves": len(saves), "blocked_s": blocked, "save_s": [r["checkpoint_s"] for r in saves],
            "blocked_per_save_s": blocked / len(saves) if saves else 0.0,
            "steps_per_s": 1 / (statistics.median(step_s) + blocked / steps)}


def _tokens_per_step(model: list[str]) -> int:
    values = dict(o.split("=", 1) for o in model)
    return int(values["train.global_batch_size"]) * int(values["data.seq_len"])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="megalm bench save", description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/stdlib", help="dataset prefix (preprocessed first if missing)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--interval", type=int, default=10)
    ap.add_argument("--no-large", action="store_true", help="only the tiny model")
    ap.add_argument("--out", help="result folder (default runs/bench-save)")
    args = ap.parse_args(argv)
    if not Path(f"{args.data}.idx").exists():
        from megalm.data.preprocess import preprocess
        preprocess(None, args.data, workers=2, show_progress=False)
    out = output_dir("save", args.out)
    results = {}
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        for name in ["tiny"] + ([] if args.no_large else ["gpt2-124m"]):
            steps = args.steps if name == "tiny" else max(2 * args.interval, 20)
            row = {kind: _run(args.data, Path(tmp) / f"{name}-{kind}", MODELS[name], steps,
                              steps + 1 if kind == "never" else args.interval, kind == "async")
                   for kind in ("sync", "async", "never")}
            sync, asyn, never = row["sync"], row["async"], row["never"]
            row["blocking_fraction"] = asyn["blocked_per_save_s"] / statistics.median(sync["save_s"])
            results[name] = row
            print(f"{name}: a synchronous save blocks {statistics.median(sync['save_s']):.3f}s, an asynchronous one "
                  f"{asyn['blocked_per_save_s']:.3f}s ({row['blocking_fraction']:.1%}); steps/s: never saving "
                  f"{never['steps_per_s']:.3f}, saving every {args.interval} steps sync {sync['steps_per_s']:.3f} "
                  f"({sync['steps_per_s'] / never['steps_per_s']:.1%}), async {asyn['steps_per_s']:.3f} "
                  f"({asyn['steps_per_s'] / never['steps_per_s']:.1%})", flush=True)
    path = write_result("save", results, args.out, context={"steps": args.steps, "interval": args.interval})

    def draw(fig, ax):
        names = list(results)
        for i, kind in enumerate(("never", "sync", "async")):
            ax.bar([j + 0.27 * (i - 1) for j in range(len(names))],
                   [results[n][kind]["steps_per_s"] / results[n]["never"]["steps_per_s"] for n in names],
                   width=0.27, label=kind)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel(f"steps/s relative to never saving (save every {args.interval})")
        ax.legend()
    save_plot(draw, out / "save_steps_per_s.png")
    print(f"wrote {path}")
    return results
