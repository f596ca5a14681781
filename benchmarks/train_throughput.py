"""Training throughput of petpipe's own train step, per precision, on the chosen device.

    .venv/bin/python benchmarks/train_throughput.py --arch resnet34 --size 224 --batch-size 64

Runs ``petpipe.train.engine.train_step`` (autocast + GradScaler, the code the pipeline uses) on
synthetic batches already on the device, so it measures the model's forward/backward/step, not
JPEG decoding. Prints images/s per precision, the ratio to the first, and peak GPU memory.

``--check`` first runs, per precision, the rest of the device path the pipeline uses: one
``fit_one_cycle`` epoch (one-cycle schedule, pinned non-blocking batches, evaluate) on a small
synthetic loader, asserting a finite loss and changed weights, then a checkpoint saved from the
device and loaded back. On a GPU this is the prepared check of the CUDA and AMP paths; on a CPU
keep it small (resnet18, 64 px).

``--compare-adamw`` also times, per precision, torch's fused AdamW kernel against its default one
(in alternating bursts) and prints the speed-up and which one the pipeline uses on this device
(``engine.FUSED_ADAMW_DEVICES``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from petpipe.compute.device import Runtime, pick_device, pick_precision, seed_everything
from petpipe.data.augment import fastai_augment
from petpipe.data.loaders import make_loaders
from petpipe.data.normalization import IMAGENET
from petpipe.data.presize import write_store
from petpipe.train.engine import (
    fit_one_cycle,
    load_checkpoint,
    make_optimizer,
    save_checkpoint,
    train_step,
    uses_fused_adamw,
)
from petpipe.train.model import build_model, layer_groups


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stepper:
    """A model, its optimizer (AdamW as the pipeline makes it, or with ``fused`` True or False the
    chosen kernel) and one synthetic batch on the device, ready for timed ``train_step`` calls."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        arch: str,
        size: int,
        batch_size: int,
        classes: int,
        fused: bool | None = None,
        compile: bool = False,
    ):
        seed_everything(0)
        self.runtime, self.batch_size = runtime, batch_size
        self.model = build_model(arch, classes).to(runtime.device).train()
        self.optimizer = make_optimizer(self.model, 0.01, layer_groups(self.model), fused=fused)
        for group in self.optimizer.param_groups:
            group["lr"] = 1e-4
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.needs_grad_scaler)
        self.images = torch.randn(batch_size, 3, size, size, device=runtime.device)
        self.targets = torch.randint(0, classes, (batch_size,), device=runtime.device)
        self.net = torch.compile(self.model) if compile else self.model  # the first step compiles

    def seconds(self, steps: int) -> float:
        """Wall time of ``steps`` train steps, the device's queue drained at both ends."""
        synchronize(self.runtime.device)
        start = time.perf_counter()
        for _ in range(steps):
            train_step(self.net, self.images, self.targets, self.optimizer, self.scaler, self.runtime)
        synchronize(self.runtime.device)
        return time.perf_counter() - start


def measure(
    runtime: Runtime, *, arch: str, size: int, batch_size: int, steps: int, warmup: int, classes: int
) -> dict[str, float]:
    stepper = Stepper(runtime, arch=arch, size=size, batch_size=batch_size, classes=classes)
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runtime.device)
    stepper.seconds(warmup)
    seconds = stepper.seconds(steps)
    peak = torch.cuda.max_memory_allocated(runtime.device) / 2**30 if runtime.device.type == "cuda" else float("nan")
    return {"images_per_s": steps * batch_size / seconds, "step_ms": 1000 * seconds / steps, "peak_gib": peak}


def compare_adamw(
    runtime: Runtime, *, arch: str, size: int, batch_size: int, steps: int, warmup: int, classes: int, rounds: int = 6
) -> str:
    """torch's fused AdamW kernel against its default one: bursts of ``steps`` alternate between the
    two ``rounds`` times (so both see the same machine load); median ms per step of each."""
    steppers = {
        fused: Stepper(runtime, arch=arch, size=size, batch_size=batch_size, classes=classes, fused=fused)
        for fused in (True, False)
    }
    per_step: dict[bool, list[float]] = {fused: [] for fused in steppers}
    for stepper in steppers.values():
        stepper.seconds(warmup)
    for _ in range(rounds):
        for fused, stepper in steppers.items():
            per_step[fused].append(stepper.seconds(steps) / steps)
    fused, default = (statistics.median(per_step[k]) for k in (True, False))
    used = "fused" if uses_fused_adamw(runtime.device) else "default"
    return (
        f"AdamW fused kernel {1000 * fused:.1f} ms/step ({batch_size / fused:.1f} images/s), "
        f"default kernel {1000 * default:.1f} ms/step ({batch_size / default:.1f} images/s): fused "
        f"x{default / fused:.2f}; "
        f"the pipeline uses the {used} kernel on {runtime.device.type}"
    )


