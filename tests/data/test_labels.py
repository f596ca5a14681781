import copy
import csv
import random
import re

import pytest
import yaml
from conftest import ROOT, write_folder_dataset, write_named_dataset

from petpipe.data.labels import assign_random_split, make_table
from petpipe.data.table import Item, LabelError, read_table, write_table
from petpipe.run.config import ConfigError, parse_config

DEFAULTS = dict(images_dir=".", pattern=None, match_on="name", csv_name=None, valid_pct=0.25, seed=0)
PETS_PATTERN = r"^(.+)_\d+\.jpg$"


def table_for(root, **overrides):
    return make_table(root, **{**DEFAULTS, **overrides})


def touch(root, *paths):
    for path in paths:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(b"")  # labelling never opens an image
    return root


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


# --- folder rule -------------------------------------------------------------------------------


def test_folder_rule_uses_parent_as_label_and_train_valid_folders_as_split(folder_dataset):
    table = table_for(folder_dataset, rule="folder", split="folder")
    assert table.classes == ["blue", "green", "red"]
    assert table.counts() == {"n_train": 24, "n_valid": 9, "n_classes": 3, "n_skipped": 0}
    item = next(i for i in table.items if i.path == "valid/red/1.png")
    assert (item.label, item.split) == ("red", "valid")


def test_folder_rule_counts_folders_from_images_dir(tmp_path):
    """A loose file in images/ is skipped, not labelled 'images'."""
    root = touch(
        tmp_path / "ds",
        "images/cat/1.jpg",
        "images/cat/2.jpg",
        "images/dog/1.jpg",
        "images/dog/2.jpg",
        "images/stray.png",
        "other/x/1.jpg",
    )
    table = table_for(root, rule="folder", images_dir="images", split="random", valid_pct=0.5)
    assert table.classes == ["cat", "dog"] and table.skipped == [
        ("images/stray.png", "not inside a class folder under labels.images_dir")
    ]
    assert all(item.path.startswith("images/") for item in table.items)


def test_folder_split_inside_images_dir(tmp_path):
    root = touch(
        tmp_path / "ds",
        "imgs/train/cat/1.jpg",
        "imgs/train/dog/1.jpg",
        "imgs/valid/cat/2.jpg",
        "imgs/valid/dog/2.jpg",
        "imgs/train/loose.jpg",
        "imgs/cat/3.jpg",
    )
    table = table_for(root, rule="folder", images_dir="imgs", split="folder")
    assert {(i.path, i.label, i.split) for i in table.items} == {
        ("imgs/train/cat/1.jpg", "cat", "train"),
        ("imgs/train/dog/1.jpg", "dog", "train"),
        ("imgs/valid/cat/2.jpg", "cat", "valid"),
        ("imgs/valid/dog/2.jpg", "dog", "valid"),
    }
    assert dict(table.skipped) == {
        "imgs/train/loose.jpg": "not inside a class folder under labels.images_dir",
        "imgs/cat/3.jpg": "not under a train/ or valid/ folder (labels.split: folder)",
    }


def test_random_split_ignores_split_folders(folder_dataset):
    table = table_for(folder_dataset, rule="folder", split="random", valid_pct=0.3)
    assert table.counts()["n_valid"] == round(0.3 * 33)
    assert table_for(folder_dataset, rule="folder", split="random", valid_pct=0.3).items == table.items
    assert table_for(folder_dataset, rule="folder", split="random", valid_pct=0.3, seed=1).items != table.items


def test_folder_split_without_split_folders_is_an_error(tmp_path):
    root = touch(tmp_path / "ds", "cat/1.jpg", "dog/1.jpg")
    with pytest.raises(LabelError, match=r"labels.split: 'folder' found no image under a train/ or valid/ folder"):
        table_for(root, rule="folder", split="folder")


