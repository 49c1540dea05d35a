"""The ``megalm`` command: one entry point, one subcommand per job.

    megalm preprocess [--input PATH ...] --output-prefix PREFIX     corpus -> PREFIX.bin/.idx + tokenizer
    megalm train --config FILE [section.key=value ...]              train (resumes an existing run dir)
    megalm finetune --checkpoint CKPT [--data F.jsonl] [--config FILE] [overrides]   from a checkpoint's weights
    megalm eval --checkpoint RUN_DIR [--data PREFIX | --text FILE]  loss and perplexity
    megalm generate --checkpoint RUN_DIR [--prompt TEXT]            sample text with a KV cache
    megalm convert ...                                              checkpoints: layouts, Hugging Face, DeepSpeed
    megalm checkpoint list RUN_DIR                                  each checkpoint: committed, verified, damaged
    megalm bench kernels|bubble|train|memory|convert ...            benchmarks, each beside its baseline
    megalm bench compare NEW.json OLD.json                          the regression gate (exit 1 when worse)
    megalm plan --config FILE --gpus N --gpu-memory 80GB            layouts that fit: memory per rank, step time
    megalm preprocess chat --input F.jsonl --tokenizer T --output-prefix P   conversations for fine-tuning
    megalm config [--config FILE] [overrides]                       print every config key, or a resolved config
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

COMMANDS = {
    "preprocess": "megalm.data.preprocess",
    "eval": "megalm.eval",
    "generate": "megalm.generate",
    "convert": "megalm.checkpoint.convert",
    "checkpoint": "megalm.checkpoint.listing",
    "plan": "megalm.bench.plan",
}
BENCHES = {
    "kernels": "megalm.bench.kernels",
    "bubble": "megalm.bench.bubble",
    "train": "megalm.bench.train",
    "memory": "megalm.bench.memory",
    "convert": "megalm.bench.convert",
    "preprocess": "megalm.bench.preprocess",
    "save": "megalm.bench.save",
    "compare": "megalm.bench.compare",
}


def _train(argv) -> int:
    from megalm.config import load_config
    from megalm.train.loop import train

    ap = argparse.ArgumentParser(prog="megalm train", description="Train a model from a YAML config.")
    ap.add_argument("--config", help="YAML config file, or a preset name (tiny, gpt2-124m, llama-7b, ...)")
    ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. parallel.tp=2 train.steps=100")
    args = ap.parse_args(argv)
    return train(load_config(args.config, args.overrides)).get("exit_status", 0)


def _finetune(argv) -> int:
    from megalm.config import load_config
    from megalm.train.loop import train

    ap = argparse.ArgumentParser(prog="megalm finetune", description="Train from a checkpoint's weights (a "
                                 "megalm run, or a Hugging Face model converted with megalm convert from-hf).")
    ap.add_argument("--checkpoint", required=True, help="megalm checkpoint (run dir or step folder)")
    ap.add_argument("--config", help="YAML config for data, schedule and layout; the model comes from the checkpoint")
    ap.add_argument("--data", metavar="FILE.jsonl", help="conversations (prompt/response or messages), prepared "
                    "with the checkpoint's tokenizer and chat template; the loss is on the assistant's tokens")
    ap.add_argument("--loss-on", choices=("all", "last"), default="all", help="--data: assistant turns trained on")
    ap.add_argument("--overflow", choices=("truncate", "drop"), default="truncate",
                    help="--data: a conversation longer than data.seq_len + 1")
    ap.add_argument("--template", metavar="FILE", help="--data: a Jinja chat template instead of the tokenizer's")
    ap.add_argument("overrides", nargs="*", help="section.key=value; train.run_dir= names the run directory "
                    "(default: a new runs/finetune-CHECKPOINT-DATA; a config file's run_dir is not used)")
    args = ap.parse_intermixed_args(argv)
    from megalm.train.finetune import chat_data_prefix, finetune_overrides
    overrides = list(args.overrides)
    if args.data:
        seq_len = load_config(args.config, overrides).data.seq_len
        prefix = chat_data_prefix(args.checkpoint, args.data, seq_len, args.loss_on, args.overflow, args.template)
        overrides.append(f"data.prefix={prefix}")
    return train(load_config(args.config, finetune_overrides(args.checkpoint, args.config,
                                                             overrides))).get("exit_status", 0)


def _config(argv) -> int:
    from megalm.config import describe_fields, load_config

    ap = argparse.ArgumentParser(prog="megalm config", description="Show config keys or a resolved config.")
    ap.add_argument("--config")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if args.config or args.overrides:
        from megalm.config.rules import validate

        cfg = load_config(args.config, args.overrides)
        validate(cfg)                     # the rule book's verdict (the world size is the launcher's, later)
        print(json.dumps(cfg.to_dict(), indent=1))
    else:
        print(describe_fields())
    return 0


def _bench(argv) -> int:
    if not argv or argv[0] not in BENCHES:
        what = f"unknown benchmark {argv[0]!r}; " if argv and argv[0] not in ("-h", "--help") else ""
        print(f"megalm bench: {what}choose one of {', '.join(BENCHES)}: megalm bench NAME [options]",
              file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    result = importlib.import_module(BENCHES[argv[0]]).main(argv[1:])
    return result if isinstance(result, int) else 0      # some benchmarks return their table for callers


def _take_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N; megalm reads LOCAL_RANK from the environment instead."""
    from megalm.runtime.env import take_local_rank_argument

    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith(("--local_rank=", "--local-rank=")):
            take_local_rank_argument(arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            take_local_rank_argument(argv[i + 1])
            skip = True
        else:
            out.append(arg)
    return out


def main(argv=None) -> int:
    argv = _take_local_rank(sys.argv[1:] if argv is None else list(argv))
    local = {"train": _train, "finetune": _finetune, "config": _config, "bench": _bench}
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if argv[0] not in {**COMMANDS, **local}:
        import difflib

        close = difflib.get_close_matches(argv[0], [*COMMANDS, *local], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"megalm: unknown command {argv[0]!r}{hint} (megalm --help lists the commands: "
              f"{', '.join([*COMMANDS, *local])})", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    try:
        if command in local:
            return local[command](rest)
        return importlib.import_module(COMMANDS[command]).main(rest) or 0
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        from megalm.errors import report

        return report(e)


if __name__ == "__main__":
    sys.exit(main())
