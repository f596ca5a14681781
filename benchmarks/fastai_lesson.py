"""fastai's lesson 1 on the generated Pets-like images of lesson_pipeline.py: seconds per phase, side by side.

The same archive (``lesson_pipeline.lesson_archive``: the same function, variant and bytes; ``--archive`` shares the
folder with a lesson_pipeline.py run), extracted, and the same recipe as the pets profile (read from
profiles/pets.yaml with the variant's overrides, as lesson_pipeline.py does):

    dls = ImageDataLoaders.from_name_re(path, files, r"^(.+)_\\d+\\.jpg$", valid_pct=0.2, seed=42, bs=64,
                                        item_tfms=Resize(460), batch_tfms=aug_transforms(size=224, min_scale=0.75))
    learn = vision_learner(dls, resnet34, metrics=error_rate, pretrained=False).to_bf16()
    learn.fit_one_cycle(4, 1e-3)                                  # frozen: the head (and BatchNorm)
    learn.save("stage-1"); learn.unfreeze(); learn.lr_find(num_it=100)
    learn.fit_one_cycle(2, lr_max=slice(1e-6, 1e-4))
    interp = ClassificationInterpretation.from_learner(learn); interp.top_losses(9); interp.most_confused(min_val=2)

``pretrained=False``: no weights download (the pipeline runs with ``train.weights: none`` too). Each phase is timed,
the import of ``fastai.vision.all`` included, and the epochs (training + validation pass, as ``epoch_seconds`` in our
curves) by a callback, so that "non-epoch seconds" mean the same as in lesson_pipeline.py. Where fastai is not
importable it prints why and exits 0 (fastai is not a petpipe dependency; the GPU machine gets it as a wheel, see
device_wheels.sh).

    python benchmarks/fastai_lesson.py                       # 7,390 images, resnet34 at 224 px: for a GPU
    python benchmarks/fastai_lesson.py --dry-run             # 60 tiny images, resnet18 at 32 px, 1 + 1 epochs
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lesson_pipeline import LABEL_PATTERN, ROOT, VARIANTS, extract_images, lesson_archive, lesson_params  # noqa: E402


class Phases:
    """Seconds per named phase, in order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


def recipe(params: dict) -> dict:
    """The fastai arguments of the pets profile (with a variant's overrides)."""
    train = params["train"]
    return {
        "presize": params["presize"]["size"],
        "size": train["size"],
        "batch_size": train["batch_size"],
        "arch": train["arch"],
        "min_scale": train["augment"]["min_scale"],
        "valid_pct": params["labels"]["valid_pct"],
        "seed": params["seed"],
        "frozen_epochs": params["train_frozen"]["epochs"],
        "frozen_lr": params["train_frozen"]["lr"],
        "lr_find_iterations": params["lr_find"]["num_it"],
        "finetune_epochs": params["finetune"]["epochs"],
        "finetune_lr": params["finetune"]["max_lr"],
        "top_losses": params["report"]["top_losses"],
        "most_confused_min": params["report"]["most_confused_min"],
    }


