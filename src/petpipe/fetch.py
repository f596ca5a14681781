"""Obtain a dataset archive (http, https, file:// or a local path), verify it, extract it safely.

Downloads resume from a ``.part`` file, the archive is checked against its SHA-256 before it is
opened, and extraction happens in a temporary folder that is renamed into place only when it is
complete: an interrupted fetch never leaves a dataset folder that looks finished.
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from petpipe.errors import PetpipeError
from petpipe.files import replace_dir

CHUNK = 1 << 20


class FetchError(PetpipeError):
    """The archive could not be obtained, verified or extracted; the message names it."""


@dataclass(frozen=True)
class FetchResult:
    archive: Path
    sha256: str
    archive_bytes: int
    files: int


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


def download(url: str, target: Path, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``target``, resuming from ``target.part`` if an earlier try was cut off."""
    part = target.with_name(target.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "petpipe", **({"Range": f"bytes={have}-"} if have else {})})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # the part file already holds everything
            part.replace(target)
            return target
        raise FetchError(f"data.url: {url} answered HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        raise FetchError(f"data.url: cannot reach {url}: {getattr(err, 'reason', err)}") from None
    with response:
        if have and response.status != 206:  # the server ignored Range: start over
            have = 0
        remaining = response.headers.get("Content-Length")
        total = have + int(remaining) if remaining is not None else None
        with open(part, "ab" if have else "wb") as out, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, desc=f"download {Path(urllib.parse.urlsplit(url).path).name}"
        ) as bar:
            try:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
            except OSError as err:
                raise FetchError(f"data.url: download of {url} broke off ({err}); run again to resume") from None
    if total is not None and part.stat().st_size != total:
        raise FetchError(f"data.url: {url} sent {part.stat().st_size} of {total} bytes; run again to resume")
    part.replace(target)
    return target


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify(archive: Path, expected: str | None, url: str) -> str:
    actual = sha256_of(archive)
    if expected is not None and actual != expected:
        raise FetchError(
            f"data.sha256: the archive from {url} has SHA-256 {actual}, params expect {expected}; "
            "check data.url, or update data.sha256 if the archive changed on purpose"
        )
    return actual


def extract(archive: Path, dest: Path) -> int:
    """Extract into a temp folder next to ``dest`` and rename it into place; returns the file count.

    A single top-level folder in the archive (``oxford-iiit-pet/``) is stripped, so ``dest`` holds
    the dataset itself.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        _unpack(archive, staging)
        entries = [p for p in staging.iterdir() if p.name not in ("__MACOSX",) and not p.name.startswith("._")]
        content = entries[0] if len(entries) == 1 and entries[0].is_dir() else staging
        files = sum(1 for p in content.rglob("*") if p.is_file())
        if files == 0:
            raise FetchError(f"data.url: archive {archive} holds no files")
        replace_dir(content, dest)
        return files
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _unpack(archive: Path, into: Path) -> None:
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for name in zf.namelist():
                    target = (into / name).resolve()
                    if not target.is_relative_to(into.resolve()):
                        raise FetchError(f"data.url: archive {archive} has an entry outside its folder: {name!r}")
                zf.extractall(into)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                if hasattr(tarfile, "data_filter"):
                    # The "data" filter refuses absolute paths, "..", links out of the folder and devices.
                    tf.extractall(into, filter="data")
                else:  # Python < 3.11.4 has no extraction filters: check the members ourselves
                    tf.extractall(into, members=safe_members(tf, into, archive))
        else:
            raise FetchError(f"data.url: {archive} is neither a tar nor a zip archive")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
        raise FetchError(f"data.url: cannot extract {archive}: {err}") from None


def safe_members(tf: tarfile.TarFile, into: Path, archive: Path) -> list[tarfile.TarInfo]:
    """Regular files and folders whose paths stay inside ``into``; anything else is an error."""
    root = into.resolve()
    members = tf.getmembers()
    for m in members:
        if not (m.isfile() or m.isdir()) or not (root / m.name).resolve().is_relative_to(root):
            raise FetchError(f"data.url: archive {archive} has an unsafe entry (link, device or path outside its folder): {m.name!r}")
    return members


def fetch(url: str, sha256: str | None, dest: Path, root: Path, downloads: Path) -> FetchResult:
    """Obtain the archive at ``url``, check ``sha256`` and extract it to ``dest``."""
    if is_remote(url):
        name = Path(urllib.parse.urlsplit(url).path).name or "archive"
        archive = downloads / name
        if not archive.exists():
            download(url, archive)
    else:
        archive = local_path(url, root)
        if not archive.is_file():
            raise FetchError(f"data.url: {url!r} -> {archive} does not exist or is not a file")
    try:
        digest = verify(archive, sha256, url)
    except FetchError:
        if is_remote(url):
            archive.unlink(missing_ok=True)  # a corrupt download must not be trusted next time
        raise
    files = extract(archive, dest)
    # A downloaded archive stays in ``downloads``: when fetch re-runs (a code change re-runs every
    # stage) it is verified and extracted again without another download.
    return FetchResult(archive=archive, sha256=digest, archive_bytes=archive.stat().st_size, files=files)
