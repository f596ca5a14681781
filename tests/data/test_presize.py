import csv
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from small_disk import SmallDisk

from petpipe.data import presize
from petpipe.data.presize import PresizedStore, PresizeError, decode_presized, presized_pixels, write_store
from petpipe.run.errors import DiskFullError, NoRoomError

RED, GREEN, BLUE = (220, 30, 30), (30, 200, 40), (40, 60, 220)
ORIENTATION = 0x0112  # EXIF tag


def bands(colors: list[tuple[int, int, int]], band: int, short: int, vertical: bool = False) -> Image.Image:
    """Solid colour bands of ``band`` pixels along the long side (left to right, or top to bottom)."""
    pixels = np.concatenate([np.full((short, band, 3), c, np.uint8) for c in colors], axis=1)
    return Image.fromarray(pixels.transpose(1, 0, 2).copy() if vertical else pixels)


def noisy(seed: int, width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def near(pixel: np.ndarray, color: tuple[int, ...], tol: int = 30) -> bool:
    return bool(np.abs(pixel.astype(int) - np.array(color)).max() <= tol)


def truncated_jpeg(path: Path) -> Path:
    noisy(7, 40, 30).save(path, "JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, list[tuple[str, int, str]]]:
    """Images of several shapes and modes, one truncated JPEG, one text file named .jpg."""
    root = tmp_path / "ds"
    (root / "img").mkdir(parents=True)
    bands([RED, BLUE], 20, 30).save(root / "img/wide.png")  # 40x30
    bands([RED, BLUE], 20, 30, vertical=True).save(root / "img/tall.png")  # 30x40
    noisy(1, 48, 32).save(root / "img/noisy.jpg", quality=90)
    truncated_jpeg(root / "img/cut.jpg")
    (root / "img/text.jpg").write_text("not an image\n")
    noisy(2, 24, 36).save(root / "img/noisy2.jpg")
    items = [
        ("img/wide.png", 0, "train"),
        ("img/cut.jpg", 1, "train"),
        ("img/tall.png", 1, "valid"),
        ("img/noisy.jpg", 2, "train"),
        ("img/text.jpg", 0, "valid"),
        ("img/noisy2.jpg", 2, "valid"),
    ]
    return root, items


def store_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_store_round_trips_labels_splits_paths_and_pixels(dataset, tmp_path):
    root, items = dataset
    result = write_store(root, items, tmp_path / "store", size=16, workers=1, progress=False)
    assert (result.n_images, result.n_skipped) == (4, 2)
    store = PresizedStore(tmp_path / "store")
    assert store.size == 16 and len(store) == 4
    assert store.paths == [
        "img/wide.png",
        "img/tall.png",
        "img/noisy.jpg",
        "img/noisy2.jpg",
    ]  # input order, minus skipped
    assert store.labels.tolist() == [0, 1, 2, 2]
    assert store.indices("train").tolist() == [0, 2] and store.indices("valid").tolist() == [1, 3]
    for i, path in enumerate(store.paths):
        exact = decode_presized(root / path, 16)
        assert np.array_equal(store.image(i), presized_pixels(root / path, 16))  # what serving computes
        assert np.abs(store.image(i).astype(int) - exact).mean() < 12  # the JPEG's error; the noise images' is most
    assert result.bytes == os.path.getsize(tmp_path / "store/images.jpg") == int(store.lengths.sum())
    assert result.decoded_bytes == store.decoded_bytes == sum(store.image(i).nbytes for i in range(4))
    meta = json.loads((tmp_path / "store/store.json").read_text())
    assert (meta["size"], meta["n_images"], meta["n_train"], meta["n_valid"], meta["n_skipped"]) == (16, 4, 2, 2, 2)
    with pytest.raises(PresizeError, match="'test'.*train, valid"):
        store.indices("test")


def test_broken_files_are_skipped_with_a_reason(dataset, tmp_path):
    root, items = dataset
    result = write_store(root, items, tmp_path / "store", size=16, workers=1, progress=False)
    reasons = dict(result.skipped)
    assert reasons["img/cut.jpg"].startswith("truncated or corrupt image: image file is truncated")
    assert reasons["img/text.jpg"].startswith("not an image: ") and "img/text.jpg" in reasons["img/text.jpg"]
    assert str(tmp_path) not in reasons["img/text.jpg"]  # absolute paths would break reproducibility
    with open(tmp_path / "store/skipped.csv", newline="") as f:
        assert list(csv.reader(f)) == [["path", "reason"], *map(list, result.skipped)]
    assert not {"img/cut.jpg", "img/text.jpg"} & set(PresizedStore(tmp_path / "store").paths)


def test_shorter_side_is_size_and_aspect_is_kept(dataset):
    root, _ = dataset
    wide, tall = decode_presized(root / "img/wide.png", 16), decode_presized(root / "img/tall.png", 16)
    assert wide.shape == (16, 21, 3) and tall.shape == (21, 16, 3)  # 40x30 -> round(40 * 16 / 30) = 21
    assert wide.dtype == np.uint8 and wide.flags.c_contiguous
    assert near(wide[8, 2], RED) and near(wide[8, -3], BLUE)  # the halves stay where they were
    assert near(tall[2, 8], RED) and near(tall[-3, 8], BLUE)
    assert decode_presized(root / "img/wide.png", 60).shape == (60, 80, 3)  # small images are enlarged


@pytest.mark.parametrize(
    "mode, value, expected",
    [
        ("RGBA", (10, 200, 30, 128), (10, 200, 30)),
        ("L", 100, (100, 100, 100)),
        ("P", 1, BLUE),
        ("LA", (50, 255), (50, 50, 50)),
    ],
)
def test_modes_are_stored_as_rgb(tmp_path, mode, value, expected):
    img = Image.new(mode, (20, 24), value)
    if mode == "P":
        img.putpalette([*RED, *BLUE] + [0] * 762)
    img.save(tmp_path / "x.png")
    pixels = decode_presized(tmp_path / "x.png", 16)
    assert pixels.shape == (19, 16, 3) and near(pixels[5, 5], expected, tol=0)


def test_content_is_sniffed_not_the_suffix(tmp_path):
    bands([RED, BLUE], 20, 30).save(tmp_path / "really_a.png.jpg", "PNG")
    bands([GREEN], 20, 30).save(tmp_path / "really_a.gif.jpg", "GIF")
    assert near(decode_presized(tmp_path / "really_a.png.jpg", 16)[8, 2], RED, tol=0)
    assert near(decode_presized(tmp_path / "really_a.gif.jpg", 16)[8, 8], GREEN, tol=10)


@pytest.mark.parametrize("orientation, red_corner", [(6, (0, -1)), (8, (-1, 0))])
def test_exif_orientation_is_applied(tmp_path, orientation, red_corner):
    """Stored 40x20 with a red top-left quadrant; 6 = rotate 90 degrees clockwise to view, 8 = anticlockwise."""
    pixels = np.full((20, 40, 3), BLUE, np.uint8)
    pixels[:10, :20] = RED
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(pixels).save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    out = decode_presized(tmp_path / "rot.jpg", 16)
    assert out.shape == (32, 16, 3)  # portrait now: 20x40 viewed, shorter side 16
    row, col = red_corner
    assert near(out[2 if row == 0 else -3, 2 if col == 0 else -3], RED)
    assert near(out[2 if row != 0 else -3, 2 if col != 0 else -3], BLUE)  # the opposite corner


def test_square_crops_along_the_long_side(tmp_path):
    bands([RED, GREEN, BLUE], 16, 16).save(tmp_path / "wide.png")  # 48x16: already at size 16
    bands([RED, GREEN, BLUE], 16, 16, vertical=True).save(tmp_path / "tall.png")
    items = [("wide.png", 0, "train"), ("tall.png", 1, "valid")]
    write_store(tmp_path, items, tmp_path / "store", size=16, workers=1, progress=False)
    store = PresizedStore(tmp_path / "store")
    inner = (slice(4, 12), slice(4, 12))  # away from the bands' edges, which the JPEG's 4:2:0 colour blurs
    for i in (0, 1):
        crops = {pos: store.square(i, pos) for pos in (0.0, 0.5, 1.0)}
        assert all(crop.shape == (16, 16, 3) for crop in crops.values())
        for pos, color in zip(crops, (RED, GREEN, BLUE)):
            assert near(crops[pos][inner], color, tol=12), (i, pos)
            assert np.array_equal(crops[pos], presize.square_of(store.image(i), 16, pos))
    quarter = store.square(0, 0.25)  # offset 8: half red, half green
    assert near(quarter[4:12, 1:5], RED, tol=12) and near(quarter[4:12, 11:15], GREEN, tol=12)
    with pytest.raises(ValueError, match="position"):
        store.square(0, 1.5)


def test_output_is_byte_reproducible_and_independent_of_workers(dataset, tmp_path):
    root, items = dataset
    for name, workers in (("a", 1), ("b", 1), ("c", 2)):
        write_store(root, items, tmp_path / name, size=16, workers=workers, progress=False)
    first = store_files(tmp_path / "a")
    assert sorted(first) == ["images.jpg", "index.npy", "paths.json", "skipped.csv", "store.json"]
    assert store_files(tmp_path / "b") == first and store_files(tmp_path / "c") == first
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "c", "ds"]  # no staging folders left


def test_an_interrupted_run_keeps_the_old_store_and_no_staging(dataset, tmp_path, monkeypatch):
    root, items = dataset
    write_store(root, items[:1], tmp_path / "store", size=16, workers=1, progress=False)
    before = store_files(tmp_path / "store")
    calls = []

    def interrupted(path, size):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return np.zeros((size, size, 3), np.uint8)

    monkeypatch.setattr(presize, "decode_presized", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_store(root, items, tmp_path / "store", size=16, workers=1, progress=False)
    assert store_files(tmp_path / "store") == before and sorted(os.listdir(tmp_path)) == ["ds", "store"]


def test_bad_inputs_raise_presize_errors(dataset, tmp_path):
    root, items = dataset
    broken = [item for item in items if item[0] in ("img/cut.jpg", "img/text.jpg")]
    with pytest.raises(PresizeError, match=r"none of the 2 images.*img/cut.jpg: truncated or corrupt"):
        write_store(root, broken, tmp_path / "store", size=16, workers=1, progress=False)
    assert not (tmp_path / "store").exists()
    with pytest.raises(PresizeError, match="'test'.*allowed: train, valid"):
        write_store(root, [("img/wide.png", 0, "test")], tmp_path / "store", size=16, workers=1, progress=False)
    with pytest.raises(PresizeError, match="presize.size: 0"):
        write_store(root, items, tmp_path / "store", size=0, workers=1, progress=False)


def test_a_missing_or_foreign_store_names_the_fix(tmp_path):
    with pytest.raises(PresizeError, match=r"nowhere.*dvc repro presize"):
        PresizedStore(tmp_path / "nowhere")
    (tmp_path / "other").mkdir()
    (tmp_path / "other/store.json").write_text('{"format": "something-else"}\n')
    with pytest.raises(PresizeError, match=r"something-else.*dvc repro presize"):
        PresizedStore(tmp_path / "other")


def test_store_pickles_without_its_memory_map(dataset, tmp_path):
    root, items = dataset
    write_store(root, items, tmp_path / "store", size=16, workers=1, progress=False)
    store = PresizedStore(tmp_path / "store")
    expected = store.square(2, 0.5).copy()  # maps images.jpg
    assert store._encoded is not None
    clone = pickle.loads(pickle.dumps(store))
    assert clone._encoded is None  # the map is not copied into the pickle; the clone maps the file itself
    assert np.array_equal(clone.square(2, 0.5), expected) and clone.paths == store.paths


def test_default_workers_are_the_cpus_this_process_may_use(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    assert presize.default_workers() == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(), raising=False)
    assert presize.default_workers() == 1


FULL = "no space left on device while writing it; free space on its disk and run the stage again"


def decodable(items):
    return [item for item in items if item[0] not in ("img/cut.jpg", "img/text.jpg")]


def test_the_store_size_from_the_headers_is_exact_for_pixels_and_bounds_the_store(dataset, tmp_path):
    root, items = dataset
    pixels = np.zeros((20, 40, 3), np.uint8)
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # viewed 20x40: rotated, the same area
    Image.fromarray(pixels).save(root / "img/rot.jpg", exif=exif.tobytes())
    items = decodable(items) + [("img/rot.jpg", 0, "train")]
    paths = [path for path, _, _ in items]
    pixel_bytes = sum(presize._stored_bytes(path, root=root, size=16) for path in paths)
    result = write_store(root, items, tmp_path / "store", size=16, workers=1, classes=["a", "b", "c"], progress=False)
    assert pixel_bytes == result.decoded_bytes == 3 * (21 * 16 + 16 * 21 + 24 * 16 + 16 * 24 + 32 * 16)
    written = sum(p.stat().st_size for p in (tmp_path / "store").iterdir())
    bound = presize.store_bytes(pixel_bytes, paths, ["a", "b", "c"])
    assert written < bound < written + pixel_bytes - result.bytes + 70 * 1024  # the JPEGs take less than the pixels
    assert presize._stored_bytes("img/text.jpg", root=root, size=16) == 0  # skipped by the decode: no room


def test_a_store_larger_than_its_disks_free_space_stops_before_any_decoding(dataset, tmp_path, monkeypatch):
    root, items = dataset
    out = tmp_path / "disk/store"
    write_store(root, items[:1], out, size=16, workers=1, progress=False)
    before = store_files(out)
    SmallDisk(tmp_path / "disk", fills_after=10**12, free=40_000).install(monkeypatch)
    monkeypatch.setattr(presize, "decode_presized", lambda path, size: pytest.fail("decoded before the check"))
    with pytest.raises(NoRoomError) as caught:
        write_store(root, items, out, size=64, workers=1, progress=False)
    pixels = 3 * 64 * (85 + 85 + 96 + 85 + 96)  # cut.jpg's header reads: it counts
    needed = presize.store_bytes(pixels, [path for path, _, _ in items], [])
    assert str(caught.value) == (
        f"presize: the store {out} at presize.size 64 needs {needed:,} bytes ({needed / 2**20:.1f} MiB) "
        "but its disk has "
        "40,000 bytes (0.0 MiB) free; free space on it, lower presize.size (the store grows with its square), "
        "or move the DVC cache to another disk (dvc cache dir PATH)"
    )
    assert store_files(out) == before and os.listdir(tmp_path / "disk") == ["store"]  # no staging folder


@pytest.mark.parametrize("named", ["images.jpg", "index.npy", "paths.json"])  # in the order they are written
def test_a_disk_that_fills_anyway_names_the_file_and_keeps_the_old_store(dataset, tmp_path, monkeypatch, named):
    root, items = dataset
    write_store(root, items, tmp_path / "reference", size=16, workers=1, progress=False)
    sizes = {name: (tmp_path / "reference" / name).stat().st_size for name in ("images.jpg", "index.npy")}
    fills_after = {  # bytes written before the disk is full: in the middle of the named file
        "images.jpg": sizes["images.jpg"] // 2,
        "index.npy": sizes["images.jpg"] + sizes["index.npy"] // 2,
        "paths.json": sizes["images.jpg"] + sizes["index.npy"] + 20,
    }[named]
    monkeypatch.chdir(tmp_path)
    out = Path("disk/store")  # relative, as dvc.yaml gives it
    write_store(root, items[:1], out, size=16, workers=1, progress=False)
    before = store_files(out)
    SmallDisk(tmp_path / "disk", fills_after=fills_after, free=10**12).install(monkeypatch)  # the check passes
    with pytest.raises(DiskFullError) as caught:
        write_store(root, items, out, size=16, workers=1, progress=False)
    assert str(caught.value) == f"{out / named}: {FULL}"
    assert store_files(out) == before and os.listdir(tmp_path / "disk") == ["store"]


def test_without_torchvisions_decoder_pillow_gives_the_same_pixels(dataset, tmp_path, monkeypatch):
    """torchvision deprecated its decoders (0.29): where one no longer decodes, Pillow's libjpeg-turbo stands in."""
    root, items = dataset
    write_store(root, items, tmp_path / "store", size=16, workers=1, progress=False)
    store = PresizedStore(tmp_path / "store")
    assert presize.torchvision_decoder() is not None  # this venv's torchvision decodes
    with_torchvision = [store.image(i) for i in range(len(store))]
    monkeypatch.setattr(presize, "torchvision_decoder", lambda: None)
    for i, expected in enumerate(with_torchvision):
        assert np.array_equal(store.image(i), expected)


@pytest.mark.parametrize(
    "presize_size, train_size, reduction",
    [(460, 224, 1), (460, 128, 1), (64, 32, 1), (460, 115, 2), (460, 58, 2), (460, 57, 4), (460, 32, 4), (512, 32, 8)],
)
def test_the_decode_reduction_keeps_twice_the_training_size(presize_size, train_size, reduction):
    """The largest of 1/2, 1/4, 1/8 whose square is still 2x the training size (fastai's 460 for 224); else 1."""
    assert presize.decode_reduction(presize_size, train_size) == reduction
    assert presize.reduced(presize_size, reduction) >= 2 * train_size or reduction == 1
    if reduction < 8:
        assert presize.reduced(presize_size, 2 * reduction) < 2 * train_size


def test_a_store_read_for_a_small_training_size_decodes_each_image_averaged_at_its_reduction(tmp_path):
    """At 1/k every side is rounded up, as libjpeg's, and each pixel is about the mean of the full decode's k x k
    block: the same picture, not an aliased sample of it."""
    root = tmp_path / "ds"
    (root / "img").mkdir(parents=True)
    shapes = [(61, 45), (45, 70), (50, 50)]  # wide, tall, square: sides that 4 does not divide once presized
    for n, (width, height) in enumerate(shapes):
        smooth = np.asarray(noisy(n, width // 8 + 1, height // 8 + 1).resize((width, height), Image.Resampling.BICUBIC))
        Image.fromarray(smooth).save(root / f"img/{n}.png")
    items = [(f"img/{n}.png", 0, "train") for n in range(len(shapes))]
    write_store(root, items, tmp_path / "store", size=45, workers=1, progress=False)
    full = PresizedStore(tmp_path / "store")
    assert full.for_training_size(20) is full  # 45 / 2 = 23 < 40: the full decode
    read = full.for_training_size(5)
    assert read.reduction == 4 and read.square_size == 12 and full.reduction == 1  # ceil(45 / 4); the store keeps 1
    for i in range(len(read)):
        image, whole = read.image(i), full.image(i)
        assert (
            image.shape == (-(-whole.shape[0] // 4), -(-whole.shape[1] // 4), 3) == (read.heights[i], read.widths[i], 3)
        )
        blocks = whole[: whole.shape[0] // 4 * 4, : whole.shape[1] // 4 * 4].astype(float)
        means = blocks.reshape(blocks.shape[0] // 4, 4, blocks.shape[1] // 4, 4, 3).mean(axis=(1, 3))
        assert np.abs(image[: means.shape[0], : means.shape[1]] - means).mean() < 4
        assert read.square(i, 0.5).shape == (12, 12, 3)
    assert read.decoded_bytes == sum(read.image(i).nbytes for i in range(len(read)))
    assert np.array_equal(read.stored_heights, full.heights)  # the index is read as written