def test_random_split_ignores_input_order():
    items = [Item(f"img_{i}.png", "a", None) for i in range(50)]
    shuffled = items[:]
    random.Random(3).shuffle(shuffled)
    first = {i.path: i.split for i in assign_random_split(items, 0.2, seed=7)}
    second = {i.path: i.split for i in assign_random_split(shuffled, 0.2, seed=7)}
    assert first == second and sum(s == "valid" for s in first.values()) == 10


# --- regex rule --------------------------------------------------------------------------------


def test_regex_rule_on_file_names_like_pets_ignores_other_files(tmp_path):
    root = write_named_dataset(tmp_path / "pets")
    (root / "images" / "README.txt").write_text("not an image")
    (root / "images" / "Red_9.mat").write_bytes(b"MATLAB 5.0")
    (root / "images" / "._Red_1.jpg").write_bytes(b"macOS resource fork")
    table = table_for(root, rule="regex", images_dir="images", pattern=PETS_PATTERN, split="random")
    assert table.classes == ["Blue", "Green_cat", "Red"] and table.skipped == []
    assert table.counts()["n_train"] + table.counts()["n_valid"] == 18


def test_regex_matching_nothing_names_the_pattern_and_shows_paths(tmp_path):
    root = write_named_dataset(tmp_path / "pets")
    pattern = r"^(.+)-\d+\.png$"
    with pytest.raises(
        LabelError,
        match=re.escape(f"labels.pattern: '{pattern}' matches none of the 18 files") + ".*tried e.g. Blue_1.jpg",
    ):
        table_for(root, rule="regex", images_dir="images", pattern=pattern, split="random")


def test_regex_on_path_with_folder_split(folder_dataset):
    table = table_for(folder_dataset, rule="regex", pattern=r"^(?:train|valid)/(\w+)/", match_on="path", split="folder")
    assert table.classes == ["blue", "green", "red"] and table.counts()["n_valid"] == 9


# --- csv rule ----------------------------------------------------------------------------------


def labels_csv(root, extra_rows=(), header=("name", "label", "is_valid")):
    rows = [header]
    for split in ("train", "valid"):
        for p in sorted((root / split).rglob("*.png")):
            rows.append((p.relative_to(root).as_posix(), p.parent.name.upper(), int(split == "valid"))[: len(header)])
    write_csv(root / "labels.csv", rows + list(extra_rows))


def test_csv_rule_with_is_valid_column_and_missing_rows(folder_dataset):
    labels_csv(folder_dataset, [("train/red/999.png", "RED", 0)])
    table = table_for(folder_dataset, rule="csv", csv_name="labels.csv", split="column")
    assert table.classes == ["BLUE", "GREEN", "RED"]
    assert table.counts() == {"n_train": 24, "n_valid": 9, "n_classes": 3, "n_skipped": 1}
    assert table.skipped[0][0] == "train/red/999.png"
    assert (
        table_for(folder_dataset, rule="csv", csv_name="labels.csv", split="random", valid_pct=0.5).counts()["n_valid"]
        == 16
    )


@pytest.mark.parametrize(
    "row, message",
    [
        (
            ("train/red/0.png",),
            r"labels.csv: labels.csv line 35: no value in column 'label' \(the row has fewer fields than the header\)",
        ),
        (("train/red/0.png", " ", 0), r"labels.csv: labels.csv line 35: column 'label' is empty"),
        (
            ("train/red/0.png", "RED", 0, "extra"),
            r"labels.csv: labels.csv line 35: more fields than the 3 columns of the header",
        ),
        (
            ("train/blue/0.png", "BLUE", 1),
            r"labels.csv: labels.csv line 35: 'train/blue/0.png' is listed again \(first on line 2\); list each image "
            r"once",
        ),
        (
            ("train/red/77.png", "RED", "maybe"),
            r"labels.csv: labels.csv line 35: column 'is_valid' is 'maybe'; allowed: 1, true, yes, 0, false, no",
        ),
    ],
)
def test_csv_rows_are_checked_with_file_line_and_column(folder_dataset, row, message):
    labels_csv(folder_dataset, [row])
    with pytest.raises(LabelError, match=message):
        table_for(folder_dataset, rule="csv", csv_name="labels.csv", split="column")


