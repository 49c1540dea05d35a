"""``megalm bench preprocess``: preprocess throughput against the tokenizer's own ``encode_batch`` on the same
documents in one run, the cost of each cleaning stage, and peak memory at 1x and 10x the corpus.

Throughput counts every document's tokens (preprocess tokenizes dropped documents too, for its report), so each
row does the same tokenizing work as the baseline: ``encode_batch`` over all documents at once, in memory, with
the tokenizer's own thread pool (one thread per core), which is the ceiling for a tokenizer-bound pipeline.
Peak memory runs in child processes (one worker, a given tokenizer) on synthetic JSON lines.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megalm.bench.harness import output_dir, save_plot, write_result

STAGES = [  # name, preprocess keyword arguments
    ("cleaning off", dict(normalize="none", exact_dedup=False)),
    ("+ NFC", dict(normalize="NFC", exact_dedup=False)),
    ("+ exact dedup (default)", dict()),
    ("+ quality gopher", dict(quality=["gopher"])),
    ("+ quality fineweb, c4", dict(quality=["fineweb", "c4"])),
    ("+ near-dup", dict(near_dup=True)),
    ("all", dict(quality=["gopher", "fineweb", "c4"], near_dup=True)),
]

_CHILD = """
import json, sys
from megalm.data.preprocess import preprocess
from megalm.data.memory import peak_rss_bytes
from megalm.data.neardup import NearDupConfig
r = preprocess([sys.argv[1]], sys.argv[2], tokenizer=sys.argv[3], workers=1, near_dup=NearDupConfig(),
               show_progress=False)
print(json.dumps({"peak_rss": peak_rss_bytes(),
                  "index_bytes": r["report"]["growing_index_bytes"], "documents": r["input_documents"]}))
"""


def _baselines(docs: list[str], tokenizer: str) -> dict:
    """The tokenizers library itself on the whole corpus at once, all cores: encode_batch and encode_batch_fast
    (no character offsets), each with its ids read out (plus one end-of-document token per document)."""
    import tokenizers
    os.environ.pop("TOKENIZERS_PARALLELISM", None)
    tok = tokenizers.Tokenizer.from_file(tokenizer)
    out = {}
    for name in ("encode_batch", "encode_batch_fast"):
        if not hasattr(tok, name):
            continue
        start = time.perf_counter()
        tokens = sum(len(e.ids) + 1 for e in getattr(tok, name)(docs, add_special_tokens=False))
        seconds = time.perf_counter() - start
        out[name] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
    return out


def _stage(inputs, tokenizer: str, workers: int, kwargs: dict, work: Path) -> dict:
    from megalm.data.neardup import NearDupConfig
    from megalm.data.preprocess import preprocess
    kwargs = dict(kwargs)
    if kwargs.pop("near_dup", False):
        kwargs["near_dup"] = NearDupConfig()
    r = preprocess(inputs, str(work / "stage"), tokenizer=tokenizer, workers=workers, show_progress=False,
                   overwrite=True, **kwargs)
    read = r["report"]["read"]["tokens"]
    return {"seconds": r["seconds"], "tokens_read": read, "tokens_kept": r["tokens"],
            "tokens_per_s": read / r["seconds"], "documents_kept": r["documents"],
            "documents_read": r["input_documents"]}


def _memory(work: Path, tokenizer: str, base_docs: int) -> dict:
    import numpy as np
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnop"), rng.integers(2, 9))) for _ in range(20000)]
    out = {}
    for scale in (1, 10):
        path = work / f"mem{scale}.jsonl"
        with open(path, "w") as f:
            for _ in range(base_docs * scale):
                f.write(json.dumps({"text": " ".join(rng.choice(words, int(rng.integers(100, 500))))}) + "\n")
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(work / f"mem{scale}"), tokenizer],
                              capture_output=True, text=True, check=True)
        out[f"{scale}x"] = dict(json.loads(proc.stdout.strip().splitlines()[-1]), input_bytes=path.stat().st_size)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="megalm bench preprocess", description=__doc__.splitlines()[0])
    ap.add_argument("--input", nargs="+", help="inputs (default: the embedded corpus)")
    ap.add_argument("--tokenizer", help="tokenizer.json (default: a 8192-token BPE trained on the inputs first)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--memory-docs", type=int, default=4000, help="documents of the 1x memory corpus (0: skip)")
    ap.add_argument("--out", help="result folder (default runs/bench-preprocess)")
    args = ap.parse_args(argv)
    from megalm.data.corpus import iter_documents
    from megalm.data.preprocess import preprocess
    from megalm.data.tokenizer import tokenizer_path
    out = output_dir("preprocess", args.out)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        work = Path(tmp)
        tokenizer = args.tokenizer
        if tokenizer is None:
            preprocess(args.input, str(work / "tok"), workers=args.workers, show_progress=False)
            tokenizer = tokenizer_path(work / "tok")
        docs = list(iter_documents(args.input))
        baselines = _baselines(docs, tokenizer)
        for name, b in baselines.items():
            print(f"{name:<26} {b['tokens_per_s'] / 1e6:.3f} M tokens/s ({b['tokens']} tokens in "
                  f"{b['seconds']:.2f}s)", flush=True)
        best = max(baselines, key=lambda k: baselines[k]["tokens_per_s"])
        baseline = baselines[best]
        stages = {}
        for name, kwargs in STAGES:
            stages[name] = r = _stage(args.input, tokenizer, args.workers, kwargs, work)
            r["of_baseline"] = r["tokens_per_s"] / baseline["tokens_per_s"]
            print(f"{name:<26} {r['tokens_per_s'] / 1e6:.3f} M tokens/s = {r['of_baseline']:.0%} of {best} "
                  f"({r['seconds']:.2f}s; kept {r['documents_kept']}/{r['documents_read']} documents)", flush=True)
        memory = _memory(work, tokenizer, args.memory_docs) if args.memory_docs else {}
        for scale, m in memory.items():
            print(f"memory {scale}: {m['documents']} documents, {m['input_bytes'] / 2**20:.1f} MiB in; peak RSS "
                  f"{m['peak_rss'] / 2**20:.0f} MiB, of which the growing dedup index "
                  f"{m['index_bytes'] / 2**20:.1f} MiB")
    results = {"baselines": baselines, "baseline": best, "stages": stages, "memory": memory}
    path = write_result("preprocess", results, args.out, context={"inputs": args.input or "embedded corpus",
                                                                  "workers": args.workers, "documents": len(docs)})

    def draw(fig, ax):
        names = [best] + list(stages)
        values = [baseline["tokens_per_s"] / 1e6] + [s["tokens_per_s"] / 1e6 for s in stages.values()]
        ax.barh(names[::-1], values[::-1], color=["tab:blue"] * len(stages) + ["tab:gray"])
        ax.set_xlabel("M tokens/s (all documents' tokens)")
        ax.set_title(f"megalm preprocess, {args.workers} workers, vs tokenizers' {best}")
    save_plot(draw, out / "preprocess_throughput.png", figsize=(7, 3.8))
    print(f"wrote {path}")
    return results
