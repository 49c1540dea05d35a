"""``megalm bench compare NEW.json OLD.json``: the regression gate. Exits 1, naming each figure, when NEW is worse
than OLD beyond max(5%, 3 x the larger of the two runs' measured spread); 0 otherwise.

A result's ``figures`` (written by ``harness.figure``) carry their value, the spread measured in their steady
window (interquartile range / median) and whether higher or lower is better.
"""
from __future__ import annotations

import argparse
import sys

from megalm.bench.harness import read_result

FLOOR, SPREADS = 0.05, 3.0


def regressions(new: dict, old: dict, floor: float = FLOOR, spreads: float = SPREADS) -> list[tuple[str, str]]:
    """[(figure, verdict line)] for every figure both results hold; a verdict starting "WORSE" is a regression."""
    out = []
    for name in sorted(set(new["figures"]) & set(old["figures"])):
        a, b = new["figures"][name], old["figures"][name]
        change = (a["value"] - b["value"]) / b["value"] if b["value"] else 0.0
        limit = max(floor, spreads * max(a.get("spread") or 0.0, b.get("spread") or 0.0))
        worse = -change if a["better"] == "higher" else change
        verdict = "WORSE" if worse > limit else "ok"
        out.append((name, f"{verdict:5s} {name}: {b['value']:.4g} -> {a['value']:.4g} ({change:+.1%}; limit "
                          f"{limit:.1%}, {a['better']} is better)"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="megalm bench compare", description=__doc__.splitlines()[0])
    ap.add_argument("new")
    ap.add_argument("old")
    ap.add_argument("--floor", type=float, default=FLOOR, help="smallest relative change counted (default 0.05)")
    args = ap.parse_args(argv)
    new, old = (read_result(path)["results"] for path in (args.new, args.old))
    if "figures" not in new or "figures" not in old:
        print("megalm bench compare: both results need figures (megalm bench train writes them)", file=sys.stderr)
        return 2
    verdicts = regressions(new, old, args.floor)
    if not verdicts:
        print("megalm bench compare: the two results share no figure", file=sys.stderr)
        return 2
    for _, line in verdicts:
        print(line)
    worse = [name for name, line in verdicts if line.startswith("WORSE")]
    if worse:
        print(f"megalm bench compare: {len(worse)} figure(s) regressed: {', '.join(worse)}", file=sys.stderr)
        return 1
    return 0
