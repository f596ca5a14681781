"""A simulated small disk: files written under one folder fail with ENOSPC once a byte budget is spent,
and the folder's free space reads as a set figure. For tests on machines where no real small filesystem
can be mounted (see ``tmpfs_command`` for one that can).

In a test: ``SmallDisk(folder, fills_after=..., free=...).install(monkeypatch)``. Around a stage
script, in a process of its own::

    python tests/small_disk.py FOLDER FILLS_AFTER FREE stages/presize.py --params ...
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REAL_OPEN = io.open
REAL_DISK_USAGE = shutil.disk_usage
WRITING = set("wax+")


class SmallDisk:
    def __init__(self, folder: Path, *, fills_after: int, free: int) -> None:
        self.folder, self.left, self.free = os.path.realpath(folder), fills_after, free

    def holds(self, path: Any) -> bool:
        return os.path.commonpath([os.path.realpath(path), self.folder]) == self.folder

    def open(self, file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = REAL_OPEN(file, mode, *args, **kwargs)
        name = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else file
        return _Filling(handle, self) if WRITING & set(mode) and self.holds(name) else handle

    def disk_usage(self, path: Any) -> Any:
        usage = REAL_DISK_USAGE(path)
        return usage._replace(free=self.free) if self.holds(path) else usage

    def install(self, patch: Any) -> SmallDisk:
        """Route ``open`` (which ``os.fdopen`` and numpy use too) and ``shutil.disk_usage`` through this disk."""
        patch.setattr(builtins, "open", self.open)
        patch.setattr(io, "open", self.open)
        patch.setattr(shutil, "disk_usage", self.disk_usage)
        return self


class _Filling:
    """A file on the small disk: its writes spend the disk's budget; the one that overdraws it fails as the OS would."""

    def __init__(self, handle: Any, disk: SmallDisk) -> None:
        self._handle, self._disk = handle, disk

    def write(self, data: Any) -> int:
        size = len(data.encode()) if isinstance(data, str) else memoryview(data).nbytes
        if size > self._disk.left:
            self._disk.left = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._disk.left -= size
        return self._handle.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    def __enter__(self) -> _Filling:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.close()


def simulated_command(folder: Path, fills_after: int, free: int, script: Path, *args: str) -> list[str]:
    """Run ``script args`` (a stage) in a new Python process with ``folder`` on a simulated small disk."""
    return [sys.executable, __file__, str(folder), str(fills_after), str(free), str(script), *args]


def tmpfs_command(folder: Path, size: int, command: list[str], fill: bool = False) -> list[str]:
    """Run ``command`` with a real ``size``-byte tmpfs mounted on ``folder`` (``fill``: full before it starts),
    in user and mount namespaces of its own (no root needed); prints the files left on it, then unmounts it."""
    script = "\n".join(
        [
            f'mount -t tmpfs -o size={size} petpipe-test "$0" || exit 99',
            'cat /dev/zero > "$0/filler" 2>/dev/null' if fill else "",
            '"$@"; code=$?',
            'echo "files left on the disk: $(find "$0" -type f ! -path "$0/filler" | tr "\\n" " ")"',
            "exit $code",
        ]
    )
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, str(folder), *command]


def can_mount_tmpfs(folder: Path) -> bool:
    """Whether this machine lets an unprivileged user mount a tmpfs in a namespace of its own."""
    if shutil.which("unshare") is None or not sys.platform.startswith("linux"):
        return False
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(tmpfs_command(folder, 64 * 1024, ["true"]), capture_output=True, timeout=30, check=False)
    return done.returncode == 0


class _Setattr:
    @staticmethod
    def setattr(module: Any, name: str, value: Any) -> None:
        setattr(module, name, value)


if __name__ == "__main__":
    folder, fills_after, free, script, *args = sys.argv[1:]
    SmallDisk(Path(folder), fills_after=int(fills_after), free=int(free)).install(_Setattr())
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")
