import copy
import os
import signal

import pytest
import torch
from torch import nn

from petpipe.compute.device import Runtime, make_runtime, seed_everything
from petpipe.data.loaders import make_loaders
from petpipe.data.normalization import IMAGENET
from petpipe.run.errors import PetpipeError
from petpipe.run.signals import stop_on_signals
from petpipe.train.engine import (
    ADAM_BETAS,
    ADAM_EPS,
    DivergedError,
    evaluate,
    fit_one_cycle,
    load_checkpoint,
    load_optimizer_state,
    make_optimizer,
    restore,
    save_checkpoint,
)
from petpipe.train.model import build_model, freeze_body, layer_groups, unfreeze
from petpipe.train.resume import ResumePoint, StateWriter, load_state


@pytest.fixture(scope="module")
def loaders(presized_store):
    generator = seed_everything(0)
    # No augmentation: these tests are about the loop (tests/data/test_loaders.py covers the augmented loader).
    return make_loaders(
        presized_store,
        make_runtime("cpu", "fp32"),
        size=16,
        batch_size=8,
        num_workers=0,
        augment=None,
        generator=generator,
        normalization=IMAGENET,
    )


def test_frozen_then_unfrozen_training_learns_colours(presized_store):
    # Batches of 4: enough steps for BatchNorm's running statistics (momentum 0.1) to leave their
    # initial values, which eval mode uses.
    train, valid = make_loaders(
        presized_store,
        make_runtime("cpu", "fp32"),
        size=16,
        batch_size=4,
        num_workers=0,
        augment=None,
        generator=seed_everything(0),
        normalization=IMAGENET,
    )
    runtime = make_runtime("cpu", "fp32")
    seed_everything(0)
    model = build_model("resnet18", 3)
    before = evaluate(model, valid, runtime)
    freeze_body(model)
    body_conv = model[0][0].weight.detach().clone()
    seen = []
    bn_before = model[0][1].weight.detach().clone()
    history = fit_one_cycle(
        model,
        train,
        valid,
        epochs=3,
        lr_max=[1e-2] * 3,
        pct_start=0.25,
        weight_decay=0.01,
        runtime=runtime,
        on_epoch_end=seen.append,
    )
    assert torch.equal(model[0][0].weight, body_conv)  # frozen convolution untouched
    assert not torch.equal(model[0][1].weight, bn_before)  # body BatchNorm trains (fastai train_bn)
    assert [row["epoch"] for row in history] == [1, 2, 3] and seen == history
    trained_images = len(train) * 4  # 36 images in batches of 4
    for row in history:  # the epoch (training pass + validation) outlasts the training pass alone
        assert row["epoch_seconds"] > trained_images / row["train_images_per_s"] > 0
    unfreeze(model)
    history2 = fit_one_cycle(
        model, train, valid, epochs=2, lr_max=[1e-5, 1e-4, 1e-3], pct_start=0.25, weight_decay=0.01, runtime=runtime
    )
    assert not torch.equal(model[0][0].weight, body_conv)
    assert history2[-1]["accuracy"] >= 0.9 > before["accuracy"]
    assert history2[-1]["error_rate"] == pytest.approx(1 - history2[-1]["accuracy"])


