"""Training and evaluation loops (one code path for CPU, CUDA, MPS, fp32 and AMP) and checkpoints."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from petpipe.compute.device import Runtime
from petpipe.compute.distributed import mean_over_ranks, world_size
from petpipe.run.clock import add_phase, phase
from petpipe.run.errors import PetpipeError
from petpipe.run.files import atomic_open
from petpipe.run.signals import raise_if_stopped
from petpipe.train.model import NORM_TYPES, build_model, layer_groups
from petpipe.train.resume import ResumePoint, StateWriter, load_state, rng_states, set_rng_states
from petpipe.train.schedule import OneCycle

ADAM_BETAS = (0.9, 0.99)  # fastai's Adam defaults; beta1 is overwritten by the one-cycle momentum
ADAM_EPS = 1e-5  # fastai's Adam eps
# Devices where AdamW runs torch's fused kernel (``fused=True``): the same update in one pass over each
# parameter, faster on the CPU (benchmarks/RESULTS.md, "Fused AdamW"). CUDA and MPS keep torch's default
# (foreach) until `benchmarks/train_throughput.py --compare-adamw --check` has been run on a GPU.
FUSED_ADAMW_DEVICES = ("cpu",)
# Reading the loss back waits for the GPU; doing it every step leaves the GPU idle while the next
# batch is fetched. The running loss stays on the device and is checked every this many steps.
CHECK_EVERY = 50


class DivergedError(PetpipeError):
    """The training loss became NaN or infinite: the learning rate is too high."""


def no_decay_params(module: nn.Module) -> set[int]:
    """ids of normalisation-layer parameters and biases: fastai (``wd_bn_bias=False``) does not decay them."""
    ids = {id(p) for m in module.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}
    return ids | {id(p) for name, p in module.named_parameters() if name.endswith("bias")}


def make_optimizer(
    model: nn.Module, weight_decay: float, groups_of_params: list[list[nn.Parameter]], fused: bool | None = None
) -> torch.optim.AdamW:
    """AdamW (decoupled weight decay, as fastai's Adam) with two parameter groups per layer group.

    Each group records its ``layer_group`` so discriminative LRs can be applied per layer group.
    ``fused``: None runs torch's fused kernel where the model's device is in ``FUSED_ADAMW_DEVICES``
    (so the model must already be on its device); True or False choose (benchmarks compare them).
    """
    skip = no_decay_params(model)
    groups = []
    for index, params in enumerate(groups_of_params):
        for decay in (True, False):
            chosen = [p for p in params if (id(p) not in skip) == decay]
            if chosen:
                groups.append(
                    {"params": chosen, "lr": 0.0, "weight_decay": weight_decay if decay else 0.0, "layer_group": index}
                )
    fused = uses_fused_adamw(next(model.parameters()).device) if fused is None else fused
    return torch.optim.AdamW(groups, betas=ADAM_BETAS, eps=ADAM_EPS, fused=fused)


def uses_fused_adamw(device: torch.device) -> bool:
    """Whether ``make_optimizer`` picks torch's fused AdamW kernel on ``device``."""
    return device.type in FUSED_ADAMW_DEVICES


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load a saved optimizer state as if it had been made by ``optimizer``.

    A resume state may come from another device or an older petpipe. ``load_state_dict`` would take
    each group's kernel choice (``fused``, ``foreach``) from the file; this keeps ``optimizer``'s. And
    each moment tensor takes its parameter's memory layout (channels_last on CUDA, contiguous on the
    CPU): a fused kernel reads parameter, gradient and moments as flat arrays of one layout, so
    channels_last moments under a contiguous parameter would be updated element-for-wrong-element.
    Every tensor is copied: the optimizer steps in place, and ``saved`` is left as it was.
    """
    kernel = {"fused": optimizer.defaults.get("fused"), "foreach": optimizer.defaults.get("foreach")}
    optimizer.load_state_dict({**saved, "param_groups": [{**group, **kernel} for group in saved["param_groups"]]})
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value):
                state[key] = (
                    torch.empty_like(param, dtype=value.dtype).copy_(value)
                    if value.shape == param.shape
                    else value.clone()
                )


def per_param_group(optimizer: torch.optim.Optimizer, per_layer_group: list[float]) -> list[float]:
    """Expand one value per layer group to one per optimizer parameter group."""
    return [per_layer_group[g.get("layer_group", i)] for i, g in enumerate(optimizer.param_groups)]


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    runtime: Runtime,
) -> torch.Tensor:
    """Forward under autocast, scaled backward, one optimizer step; returns the loss (on the device, no sync)."""
    raise_if_stopped()
    with runtime.autocast():
        loss = nn.functional.cross_entropy(
            model(images.to(runtime.device, non_blocking=True)), targets.to(runtime.device, non_blocking=True)
        )
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    schedule: OneCycle,
    scaler: torch.amp.GradScaler,
    runtime: Runtime,
    desc: str = "train",
) -> tuple[float, int]:
    """One pass over ``loader``; returns the mean training loss and the number of images."""
    model.train()
    total, count = torch.zeros((), device=runtime.device, dtype=torch.float64), 0
    for step, (images, targets) in enumerate(tqdm(loader, desc=desc, leave=False, mininterval=1.0), 1):
        schedule.apply()
        total += train_step(model, images, targets, optimizer, scaler, runtime).double() * len(targets)
        count += len(targets)
        if step % CHECK_EVERY == 0:
            check_finite(total.item(), schedule.step_num)
        schedule.step()
    mean = total.item() / max(count, 1)  # waits for the last step: the epoch's work is done
    check_finite(mean, schedule.step_num)
    return mean, count


def check_finite(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise DivergedError(f"training loss became {loss} by step {step}: lower the learning rate")


@torch.no_grad()
def predict(
    model: nn.Module, loader: DataLoader, runtime: Runtime, desc: str = "predict"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, on the CPU) and targets for every item of ``loader``, in order."""
    model.eval()
    logits, targets = [], []
    for images, target in tqdm(loader, desc=desc, leave=False, mininterval=1.0):
        raise_if_stopped()
        with runtime.autocast():
            out = model(images.to(runtime.device, non_blocking=True))
        logits.append(out.float().cpu())
        targets.append(target.cpu())
    return torch.cat(logits), torch.cat(targets)


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Mean cross-entropy, accuracy and error rate: the metrics every stage reports."""
    accuracy = (logits.argmax(1) == targets).float().mean().item()
    return {
        "valid_loss": nn.functional.cross_entropy(logits, targets).item(),
        "accuracy": accuracy,
        "error_rate": 1.0 - accuracy,
    }


def evaluate(model: nn.Module, loader: DataLoader, runtime: Runtime) -> dict[str, float]:
    return classification_metrics(*predict(model, loader, runtime, desc="valid"))


def fit_one_cycle(
    model: nn.Sequential,
    train_loader: DataLoader,
    valid_loader: DataLoader,
    *,
    epochs: int,
    lr_max: list[float],
    pct_start: float,
    weight_decay: float,
    runtime: Runtime,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
    resume: ResumePoint | None = None,
    on_resume: Callable[[int], None] | None = None,
    compile: bool = False,
    on_compiled: Callable[[float], None] | None = None,
) -> list[dict[str, float]]:
    """fastai's ``fit_one_cycle``: one cycle over all epochs; returns the per-epoch metrics.

    With ``resume``, the whole training state is saved after every epoch, and a saved state made
    from the same params and inputs is continued from (its epochs are not trained again). With
    ``compile``, the training and evaluation loops run the ``torch.compile``d model, compiled before the
    first epoch (``on_compiled(seconds)``); ``model`` itself stays uncompiled (checkpoints, state dicts).
    The stage's phases get ``fit_setup`` (all before the first epoch), ``epochs`` (each epoch's training and
    validation passes) and ``resume_save``.
    """
    setup_started = time.perf_counter()
    model.to(runtime.device, memory_format=runtime.memory_format)
    optimizer = make_optimizer(model, weight_decay, layer_groups(model))
    schedule = OneCycle(
        optimizer, per_param_group(optimizer, lr_max), total_steps=epochs * len(train_loader), pct_start=pct_start
    )
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.needs_grad_scaler)
    generators = getattr(train_loader, "generators", ())
    history: list[dict[str, float]] = []
    saved = load_state(resume) if resume else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        load_optimizer_state(optimizer, saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        schedule.step_num = saved["step_num"]
        history = saved["history"]
        set_rng_states(saved["rng"], generators)
        print(f"resume: continuing after epoch {len(history)} of {epochs} ({resume.path})", flush=True)
        if on_resume:
            on_resume(len(history))
        for row in history:  # the epochs done before the interruption, reported again for the new run's records
            if on_epoch_end:
                on_epoch_end(row)
    # Several torchrun processes: gradients are averaged across them by DistributedDataParallel.
    net = (
        model
        if world_size() == 1
        else DistributedDataParallel(
            model,
            device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
            find_unused_parameters=getattr(
                model, "has_unused_parameters", False
            ),  # timm heads that forward_features skips
        )
    )
    eval_net = model
    if compile:
        net, eval_net = torch.compile(net), torch.compile(model)
        seconds = compile_now(net, eval_net, model, example_batch(train_loader, runtime), runtime)
        print(f"compile: {seconds:.1f} s (torch.compile, mode default)", flush=True)
        if on_compiled:
            on_compiled(seconds)
    add_phase("fit_setup", time.perf_counter() - setup_started)
    writer = StateWriter(resume) if resume else None
    try:
        for epoch in range(len(history), epochs):
            started = time.perf_counter()
            train_loss, images = train_one_epoch(
                net, train_loader, optimizer, schedule, scaler, runtime, desc=f"epoch {epoch + 1}/{epochs}"
            )
            train_seconds = (
                time.perf_counter() - started
            )  # train_one_epoch ends by reading the summed loss: the work is done
            train_loss, images = mean_over_ranks(train_loss, runtime.device), images * world_size()
            row = {"epoch": epoch + 1, "train_loss": train_loss, **evaluate(eval_net, valid_loader, runtime)}
            # Throughput: the whole epoch (training pass and validation), and training images per second.
            row |= {"epoch_seconds": time.perf_counter() - started, "train_images_per_s": images / train_seconds}
            history.append(row)
            add_phase("epochs", row["epoch_seconds"])
            print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
            # The state after every epoch but the last (the stage writes its outputs next, then drops the state),
            # written while the next epoch trains.
            if writer is not None and epoch + 1 < epochs:
                with phase("resume_save"):
                    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
                    writer.save(
                        {**state, "scaler": scaler.state_dict(), "step_num": schedule.step_num, "history": history}
                        | {"rng": rng_states(generators)}
                    )
            if on_epoch_end:
                on_epoch_end(row)
        if writer is not None:
            with phase("resume_save"):
                writer.wait()
    finally:
        if writer is not None:
            writer.join()  # stopped mid-epoch: the last finished epoch's state is on disk before the stage exits
    return history


def example_batch(loader: DataLoader, runtime: Runtime) -> torch.Tensor:
    """Zeros shaped like ``loader``'s training batches, on the device: what the graphs are compiled for."""
    return torch.zeros(loader.batch_shape, device=runtime.device).contiguous(memory_format=runtime.memory_format)


