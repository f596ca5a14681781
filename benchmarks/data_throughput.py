"""Does petpipe's real data path keep the train step busy? Images/s of each part, in one process.

    .venv/bin/python benchmarks/data_throughput.py --preset cpu
    .venv/bin/python benchmarks/data_throughput.py --preset cuda --json cuda.json

For each setting (dataset, arch, size, batch) it measures, on the same device and precision:

- presize  images/s of ``presize.write_store`` decoding the image files into the store (done once,
           before any epoch; all cores)
- loader   images/s of the training ``DeviceLoader`` alone, no model: slice, stack, copy to the
           device, augment, normalise; also the raw DataLoader (uint8, no copy or augmentation) and
           ``augment.train_batch`` in ms per batch. With ``--store-on-device true`` (or ``both``: side
           by side with the host loader) the store is on the device and the raw loader is the gather there
- (a)      compute limit: images/s of ``engine.train_step`` (unfrozen model, AdamW from
           ``make_optimizer``) on one fixed float batch already on the device; warm-up steps excluded;
           timed in bursts before epoch 1 and after each epoch, so (a) and (b) see the same load
- (b)      images/s of the training pass of real ``fit_one_cycle`` epochs (presized store ->
           ``make_loaders`` with augmentation on); epoch 1 is warm-up (worker start, cuDNN tuning) and
           is left out, with the burst before it, when there are two or more epochs
- (c)      images/s of ``predict`` over the validation loader
- (d)      b/a, also as the ratio of the median step times (robust where other work shares the
           machine), and peak memory (CPU: the process's max RSS so far; CUDA: max allocated)

Data: a generated Pets-like folder (JPEGs of 200-500 px, 37 breeds, ``<breed>_<n>.jpg``, labelled by
regex, 20 % valid) presized at twice the train size, and the repository's digits presized at 64.

If fastai imports, each setting is also trained with fastai (``fit_one_cycle`` from the image files:
its own decode, ``Resize`` and ``aug_transforms``) and its images/s and accuracy are printed beside
ours. fastai is not a dependency of petpipe.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
import time
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from petpipe.compute.device import Runtime, make_runtime, seed_everything
from petpipe.data.augment import AugmentParams, fastai_augment
from petpipe.data.labels import make_table
from petpipe.data.loaders import DeviceLoader, make_loaders, resolve_workers
from petpipe.data.normalization import IMAGENET
from petpipe.data.presize import default_workers, write_store
from petpipe.sources.archive import extract
from petpipe.train.engine import fit_one_cycle, make_optimizer, predict, train_step
from petpipe.train.model import build_model, layer_groups, unfreeze

DIGITS_ARCHIVE = Path(__file__).resolve().parents[1] / "assets" / "digits.tgz"
PETS_PATTERN = r"^(.+)_\d+\.jpg$"  # the lesson-1 labelling rule: breed = file name before _<n>.jpg
VALID_PCT = 0.2
PETS_VERSION = 1  # bump when the generator changes, so a kept --workdir is regenerated
# 37 breed names in the Oxford-IIIT Pet style (cats capitalised, dogs lower case), not the dataset's own list.
BREEDS = (
    "Abyssinian",
    "Balinese",
    "Bengal",
    "Burmese",
    "Chartreux",
    "Cornish_Rex",
    "Egyptian_Mau",
    "Havana_Brown",
    "Korat",
    "Manx",
    "Nebelung",
    "Ocicat",
    "Somali",
    "Tonkinese",
    "american_bulldog",
    "australian_shepherd",
    "basset_hound",
    "bearded_collie",
    "border_terrier",
    "boxer",
    "brittany_spaniel",
    "cairn_terrier",
    "dalmatian",
    "english_setter",
    "finnish_spitz",
    "german_pointer",
    "irish_wolfhound",
    "keeshond",
    "lakeland_terrier",
    "norfolk_terrier",
    "old_english_sheepdog",
    "papillon",
    "rough_collie",
    "saluki",
    "shetland_sheepdog",
    "vizsla",
    "welsh_corgi",
)


@dataclass(frozen=True)
class Setting:
    data: str  # "pets-like" or "digits"
    arch: str
    size: int  # train size; the store is presized at ``presize``
    batch_size: int
    presize: int

    @property
    def name(self) -> str:
        return f"{self.data} {self.arch} {self.size}px b{self.batch_size}"


@dataclass(frozen=True)
class Preset:
    settings: tuple[Setting, ...]
    device: str
    precision: str
    epochs: int
    images: int  # pets-like images generated


PRESETS = {
    # Few images and epochs (3 min on 2 shared cores with --threads 1, RESULTS.md);
    # resnet34 at 64 px is the lesson's model at a CPU size.
    "cpu": Preset(
        settings=(
            Setting("pets-like", "resnet34", 64, 32, 128),
            Setting("pets-like", "resnet18", 32, 64, 64),
            Setting("digits", "resnet18", 32, 64, 64),
        ),
        device="cpu",
        precision="fp32",
        epochs=3,
        images=400,
    ),
    # Lesson 1 on a GPU: resnet34 at 224 px from a 448 px store (fastai: Resize(460)).
    "cuda": Preset(
        settings=(Setting("pets-like", "resnet34", 224, 64, 448),),
        device="cuda",
        precision="bf16",
        epochs=3,
        images=2000,
    ),
}


# ---------------------------------------------------------------------------------------------
# Data


def _write_pets_image(index: int, *, root: Path, seed: int, class_colours: np.ndarray) -> None:
    """One JPEG: a smooth random field tinted with its breed's colour, plus pixel noise."""
    rng = np.random.default_rng([seed, index])  # per image: the same files whatever the worker count
    label = index % len(BREEDS)
    width, height = (int(v) for v in rng.integers(200, 501, size=2))
    coarse = rng.integers(0, 256, size=(int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    pixels = 0.5 * field + 0.5 * class_colours[label] + rng.normal(0, 12, size=field.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    image.save(root / f"{BREEDS[label]}_{index // len(BREEDS) + 1}.jpg", quality=90)


def make_pets_like(root: Path, *, images: int, seed: int) -> Path:
    """``root/images/<breed>_<n>.jpg``, generated once; a folder with the same manifest is reused."""
    manifest = {"version": PETS_VERSION, "images": images, "seed": seed}
    manifest_file = root / "manifest.json"
    if manifest_file.is_file() and json.loads(manifest_file.read_text()) == manifest:
        return root
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.jpg"):
        old.unlink()
    class_colours = np.random.default_rng(seed).integers(0, 256, size=(len(BREEDS), 3)).astype(np.float32)
    task = functools.partial(_write_pets_image, root=folder, seed=seed, class_colours=class_colours)
    started = time.perf_counter()
    with multiprocessing.Pool(default_workers()) as pool:
        pool.map(task, range(images), chunksize=16)
    manifest_file.write_text(json.dumps(manifest) + "\n")
    print(f"generated {images} pets-like JPEGs in {time.perf_counter() - started:.1f} s -> {folder}")
    return root


def extract_digits(root: Path) -> Path:
    """The repository's digits (train/valid/<digit>/*.png), extracted once."""
    if not (root / "train").is_dir():
        extract(DIGITS_ARCHIVE, root)
    return root


def build_store(dataset: Path, data: str, store_dir: Path, *, presize: int, seed: int) -> tuple[float, int, int]:
    """Label ``dataset`` as the pipeline would and presize it; returns (decode images/s, n_train, n_valid)."""
    if data == "pets-like":
        table = make_table(
            dataset,
            rule="regex",
            images_dir="images",
            pattern=PETS_PATTERN,
            match_on="name",
            csv_name=None,
            valid_pct=VALID_PCT,
            seed=seed,
            split="random",
        )
    else:
        table = make_table(
            dataset,
            rule="folder",
            images_dir=".",
            pattern=None,
            match_on="name",
            csv_name=None,
            valid_pct=VALID_PCT,
            seed=seed,
            split="folder",
        )
    items = table.indexed()
    result = write_store(dataset, items, store_dir, size=presize, workers=default_workers(), classes=table.classes)
    counts = table.counts()
    return len(items) / result.seconds, counts["n_train"], counts["n_valid"]


# ---------------------------------------------------------------------------------------------
# Measurements


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ComputeLimit:
    """(a): ``train_step`` of an unfrozen model (AdamW from ``make_optimizer``) on one fixed float batch
    already on the device. Timed in bursts between (b)'s epochs, so both see the same machine load."""

    def __init__(self, runtime: Runtime, *, arch: str, n_classes: int, size: int, batch_size: int, warmup: int):
        self.runtime, self.batch_size = runtime, batch_size
        self.step_seconds: list[list[float]] = []  # per burst, per step
        self.model = build_model(arch, n_classes)
        unfreeze(self.model)
        self.model.to(runtime.device, memory_format=runtime.memory_format).train()
        self.optimizer = make_optimizer(self.model, 0.01, layer_groups(self.model))
        for group in self.optimizer.param_groups:
            group["lr"] = 1e-4
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.needs_grad_scaler)
        self.images = torch.randn(batch_size, 3, size, size, device=runtime.device).contiguous(
            memory_format=runtime.memory_format
        )
        self.targets = torch.randint(0, n_classes, (batch_size,), device=runtime.device)
        for _ in range(warmup):  # allocator, oneDNN / cuDNN kernel choice: not part of any burst
            train_step(self.model, self.images, self.targets, self.optimizer, self.scaler, self.runtime)

    def burst(self, n: int) -> float:
        """Images/s of ``n`` steps (each ends in ``loss.item()``, a sync, as in training)."""
        times = [time.perf_counter()]
        for _ in range(n):
            train_step(self.model, self.images, self.targets, self.optimizer, self.scaler, self.runtime)
            times.append(time.perf_counter())
        self.step_seconds.append(list(np.diff(times)))
        return n * self.batch_size / (times[-1] - times[0])


class TimedBatches:
    """A training loader that records, per epoch, the time between the batches it hands out: the
    step on one batch plus making the next, the per-step cost of (b)."""

    def __init__(self, loader: DeviceLoader):
        self.loader = loader
        self.step_seconds: list[list[float]] = []  # per epoch, per step

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        times = []
        for batch in self.loader:
            times.append(time.perf_counter())
            yield batch
        times.append(time.perf_counter())  # after the last step
        self.step_seconds.append(list(np.diff(times)))


def images_per_s(batches: Iterable, device: torch.device) -> float:
    """Images/s of one pass over ``batches`` of (images, targets), doing nothing with them."""
    started, count = time.perf_counter(), 0
    for images, _ in batches:
        count += len(images)
    synchronize(device)
    return count / (time.perf_counter() - started)


def augment_ms_per_batch(loader: DeviceLoader, *, repeats: int) -> float:
    """``train_batch`` (augment + normalise, on the device) of one uint8 batch, in ms."""
    images, _ = next(iter(loader.loader))
    images = images.to(loader.runtime.device)
    loader.transform(images)  # warm-up
    synchronize(loader.runtime.device)
    started = time.perf_counter()
    for _ in range(repeats):
        loader.transform(images)
    synchronize(loader.runtime.device)
    return 1000 * (time.perf_counter() - started) / repeats


def combined_rate(rates: list[float]) -> float:
    """Images/s of several passes of equal image counts together (their harmonic mean)."""
    return len(rates) / sum(1 / r for r in rates)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def measure(
    setting: Setting,
    store_dir: Path,
    runtime: Runtime,
    *,
    epochs: int,
    lr: float,
    num_workers: int | str,
    seed: int,
    augment: AugmentParams,
    warmup: int,
    store_on_device: bool | str = False,
) -> dict[str, object]:
    """loader, (a), (b), (c) and (d) of one setting, on its presized store (``store_on_device``: as
    ``train.store_on_device``; with the store on the device the raw loader is the gather there)."""
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runtime.device)
    common = dict(
        size=setting.size,
        batch_size=setting.batch_size,
        num_workers=num_workers,
        augment=augment,
        normalization=IMAGENET,
        store_on_device=store_on_device,
    )
    train, _ = make_loaders(store_dir, runtime, generator=seed_everything(seed), **common)
    n_classes, batches_per_epoch = len(train.dataset.store.classes), len(train)
    for _ in train.loader:  # untimed: starts the worker processes, if any, and reads the store into the page cache
        pass
    loader = {
        "raw_loader_images_per_s": images_per_s(train.loader, runtime.device),
        "loader_images_per_s": images_per_s(train, runtime.device),
        "augment_ms_per_batch": augment_ms_per_batch(train, repeats=max(5, batches_per_epoch)),
        "store_copy_seconds": getattr(train, "store_copy_seconds", None),
    }
    del train  # stops its worker processes before training starts
    gc.collect()

    # (a) is timed in a burst before epoch 1 and after every epoch, each as many steps as an epoch has
    # batches: burst e-1 and burst e bracket epoch e.
    limit = ComputeLimit(
        runtime, arch=setting.arch, n_classes=n_classes, size=setting.size, batch_size=setting.batch_size, warmup=warmup
    )
    burst_steps = max(10, batches_per_epoch)
    bursts = [limit.burst(burst_steps)]
    train, valid = make_loaders(store_dir, runtime, generator=seed_everything(seed), **common)
    model = build_model(setting.arch, n_classes)
    timed = TimedBatches(train)
    lr_max = [lr] * len(layer_groups(model))  # one LR for every layer group, as fastai's fit_one_cycle(epochs, lr)
    history = fit_one_cycle(
        model,
        timed,
        valid,
        epochs=epochs,
        lr_max=lr_max,
        pct_start=0.25,
        weight_decay=0.01,
        runtime=runtime,
        on_epoch_end=lambda row: bursts.append(limit.burst(burst_steps)),
    )
    started = time.perf_counter()
    logits, _ = predict(model, valid, runtime)
    eval_rate = len(logits) / (time.perf_counter() - started)  # predict syncs: its logits come back to the CPU

    # Epoch 1 is warm-up (worker start, cuDNN autotuning, first allocations): left out from 2 epochs on.
    first = 1 if epochs > 1 else 0
    epoch_rates = [row["train_images_per_s"] for row in history]
    train_rate, compute = combined_rate(epoch_rates[first:]), combined_rate(bursts[first:])
    loader_rate = loader["loader_images_per_s"]
    # Medians of per-step times: a machine shared with other work makes some steps much slower, in (a)
    # and (b) alike; the medians compare typical steps (b's includes making its batch).
    compute_step = float(np.median([t for burst in limit.step_seconds[first:] for t in burst]))
    train_step_median = float(np.median([t for epoch in timed.step_seconds[first:] for t in epoch]))
    return loader | {
        "compute_images_per_s": compute,
        "compute_bursts_images_per_s": bursts,
        "train_images_per_s": train_rate,
        "train_images_per_s_by_epoch": epoch_rates,
        "ratio_by_epoch": [rate / combined_rate(bursts[e : e + 2]) for e, rate in enumerate(epoch_rates)],
        "eval_images_per_s": eval_rate,
        "train_over_compute": train_rate / compute,
        "compute_step_ms_median": 1000 * compute_step,
        "train_step_ms_median": 1000 * train_step_median,
        "train_over_compute_medians": compute_step / train_step_median,
        # Without loader workers the batch is made, then the step runs: b cannot beat this.
        "serial_bound_images_per_s": 1 / (1 / compute + 1 / loader_rate),
        "peak_memory_mib": peak_memory_mib(runtime.device),
        "accuracy": history[-1]["accuracy"],
    }


# ---------------------------------------------------------------------------------------------
# fastai, when installed (not a dependency; untested where it is not installed)


def measure_fastai(
    setting: Setting, dataset: Path, runtime: Runtime, *, epochs: int, lr: float, seed: int
) -> dict[str, float]:
    """The same setting trained by fastai 2.8 from the image files: its images/s (b, c) and accuracy."""
    from fastai.vision.all import (
        Callback,
        ImageDataLoaders,
        Resize,
        accuracy,
        aug_transforms,
        get_image_files,
        vision_learner,
    )

    class TrainPassTimer(Callback):
        """Seconds and images of each epoch's training pass, validation excluded (as petpipe's b)."""

        def before_fit(self):
            self.pass_seconds, self.pass_images, self.in_pass = [], [], False

        def before_train(self):
            synchronize(runtime.device)
            self.pass_started, self.pass_count, self.in_pass = time.perf_counter(), 0, True

        def after_batch(self):
            if self.in_pass:
                self.pass_count += len(self.learn.yb[0])

        def after_train(self):
            synchronize(runtime.device)
            self.pass_seconds.append(time.perf_counter() - self.pass_started)
            self.pass_images.append(self.pass_count)
            self.in_pass = False

    flip = setting.data != "digits"  # as for petpipe: a mirrored digit is another glyph
    loader_args = dict(
        item_tfms=Resize(setting.presize),
        batch_tfms=aug_transforms(size=setting.size, min_scale=0.75, do_flip=flip),
        bs=setting.batch_size,
        num_workers=0,
        device=runtime.device,
    )
    if setting.data == "pets-like":
        files = get_image_files(dataset / "images")
        dls = ImageDataLoaders.from_name_re(dataset, files, PETS_PATTERN, valid_pct=VALID_PCT, seed=seed, **loader_args)
    else:
        dls = ImageDataLoaders.from_folder(dataset, train="train", valid="valid", **loader_args)
    learn = vision_learner(dls, getattr(torchvision.models, setting.arch), pretrained=False, metrics=accuracy)
    if runtime.precision == "bf16":
        learn.to_bf16()
    elif runtime.precision == "fp16":
        learn.to_fp16()
    timer = TrainPassTimer()
    learn.fit_one_cycle(epochs, lr, cbs=[timer])
    synchronize(runtime.device)
    started = time.perf_counter()
    _, valid_accuracy = learn.validate()
    eval_seconds = time.perf_counter() - started
    epoch_rates = [n / s for n, s in zip(timer.pass_images, timer.pass_seconds)]
    return {
        "train_images_per_s": combined_rate(epoch_rates[1:] or epoch_rates),
        "train_images_per_s_by_epoch": epoch_rates,
        "eval_images_per_s": len(dls.valid_ds) / eval_seconds,
        "accuracy": float(valid_accuracy),
    }


def fastai_version() -> str | None:
    try:
        import fastai
    except ImportError:
        return None
    return fastai.__version__


# ---------------------------------------------------------------------------------------------
# Report


def machine_info(runtime: Runtime, num_workers: int) -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    except OSError:  # not Linux
        pass
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu,
        "machine": platform.machine(),
        "cores": default_workers(),
        "torch_threads": torch.get_num_threads(),
        "device": runtime.describe(),
        "gpu": torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda" else None,
        "precision": runtime.precision,
        "loader_workers": num_workers,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "fastai": fastai_version(),
        "load_average_start": os.getloadavg(),
    }


