import numpy as np
import pytest
import torch

from petpipe.compute.device import make_runtime
from petpipe.run.errors import PetpipeError
from petpipe.train.lr_choice import auto_max_lr, choose_max_lr
from petpipe.train.lr_find import (
    LossRecorder,
    lr_find_summary,
    lr_range_test,
    suggest,
    suggest_minimum,
    suggest_steep,
    suggest_valley,
    trimmed,
)


def test_minimum_is_a_tenth_of_the_lowest_point():
    lrs = np.logspace(-6, 0, 7)
    losses = np.array([2.0, 1.9, 1.5, 1.0, 0.8, 1.5, 3.0])
    assert suggest_minimum(lrs, losses) == pytest.approx(1e-3)


def test_steep_is_the_start_of_the_fastest_fall():
    lrs = np.logspace(-6, 0, 7)
    losses = np.array([2.0, 1.95, 1.9, 1.0, 0.9, 0.85, 3.0])
    assert suggest_steep(lrs, losses) == pytest.approx(lrs[2])  # forward difference 2 -> 3 is the steepest


def test_valley_is_half_way_down_the_longest_decline():
    lrs = np.logspace(-7, 0, 15)
    # strictly decreasing over indices 2..11 (10 points), noise before, divergence after
    losses = np.array([2.0, 2.1, 2.0, 1.9, 1.8, 1.7, 1.6, 1.5, 1.4, 1.3, 1.2, 1.1, 1.6, 2.5, 4.0])
    # longest decreasing subsequence: 2.1 or 2.0 then 1.9 ... 1.1 -> ends at 11 with length 11
    # (index 0 or 1 as its start); span start = 11 - 11 = 0, third = 11/3 -> 0 + 3 + 1 = 4
    assert suggest_valley(lrs, losses) == pytest.approx(lrs[4])


def test_recorder_smooths_debiases_and_stops_on_divergence():
    recorder = LossRecorder()
    assert not recorder.add(2.0)
    assert recorder.smooth[0] == pytest.approx(2.0)  # debiased: the first value is the loss itself
    assert not recorder.add(1.0)
    # EMA: (0.98 * 0.02 * 2 + 0.02 * 1) / (1 - 0.98**2)
    assert recorder.smooth[1] == pytest.approx((0.98 * 0.02 * 2.0 + 0.02 * 1.0) / (1 - 0.98**2))
    stops = [recorder.add(1000.0) for _ in range(3)]
    assert stops[-1] and recorder.smooth[-1] > 4 * recorder.best  # stopped once above 4x the best
    nan_recorder = LossRecorder()
    nan_recorder.add(1.0)
    assert nan_recorder.add(float("nan"))


def test_recorder_warmup_ignores_early_noise():
    noisy_start = [0.2, 1.5, 1.4, 1.3, 1.2]
    fastai_rule = LossRecorder()
    assert [fastai_rule.add(v) for v in noisy_start][:2] == [False, True]  # fastai's rule stops at the second point
    recorder = LossRecorder(warmup=2)
    assert not any(recorder.add(v) for v in noisy_start)
    assert recorder.best == pytest.approx(min(recorder.smooth[2:]))


def test_suggestions_skip_the_first_tenth_of_num_it():
    lrs = list(np.logspace(-7, 1, 30))
    losses = [0.1] * 3 + list(np.linspace(3.0, 1.0, 22)) + [2.0, 3.0, 4.0, 5.0, 6.0]  # a fake early dip at 0..2
    tips, warning = suggest({"lr": lrs, "loss": losses}, num_it=30)
    assert warning is None and tips["minimum"] > lrs[2]  # the dip before num_it // 10 = 3 points is ignored