def run_lesson(images: Path, r: dict, *, precision: str, num_workers: int | None, phases: Phases) -> dict:
    with phases("import fastai.vision.all"):
        import fastai.vision.all as fv
        import torch
        import torchvision
    device = "cuda" if torch.cuda.is_available() else "cpu"

    class EpochClock(fv.Callback):
        """Seconds of each epoch's training and validation pass (our curves' ``epoch_seconds``), while ``on``: the
        fit_one_cycle epochs, not lr_find's (the pipeline's lr_find writes no curves either)."""

        order = 0

        def __init__(self) -> None:
            self.epochs: list[float] = []
            self.on = False

        def before_epoch(self) -> None:
            self.started = time.perf_counter()

        def after_epoch(self) -> None:
            if self.on:
                self.epochs.append(time.perf_counter() - self.started)

    fv.set_seed(r["seed"], reproducible=False)
    with phases("data loaders"):
        files = fv.get_image_files(images)
        workers = {} if num_workers is None else {"num_workers": num_workers}
        dls = fv.ImageDataLoaders.from_name_re(
            images, files, LABEL_PATTERN, valid_pct=r["valid_pct"], seed=r["seed"], item_tfms=fv.Resize(r["presize"]),
            batch_tfms=fv.aug_transforms(size=r["size"], min_scale=r["min_scale"]), bs=r["batch_size"], **workers,
        )  # fmt: skip
    with phases("learner"):
        timm = r["arch"].startswith("timm/")  # vision_learner takes a timm model by name
        arch = r["arch"].removeprefix("timm/") if timm else getattr(torchvision.models, r["arch"])
        learn = fv.vision_learner(dls, arch, metrics=fv.error_rate, pretrained=False, cbs=EpochClock())
        if precision == "bf16" or (precision == "auto" and device == "cuda"):
            learn = learn.to_bf16()
        elif precision == "fp16":
            learn = learn.to_fp16()
    clock = learn.epoch_clock
    with learn.no_bar():  # fastai's epoch table stays; its progress bars would fill the results' tail
        clock.on = True
        with phases(f"frozen: fit_one_cycle({r['frozen_epochs']})"):
            learn.fit_one_cycle(r["frozen_epochs"], r["frozen_lr"])
        clock.on = False
        with phases("save stage-1"):
            learn.save("stage-1")
        with phases(f"lr_find ({r['lr_find_iterations']} iterations)"):
            learn.unfreeze()
            suggested = learn.lr_find(num_it=r["lr_find_iterations"], show_plot=False)
        lo, hi = r["finetune_lr"]
        clock.on = True
        with phases(f"unfrozen: fit_one_cycle({r['finetune_epochs']}, slice({lo:g}, {hi:g}))"):
            learn.fit_one_cycle(r["finetune_epochs"], lr_max=slice(lo, hi))
        clock.on = False
        with phases("interpretation"):
            interp = fv.ClassificationInterpretation.from_learner(learn)
            interp.top_losses(r["top_losses"])
            confused = interp.most_confused(min_val=r["most_confused_min"])
    error_rate = float(learn.recorder.values[-1][-1])
    return {
        "device": device, "epochs_s": sum(clock.epochs), "epoch_seconds": clock.epochs, "accuracy": 1 - error_rate,
        "lr_find_valley": float(getattr(suggested, "valley", float("nan"))), "most_confused": len(confused),
        "train_images": len(dls.train_ds), "valid_images": len(dls.valid_ds),
    }  # fmt: skip


def report(title: str, phases: dict[str, float], result: dict) -> str:
    total = sum(phases.values())
    lines = [f"### {title}", "", "| phase | seconds |", "| --- | --- |"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in phases.items()]
    lines += [
        f"| all phases | {total:.1f} |",
        "",
        f"Inside epochs {result['epochs_s']:.1f} s ({', '.join(f'{s:.1f}' for s in result['epoch_seconds'])}); "
        f"non-epoch {total - result['epochs_s']:.1f} s; accuracy {result['accuracy']:.4f} "
        f"({result['train_images']} train, {result['valid_images']} valid images, {result['device']}).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="lesson_pipeline.py's --cpu recipe (resnet18 at 32 px)")
    parser.add_argument("--dry-run", action="store_true", help="lesson_pipeline.py's dry-run data and recipe")
    parser.add_argument("--archive", type=Path, help="folder that keeps the generated archive (default: scratch)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="auto: bf16 on CUDA, fp32 elsewhere (as petpipe's precision: auto)")  # fmt: skip
    parser.add_argument("--num-workers", type=int, help="DataLoader workers (default: fastai's, 0 on a dry run)")
    parser.add_argument("--out", type=Path, help="append the markdown table to this file")
    parser.add_argument("--json", type=Path, help="write the phases and results to this JSON file")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        import fastai  # noqa: F401  (the full import is timed as a phase below)
    except ImportError as err:
        print(f"fastai is not importable here ({err}): the fastai side-by-side is skipped. On the GPU machine it comes "
              "from the wheels of benchmarks/device_wheels.sh; here: pip install -e '.[bench]'.")  # fmt: skip
        return 0
    phases = Phases()
    phases.seconds["import fastai"] = time.perf_counter() - started
    key = {(False, False): "lesson", (True, False): "cpu", (False, True): "dry", (True, True): "cpu-dry"}
    variant = VARIANTS[key[args.cpu, args.dry_run]]
    r = recipe(lesson_params(ROOT, variant))
    workers = args.num_workers if args.num_workers is not None else (0 if args.dry_run else None)
    with tempfile.TemporaryDirectory(prefix="petpipe-fastai-") as tmp:
        scratch = Path(tmp)
        with phases("generate the archive (once; shared)"):
            archive = lesson_archive(args.archive or scratch / "archive", variant)
        with phases("extract"):
            images = extract_images(archive, scratch / "data")
        # learn.save and lr_find write under the images' folder: the scratch folder
        result = run_lesson(images, r, precision=args.precision, num_workers=workers, phases=phases)
    title = (
        f"fastai {sys.modules['fastai'].__version__}, lesson 1 ({variant.name}), {variant.images} generated images, "
        f"{r['arch']} at {r['size']} px, Resize({r['presize']}), bs {r['batch_size']}, {args.precision}"
    )
    text = report(title, phases.seconds, result)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
    if args.json:
        args.json.write_text(json.dumps({"title": title, "phases": phases.seconds, **result}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
