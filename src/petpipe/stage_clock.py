"""A stage's fixed cost: process start to the first line of work (start-up), end of work to exit (teardown).

The stage process's start is the kernel's (Linux ``/proc``), so interpreter start-up and imports are counted;
elsewhere it is when this module was first imported. A warm stage process (``petpipe.warm``) is told the start
of the process DVC ran (``START_ENV``). Work begins and ends where the stage run's body does (``stage_run``),
else around the stage's ``run``; teardown ends at the last write before exit, so the interpreter's own exit is
the one part not counted (``benchmarks/repro_fixed_cost.py`` measures it from outside).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
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
    listeners: list[Callable[[dict[str, float]], None]] = field(default_factory=list)

    def begin_work(self) -> None:
        """The first line of real work (a later mark wins: the stage run's body is nearer the work than ``run``)."""
        self.work_began, self.work_ended = time.time(), None

    def end_work(self) -> None:
        self.work_ended = time.time()

    def seconds(self) -> dict[str, float]:
        now = time.time()
        began = self.work_began if self.work_began is not None else now
        ended = self.work_ended if self.work_ended is not None else now
        return {
            "startup_seconds": round(began - self.started, 3),
            "work_seconds": round(ended - began, 3),
            "teardown_seconds": round(now - ended, 3),
        }

    def on_finish(self, listener: Callable[[dict[str, float]], None]) -> None:
        """Call ``listener`` with the seconds when the stage finishes (the stage run logs them on the parent)."""
        self.listeners.append(listener)

    def finish(self) -> dict[str, float]:
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
