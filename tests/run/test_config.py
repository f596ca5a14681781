import copy
import re
from pathlib import Path

import pytest
import yaml

from petpipe.run.config import Config, ConfigError, flatten, load_config, parse_config, select

ROOT = Path(__file__).resolve().parents[2]
DIGITS = yaml.safe_load((ROOT / "profiles/digits.yaml").read_text())


def config_from(raw: dict) -> Config:
    return parse_config(raw)


def with_value(key: str, value):
    raw = copy.deepcopy(DIGITS)
    *parents, last = key.split(".")
    node = raw
    for p in parents:
        node = node[p]
    node[last] = value
    return raw


@pytest.mark.parametrize("profile", sorted(p.name for p in (ROOT / "profiles").glob("*.yaml")))
def test_every_profile_is_valid(profile):
    assert isinstance(load_config(ROOT / "profiles" / profile), Config)


def test_params_yaml_is_the_digits_profile():
    assert (ROOT / "params.yaml").read_text() == (ROOT / "profiles/digits.yaml").read_text()


def test_pets_profile_is_lesson_one():
    cfg = load_config(ROOT / "profiles/pets.yaml")
    assert (cfg.train.arch, cfg.train.weights, cfg.train.size, cfg.train.batch_size) == (
        "resnet34",
        "imagenet",
        224,
        64,
    )
    assert (cfg.train_frozen.epochs, cfg.finetune.epochs, cfg.finetune.max_lr) == (4, 2, (1e-6, 1e-4))
    assert (
        cfg.labels.rule == "regex"
        and re.search(cfg.labels.pattern, "great_pyrenees_173.jpg").group(1) == "great_pyrenees"
    )
    assert cfg.data.url == "https://s3.amazonaws.com/fast-ai-imageclas/oxford-iiit-pet.tgz"


def test_convnext_profile_is_the_current_course_recipe():
    """fastai's vision_learner(dls, 'convnext_tiny.fb_in22k').fine_tune(3): one frozen epoch at 2e-3 (pct_start 0.99),
    three unfrozen epochs (pct_start 0.3); the LRs from lr_find's valley."""
    cfg = load_config(ROOT / "profiles/pets-convnext.yaml")
    assert (cfg.train.arch, cfg.train.weights, cfg.train.normalize, cfg.presize.size, cfg.train.size) == (
        "timm/convnext_tiny.fb_in22k",
        "imagenet",
        "auto",
        460,
        224,
    )
    assert (cfg.train_frozen.epochs, cfg.train_frozen.lr, cfg.train_frozen.pct_start) == (1, 2e-3, 0.99)
    assert (cfg.finetune.epochs, cfg.finetune.max_lr, cfg.finetune.pct_start) == (3, "auto", 0.3)


@pytest.mark.parametrize(
    "arch", ["resnet34", "timm/convnext_tiny.fb_in22k", "timm/resnet50.a1_in1k", "timm/tf_efficientnet_lite0"]
)
def test_torchvision_and_timm_names_are_accepted(arch):
    assert config_from(with_value("train.arch", arch)).train.arch == arch


@pytest.mark.parametrize(
    "weights", ["weights/r34.pth", "weights/sub/convnext.safetensors", "weights/x.pt", "imagenet", "none"]
)
def test_weights_are_imagenet_none_or_a_file_in_the_weights_folder(weights):
    assert config_from(with_value("train.weights", weights)).train.weights == weights


@pytest.mark.parametrize(
    "weights", ["/abs/r34.pth", "models/r34.pth", "weights/../r34.pth", "weights/r34.bin", "r34.pth"]
)
def test_weights_elsewhere_are_refused_with_the_fix(weights):
    with pytest.raises(
        ConfigError,
        match=rf"^train.weights: '{re.escape(weights)}' is not allowed: give 'imagenet', 'none' or a state-dict "
        r"file inside weights/ ending in .pt, .pth, .safetensors .*so that DVC re-runs training when it changes",
    ):
        config_from(with_value("train.weights", weights))


