"""Download a dataset archive over http(s) into a cache outside the workspace, resumably.

Downloads land in ``cache_dir()``, one folder per URL (the SHA-256 of the URL), so a temporary or
queued DVC experiment, which runs in a fresh copy of the repository, finds the archive there
instead of downloading it again; ``locked`` makes parallel fetches of one URL take turns. A
download survives network trouble: connection errors, timeouts and HTTP 429/5xx are retried with
exponential backoff, each try resuming from the ``.part`` file with a Range request, and the
``.part`` file becomes the archive only when its size is the size the server announced.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from petpipe.run.errors import PetpipeError, full_disk_cause
from petpipe.run.files import naming_full_disk
from petpipe.run.signals import raise_if_stopped

try:  # POSIX: parallel fetches of one URL (queued experiments) take turns on the cache folder
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

CHUNK = 1 << 20
CACHE_ENV = "PETPIPE_CACHE_DIR"
USER_AGENT = "petpipe"
RETRY_STATUS = {408, 429, 500, 502, 503, 504}  # worth another try; any other HTTP error is final
LOG_EVERY = 10.0  # seconds between progress lines when stderr is not a terminal (DVC logs, CI)


class DownloadError(PetpipeError):
    """The archive could not be downloaded; the message names the URL and why."""


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


def cache_dir(env: dict[str, str] | None = None) -> Path:
    """Where downloads are kept: ``$PETPIPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/petpipe/downloads``, else
    ``~/.cache/petpipe/downloads``."""
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
                last = f"the last one: {err.reason}"
                raise DownloadError(f"data.url: giving up on {url} after {tries} tries; {last}") from None
            pause = min(max(network.backoff * 2 ** (failures - 1), err.retry_after), network.max_backoff)
            print(f"fetch: {err.reason}; try {tries + 1} in {pause:.0f} s", file=sys.stderr)
            time.sleep(pause)
    part.replace(target)
    return target


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _download_once(url: str, part: Path, expected_size: int | None, network: Network) -> None:
    """One request; returns when ``part`` holds the whole file, raises _TryAgain or DownloadError otherwise."""
    have = _size(part)
    if expected_size is not None and have > expected_size:
        part.unlink()  # longer than the archive can be: not ours
        have = 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
    try:
        request = urllib.request.Request(url, headers=headers)
        response = _opener(network.read_timeout).open(request, timeout=network.connect_timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:
            if _content_range(err.headers.get("Content-Range"))[1] == have:
                return  # the server confirms the part file is the whole file
            part.unlink()  # its size cannot be confirmed: start over
            why = f"{url} refused the resume of a {have}-byte partial download (HTTP 416); starting over"
            raise _TryAgain(why) from None
        if err.code in RETRY_STATUS:
            retry_after = _retry_after(err.headers.get("Retry-After"))
            raise _TryAgain(f"{url} answered HTTP {err.code} {err.reason}", retry_after) from None
        raise DownloadError(f"data.url: {url} answered HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        reason = err.reason
        unknown_host = isinstance(reason, socket.gaierror) and reason.errno == socket.EAI_NONAME
        if isinstance(reason, ssl.SSLCertVerificationError) or unknown_host:
            raise DownloadError(f"data.url: cannot reach {url}: {reason}") from None
        raise _TryAgain(f"cannot reach {url}: {reason}") from None
    except (OSError, http.client.HTTPException) as err:  # timeouts, resets, a server that closes without answering
        raise _TryAgain(f"cannot reach {url}: {err or type(err).__name__}") from None
    with response:
        start, total = _content_range(response.headers.get("Content-Range")) if response.status == 206 else (0, None)
        if start != have:
            if response.status == 206:  # a range we did not ask for: trust nothing
                part.unlink(missing_ok=True)
                got_range = response.headers.get("Content-Range")
                raise _TryAgain(f"{url} answered a resume from byte {have:,} with another range ({got_range})")
            have = 0  # the server ignored the Range: start over
        length = response.headers.get("Content-Length")
        if total is None and length is not None and length.isdigit():
            total = have + int(length)
        if expected_size is not None and total is not None and total != expected_size:
            part.unlink(missing_ok=True)
            html = response.headers.get_content_type() == "text/html"
            page = " (an HTML page: an error, login or proxy page?)" if html else ""
            raise DownloadError(
                f"data.size: {url} is {total:,} bytes{page}, params expect {expected_size:,}; "
                "check data.url, or update data.size"
            )
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
                why = err or type(err).__name__
                raise _TryAgain(f"the download of {url} broke off after {out.tell():,} bytes ({why})") from None
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

        bytes_bar = dict(unit="B", unit_scale=True, unit_divisor=1024)
        with tqdm(total=total, initial=done, desc=f"download {name}", file=stream, **bytes_bar) as bar:
            yield bar.update
        return
    start = last = time.monotonic()
    got = 0

    def line(final: bool = False) -> None:
        seconds = max(time.monotonic() - start, 1e-9)
        rate = got / seconds
        of_total = f" of {total / 1e6:,.1f} MB ({100 * (done + got) / total:.0f}%)" if total else ""
        have = f"{(done + got) / 1e6:,.1f} MB{of_total}"
        eta = f", ETA {_clock((total - done - got) / rate)}" if total and rate > 0 and not final else ""
        took = f" in {_clock(seconds)}" if final else ""
        print(f"download {name}: {have}, {rate / 1e6:.1f} MB/s{eta}{took}", file=stream, flush=True)

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
