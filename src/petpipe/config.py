"""params.yaml -> frozen, validated dataclasses.

This is the only module that reads params.yaml (and dvc.yaml, to know which keys a stage reads).
Every key is required: profiles are complete params files, so nothing changes behind a user's
back when a default moves. An unknown key, a wrong type or a value outside the allowed set raises
``ConfigError`` naming the key and what is allowed, before any stage does work.
"""

from __future__ import annotations

import dataclasses
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from petpipe.errors import PetpipeError

PARAMS_FILE = "params.yaml"
PIPELINE_FILE = "dvc.yaml"

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ConfigError(PetpipeError, ValueError):
    """A params file that cannot be used; the message names the key and what is allowed."""


@dataclass(frozen=True)
class DataConfig:
    url: str  # http(s)://..., file://... or a path inside the repository
    sha256: str | None  # hex digest of the archive; null skips the check (the digest is printed)

    def __post_init__(self) -> None:
        if not self.url.strip():
            raise ConfigError("data.url: must not be empty; give an http(s):// or file:// URL or a repo path")
        if self.sha256 is not None and not _SHA256.match(self.sha256):
            raise ConfigError(f"data.sha256: {self.sha256!r} is not 64 lowercase hex digits (or null to skip the check)")


@dataclass(frozen=True)
class LabelsConfig:
    rule: Literal["folder", "regex", "csv"]
    images_dir: str  # folder inside the dataset that holds the images ("." = the whole dataset)
    pattern: str | None  # rule regex: one capture group = the label
    regex_on: Literal["name", "path"]  # match the file name (fastai from_name_re) or the relative path
    csv: str | None  # rule csv: file inside the dataset with name,label (and optional is_valid) columns
    valid_pct: float  # random validation share when the data carries no split of its own

    def __post_init__(self) -> None:
        if not 0.0 < self.valid_pct < 1.0:
            raise ConfigError(f"labels.valid_pct: {self.valid_pct} must be between 0 and 1 (exclusive)")
        if self.rule == "regex":
            if not self.pattern:
                raise ConfigError("labels.pattern: required when labels.rule is 'regex' (a regex with one capture group)")
            try:
                groups = re.compile(self.pattern).groups
            except re.error as err:
                raise ConfigError(f"labels.pattern: {self.pattern!r} is not a valid regex: {err}") from None
            if groups != 1:
                raise ConfigError(f"labels.pattern: {self.pattern!r} has {groups} capture groups; exactly one (the label) is allowed")
        if self.rule == "csv" and not self.csv:
            raise ConfigError("labels.csv: required when labels.rule is 'csv' (a file inside the dataset with name,label columns)")


@dataclass(frozen=True)
class TrainConfig:
    arch: str  # any torchvision classification model name, e.g. resnet18, resnet34, convnext_tiny
    weights: str  # imagenet | none | path to a state dict for the whole torchvision model
    size: int  # square training/validation image size in pixels
    batch_size: int
    num_workers: int  # DataLoader worker processes (0 = load in the main process)
    min_scale: float  # RandomResizedCrop lower bound on the crop area (1.0 = no random crop)
    flip: bool  # random horizontal flips (wrong for digits, right for pets)
    weight_decay: float  # decoupled (AdamW) weight decay, fastai's default is 0.01

    def __post_init__(self) -> None:
        from petpipe.model import available_archs  # torchvision import is deferred to here

        archs = available_archs()
        if self.arch not in archs:
            close = [a for a in archs if a.startswith(self.arch[:5])][:8] or archs[:8]
            raise ConfigError(f"train.arch: {self.arch!r} is not a torchvision classification model; e.g. {', '.join(close)}")
        for key in ("size", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}: {getattr(self, key)} must be >= 1")
        if self.num_workers < 0:
            raise ConfigError(f"train.num_workers: {self.num_workers} must be >= 0")
        if not 0.0 < self.min_scale <= 1.0:
            raise ConfigError(f"train.min_scale: {self.min_scale} must be in (0, 1]")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay: {self.weight_decay} must be >= 0")
        if not self.weights.strip():
            raise ConfigError("train.weights: must be 'imagenet', 'none' or a path to a state dict")


@dataclass(frozen=True)
class TrainFrozenConfig:
    epochs: int
    lr: float  # one-cycle peak LR for the head (fastai's fit_one_cycle default is 1e-3)
    pct_start: float  # share of steps spent warming up

    def __post_init__(self) -> None:
        _check_cycle("train_frozen", self.epochs, self.pct_start)
        _check_positive("train_frozen.lr", self.lr)


