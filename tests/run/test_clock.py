"""The stage clock: process start from the kernel (or the warm runner's client), work marks, the three spans."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from petpipe.run import clock as stage_clock
from petpipe.run.clock import StageClock


def test_the_process_start_is_the_kernels_not_the_import():
    """A process that sleeps before importing the clock: its start-up includes the sleep."""
    code = (
        "import time; time.sleep(0.6); import sys; sys.path.insert(0, 'src');"
        "from petpipe.run.clock import process_start, IMPORTED; print(IMPORTED - process_start())"
    )
    waited = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0.6 <= waited < 10


def test_a_warm_process_takes_the_start_it_is_told(monkeypatch):
    monkeypatch.setenv(stage_clock.START_ENV, "1234.5")
    assert stage_clock.process_start() == 1234.5


def test_start_up_work_and_teardown_come_from_the_marks():
    clock = StageClock(started=time.time() - 2.0)
    clock.begin_work()
    time.sleep(0.2)
    clock.begin_work()  # the later mark (the stage run's body) wins
    time.sleep(0.3)
    clock.end_work()
    time.sleep(0.1)
    heard = []
    clock.on_finish(heard.append)
    seconds = clock.finish()
    assert heard == [seconds]
    assert seconds["startup_seconds"] == pytest.approx(2.2, abs=0.1)
    assert seconds["work_seconds"] == pytest.approx(0.3, abs=0.1)
    assert seconds["teardown_seconds"] == pytest.approx(0.1, abs=0.1)


def test_a_stage_without_marks_has_all_of_its_time_as_start_up():
    clock = StageClock(started=time.time() - 1.0)
    seconds = clock.seconds()
    assert seconds["startup_seconds"] == pytest.approx(1.0, abs=0.1)
    assert seconds["work_seconds"] == seconds["teardown_seconds"] == 0


def test_phases_split_the_work_and_the_rest_is_other():
    clock = StageClock(started=time.time())
    clock.begin_work()
    clock.add_phase("epochs", 0.2)
    clock.add_phase("checkpoint", 0.05)
    clock.add_phase("epochs", 0.1)  # a phase entered twice is summed
    time.sleep(0.5)
    clock.end_work()
    seconds = clock.seconds()
    assert list(seconds["phases"]) == ["epochs", "checkpoint", "other"]
    assert seconds["phases"]["epochs"] == pytest.approx(0.3)
    assert seconds["phases"]["other"] == pytest.approx(seconds["work_seconds"] - 0.35, abs=0.002)
    flat = stage_clock.flat_seconds(seconds)
    assert flat["epochs_seconds"] == pytest.approx(0.3) and flat["work_seconds"] == seconds["work_seconds"]
    assert "phases" not in flat


def test_a_phase_block_counts_to_the_current_clock_also_when_it_raises():
    clock = stage_clock.reset()
    with pytest.raises(RuntimeError), stage_clock.phase("figures"):
        time.sleep(0.1)
        raise RuntimeError("boom")
    assert clock.phases["figures"] == pytest.approx(0.1, abs=0.05)
