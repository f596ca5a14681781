"""Resumable training: the whole training state after every epoch, written atomically where DVC
does not look (``.dvc/tmp/resume/<stage>.pt``), so a killed stage continues from its last epoch.

The state holds the model, optimizer, one-cycle position, GradScaler, the epochs' metrics so far
and every random stream (Python, NumPy, torch, CUDA and the loader's own generators), so a resumed
CPU run ends with exactly the metrics of an uninterrupted one. It is copied to the CPU at the end of
an epoch and written while the next one trains (``StateWriter``); none is written after the last
epoch, whose outputs the stage writes at once. A state written for other params or
other inputs (its ``key`` differs) is discarded with a message. The file is deleted when the stage
finishes; ``rm -r .dvc/tmp/resume`` discards every pending resume.
"""

from __future__ import annotations

import hashlib
import random
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from petpipe.compute.distributed import rank, world_size
from petpipe.run.files import atomic_open, hash_file

RESUME_DIR = Path(".dvc") / "tmp" / "resume"


@dataclass(frozen=True)
class ResumePoint:
    """Where a stage keeps its training state, and what that state must have been made from."""

    path: Path
    key: dict[str, Any]


def file_digest(path: Path) -> str:
    """MD5 of a file, or of a folder's small index files (a presized store: its index, not its pixels)."""
    digest = hashlib.md5()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in (".json", ".npy", ".csv"))
    for file in files:
        digest.update(file.name.encode())
        hash_file(digest, file)
    return digest.hexdigest()


def resume_point(stage: str, params: dict[str, Any], inputs: Sequence[Path], root: Path = Path(".")) -> ResumePoint:
    """The resume file of ``stage``; its key is the stage's params and the digests of its inputs."""
    key = {
        "params": {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()},
        "inputs": {str(p): file_digest(p) for p in inputs},
    }
    process = f".rank{rank()}" if world_size() > 1 else ""  # each torchrun process keeps its own random streams
    return ResumePoint(root / RESUME_DIR / f"{stage}{process}.pt", key)


def rng_states(generators: Sequence[torch.Generator]) -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": [g.get_state() for g in generators],
    }


def set_rng_states(states: dict[str, Any], generators: Sequence[torch.Generator]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    for generator, state in zip(generators, states["generators"], strict=True):
        generator.set_state(state)


def save_state(point: ResumePoint, state: dict[str, Any]) -> None:
    """Write the state atomically: a kill during the write leaves the previous epoch's state."""
    with atomic_open(point.path, "wb") as f:
        torch.save({"key": point.key, **state}, f)


def cpu_copy(value: Any) -> Any:
    """``value`` with every tensor copied to the CPU and every dict and list copied: a snapshot that training, which
    updates weights, moments and param groups in place, cannot change."""
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: cpu_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(cpu_copy(v) for v in value)
    return value


class StateWriter:
    """Writes the resume state of ``point`` in a background thread, one write at a time: ``save`` takes a snapshot
    (``cpu_copy``) and returns while the file is written, so the next epoch trains meanwhile."""

    def __init__(self, point: ResumePoint):
        self.point = point
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: dict[str, Any]) -> None:
        self.wait()  # the previous epoch's write first: the file only ever moves forward
        snapshot = cpu_copy(state)
        self._thread = threading.Thread(target=self._write, args=(snapshot,), name="petpipe-resume-write")
        self._thread.start()

    def _write(self, snapshot: dict[str, Any]) -> None:
        try:
            save_state(self.point, snapshot)
        except BaseException as err:  # handed to the training thread by wait()
            self._error = err

    def join(self) -> None:
        """Wait for the write in flight (a stopped stage keeps its last finished epoch's state)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def wait(self) -> None:
        """``join``, then raise the write's error, if any (a full disk names the file)."""
        self.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def load_state(point: ResumePoint) -> dict[str, Any] | None:
    """The saved state if there is one made from the same params and inputs, else None (a stale one is deleted)."""
    if not point.path.is_file():
        return None
    try:
        state = torch.load(
            point.path, map_location="cpu", weights_only=False
        )  # our own file: RNG states are not tensors
    except Exception as err:  # a file from another torch version or a damaged disk: start over
        print(f"resume: ignoring {point.path}, which cannot be read ({type(err).__name__}: {err})", file=sys.stderr)
        point.path.unlink(missing_ok=True)
        return None
    if state.get("key") != point.key:
        print(
            f"resume: discarding {point.path}: it was written for other params or inputs; starting from epoch 1",
            file=sys.stderr,
        )
        point.path.unlink(missing_ok=True)
        return None
    return state


def clear_state(point: ResumePoint) -> None:
    point.path.unlink(missing_ok=True)
