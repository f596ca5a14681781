import csv
import random
import re

import pytest
from conftest import write_folder_dataset, write_named_dataset

from petpipe.labels import LabelError, assign_random_split, Item, make_table, read_table, write_table

DEFAULTS = dict(images_dir=".", pattern=None, match_on="name", csv_name=None, valid_pct=0.25, seed=0)


def table_for(root, **overrides):
    return make_table(root, **{**DEFAULTS, **overrides})


def test_folder_rule_uses_parent_as_label_and_train_valid_folders_as_split(folder_dataset):
    table = table_for(folder_dataset, rule="folder")
    assert table.classes == ["blue", "green", "red"]
    assert table.counts() == {"n_train": 24, "n_valid": 9, "n_classes": 3, "n_skipped": 0}
    item = next(i for i in table.items if i.path == "valid/red/1.png")
    assert (item.label, item.split) == ("red", "valid")


def test_folder_rule_without_split_folders_draws_a_seeded_split(tmp_path):
    root = write_folder_dataset(tmp_path / "ds")
    for split in ("train", "valid"):
        (root / split).rename(root / f"part_{split}")
    table = table_for(root, rule="folder", valid_pct=0.3)
    assert table.counts()["n_valid"] == round(0.3 * 33)
    assert table_for(root, rule="folder", valid_pct=0.3).items == table.items
    assert table_for(root, rule="folder", valid_pct=0.3, seed=1).items != table.items


def test_random_split_ignores_input_order():
    items = [Item(f"img_{i}.png", "a", None) for i in range(50)]
    shuffled = items[:]
    random.Random(3).shuffle(shuffled)
    first = {i.path: i.split for i in assign_random_split(items, 0.2, seed=7)}
    second = {i.path: i.split for i in assign_random_split(shuffled, 0.2, seed=7)}
    assert first == second and sum(s == "valid" for s in first.values()) == 10


def test_regex_rule_on_file_names_like_pets(tmp_path):
    root = write_named_dataset(tmp_path / "pets")
    (root / "images" / "README.txt").write_text("not an image")
    table = table_for(root, rule="regex", images_dir="images", pattern=r"^(.+)_\d+\.jpg$")
    assert table.classes == ["Blue", "Green_cat", "Red"]
    assert table.counts()["n_train"] + table.counts()["n_valid"] == 18


def test_regex_matching_nothing_names_the_pattern_and_shows_paths(tmp_path):
    root = write_named_dataset(tmp_path / "pets")
    pattern = r"^(.+)-\d+\.png$"
    with pytest.raises(LabelError, match=re.escape(f"labels.pattern: '{pattern}' matches none of the 18 files") + ".*tried e.g. Blue_1.jpg"):
        table_for(root, rule="regex", images_dir="images", pattern=pattern)


def test_regex_on_path(folder_dataset):
    table = table_for(folder_dataset, rule="regex", pattern=r"^(?:train|valid)/(\w+)/", match_on="path")
    assert table.classes == ["blue", "green", "red"]


def test_csv_rule_with_is_valid_column_and_missing_rows(folder_dataset):
    with open(folder_dataset / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "label", "is_valid"])
        for split in ("train", "valid"):
            for p in sorted((folder_dataset / split).rglob("*.png")):
                writer.writerow([p.relative_to(folder_dataset).as_posix(), p.parent.name.upper(), int(split == "valid")])
        writer.writerow(["train/red/999.png", "RED", 0])
    table = table_for(folder_dataset, rule="csv", csv_name="labels.csv")
    assert table.classes == ["BLUE", "GREEN", "RED"]
    assert table.counts() == {"n_train": 24, "n_valid": 9, "n_classes": 3, "n_skipped": 1}
    assert table.skipped[0][0] == "train/red/999.png"


def test_csv_without_required_columns(folder_dataset):
    (folder_dataset / "labels.csv").write_text("file,class\n")
    with pytest.raises(LabelError, match="needs columns name,label .* found file, class"):
        table_for(folder_dataset, rule="csv", csv_name="labels.csv")


def test_images_are_labelled_without_decoding_them(folder_dataset):
    """Decoding (and skipping what fails) is the presize stage's job, done once there."""
    (folder_dataset / "train" / "red" / "broken.png").write_bytes(b"\x89PNG not really")
    table = table_for(folder_dataset, rule="folder")
    assert "train/red/broken.png" in [item.path for item in table.items] and table.skipped == []


def test_single_class_is_an_error(tmp_path):
    root = write_folder_dataset(tmp_path / "ds")
    for split in ("train", "valid"):
        for name in ("green", "blue"):
            for p in (root / split / name).iterdir():
                p.unlink()
    with pytest.raises(LabelError, match="found 1 class"):
        table_for(root, rule="folder")


def test_missing_images_dir(folder_dataset):
    with pytest.raises(LabelError, match="labels.images_dir: 'images' is not a folder"):
        table_for(folder_dataset, rule="folder", images_dir="images")


def test_table_round_trip(folder_dataset, tmp_path):
    table = table_for(folder_dataset, rule="folder")
    paths = write_table(table, tmp_path / "labels")
    back = read_table(paths["table"], paths["classes"])
    assert back.items == table.items and back.classes == table.classes
