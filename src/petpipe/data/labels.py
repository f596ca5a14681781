"""Labelling rules (folder, regex, csv, function) and the validation split (random, folder, column, file).

The result is a table of (path, label, split) with paths relative to the dataset root, the class
list (sorted labels of the training split), the files that were skipped, each with a reason, and
warnings worth a user's attention (a class without validation images, names in a split file that
match no image). Images are not decoded here: the presize stage decodes each one completely, once,
and lists those that fail (truncated, not an image) in its own skipped list.
"""

from __future__ import annotations

import csv
import importlib
import random
import re
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from petpipe.data.table import SPLITS, Item, LabelError, LabelTable

# Other files (the .mat files in the Pets images/ folder, READMEs, hidden files) are ignored.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Values of a csv's is_valid column.
IS_VALID = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def make_table(
    root: Path,
    *,
    rule: str,
    images_dir: str,
    pattern: str | None,
    match_on: str,
    csv_name: str | None,
    valid_pct: float,
    seed: int,
    split: str,
    function: str | None = None,
    valid_file: str | None = None,
    train_file: str | None = None,
    code_root: Path | None = None,
) -> LabelTable:
    """Label (``rule``) and split (``split``: random, folder, column or file) the images under ``root/images_dir``.

    ``code_root`` is where ``function`` is imported from (default: the working directory).
    """
    paths = image_files(root, images_dir)
    if rule == "folder":
        items, skipped = label_by_folder(paths, images_dir, split_folders=split == "folder")
    elif rule == "regex":
        items, skipped = label_by_regex(paths, pattern or "", match_on)
    elif rule == "csv":
        items, skipped = label_by_csv(root, images_dir, csv_name or "", paths, with_split=split == "column")
    elif rule == "function":
        items, skipped = label_by_function(
            paths, load_function(function or "", code_root or Path.cwd()), function or "", match_on
        )
    else:
        raise LabelError(f"labels.rule: {rule!r} is not allowed; allowed: folder, regex, csv, function")
    warnings: list[str] = []
    if split == "random":
        items = assign_random_split(items, valid_pct, seed)  # no rule sets a split unless asked to (split column)
    elif split == "folder":
        items, unsplit = split_by_folder(items, images_dir, label_folder=rule == "folder")
        skipped += unsplit
    elif split == "file":
        items, unsplit, warnings = split_by_files(root, items, images_dir, valid_file, train_file)
        skipped += unsplit
    elif split != "column":
        raise LabelError(f"labels.split: {split!r} is not allowed; allowed: random, folder, column, file")
    items, left_out, class_warnings = keep_trained_classes(items)
    table = LabelTable(
        items, sorted({item.label for item in items}), sorted(skipped + left_out), warnings + class_warnings
    )
    check_table(table, rule, split)
    return table


def image_files(root: Path, images_dir: str) -> list[str]:
    """Sorted image paths (relative to ``root``) under ``root/images_dir``: identical on every machine."""
    base = root / images_dir
    if not base.is_dir():
        raise LabelError(f"labels.images_dir: {images_dir!r} is not a folder inside the dataset {root}")
    files = sorted(
        p.relative_to(root).as_posix()
        for p in base.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(base).parts)
        and p.is_file()
    )
    if not files:
        raise LabelError(f"labels.images_dir: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {base}")
    return files


def within_images_dir(path: str, images_dir: str) -> PurePosixPath:
    """``images/train/a.jpg`` -> ``train/a.jpg`` for images_dir ``images``."""
    return (
        PurePosixPath(path).relative_to(PurePosixPath(images_dir))
        if PurePosixPath(images_dir).parts
        else PurePosixPath(path)
    )


# --- labelling rules -------------------------------------------------------------------------


def label_by_folder(
    paths: list[str], images_dir: str, split_folders: bool = False
) -> tuple[list[Item], list[tuple[str, str]]]:
    """The image's folder (below ``images_dir``) is its label; with ``split_folders`` a ``train/`` or ``valid/`` folder
    is not a label."""
    items, skipped = [], []
    for path in paths:
        parts = within_images_dir(path, images_dir).parts
        if len(parts) < 2 or (split_folders and parts[-2] in SPLITS):
            skipped.append((path, "not inside a class folder under labels.images_dir"))
        else:
            items.append(Item(path, parts[-2], None))
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
            f"labels.pattern: '{pattern}' matches none of the {len(paths)} files (matched against the file "
            f"{match_on}); "
            f"tried e.g. {', '.join(tried)}"
        )
    return items, skipped


