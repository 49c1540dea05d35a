"""The watchdog's decisions, on an in-memory store (the trials with real processes are in test_fault_trials.py)."""
import time

from megalm.runtime.watchdog import EXIT_PEER_LOST, Watchdog


class MemoryStore:
    """The three store operations the watchdog uses, in memory (the unit test of its decisions)."""

    def __init__(self):
        self.data = {}

    def set(self, key, value):
        self.data[key] = value.encode() if isinstance(value, str) else value

    def get(self, key):
        return self.data[key]

    def check(self, keys):
        return all(k in self.data for k in keys)


def test_the_watchdog_names_a_silent_neighbour_and_not_a_finished_one():
    store, exits = MemoryStore(), []
    quiet = Watchdog(store, 1, 2, 1, timeout=0.5, exit=exits.append)
    quiet.note("training step 4", step=3)
    quiet._publish()                                            # one beat, then silence (as after SIGSTOP)
    watcher = Watchdog(store, 0, 2, 0, timeout=0.5, interval=0.05, exit=exits.append).start()
    deadline = time.monotonic() + 5
    while not exits and time.monotonic() < deadline:
        time.sleep(0.05)
    watcher.stop()
    assert exits == [EXIT_PEER_LOST]
    assert "last completed step was 3, last in: training step 4" in store.get("megalm/watchdog/failed").decode()
    store2, exits2 = MemoryStore(), []
    done = Watchdog(store2, 1, 2, 1, timeout=0.5, exit=exits2.append)
    done.stop()                                                 # published "finished"
    watcher = Watchdog(store2, 0, 2, 0, timeout=0.5, interval=0.05, exit=exits2.append).start()
    time.sleep(1.2)
    watcher.stop()
    assert exits2 == []


def test_a_rank_stuck_in_a_step_is_reported_after_ten_of_its_slowest_steps():
    """A step-bounded operation (a training step, the stop agreement) may last ten times the rank's slowest step
    (at least three heartbeat timeouts); other operations up to parallel.stall_timeout."""
    watcher = Watchdog(MemoryStore(), 0, 2, 0, timeout=0.5, stall_timeout=1800)
    assert watcher._allowance({"bounded": True, "slowest": 0.2}) == 2.0
    assert watcher._allowance({"bounded": True, "slowest": 0.01}) == 1.5        # three heartbeat timeouts
    assert watcher._allowance({"bounded": True, "slowest": 0.0}) == 1800        # no step finished yet
    assert watcher._allowance({"bounded": False, "slowest": 0.2}) == 1800       # a save, an evaluation


def test_planned_faults_parse_and_refuse_typos():
    import pytest

    from megalm.runtime.faults import Fault, parse

    assert parse("") == ()
    assert parse("kill:rank=1,step=5; delay:seconds=0.5") == (Fault("kill", 1, 5), Fault("delay", seconds=0.5))
    assert Fault("kill", 1, 5).applies("step_start", 1, 5) and not Fault("kill", 1, 5).applies("step_start", 0, 5)
    with pytest.raises(ValueError, match="unknown fault 'kil'"):
        parse("kil:rank=1")
    with pytest.raises(ValueError, match="unknown key 'steps'"):
        parse("kill:steps=1")
    skip = parse("skip_collective:rank=1,step=4,at=save_gather")[0]
    assert skip.applies("save_gather", 1, 4) and not skip.applies("stop_agreement", 1, 4)
    with pytest.raises(ValueError, match="skip_collective strikes at a collective, not at=save_rename"):
        parse("skip_collective:rank=1,at=save_rename")
    with pytest.raises(ValueError, match="at= is for kill, stop, delay and skip_collective"):
        parse("nan:rank=1,at=save_gather")
