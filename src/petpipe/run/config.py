"""params.yaml -> validated, typed, frozen models (pydantic v2; ``config_sections``). The only module that reads params.

Every key is required (params files are complete: start from one in ``profiles/``); unknown keys,
wrong types, non-finite numbers and values out of range are refused with one line that names the
key, the bad value and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from petpipe.run.errors import PetpipeError
from petpipe.run.sections import Config

__all__ = ["Config", "ConfigError", "flatten", "load_config", "parse_config", "select"]  # Config: the models

PARAMS_FILE = "params.yaml"


class ConfigError(PetpipeError, ValueError):
    """A params file that cannot be used; the message names the key and what is allowed."""


def parse_yaml(text: str) -> Any:
    """YAML's safe subset, through libyaml where PyYAML was built with it (the pure-Python parser is about ten
    times slower: half a second per stage for params.yaml, dvc.yaml and dvc.lock)."""
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def load_config(path: str | Path = PARAMS_FILE) -> Config:
    """Read and validate a complete params file."""
    path = Path(path)
    try:
        raw = parse_yaml(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: params file not found; copy one from profiles/ (e.g. profiles/digits.yaml)"
        ) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    try:
        return parse_config(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def parse_config(raw: Any) -> Config:
    """Validate a params mapping; the first problem becomes one ConfigError line."""
    if not isinstance(raw, dict):
        raise ConfigError(f"top level: expected a mapping of keys, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        errors = err.errors()
        # A misspelt key shows up as unknown *and* missing: name the misspelling.
        first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        raise ConfigError(describe_error(first)) from None


def describe_error(error: dict[str, Any]) -> str:
    """One pydantic error -> ``key: value ... what is allowed``."""
    # Union members appear in the location as tags such as "literal['auto']" or "function-after[...]".
    loc = [str(part) for part in error["loc"] if "[" not in str(part)]
    key = ".".join(loc) or "top level"
    kind, value = error["type"], error.get("input")
    if kind == "extra_forbidden":
        parent = loc[:-1]
        allowed = ", ".join(_section(parent).model_fields)
        return f"unknown key '{key}'; allowed keys at {'.'.join(parent) or 'top level'}: {allowed}"
    if kind == "missing":
        return f"missing key '{key}' (params files are complete: see profiles/digits.yaml)"
    message = error["msg"].removeprefix("Value error, ")
    if message.startswith(f"{key}."):  # a cross-field rule names its own key
        return message
    if kind == "value_error":
        return f"{key}: {message}"
    if kind == "model_type":
        return f"{key}: expected a mapping of keys, got {value!r}"
    allowed = {
        "int_type": "an integer",
        "float_type": "a number",
        "bool_type": "a boolean (true or false)",
        "string_type": "a string",
    }.get(kind)
    if allowed:
        return f"{key}: {value!r} is not {allowed}"
    if kind == "literal_error":
        return f"{key}: {value!r} is not allowed; allowed: {error['ctx']['expected'].replace(' or ', ', ')}"
    return f"{key}: {value!r}: {message[0].lower()}{message[1:]}"


def _section(loc: list[str]) -> type[BaseModel]:
    model: type[BaseModel] = Config
    for part in loc:
        annotation = model.model_fields[part].annotation
        options = [
            a for a in (get_args(annotation) or (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if not options:
            break
        model = options[0]
    return model


def flatten(model: BaseModel, prefix: str = "") -> dict[str, Any]:
    """``Config`` -> {"train.arch": "resnet18", ...} (tuples become lists)."""
    out: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out.update(flatten(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = as_lists(value)
    return out


def as_lists(value: Any) -> Any:
    """Tuples (nested too) as lists, as they read in params.yaml."""
    return [as_lists(v) for v in value] if isinstance(value, tuple) else value


def select(cfg: Config, keys: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """The flattened params under ``keys`` (a key names one value or a whole section)."""
    return select_flat(flatten(cfg), keys)


def select_flat(flat: dict[str, Any], keys: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``select`` on params already flattened (dotted keys)."""
    return {k: v for k, v in flat.items() if any(k == d or k.startswith(d + ".") for d in keys)}