def label_by_csv(
    root: Path, images_dir: str, csv_name: str, paths: list[str], with_split: bool = False
) -> tuple[list[Item], list[tuple[str, str]]]:
    """Rows of ``name,label`` (and ``is_valid`` with ``with_split``); names are relative to ``images_dir``.

    Every row is checked: a missing or empty value, an unknown ``is_valid`` value or a name listed
    twice is an error naming the file, the line and the column.
    """
    csv_path = root / csv_name
    if not csv_path.is_file():
        raise LabelError(f"labels.csv: {csv_name!r} is not a file inside the dataset {root}")
    required = ("name", "label", "is_valid") if with_split else ("name", "label")
    present = set(paths)
    items, skipped, first_line = [], [], {}
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in required if c not in columns]
        if missing:
            raise LabelError(
                f"labels.csv: {csv_name} needs columns {','.join(required)}; missing {', '.join(missing)} (found "
                f"{', '.join(columns) or 'none'})"
            )
        for row in reader:
            where = f"labels.csv: {csv_name} line {reader.line_num}"
            values = {}
            for column in required:
                if row[column] is None:  # DictReader fills a short row with None
                    raise LabelError(
                        f"{where}: no value in column {column!r} (the row has fewer fields than the header)"
                    )
                if not row[column].strip():
                    raise LabelError(f"{where}: column {column!r} is empty")
                values[column] = row[column].strip()
            if any(v.strip() for v in row.get(None) or []):
                raise LabelError(f"{where}: more fields than the {len(columns)} columns of the header")
            path = (PurePosixPath(images_dir) / values["name"]).as_posix()
            if path in first_line:
                raise LabelError(
                    f"{where}: {values['name']!r} is listed again (first on line {first_line[path]}); list each image "
                    "once"
                )
            first_line[path] = reader.line_num
            split = None
            if with_split:
                flag = IS_VALID.get(values["is_valid"].lower())
                if flag is None:
                    raise LabelError(
                        f"{where}: column 'is_valid' is {values['is_valid']!r}; allowed: {', '.join(IS_VALID)}"
                    )
                split = "valid" if flag else "train"
            if path in present:
                items.append(Item(path, values["label"], split))
            else:
                skipped.append((path, f"listed in {csv_name} but not an image file under labels.images_dir"))
    skipped += [(p, f"not listed in {csv_name}") for p in paths if p not in first_line]
    return items, skipped


def load_function(spec: str, code_root: Path) -> Callable[[str], object]:
    """``module:callable`` -> the callable, importing ``module`` with ``code_root`` (the repository) first on
    sys.path."""
    module_name, _, attribute = spec.partition(":")
    sys.path.insert(0, str(code_root))
    try:
        target = importlib.import_module(module_name)
    except Exception as err:  # the user's module may fail in any way while it is imported
        raise LabelError(
            f"labels.function: cannot import {module_name!r} from {code_root} ({type(err).__name__}: {err})"
        ) from None
    finally:
        sys.path.remove(str(code_root))
    for name in attribute.split("."):
        if not hasattr(target, name):
            raise LabelError(
                f"labels.function: {module_name!r} ({getattr(target, '__file__', '?')}) has no {attribute!r}"
            )
        target = getattr(target, name)
    if not callable(target):
        raise LabelError(f"labels.function: {spec!r} is a {type(target).__name__}, not a function")
    return target


def label_by_function(
    paths: list[str], function: Callable[[str], object], spec: str, match_on: str
) -> tuple[list[Item], list[tuple[str, str]]]:
    """fastai's ``from_name_func``: ``function(file name)`` (or the path) is the label; None or '' skips the file."""
    items, skipped = [], []
    for path in paths:
        argument = PurePosixPath(path).name if match_on == "name" else path
        try:
            label = function(argument)
        except Exception as err:  # user code: name the file it failed on
            raise LabelError(f"labels.function: {spec} failed on {argument!r}: {type(err).__name__}: {err}") from None
        if label is None or not str(label).strip():
            skipped.append((path, f"labels.function {spec} gave no label"))
        else:
            items.append(Item(path, str(label).strip(), None))
    if not items:
        raise LabelError(
            f"labels.function: {spec} gave no label for any of the {len(paths)} files, e.g. {', '.join(paths[:3])}"
        )
    return items, skipped


# --- validation split ------------------------------------------------------------------------


def assign_random_split(items: list[Item], valid_pct: float, seed: int) -> list[Item]:
    """Every item gets a split: a seeded shuffle of the sorted paths, the first valid_pct are valid."""
    order = sorted(range(len(items)), key=lambda i: items[i].path)
    random.Random(seed).shuffle(order)
    valid = set(order[: round(valid_pct * len(order))])
    return [Item(it.path, it.label, "valid" if i in valid else "train") for i, it in enumerate(items)]


def split_by_folder(items: list[Item], images_dir: str, label_folder: bool) -> tuple[list[Item], list[tuple[str, str]]]:
    """The nearest ``train/`` or ``valid/`` folder above the image (above its class folder for the folder rule)."""
    out, skipped = [], []
    for item in items:
        folders = within_images_dir(item.path, images_dir).parts[: -2 if label_folder else -1]
        split = next((f for f in reversed(folders) if f in SPLITS), None)
        if split is None:
            skipped.append((item.path, "not under a train/ or valid/ folder (labels.split: folder)"))
        else:
            out.append(Item(item.path, item.label, split))
    if not out:
        raise LabelError(
            "labels.split: 'folder' found no image under a train/ or valid/ folder in labels.images_dir "
            f"{images_dir!r}; use split 'random' or 'file'"
        )
    return out, skipped