def tiny_model(n_classes: int = 3) -> nn.Sequential:
    """A body of one conv block and fastai's head: small enough to compile in seconds on the CPU."""
    from petpipe.train.model import PetpipeModel, create_head

    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    return PetpipeModel(body, create_head(8, n_classes), None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_amp_runs_the_same_loop_on_cpu(loaders, dtype):
    """The autocast + GradScaler path (fp16 scales the loss) exercised without a GPU."""
    train, valid = loaders
    runtime = Runtime(torch.device("cpu"), dtype)
    assert runtime.needs_grad_scaler == (dtype == torch.float16)
    # The path, not the network's size, is under test: reduced-precision convolutions are slow on the CPU
    # (resnet18 took ~28 s per dtype here).
    model = tiny_model()
    seen_dtypes = set()
    model[0][0].register_forward_hook(lambda module, inputs, output: seen_dtypes.add(output.dtype))
    head_before = model[1][-1].weight.detach().clone()
    # fp16: GradScaler starts at 2**16 and skips the steps whose scaled gradients overflow, halving
    # the scale each time, so give it enough steps to get going.
    history = fit_one_cycle(
        model, train, valid, epochs=2, lr_max=[1e-3] * 2, pct_start=0.25, weight_decay=0.0, runtime=runtime
    )
    assert dtype in seen_dtypes  # the forward pass really ran in reduced precision
    assert all(
        torch.isfinite(torch.tensor(row["valid_loss"])) for row in history
    )  # evaluation does not raise on NaN: check it
    assert not torch.equal(model[1][-1].weight, head_before) and model[1][-1].weight.dtype == torch.float32


def test_optimizer_skips_weight_decay_on_batchnorm_and_bias():
    model = build_model("resnet18", 3)
    optimizer = make_optimizer(model, 0.01, layer_groups(model))
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model[0][0].weight) in decayed and id(model[1][4].weight) in decayed
    assert id(model[0][1].weight) not in decayed and id(model[1][2].bias) not in decayed
    assert sorted({g["layer_group"] for g in optimizer.param_groups}) == [0, 1, 2]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_the_fused_optimizer_makes_the_same_updates_as_torchs_one_op_at_a_time_adamw():
    torch.manual_seed(0)
    model = build_model("resnet18", 3).eval()  # no dropout: both models see the same forward pass
    reference = copy.deepcopy(model)
    optimizer = make_optimizer(model, 0.1, layer_groups(model))  # decay large enough to show if it were left out
    assert optimizer.defaults["fused"]  # the CPU runs the fused kernel
    assert {(g["betas"], g["eps"]) for g in optimizer.param_groups} == {
        (ADAM_BETAS, ADAM_EPS)
    }  # fastai's, before the schedule moves beta1
    twin = dict(zip(map(id, model.parameters()), reference.parameters(), strict=True))
    groups = [
        {"params": [twin[id(p)] for p in g["params"]], "weight_decay": g["weight_decay"]}
        for g in optimizer.param_groups
    ]
    slow = torch.optim.AdamW(groups, betas=ADAM_BETAS, eps=ADAM_EPS, foreach=False, fused=False)
    images, targets = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    for lr in (1e-3, 3e-3, 1e-2):  # the one-cycle schedule changes lr and beta1 between steps
        for opt, net in ((optimizer, model), (slow, reference)):
            for group in opt.param_groups:
                group["lr"], group["betas"] = lr, (0.95 - lr, ADAM_BETAS[1])
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(images), targets).backward()
            opt.step()
    for (name, fast), one_op in zip(model.named_parameters(), reference.parameters(), strict=True):
        # Rounding differs (one fused pass against a dozen ops): 1.6e-6 at most here, where the steps
        # move weights by up to 3e-2 and the decay alone by 3e-4 x the weight.
        torch.testing.assert_close(fast, one_op, rtol=0, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_a_state_saved_in_another_layout_and_kernel_resumes_with_this_optimizers_kernel_and_the_same_update():
    torch.manual_seed(0)
    images, targets = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))

    def step(model, optimizer):
        for group in optimizer.param_groups:
            group["lr"] = 1e-2
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), targets).backward()
        optimizer.step()

    # Saved as on CUDA: channels_last weights and moments, torch's default kernel.
    saved_model = build_model("resnet18", 3).eval().to(memory_format=torch.channels_last)
    saved_optimizer = make_optimizer(saved_model, 0.1, layer_groups(saved_model), fused=False)
    step(saved_model, saved_optimizer)
    saved = copy.deepcopy(saved_optimizer.state_dict())
    resumed = []
    for fused in (
        True,
        False,
    ):  # resumed as on the CPU: contiguous weights; the fused kernel, and the default one as the reference
        model = build_model("resnet18", 3).eval()
        model.load_state_dict({k: v.contiguous() for k, v in saved_model.state_dict().items()})
        optimizer = make_optimizer(model, 0.1, layer_groups(model), fused=fused)
        load_optimizer_state(optimizer, saved)
        assert all(group["fused"] is fused for group in optimizer.param_groups)  # not the file's choice
        step(model, optimizer)
        resumed.append(model)
    for (name, fast), default in zip(resumed[0].named_parameters(), resumed[1].parameters(), strict=True):
        torch.testing.assert_close(fast, default, rtol=0, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_divergence_is_reported(loaders):
    train, valid = loaders
    model = build_model("resnet18", 3)
    with pytest.raises(DivergedError, match="lower the learning rate"):
        fit_one_cycle(
            model,
            train,
            valid,
            epochs=2,
            lr_max=[1e12] * 3,
            pct_start=0.0,
            weight_decay=0.0,
            runtime=make_runtime("cpu", "fp32"),
        )


class _SignalsItselfWhenCollected:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(1000))  # the handler runs here, in a finaliser, where Python prints its exception and goes on


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed exception, on purpose
def test_a_stop_signal_swallowed_by_a_finaliser_stops_the_next_batch(loaders):
    # The CI failure: SIGTERM landed in SQLAlchemy's cleanup and train_frozen trained to the end.
    train, valid = loaders
    model = build_model("resnet18", 3)
    runtime = make_runtime("cpu", "fp32")
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals():
        _SignalsItselfWhenCollected()  # no KeyboardInterrupt reaches this frame
        with pytest.raises(KeyboardInterrupt, match="signal 15"):
            fit_one_cycle(
                model, train, valid, epochs=1, lr_max=[1e-3] * 3, pct_start=0.25, weight_decay=0.0, runtime=runtime
            )
        with pytest.raises(KeyboardInterrupt, match="signal 15"):
            evaluate(model, valid, runtime)
    with stop_on_signals():  # a new stage starts with no stop pending
        evaluate(model, valid, runtime)
    assert signal.getsignal(signal.SIGTERM) is before


