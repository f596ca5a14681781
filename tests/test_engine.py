import pytest
import torch
from conftest import write_folder_dataset

from petpipe.data import make_loaders
from petpipe.device import make_runtime, seed_everything
from petpipe.engine import DivergedError, evaluate, fit_one_cycle, load_checkpoint, save_checkpoint
from petpipe.errors import PetpipeError
from petpipe.labels import make_table
from petpipe.model import build_model, freeze_body, layer_groups, unfreeze


@pytest.fixture(scope="module")
def loaders(tmp_path_factory):
    root = write_folder_dataset(tmp_path_factory.mktemp("ds"), per_class=12, valid_per_class=4)
    table = make_table(root, rule="folder", images_dir=".", pattern=None, match_on="name", csv_name=None, valid_pct=0.2, seed=0)
    generator = seed_everything(0)
    return make_loaders(root, table, size=16, batch_size=8, num_workers=0, min_scale=0.8, flip=True, generator=generator)


def test_frozen_then_unfrozen_training_learns_colours(loaders):
    train, valid = loaders
    runtime = make_runtime("cpu", "fp32")
    seed_everything(0)
    model = build_model("resnet18", 3)
    before = evaluate(model, valid, runtime)
    freeze_body(model)
    body_conv = model[0][0].weight.detach().clone()
    seen = []
    history, _ = fit_one_cycle(model, train, valid, epochs=3, lr_max=[1e-2] * 3, pct_start=0.25, weight_decay=0.01, runtime=runtime, on_epoch_end=seen.append)
    assert torch.equal(model[0][0].weight, body_conv)  # frozen convolution untouched
    assert [row["epoch"] for row in history] == [1, 2, 3] and seen == history
    unfreeze(model)
    history2, _ = fit_one_cycle(model, train, valid, epochs=2, lr_max=[1e-4, 1e-3, 1e-2], pct_start=0.25, weight_decay=0.01, runtime=runtime)
    assert not torch.equal(model[0][0].weight, body_conv)
    assert history2[-1]["accuracy"] >= 0.9 > before["accuracy"]
    assert history2[-1]["error_rate"] == pytest.approx(1 - history2[-1]["accuracy"])


def test_bf16_autocast_runs_the_same_loop_on_cpu(loaders):
    train, valid = loaders
    runtime = make_runtime("cpu", "bf16")
    model = build_model("resnet18", 3)
    history, _ = fit_one_cycle(model, train, valid, epochs=1, lr_max=[1e-3] * 3, pct_start=0.25, weight_decay=0.0, runtime=runtime)
    assert torch.isfinite(torch.tensor(history[0]["train_loss"]))


def test_divergence_is_reported(loaders):
    train, valid = loaders
    model = build_model("resnet18", 3)
    with pytest.raises(DivergedError, match="lower the learning rate"):
        fit_one_cycle(model, train, valid, epochs=2, lr_max=[1e12] * 3, pct_start=0.0, weight_decay=0.0, runtime=make_runtime("cpu", "fp32"))


def test_checkpoint_round_trip_and_errors(tmp_path):
    model = build_model("resnet18", 3)
    optimizer = torch.optim.AdamW([{"params": g} for g in layer_groups(model)])
    path = tmp_path / "models" / "stage1.pt"
    save_checkpoint(path, model, meta={"arch": "resnet18", "classes": ["a", "b", "c"]}, optimizer=optimizer)
    state = load_checkpoint(path)
    assert state["meta"]["classes"] == ["a", "b", "c"] and "optimizer" in state
    clone = build_model("resnet18", 3)
    clone.load_state_dict(state["model"])
    assert all(torch.equal(a, b) for a, b in zip(clone.state_dict().values(), model.state_dict().values()))
    assert [p.name for p in path.parent.iterdir()] == ["stage1.pt"]  # no temp file left
    with pytest.raises(PetpipeError, match="does not exist: run the stage"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "broken.pt").write_bytes(b"garbage")
    with pytest.raises(PetpipeError, match="cannot be read"):
        load_checkpoint(tmp_path / "broken.pt")
