"""The store on the device (train.store_on_device): on the CPU the same gather runs over the memory map, and its
batches are the host loader's, byte for byte (same images, order, crops, augmentation), on train, valid and DDP."""

import numpy as np
import pytest
import torch
from conftest import COLORS, write_presized
from PIL import Image

from petpipe.compute.device import make_runtime
from petpipe.data.augment import fastai_augment
from petpipe.data.device_store import (
    DeviceStore,
    decode_store,
    decoded_offsets,
    store_bytes_on_device,
    wants_device_store,
)
from petpipe.data.loaders import StoreLoader, make_loader, make_loaders
from petpipe.data.normalization import IMAGENET
from petpipe.data.presize import PresizedStore
from petpipe.run.errors import NoRoomError
from petpipe.train.runner import store_metrics

CPU = make_runtime("cpu", "fp32")
FASTAI_AUGMENT = fastai_augment()
SHAPES = ((16, 16), (16, 27), (31, 16), (20, 17), (17, 40))  # (width, height): square, tall and wide images


@pytest.fixture(scope="module")
def mixed_store(tmp_path_factory):
    """A presized store (at 12 px) of square, tall and wide images: 33 train and 12 valid."""
    root = tmp_path_factory.mktemp("mixed") / "ds"
    rng = np.random.default_rng(0)
    for name in COLORS:
        for split, count in (("train", 11), ("valid", 4)):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                width, height = SHAPES[(i + len(name)) % len(SHAPES)]
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                Image.fromarray(pixels, "RGB").save(root / split / name / f"{i}.png")
    return write_presized(root, root.parent / "store", size=12)


@pytest.fixture(scope="module")
def reduced_store(mixed_store):
    """The same images presized to 40 px: training at 10 px reads them at 1/2 (``decode_reduction``)."""
    return write_presized(mixed_store.parent / "ds", mixed_store.parent / "store40", size=40)


def loaders(store_dir, store_on_device, *, batch_size=8, seed=0, augment=FASTAI_AUGMENT, runtime=CPU):
    return make_loaders(
        store_dir,
        runtime,
        size=10,
        batch_size=batch_size,
        num_workers=0,
        augment=augment,
        generator=torch.Generator().manual_seed(seed),
        normalization=IMAGENET,
        store_on_device=store_on_device,
    )


def epochs(loader, n=2) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    return [[(x.clone(), y.clone()) for x, y in loader] for _ in range(n)]


def assert_same_batches(got, expected):
    assert len(got) == len(expected) and len(got[0]) > 0
    for epoch_got, epoch_expected in zip(got, expected):
        assert len(epoch_got) == len(epoch_expected)
        for (x0, y0), (x1, y1) in zip(epoch_got, epoch_expected):
            assert x0.shape == x1.shape and torch.equal(x0, x1) and torch.equal(y0, y1)


def test_gathered_squares_are_the_stores_squares_byte_for_byte(mixed_store):
    store = PresizedStore(mixed_store)
    device_store = DeviceStore(store, CPU.device)
    items = np.arange(len(store))
    shapes = {(int(h) > int(w), int(h) < int(w)) for h, w in zip(store.heights, store.widths)}
    assert shapes == {(True, False), (False, True), (False, False)}  # tall, wide and square images
    # Ends, centre, random positions, and positions whose start is an exact .5 (round half to even).
    halves = [(k + 0.5) / (max(store.heights[i], store.widths[i]) - store.size or 1) for k, i in enumerate(items)]
    for positions in ([0.0] * len(items), [1.0] * len(items), [0.5] * len(items), np.random.rand(len(items)), halves):
        positions = np.clip(np.asarray(positions, dtype=np.float64), 0.0, 1.0)
        images, labels = device_store.gather(items, positions)
        expected = np.stack([store.square(int(i), float(p)) for i, p in zip(items, positions)])
        assert images.dtype == torch.uint8 and np.array_equal(images.numpy(), expected)
        assert labels.tolist() == store.labels.tolist()