def test_checkpoint_round_trip_and_errors(tmp_path):
    model = build_model("resnet18", 3)
    path = tmp_path / "models" / "stage1.pt"
    save_checkpoint(path, model, meta={"arch": "resnet18", "classes": ["a", "b", "c"]})
    state = load_checkpoint(path)
    assert state["meta"]["classes"] == ["a", "b", "c"]
    clone = build_model("resnet18", 3)
    clone.load_state_dict(state["model"])
    assert all(torch.equal(a, b) for a, b in zip(clone.state_dict().values(), model.state_dict().values()))
    assert [p.name for p in path.parent.iterdir()] == ["stage1.pt"]  # no temp file left
    with pytest.raises(PetpipeError, match="does not exist: run the stage"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "broken.pt").write_bytes(b"garbage")
    with pytest.raises(PetpipeError, match="cannot be read"):
        load_checkpoint(tmp_path / "broken.pt")


def test_compile_trains_the_same_model_and_times_the_compile_apart(loaders, request):
    """train.compile: the compiled loops give the eager results (within float rounding), the compile time is
    reported apart from the epochs, and the model keeps its own (uncompiled) state-dict keys."""
    import torch._inductor.config

    # Inductor draws dropout masks with its own generator; eager's masks make the two runs comparable. (Not
    # monkeypatch: torch's config module would lose the key when monkeypatch deletes what it did not find.)
    patch = torch._inductor.config.patch(fallback_random=True)
    patch.__enter__()
    request.addfinalizer(lambda: patch.__exit__(None, None, None))
    train, valid = loaders
    runtime = make_runtime("cpu", "fp32")
    results, compiled_seconds = {}, []
    for compile in (False, True):
        model = tiny_model()
        generators = [torch.Generator().manual_seed(0) for _ in train.generators]
        for g, fresh in zip(train.generators, generators):
            g.set_state(fresh.get_state())  # the same shuffle and crops for both runs
        torch.manual_seed(1)  # dropout
        history = fit_one_cycle(
            model, train, valid, epochs=2, lr_max=[1e-2, 1e-2], pct_start=0.25, weight_decay=0.01, runtime=runtime,
            compile=compile, on_compiled=compiled_seconds.append,
        )  # fmt: skip
        results[compile] = (history, model.state_dict())
    (eager, eager_state), (compiled, compiled_state) = results[False], results[True]
    assert len(compiled_seconds) == 1 and compiled_seconds[0] > 0
    assert list(compiled_state) == list(eager_state) and not any("_orig_mod" in k for k in compiled_state)
    for a, b in zip(eager, compiled):
        for key in ("train_loss", "valid_loss", "accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-4), (key, a, b)
    for key in eager_state:
        torch.testing.assert_close(compiled_state[key], eager_state[key], rtol=1e-3, atol=1e-4)


# timm's convnext reads tensor values while it is built: restored the usual way, with the same result.
@pytest.mark.parametrize("arch", ["resnet18", "timm/convnext_atto"])
def test_restore_for_prediction_skips_the_initialisation_and_gives_the_same_model(arch, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "final.pt"
    save_checkpoint(path, build_model(arch, 3).eval(), meta={"arch": arch, "classes": ["a", "b", "c"], "size": 16})
    before = torch.get_rng_state()
    fast, meta = restore(path)
    if arch == "resnet18":
        assert torch.equal(torch.get_rng_state(), before)  # built on the meta device: no random init drawn
    initialised, _ = restore(path, initialise=True)
    assert not torch.equal(torch.get_rng_state(), before)  # lr_find and finetune: the stream advances as it always did
    assert meta["classes"] == ["a", "b", "c"] and type(fast) is type(initialised)
    assert not any(t.is_meta for t in [*fast.parameters(), *fast.buffers()])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fast.eval()(x), initialised.eval()(x))
    assert [p.requires_grad for p in fast.parameters()] == [p.requires_grad for p in initialised.parameters()]


def test_the_resume_writer_saves_a_snapshot_in_the_background_and_hands_errors_back(tmp_path):
    point = ResumePoint(tmp_path / "resume" / "stage.pt", {"params": {}})
    weights = torch.zeros(3)
    writer = StateWriter(point)
    writer.save({"model": {"w": weights}, "history": [{"epoch": 1}]})
    weights += 1  # training goes on in place while the file is written
    writer.wait()
    assert torch.equal(load_state(point)["model"]["w"], torch.zeros(3))
    (tmp_path / "blocked").write_text("")
    writer = StateWriter(ResumePoint(tmp_path / "blocked" / "stage.pt", {}))  # its folder cannot be made
    writer.save({"model": {}})
    writer.join()  # a stopping stage only waits
    with pytest.raises(OSError):
        writer.wait()  # the training thread gets the write's error
    writer.wait()  # once
