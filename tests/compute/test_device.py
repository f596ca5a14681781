import pytest
import torch

from petpipe.compute.device import loader_seed, make_runtime, pick_device, pick_precision, seed_everything
from petpipe.run.errors import PetpipeError


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    # Only the availability probes are replaced: pick_device builds a torch.device, never uses it.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert pick_device("auto") == torch.device(expected)


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="needs a CPU-only machine")
def test_unavailable_device_is_a_clear_error():
    with pytest.raises(PetpipeError, match="device: 'cuda' was requested but is not available here; usable: auto, cpu"):
        pick_device("cuda")


def test_precision_choices_on_cpu():
    cpu = torch.device("cpu")
    assert pick_precision("auto", cpu) is None and pick_precision("fp32", cpu) is None
    assert pick_precision("bf16", cpu) == torch.bfloat16
    with pytest.raises(PetpipeError, match="precision: 'fp16' needs a cuda or mps device"):
        pick_precision("fp16", cpu)
    runtime = make_runtime("cpu", "bf16")
    assert runtime.precision == "bf16" and not runtime.needs_grad_scaler


def test_shuffle_stream_is_seeded_but_not_the_global_stream():
    g = seed_everything(5)
    shuffle = torch.randperm(50, generator=g)
    global_draw = torch.randperm(50)
    assert not torch.equal(shuffle, global_draw)
    assert torch.equal(torch.randperm(50, generator=seed_everything(5)), shuffle)
    assert loader_seed(5) != 5 and loader_seed(5) == loader_seed(5)
