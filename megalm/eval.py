"""``megalm eval``: loss and perplexity of a checkpoint on a dataset split or on a text file."""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from megalm.parallel.pipeline.p2p import P2P, activation_shape
from megalm.train.step import evaluate


def text_samples(tokenizer, path: str, seq_len: int) -> list[np.ndarray]:
    """Non-overlapping windows of seq_len + 1 tokens over the file (the last partial window is dropped)."""
    from megalm.data.errors import DataError

    try:
        text = open(path, encoding="utf-8").read()
    except UnicodeDecodeError:
        raise DataError(f"--text {path} is not UTF-8 text; give a text file") from None
    ids = np.asarray(tokenizer.encode(text) + [tokenizer.eod_id], dtype=np.int64)
    n = (len(ids) - 1) // seq_len
    if n == 0:
        raise DataError(f"--text {path} has {len(ids)} tokens, fewer than data.seq_len + 1 = {seq_len + 1}; give "
                        f"a longer text")
    return [ids[i * seq_len:(i + 1) * seq_len + 1] for i in range(n)]


def main(argv=None) -> int:
    from megalm.data.blend import BlendedDataset, open_split
    from megalm.data.chat_dataset import ChatDataset
    from megalm.data.chat_preprocess import is_chat_dataset
    from megalm.data.dataset import TokenDataset
    from megalm.inference import checkpoint_config, checkpoint_tokenizer, load_model
    from megalm.runtime import finish

    ap = argparse.ArgumentParser(prog="megalm eval", description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="run directory or checkpoint folder")
    source = ap.add_mutually_exclusive_group()
    source.add_argument("--data", help="dataset prefix (default: the one the model was trained on)")
    ap.add_argument("--split", default="test", choices=["train", "valid", "test"])
    source.add_argument("--text", help="a UTF-8 text file to score instead of a dataset")
    source.add_argument("--exact-match", metavar="FILE.jsonl", help="questions with short answers (conversations "
                        "whose last message is the answer): the accuracy of greedy replies")
    ap.add_argument("--answer-regex", help="with --exact-match: the answer is this pattern's first group in the reply")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="with --exact-match: longest reply")
    ap.add_argument("--samples", type=int, default=256, help="most samples to score")
    ap.add_argument("overrides", nargs="*", help="layout overrides, e.g. parallel.tp=2")
    args = ap.parse_args(argv)
    if args.samples < 1:
        from megalm.config import ConfigError

        raise ConfigError(f"--samples={args.samples} must be at least 1")
    if args.exact_match:
        return _exact_match(args)
    cfg, reader = checkpoint_config(args.checkpoint, args.overrides)
    seq = cfg.data.seq_len
    if args.text:
        tokenizer = checkpoint_tokenizer(reader)
        samples = text_samples(tokenizer, args.text, seq)[:args.samples]
        where = args.text
    else:
        if args.data:
            kind = ChatDataset if is_chat_dataset(args.data) else TokenDataset    # a chat's answers only
            ds = kind(args.data, args.split, seq, cfg.data.seed, cfg.model.vocab_size, tuple(cfg.data.split))
            where = f"{args.data} ({args.split})"
        else:
            ds = open_split(cfg.data, args.split, cfg.model.vocab_size)
            names = ds.names if isinstance(ds, BlendedDataset) else [cfg.data.prefix]
            where = f"{' + '.join(names)} ({args.split})"
        samples = [ds.sample(i) for i in range(min(len(ds), args.samples))]
    rt, cfg, engine = load_model(cfg, reader)
    topo = rt.topo
    mbs = max(1, min(cfg.train.micro_batch_size, len(samples) // topo.dp))
    batches = [torch.as_tensor(np.stack(samples[i:i + mbs])).to(rt.device)
               for i in range(0, len(samples) - mbs + 1, mbs)]
    mine = [b for i, b in enumerate(batches) if i % topo.dp == topo.dp_rank]
    p2p = P2P(topo, activation_shape(mbs, seq, cfg.model.hidden_size, topo), torch.float32, rt.device,
              num_chunks=len(engine.chunks))
    loss = evaluate(engine, p2p, mine, topo)
    if rt.is_logging_rank:
        print(f"eval {where}: {sum(b.shape[0] for b in batches)} samples x {seq} tokens | loss {loss:.4f} | "
              f"perplexity {math.exp(min(loss, 50)):.2f}", flush=True)
    finish(rt)
    return 0


def _exact_match(args) -> int:
    from megalm.answers import exact_match, extractor, questions
    from megalm.checkpoint.format import CheckpointError
    from megalm.config import ConfigError
    from megalm.inference import checkpoint_config, checkpoint_tokenizer, load_model
    from megalm.runtime import finish

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens={args.max_new_tokens} must be at least 1")
    extract = extractor(args.answer_regex)
    items, dropped = questions(args.exact_match)
    cfg, reader = checkpoint_config(args.checkpoint, args.overrides + ["parallel.sequence_parallel=false"])
    tokenizer = checkpoint_tokenizer(reader)
    if tokenizer is None:
        raise CheckpointError(f"{reader.folder} carries no tokenizer.json; cannot render the questions")
    rt, cfg, engine = load_model(cfg, reader)
    result = exact_match(engine, rt.topo, tokenizer, items, args.max_new_tokens, cfg.model.max_seq_len, extract)
    if rt.is_logging_rank:
        skipped = f"; skipped {sum(dropped.values())} records ({dropped})" if dropped else ""
        print(f"exact match on {args.exact_match}: {result['correct']}/{result['total']} = "
              f"{result['accuracy']:.1%}{skipped}", flush=True)
        for example in result["examples"]:
            print(f"  {'ok ' if example['correct'] else 'MISS'} {example['question']!r}: expected "
                  f"{example['expected']!r}, replied {example['reply']!r}", flush=True)
    finish(rt)
    return 0
