"""Verify a dataset archive (``data.size``, ``data.md5``, ``data.sha256``) and extract it safely.

Extraction refuses unsafe entries (absolute paths, ``..``, links out of the folder, devices) and
archives over the size caps, and happens in a temporary folder that is renamed into place only
when it is complete: an interrupted fetch never leaves a dataset folder that looks finished.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from petpipe.run.errors import PetpipeError
from petpipe.run.files import hash_file, staged_dir


class ArchiveError(PetpipeError):
    """The archive fails verification or cannot be extracted; the message names it."""


class ArchiveLimitError(ArchiveError):
    """The archive is over ``data.max_members`` or ``data.max_unpacked_bytes`` (not a corrupt archive)."""


def verify(
    archive: Path, url: str, *, sha256: str | None = None, md5: str | None = None, size: int | None = None
) -> str:
    """Check the archive against the params that are not null; returns its SHA-256."""
    actual_size = archive.stat().st_size
    if size is not None and actual_size != size:
        raise ArchiveError(
            f"data.size: the archive from {url} has {actual_size:,} bytes, params expect {size:,}; "
            "check data.url, or update data.size"
        )
    hashes = {"sha256": hashlib.sha256()}
    if md5 is not None:  # MD5 only when asked
        hashes["md5"] = hashlib.md5(usedforsecurity=False)
    first, *more = hashes.values()
    hash_file(first, archive, *more)
    actual = {key: h.hexdigest() for key, h in hashes.items()}
    for key, wanted in (("sha256", sha256), ("md5", md5)):
        if wanted is not None and actual[key] != wanted:
            raise ArchiveError(
                f"data.{key}: the archive from {url} has {key.upper().replace('SHA', 'SHA-')} {actual[key]}, "
                f"params expect {wanted}; "
                f"check data.url, or update data.{key} if the archive changed on purpose"
            )
    return actual["sha256"]


# --- extraction ------------------------------------------------------------------------------


def extract(archive: Path, dest: Path, *, max_members: int | None = None, max_unpacked_bytes: int | None = None) -> int:
    """Extract into a temp folder next to ``dest`` and rename it into place; returns the file count.

    A single top-level folder in the archive (``oxford-iiit-pet/``) is stripped, so ``dest`` holds
    the dataset itself.
    """
    with staged_dir(dest, promote=dataset_root) as staging:
        _unpack(archive, staging, Limits(archive, max_members, max_unpacked_bytes))
        files = sum(1 for p in dataset_root(staging).rglob("*") if p.is_file())
        if files == 0:
            raise ArchiveError(f"data.url: archive {archive} holds no files")
    return files


def dataset_root(extracted: Path) -> Path:
    """The archive's single top-level folder if it has one (macOS metadata aside), else ``extracted`` itself."""
    entries = [p for p in extracted.iterdir() if p.name not in ("__MACOSX",) and not p.name.startswith("._")]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else extracted


@dataclass
class Limits:
    """Counts entries and bytes while extracting; over a cap is an ArchiveLimitError."""

    archive: Path
    max_members: int | None
    max_bytes: int | None
    members: int = 0
    total_bytes: int = 0

    def add(self, name: str, size: int) -> None:
        self.members += 1
        self.total_bytes += size
        if self.max_members is not None and self.members > self.max_members:
            raise ArchiveLimitError(
                f"data.max_members: archive {self.archive} has more than {self.max_members:,} entries; "
                "raise data.max_members if it is right"
            )
        if self.max_bytes is not None and self.total_bytes > self.max_bytes:
            raise ArchiveLimitError(
                f"data.max_unpacked_bytes: archive {self.archive} unpacks to more than {self.max_bytes:,} bytes "
                f"(at {name!r}); "
                "raise data.max_unpacked_bytes if it is right"
            )


def _unpack(archive: Path, into: Path, limits: Limits) -> None:
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                members = zf.infolist()
                for info in members:
                    _check_name(info.filename, archive)
                    limits.add(info.filename, info.file_size)  # zipfile never writes more than file_size bytes
                zf.extractall(into, members)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                members = _tar_members(tf, into, limits)
                if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: the "data" filter checks everything again
                    tf.extractall(into, members=members, filter="data")
                else:
                    tf.extractall(into, members=members)
        else:
            raise ArchiveError(f"data.url: {archive} is neither a tar nor a zip archive{_what_it_is(archive)}")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile) as err:
        raise ArchiveError(f"data.url: cannot extract {archive}: {err}") from None
    except OSError as err:
        if err.errno is None:  # bz2 and others report corrupt data as an OSError without an errno
            raise ArchiveError(f"data.url: cannot extract {archive}: {err}") from None
        raise  # the disk (full, permissions): not the archive's fault


def _tar_members(tf: tarfile.TarFile, into: Path, limits: Limits) -> Iterator[tarfile.TarInfo]:
    """The members in archive order (one pass over a compressed stream), each checked before it is written."""
    root = into.resolve()
    for member in tf:
        _check_name(member.name, tf.name)
        if member.issym() or member.islnk():
            base = (root / member.name).parent if member.issym() else root
            absolute = PurePosixPath(member.linkname).is_absolute()
            if absolute or not (base / member.linkname).resolve().is_relative_to(root):
                unsafe = f"an unsafe entry (a link out of its folder): {member.name!r} -> {member.linkname!r}"
                raise ArchiveError(f"data.url: archive {tf.name} has {unsafe}")
        elif not (member.isfile() or member.isdir()):
            raise ArchiveError(f"data.url: archive {tf.name} has an unsafe entry (a device or pipe): {member.name!r}")
        limits.add(member.name, member.size if member.isfile() else 0)
        yield member


def _check_name(name: str, archive: Path | str | None) -> None:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and path.parts[0].endswith(":")):
        raise ArchiveError(f"data.url: archive {archive} has an unsafe entry (a path outside its folder): {name!r}")


def _what_it_is(path: Path) -> str:
    """A hint for the error: what the file starts with."""
    with open(path, "rb") as f:
        head = f.read(512)
    if b"<html" in head.lower() or b"<!doctype" in head.lower():
        return " (it is an HTML page: an error, login or proxy page instead of the archive?)"
    if not head:
        return " (it is empty)"
    return f" (it starts with {head[:16]!r})"
