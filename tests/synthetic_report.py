"""A whole report from synthetic predictions, for any number of classes: no dataset, model or training.

``write_synthetic_run(root, classes)`` writes, at the paths dvc.yaml gives them, everything the
report and ``dvc plots`` read or show: the training and LR-finder curves, then the report itself
(page, summary, predictions, figures, tables) built by the real rendering code.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import yaml
from stage_code import ROOT

from petpipe.report.build import Predictions, Report, build_report, write_report
from petpipe.report.interpret import Interpretation
from petpipe.report.page import DataInfo, LrInfo, RunInfo
from petpipe.run.config import load_config, parse_config
from petpipe.run.files import write_rows
from petpipe.train.engine import classification_metrics

# The 37 Oxford-IIIT Pet breeds, as lesson 1's labelling rule names them.
PET_BREEDS = [
    "Abyssinian",
    "Bengal",
    "Birman",
    "Bombay",
    "British_Shorthair",
    "Egyptian_Mau",
    "Maine_Coon",
    "Persian",
    "Ragdoll",
    "Russian_Blue",
    "Siamese",
    "Sphynx",
    "american_bulldog",
    "american_pit_bull_terrier",
    "basset_hound",
    "beagle",
    "boxer",
    "chihuahua",
    "english_cocker_spaniel",
    "english_setter",
    "german_shorthaired",
    "great_pyrenees",
    "havanese",
    "japanese_chin",
    "keeshond",
    "leonberger",
    "miniature_pinscher",
    "newfoundland",
    "pomeranian",
    "pug",
    "saint_bernard",
    "samoyed",
    "scottish_terrier",
    "shiba_inu",
    "staffordshire_bull_terrier",
    "wheaten_terrier",
    "yorkshire_terrier",
]
PATHS = yaml.safe_load((ROOT / "dvc.yaml").read_text())["vars"][0]["paths"]
# The report's sections, in page order (their ids).
SECTIONS = [
    "run",
    "data",
    "batch",
    "curves",
    "lr-finder",
    "metrics",
    "confusion",
    "most-confused",
    "top-losses",
    "per-class",
]
FINETUNE_EPOCHS = 3  # the pets profile has 2: the one param that differs


def report_stage():
    spec = importlib.util.spec_from_file_location("stage_report", ROOT / "stages" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pets_like_params() -> tuple[dict, dict[str, dict]]:
    """The report's params for profiles/pets.yaml with finetune.epochs changed, and those of every profile."""
    shown = report_stage().shown_params
    raw = yaml.safe_load((ROOT / "profiles" / "pets.yaml").read_text())
    raw["finetune"]["epochs"] = FINETUNE_EPOCHS
    profiles = {f"profiles/{p.name}": shown(load_config(p)) for p in sorted((ROOT / "profiles").glob("*.yaml"))}
    return shown(parse_config(raw)), profiles


def pictures(labels: np.ndarray, n_classes: int, side: int = 24) -> np.ndarray:
    """uint8 [n, side, side, 3]: each class a colour, a stripe whose position is the item's index."""
    hues = (np.stack([np.arange(n_classes) * k for k in (37, 91, 173)], 1) % 200 + 40).astype(np.uint8)
    images = np.broadcast_to(hues[labels][:, None, None, :], (len(labels), side, side, 3)).copy()
    for k in range(len(labels)):
        images[k, :, k % side] = 255
    return images


def synthetic_report(classes: list[str], *, per_class: int = 6, seed: int = 0) -> tuple[Report, dict[str, list[dict]]]:
    """A report (and the curves it was built from) for ``classes``: mostly right predictions, a few systematic
    confusions."""
    rng = np.random.default_rng(seed)
    n = len(classes)
    targets = np.repeat(np.arange(n), per_class)
    logits = rng.normal(0, 1, (len(targets), n))
    logits[np.arange(len(targets)), targets] += 3
    for c in range(0, n, 3):  # every third class: two of its images predicted as the next class
        logits[c * per_class : c * per_class + 2, (c + 1) % n] += 8
    logits_t, targets_t = torch.tensor(logits, dtype=torch.float32), torch.tensor(targets)
    valid_images = pictures(targets, n)
    preds = Predictions(
        classes=classes,
        paths=[f"images/{classes[t]}_{k}.jpg" for k, t in enumerate(targets)],
        interp=Interpretation.from_logits(logits_t, targets_t),
        metrics=classification_metrics(logits_t, targets_t),
        inputs=lambda items: valid_images[items],
    )
    batch_labels = rng.integers(0, n, 16)
    data = DataInfo(
        counts=[{"class": c, "train": int(rng.integers(20, 40)), "valid": per_class} for c in classes],
        skipped=[
            {"stage": "labels", "path": "images/Abyssinian_34.mat", "reason": "not an image file"},
            {
                "stage": "presize",
                "path": "images/Egyptian_Mau_14.jpg",
                "reason": "truncated or corrupt image: image file is truncated",
            },
        ],
        batch=pictures(batch_labels, n),
        batch_labels=[classes[i] for i in batch_labels],
    )
    curves = {
        stage: [
            {
                "epoch": e + 1,
                "train_loss": start / (e + 1),
                "valid_loss": start / (e + 1.5),
                "accuracy": 1 - 0.5 / (e + 1 + offset),
                "error_rate": 0.5 / (e + 1 + offset),
                "epoch_seconds": 12.5,
                "train_images_per_s": 480.0,
            }
            for e in range(epochs)
        ]
        for stage, epochs, start, offset in (("train_frozen", 4, 2.0, 0), ("finetune", FINETUNE_EPOCHS, 0.5, 4))
    }
    lrs = np.geomspace(1e-7, 10, 80)
    losses = 3.5 - 2 / (1 + np.exp(-(np.log10(lrs) + 4) * 2)) + np.exp(np.log10(lrs) * 2)
    lr = LrInfo(
        lrs=lrs.tolist(),
        losses=losses.tolist(),
        suggestions={"valley": 1.2e-3, "minimum": 3e-3, "steep": 6e-4},
        lo=1e-6,
        hi=1e-4,
        source="finetune.max_lr",
        frozen_lr=1e-3,
        group_lrs=[1e-6, 1e-5, 1e-4],
    )
    params, profiles = pets_like_params()
    run = RunInfo(
        title=f"resnet34 on {n} classes",
        device="cpu (cpu), precision fp32",
        params=params,
        profiles=profiles,
        curves=curves,
    )
    return build_report(run, data, lr, preds, top_losses=9, most_confused_min=2), curves


def write_synthetic_run(root: Path, classes: list[str]) -> Report:
    """The synthetic report and its curves, written under ``root`` at dvc.yaml's paths."""
    report, curves = synthetic_report(classes)
    for stage, rows in curves.items():
        write_rows(root / PATHS[f"{stage}_curve"], rows)
    write_rows(root / PATHS["lr_find_curve"], [{"lr": 10 ** (k / 10 - 7), "loss": 2 - k / 100} for k in range(80)])
    write_report(
        report,
        out_dir=root / PATHS["interpretation"],
        predictions=root / PATHS["predictions"],
        html_path=root / PATHS["report"],
        summary=root / PATHS["summary"],
        metrics=root / PATHS["report_metrics"],
    )
    return report