def test_normalize_is_auto_imagenet_or_mean_and_std():
    assert config_from(with_value("train.normalize", "imagenet")).train.normalize == "imagenet"
    cfg = config_from(with_value("train.normalize", [[0.5, 0.5, 0.5], ["5e-1", 0.5, 1]]))
    assert cfg.train.normalize == ((0.5, 0.5, 0.5), (0.5, 0.5, 1.0))
    assert flatten(cfg)["train.normalize"] == [[0.5, 0.5, 0.5], [0.5, 0.5, 1.0]]
    for bad in (
        [[0.5, 0.5], [0.5, 0.5]],
        [[0.5, 0.5, 0.5], [0.5, 0.0, 0.5]],
        "ImageNet",
        [[0.5, 0.5, 0.5]],
        [[0.5, 0.5, ".nan"], [1, 1, 1]],
    ):
        with pytest.raises(
            ConfigError,
            match=r"^train.normalize: .* is not allowed: give 'auto', 'imagenet' or \[\[r, g, b\], \[r, g, b\]\]",
        ):
            config_from(with_value("train.normalize", bad))


def test_unknown_key_names_key_and_allowed_keys():
    raw = with_value("train.batchsize", 32)
    with pytest.raises(
        ConfigError,
        match=r"unknown key 'train.batchsize'.*allowed keys at train: arch, weights, normalize, size, batch_size",
    ):
        config_from(raw)


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match="unknown key 'epochs'"):
        config_from(with_value("epochs", 3))


def test_missing_key_is_an_error():
    raw = copy.deepcopy(DIGITS)
    del raw["finetune"]["pct_start"]
    with pytest.raises(ConfigError, match="missing key 'finetune.pct_start'"):
        config_from(raw)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train.batch_size", "64", r"^train.batch_size: '64' is not an integer$"),
        ("train.batch_size", 6.5, r"^train.batch_size: 6.5 is not an integer$"),
        ("train.batch_size", True, r"^train.batch_size: True is not an integer$"),
        ("train.augment.flip", "yes", r"^train.augment.flip: 'yes' is not a boolean"),
        (
            "train.augment",
            "off",
            r"^train.augment: 'off' is not allowed: give the augmentation keys \(see profiles/pets.yaml\) or 'none'$",
        ),
        ("train.augment.max_zoom", 0.9, r"^train.augment.max_zoom: 0.9 must be >= train.augment.min_zoom \(1.0\)$"),
        ("train.augment.p_affine", 1.5, r"^train.augment.p_affine: 1.5: input should be less than or equal to 1$"),
        (
            "train.num_workers",
            -1,
            r"^train.num_workers: -1 is not allowed: give a number of worker processes >= 0, or 'auto'$",
        ),
        ("train.num_workers", "many", r"^train.num_workers: 'many' is not allowed"),
        ("train.store_on_device", "yes", r"^train.store_on_device: 'yes' is not allowed: give auto, true or false$"),
        ("train.store_on_device", 1, r"^train.store_on_device: 1 is not allowed: give auto, true or false$"),
        ("presize.size", 4, r"^presize.size: 4: input should be greater than or equal to 8$"),
        ("device", "gpu", r"^device: 'gpu' is not allowed; allowed: 'auto', 'cpu', 'cuda', 'mps'$"),
        ("precision", "fp8", r"^precision: 'fp8' is not allowed; allowed: 'auto', 'fp32', 'fp16', 'bf16'$"),
        ("labels.rule", "glob", r"^labels.rule: 'glob' is not allowed; allowed: 'folder', 'regex', 'csv', 'function'$"),
        (
            "finetune.max_lr",
            "fast",
            r"^finetune.max_lr: 'fast' is not allowed: give \[lo, hi\] \(two numbers\) or 'auto'$",
        ),
        ("finetune.max_lr", [1e-3], r"^finetune.max_lr: \[0.001\] is not allowed: give \[lo, hi\]"),
        ("finetune.max_lr", [1e-2, 1e-4], r"^finetune.max_lr: \[0.01, 0.0001\] must be \[lo, hi\] with 0 < lo <= hi"),
        (
            "finetune.max_lr",
            [1e-4, float("inf")],
            r"^finetune.max_lr: \[0.0001, inf\] must be \[lo, hi\] with 0 < lo <= hi, both finite",
        ),
        ("train.arch", "ResNet 34", r"^train.arch: 'ResNet 34': string should match pattern"),
        ("labels.valid_pct", 1.5, r"^labels.valid_pct: 1.5: input should be less than 1$"),
        ("data.sha256", "abc", r"^data.sha256: 'abc': string should match pattern '\^\[0-9a-f\]\{64\}\$'"),
        ("train.size", 0, r"^train.size: 0: input should be greater than or equal to 1$"),
        ("finetune.epochs", 0, r"^finetune.epochs: 0: input should be greater than or equal to 1$"),
        ("lr_find.end_lr", 1e-8, r"^lr_find.end_lr: 1e-08 must be greater than lr_find.start_lr \(1e-07\)$"),
        ("seed", -1, r"^seed: -1: input should be greater than or equal to 0$"),
        ("seed", 2**32, r"^seed: 4294967296: input should be less than 4294967296$"),
        ("train.weight_decay", float("nan"), r"^train.weight_decay: nan is not allowed: numbers must be finite"),
        ("train_frozen.lr", "inf", r"^train_frozen.lr: inf is not allowed: numbers must be finite"),
        ("lr_find.end_lr", float("inf"), r"^lr_find.end_lr: inf is not allowed: numbers must be finite"),
        ("train", 5, r"^train: expected a mapping of keys, got 5$"),
    ],
)
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        config_from(with_value(key, value))


