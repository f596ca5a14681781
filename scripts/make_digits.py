"""Regenerate assets/digits.tgz from scikit-learn's bundled copy of the UCI optdigits test set.

    .venv/bin/pip install scikit-learn && .venv/bin/python scripts/make_digits.py

Writes the 1,797 8x8 digits as grayscale PNGs laid out like fastai's MNIST_SAMPLE:
``digits/train/<digit>/<id>.png``, ``digits/valid/<digit>/<id>.png`` and ``digits/labels.csv``
(name,label,is_valid). The validation split is a seeded, per-class 20 % draw. The tarball is
byte-for-byte reproducible (sorted entries, zero mtimes, no owner names, gzip mtime 0), so its
SHA-256 in profiles/digits.yaml only changes when the content does.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

VALID_PCT = 0.2
SEED = 42


def png_bytes(pixels: np.ndarray) -> bytes:
    """8x8 values 0..16 -> 8-bit grayscale PNG."""
    buffer = io.BytesIO()
    Image.fromarray(np.round(pixels * 255 / 16).astype(np.uint8), mode="L").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def split_indices(targets: np.ndarray) -> set[int]:
    rng = np.random.default_rng(SEED)
    valid: set[int] = set()
    for digit in np.unique(targets):
        members = np.flatnonzero(targets == digit)
        valid.update(rng.choice(members, size=round(VALID_PCT * len(members)), replace=False).tolist())
    return valid


def build_entries() -> dict[str, bytes]:
    digits = load_digits()
    valid = split_indices(digits.target)
    entries: dict[str, bytes] = {}
    rows = ["name,label,is_valid"]
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        name = f"{'valid' if i in valid else 'train'}/{label}/{i:04d}.png"
        entries[f"digits/{name}"] = png_bytes(pixels)
        rows.append(f"{name},{label},{int(i in valid)}")
    entries["digits/labels.csv"] = ("\n".join(rows) + "\n").encode()
    entries["digits/README.txt"] = (Path(__file__).parent.parent / "assets" / "DIGITS_ATTRIBUTION.txt").read_bytes()
    return entries


def write_tarball(entries: dict[str, bytes], out: Path) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(entries):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(entries[name]), 0, 0o644
            tar.addfile(info, io.BytesIO(entries[name]))
    with open(out, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=9) as gz:
        gz.write(raw.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("assets/digits.tgz"))
    args = parser.parse_args()
    write_tarball(build_entries(), args.out)
    print(f"{args.out}: {args.out.stat().st_size} bytes, sha256 {hashlib.sha256(args.out.read_bytes()).hexdigest()}")


if __name__ == "__main__":
    main()