def compile_now(
    net: nn.Module, eval_net: nn.Module, model: nn.Module, example: torch.Tensor, runtime: Runtime
) -> float:
    """Run the compiled training step's forward and backward, and an evaluation forward, on ``example``, so that
    compiling happens here and not inside the first epoch; returns the seconds it took.

    Nothing of the model's state changes: the gradients are dropped, the norm layers' running statistics and
    the random generators (dropout) are restored. Another shape later (a last partial batch) compiles again.
    """
    started = time.perf_counter()
    buffers = {name: value.clone() for name, value in model.named_buffers()}
    rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if runtime.device.type == "cuda" else None
    net.train()
    with runtime.autocast():
        out = net(example)
    out.float().sum().backward()
    model.zero_grad(set_to_none=True)
    eval_net.eval()
    with torch.no_grad(), runtime.autocast():
        eval_net(example)
    with torch.no_grad():
        for name, value in model.named_buffers():
            value.copy_(buffers[name])
    torch.random.set_rng_state(rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)
    return time.perf_counter() - started


def save_checkpoint(path: Path, model: nn.Module, *, meta: dict[str, Any]) -> None:
    """Weights (on the CPU) and what is needed to rebuild the model: arch, classes, size."""
    state = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "meta": meta}
    with atomic_open(path, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Checkpoint dict (loaded on the CPU); the error names the file if it is missing or broken."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PetpipeError(f"checkpoint {path} does not exist: run the stage that writes it (dvc repro)") from None
    except Exception as err:
        raise PetpipeError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); re-run the stage that writes it"
        ) from None


