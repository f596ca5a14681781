"""Labelling rules (folder, regex, csv) and the validation split.

The result is a table of (path, label, split) with paths relative to the dataset root, the class
list (sorted labels of the training split) and the files that were skipped, each with a reason.
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from petpipe.errors import PetpipeError
from petpipe.files import atomic_open, write_json

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "valid")
TABLE_COLUMNS = ("path", "label", "split")


class LabelError(PetpipeError, ValueError):
    """The dataset cannot be labelled as configured; the message says what to change."""


@dataclass(frozen=True)
class Item:
    path: str  # POSIX path relative to the dataset root
    label: str
    split: str | None  # "train", "valid", or None until the random split assigns one


@dataclass
class LabelTable:
    items: list[Item]
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def counts(self) -> dict[str, int]:
        splits = Counter(item.split for item in self.items)
        return {"n_train": splits["train"], "n_valid": splits["valid"], "n_classes": len(self.classes), "n_skipped": len(self.skipped)}


def image_files(root: Path, images_dir: str) -> list[str]:
    """Sorted image paths (relative to ``root``) under ``root/images_dir``: identical on every machine."""
    base = root / images_dir
    if not base.is_dir():
        raise LabelError(f"labels.images_dir: {images_dir!r} is not a folder inside the dataset {root}")
    files = sorted(p.relative_to(root).as_posix() for p in base.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise LabelError(f"labels.images_dir: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {base}")
    return files


def label_by_folder(paths: list[str]) -> tuple[list[Item], list[tuple[str, str]]]:
    """Parent folder = label; a ``train/`` or ``valid/`` folder above it gives the split."""
    has_split_folders = any(set(PurePosixPath(p).parts[:-2]) & set(SPLITS) for p in paths)
    items, skipped = [], []
    for path in paths:
        parts = PurePosixPath(path).parts
        if len(parts) < 2:
            skipped.append((path, "not inside a class folder"))
            continue
        split = next((s for s in reversed(parts[:-2]) if s in SPLITS), None)
        if has_split_folders and split is None:
            skipped.append((path, "not under a train/ or valid/ folder"))
            continue
        items.append(Item(path, parts[-2], split))
    return items, skipped


def label_by_regex(paths: list[str], pattern: str, match_on: str) -> tuple[list[Item], list[tuple[str, str]]]:
    """The one capture group of ``pattern``, searched in the file name or the relative path."""
    regex = re.compile(pattern)
    items, skipped = [], []
    for path in paths:
        match = regex.search(PurePosixPath(path).name if match_on == "name" else path)
        if match and match.group(1):
            items.append(Item(path, match.group(1), None))
        else:
            skipped.append((path, "does not match labels.pattern"))
    if not items:
        tried = [PurePosixPath(p).name if match_on == "name" else p for p in paths[:5]]
        raise LabelError(
            f"labels.pattern: '{pattern}' matches none of the {len(paths)} files (matched against the file {match_on}); "
            f"tried e.g. {', '.join(tried)}"
        )
    return items, skipped


def label_by_csv(root: Path, images_dir: str, csv_name: str, paths: list[str]) -> tuple[list[Item], list[tuple[str, str]]]:
    """Rows of ``name,label[,is_valid]``; names are relative to ``images_dir``."""
    csv_path = root / csv_name
    if not csv_path.is_file():
        raise LabelError(f"labels.csv: {csv_name!r} is not a file inside the dataset {root}")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if not {"name", "label"} <= set(columns):
            raise LabelError(f"labels.csv: {csv_path} needs columns name,label (optional is_valid); found {', '.join(columns) or 'none'}")
        rows = list(reader)
    present = set(paths)
    items, skipped = [], []
    for row in rows:
        path = (PurePosixPath(images_dir) / row["name"]).as_posix().removeprefix("./")
        if path not in present:
            skipped.append((path, f"listed in {csv_name} but not an image file in the dataset"))
            continue
        split = None
        if "is_valid" in columns:
            split = "valid" if row["is_valid"].strip().lower() in ("1", "true", "yes") else "train"
        items.append(Item(path, row["label"], split))
    listed = {item.path for item in items}
    skipped += [(p, f"not listed in {csv_name}") for p in paths if p not in listed]
    return items, skipped


def assign_random_split(items: list[Item], valid_pct: float, seed: int) -> list[Item]:
    """Items without a split get one: a seeded shuffle of the sorted paths, the first valid_pct are valid."""
    todo = sorted(i for i, item in enumerate(items) if item.split is None)
    if not todo:
        return items
    order = sorted(todo, key=lambda i: items[i].path)
    random.Random(seed).shuffle(order)
    valid = set(order[: round(valid_pct * len(order))])
    return [Item(it.path, it.label, ("valid" if i in valid else "train") if it.split is None else it.split) for i, it in enumerate(items)]


def make_table(
    root: Path, *, rule: str, images_dir: str, pattern: str | None, match_on: str, csv_name: str | None, valid_pct: float, seed: int
) -> LabelTable:
    """Label and split the images of the dataset at ``root``.

    Images are not decoded here: the presize stage decodes each one completely, once, and lists
    those that fail (truncated, not an image) in its own skipped list.
    """
    paths = image_files(root, images_dir)
    if rule == "folder":
        items, skipped = label_by_folder(paths)
    elif rule == "regex":
        items, skipped = label_by_regex(paths, pattern or "", match_on)
    elif rule == "csv":
        items, skipped = label_by_csv(root, images_dir, csv_name or "", paths)
    else:
        raise LabelError(f"labels.rule: {rule!r} is not allowed; allowed: folder, regex, csv")
    items = assign_random_split(items, valid_pct, seed)
    classes = sorted({item.label for item in items if item.split == "train"})
    unseen = [item for item in items if item.label not in classes]
    skipped += [(item.path, f"label {item.label!r} has no training images") for item in unseen]
    items = [item for item in items if item.label in classes]
    table = LabelTable(items, classes, sorted(skipped))
    check_table(table, rule)
    return table


def check_table(table: LabelTable, rule: str) -> None:
    counts = table.counts()
    if counts["n_classes"] < 2:
        raise LabelError(f"labels.rule: {rule!r} found {counts['n_classes']} class(es); at least 2 are needed: check the rule and labels.images_dir")
    if counts["n_valid"] == 0 or counts["n_train"] == 0:
        raise LabelError(f"labels: {counts['n_train']} training and {counts['n_valid']} validation images; both must be > 0 (raise labels.valid_pct or add images)")


def write_table(table: LabelTable, out_dir: Path) -> dict[str, Path]:
    """Write table.csv, classes.json and skipped.csv into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"table": out_dir / "table.csv", "classes": out_dir / "classes.json", "skipped": out_dir / "skipped.csv"}
    with atomic_open(paths["table"]) as f:
        writer = csv.writer(f)
        writer.writerow(TABLE_COLUMNS)
        writer.writerows((item.path, item.label, item.split) for item in table.items)
    write_json(paths["classes"], table.classes)
    with atomic_open(paths["skipped"]) as f:
        writer = csv.writer(f)
        writer.writerow(("path", "reason"))
        writer.writerows(table.skipped)
    return paths


def read_table(table_csv: Path, classes_json: Path) -> LabelTable:
    """The labels stage's table and class list; a missing or inconsistent pair is a LabelError."""
    try:
        with open(table_csv, newline="") as f:
            items = [Item(row["path"], row["label"], row["split"]) for row in csv.DictReader(f)]
        classes = json.loads(classes_json.read_text())
    except (OSError, KeyError, ValueError) as err:
        raise LabelError(f"cannot read the labels table {table_csv} / {classes_json} ({type(err).__name__}: {err}); re-run the labels stage") from None
    unknown = sorted({item.label for item in items} - set(classes))
    if unknown:
        raise LabelError(f"{table_csv} has labels missing from {classes_json}, e.g. {unknown[:3]}; re-run the labels stage")
    return LabelTable(items, classes)