@pytest.mark.parametrize("augment", [fastai_augment(), None], ids=["augmented", "plain"])
def test_train_and_valid_batches_are_the_host_loaders(mixed_store, augment):
    host_train, host_valid = loaders(mixed_store, False, augment=augment)
    store_train, store_valid = loaders(mixed_store, True, augment=augment)
    assert type(host_train) is not StoreLoader and isinstance(store_train, StoreLoader)
    assert_same_batches(epochs(store_train), epochs(host_train))  # new order, crops and augmentation each epoch
    assert_same_batches(epochs(store_valid), epochs(host_valid))
    raw_store, raw_host = list(store_train.loader), list(host_train.loader)  # the uint8 squares, untransformed
    assert all(torch.equal(a, b) and torch.equal(y, z) for (a, y), (b, z) in zip(raw_store, raw_host))


def test_a_store_read_at_a_reduction_gives_the_host_loaders_batches(reduced_store):
    """Training at a quarter of presize.size decodes at 1/2: host loader and device store alike, the same squares."""
    host_train, host_valid = loaders(reduced_store, False)
    store_train, store_valid = loaders(reduced_store, True)
    assert host_train.dataset.store.reduction == store_train.loader.device_store.store.reduction == 2
    raw_host, raw_store = list(host_train.loader), list(store_train.loader)
    assert raw_host[0][0].shape[1:] == (20, 20, 3)  # the 40 px squares, decoded at 20
    assert all(torch.equal(a, b) and torch.equal(y, z) for (a, y), (b, z) in zip(raw_store, raw_host))
    assert_same_batches(epochs(store_train), epochs(host_train))
    assert_same_batches(epochs(store_valid), epochs(host_valid))


def test_a_device_store_of_another_reduction_is_refused(reduced_store):
    """A device store decoded in full cannot serve a loader that reads the store at 1/2: one clear error."""
    full = PresizedStore(reduced_store)
    with pytest.raises(ValueError, match=r"decoded at 1/1, training at 10 px reads the store at 1/2"):
        make_loader(
            full, "valid", CPU, size=10, batch_size=8, num_workers=0, device_store=DeviceStore(full, CPU.device)
        )
    reduced = full.for_training_size(10)
    loader = make_loader(
        full, "valid", CPU, size=10, batch_size=8, num_workers=0, device_store=DeviceStore(reduced, CPU.device)
    )
    assert next(iter(loader.loader))[0].shape[1:] == (20, 20, 3)


def test_what_training_and_resume_rely_on_is_kept(mixed_store):
    host_train, host_valid = loaders(mixed_store, False, batch_size=5)
    store_train, store_valid = loaders(mixed_store, True, batch_size=5)
    for host, on_device in ((host_train, store_train), (host_valid, store_valid)):
        assert len(on_device) == len(host) and len(on_device.dataset) == len(host.dataset)
        assert np.array_equal(on_device.dataset.positions, host.dataset.positions)
        assert on_device.dataset.store.out_dir == host.dataset.store.out_dir
        assert len(on_device.generators) == len(host.generators)
        assert (on_device.size, on_device.normalization, on_device.runtime) == (host.size, host.normalization, CPU)
    assert len(store_train) == 33 // 5 and all(len(y) == 5 for _, y in store_train)  # last partial batch dropped
    assert [len(y) for _, y in store_valid] == [5, 5, 2]  # validation keeps every image
    assert store_valid.loader.device_store is store_train.loader.device_store  # one copy per stage
    # A resumed run restores the generators: the rest of the epochs come out the same.
    state = [g.get_state() for g in store_train.generators]
    first = epochs(store_train, 1)
    for generator, saved in zip(store_train.generators, state):
        generator.set_state(saved)
    assert_same_batches(epochs(store_train, 1), first)


def test_one_batch_that_holds_the_whole_split_keeps_its_partial_batch(mixed_store):
    (host, _), (on_device, _) = loaders(mixed_store, False, batch_size=40), loaders(mixed_store, True, batch_size=40)
    assert len(on_device) == len(host) == 1
    assert_same_batches(epochs(on_device), epochs(host))