@dataclass(frozen=True)
class LrFindConfig:
    start_lr: float
    end_lr: float
    num_it: int  # at most this many mini-batches; stops earlier when the loss diverges

    def __post_init__(self) -> None:
        _check_positive("lr_find.start_lr", self.start_lr)
        if self.end_lr <= self.start_lr:
            raise ConfigError(f"lr_find.end_lr: {self.end_lr} must be greater than lr_find.start_lr ({self.start_lr})")
        if self.num_it < 2:
            raise ConfigError(f"lr_find.num_it: {self.num_it} must be >= 2")


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int
    max_lr: tuple[float, float] | Literal["auto"]  # [lo, hi] like fastai's slice(lo, hi), or auto
    pct_start: float

    def __post_init__(self) -> None:
        _check_cycle("finetune", self.epochs, self.pct_start)
        if self.max_lr != "auto":
            lo, hi = self.max_lr
            _check_positive("finetune.max_lr", lo)
            if hi < lo:
                raise ConfigError(f"finetune.max_lr: [{lo}, {hi}] must be [lo, hi] with lo <= hi")


@dataclass(frozen=True)
class ReportConfig:
    top_losses: int  # images in the top-losses grid
    most_confused_min: int  # smallest count listed among the most-confused pairs

    def __post_init__(self) -> None:
        if self.top_losses < 1 or self.most_confused_min < 1:
            raise ConfigError("report.top_losses and report.most_confused_min must be >= 1")


@dataclass(frozen=True)
class Config:
    seed: int
    device: Literal["auto", "cpu", "cuda", "mps"]  # auto: CUDA, then MPS, then CPU
    precision: Literal["auto", "fp32", "fp16", "bf16"]
    data: DataConfig
    labels: LabelsConfig
    train: TrainConfig
    train_frozen: TrainFrozenConfig
    lr_find: LrFindConfig
    finetune: FinetuneConfig
    report: ReportConfig


def _check_cycle(section: str, epochs: int, pct_start: float) -> None:
    if epochs < 1:
        raise ConfigError(f"{section}.epochs: {epochs} must be >= 1")
    if not 0.0 <= pct_start < 1.0:
        raise ConfigError(f"{section}.pct_start: {pct_start} must be in [0, 1)")


def _check_positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key}: {value} must be > 0")


def load_config(path: str | Path = PARAMS_FILE) -> Config:
    """Read and validate a complete params file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found; copy one from profiles/ (e.g. profiles/digits.yaml)") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    try:
        return build(Config, raw, prefix="")
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def build(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys and types recursively."""
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(raw).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(f"unknown key '{prefix}{unknown[0]}'; allowed keys at {where}: {', '.join(names)}")
    missing = [n for n in names if n not in raw]
    if missing:
        raise ConfigError(f"missing key '{prefix}{missing[0]}' (params files are complete: see profiles/digits.yaml)")
    hints = get_type_hints(cls)
    return cls(**{n: _coerce(hints[n], raw[n], f"{prefix}{n}") for n in names})


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return build(tp, value, prefix=key + ".")
    origin = get_origin(tp)
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{key}: {value!r} is not allowed; allowed: {', '.join(map(repr, get_args(tp)))}")
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _coerce(option, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not {_describe(tp)}")
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: {value!r} is not {_describe(tp)}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        # YAML 1.1 (PyYAML) reads "1e-3" as a string; accept it as the number it plainly is.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: {value!r} is not {_describe(tp)}")


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, get_args(tp)))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin is tuple:
        return "a list [" + ", ".join(_describe(a) for a in get_args(tp)) + "]"
    return {type(None): "null", bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``Config`` -> {"train.arch": "resnet18", ...} (lists become their string form)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = list(value) if isinstance(value, tuple) else value
    return out


def stage_params(cfg: Config, stage: str, pipeline: str | Path = PIPELINE_FILE) -> dict[str, Any]:
    """The params a stage reads, as declared in dvc.yaml (the single list of them)."""
    stages = yaml.safe_load(Path(pipeline).read_text()).get("stages", {})
    if stage not in stages:
        raise ConfigError(f"{pipeline}: no stage named {stage!r}; stages: {', '.join(stages)}")
    declared = [p for p in stages[stage].get("params", []) if isinstance(p, str)]
    flat = flatten(cfg)
    return {k: v for k, v in flat.items() if any(k == d or k.startswith(d + ".") for d in declared)}
