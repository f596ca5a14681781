"""The loader over the presized store: square crops, seeded draws, uint8 to the device, one code path."""

import numpy as np
import pytest
import torch

from petpipe.compute.device import make_runtime
from petpipe.data.augment import fastai_augment, valid_batch
from petpipe.data.loaders import CENTRE, CropSampler, make_loader, make_loaders, resolve_workers
from petpipe.data.normalization import IMAGENET
from petpipe.data.presize import PresizedStore
from petpipe.run.errors import PetpipeError

CPU = make_runtime("cpu", "fp32")


def batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


FASTAI_AUGMENT = fastai_augment()


def train_loader(store_dir, *, num_workers=0, augment=FASTAI_AUGMENT, seed=0):
    return make_loader(
        PresizedStore(store_dir),
        "train",
        CPU,
        size=16,
        batch_size=8,
        num_workers=num_workers,
        augment=augment,
        generator=torch.Generator().manual_seed(seed),
    )


def test_validation_batches_are_the_centre_squares_in_store_order(presized_store):
    store = PresizedStore(presized_store)
    loader = make_loader(store, "valid", CPU, size=16, batch_size=5, num_workers=0)
    images, targets = next(iter(loader))
    first = store.indices("valid")[:5]
    squares = torch.stack(
        [torch.from_numpy(store.square(int(i), CENTRE).copy()).permute(2, 0, 1) for i in first]
    )  # NCHW
    torch.testing.assert_close(images, valid_batch(squares, size=16))
    assert targets.tolist() == store.labels[first].tolist()
    assert sum(len(y) for _, y in loader) == len(store.indices("valid"))  # nothing dropped in validation


def test_training_batches_are_augmented_shuffled_and_drop_the_last_partial_batch(presized_store):
    loader = train_loader(presized_store)
    epoch1, epoch2 = batches(loader), batches(loader)
    assert len(epoch1) == 36 // 8 and all(x.shape == (8, 3, 16, 16) and x.dtype == torch.float32 for x, _ in epoch1)
    assert not torch.equal(epoch1[0][0], epoch2[0][0])  # new order, crops and augmentation every epoch
    centre = make_loader(PresizedStore(presized_store), "train", CPU, size=16, batch_size=8, num_workers=0)
    plain = torch.cat([x for x, _ in centre])
    assert not any(
        torch.allclose(x[0], p) for x, _ in epoch1 for p in plain
    )  # no training image is the plain centre crop


def test_same_seed_same_batches_whatever_the_number_of_workers(presized_store):
    reference = batches(train_loader(presized_store, num_workers=0))
    with_workers = batches(train_loader(presized_store, num_workers=2))
    assert len(reference) == len(with_workers)
    for (x0, y0), (x1, y1) in zip(reference, with_workers):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    other_seed = batches(train_loader(presized_store, seed=1))
    assert not torch.equal(reference[0][0], other_seed[0][0])


def test_augmentation_off_keeps_the_shuffle_order(presized_store):
    off = batches(train_loader(presized_store, augment=None))
    on = batches(train_loader(presized_store))
    assert [y.tolist() for _, y in off] == [y.tolist() for _, y in on]  # augmentation has its own random stream


def test_crop_positions_are_random_on_train_and_centred_on_valid():
    train = list(CropSampler(50, torch.Generator().manual_seed(0)))
    assert sorted(i for i, _ in train) == list(range(50)) and len({round(p, 6) for _, p in train}) == 50
    assert all(0.0 <= p < 1.0 for _, p in train)
    assert list(CropSampler(3, None)) == [(0, CENTRE), (1, CENTRE), (2, CENTRE)]


def test_loader_yields_what_the_dataset_holds(presized_store):
    store = PresizedStore(presized_store)
    train, valid = make_loaders(
        presized_store,
        CPU,
        size=16,
        batch_size=8,
        num_workers=0,
        augment=None,
        generator=torch.Generator().manual_seed(0),
        normalization=IMAGENET,
    )
    assert len(train.dataset) == len(store.indices("train")) == 36 and len(valid.dataset) == 12
    item, label = train.dataset[(0, 0.0)]
    assert (
        item.dtype == torch.uint8
        and item.shape == (24, 24, 3)
        and label == int(store.labels[store.indices("train")[0]])
    )
    assert np.array_equal(item.numpy(), store.square(int(store.indices("train")[0]), 0.0))
    images, labels = train.dataset.__getitems__([(0, 0.0), (1, 1.0)])  # a whole batch in one tensor
    assert images.shape == (2, 24, 24, 3) and torch.equal(images[0], item) and labels[0] == label
    assert np.array_equal(images[1].numpy(), store.square(int(store.indices("train")[1]), 1.0))


def test_training_size_larger_than_the_store_is_a_clear_error(presized_store):
    with pytest.raises(PetpipeError, match=r"train.size 32 is larger than presize.size 24: raise presize.size"):
        make_loader(PresizedStore(presized_store), "valid", CPU, size=32, batch_size=8, num_workers=0)


def test_auto_workers(monkeypatch):
    assert resolve_workers("auto", torch.device("cpu")) == 0
    assert resolve_workers(3, torch.device("cpu")) == 3
    for cores, workers in ((1, 0), (4, 3), (64, 8)):  # cores - 1, at most 8
        monkeypatch.setattr("os.sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert resolve_workers("auto", torch.device("cuda")) == workers


def unstaged(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What the loader should yield, batch by batch, without staging one ahead."""
    return [(loader.transform(x.to(loader.runtime.device)), y.to(loader.runtime.device)) for x, y in loader.loader]


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
def test_staging_one_batch_ahead_changes_nothing(presized_store, device):
    """Batch i+1 is staged (on CUDA: on a side stream) before batch i is handed out: same batches, same order, every
    epoch."""
    runtime = make_runtime(device, "fp32")

    def made():
        store = PresizedStore(presized_store)
        generator = torch.Generator().manual_seed(3)
        return make_loader(
            store, "train", runtime, size=16, batch_size=8, num_workers=0, augment=fastai_augment(), generator=generator
        )

    staged, reference = made(), made()
    if device == "cuda":  # slow the side stream down: a batch handed out before its event would be read half-made
        transform = staged.transform
        staged.transform = lambda images: (torch.cuda._sleep(50_000_000), transform(images))[1]
    for _ in range(2):
        got, expected = batches(staged), unstaged(reference)
        assert len(got) == len(expected) == 36 // 8
        for (x0, y0), (x1, y1) in zip(got, expected):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)
