"""SIGTERM ends a stage like Ctrl-C, and a stop request is never lost nor raised mid-write.

Python runs a signal handler between bytecodes of the main thread, which can be inside a finaliser
(a ``__del__`` or a weakref callback, as in SQLAlchemy's session cleanup). Python only prints an
exception raised there, so the ``KeyboardInterrupt`` would vanish and the stage would run to the
end. The handler therefore also records the signal, and the long loops call ``raise_if_stopped``:
training and prediction once per batch, presize once per image, a download once per chunk.

An exception raised in the middle of a write to the MLflow store (a SQLAlchemy transaction on the
sqlite file) can leave it locked, and the stage then hangs ending its run. Tracking code runs its
store calls inside ``deferred_stop()``: a stop that arrives there is raised when the block ends. A
second signal is raised at once, wherever the stage is.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_received: int | None = None
_deferring = 0  # depth of deferred_stop blocks


def _stop(signum: int, frame: object) -> None:
    global _received
    again = _received is not None
    _received = signum
    if again or not _deferring:
        raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def handling_stops(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """While inside: ``handler`` handles SIGTERM and SIGINT; the previous handlers are back afterwards."""
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """While inside: SIGTERM and SIGINT raise ``KeyboardInterrupt`` and are remembered (until the block ends)."""
    global _received
    _received = None
    try:
        with handling_stops(_stop):
            yield
    finally:
        _received = None  # the stage is over: nothing is pending for code that runs after it


@contextmanager
def deferred_stop() -> Iterator[None]:
    """A first stop signal that arrives inside waits until the block has ended, then is raised."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if not _deferring:
        raise_if_stopped()


def raise_if_stopped() -> None:
    """Raise ``KeyboardInterrupt`` if a stop signal arrived whose exception was swallowed or deferred."""
    if _received is not None:
        raise KeyboardInterrupt(f"signal {_received}")