def test_csv_without_required_columns(folder_dataset):
    (folder_dataset / "labels.csv").write_text("file,class\n")
    with pytest.raises(
        LabelError, match=r"labels.csv: labels.csv needs columns name,label; missing name, label \(found file, class\)"
    ):
        table_for(folder_dataset, rule="csv", csv_name="labels.csv", split="random")
    labels_csv(folder_dataset, header=("name", "label"))
    with pytest.raises(LabelError, match=r"needs columns name,label,is_valid; missing is_valid"):
        table_for(folder_dataset, rule="csv", csv_name="labels.csv", split="column")


# --- function rule -----------------------------------------------------------------------------


@pytest.fixture
def code_root(tmp_path):
    """A repository folder with a labelling module (a unique name per test: imported modules are cached)."""
    folder = tmp_path / "repo"
    folder.mkdir()
    return folder


def write_module(code_root, name, source):
    (code_root / f"{name}.py").write_text(source)
    return name


def test_function_rule_is_fastais_from_name_func(tmp_path, code_root):
    """fastai lesson 1: `def is_cat(x): return x[0].isupper()` on the file name."""
    root = write_named_dataset(tmp_path / "pets")
    module = write_module(
        code_root, "labelling_is_cat", "def is_cat(x):\n    return x[0].isupper() and x.startswith(('Green', 'Blue'))\n"
    )
    table = table_for(
        root, rule="function", function=f"{module}:is_cat", images_dir="images", split="random", code_root=code_root
    )
    assert table.classes == ["False", "True"] and table.counts()["n_train"] + table.counts()["n_valid"] == 18


def test_function_rule_on_paths_and_skipping(tmp_path, code_root):
    root = touch(tmp_path / "ds", "a/cat/1.jpg", "a/cat/2.jpg", "a/dog/1.jpg", "a/dog/2.jpg", "a/skip/1.jpg")
    module = write_module(
        code_root,
        "labelling_paths",
        "class Rules:\n    @staticmethod\n    def folder(p):\n        return None if 'skip' in p else "
        "p.split('/')[1]\n",
    )
    table = table_for(
        root,
        rule="function",
        function=f"{module}:Rules.folder",
        match_on="path",
        split="random",
        valid_pct=0.5,
        code_root=code_root,
    )
    assert table.classes == ["cat", "dog"] and table.skipped == [
        ("a/skip/1.jpg", f"labels.function {module}:Rules.folder gave no label")
    ]


def test_function_errors_name_the_function_and_the_file(tmp_path, code_root):
    root = write_named_dataset(tmp_path / "pets")
    module = write_module(
        code_root, "labelling_broken", "def label(x):\n    return {'Blue_1.jpg': 'b'}[x]\n\nNOT_CALLABLE = 3\n"
    )
    kwargs = dict(rule="function", images_dir="images", split="random", code_root=code_root)
    with pytest.raises(
        LabelError, match=rf"labels.function: {module}:label failed on 'Blue_2.jpg': KeyError: 'Blue_2.jpg'"
    ):
        table_for(root, function=f"{module}:label", **kwargs)
    with pytest.raises(LabelError, match=rf"labels.function: '{module}' \(.*\) has no 'nope'"):
        table_for(root, function=f"{module}:nope", **kwargs)
    with pytest.raises(LabelError, match=rf"labels.function: '{module}:NOT_CALLABLE' is a int, not a function"):
        table_for(root, function=f"{module}:NOT_CALLABLE", **kwargs)
    with pytest.raises(
        LabelError, match=r"labels.function: cannot import 'no_such_module_here' from .*repo \(ModuleNotFoundError"
    ):
        table_for(root, function="no_such_module_here:f", **kwargs)


# --- split from files --------------------------------------------------------------------------