def compare_compile(
    runtime: Runtime, *, arch: str, size: int, batch_size: int, steps: int, warmup: int, classes: int, rounds: int = 4
) -> str:
    """``train.compile``: the compile time (the first compiled step), then eager and compiled bursts alternating
    ``rounds`` times; median ms per step of each, and the steps after which compiling has paid for itself."""
    eager = Stepper(runtime, arch=arch, size=size, batch_size=batch_size, classes=classes)
    compiled = Stepper(runtime, arch=arch, size=size, batch_size=batch_size, classes=classes, compile=True)
    compile_seconds = compiled.seconds(1)
    per_step: dict[str, list[float]] = {"eager": [], "compiled": []}
    for stepper in (eager, compiled):
        stepper.seconds(warmup)
    for _ in range(rounds):
        for name, stepper in (("eager", eager), ("compiled", compiled)):
            per_step[name].append(stepper.seconds(steps) / steps)
    eager_s, compiled_s = (statistics.median(per_step[k]) for k in ("eager", "compiled"))
    saved = eager_s - compiled_s
    pays = f"pays off after {compile_seconds / saved:.0f} steps" if saved > 0 else "never pays off here"
    return (
        f"torch.compile: {compile_seconds:.1f} s for the first step; eager {1000 * eager_s:.1f} ms/step, compiled "
        f"{1000 * compiled_s:.1f} ms/step: x{eager_s / compiled_s:.2f}; {pays}"
    )


def synthetic_store(out_dir: Path, *, n: int, size: int, classes: int) -> Path:
    """A presized store of ``n`` random 4:3 images (the real data path: pinned uint8 batches, augmentation on the
    device)."""
    root = out_dir.parent / "images"
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size * 4 // 3, 3), dtype=np.uint8)).save(root / f"{i}.png")
        items.append((f"{i}.png", i % classes, "train" if i % 5 else "valid"))
    write_store(root, items, out_dir, size=size, workers=1, classes=[str(c) for c in range(classes)], progress=False)
    return out_dir


def check(runtime: Runtime, *, arch: str, size: int, batch_size: int, classes: int, checkpoint: Path) -> None:
    """One real epoch through the pipeline's loop on this device and precision; raises on failure."""
    seed_everything(0)
    model = build_model(arch, classes)
    head_before = model[1][-1].weight.detach().clone()
    store = synthetic_store(checkpoint.parent / "presized", n=8 * batch_size, size=size, classes=classes)
    train, valid = make_loaders(
        store,
        runtime,
        size=size,
        batch_size=batch_size,
        num_workers="auto",
        augment=fastai_augment(),
        generator=seed_everything(0),
        normalization=IMAGENET,
    )
    history = fit_one_cycle(
        model, train, valid, epochs=1, lr_max=[1e-4, 1e-3, 1e-2], pct_start=0.25, weight_decay=0.01, runtime=runtime
    )
    assert math.isfinite(history[0]["train_loss"]) and math.isfinite(history[0]["valid_loss"]), history
    assert not torch.equal(model[1][-1].weight.detach().cpu(), head_before), (
        "no optimizer step was taken (all skipped?)"
    )
    save_checkpoint(checkpoint, model, meta={"arch": arch})
    restored = build_model(arch, classes)
    restored.load_state_dict(load_checkpoint(checkpoint)["model"])
    assert torch.equal(restored[1][-1].weight, model[1][-1].weight.detach().cpu())
    print(
        f"  check {runtime.precision}: fit_one_cycle epoch ok (train_loss {history[0]['train_loss']:.3f}), checkpoint "
        "round trip ok"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--classes", type=int, default=37)
    parser.add_argument("--device", default="auto", help="auto | cuda | mps | cpu")
    parser.add_argument("--precisions", default="fp32,auto", help="comma-separated: fp32, fp16, bf16, auto")
    parser.add_argument(
        "--check", action="store_true", help="first run one real epoch and a checkpoint round trip per precision"
    )
    parser.add_argument(
        "--compare-adamw",
        action="store_true",
        help="also time torch's fused AdamW kernel against its default one, per precision",
    )
    parser.add_argument(
        "--compare-compile", action="store_true", help="also time torch.compile (train.compile) against eager"
    )
    args = parser.parse_args()

    device = pick_device(args.device)
    print(
        f"{args.arch} {args.size}px batch {args.batch_size}, {args.steps} timed steps on {device}"
        + (
            f" ({torch.cuda.get_device_name(device)})"
            if device.type == "cuda"
            else f" ({torch.get_num_threads()} threads)"
        )
    )
    baseline = None
    common = dict(
        arch=args.arch,
        size=args.size,
        batch_size=args.batch_size,
        steps=args.steps,
        warmup=args.warmup,
        classes=args.classes,
    )
    for name in args.precisions.split(","):
        runtime = Runtime(device, pick_precision(name, device))
        if args.check:
            with tempfile.TemporaryDirectory() as tmp:
                check(
                    runtime,
                    arch=args.arch,
                    size=args.size,
                    batch_size=args.batch_size,
                    classes=args.classes,
                    checkpoint=Path(tmp) / "c.pt",
                )
        result = measure(runtime, **common)
        baseline = baseline or result["images_per_s"]
        print(
            f"  {name:>5} -> {runtime.precision:>4}: {result['images_per_s']:8.1f} images/s  {result['step_ms']:8.1f} "
            "ms/step  "
            f"x{result['images_per_s'] / baseline:.2f} vs first  peak {result['peak_gib']:.2f} GiB"
        )
        if args.compare_compile:
            print("         " + compare_compile(runtime, **common))
        if args.compare_adamw:
            print("         " + compare_adamw(runtime, **common))


if __name__ == "__main__":
    main()
