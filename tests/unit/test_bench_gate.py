"""The regression gate's arithmetic: `megalm bench compare` fires on a 10% slowdown beyond max(5%, 3 spreads)
and not within it (on result files; a timed run belongs in a benchmark, not a test)."""
import json

import pytest

from megalm.bench.compare import main as compare
from megalm.bench.harness import SCHEMA, figure, read_result, write_result


def result(tmp_path, name, tokens_per_s, spread=0.01):
    return write_result("train", {"figures": {"megalm tp=1 tokens/s": figure(tokens_per_s, spread, "higher"),
                                              "step seconds": figure(1 / tokens_per_s, spread, "lower")}},
                        tmp_path / name)


def test_gate_fires_beyond_five_percent_and_three_spreads(tmp_path, capsys):
    old = result(tmp_path, "old", 1000.0)
    assert compare([str(result(tmp_path, "slow", 900.0)), str(old)]) == 1
    err = capsys.readouterr()
    assert "WORSE megalm tp=1 tokens/s: 1000 -> 900 (-10.0%" in err.out and "regressed" in err.err
    assert compare([str(result(tmp_path, "same", 970.0)), str(old)]) == 0             # within 5%
    assert compare([str(result(tmp_path, "noisy", 900.0, spread=0.05)), str(old)]) == 0  # within 3 spreads
    assert compare([str(result(tmp_path, "fast", 1200.0)), str(old)]) == 0


def test_a_file_that_is_not_a_result_is_refused(tmp_path):
    other = tmp_path / "x.json"
    other.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="not a megalm benchmark result"):
        read_result(other)
    assert read_result(result(tmp_path, "ok", 5.0))["schema"] == SCHEMA