def test_a_nan_cuts_the_curve_where_fastai_does():
    """fastai runs on through a NaN, drops the last 5 points, then cuts at the first NaN: end = min(first NaN, num_it -
    5)."""
    num_it = 40
    lrs = list(np.logspace(-6, 0, num_it))
    losses = list(np.linspace(3.0, 1.0, 38)) + [float("nan")]  # stopped at the first NaN, index 38
    trimmed_lrs, trimmed_losses = trimmed(lrs[:39], losses, num_it)
    assert len(trimmed_lrs) == (num_it - 5) - num_it // 10 and np.all(np.isfinite(trimmed_losses))  # min(38, 35) = 35
    early = list(np.linspace(3.0, 1.0, 20)) + [float("nan")]  # first NaN at 20 < 35: cut there, keep point 19
    assert len(trimmed(lrs[:21], early, num_it)[0]) == 20 - num_it // 10
    diverged = list(np.linspace(3.0, 1.0, 25))  # stopped by the 4x rule: drop the last 5
    assert len(trimmed(lrs[:25], diverged, num_it)[0]) == 25 - 5 - num_it // 10


def test_valley_of_a_decline_from_the_first_point_is_not_the_last_lr():
    """fastai's index is -1 here and returns the last (largest) LR; we return the first (documented deviation)."""
    lrs = np.array([1e-5, 1e-4, 1e-3, 1e-2])
    assert suggest_valley(lrs, np.array([2.0, 1.0, 3.0, 4.0])) == 1e-5
    # A long decline from the first point: fastai's formula, start -1 included: -1 + int(10/3) + int(10/3/2) = 3.
    long_lrs = np.logspace(-6, 0, 12)
    assert suggest_valley(long_lrs, np.array([10.0 - i for i in range(10)] + [5.0, 9.0])) == long_lrs[3]


def test_range_test_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    x, y = torch.randn(64, 3, 1, 1), torch.randint(0, 2, (64,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2)
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lr_range_test(model, loader, make_runtime("cpu", "fp32"), start_lr=1e-4, end_lr=1.0, num_it=8, weight_decay=0.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_auto_max_lr_is_valley_over_100_to_valley():
    assert auto_max_lr({"valley": 1e-3}) == pytest.approx((1e-5, 1e-3))


def test_range_test_stops_on_divergence_and_suggests():
    torch.manual_seed(0)
    x = torch.randn(256, 3, 1, 1)
    y = torch.randint(0, 2, (256,))  # random labels: large LRs can only make the loss explode
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 2))
    curve = lr_range_test(
        model, loader, make_runtime("cpu", "fp32"), start_lr=1e-5, end_lr=1e4, num_it=100, weight_decay=0.0
    )
    assert 10 < len(curve["lr"]) < 100  # diverged before the end
    assert curve["lr"] == sorted(curve["lr"]) and curve["lr"][0] == pytest.approx(1e-5)
    tips, warning = suggest(curve, num_it=100)
    assert (
        warning is None and set(tips) == {"valley", "minimum", "steep"} and all(1e-5 <= v <= 1e4 for v in tips.values())
    )


