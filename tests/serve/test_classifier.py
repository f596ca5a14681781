"""The raw-image predictor behind the logged pyfunc model: paths, bytes and base64 (as MLflow's input
examples and JSON requests carry bytes) give the same answer as the validation path of training."""

from __future__ import annotations

import base64

import numpy as np
import pandas as pd
import pytest
import torch

from petpipe.data.augment import valid_batch
from petpipe.data.presize import PresizedStore, presized_pixels
from petpipe.run.errors import PetpipeError
from petpipe.serve.classifier import ImageClassifier, example_input
from petpipe.train.engine import save_checkpoint
from petpipe.train.model import build_model


@pytest.fixture(scope="module")
def classifier(presized_store, tmp_path_factory) -> ImageClassifier:
    torch.manual_seed(0)
    classes = PresizedStore(presized_store).classes
    checkpoint = tmp_path_factory.mktemp("serving") / "final.pt"
    save_checkpoint(
        checkpoint,
        build_model("resnet18", len(classes), weights="none"),
        meta={"arch": "resnet18", "classes": classes, "size": 16},
    )
    return ImageClassifier(checkpoint, presize_size=PresizedStore(presized_store).size)


def test_the_example_keeps_a_batch_of_two_with_one_validation_image(presized_store, tmp_path):
    two = example_input(PresizedStore(presized_store), count=2)["image"]
    assert len(two) == 2 and two.iloc[0] != two.iloc[1]  # two distinct images when the store has them
    frame = example_input(PresizedStore(presized_store), count=len(PresizedStore(presized_store).indices("valid")) + 3)
    assert (
        len(frame) == len(PresizedStore(presized_store).indices("valid")) + 3
        and frame["image"].iloc[-1] == frame["image"].iloc[0]
    )


def test_paths_bytes_and_base64_with_line_breaks_give_the_same_answer(classifier, presized_store):
    data = example_input(PresizedStore(presized_store), count=2)["image"].tolist()
    assert all(isinstance(b, bytes) for b in data)
    mime = [base64.encodebytes(b).decode() for b in data]  # what MLflow writes in input_example.json
    assert all("\n" in m[:-1] for m in mime)
    plain = [base64.b64encode(b).decode() for b in data]
    answers = [classifier(pd.DataFrame({"image": images})) for images in (data, mime, plain)]
    for answer in answers[1:]:
        pd.testing.assert_frame_equal(answer, answers[0])
    assert list(answers[0].columns) == ["label", "probability"] and set(answers[0]["label"]) <= set(classifier.classes)


def test_the_network_input_is_the_training_validation_batch(classifier, presized_store):
    """The original file, served, is exactly what validation fed the network: presized, the store's JPEG round
    trip, the centre square, resized and normalised."""
    store = PresizedStore(presized_store)
    for index in store.indices("valid")[:3]:
        original = presized_store.parent / "ds" / store.paths[int(index)]  # conftest's presized_store layout
        square = store.square(int(index), 0.5)
        expected = valid_batch(torch.from_numpy(square.copy()).permute(2, 0, 1)[None].contiguous(), size=16)
        assert torch.equal(classifier.inputs([str(original)]), expected)
        assert expected.shape == (1, 3, 16, 16)


def test_a_model_trained_far_below_the_presize_is_served_the_reduced_decode(presized_store, tmp_path):
    """Trained at 6 px from a 24 px store, the loaders decoded the store at 1/2: serving decodes the same way."""
    store = PresizedStore(presized_store)
    checkpoint = tmp_path / "small.pt"
    model = build_model("resnet18", len(store.classes), weights="none")
    save_checkpoint(checkpoint, model, meta={"arch": "resnet18", "classes": store.classes, "size": 6})
    small = ImageClassifier(checkpoint, presize_size=store.size)
    read = store.for_training_size(6)
    assert small.reduction == read.reduction == 2
    for index in store.indices("valid")[:3]:
        original = presized_store.parent / "ds" / store.paths[int(index)]
        square = read.square(int(index), 0.5)
        assert square.shape == (12, 12, 3)
        expected = valid_batch(torch.from_numpy(square.copy()).permute(2, 0, 1)[None].contiguous(), size=6)
        assert torch.equal(small.inputs([str(original)]), expected)


def test_a_wide_photo_is_cut_to_its_centre_square_as_in_validation(classifier, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    path = tmp_path / "wide.png"
    Image.fromarray(rng.integers(0, 256, (20, 50, 3), dtype=np.uint8)).save(
        path
    )  # 20 x 50: the presize store would keep 24 x 60
    presized = presized_pixels(path, classifier.presize_size)
    assert presized.shape[:2] == (24, 60)
    centre = presized[:, 18:42]  # (60 - 24) / 2 = 18 columns cut on each side
    expected = valid_batch(torch.from_numpy(centre.copy()).permute(2, 0, 1)[None].contiguous(), size=16)
    assert torch.equal(classifier.inputs([str(path)]), expected)


def test_bad_inputs_get_one_clear_error(classifier, tmp_path):
    with pytest.raises(PetpipeError, match="needs a column 'image'"):
        classifier(pd.DataFrame({"path": ["x.png"]}))
    with pytest.raises(PetpipeError, match="neither an existing file nor base64"):
        classifier(pd.DataFrame({"image": [str(tmp_path / "missing.png")]}))
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(PetpipeError, match="cannot be decoded"):
        classifier(pd.DataFrame({"image": [str(tmp_path / "text.png")]}))
