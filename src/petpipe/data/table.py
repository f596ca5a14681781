"""The labels stage's table: items (path, label, split), the class list, what was skipped; its files."""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from petpipe.run.errors import PetpipeError
from petpipe.run.files import atomic_open, write_json, write_rows

SPLITS = ("train", "valid")
TABLE_COLUMNS = ("path", "label", "split")


class LabelError(PetpipeError, ValueError):
    """The dataset cannot be labelled as configured; the message says what to change."""


@dataclass(frozen=True)
class Item:
    path: str  # POSIX path relative to the dataset root
    label: str
    split: str | None  # "train", "valid", or None until a split assigns one


@dataclass
class LabelTable:
    items: list[Item]
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    warnings: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        splits = Counter(item.split for item in self.items)
        return {
            "n_train": splits["train"],
            "n_valid": splits["valid"],
            "n_classes": len(self.classes),
            "n_skipped": len(self.skipped),
        }

    def indexed(self) -> list[tuple[str, int, str]]:
        """(path, class index, split) per item: what the presize store is written from."""
        index = {name: i for i, name in enumerate(self.classes)}
        return [(item.path, index[item.label], item.split) for item in self.items]


def write_table(table: LabelTable, out_dir: Path) -> dict[str, Path]:
    """Write table.csv, classes.json and skipped.csv into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"table": out_dir / "table.csv", "classes": out_dir / "classes.json", "skipped": out_dir / "skipped.csv"}
    with atomic_open(paths["table"]) as f:
        writer = csv.writer(f)
        writer.writerow(TABLE_COLUMNS)
        writer.writerows((item.path, item.label, item.split) for item in table.items)
    write_json(paths["classes"], table.classes)
    write_rows(paths["skipped"], [{"path": p, "reason": r} for p, r in table.skipped], columns=["path", "reason"])
    return paths


def read_table(table_csv: Path, classes_json: Path) -> LabelTable:
    """The labels stage's table and class list; a missing or inconsistent pair is a LabelError."""
    try:
        with open(table_csv, newline="") as f:
            items = [Item(row["path"], row["label"], row["split"]) for row in csv.DictReader(f)]
        classes = json.loads(classes_json.read_text())
    except (OSError, KeyError, ValueError) as err:
        raise LabelError(
            f"cannot read the labels table {table_csv} / {classes_json} ({type(err).__name__}: {err}); re-run the "
            "labels stage"
        ) from None
    unknown = sorted({item.label for item in items} - set(classes))
    if unknown:
        raise LabelError(
            f"{table_csv} has labels missing from {classes_json}, e.g. {unknown[:3]}; re-run the labels stage"
        )
    return LabelTable(items, classes)