def write_pets_names(tmp_path):
    """images/<Breed>_<n>.jpg, 2 breeds x 4, with the official-split files of the Pets archive."""
    names = [f"{breed}_{n}" for breed in ("Bengal", "beagle") for n in range(1, 5)]
    root = touch(tmp_path / "pets", *[f"images/{name}.jpg" for name in names], "images/beagle_9.mat")
    (root / "annotations").mkdir()
    # Image CLASS-ID SPECIES BREED-ID, as in annotations/trainval.txt and test.txt
    (root / "annotations" / "trainval.txt").write_text("".join(f"{n} 1 1 1\n" for n in names if n[-1] in "123"))
    (root / "annotations" / "test.txt").write_text(
        "# a comment\n\n" + "".join(f"{n} 2 2 2\n" for n in names if n[-1] == "4")
    )
    return root


def test_official_pets_split_files(tmp_path):
    root = write_pets_names(tmp_path)
    table = table_for(
        root,
        rule="regex",
        images_dir="images",
        pattern=PETS_PATTERN,
        split="file",
        valid_file="annotations/test.txt",
        train_file="annotations/trainval.txt",
    )
    assert {i.path for i in table.items if i.split == "valid"} == {"images/Bengal_4.jpg", "images/beagle_4.jpg"}
    assert table.counts() == {"n_train": 6, "n_valid": 2, "n_classes": 2, "n_skipped": 0} and table.warnings == []


def test_one_split_file_puts_the_rest_in_the_other_split(tmp_path):
    root = write_pets_names(tmp_path)
    only_train = table_for(
        root,
        rule="regex",
        images_dir="images",
        pattern=PETS_PATTERN,
        split="file",
        train_file="annotations/trainval.txt",
    )
    only_valid = table_for(
        root, rule="regex", images_dir="images", pattern=PETS_PATTERN, split="file", valid_file="annotations/test.txt"
    )
    assert only_train.items == only_valid.items and only_train.counts()["n_valid"] == 2


def test_split_files_name_problems_with_file_and_line(tmp_path):
    root = write_pets_names(tmp_path)
    kwargs = dict(rule="regex", images_dir="images", pattern=r"^(.+)_\d+\.(?:jpg|png)$", split="file")
    (root / "annotations" / "test.txt").write_text("Bengal_4\nBengal_1\n")
    with pytest.raises(
        LabelError,
        match=r"labels.train_file: annotations/trainval.txt line 1: 'Bengal_1' is also listed in "
        r"annotations/test.txt line 2",
    ):
        table_for(root, valid_file="annotations/test.txt", train_file="annotations/trainval.txt", **kwargs)
    (root / "images" / "Bengal_4.png").write_bytes(b"")
    (root / "annotations" / "test.txt").write_text("Bengal_4\n")
    with pytest.raises(
        LabelError,
        match=r"labels.valid_file: annotations/test.txt line 1: 'Bengal_4' matches 2 images .*; add the extension",
    ):
        table_for(root, valid_file="annotations/test.txt", **kwargs)
    (root / "annotations" / "test.txt").write_text("Bengal_4.jpg\nSphynx_1\n")
    table = table_for(root, valid_file="annotations/test.txt", train_file="annotations/trainval.txt", **kwargs)
    assert table.warnings == [
        "labels.valid_file: 1 of the 2 names in annotations/test.txt are not labelled images, e.g. Sphynx_1",
        "labels: 1 of 2 classes have no validation image, so nothing measures them: beagle",
    ]
    assert (
        dict(table.skipped)["images/beagle_4.jpg"]
        == "listed in neither annotations/test.txt nor annotations/trainval.txt"
    )
    (root / "annotations" / "test.txt").write_text("Sphynx_1\n")
    with pytest.raises(
        LabelError,
        match=r"labels.valid_file: none of the 1 names in annotations/test.txt is a labelled image .*Sphynx_1",
    ):
        table_for(root, valid_file="annotations/test.txt", **kwargs)
    with pytest.raises(LabelError, match=r"labels.valid_file: 'annotations/none.txt' is not a file inside the dataset"):
        table_for(root, valid_file="annotations/none.txt", **kwargs)