def read_name_list(root: Path, file_name: str, key: str) -> list[tuple[int, str]]:
    """(line number, first field) of each line; blank lines and ``#`` comments are skipped (the Pets lists:
    ``Abyssinian_201 1 1 1``)."""
    path = root / file_name
    if not path.is_file():
        raise LabelError(f"labels.{key}: {file_name!r} is not a file inside the dataset {root}")
    names = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        fields = line.split()
        if fields and not fields[0].startswith("#"):
            names.append((number, fields[0]))
    return names


def split_by_files(
    root: Path, items: list[Item], images_dir: str, valid_file: str | None, train_file: str | None
) -> tuple[list[Item], list[tuple[str, str]], list[str]]:
    """Names listed in ``valid_file`` are validation, in ``train_file`` training; with one file, the rest are the other
    split.

    A name is the image's path below ``images_dir``, with or without its extension.
    """
    if not (valid_file or train_file):
        raise LabelError("labels.split: 'file' needs labels.valid_file or labels.train_file")
    index: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        relative = within_images_dir(item.path, images_dir)
        index[relative.as_posix()].append(i)
        if relative.suffix:
            index[relative.with_suffix("").as_posix()].append(i)
    assigned: dict[int, tuple[str, str, int]] = {}  # item -> (split, file, line)
    warnings = []
    for split, key, file_name in (("valid", "valid_file", valid_file), ("train", "train_file", train_file)):
        if not file_name:
            continue
        names = read_name_list(root, file_name, key)
        unmatched = []
        for line, name in names:
            hits = index.get(PurePosixPath(name).as_posix(), [])
            if len(hits) > 1:
                raise LabelError(
                    f"labels.{key}: {file_name} line {line}: {name!r} matches {len(hits)} images "
                    f"({', '.join(items[i].path for i in hits)}); add the extension"
                )
            if not hits:
                unmatched.append(name)
                continue
            earlier = assigned.get(hits[0])
            if earlier and earlier[0] != split:
                raise LabelError(
                    f"labels.{key}: {file_name} line {line}: {name!r} is also listed in {earlier[1]} line "
                    f"{earlier[2]}; an image is training or validation, not both"
                )
            assigned[hits[0]] = (split, file_name, line)
        if names and len(unmatched) == len(names):
            raise LabelError(
                f"labels.{key}: none of the {len(names)} names in {file_name} is a labelled image under "
                f"labels.images_dir {images_dir!r} "
                f"(tried e.g. {', '.join(unmatched[:3])})"
            )
        if unmatched:
            warnings.append(
                f"labels.{key}: {len(unmatched)} of the {len(names)} names in {file_name} are not labelled images, "
                f"e.g. {', '.join(unmatched[:3])}"
            )
    rest = None if (valid_file and train_file) else ("train" if valid_file else "valid")
    out, skipped = [], []
    for i, item in enumerate(items):
        split = assigned[i][0] if i in assigned else rest
        if split is None:
            skipped.append((item.path, f"listed in neither {valid_file} nor {train_file}"))
        else:
            out.append(Item(item.path, item.label, split))
    return out, skipped, warnings


def keep_trained_classes(items: list[Item]) -> tuple[list[Item], list[tuple[str, str]], list[str]]:
    """Leave out labels without training images (the model could never predict them); warn about classes without
    validation images."""
    trained = {item.label for item in items if item.split == "train"}
    untrained = sorted({item.label for item in items} - trained)
    kept = [item for item in items if item.label in trained]
    left_out = [
        (item.path, f"label {item.label!r} has no training images") for item in items if item.label not in trained
    ]
    warnings = []
    if untrained:
        warnings.append(
            f"labels: {len(untrained)} class(es) have no training image and were left out: {', '.join(untrained[:10])}"
        )
    validated = {item.label for item in kept if item.split == "valid"}
    unvalidated = sorted(trained - validated)
    if validated and unvalidated:
        warnings.append(
            f"labels: {len(unvalidated)} of {len(trained)} classes have no validation image, so nothing measures "
            f"them: {', '.join(unvalidated[:10])}"
        )
    return kept, left_out, warnings


def check_table(table: LabelTable, rule: str, split: str = "random") -> None:
    counts = table.counts()
    if counts["n_classes"] < 2:
        raise LabelError(
            f"labels.rule: {rule!r} found {counts['n_classes']} class(es); at least 2 are needed: check the rule and "
            "labels.images_dir"
        )
    if counts["n_valid"] == 0 or counts["n_train"] == 0:
        hint = {
            "random": "raise labels.valid_pct or add images",
            "folder": "add images under both train/ and valid/ folders",
        }.get(split, "check the split's source")
        raise LabelError(
            f"labels.split: {split!r} gave {counts['n_train']} training and {counts['n_valid']} validation images; "
            f"both must be > 0 ({hint})"
        )
