"""The report: a 37-class page and its files from synthetic predictions (no model), the views for many
classes, the closest-profile rule, byte-reproducible figures, and the real report stage on a tiny store."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from stage_code import ROOT
from synthetic_report import FINETUNE_EPOCHS, PATHS, PET_BREEDS, SECTIONS, report_stage, write_synthetic_run

from petpipe.report import build as rb
from petpipe.report import figures as rf
from petpipe.report import page as rp
from petpipe.report.page import DataInfo

FIGURES = {"show_batch", "class_counts", "curves", "lr_find", "confusion", "confusion_normalised", "top_losses"}
TABLES = {"per_class", "most_confused", "confusion", "class_counts", "top_losses"}


@pytest.fixture(scope="module")
def pets_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pets37")
    write_synthetic_run(root, PET_BREEDS)
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_37_classes_every_section_in_order(pets_run):
    page = (pets_run / PATHS["report"]).read_text()
    assert re.findall(r'<section id="([^"]+)">', page) == SECTIONS
    for heading in (
        "Training curves",
        "Learning-rate finder",
        "Confusion matrix",
        "Most confused",
        "Top 9 losses",
        "Per-class metrics",
    ):
        assert f"<h2>{heading}" in page
    assert page.count('src="data:image/png;base64,') == len(FIGURES)  # every figure inlined, nothing else loaded
    assert not re.search(r'(src|href)="(?!data:|#)', page) and str(pets_run) not in page
    assert "Prediction/Actual/Loss/Probability" not in page  # it is drawn in the figure; the page explains the titles
    assert (
        "top-5 accuracy" in page and page.count('<table class="sortable">') == 4
    )  # counts, skipped, most confused, per class
    assert (
        "images/Egyptian_Mau_14.jpg" in page
        and "truncated or corrupt image" in page
        and "2</b> files skipped (1 by labels, 1 by presize)" in page
    )
    assert (
        f"<td>finetune.epochs</td><td>{FINETUNE_EPOCHS}</td><td>2</td>" in page
        and "<code>profiles/pets.yaml</code>, the closest profile" in page
    )
    assert "train_frozen</code> epochs 1&ndash;4; then <code>finetune</code> epochs 5&ndash;7" in page
    assert all(f"<td>{breed}</td>" in page for breed in PET_BREEDS)


def test_37_classes_files_behind_the_page(pets_run):
    out = pets_run / PATHS["interpretation"]
    assert {p.name for p in out.iterdir()} == {f"{f}.png" for f in FIGURES} | {f"{t}.csv" for t in TABLES}
    predictions = read_csv(pets_run / PATHS["predictions"])
    assert len(predictions) == 37 * 6 and list(predictions[0]) == ["path", "actual", "predicted", "probability", "loss"]
    assert {r["actual"] for r in predictions} == set(PET_BREEDS) and {r["predicted"] for r in predictions} <= set(
        PET_BREEDS
    )
    support = {r["class"]: int(r["support"]) for r in read_csv(out / "per_class.csv")}
    assert support == Counter(r["actual"] for r in predictions)
    metrics = json.loads((pets_run / PATHS["report_metrics"]).read_text())
    correct = sum(r["actual"] == r["predicted"] for r in predictions) / len(predictions)
    assert metrics["accuracy"] == pytest.approx(correct) and metrics["accuracy"] <= metrics["top_5_accuracy"] <= 1
    confused = read_csv(out / "most_confused.csv")
    assert confused[0] == {"actual": "american_bulldog", "predicted": "american_pit_bull_terrier", "count": "3"}
    assert all(int(r["count"]) >= 2 for r in confused)  # report.most_confused_min


def test_37_classes_summary_md(pets_run):
    summary = (pets_run / PATHS["summary"]).read_text()
    metrics = json.loads((pets_run / PATHS["report_metrics"]).read_text())
    assert summary.startswith("# petpipe report: resnet34 on 37 classes\n")
    assert (
        f"| accuracy | {metrics['accuracy']:.4f} |" in summary
        and f"| top-5 accuracy | {metrics['top_5_accuracy']:.4f} |" in summary
    )
    pairs = re.findall(r"^\| (\w+) \| (\w+) \| (\d+) \|$", summary, re.M)
    assert len(pairs) == 5 and pairs[0] == ("american_bulldog", "american_pit_bull_terrier", "3")
    assert (
        "## Params that differ from profiles/pets.yaml" in summary
        and f"| finetune.epochs | {FINETUNE_EPOCHS} | 2 |" in summary
    )


def test_every_figure_is_a_dvc_image_plot():
    """dvc.yaml's `plots:` names each report PNG (so `dvc plots show/diff` render them) and predictions.csv as a
    confusion plot."""
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    paths = pipeline["vars"][0]["paths"]
    images = {
        p.replace("${paths.interpretation}", paths["interpretation"]) for p in pipeline["plots"] if isinstance(p, str)
    }
    assert images == {f"{paths['interpretation']}/{f}.png" for f in FIGURES}
    templates = {next(iter(p)): p[next(iter(p))].get("template") for p in pipeline["plots"] if isinstance(p, dict)}
    assert templates["confusion"] == "confusion" and templates["confusion_normalized"] == "confusion_normalized"
    report_outs = [next(iter(o)) if isinstance(o, dict) else o for o in pipeline["stages"]["report"]["outs"]]
    assert {"${paths.predictions}", "${paths.summary}", "${paths.interpretation}", "${paths.report}"} <= set(
        report_outs
    )


def test_many_classes_get_the_most_confused_view_and_a_counts_table():
    n = 45
    classes = [f"class_{i:02d}" for i in range(n)]
    cm = np.diag(np.full(n, 10))
    cm[3, 7] = cm[40, 2] = 4
    figures = rb.confusion_figures(cm, classes)
    assert set(figures) == {"confusion", "confusion_normalised"}
    note = rp.confusion_section(figures, n)
    assert (
        f"{n} classes are too many" in note and f"the {rp.CONFUSED_VIEW_CLASSES} classes with the most errors" in note
    )
    counts = [{"class": c, "train": 10 + i, "valid": 3} for i, c in enumerate(classes)]
    data = rp.data_section(
        DataInfo(counts=counts, skipped=[], batch=np.zeros((0, 8, 8, 3), np.uint8), batch_labels=[]), chart=b""
    )
    assert "<img" not in data and '<table class="sortable">' in data and "No files were skipped" in data
    assert data.index("class_44") < data.index("class_00")  # most images first


def test_closest_profile_is_the_one_with_fewest_differences():
    run = {"a": 1, "b": 0.01, "c": (1e-3, 1e-2)}
    profiles = {
        "p2": {"a": 1, "b": 0.02, "c": (1e-3, 1e-2)},
        "p1": {"a": 2, "b": 0.02, "c": (1e-3, 1e-2)},
        "p0": {"a": 2, "b": 0.03, "c": "auto"},
    }
    assert rp.closest_profile(run, profiles) == ("p2", [("b", "0.01", "0.02")])
    assert (
        rp.closest_profile(run, {"y": {"a": 1, "b": 0.01, "c": "auto"}, "x": {"a": 1, "b": 0.01, "c": "auto"}})[0]
        == "x"
    )  # tie: first name
    assert rp.closest_profile(run, {}) == ("", [])
    assert [rp.show(v) for v in (None, True, 1e-7, 10.0, (1e-3, 1e-2), "auto")] == [
        "null",
        "true",
        "1e-07",
        "10",
        "[0.001, 0.01]",
        "auto",
    ]


def test_figures_are_byte_reproducible():
    curves = {
        "train_frozen": [{"epoch": 1, "train_loss": 1.0, "valid_loss": 0.9, "accuracy": 0.5}],
        "finetune": [{"epoch": 1, "train_loss": 0.5, "valid_loss": 0.4, "accuracy": 0.8}],
    }
    first = rf.curves_figure(curves)
    assert (
        first == rf.curves_figure(curves)
        and first.startswith(b"\x89PNG")
        and b"Software" not in first
        and b"Matplotlib" not in first
    )


def test_an_image_grid_is_drawn_once_and_fits_its_canvas_with_a_white_margin(monkeypatch):
    """Drawn once, without a tight bounding box (which draws the figure twice): the PNG is the figure's size, a white
    margin all round, the tiles where the layout puts them (nearest-neighbour scaling: a 4 px tile fills its cell in
    solid colour)."""
    from io import BytesIO

    from matplotlib.figure import Figure
    from PIL import Image

    draws, draw = [], Figure.draw
    monkeypatch.setattr(Figure, "draw", lambda fig, renderer: draws.append(fig) or draw(fig, renderer))
    tiles = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    tiles[0, ..., 0] = 255  # red
    tiles[1, ..., 2] = 255  # blue
    png = rf.image_grid(tiles, ["a", "b"], "Two tiles")
    assert len(draws) == 1
    pixels = np.asarray(Image.open(BytesIO(png)).convert("RGB")).astype(int)
    height, width = pixels.shape[:2]
    margin = int(rf.MARGIN * rf.DPI) - 1  # less one pixel: where the canvas meets the margin, rounding may colour it
    border = np.concatenate(
        [pixels[:margin].reshape(-1, 3), pixels[-margin:].reshape(-1, 3), pixels[:, :margin].reshape(-1, 3)]
    )
    assert (border == 255).all() and (pixels[:, -margin:] == 255).all()
    per_inch = 4 / 2.2  # image_grid's tile: 2.2 inches for the 4 px tile
    assert abs(width - ((2 * 4 + round(0.15 * per_inch)) / per_inch + 2 * rf.MARGIN) * rf.DPI) <= 1
    red, blue = (pixels == [255, 0, 0]).all(-1), (pixels == [0, 0, 255]).all(-1)
    assert red[:, : width // 2].sum() > 0.2 * width * height / 2 and not red[:, width // 2 :].any()
    assert blue[:, width // 2 :].sum() > 0.2 * width * height / 2 and not blue[:, : width // 2].any()


def test_report_stage_on_a_tiny_store(presized_store, tmp_path, monkeypatch, mlflow_store):
    """The real stage script: real predictions on a 3-class store; every output written, logged, and reproducible."""
    from petpipe.data.presize import PresizedStore
    from petpipe.run.files import write_json, write_rows
    from petpipe.train.engine import save_checkpoint
    from petpipe.train.model import build_model

    classes = PresizedStore(presized_store).classes
    raw = yaml.safe_load((ROOT / "profiles" / "digits.yaml").read_text())
    raw["train"].update(size=16, batch_size=12)
    raw["report"]["top_losses"] = 4
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    save_checkpoint(
        tmp_path / "final.pt",
        build_model("resnet18", len(classes)),
        meta={"arch": "resnet18", "classes": classes, "size": 16},
    )
    row = {
        "epoch": 1,
        "train_loss": 1.0,
        "valid_loss": 1.1,
        "accuracy": 0.4,
        "error_rate": 0.6,
        "epoch_seconds": 2.0,
        "train_images_per_s": 18.0,
    }
    write_rows(tmp_path / "frozen.csv", [row])
    write_rows(tmp_path / "finetune.csv", [row, {**row, "epoch": 2}])
    write_rows(tmp_path / "lr_find.csv", [{"lr": 10 ** (k / 4 - 6), "loss": 1.5 - k / 40} for k in range(20)])
    write_json(
        tmp_path / "lr_find.json",
        {
            "valley": 1e-4,
            "minimum": 1e-3,
            "steep": 3e-5,
            "auto_max_lr_lo": 1e-6,
            "auto_max_lr_hi": 1e-4,
            "iterations": 20,
        },
    )
    write_json(tmp_path / "chosen.json", {"lo": 1e-3, "hi": 1e-2, "source": "finetune.max_lr"})
    (tmp_path / "skipped.csv").write_text("path,reason\nnotes.txt,no label\n")
    out = tmp_path / "out"

    def run_stage() -> dict[str, bytes]:
        argv = [
            "--params",
            str(tmp_path / "params.yaml"),
            "--presized",
            str(presized_store),
            "--labels-skipped",
            str(tmp_path / "skipped.csv"),
            "--final",
            str(tmp_path / "final.pt"),
            "--frozen-curve",
            str(tmp_path / "frozen.csv"),
            "--finetune-curve",
            str(tmp_path / "finetune.csv"),
            "--lr-find-curve",
            str(tmp_path / "lr_find.csv"),
            "--lr-find-result",
            str(tmp_path / "lr_find.json"),
            "--chosen-lr",
            str(tmp_path / "chosen.json"),
            "--profiles",
            str(ROOT / "profiles"),
            "--out-dir",
            str(out / "interpretation"),
            "--predictions",
            str(out / "predictions.csv"),
            "--html-path",
            str(out / "report.html"),
            "--summary",
            str(out / "summary.md"),
            "--metrics",
            str(out / "report.json"),
        ]
        assert report_stage().main(argv) == 0
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)  # a real (sqlite) store
    monkeypatch.setenv("PETPIPE_EXECUTION", "report-test")
    first = run_stage()
    assert run_stage() == first  # a forced re-run writes the same bytes: no timestamps, no run ids
    assert set(first) == {"report.html", "summary.md", "predictions.csv", "report.json"} | {
        f"interpretation/{f}.png" for f in FIGURES
    } | {f"interpretation/{t}.csv" for t in TABLES}
    page = first["report.html"].decode()
    assert re.findall(r'<section id="([^"]+)">', page) == SECTIONS and "top-5" not in page  # 3 classes: no top-5
    assert (
        "notes.txt" in page
        and "Exactly the profile" not in page
        and "<code>profiles/digits.yaml</code>, the closest profile" in page
    )
    predictions = list(csv.DictReader(first["predictions.csv"].decode().splitlines()))
    assert (
        len(predictions) == 12
        and {r["actual"] for r in predictions} == set(classes)
        and predictions[0]["path"].startswith("valid/")
    )
    metrics = json.loads(first["report.json"])
    assert set(metrics) == {"valid_loss", "accuracy", "error_rate"}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`petpipe.stage` = 'report'")
    assert len(runs) == 2  # one per execution of the stage
    logged = runs[0]
    assert (
        logged.data.metrics["accuracy"] == pytest.approx(metrics["accuracy"])
        and logged.data.metrics["report_seconds"] > 0
    )
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)} | {
        a.path for a in client.list_artifacts(logged.info.run_id, "interpretation")
    }
    assert {"report.html", "summary.md", "predictions.csv", "interpretation/show_batch.png"} <= artifacts
    assert logged.data.params["train.arch"] == "resnet18" and "train.num_workers" not in logged.data.params


def test_the_lr_finder_section_shows_lr_finds_warning_and_no_suggestions():
    lr = rp.LrInfo(
        lrs=[1e-7, 2e-7],
        losses=[0.01, 0.4],
        suggestions={},
        lo=1e-3,
        hi=1e-2,
        source="finetune.max_lr",
        frozen_lr=1e-2,
        group_lrs=[1e-3, 1e-2],
        warning="lr_find: only 2 points before the loss diverged, too few to suggest an LR",
    )
    html = rp.lr_section(b"png", lr)
    assert "<b>Warning:</b> lr_find: only 2 points before the loss diverged" in html and "valley" not in html
    assert "<b>Warning:</b>" not in rp.lr_section(b"png", rp.LrInfo(**{**lr.__dict__, "warning": None}))


def test_show_batch_undoes_the_models_own_normalisation():
    """A batch normalised at mean = std = 0.5 comes back as the pixels it was made from (not as ImageNet-undone
    colours)."""
    import torch

    from petpipe.data.augment import normalize
    from petpipe.data.normalization import IMAGENET, Normalization
    from petpipe.report.inputs import to_display

    half = Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    pixels = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    shown = to_display(normalize(pixels.float() / 255, half), half)
    assert np.array_equal(shown, pixels.permute(0, 2, 3, 1).numpy())
    assert not np.array_equal(to_display(normalize(pixels.float() / 255, half), IMAGENET), shown)