def memorised_head_curve(num_it: int = 100) -> dict[str, list[float]]:
    """What a head that memorised its training images gives (issue 15): the smoothed loss starts near
    zero, and the next ordinary batch (1.26) lifts it past 4x the best, so the test stops after 16 points."""
    recorder = LossRecorder(warmup=num_it // 10)
    lrs = []
    for i, loss in enumerate([0.003, 0.01, 0.02, 0.005, 0.01] * 3 + [1.26, 1.3, 1.1]):
        lrs.append(1e-7 * 10 ** (8 * i / num_it))
        if recorder.add(loss):
            break
    return {"lr": lrs, "loss": recorder.smooth}


def test_a_curve_too_short_to_read_gives_null_suggestions_and_a_warning():
    curve = memorised_head_curve()
    assert len(curve["lr"]) == 16  # stopped by the 4x rule at the first ordinary batch
    summary = lr_find_summary(curve, num_it=100)
    assert summary["valley"] is summary["minimum"] is summary["steep"] is None
    assert summary["auto_max_lr_lo"] is summary["auto_max_lr_hi"] is None and summary["iterations"] == 16
    assert (
        summary["warning"].startswith("lr_find: only 16 points before the loss diverged")
        and "finetune.max_lr" in summary["warning"]
    )


def test_explicit_lrs_ignore_a_failed_lr_find_and_auto_stops_in_one_line(tmp_path):
    result = tmp_path / "lr_find.json"
    result.write_text(__import__("json").dumps(lr_find_summary(memorised_head_curve(), num_it=100)))
    assert choose_max_lr((1e-4, 1e-2), result) == {"lo": 1e-4, "hi": 1e-2, "source": "finetune.max_lr"}
    with pytest.raises(
        PetpipeError,
        match=r"^finetune.max_lr: 'auto' needs lr_find's valley suggestion, but lr_find could not suggest one "
        r"\(lr_find: only 16 points.*set finetune.max_lr to \[lo, hi\]",
    ) as caught:
        choose_max_lr("auto", result)
    assert "\n" not in str(caught.value)


def test_the_stages_on_a_curve_that_diverges_at_once(presized_store, tmp_path, monkeypatch, mlflow_store, capsys):
    """lr_find writes its curve, null suggestions and the warning (exit 0); choose_lr passes explicit LRs on,
    and stops `auto` with one line."""
    import json

    import yaml
    from stage_code import ROOT
    from test_stage_spec import load_stage

    from petpipe.data.presize import PresizedStore
    from petpipe.train.engine import save_checkpoint
    from petpipe.train.model import build_model

    classes = PresizedStore(presized_store).classes
    save_checkpoint(
        tmp_path / "stage1.pt",
        build_model("resnet18", len(classes)),
        meta={"arch": "resnet18", "classes": classes, "size": 16},
    )
    raw = yaml.safe_load((ROOT / "profiles/digits.yaml").read_text())
    raw["train"].update(size=16, batch_size=12, num_workers=0)
    raw["lr_find"].update(start_lr=10.0, end_lr=1e6, num_it=30)  # diverges within a few mini-batches
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    monkeypatch.chdir(tmp_path)
    for max_lr in ([1e-3, 1e-2], "auto"):
        raw["finetune"]["max_lr"] = max_lr
        params = tmp_path / f"params-{max_lr}.yaml"
        params.write_text(yaml.safe_dump(raw))
        argv = [
            "--params",
            str(params),
            "--presized",
            str(presized_store),
            "--checkpoint",
            str(tmp_path / "stage1.pt"),
            "--result",
            "lr_find.json",
            "--plot",
            "lr_find.csv",
            "--figure",
            "lr_find.png",
        ]
        assert load_stage("lr_find").main(argv) == 0
        result = json.loads((tmp_path / "lr_find.json").read_text())
        assert (
            result["valley"] is None
            and result["auto_max_lr_hi"] is None
            and result["warning"].startswith("lr_find: only ")
        )
        assert "warning: lr_find: only " in capsys.readouterr().err
        assert (
            len((tmp_path / "lr_find.csv").read_text().splitlines()) == result["iterations"] + 1
            and (tmp_path / "lr_find.png").stat().st_size
        )
        code = load_stage("choose_lr").main(
            ["--params", str(params), "--lr-find-result", "lr_find.json", "--chosen", "chosen.json"]
        )
        err = capsys.readouterr().err
        if max_lr == "auto":
            assert code != 0 and not (tmp_path / "chosen.json").exists()
            assert err.strip().count("\n") == 0 and "finetune.max_lr: 'auto' needs lr_find's valley suggestion" in err
        else:
            assert code == 0 and json.loads((tmp_path / "chosen.json").read_text()) == {
                "lo": 1e-3,
                "hi": 1e-2,
                "source": "finetune.max_lr",
            }
            (tmp_path / "chosen.json").unlink()
