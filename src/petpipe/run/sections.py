"""The params file's sections as pydantic v2 models: every key, its type, its checks and its documentation.

Each field's ``description`` is its documentation: ``docs/params.md`` is generated from these models
(``python scripts/params_doc.py``). ``config.py`` reads params files into them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

WEIGHTS_DIR = "weights"  # train.weights files live here: train_frozen depends on the folder (dvc.yaml)
WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors")


def _number(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads ``1e-3`` as a string; accept it as the number it plainly is."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _finite_number(value: Any) -> Any:
    value = _number(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value!r} is not allowed: numbers must be finite (not nan or inf)")
    return value


# Strict: a string is not an int, a bool is not an int. Floats must be finite.
Float = Annotated[float, BeforeValidator(_finite_number)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DataConfig(Section):
    url: str = Field(
        min_length=1,
        description="`http://`, `https://`, `file://` URL or a path inside the repository; tar (any compression) or "
        "zip",
    )
    sha256: str | None = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 of the archive, checked before extraction; null skips the check and prints the digest to "
        "pin",
    )
    md5: str | None = Field(
        pattern=r"^[0-9a-f]{32}$",
        description="MD5 of the whole archive (torchvision's catalogue publishes these), checked like `data.sha256`; "
        "null skips it",
    )
    size: int | None = Field(
        ge=1,
        description="size of the archive in bytes: a download whose server announces another size stops at once, a "
        "cached or local archive of another size is refused; null skips the check",
    )
    max_members: int = Field(
        ge=1, description="most entries (files and folders) the archive may hold; more stops the extraction"
    )
    max_unpacked_bytes: int = Field(
        ge=1, description="most bytes the extracted files may take together; more stops the extraction"
    )


FUNCTION_SPEC = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


class LabelsConfig(Section):
    rule: Literal["folder", "regex", "csv", "function"] = Field(
        description="how an image gets its label (see *Labelling rules*)"
    )
    images_dir: str = Field(
        min_length=1,
        description="folder inside the dataset that holds the images (`.` = the whole dataset); other files are "
        "ignored",
    )
    pattern: str | None = Field(description="rule `regex`: a regex with exactly one capture group, the label")
    regex_on: Literal["name", "path"] = Field(
        description="what the pattern (rule `regex`) or the function (rule `function`) is applied to: the file name "
        "(fastai `from_name_re`, `from_name_func`) or the path relative to the dataset"
    )
    csv: str | None = Field(
        description="rule `csv`: file inside the dataset with `name,label` columns (and `is_valid` for `split: "
        "column`); names are relative to `images_dir`"
    )
    function: str | None = Field(
        description="rule `function`: `module:callable` importable from the repository root, called with the file "
        "name (or path, see `regex_on`) and returning the label (fastai `from_name_func`)"
    )
    split: Literal["random", "folder", "column", "file"] = Field(
        description="how the validation set is chosen: `random` (`valid_pct`), `folder` (`train/` and `valid/` "
        "folders), `column` (the csv's `is_valid`), `file` (`valid_file` / `train_file`); see *Validation split*"
    )
    valid_pct: Float = Field(gt=0, lt=1, description="split `random`: share of the images drawn for validation")
    valid_file: str | None = Field(
        description="split `file`: file inside the dataset listing the validation images, one name per line (first "
        "field)"
    )
    train_file: str | None = Field(
        description="split `file`: file inside the dataset listing the training images, one name per line (first field)"
    )

    @model_validator(mode="after")
    def _rule_needs(self) -> LabelsConfig:
        if self.rule == "regex":
            if not self.pattern:
                raise ValueError(
                    "labels.pattern: required when labels.rule is 'regex' (a regex with one capture group)"
                )
            try:
                groups = re.compile(self.pattern).groups
            except re.error as err:
                raise ValueError(f"labels.pattern: {self.pattern!r} is not a valid regex: {err}") from None
            if groups != 1:
                raise ValueError(
                    f"labels.pattern: {self.pattern!r} has {groups} capture groups; exactly one (the label) is allowed"
                )
        if self.rule == "csv" and not self.csv:
            raise ValueError(
                "labels.csv: required when labels.rule is 'csv' (a file inside the dataset with name,label columns)"
            )
        if self.rule == "function" and not self.function:
            raise ValueError(
                "labels.function: required when labels.rule is 'function' ('module:callable', e.g. 'labelling:is_cat')"
            )
        if self.function is not None and not FUNCTION_SPEC.match(self.function):
            raise ValueError(
                f"labels.function: {self.function!r} is not allowed: give 'module:callable', e.g. 'labelling:is_cat' "
                "or 'mypkg.rules:breed'"
            )
        if self.split == "column" and self.rule != "csv":
            raise ValueError(
                "labels.split: 'column' takes the split from the is_valid column of labels.csv, so it needs "
                f"labels.rule 'csv' (not {self.rule!r})"
            )
        if self.split == "file" and not (self.valid_file or self.train_file):
            raise ValueError(
                "labels.split: 'file' needs labels.valid_file or labels.train_file (or both), e.g. annotations/test.txt"
            )
        return self


class PresizeConfig(Section):
    size: int = Field(
        ge=8,
        description="shorter side of every stored image, in pixels (fastai's item transform `Resize(460)` for 224 px "
        "training); larger keeps more detail for zoom and crops, at about size x size x aspect x 0.3 bytes per image "
        "on disk (a quality-90 JPEG) and x 3 bytes decoded on the device (a quarter or less of that where training "
        "decodes it reduced: see train.size)",
    )


class AugmentConfig(Section):
    """fastai ``aug_transforms(min_scale=...)``, applied to whole batches on the training device."""

    flip: bool = Field(description="random horizontal flips, p 0.5 (off for digits: a mirrored glyph is another glyph)")
    max_rotate: Float = Field(
        ge=0, le=180, description="rotation in degrees, drawn from U(-max_rotate, max_rotate) with probability p_affine"
    )
    min_zoom: Float = Field(gt=0, description="zoom drawn from U(min_zoom, max_zoom) with probability p_affine")
    max_zoom: Float = Field(gt=0, description="upper bound of the zoom (>= min_zoom)")
    max_warp: Float = Field(
        ge=0, lt=1, description="perspective warp magnitude per axis, U(-max_warp, max_warp), with probability p_affine"
    )
    p_affine: Float = Field(ge=0, le=1, description="probability of each of rotate, zoom and warp, drawn per image")
    min_scale: Float = Field(
        gt=0, le=1, description="random resized crop: smallest area kept, square (fastai `min_scale`)"
    )
    max_lighting: Float = Field(
        ge=0, lt=1, description="brightness and contrast change in logit space (fastai `max_lighting`)"
    )
    p_lighting: Float = Field(ge=0, le=1, description="probability of brightness and of contrast, each drawn per image")

    @model_validator(mode="after")
    def _zoom_range(self) -> AugmentConfig:
        if self.max_zoom < self.min_zoom:
            raise ValueError(
                f"train.augment.max_zoom: {self.max_zoom} must be >= train.augment.min_zoom ({self.min_zoom})"
            )
        return self


class TrainConfig(Section):
    arch: str = Field(
        pattern=r"^([a-z][a-z0-9_]*|timm/[a-z][a-z0-9_]*(\.[a-z0-9_\-]+)?)$",
        description="torchvision classification model (`resnet34`, `convnext_tiny`) or `timm/<name>` with an optional "
        "pretrained tag (`timm/convnext_tiny.fb_in22k`, `timm/tf_efficientnet_lite0`), built as fastai's "
        "`vision_learner` builds it; checked when the model is built, with close matches from both libraries",
    )
    weights: str = Field(
        min_length=1,
        description="`imagenet` (torchvision's default weights, or timm's pretrained weights for the tag; downloaded "
        "once), "
        f"`none` (random init) or a state-dict file inside `{WEIGHTS_DIR}/` (`.pt`, `.pth`, `.safetensors`) with the "
        "library's own key names; "
        "its classifier keys are ignored. DVC re-runs train_frozen when a file there changes",
    )
    normalize: tuple[tuple[float, float, float], tuple[float, float, float]] | Literal["auto", "imagenet"] = Field(
        description="input mean/std: `auto` (those of the weights: timm's `pretrained_cfg`, torchvision's weights; "
        "ImageNet's for `weights: none`), `imagenet`, or `[[r, g, b], [r, g, b]]` (mean, std of values in [0, 1]). "
        "Recorded in the checkpoint and the logged models"
    )
    size: int = Field(
        ge=1,
        description="square image size the model sees, for training and validation (<= presize.size; where "
        "ceil(presize.size / k) >= 2x this size for k = 8, 4 or 2, the store is decoded at 1/k, the largest such k)",
    )
    batch_size: int = Field(ge=1, description="mini-batch size")
    num_workers: int | Literal["auto"] = Field(
        description="DataLoader worker processes; `auto`: none on the CPU (a presized JPEG decodes in a fraction of a "
        "step, and workers would compete with the training threads), min(8, cores - 1) with a GPU. Results do not "
        "depend on it, so no stage re-runs when it changes"
    )
    store_on_device: bool | Literal["auto"] = Field(
        description="decode the presized store once per stage (on every core) and hold it on the training device, "
        "gathering batches there (no loader workers or per-batch host copies): `auto` = on CUDA when the decoded "
        "store fits in half the free memory, else the host loader; `true` = always (stops if it does not fit; the "
        "CPU holds it in memory); `false` = the host loader, which decodes per image. Same batches either way, so "
        "no stage re-runs when it changes"
    )
    augment: AugmentConfig | Literal["none"] = Field(
        description="batch augmentation (the keys below), or `none` to switch it off for ablations"
    )
    weight_decay: Float = Field(
        ge=0, description="decoupled (AdamW) weight decay, fastai's default 0.01; not applied to norm layers and biases"
    )
    compile: bool = Field(
        description="`torch.compile` the model (mode `default`) for train_frozen's and finetune's training and "
        "evaluation loops; compiled before the first epoch, its time recorded as `compile_seconds` and left out of "
        "`train_images_per_s`. Pays off on GPUs and long runs (benchmarks/RESULTS.md)"
    )

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: str) -> str:
        if value in ("imagenet", "none"):
            return value
        path = Path(value)
        if (
            path.is_absolute()
            or ".." in path.parts
            or path.parts[0] != WEIGHTS_DIR
            or path.suffix not in WEIGHT_SUFFIXES
        ):
            raise ValueError(
                f"{value!r} is not allowed: give 'imagenet', 'none' or a state-dict file inside {WEIGHTS_DIR}/ ending "
                "in "
                f"{', '.join(WEIGHT_SUFFIXES)} (e.g. {WEIGHTS_DIR}/resnet34.pth; copy it there, or `dvc add` / `dvc "
                "import-url` it, "
                "so that DVC re-runs training when it changes)"
            )
        return value

    @field_validator("normalize", mode="before")
    @classmethod
    def _normalize(cls, value: Any) -> Any:
        if value in ("auto", "imagenet"):
            return value
        rows = (
            [[_number(v) for v in row] if isinstance(row, list | tuple) else None for row in value]
            if isinstance(value, list | tuple)
            else None
        )
        ok = rows is not None and len(rows) == 2 and all(row is not None and len(row) == 3 for row in rows)
        ok = ok and all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for row in rows for v in row
        )
        if not ok or not all(v > 0 for v in rows[1]):
            raise ValueError(
                f"{value!r} is not allowed: give 'auto', 'imagenet' or [[r, g, b], [r, g, b]] (mean, then std > 0)"
            )
        return tuple(tuple(float(v) for v in row) for row in rows)

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers(cls, value: Any) -> Any:
        if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"{value!r} is not allowed: give a number of worker processes >= 0, or 'auto'")
        return value

    @field_validator("store_on_device", mode="before")
    @classmethod
    def _store_on_device(cls, value: Any) -> Any:
        if value != "auto" and not isinstance(value, bool):
            raise ValueError(f"{value!r} is not allowed: give auto, true or false")
        return value

    @field_validator("augment", mode="before")
    @classmethod
    def _augment(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "none":
            raise ValueError(f"{value!r} is not allowed: give the augmentation keys (see profiles/pets.yaml) or 'none'")
        return value


class TrainFrozenConfig(Section):
    epochs: int = Field(ge=1, description="epochs with the body frozen (norm layers still train)")
    lr: Float = Field(gt=0, description="one-cycle peak LR (fastai `fit_one_cycle` default 1e-3)")
    pct_start: Float = Field(ge=0, lt=1, description="share of the steps spent warming up")


class LrFindConfig(Section):
    start_lr: Float = Field(gt=0, description="first LR of the range test")
    end_lr: Float = Field(gt=0, description="last LR of the range test (> start_lr)")
    num_it: int = Field(ge=2, description="mini-batches at most (stops early when the loss diverges)")

    @model_validator(mode="after")
    def _increasing(self) -> LrFindConfig:
        if self.end_lr <= self.start_lr:
            raise ValueError(f"lr_find.end_lr: {self.end_lr} must be greater than lr_find.start_lr ({self.start_lr})")
        return self


class FinetuneConfig(Section):
    epochs: int = Field(ge=1, description="epochs with everything unfrozen")
    max_lr: tuple[float, float] | Literal["auto"] = Field(
        description="discriminative LRs `[lo, hi]` like fastai's `slice(lo, hi)`, or `auto` = `[valley/100, valley]` "
        "from lr_find"
    )
    pct_start: Float = Field(ge=0, lt=1, description="warm-up share of the fine-tuning cycle")

    @field_validator("max_lr", mode="before")
    @classmethod
    def _lo_hi(cls, value: Any) -> Any:
        if value == "auto":
            return value
        numbers = [_number(v) for v in value] if isinstance(value, list | tuple) else None
        if (
            not numbers
            or len(numbers) != 2
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in numbers)
        ):
            raise ValueError(f"{value!r} is not allowed: give [lo, hi] (two numbers) or 'auto'")
        lo, hi = (float(v) for v in numbers)
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
            raise ValueError(f"{value!r} must be [lo, hi] with 0 < lo <= hi, both finite")
        return (lo, hi)


class DistributedConfig(Section):
    """Data-parallel training (train_frozen, finetune) over several processes, launched through torchrun."""

    nproc_per_node: int = Field(
        ge=1,
        description="training processes per machine (one per GPU); more than 1 relaunches the stage through `torchrun`",
    )
    nnodes: int = Field(
        ge=1,
        description="machines; more than 1 needs `PETPIPE_RDZV_ENDPOINT=host:port` (torchrun's rendezvous) on each",
    )
    backend: Literal["auto", "nccl", "gloo"] = Field(description="`auto`: nccl on CUDA, gloo on the CPU")


class ReportConfig(Section):
    top_losses: int = Field(ge=1, description="images in the top-losses grid")
    most_confused_min: int = Field(ge=1, description="smallest count listed among the most-confused pairs")


class MlflowConfig(Section):
    """What the tracking does beyond logging; read by the stages but no DVC dependency (it shapes no output)."""

    register_as: str | None = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$",
        description="registered-model name for finetune's final model (the raw-image pyfunc), with the alias "
        "`candidate` on the new version; null registers nothing. Not a DVC dependency: changing it re-runs nothing "
        "(register an earlier run's model in the UI)",
    )


class Config(Section):
    seed: int = Field(
        ge=0,
        lt=2**32,
        description="seeds Python, NumPy, torch, the random validation split, the shuffling order and augmentation",
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(description="`auto` picks CUDA, then Apple MPS, then CPU")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        description="`auto`: bf16 autocast on CUDA GPUs that support it, fp16 (with gradient scaling) on older ones, "
        "fp32 elsewhere"
    )
    data: DataConfig
    labels: LabelsConfig
    presize: PresizeConfig
    train: TrainConfig
    train_frozen: TrainFrozenConfig
    lr_find: LrFindConfig
    finetune: FinetuneConfig
    distributed: DistributedConfig
    report: ReportConfig
    mlflow: MlflowConfig
