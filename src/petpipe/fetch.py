"""Obtain a dataset archive (http, https, file:// or a local path), verify it, extract it safely.

Downloads land in a cache folder outside the workspace (``cache_dir()``), one folder per URL
(the SHA-256 of the URL), so a temporary or queued DVC experiment, which runs in a fresh copy of
the repository, finds the archive there instead of downloading it again. A download survives
network trouble: connection errors, timeouts and HTTP 429/5xx are retried with exponential
backoff, each try resuming from the ``.part`` file with a Range request, and the ``.part`` file
becomes the archive only when its size is the size the server announced. An archive that fails
verification (``data.size``, ``data.md5``, ``data.sha256``) or cannot be read as an archive is
deleted from the cache, so a bad download (an HTML error page, a truncated file) never sticks.

Extraction refuses unsafe entries (absolute paths, ``..``, links out of the folder, devices) and
archives over the size caps, and happens in a temporary folder that is renamed into place only
when it is complete: an interrupted fetch never leaves a dataset folder that looks finished.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import lzma
import os
import socket
import ssl
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from petpipe.errors import PetpipeError, full_disk_cause
from petpipe.files import hash_file, naming_full_disk, staged_dir
from petpipe.signals import raise_if_stopped

try:  # POSIX: parallel fetches of one URL (queued experiments) take turns on the cache folder
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

CHUNK = 1 << 20
CACHE_ENV = "PETPIPE_CACHE_DIR"
USER_AGENT = "petpipe"
RETRY_STATUS = {408, 429, 500, 502, 503, 504}  # worth another try; any other HTTP error is final
LOG_EVERY = 10.0  # seconds between progress lines when stderr is not a terminal (DVC logs, CI)


class FetchError(PetpipeError):
    """The archive could not be obtained, verified or extracted; the message names it."""


class ArchiveLimitError(FetchError):
    """The archive is over ``data.max_members`` or ``data.max_unpacked_bytes`` (not a corrupt archive)."""


@dataclass(frozen=True)
class Network:
    """Timeouts and retries of a download.

    Worst case for a host that never answers: ``tries`` connect timeouts plus the pauses between
    them, 5 x 7 s + (1 + 2 + 4 + 8) s = 50 s, so an unreachable host fails within a minute. A try
    that received bytes resets the count: a long download on a flaky line keeps resuming.
    """

    tries: int = 5  # tries in a row without progress before giving up
    connect_timeout: float = 7.0  # seconds to connect (and finish the TLS handshake)
    read_timeout: float = 60.0  # seconds without a byte before the try counts as failed
    backoff: float = 1.0  # pause before the second try, doubling for each further one
    max_backoff: float = 30.0  # cap on the pause, also on a server's Retry-After


NETWORK = Network()


@dataclass(frozen=True)
class FetchResult:
    archive: Path
    sha256: str
    archive_bytes: int
    files: int
    downloaded: bool  # False when a local archive or the cached one was used
    download_seconds: float = 0.0


def cache_dir(env: dict[str, str] | None = None) -> Path:
    """Where downloads are kept: ``$PETPIPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/petpipe/downloads``, else ``~/.cache/...``."""
    env = os.environ if env is None else env
    if env.get(CACHE_ENV):
        return Path(env[CACHE_ENV]).expanduser().absolute()
    base = Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base.absolute() / "petpipe" / "downloads"


def cached_archive(url: str, cache: Path) -> Path:
    """``cache/<sha256 of the URL>/<file name>``: two URLs never share an archive, whatever their file names."""
    name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    if not name or name in (".", "..") or name.endswith(".part"):
        name = "archive"
    return cache / hashlib.sha256(url.encode()).hexdigest() / name


def is_remote(url: str) -> bool:
    return urllib.parse.urlsplit(url).scheme in ("http", "https")


def local_path(url: str, root: Path) -> Path:
    """file:// URL or a path (relative to the repository root) -> a local path."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        return Path(urllib.parse.unquote(parts.path))
    if parts.scheme and len(parts.scheme) > 1:  # one letter is a Windows drive
        raise FetchError(f"data.url: scheme {parts.scheme!r} in {url!r} is not supported; use http, https, file:// or a repo path")
    path = Path(url)
    return path if path.is_absolute() else root / path


