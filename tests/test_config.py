import copy
import re
from pathlib import Path

import pytest
import yaml

from petpipe.config import Config, ConfigError, build, flatten, load_config, stage_params

ROOT = Path(__file__).resolve().parent.parent
DIGITS = yaml.safe_load((ROOT / "profiles/digits.yaml").read_text())


def config_from(raw: dict) -> Config:
    return build(Config, raw, prefix="")


def with_value(key: str, value):
    raw = copy.deepcopy(DIGITS)
    *parents, last = key.split(".")
    node = raw
    for p in parents:
        node = node[p]
    node[last] = value
    return raw


@pytest.mark.parametrize("profile", sorted(p.name for p in (ROOT / "profiles").glob("*.yaml")))
def test_every_profile_is_valid_and_complete(profile):
    cfg = load_config(ROOT / "profiles" / profile)
    assert set(flatten(cfg)) == set(flatten(load_config(ROOT / "profiles/digits.yaml")))


def test_pets_profile_is_lesson_one():
    cfg = load_config(ROOT / "profiles/pets.yaml")
    assert (cfg.train.arch, cfg.train.weights, cfg.train.size, cfg.train.batch_size) == ("resnet34", "imagenet", 224, 64)
    assert (cfg.train_frozen.epochs, cfg.finetune.epochs, cfg.finetune.max_lr) == (4, 2, (1e-6, 1e-4))
    assert cfg.labels.rule == "regex" and re.search(cfg.labels.pattern, "great_pyrenees_173.jpg").group(1) == "great_pyrenees"
    assert cfg.data.url == "https://s3.amazonaws.com/fast-ai-imageclas/oxford-iiit-pet.tgz"


def test_unknown_key_names_key_and_allowed_keys():
    raw = with_value("train.batchsize", 32)
    with pytest.raises(ConfigError, match=r"unknown key 'train.batchsize'.*allowed keys at train: arch, weights, size, batch_size"):
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
        ("train.batch_size", "64", r"train.batch_size: '64' is not an integer"),
        ("train.batch_size", 6.5, r"train.batch_size: 6.5 is not an integer"),
        ("train.flip", "yes", r"train.flip: 'yes' is not a boolean"),
        ("device", "gpu", r"device: 'gpu' is not allowed; allowed: 'auto', 'cpu', 'cuda', 'mps'"),
        ("precision", "fp8", r"precision: 'fp8' is not allowed"),
        ("labels.rule", "glob", r"labels.rule: 'glob' is not allowed; allowed: 'folder', 'regex', 'csv'"),
        ("finetune.max_lr", "fast", r"finetune.max_lr: 'fast' is not a list \[a number, a number\] or one of 'auto'"),
        ("finetune.max_lr", [1e-3], r"finetune.max_lr: \[0.001\] is not a list"),
        ("finetune.max_lr", [1e-2, 1e-4], r"finetune.max_lr: \[0.01, 0.0001\] must be \[lo, hi\] with lo <= hi"),
        ("train.arch", "resnet35", r"train.arch: 'resnet35' is not a torchvision classification model; e.g. .*resnet34"),
        ("labels.valid_pct", 1.5, r"labels.valid_pct: 1.5 must be between 0 and 1"),
        ("data.sha256", "abc", r"data.sha256: 'abc' is not 64 lowercase hex digits"),
        ("train.size", 0, r"train.size: 0 must be >= 1"),
        ("finetune.epochs", 0, r"finetune.epochs: 0 must be >= 1"),
        ("lr_find.end_lr", 1e-8, r"lr_find.end_lr: 1e-08 must be greater than lr_find.start_lr"),
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


def test_yaml11_exponent_strings_are_numbers():
    cfg = config_from(with_value("finetune.max_lr", ["1e-6", "1e-4"]))
    assert cfg.finetune.max_lr == (1e-6, 1e-4)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_flatten_and_stage_params_follow_dvc_yaml():
    cfg = load_config(ROOT / "profiles/digits.yaml")
    flat = flatten(cfg)
    assert flat["train.arch"] == "resnet18" and flat["finetune.max_lr"] == [1e-3, 1e-2]
    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage, spec in declared.items():
        params = stage_params(cfg, stage, ROOT / "dvc.yaml")
        for key in spec.get("params", []):
            assert any(k == key or k.startswith(key + ".") for k in params), (stage, key)
    assert set(stage_params(cfg, "fetch", ROOT / "dvc.yaml")) == {"data.url", "data.sha256"}
    assert "train.arch" not in stage_params(cfg, "report", ROOT / "dvc.yaml")
