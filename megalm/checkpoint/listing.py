"""``megalm checkpoint list RUN_DIR``: every checkpoint of a run with its state: committed and verified,
uncommitted (a save that did not finish), or damaged, and why; and which one ``latest`` names."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megalm.checkpoint.format import COMMITTED, LATEST, CheckpointError, checkpoints_root
from megalm.checkpoint.load import CheckpointReader


def states(run_dir) -> list[tuple[str, str]]:
    """(folder name, state) for every step folder, oldest first; hashes every file of every committed one."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        root = Path(run_dir)
    out = []
    for folder in sorted(p for p in root.glob("step_*") if p.is_dir()):
        if folder.name.endswith(".tmp") or not (folder / COMMITTED).exists():
            out.append((folder.name, "uncommitted: the save did not finish (never loaded)"))
            continue
        try:
            reader = CheckpointReader(folder)                 # reads the manifest, hashes every file
            out.append((folder.name, f"committed, verified (step {reader.manifest['step']}, "
                                     f"{len(reader.manifest['files'])} files)"))
        except CheckpointError as e:
            out.append((folder.name, f"damaged: {e}"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="megalm checkpoint", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="each checkpoint and its state").add_argument("run_dir")
    args = ap.parse_args(argv)
    rows = states(args.run_dir)
    if not rows:
        print(f"megalm checkpoint: no checkpoints under {args.run_dir}", file=sys.stderr)
        return 2
    pointer = checkpoints_root(args.run_dir) / LATEST
    latest = pointer.read_text().strip() if pointer.exists() else None
    for name, state in rows:
        print(f"{name}{' (latest)' if name == latest else '':9s}  {state}")
    return 0
