"""megalm bench train: the config's real step, its figures consistent with one another, the step divided into
phases that add up to it, sweeps and profiler traces; the phase clock's exclusive accounting."""
import json

import pytest

from megalm.bench.train import main, sweep_points
from megalm.config import ConfigError
from megalm.runtime import phases as phases_module
from megalm.runtime.phases import PHASES, PhaseClock

SMALL = ["--steps", "3", "--warmup", "1", "--breakdown-steps", "2", "--tp", "0", "--no-baseline",
         "model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "data.seq_len=64", "model.max_seq_len=64",
         "train.micro_batch_size=2", "train.global_batch_size=4", "model.vocab_size=512"]


def results(folder) -> dict:
    return json.loads((folder / "bench_train.json").read_text())["results"]


def test_phase_times_are_exclusive_of_nested_phases(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(phases_module.time, "perf_counter", lambda: now[0])
    clock = PhaseClock(label=False)
    with clock.phase("backward"):
        now[0] += 1.0
        with clock.phase("tp_comm"):
            now[0] += 0.25
        now[0] += 0.5
    with clock.phase("optimizer"):
        now[0] += 0.125
    taken = clock.take()
    assert taken["backward"] == 1.5 and taken["tp_comm"] == 0.25 and taken["optimizer"] == 0.125
    assert sum(taken.values()) == now[0]                     # the phases add up to the wall time
    assert set(PHASES) <= set(taken) and clock.take()["backward"] == 0.0      # take resets


def test_one_process_figures_agree_and_phases_add_up_to_the_step(tmp_path, capsys):
    assert main(["--out", str(tmp_path)] + SMALL) == 0
    row = results(tmp_path)["rows"]["megalm tp1 pp1 dp1"]
    tokens = 4 * 64
    assert row["tokens_per_s"] == pytest.approx(tokens / row["seconds_per_step"])
    assert row["tokens_per_s_per_device"] == row["tokens_per_s"] and row["devices"] == 1
    assert 0 < row["mfu_causal"] < row["mfu"]                  # halving attention lowers the figure
    assert row["hardware_tflops_per_device"] == pytest.approx(row["tflops_per_device"])   # no recomputation
    fractions = row["breakdown_fraction"]
    assert all(fractions[p] > 0 for p in ("forward", "backward", "optimizer")), fractions
    assert fractions["tp_comm"] == fractions["pp_comm"] == fractions["pp_wait"] == 0.0   # one process: no traffic
    assert sum(fractions.values()) == pytest.approx(1.0, abs=1e-9)
    assert sum(v for k, v in row["breakdown_s"].items() if k not in ("step", "other")) <= row["breakdown_s"]["step"]
    assert row["peak_memory_max"] > 0 and row["steps"] == 3
    out = capsys.readouterr().out
    assert "step by phase" in out and "MFU-c" in out
    assert (tmp_path / "bench_train.png").stat().st_size > 0


def test_recomputation_counts_in_hardware_flops_only(tmp_path):
    assert main(["--out", str(tmp_path), "parallel.activation_checkpointing=full"] + SMALL) == 0
    row = results(tmp_path)["rows"]["megalm tp1 pp1 dp1 rc=full"]
    assert row["hardware_tflops_per_device"] > 1.2 * row["tflops_per_device"]


def test_a_sweep_measures_each_value_with_a_plot(tmp_path):
    assert main(["--out", str(tmp_path), "--sweep", "optimizer.lr=0.0001,0.01", "optimizer.min_lr=0"] + SMALL) == 0
    rows = results(tmp_path)["rows"]
    assert list(rows) == ["megalm tp1 pp1 dp1 optimizer.lr=0.0001", "megalm tp1 pp1 dp1 optimizer.lr=0.01"]
    low, high = (rows[n] for n in rows)
    assert high["loss_first"] - high["loss_last"] > low["loss_first"] - low["loss_last"]   # a range test
    assert (tmp_path / "bench_train.png").stat().st_size > 0


def test_a_bad_sweep_or_a_bad_value_is_refused_before_any_work():
    with pytest.raises(ConfigError, match="KEY=V1,V2"):
        sweep_points("train.micro_batch_size")
    with pytest.raises(ConfigError, match="micro_batch_size"):
        main(["--sweep", "train.micro_batch_size=3,4"] + SMALL)           # 4 is not divisible by 3


def test_profile_writes_a_trace_with_the_phases_labelled(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--profile"] + SMALL) == 0
    trace = json.loads((tmp_path / "profile" / "trace_rank0.json").read_text())
    names = {event.get("name", "") for event in trace["traceEvents"]}
    for label in ("forward micro-batch 0 chunk 0", "backward micro-batch 1 chunk 0", "optimizer", "data"):
        assert label in names, sorted(n for n in names if "micro" in n)[:10]
    assert "ui.perfetto.dev" in capsys.readouterr().out


@pytest.mark.slow
def test_tp2_spawned_counts_and_times_its_collectives(tmp_path):
    args = [a for a in SMALL if a not in ("--tp", "0")] + ["--tp", "2"]
    assert main(["--out", str(tmp_path)] + args) == 0
    result = results(tmp_path)
    row = result["rows"]["megalm tp2 spawned"]
    assert row["devices"] == 2 and row["breakdown_fraction"]["tp_comm"] > 0
    comm = result["tp_comm"]["2"]
    assert comm["tp_elements_counted"] == comm["tp_elements_formula"]


def test_peak_memory_pairs_frees_by_address_and_survives_unrecorded_frees():
    """gloo's worker threads free a collective's output where the profiler does not look: an address allocated
    again counts its earlier block as freed; a free of a block from before the trace lowers the count."""
    from megalm.bench.train_measure import peak_live_bytes

    recorded = [(0, 0xA, 100), (1, 0xB, 50), (2, 0xA, -100), (3, 0xC, 30)]
    assert peak_live_bytes(recorded) == 150                       # 100 + 50 at t=1
    unrecorded = [(0, 0xA, 100), (1, 0xA, 100), (2, 0xA, 100)]   # three outputs, two frees never seen
    assert peak_live_bytes(unrecorded) == 100                     # a plain running sum would say 300
    before = [(0, 0xD, -40), (1, 0xA, 60)]                       # 0xD was alive when the trace began
    assert peak_live_bytes(before) == 20
