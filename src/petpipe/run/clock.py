"""A stage's fixed cost: process start to the first line of work (start-up), end of work to exit (teardown).

The stage process's start is the kernel's (Linux ``/proc``), so interpreter start-up and imports are counted;
elsewhere it is when this module was first imported. A warm stage process (``petpipe.run.warm``) is told the start
of the process DVC ran (``START_ENV``). Work begins and ends where the stage run's body does (``stage_run``),
else around the stage's ``run``; teardown ends at the last write before exit, so the interpreter's own exit is
the one part not counted (``benchmarks/repro_fixed_cost.py`` measures it from outside).

The work is further split into named phases (``phase("epochs")``: open store, build model, epochs, checkpoint,
model logging, figures, digests ...), so that a stage's time explains itself: ``<phase>_seconds`` in the timing
file's ``phases``, the ``timing:`` line and MLflow. What no phase covers is ``other``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

START_ENV = "PETPIPE_PROCESS_START"  # the start (seconds since the epoch) of the process DVC started
IMPORTED = time.time()


def process_start() -> float:
    """When this process started, in seconds since the epoch."""
    if START_ENV in os.environ:
        return float(os.environ[START_ENV])
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, counted after the comm field
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):
        return IMPORTED


@dataclass
class StageClock:
    """The marks of one stage process; ``finish`` turns them into seconds and hands them to the listeners."""

    started: float = field(default_factory=process_start)
    work_began: float | None = None
    work_ended: float | None = None
    phases: dict[str, float] = field(default_factory=dict)  # name -> seconds, in the order first seen
    listeners: list[Callable[[dict], None]] = field(default_factory=list)

    def begin_work(self) -> None:
        """The first line of real work (a later mark wins: the stage run's body is nearer the work than ``run``)."""
        self.work_began, self.work_ended = time.time(), None

    def end_work(self) -> None:
        self.work_ended = time.time()

    def add_phase(self, name: str, seconds: float) -> None:
        """Count ``seconds`` to phase ``name`` (a phase entered several times is summed)."""
        self.phases[name] = self.phases.get(name, 0.0) + seconds

    def seconds(self) -> dict:
        """start-up, work and teardown seconds, and ``phases``: the named parts of the work plus ``other``."""
        now = time.time()
        began = self.work_began if self.work_began is not None else now
        ended = self.work_ended if self.work_ended is not None else now
        phases = {name: round(s, 3) for name, s in self.phases.items()}
        if phases:
            phases["other"] = round(max(0.0, (ended - began) - sum(self.phases.values())), 3)
        return {
            "startup_seconds": round(began - self.started, 3),
            "work_seconds": round(ended - began, 3),
            "teardown_seconds": round(now - ended, 3),
            "phases": phases,
        }

    def on_finish(self, listener: Callable[[dict], None]) -> None:
        """Call ``listener`` with the seconds when the stage finishes (the stage run logs them on the parent)."""
        self.listeners.append(listener)

    def finish(self) -> dict:
        seconds = self.seconds()
        for listener in self.listeners:
            listener(seconds)
        return seconds


CLOCK = StageClock()


def reset() -> StageClock:
    """A new clock for a stage run in this process (a test calling several stages' ``main``); returns it."""
    global CLOCK
    CLOCK = StageClock(started=time.time())
    return CLOCK


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the block as phase ``name`` of the current stage's work (``CLOCK``)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        CLOCK.add_phase(name, time.perf_counter() - started)


def add_phase(name: str, seconds: float) -> None:
    """Count ``seconds`` measured elsewhere (the epochs inside a fit) to phase ``name`` of the current stage."""
    CLOCK.add_phase(name, seconds)


def flat_seconds(seconds: dict) -> dict[str, float]:
    """``seconds`` with each phase as ``<phase>_seconds`` beside the three spans: what metrics stores take."""
    spans = {k: v for k, v in seconds.items() if k != "phases"}
    return spans | {f"{name}_seconds": value for name, value in seconds.get("phases", {}).items()}