# --- classes and checks ------------------------------------------------------------------------


def test_classes_without_training_or_validation_images_are_reported(tmp_path):
    root = touch(
        tmp_path / "ds",
        *[f"train/{c}/{i}.png" for c in ("a", "b", "c") for i in range(2)],
        "valid/a/9.png",
        "valid/b/9.png",
        "valid/z/9.png",
    )
    table = table_for(root, rule="folder", split="folder")
    assert table.classes == ["a", "b", "c"] and table.skipped == [("valid/z/9.png", "label 'z' has no training images")]
    assert table.warnings == [
        "labels: 1 class(es) have no training image and were left out: z",
        "labels: 1 of 3 classes have no validation image, so nothing measures them: c",
    ]


def test_images_are_labelled_without_decoding_them(folder_dataset):
    """Decoding (and skipping what fails) is the presize stage's job, done once there."""
    (folder_dataset / "train" / "red" / "broken.png").write_bytes(b"\x89PNG not really")
    table = table_for(folder_dataset, rule="folder", split="folder")
    assert "train/red/broken.png" in [item.path for item in table.items] and table.skipped == []


def test_single_class_is_an_error(tmp_path):
    root = write_folder_dataset(tmp_path / "ds")
    for split in ("train", "valid"):
        for name in ("green", "blue"):
            for p in (root / split / name).iterdir():
                p.unlink()
    with pytest.raises(LabelError, match="found 1 class"):
        table_for(root, rule="folder", split="folder")


def test_empty_validation_split_is_an_error(tmp_path):
    root = touch(tmp_path / "ds", "train/a/1.png", "train/b/1.png")
    with pytest.raises(
        LabelError, match=r"labels.split: 'folder' gave 2 training and 0 validation images; both must be > 0"
    ):
        table_for(root, rule="folder", split="folder")


def test_missing_images_dir(folder_dataset):
    with pytest.raises(LabelError, match="labels.images_dir: 'images' is not a folder"):
        table_for(folder_dataset, rule="folder", images_dir="images", split="folder")


def test_table_round_trip(folder_dataset, tmp_path):
    table = table_for(folder_dataset, rule="folder", split="folder")
    paths = write_table(table, tmp_path / "labels")
    back = read_table(paths["table"], paths["classes"])
    assert back.items == table.items and back.classes == table.classes


# --- params ------------------------------------------------------------------------------------


def labels_params(**labels):
    raw = yaml.safe_load((ROOT / "profiles/digits.yaml").read_text())
    raw["labels"].update(labels)
    return copy.deepcopy(raw)


@pytest.mark.parametrize(
    "labels, message",
    [
        ({"rule": "function"}, r"^labels.function: required when labels.rule is 'function'"),
        (
            {"rule": "function", "function": "labelling.is_cat"},
            r"^labels.function: 'labelling.is_cat' is not allowed: give 'module:callable'",
        ),
        (
            {"split": "column"},
            r"^labels.split: 'column' takes the split from the is_valid column of labels.csv, so it needs labels.rule "
            r"'csv'",
        ),
        ({"split": "file"}, r"^labels.split: 'file' needs labels.valid_file or labels.train_file"),
        (
            {"split": "grandparent"},
            r"^labels.split: 'grandparent' is not allowed; allowed: 'random', 'folder', 'column', 'file'$",
        ),
        ({"valid_pct": float("nan")}, r"^labels.valid_pct: nan is not allowed: numbers must be finite"),
    ],
)
def test_labels_params_are_checked(labels, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(labels_params(**labels))


def test_labels_params_accept_the_new_rules():
    cfg = parse_config(
        labels_params(rule="function", function="mypkg.rules:breed", split="file", valid_file="annotations/test.txt")
    )
    assert (cfg.labels.function, cfg.labels.split, cfg.labels.train_file) == ("mypkg.rules:breed", "file", None)