def fetch(
    url: str, *, dest: Path, root: Path, cache: Path | None = None, sha256: str | None = None, md5: str | None = None, size: int | None = None,
    max_members: int | None = None, max_unpacked_bytes: int | None = None, network: Network | None = None,
) -> FetchResult:  # fmt: skip
    """Obtain the archive at ``url`` (the cache first), verify it and extract it to ``dest``."""
    expected = dict(sha256=sha256, md5=md5, size=size)
    if not is_remote(url):
        archive = local_path(url, root)
        if not archive.is_file():
            raise FetchError(f"data.url: {url!r} -> {archive} does not exist or is not a file")
        digest = verify(archive, url, **expected)
        files = extract(archive, dest, max_members=max_members, max_unpacked_bytes=max_unpacked_bytes)  # a local archive is never deleted
        return FetchResult(archive, digest, archive.stat().st_size, files, downloaded=False)

    archive = cached_archive(url, cache or cache_dir())
    with locked(archive.parent):
        (archive.parent / "url").write_text(url + "\n")  # which URL this folder holds, for people
        downloaded, seconds = False, 0.0
        if archive.exists():
            try:
                digest = verify(archive, url, **expected)
            except FetchError as err:
                print(f"fetch: the cached archive {archive} fails verification ({err}); downloading it again", file=sys.stderr)
                archive.unlink()
        if not archive.exists():
            start = time.monotonic()
            download(url, archive, expected_size=size, network=network)
            downloaded, seconds = True, time.monotonic() - start
            try:
                digest = verify(archive, url, **expected)
            except FetchError as err:
                archive.unlink(missing_ok=True)
                raise FetchError(f"{err} (the download was deleted)") from None
        try:
            files = extract(archive, dest, max_members=max_members, max_unpacked_bytes=max_unpacked_bytes)
        except ArchiveLimitError:
            raise  # the archive itself is fine: keep it for a run with higher caps
        except FetchError as err:
            archive.unlink(missing_ok=True)
            raise FetchError(f"{err}; it was deleted from the cache, so the next run downloads it again") from None
    return FetchResult(archive, digest, archive.stat().st_size, files, downloaded=downloaded, download_seconds=seconds)


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s lock: a second fetch of the same URL waits instead of writing the same ``.part`` file."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"fetch: waiting for another fetch of the same URL ({folder})", file=sys.stderr)
                fcntl.flock(handle, fcntl.LOCK_EX)
        yield


# --- download --------------------------------------------------------------------------------


class _TryAgain(Exception):
    """One try failed in a way another try may fix."""

    def __init__(self, reason: str, retry_after: float = 0.0) -> None:
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


