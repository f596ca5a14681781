"""The stage entry points themselves (what `dvc repro` runs), in-process on tiny data, logging to a temp store."""

import json

import mlflow
import pytest
import torch
import yaml
from conftest import ROOT, write_params
from test_stage_spec import load_stage


@pytest.fixture
def tiny_params(tmp_path, monkeypatch, mlflow_store):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    params = yaml.safe_load((ROOT / "profiles/digits.yaml").read_text())
    params["device"] = "cpu"
    params["train"].update(arch="resnet18", size=16, batch_size=8, num_workers=0)
    params["train_frozen"]["epochs"] = 1
    yield params
    mlflow.set_tracking_uri(None)


def test_seed_fixes_initial_weights_data_order_and_augmentation(tiny_params, presized_store, tmp_path):
    stage = load_stage("train_frozen")

    def train(seed, tag):
        params = write_params(tmp_path / f"{tag}.yaml", {**tiny_params, "seed": seed})
        out = dict(checkpoint=tmp_path / f"{tag}.pt", metrics=tmp_path / f"{tag}.json", plot=tmp_path / f"{tag}.csv")
        argv = ["--params", params, "--presized", str(presized_store)]
        assert stage.main(argv + [item for k, v in out.items() for item in (f"--{k}", str(v))]) == 0
        metrics = json.loads(out["metrics"].read_text())
        assert metrics["epoch_seconds"] > 0 and metrics["train_images_per_s"] > 0
        timing = ("epoch_seconds", "train_images_per_s")  # measured, so never reproducible
        return torch.load(out["checkpoint"], weights_only=True)["model"], {
            k: v for k, v in metrics.items() if k not in timing
        }

    first, first_metrics = train(42, "a")
    again, again_metrics = train(42, "b")
    other, _ = train(7, "c")
    assert first_metrics == again_metrics
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("stage", list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]))
def test_bad_params_fail_before_any_work_with_one_line(stage, tiny_params, tmp_path, capsys):
    tiny_params["train"]["archh"] = tiny_params["train"].pop("arch")
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    paths = [arg for arg in spec["cmd"].split()[2:]]
    argv = ["--params", write_params(tmp_path / "bad.yaml", tiny_params)] + [
        a if a.startswith("--") else str(tmp_path / "nothing") for a in paths
    ]
    assert load_stage(stage).main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: ")
        and "unknown key 'train.archh'; allowed keys at train: arch," in err
        and len(err.strip().splitlines()) == 1
    )
    assert not any(p.name == "nothing" for p in tmp_path.iterdir())  # nothing written


def test_choose_lr_takes_explicit_lrs_or_lr_find_valley(tiny_params, tmp_path):
    stage = load_stage("choose_lr")
    result, chosen = tmp_path / "lr_find.json", tmp_path / "chosen.json"
    argv = ["--lr-find-result", str(result), "--chosen", str(chosen)]
    assert (
        stage.main(["--params", write_params(tmp_path / "p.yaml", tiny_params), *argv]) == 0
    )  # explicit: lr_find not needed
    assert json.loads(chosen.read_text()) == {"lo": 1e-3, "hi": 1e-2, "source": "finetune.max_lr"}
    tiny_params["finetune"]["max_lr"] = "auto"
    assert stage.main(["--params", write_params(tmp_path / "p.yaml", tiny_params), *argv]) == 2  # auto without a result
    result.write_text(json.dumps({"valley": 3e-3}))
    assert stage.main(["--params", write_params(tmp_path / "p.yaml", tiny_params), *argv]) == 0
    assert json.loads(chosen.read_text()) == {"lo": pytest.approx(3e-5), "hi": 3e-3, "source": "lr_find valley"}


def write_pets_like(root):
    """images/<breed>_<n>.jpg for two breeds, with the awkward files real archives hold."""
    from conftest import make_image

    images = root / "images"
    images.mkdir(parents=True)
    for breed, colour in (("great_pyrenees", (230, 230, 230)), ("Bengal", (200, 120, 40))):
        for n in range(1, 7):
            make_image(colour, n, size=20).save(images / f"{breed}_{n}.jpg", quality=90)
    make_image((200, 120, 40), 50, size=20).save(images / "Bengal_7.jpg", format="PNG")  # PNG content, .jpg name
    make_image((200, 120, 40), 51, size=20).convert("RGBA").save(images / "Bengal_8.jpg", format="PNG")  # RGBA
    make_image((230, 230, 230), 52, size=20).convert("L").save(images / "great_pyrenees_7.jpg")  # grayscale JPEG
    whole = (images / "great_pyrenees_1.jpg").read_bytes()
    (images / "great_pyrenees_8.jpg").write_bytes(whole[: len(whole) // 2])  # truncated
    (images / "great_pyrenees_9.mat").write_bytes(b"MATLAB 5.0")  # not an image: ignored
    return root


def test_labels_then_presize_on_awkward_files_then_training(tiny_params, tmp_path):
    dataset = write_pets_like(tmp_path / "pets")
    tiny_params["labels"].update(
        rule="regex", images_dir="images", pattern=r"^(.+)_\d+\.jpg$", regex_on="name", split="random", valid_pct=0.25
    )
    tiny_params["presize"]["size"] = 24
    params = write_params(tmp_path / "p.yaml", tiny_params)
    labels, store = tmp_path / "labels", tmp_path / "presized"
    assert (
        load_stage("labels").main(
            [
                "--params",
                params,
                "--dataset",
                str(dataset),
                "--out-dir",
                str(labels),
                "--metrics",
                str(tmp_path / "l.json"),
            ]
        )
        == 0
    )
    argv = [
        "--params",
        params,
        "--dataset",
        str(dataset),
        "--table-csv",
        str(labels / "table.csv"),
        "--classes-json",
        str(labels / "classes.json"),
        "--out-dir",
        str(store),
        "--metrics",
        str(tmp_path / "p.json"),
    ]
    assert load_stage("presize").main(argv) == 0
    counts = json.loads((tmp_path / "p.json").read_text())
    jpegs = (store / "images.jpg").stat().st_size
    assert counts == {"n_images": 15, "n_skipped": 1, "bytes": jpegs, "decoded_bytes": 15 * 24 * 24 * 3}
    skipped = (store / "skipped.csv").read_text().splitlines()
    assert (
        skipped[0] == "path,reason"
        and len(skipped) == 2
        and skipped[1].startswith("images/great_pyrenees_8.jpg,truncated or corrupt image")
    )
    from petpipe.data.presize import PresizedStore

    presized = PresizedStore(store)
    assert presized.classes == ["Bengal", "great_pyrenees"] and "images/Bengal_8.jpg" in presized.paths
    out = dict(checkpoint=tmp_path / "s1.pt", metrics=tmp_path / "tf.json", plot=tmp_path / "tf.csv")
    assert (
        load_stage("train_frozen").main(
            ["--params", params, "--presized", str(store)] + [a for k, v in out.items() for a in (f"--{k}", str(v))]
        )
        == 0
    )
    assert json.loads(out["metrics"].read_text())["train_images_per_s"] > 0