def test_ddp_shards_are_the_host_loaders_per_rank(mixed_store):
    store = PresizedStore(mixed_store)
    device_store = DeviceStore(store, CPU.device)

    def train(rank, device_store=None):
        return make_loader(
            store,
            "train",
            CPU,
            size=10,
            batch_size=8,
            num_workers=0,
            augment=fastai_augment(),
            generator=torch.Generator().manual_seed(7),
            device_store=device_store,
            rank=rank,
            world=2,
        )

    items = []
    for rank in (0, 1):
        on_device, host = train(rank, device_store), train(rank)
        assert len(on_device) == len(host) == (33 // 2) // 4
        assert_same_batches(epochs(on_device), epochs(host))
        keys = next(on_device.loader.batch_keys())
        assert len(keys) == 4  # each rank takes its share of the global batch
        items.append({i for i, _ in keys})
    assert not items[0] & items[1]  # the ranks split the shuffle


def test_auto_is_the_host_loader_on_the_cpu_and_true_gathers_there(mixed_store):
    store = PresizedStore(mixed_store)
    assert not wants_device_store(store, CPU.device, "auto") and not wants_device_store(store, CPU.device, False)
    assert wants_device_store(store, CPU.device, True)
    host_train, _ = loaders(mixed_store, "auto")
    assert not isinstance(host_train, StoreLoader) and store_metrics(host_train) == {}
    store_train, _ = loaders(mixed_store, True)
    metrics = store_metrics(store_train)
    assert metrics["store_device_bytes"] == store_bytes_on_device(store) == store.decoded_bytes + 32 * len(store)
    assert 0 <= metrics["store_copy_seconds"] < 5


def test_the_device_memory_decides_auto_and_true_fails_in_one_line(mixed_store, monkeypatch, capsys):
    store = PresizedStore(mixed_store)
    needed, cuda = store_bytes_on_device(store), torch.device("cuda")
    monkeypatch.setattr("petpipe.data.device_store.free_device_bytes", lambda device: 2 * needed)
    assert wants_device_store(store, cuda, "auto") and wants_device_store(store, cuda, True)
    monkeypatch.setattr("petpipe.data.device_store.free_device_bytes", lambda device: 2 * needed - 1)
    assert not wants_device_store(store, cuda, "auto")  # more than half the free memory: the host loader
    assert "using the host loader" in capsys.readouterr().out
    assert wants_device_store(store, cuda, True)
    monkeypatch.setattr("petpipe.data.device_store.free_device_bytes", lambda device: needed - 1)
    with pytest.raises(NoRoomError) as err:
        wants_device_store(store, cuda, True)
    message = str(err.value)
    assert "\n" not in message and f"needs {needed:,} bytes" in message and "device cuda has" in message
    assert "train.store_on_device" in message and "presize.size" in message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("which", ["full", "reduced"])
def test_cuda_batches_are_the_host_loaders(mixed_store, reduced_store, which):
    store_dir = mixed_store if which == "full" else reduced_store  # reduced: decoded at 1/2 for 10 px
    cuda = make_runtime("cuda", "fp32")
    (host_train, host_valid), (store_train, store_valid) = (
        loaders(store_dir, False, runtime=cuda),
        loaders(store_dir, True, runtime=cuda),
    )
    assert isinstance(store_train, StoreLoader) and store_train.loader.device_store.pixels.is_cuda
    # Decoded on the host by the host loader's decoder, so the same bytes (nvjpeg's differed by up to 62 levels).
    assert_same_batches(epochs(store_train), epochs(host_train))
    assert_same_batches(epochs(store_valid), epochs(host_valid))


def test_the_decode_threads_give_the_stores_images_in_place(mixed_store, monkeypatch):
    """Decoded by several threads in chunks, every image lands at its offset, byte for byte the host loader's."""
    store = PresizedStore(mixed_store)
    monkeypatch.setattr("petpipe.data.device_store.DECODE_CHUNK", 2)  # several chunks for the three threads
    assert len(store) > 6
    pixels = decode_store(store, workers=3).numpy()
    offsets = decoded_offsets(store)
    for i in range(len(store)):
        height, width = int(store.heights[i]), int(store.widths[i])
        image = pixels[offsets[i] : offsets[i] + height * width * 3].reshape(height, width, 3)
        assert np.array_equal(image, store.image(i))
    assert len(pixels) == store.decoded_bytes == int(offsets[-1]) + store.image(len(store) - 1).nbytes