def download(url: str, target: Path, *, expected_size: int | None = None, network: Network | None = None) -> Path:
    """Download ``url`` to ``target`` through ``target.part``, resuming and retrying per ``network``."""
    network = network or NETWORK
    part = target.with_name(target.name + ".part")
    target.parent.mkdir(parents=True, exist_ok=True)
    tries = failures = 0
    while True:
        tries += 1
        before = _size(part)
        try:
            _download_once(url, part, expected_size, network)
            break
        except _TryAgain as err:
            failures = 1 if _size(part) > before else failures + 1
            if failures >= network.tries:
                raise FetchError(f"data.url: giving up on {url} after {tries} tries; the last one: {err.reason}") from None
            pause = min(max(network.backoff * 2 ** (failures - 1), err.retry_after), network.max_backoff)
            print(f"fetch: {err.reason}; try {tries + 1} in {pause:.0f} s", file=sys.stderr)
            time.sleep(pause)
    part.replace(target)
    return target


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _download_once(url: str, part: Path, expected_size: int | None, network: Network) -> None:
    """One request; returns when ``part`` holds the whole file, raises _TryAgain or FetchError otherwise."""
    have = _size(part)
    if expected_size is not None and have > expected_size:
        part.unlink()  # longer than the archive can be: not ours
        have = 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
    try:
        response = _opener(network.read_timeout).open(urllib.request.Request(url, headers=headers), timeout=network.connect_timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:
            if _content_range(err.headers.get("Content-Range"))[1] == have:
                return  # the server confirms the part file is the whole file
            part.unlink()  # its size cannot be confirmed: start over
            raise _TryAgain(f"{url} refused the resume of a {have}-byte partial download (HTTP 416); starting over") from None
        if err.code in RETRY_STATUS:
            raise _TryAgain(f"{url} answered HTTP {err.code} {err.reason}", _retry_after(err.headers.get("Retry-After"))) from None
        raise FetchError(f"data.url: {url} answered HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        reason = err.reason
        if isinstance(reason, ssl.SSLCertVerificationError) or (isinstance(reason, socket.gaierror) and reason.errno == socket.EAI_NONAME):
            raise FetchError(f"data.url: cannot reach {url}: {reason}") from None
        raise _TryAgain(f"cannot reach {url}: {reason}") from None
    except (OSError, http.client.HTTPException) as err:  # timeouts, resets, a server that closes without answering
        raise _TryAgain(f"cannot reach {url}: {err or type(err).__name__}") from None
    with response:
        start, total = _content_range(response.headers.get("Content-Range")) if response.status == 206 else (0, None)
        if start != have:
            if response.status == 206:  # a range we did not ask for: trust nothing
                part.unlink(missing_ok=True)
                raise _TryAgain(f"{url} answered a resume from byte {have:,} with another range ({response.headers.get('Content-Range')})")
            have = 0  # the server ignored the Range: start over
        length = response.headers.get("Content-Length")
        if total is None and length is not None and length.isdigit():
            total = have + int(length)
        if expected_size is not None and total is not None and total != expected_size:
            part.unlink(missing_ok=True)
            page = " (an HTML page: an error, login or proxy page?)" if response.headers.get_content_type() == "text/html" else ""
            raise FetchError(f"data.size: {url} is {total:,} bytes{page}, params expect {expected_size:,}; check data.url, or update data.size")
        name = PurePosixPath(urllib.parse.urlsplit(url).path).name
        kept = "the partial download is kept: free space on its disk and run the stage again to resume it"
        with (
            naming_full_disk(part, then=kept),
            open(part, "ab" if have else "wb") as out,
            progress_meter(name, total, have) as update,
        ):
            try:
                while chunk := response.read1(CHUNK):  # what has arrived: a timeout loses nothing
                    raise_if_stopped()  # the .part file is kept: the next try resumes it
                    out.write(chunk)
                    update(len(chunk))
            except (OSError, http.client.HTTPException) as err:
                if full_disk_cause(err):
                    raise  # not the network's fault: another try would fill the disk again
                raise _TryAgain(f"the download of {url} broke off after {out.tell():,} bytes ({err or type(err).__name__})") from None
    got = _size(part)
    if total is not None and got != total:
        raise _TryAgain(f"the download of {url} broke off after {got:,} of {total:,} bytes")


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """``bytes 100-199/200`` -> (100, 200); ``bytes */200`` -> (None, 200); anything else -> (None, None)."""
    if not header or not header.startswith("bytes "):
        return None, None
    span, _, total = header[6:].partition("/")
    first = span.split("-")[0]
    return (int(first) if first.isdigit() else None), (int(total) if total.isdigit() else None)


def _retry_after(header: str | None) -> float:
    return float(header) if header and header.strip().isdigit() else 0.0


def _opener(read_timeout: float) -> urllib.request.OpenerDirector:
    """urllib (proxies, redirects) whose sockets use the connect timeout to connect and ``read_timeout`` after."""

    class HTTP(http.client.HTTPConnection):
        def connect(self) -> None:
            super().connect()
            self.sock.settimeout(read_timeout)

    class HTTPS(http.client.HTTPSConnection):
        def connect(self) -> None:
            super().connect()
            self.sock.settimeout(read_timeout)

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(HTTP, req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(HTTPS, req)

    return urllib.request.build_opener(HTTPHandler, HTTPSHandler)


@contextmanager
def progress_meter(name: str, total: int | None, done: int, stream: IO[str] | None = None) -> Iterator:
    """Yields ``update(n)``: a tqdm bar (bytes, rate, ETA) on a terminal, a line every LOG_EVERY seconds otherwise."""
    stream = stream or sys.stderr
    if stream.isatty():
        from tqdm import tqdm

        with tqdm(total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024, desc=f"download {name}", file=stream) as bar:
            yield bar.update
        return
    start = last = time.monotonic()
    got = 0

    def line(final: bool = False) -> None:
        seconds = max(time.monotonic() - start, 1e-9)
        rate = got / seconds
        have = f"{(done + got) / 1e6:,.1f} MB" + (f" of {total / 1e6:,.1f} MB ({100 * (done + got) / total:.0f}%)" if total else "")
        eta = f", ETA {_clock((total - done - got) / rate)}" if total and rate > 0 and not final else ""
        print(f"download {name}: {have}, {rate / 1e6:.1f} MB/s{eta}" + (f" in {_clock(seconds)}" if final else ""), file=stream, flush=True)

    def update(n: int) -> None:
        nonlocal got, last
        got += n
        if time.monotonic() - last >= LOG_EVERY:
            last = time.monotonic()
            line()

    yield update
    line(final=True)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


# --- verification ----------------------------------------------------------------------------


def verify(archive: Path, url: str, *, sha256: str | None = None, md5: str | None = None, size: int | None = None) -> str:
    """Check the archive against the params that are not null; returns its SHA-256."""
    actual_size = archive.stat().st_size
    if size is not None and actual_size != size:
        raise FetchError(f"data.size: the archive from {url} has {actual_size:,} bytes, params expect {size:,}; check data.url, or update data.size")
    hashes = {"sha256": hashlib.sha256()} | ({"md5": hashlib.md5(usedforsecurity=False)} if md5 is not None else {})  # MD5 only when asked
    first, *more = hashes.values()
    hash_file(first, archive, *more)
    actual = {key: h.hexdigest() for key, h in hashes.items()}
    for key, wanted in (("sha256", sha256), ("md5", md5)):
        if wanted is not None and actual[key] != wanted:
            raise FetchError(
                f"data.{key}: the archive from {url} has {key.upper().replace('SHA', 'SHA-')} {actual[key]}, params expect {wanted}; "
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
            raise FetchError(f"data.url: archive {archive} holds no files")
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
            raise ArchiveLimitError(f"data.max_members: archive {self.archive} has more than {self.max_members:,} entries; raise data.max_members if it is right")
        if self.max_bytes is not None and self.total_bytes > self.max_bytes:
            raise ArchiveLimitError(
                f"data.max_unpacked_bytes: archive {self.archive} unpacks to more than {self.max_bytes:,} bytes (at {name!r}); "
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
            raise FetchError(f"data.url: {archive} is neither a tar nor a zip archive{_what_it_is(archive)}")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile) as err:
        raise FetchError(f"data.url: cannot extract {archive}: {err}") from None
    except OSError as err:
        if err.errno is None:  # bz2 and others report corrupt data as an OSError without an errno
            raise FetchError(f"data.url: cannot extract {archive}: {err}") from None
        raise  # the disk (full, permissions): not the archive's fault


def _tar_members(tf: tarfile.TarFile, into: Path, limits: Limits) -> Iterator[tarfile.TarInfo]:
    """The members in archive order (one pass over a compressed stream), each checked before it is written."""
    root = into.resolve()
    for member in tf:
        _check_name(member.name, tf.name)
        if member.issym() or member.islnk():
            base = (root / member.name).parent if member.issym() else root
            if PurePosixPath(member.linkname).is_absolute() or not (base / member.linkname).resolve().is_relative_to(root):
                raise FetchError(f"data.url: archive {tf.name} has an unsafe entry (a link out of its folder): {member.name!r} -> {member.linkname!r}")
        elif not (member.isfile() or member.isdir()):
            raise FetchError(f"data.url: archive {tf.name} has an unsafe entry (a device or pipe): {member.name!r}")
        limits.add(member.name, member.size if member.isfile() else 0)
        yield member


def _check_name(name: str, archive: Path | str | None) -> None:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and path.parts[0].endswith(":")):
        raise FetchError(f"data.url: archive {archive} has an unsafe entry (a path outside its folder): {name!r}")


def _what_it_is(path: Path) -> str:
    """A hint for the error: what the file starts with."""
    with open(path, "rb") as f:
        head = f.read(512)
    if b"<html" in head.lower() or b"<!doctype" in head.lower():
        return " (it is an HTML page: an error, login or proxy page instead of the archive?)"
    if not head:
        return " (it is empty)"
    return f" (it starts with {head[:16]!r})"