def restore(checkpoint: Path, *, initialise: bool = False) -> tuple[nn.Sequential, dict[str, Any]]:
    """Model rebuilt from a petpipe checkpoint (architecture from its metadata, weights from it).

    ``initialise``: build it with the architecture's random initialisation first, as training does, so the
    global random stream advances as it always has (lr_find and finetune keep their dropout draws). Else
    (prediction: the report, the logged models) it is built without initialising, on the meta device, and takes
    the checkpoint's tensors: several times faster (benchmarks/RESULTS.md, "Model-stage ceremony").
    """
    state = load_checkpoint(checkpoint)
    meta = state["meta"]
    model = None if initialise else _assigned(meta, state["model"])
    if model is None:
        model = build_model(meta["arch"], len(meta["classes"]), weights="none")
        model.load_state_dict(state["model"])
    return model, meta


def _assigned(meta: dict[str, Any], weights: dict[str, torch.Tensor]) -> nn.Sequential | None:
    """The model built on the meta device with ``weights`` assigned; None where an architecture does not allow it
    (a constructor that reads a tensor's value, a buffer not in the state dict): then build it as usual."""
    try:
        with torch.device("meta"):
            model = build_model(meta["arch"], len(meta["classes"]), weights="none")
    except Exception:  # NotImplementedError, RuntimeError ...: whatever meta tensors cannot do
        return None
    model.load_state_dict(weights, assign=True)  # strict: a checkpoint of another shape fails as before
    tensors = itertools.chain(model.parameters(), model.buffers())
    return None if any(t.is_meta for t in tensors) else model