def test_regex_rule_needs_exactly_one_group():
    raw = with_value("labels.rule", "regex")
    raw["labels"]["pattern"] = r"^(.+)_(\d+)\.jpg$"
    with pytest.raises(ConfigError, match="has 2 capture groups; exactly one"):
        config_from(raw)
    raw["labels"]["pattern"] = None
    with pytest.raises(ConfigError, match="labels.pattern: required when labels.rule is 'regex'"):
        config_from(raw)


def test_csv_rule_needs_a_file():
    with pytest.raises(ConfigError, match="labels.csv: required"):
        config_from(with_value("labels.rule", "csv"))


def test_augment_off_switch_and_auto_workers():
    raw = with_value("train.augment", "none")
    raw["train"]["num_workers"] = "auto"
    cfg = config_from(raw)
    assert cfg.train.augment == "none" and cfg.train.num_workers == "auto"
    assert config_from(with_value("train.num_workers", 3)).train.num_workers == 3
    for value in (True, False, "auto"):
        assert config_from(with_value("train.store_on_device", value)).train.store_on_device == value


def test_unknown_augment_key_lists_the_allowed_ones():
    with pytest.raises(
        ConfigError,
        match=r"^unknown key 'train.augment.rotate'; allowed keys at train.augment: flip, max_rotate, min_zoom",
    ):
        config_from(with_value("train.augment.rotate", 5))


def test_yaml11_exponent_strings_are_numbers():
    cfg = config_from(with_value("finetune.max_lr", ["1e-6", "1e-4"]))
    assert cfg.finetune.max_lr == (1e-6, 1e-4)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_flatten_and_select():
    cfg = load_config(ROOT / "profiles/digits.yaml")
    flat = flatten(cfg)
    assert flat["train.arch"] == "resnet18" and flat["finetune.max_lr"] == [1e-3, 1e-2] and flat["seed"] == 42
    assert select(cfg, ["data.url", "data.sha256", "seed"]) == {
        "seed": 42,
        "data.url": "assets/digits.tgz",
        "data.sha256": cfg.data.sha256,
    }
    assert set(select(cfg, ["data"])) == {f"data.{key}" for key in type(cfg.data).model_fields}
    assert set(select(cfg, ["train.size"])) == {"train.size"}  # a key is not a prefix of train.size_x


def test_params_doc_is_generated_from_the_models():
    """docs/params.md's keys table comes from the models' types, constraints and descriptions."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/params_doc.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    doc = (ROOT / "docs/params.md").read_text()
    for key in flatten(load_config(ROOT / "profiles/pets.yaml")):
        assert f"| `{key}` |" in doc, key
