"""The stage functions themselves (what stages/*.py call), on tiny data, logging to a temp store."""

import dataclasses
import json

import mlflow
import pytest
import torch
from conftest import ROOT

from petpipe.config import load_config
from petpipe.labels import make_table, write_table
from petpipe.pipeline import run_train_frozen


@pytest.fixture
def tiny_cfg(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(ROOT)  # stages read their param list from dvc.yaml in the working directory
    base = load_config(ROOT / "profiles/digits.yaml")
    train = dataclasses.replace(base.train, size=16, batch_size=8)
    yield dataclasses.replace(base, device="cpu", train=train, train_frozen=dataclasses.replace(base.train_frozen, epochs=1))
    mlflow.set_tracking_uri(None)


def test_seed_fixes_initial_weights_and_data_order(tiny_cfg, folder_dataset, tmp_path):
    table = make_table(folder_dataset, rule="folder", images_dir=".", pattern=None, match_on="name", csv_name=None, valid_pct=0.2, seed=0)
    files = write_table(table, tmp_path / "labels")

    def train(cfg, tag):
        out = dict(checkpoint=tmp_path / f"{tag}.pt", metrics=tmp_path / f"{tag}.json", plot=tmp_path / f"{tag}.csv")
        run_train_frozen(cfg, dataset=folder_dataset, table_csv=files["table"], classes_json=files["classes"], **out)
        return torch.load(out["checkpoint"], weights_only=True)["model"], json.loads(out["metrics"].read_text())

    first, first_metrics = train(tiny_cfg, "a")
    again, again_metrics = train(tiny_cfg, "b")
    other, _ = train(dataclasses.replace(tiny_cfg, seed=7), "c")
    assert first_metrics == again_metrics
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
