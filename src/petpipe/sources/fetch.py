"""Obtain the dataset archive at ``data.url`` (http, https, file:// or a repository path), verify it, extract it.

The steps are in ``download`` (cache, lock, resume) and ``archive`` (verification, safe extraction); this module
decides what happens to a cached archive: reused while it passes verification, downloaded again when it does not,
and deleted when it fails (an HTML error page, a truncated file), so a bad download never sticks.
"""

from __future__ import annotations

import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from petpipe.run.errors import PetpipeError
from petpipe.sources.archive import ArchiveError, ArchiveLimitError, extract, verify
from petpipe.sources.download import Network, cache_dir, cached_archive, download, locked


class FetchError(PetpipeError):
    """``data.url`` names no archive this can read; the message says why."""


@dataclass(frozen=True)
class FetchResult:
    archive: Path
    sha256: str
    archive_bytes: int
    files: int
    downloaded: bool  # False when a local archive or the cached one was used
    download_seconds: float = 0.0


def is_remote(url: str) -> bool:
    return urllib.parse.urlsplit(url).scheme in ("http", "https")


def local_path(url: str, root: Path) -> Path:
    """file:// URL or a path (relative to the repository root) -> a local path."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        return Path(urllib.parse.unquote(parts.path))
    if parts.scheme and len(parts.scheme) > 1:  # one letter is a Windows drive
        allowed = "use http, https, file:// or a repo path"
        raise FetchError(f"data.url: scheme {parts.scheme!r} in {url!r} is not supported; {allowed}")
    path = Path(url)
    return path if path.is_absolute() else root / path


def fetch(
    url: str,
    *,
    dest: Path,
    root: Path,
    cache: Path | None = None,
    sha256: str | None = None,
    md5: str | None = None,
    size: int | None = None,
    max_members: int | None = None,
    max_unpacked_bytes: int | None = None,
    network: Network | None = None,
) -> FetchResult:
    """Obtain the archive at ``url`` (the cache first), verify it and extract it to ``dest``."""
    expected = dict(sha256=sha256, md5=md5, size=size)
    caps = dict(max_members=max_members, max_unpacked_bytes=max_unpacked_bytes)
    if not is_remote(url):
        archive = local_path(url, root)
        if not archive.is_file():
            raise FetchError(f"data.url: {url!r} -> {archive} does not exist or is not a file")
        digest = verify(archive, url, **expected)
        files = extract(archive, dest, **caps)  # a local archive is never deleted
        return FetchResult(archive, digest, archive.stat().st_size, files, downloaded=False)

    archive = cached_archive(url, cache or cache_dir())
    with locked(archive.parent):
        (archive.parent / "url").write_text(url + "\n")  # which URL this folder holds, for people
        downloaded, seconds = False, 0.0
        if archive.exists():
            try:
                digest = verify(archive, url, **expected)
            except ArchiveError as err:
                again = "downloading it again"
                print(f"fetch: the cached archive {archive} fails verification ({err}); {again}", file=sys.stderr)
                archive.unlink()
        if not archive.exists():
            start = time.monotonic()
            download(url, archive, expected_size=size, network=network)
            downloaded, seconds = True, time.monotonic() - start
            try:
                digest = verify(archive, url, **expected)
            except ArchiveError as err:
                archive.unlink(missing_ok=True)
                raise ArchiveError(f"{err} (the download was deleted)") from None
        try:
            files = extract(archive, dest, **caps)
        except ArchiveLimitError:
            raise  # the archive itself is fine: keep it for a run with higher caps
        except ArchiveError as err:
            archive.unlink(missing_ok=True)
            raise ArchiveError(f"{err}; it was deleted from the cache, so the next run downloads it again") from None
    return FetchResult(archive, digest, archive.stat().st_size, files, downloaded=downloaded, download_seconds=seconds)
