"""The cleaning report: PREFIX.report.json, a table on the console, and PREFIX.lengths.png."""
from __future__ import annotations

import json
import os
import pathlib

import numpy as np

from megalm.data.cleaning import LENGTH_BINS, Decider
from megalm.data.errors import DataError
from megalm.data.tokenizer import tokenizer_path


def report_path(prefix) -> str:
    return f"{prefix}.report.json"


def histogram_path(prefix) -> str:
    return f"{prefix}.lengths.png"


def output_paths(prefix) -> list[str]:
    """Every file ``megalm preprocess`` writes at ``prefix``."""
    return [f"{prefix}.bin", f"{prefix}.idx", tokenizer_path(prefix), report_path(prefix), histogram_path(prefix)]


def refuse_existing(prefix, overwrite: bool) -> None:
    existing = [p for p in output_paths(prefix) if os.path.exists(p)]
    if existing and not overwrite:
        raise DataError(f"--output-prefix {prefix} already holds {', '.join(existing)}: pass --overwrite to "
                        f"replace it, or choose another prefix")


def build_report(decider: Decider, fates: dict, settings: dict) -> dict:
    read = decider.read
    removed = {reason: {"documents": t.documents, "tokens": t.tokens, "chars": t.chars, "examples": t.examples}
               for reason, t in decider.tallies.items()}
    return {
        "settings": settings,
        "inputs": fates,
        "read": {"documents": read.documents, "tokens": read.tokens, "chars": read.chars},
        "removed": removed,
        "kept": {"documents": decider.kept.documents, "tokens": decider.kept.tokens, "chars": decider.kept.chars},
        "lengths": {"bins_chars": LENGTH_BINS.tolist(), "before": decider.hist_before.tolist(),
                    "after": decider.hist_after.tolist()},
        "growing_index_bytes": decider.index_bytes(),
    }


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:5.1f}%" if whole else "    -"


def table(report: dict) -> str:
    """Per stage, documents and tokens removed; then what was kept; then skipped inputs."""
    read = report["read"]
    rows = [("stage", "documents", "", "tokens", "")]
    for reason, r in report["removed"].items():
        rows.append((f"- {reason}", str(r["documents"]), _pct(r["documents"], read["documents"]),
                     str(r["tokens"]), _pct(r["tokens"], read["tokens"])))
    kept = report["kept"]
    rows.append(("= kept", str(kept["documents"]), _pct(kept["documents"], read["documents"]), str(kept["tokens"]),
                 _pct(kept["tokens"], read["tokens"])))
    rows.insert(1, ("read", str(read["documents"]), "", str(read["tokens"]), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    counts = report["inputs"]["counts"]
    skipped = {k: v for k, v in counts.items() if k != "read"}
    lines.append(f"inputs: {counts.get('read', 0)} read" + "".join(f", {v} {k}" for k, v in skipped.items()))
    for s in report["inputs"]["skipped"][:5]:
        lines.append(f"  {s['fate']}: {s['why'][:200]}")
    return "\n".join(lines)


def write_report(prefix, report: dict) -> None:
    path = pathlib.Path(report_path(prefix))
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    os.replace(tmp, path)
    plot_lengths(report, histogram_path(prefix))


def plot_lengths(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    edges = np.asarray(report["lengths"]["bins_chars"], dtype=float)
    edges[0] = 0.5                                   # the empty-document bin, drawn left of 1 on a log axis
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("before", "read"), ("after", "kept")):
        counts = np.asarray(report["lengths"][key])
        ax.stairs(counts, edges, label=f"{label} ({counts.sum()} documents)", fill=key == "before",
                  alpha=0.4 if key == "before" else 1.0)
    ax.set_xscale("log")
    ax.set_xlabel("document length (characters)")
    ax.set_ylabel("documents")
    ax.set_title("megalm preprocess: document lengths before and after cleaning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
