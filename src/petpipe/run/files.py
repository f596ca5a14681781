"""Atomic file writes: a temp file in the same folder, renamed into place only when complete."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from petpipe.run.errors import FREE_SPACE, DiskFullError, disk_full_reason, full_disk_cause, written_file


@contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO]:
    """Open a temp file next to ``path``; on success it replaces ``path``, on error it is removed.

    An interrupted stage therefore never leaves a truncated file that looks complete, and a full disk
    ends in a DiskFullError naming ``path``.
    """
    with naming_full_disk(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, mode, **({} if "b" in mode else {"newline": ""})) as f:
                yield f
            os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the usual file mode
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


@contextmanager
def naming_full_disk(path: Path, *, staging: Path | None = None, then: str = FREE_SPACE) -> Iterator[None]:
    """A full disk (ENOSPC, EDQUOT) met in the block ends in a one-line DiskFullError naming ``path``.

    ``path`` is the file or folder being written, not the temp name the OS would give. With ``staging``
    (a folder that becomes ``path`` when complete), a file the error names inside it is named at its
    final place. ``then`` says what to do next.
    """
    try:
        yield
    except Exception as err:
        cause = full_disk_cause(err)
        if cause is None:
            raise
        if isinstance(cause, DiskFullError):  # an inner writer named its file already
            named = _final_place(cause.path, staging, path) if staging else cause.path
            if cause is err and named == cause.path:
                raise
            raise DiskFullError(named, cause.reason, cause.then) from cause.__cause__
        named = _final_place(written_file(cause), staging, path) if staging else path
        raise DiskFullError(named, disk_full_reason(cause), then) from err


def _final_place(name: Any, staging: Path, dest: Path) -> Path:
    """Where ``name``, written inside ``staging``, will be once ``staging`` becomes ``dest``; ``dest`` if unnamed."""
    if name is None:
        return dest
    try:
        return dest / Path(os.path.abspath(os.fsdecode(name))).relative_to(os.path.abspath(staging))
    except (TypeError, ValueError):  # outside the staging folder: its own name
        return Path(os.fsdecode(name))


def free_bytes(path: Path) -> int:
    """Bytes this user may still write on the disk that holds ``path``, or will (its nearest existing parent)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: Path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def replace_dir(src: Path, dest: Path) -> None:
    """Move folder ``src`` to ``dest``; an existing ``dest`` is set aside first, removed last."""
    os.chmod(src, 0o777 & ~current_umask())  # a mkdtemp staging folder is 0700
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(src, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_dir(dest: Path, promote: Callable[[Path], Path] | None = None) -> Iterator[Path]:
    """A new folder beside ``dest`` to fill; when the block ends normally it replaces ``dest`` as a
    whole (or ``promote(staging)`` does: a folder inside it, e.g. an archive's single top folder).
    On an error it is removed and ``dest`` stays as it was: no half-written folder looks complete. A
    full disk ends in a DiskFullError naming the file's final place under ``dest`` (``dest`` itself
    when the OS names no file or ``promote`` moves things)."""
    with naming_full_disk(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        with naming_full_disk(dest, staging=None if promote else staging):
            yield staging
            replace_dir(promote(staging) if promote else staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def hash_file(digest: Any, path: Path, *more: Any) -> Any:
    """Feed a file to one or more hashlib digests in 1 MiB blocks, in one pass; returns the first."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            for d in (digest, *more):
                d.update(block)
    return digest


def md5_of(path: Path) -> str:
    return hash_file(hashlib.md5(), path).hexdigest()


def write_rows(path: Path, rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    """CSV with a header (``columns``, else the first row's keys); DVC plots read it directly."""
    with atomic_open(path) as f:
        writer = csv.DictWriter(f, fieldnames=columns or list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
