"""The fetch and labels stage entry points in-process (what `dvc repro` runs), against a real HTTP
server on 127.0.0.1: a Pets-like archive with the awkward files the real one holds, through fetch,
labels with the official split files and presize; and bad params. (That training runs on such a
presized store is tests/test_pipeline.py::test_labels_then_presize_on_awkward_files_then_training.)"""

import io
import json
import tarfile

import mlflow
import pytest
import yaml
from conftest import ROOT, make_image, write_params
from http_faults import FaultyServer
from PIL import Image
from test_stage_spec import load_stage

from petpipe.sources import download as download_module
from petpipe.sources.download import Network

BREEDS = {"great_pyrenees": (230, 230, 230), "Bengal": (200, 120, 40)}


@pytest.fixture
def params(tmp_path, monkeypatch, mlflow_store):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    monkeypatch.setenv("PETPIPE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(download_module, "NETWORK", Network(tries=3, backoff=0.01))
    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load((ROOT / "profiles/pets.yaml").read_text())
    raw.update(device="cpu", seed=0)
    raw["data"].update(size=None)
    raw["labels"].update(split="file", valid_file="annotations/test.txt", train_file="annotations/trainval.txt")
    raw["presize"]["size"] = 24
    yield raw
    mlflow.set_tracking_uri(None)


def image_bytes(image: Image.Image, **save) -> bytes:
    out = io.BytesIO()
    image.save(out, **save)
    return out.getvalue()


def pets_like_archive() -> bytes:
    """oxford-iiit-pet/images/<breed>_<n>.jpg (n 1-8; 7 and 8 are the official test split) with the awkward
    files of the real archive, a .mat file, and annotations/trainval.txt and test.txt."""
    files = {}
    for breed, colour in BREEDS.items():
        for n in range(1, 9):
            files[f"images/{breed}_{n}.jpg"] = image_bytes(make_image(colour, n, size=20), format="JPEG", quality=90)
    bengal = make_image(BREEDS["Bengal"], 50, size=20)
    files["images/Bengal_2.jpg"] = image_bytes(bengal, format="PNG")  # PNG content, .jpg name
    files["images/Bengal_3.jpg"] = image_bytes(bengal.convert("RGBA"), format="PNG")  # RGBA
    files["images/Bengal_7.jpg"] = image_bytes(bengal.convert("P"), format="GIF")  # palette GIF, .jpg name
    files["images/great_pyrenees_2.jpg"] = image_bytes(
        make_image(BREEDS["great_pyrenees"], 52, size=20).convert("L"), format="JPEG"
    )
    whole = files["images/great_pyrenees_1.jpg"]
    files["images/great_pyrenees_3.jpg"] = whole[: len(whole) // 2]  # truncated, like beagle_116.jpg
    files["images/Abyssinian_100.mat"] = b"MATLAB 5.0 MAT-file"  # not an image: ignored
    names = [f"{breed}_{n}" for breed in BREEDS for n in range(1, 9)]
    files["annotations/trainval.txt"] = "".join(f"{name} 1 1 1\n" for name in names if int(name[-1]) <= 6).encode()
    files["annotations/test.txt"] = "".join(f"{name} 1 1 1\n" for name in names if int(name[-1]) > 6).encode()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"oxford-iiit-pet/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def run_stage(name, params_file, **paths) -> int:
    return load_stage(name).main(
        ["--params", params_file] + [a for k, v in paths.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    )


def test_pets_like_archive_over_flaky_http_to_a_presized_store(params, tmp_path, capsys):
    server = FaultyServer()
    try:
        server.files["/oxford-iiit-pet.tgz"] = pets_like_archive()
        server.plan("/oxford-iiit-pet.tgz", ("status", 503), ("drop", 5_000))
        params["data"]["url"] = server.url("/oxford-iiit-pet.tgz")
        p = write_params(tmp_path / "params.yaml", params)
        dataset = tmp_path / "data" / "dataset"
        assert run_stage("fetch", p, dataset=dataset) == 0
        assert server.requests("/oxford-iiit-pet.tgz") == [None, None, "bytes=5000-"]
        err = capsys.readouterr().err
        assert "warning: data.sha256 and data.md5 are null" in err and "HTTP 503" in err
        assert (dataset / "images" / "Abyssinian_100.mat").is_file() and (
            dataset / "annotations" / "test.txt"
        ).is_file()
        assert run_stage("fetch", p, dataset=dataset) == 0  # a forced re-run: from the cache, no request
        assert len(server.requests("/oxford-iiit-pet.tgz")) == 3
    finally:
        server.close()

    labels = tmp_path / "data" / "labels"
    assert run_stage("labels", p, dataset=dataset, out_dir=labels, metrics=tmp_path / "labels.json") == 0
    assert json.loads((tmp_path / "labels.json").read_text()) == {
        "n_train": 12,
        "n_valid": 4,
        "n_classes": 2,
        "n_skipped": 0,
    }
    assert json.loads((labels / "classes.json").read_text()) == ["Bengal", "great_pyrenees"]
    table = (labels / "table.csv").read_text().splitlines()
    assert "images/Bengal_7.jpg,Bengal,valid" in table and "images/great_pyrenees_1.jpg,great_pyrenees,train" in table

    store = tmp_path / "data" / "presized"
    assert (
        run_stage(
            "presize",
            p,
            dataset=dataset,
            table_csv=labels / "table.csv",
            classes_json=labels / "classes.json",
            out_dir=store,
            metrics=tmp_path / "presize.json",
        )
        == 0
    )
    assert json.loads((tmp_path / "presize.json").read_text())["n_skipped"] == 1
    skipped = (store / "skipped.csv").read_text().splitlines()
    assert (
        skipped[0] == "path,reason"
        and len(skipped) == 2
        and skipped[1].startswith("images/great_pyrenees_3.jpg,truncated")
    )

    from petpipe.data.presize import PresizedStore

    presized = PresizedStore(store)
    assert presized.classes == ["Bengal", "great_pyrenees"] and len(presized.paths) == 15
    assert {"images/Bengal_2.jpg", "images/Bengal_3.jpg", "images/Bengal_7.jpg", "images/great_pyrenees_2.jpg"} <= set(
        presized.paths
    )


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        (None, "seed", -1, "seed: -1: input should be greater than or equal to 0"),
        ("labels", "valid_pct", float("nan"), "labels.valid_pct: nan is not allowed: numbers must be finite"),
        ("data", "md5", "ABC", "data.md5: 'ABC': string should match pattern"),
        ("labels", "split", "column", "labels.split: 'column' takes the split from the is_valid column"),
    ],
)
def test_bad_data_params_stop_fetch_and_labels_before_any_work(params, tmp_path, capsys, section, key, value, message):
    (params[section] if section else params)[key] = value
    p = write_params(tmp_path / "bad.yaml", params)
    assert run_stage("fetch", p, dataset=tmp_path / "nothing") == 2
    assert (
        run_stage(
            "labels", p, dataset=tmp_path / "nothing", out_dir=tmp_path / "nothing", metrics=tmp_path / "nothing.json"
        )
        == 2
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: {lines[0].removeprefix('error: ')}"] * 2 and message in lines[0]
    assert not (tmp_path / "nothing").exists() and not (tmp_path / "cache").exists()


def test_unreachable_url_fails_the_stage_with_one_line(params, tmp_path, capsys):
    from conftest import free_port

    url = f"http://127.0.0.1:{free_port()}/oxford-iiit-pet.tgz"
    params["data"]["url"] = url
    assert run_stage("fetch", write_params(tmp_path / "p.yaml", params), dataset=tmp_path / "dataset") == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: data.url: giving up on {url} after 3 tries; the last one: cannot reach {url}")
    assert not (tmp_path / "dataset").exists()
