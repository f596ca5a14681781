import math

import pytest
import torch

from petpipe.train.schedule import (
    DIV,
    DIV_FINAL,
    OneCycle,
    discriminative_lrs,
    even_mults,
    exp_lr,
    one_cycle_lr,
    one_cycle_mom,
    sched_cos,
)


def test_sched_cos_is_half_a_cosine():
    assert sched_cos(1.0, 3.0, 0.0) == pytest.approx(1.0)
    assert sched_cos(1.0, 3.0, 0.5) == pytest.approx(2.0)
    assert sched_cos(1.0, 3.0, 1.0) == pytest.approx(3.0)
    # fastai's formula: start + (1 + cos(pi * (1 - pos))) * (end - start) / 2
    assert sched_cos(0.2, 0.9, 0.3) == pytest.approx(0.2 + (1 + math.cos(math.pi * 0.7)) * 0.7 / 2)


def test_one_cycle_lr_matches_fastai_defaults():
    lr_max, pct = 1e-3, 0.25
    assert one_cycle_lr(0.0, lr_max, pct) == pytest.approx(lr_max / 25)
    assert one_cycle_lr(pct, lr_max, pct) == pytest.approx(lr_max)
    assert one_cycle_lr(1.0, lr_max, pct) == pytest.approx(lr_max / 1e5)
    assert (DIV, DIV_FINAL) == (25.0, 1e5)
    # middle of the warm-up: halfway between lr_max/25 and lr_max
    assert one_cycle_lr(pct / 2, lr_max, pct) == pytest.approx((lr_max / 25 + lr_max) / 2)


def test_one_cycle_momentum_goes_down_and_back():
    assert one_cycle_mom(0.0, 0.25) == pytest.approx(0.95)
    assert one_cycle_mom(0.25, 0.25) == pytest.approx(0.85)
    assert one_cycle_mom(1.0, 0.25) == pytest.approx(0.95)


def test_pct_start_zero_anneals_from_the_peak():
    assert one_cycle_lr(0.0, 1.0, 0.0) == pytest.approx(1.0)


def test_even_mults_and_slice_semantics():
    assert even_mults(1e-6, 1e-4, 3) == pytest.approx([1e-6, 1e-5, 1e-4])
    assert discriminative_lrs(1e-6, 1e-4, 3) == pytest.approx([1e-6, 1e-5, 1e-4])
    assert even_mults(1e-3, 1e-3, 1) == [1e-3]


def test_exp_lr_grows_exponentially():
    assert exp_lr(0.0, 1e-7, 10) == pytest.approx(1e-7)
    assert exp_lr(0.5, 1e-7, 10) == pytest.approx(math.sqrt(1e-7 * 10))
    assert exp_lr(1.0, 1e-7, 10) == pytest.approx(10)


def test_one_cycle_drives_a_real_optimizer():
    weights = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    opt = torch.optim.AdamW([{"params": [w]} for w in weights], lr=0.0)
    sched = OneCycle(opt, [1e-5, 1e-4, 1e-3], total_steps=100, pct_start=0.25)
    seen = []
    for _ in range(100):
        sched.apply()
        seen.append([g["lr"] for g in opt.param_groups])
        sched.step()
    assert seen[0] == pytest.approx([1e-5 / 25, 1e-4 / 25, 1e-3 / 25])
    assert seen[25] == pytest.approx([1e-5, 1e-4, 1e-3])
    assert max(s[2] for s in seen) == pytest.approx(1e-3)
    assert seen[-1][2] == pytest.approx(one_cycle_lr(0.99, 1e-3, 0.25)) and seen[-1][2] < 1e-5
    assert opt.param_groups[0]["betas"][0] == pytest.approx(one_cycle_mom(0.99, 0.25))
    with pytest.raises(ValueError, match="3 learning rates for 2"):
        OneCycle(torch.optim.AdamW([{"params": [weights[0]]}, {"params": [weights[1]]}]), [1, 2, 3], 10, 0.25)
