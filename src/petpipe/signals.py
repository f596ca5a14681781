"""SIGTERM ends a stage like Ctrl-C, and a stop request is never lost.

Python runs a signal handler between bytecodes of the main thread, which can be inside a finaliser
(a ``__del__`` or a weakref callback, as in SQLAlchemy's session cleanup). Python only prints an
exception raised there, so the ``KeyboardInterrupt`` would vanish and the stage would run to the
end. The handler therefore also records the signal, and the long loops call ``raise_if_stopped``:
training and prediction once per batch, presize once per image, a download once per chunk.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

_received: int | None = None


def _stop(signum: int, frame: object) -> None:
    global _received
    _received = signum
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """While inside: SIGTERM and SIGINT raise ``KeyboardInterrupt`` and are remembered."""
    global _received
    _received = None
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def raise_if_stopped() -> None:
    """Raise ``KeyboardInterrupt`` if a stop signal arrived whose exception was swallowed."""
    if _received is not None:
        raise KeyboardInterrupt(f"signal {_received}")
