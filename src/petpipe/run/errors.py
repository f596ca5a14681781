"""The base of every error a user can fix; stage scripts print these as one line, no traceback."""

from __future__ import annotations

import errno
import os
from pathlib import Path

FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # no space left on the device; the user's disk quota is used up
FREE_SPACE = "free space on its disk and run the stage again"


class PetpipeError(Exception):
    """A problem with the user's params, data or files; the message names it and the fix."""


class NoRoomError(PetpipeError):
    """Not enough room (disk space, device memory) for what a stage must hold; the message names where and the fix."""


class DiskFullError(NoRoomError):
    """The disk filled while ``path`` was being written (``path`` None: the OS did not say which file)."""

    def __init__(self, path: Path | str | None, reason: str, then: str = FREE_SPACE) -> None:
        super().__init__(f"{path if path is not None else 'a file'}: {reason} while writing it; {then}")
        self.path, self.reason, self.then = path, reason, then


def format_bytes(n: int) -> str:
    return f"{n:,} bytes ({n / 2**20:,.1f} MiB)"


def check_room(needed: int, free: int, *, what: str, where: str, fix: str) -> None:
    """Raise a one-line NoRoomError when ``needed`` bytes exceed the ``free`` bytes of ``where``.

    Reads ``<what> needs N bytes (M MiB) but <where> has N bytes (M MiB) free; <fix>``. For any room
    known before the work starts: a disk (``files.free_bytes``), a device's memory.
    """
    if needed > free:
        raise NoRoomError(f"{what} needs {format_bytes(needed)} but {where} has {format_bytes(free)} free; {fix}")


def full_disk_cause(err: BaseException | None) -> DiskFullError | OSError | None:
    """The full-disk error that ``err`` is, or was raised from or while handling; None if there is none.

    A DiskFullError (which already names its file) wins over the OSError (ENOSPC, EDQUOT) under it.
    Libraries wrap the OSError: torch.save, for one, raises a RuntimeError while handling it.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, DiskFullError) or (isinstance(err, OSError) and err.errno in FULL_DISK_ERRNOS):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def disk_full_reason(err: OSError) -> str:
    """``no space left on device`` or ``disk quota exceeded``, as the OS says it."""
    return (err.strerror or os.strerror(err.errno or errno.ENOSPC)).lower()


def written_file(err: OSError) -> str | None:
    """The file the OS names as written: a copy or rename names its destination second (shutil.copyfile)."""
    return err.filename2 if err.filename2 is not None else err.filename


def disk_full_error(err: BaseException) -> DiskFullError | None:
    """``err`` as a DiskFullError when a full disk caused it (naming the file the OS named), else None."""
    cause = full_disk_cause(err)
    if cause is None or isinstance(cause, DiskFullError):
        return cause
    return DiskFullError(written_file(cause), disk_full_reason(cause))