def print_report(machine: dict[str, object], rows: list[dict[str, object]]) -> None:
    memory = "peak GPU MiB" if machine["gpu"] else "peak RSS MiB"
    print()
    print(
        f"{machine['date']}  {machine['cpu']} ({machine['machine']}, {machine['cores']} cores, "
        f"{machine['torch_threads']} torch threads)"
    )
    print(
        f"device {machine['device']}; loader workers {machine['loader_workers']}; python {machine['python']}, torch "
        f"{machine['torch']}, "
        f"torchvision {machine['torchvision']}, fastai {machine['fastai'] or 'not installed'}"
    )
    print(
        f"load average (1, 5, 15 min) at start {fmt_load(machine['load_average_start'])}, at end "
        f"{fmt_load(machine['load_average_end'])}"
    )
    if machine["load_average_start"][0] > 0.5 * machine["cores"]:  # before this run loaded the machine itself
        print(
            f"WARNING: other work was keeping the {machine['cores']} cores busy: expect noisy numbers; compare the "
            "medians, rerun"
        )
    print()
    header = [
        "setting",
        "epochs",
        "train/valid",
        "presize img/s",
        "raw loader img/s",
        "loader img/s",
        "augment ms/batch",
        "(a) step img/s",
        "(b) epoch img/s",
        "(c) eval img/s",
        "(d) b/a",
        "b/a of median steps",
        memory,
        "accuracy",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        ours = row["petpipe"]
        cells = [
            row["setting"],
            row["epochs"],
            f"{row['n_train']}/{row['n_valid']}",
            f"{row['presize_images_per_s']:.0f}",
            f"{ours['raw_loader_images_per_s']:.0f}",
            f"{ours['loader_images_per_s']:.0f}",
            f"{ours['augment_ms_per_batch']:.1f}",
            f"{ours['compute_images_per_s']:.1f}",
            f"{ours['train_images_per_s']:.1f}",
            f"{ours['eval_images_per_s']:.0f}",
            f"**{ours['train_over_compute']:.2f}**",
            f"{ours['train_over_compute_medians']:.2f}",
            f"{ours['peak_memory_mib']:.0f}",
            f"{ours['accuracy']:.3f}",
        ]
        print("| " + " | ".join(str(c) for c in cells) + " |")
        if "fastai_error" in row:
            print(f"|   fastai: {row['setting']} | failed: {row['fastai_error'][:200]} |")
        if "fastai" in row:
            theirs = row["fastai"]
            cells = [
                f"  fastai: {row['setting']}",
                row["epochs"],
                "",
                "(in epoch)",
                "",
                "",
                "",
                "",
                f"{theirs['train_images_per_s']:.1f}",
                f"{theirs['eval_images_per_s']:.0f}",
                f"{theirs['train_images_per_s'] / ours['compute_images_per_s']:.2f}",
                "",
                "",
                f"{theirs['accuracy']:.3f}",
            ]
            print("| " + " | ".join(str(c) for c in cells) + " |")
    print()
    for row in rows:
        ours = row["petpipe"]
        print(
            f"{row['setting']}: (a) bursts {fmt_rates(ours['compute_bursts_images_per_s'])}; "
            f"(b) by epoch {fmt_rates(ours['train_images_per_s_by_epoch'])}; "
            f"b/a by epoch {fmt_rates(ours['ratio_by_epoch'], 2)}; b if batch making and step ran one after the other "
            f"{ours['serial_bound_images_per_s']:.1f}; median step (a) {ours['compute_step_ms_median']:.1f} ms, "
            f"(b) {ours['train_step_ms_median']:.1f} ms"
        )
    print("(a) bursts run before epoch 1 and after each epoch; a and b leave out epoch 1 (warm-up) from 2 epochs on.")
    print(
        "b/a by epoch: epoch e against the two bursts around it. b/a of median steps: median (a) step time over "
        "median (b) step"
    )
    print(
        "time (step + making the next batch), the robust figure where other work shares the machine. Peak RSS: "
        "process maximum so far."
    )


def fmt_rates(values: list[float], digits: int = 1) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def fmt_load(load: object) -> str:
    return ", ".join(f"{v:.2f}" for v in load)


# ---------------------------------------------------------------------------------------------
# Command line


def chosen_settings(args: argparse.Namespace) -> list[Setting]:
    """The preset's settings with the command line's overrides applied to every one of them."""
    settings = []
    for setting in PRESETS[args.preset].settings:
        if args.data and setting.data not in args.data.split(","):
            continue
        size = args.size or setting.size
        setting = replace(
            setting,
            arch=args.arch or setting.arch,
            size=size,
            batch_size=args.batch_size or setting.batch_size,
            presize=args.presize or (2 * size if args.size else setting.presize),
        )
        if setting not in settings:  # overrides can make two settings the same
            settings.append(setting)
    if not settings:
        raise SystemExit(f"--data {args.data!r} selects no setting of preset {args.preset}; allowed: pets-like, digits")
    return settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="cpu", help="settings, device and precision (default: cpu)"
    )
    parser.add_argument("--arch", help="override every setting's architecture (torchvision name)")
    parser.add_argument(
        "--size", type=int, help="override every setting's train size (presize becomes 2x unless --presize)"
    )
    parser.add_argument("--presize", type=int, help="override the presized store's shorter side")
    parser.add_argument("--batch-size", type=int, help="override every setting's batch size")
    parser.add_argument("--epochs", type=int, help="fit_one_cycle epochs (default: the preset's)")
    parser.add_argument("--images", type=int, help="pets-like images to generate (default: the preset's)")
    parser.add_argument("--data", help="comma-separated subset of the preset's datasets: pets-like, digits")
    parser.add_argument("--device", help="override the preset's device: auto, cuda, mps, cpu")
    parser.add_argument("--precision", help="override the preset's precision: auto, fp32, fp16, bf16")
    parser.add_argument(
        "--threads", type=int, help="torch intra-op threads (default: torch's choice, printed in the report)"
    )
    parser.add_argument("--num-workers", default="auto", help="DataLoader workers: auto (0 on the CPU) or a number")
    parser.add_argument(
        "--store-on-device",
        choices=sorted(STORE_MODES),
        default="false",
        help="train.store_on_device for every setting; 'both': each setting with the host loader, then with the "
        "store on the device (true), side by side (default: false)",
    )
    parser.add_argument(
        "--lr", type=float, default=3e-3, help="one-cycle maximum learning rate, every layer group (default 3e-3)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed train steps before (a)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--workdir", type=Path, help="keep the generated data and stores here (default: a temp folder, deleted)"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument(
        "--no-fastai", action="store_true", help="skip the fastai comparison even if fastai is installed"
    )
    return parser.parse_args(argv)


STORE_MODES = {"false": (False,), "true": (True,), "auto": ("auto",), "both": (False, True)}


def store_label(store_on_device: bool | str) -> str:
    """The suffix of a setting's row name: nothing for the host loader."""
    return {False: "", True: " [store on device]", "auto": " [store on device: auto]"}[store_on_device]


def run(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    preset = PRESETS[args.preset]
    if args.threads:
        torch.set_num_threads(args.threads)
    runtime = make_runtime(args.device or preset.device, args.precision or preset.precision)
    epochs, images = args.epochs or preset.epochs, args.images or preset.images
    num_workers = resolve_workers(args.num_workers, runtime.device)
    machine = machine_info(runtime, num_workers)
    with_fastai = machine["fastai"] is not None and not args.no_fastai
    datasets: dict[str, Path] = {}
    stores: dict[tuple[str, int], tuple[Path, float, int, int]] = {}
    rows = []
    for setting in chosen_settings(args):
        print(f"== {setting.name} (presize {setting.presize}) on {runtime.describe()}", flush=True)
        if setting.data not in datasets:
            folder = workdir / setting.data
            datasets[setting.data] = (
                make_pets_like(folder, images=images, seed=args.seed)
                if setting.data == "pets-like"
                else extract_digits(folder)
            )
        key = (setting.data, setting.presize)
        if key not in stores:
            store_dir = workdir / "stores" / f"{setting.data}-{setting.presize}"
            stores[key] = (
                store_dir,
                *build_store(datasets[setting.data], setting.data, store_dir, presize=setting.presize, seed=args.seed),
            )
        store_dir, presize_rate, n_train, n_valid = stores[key]
        augment = fastai_augment(flip=setting.data != "digits")  # a mirrored digit is another glyph (as params.yaml)
        for store_on_device in STORE_MODES[args.store_on_device]:
            ours = measure(
                setting,
                store_dir,
                runtime,
                epochs=epochs,
                lr=args.lr,
                num_workers=num_workers,
                seed=args.seed,
                augment=augment,
                warmup=args.warmup,
                store_on_device=store_on_device,
            )
            rows.append(
                {
                    "setting": setting.name + store_label(store_on_device),
                    **asdict(setting),
                    "store_on_device": store_on_device,
                    "epochs": epochs,
                    "n_train": n_train,
                    "n_valid": n_valid,
                    "presize_images_per_s": presize_rate,
                    "petpipe": ours,
                }
            )
        row = rows[-1]
        if with_fastai:
            try:
                row["fastai"] = measure_fastai(
                    setting, datasets[setting.data], runtime, epochs=epochs, lr=args.lr, seed=args.seed
                )
            except Exception as err:  # an optional, untested-here comparison must not lose petpipe's numbers
                traceback.print_exc()
                row["fastai_error"] = f"{type(err).__name__}: {err}"
    machine["load_average_end"] = os.getloadavg()
    return {"machine": machine, "results": rows}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        report = run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="petpipe-data-throughput-") as tmp:
            report = run(args, Path(tmp))
    print_report(report["machine"], report["results"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
