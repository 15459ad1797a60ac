"""The configuration of a training job: YAML plus `key=value` overrides, into dataclasses.

    config = load_config(TrainConfig, "job.yaml", ["trainer.lr=1e-5", "rollout.workers=2"])

Every section is a dataclass with a docstring per field. Loading is strict: an unknown
key, a value of the wrong type or an override for a field that does not exist raises
`ConfigError` naming the dotted key, so a typo never silently runs the default. Override
values are parsed as YAML (`3` is an int, `1e-5` a float, `[a, b]` a list, `null` None).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key."""


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] = ()) -> Any:
    """Build `cls` from the YAML file at `path` (optional) with `overrides` applied on top."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path}: expected a mapping at the top, got {type(loaded).__name__}")
        data = loaded or {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value")
        _seed_default_dicts(cls, data, key.strip())
        _set_dotted(data, key.strip(), _parse_value(raw))
    return from_dict(cls, data)


def _seed_default_dicts(cls: type, data: dict[str, Any], key: str) -> None:
    """An override inside a dict-valued field (`task.source.verifier=...`) changes that key
    of the field's current value, the default when the YAML left it out, instead of
    replacing the whole dict with a one-key dict."""
    parts = key.split(".")
    node, owner = data, cls
    for i, part in enumerate(parts[:-1]):
        fields = {f.name: f for f in dataclasses.fields(owner)} if dataclasses.is_dataclass(owner) else {}
        field = fields.get(part)
        if field is None:
            return  # from_dict names the unknown key
        hint = typing.get_type_hints(owner)[part]
        if dataclasses.is_dataclass(hint):
            node, owner = node.setdefault(part, {}), hint
            if not isinstance(node, dict):
                return
            continue
        if part not in node and field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
            if isinstance(default, dict):
                node[part] = default
        return


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """The dataclass `cls` from plain data, checking keys and types (recursively)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {unknown}; known: {sorted(fields)}")
    kwargs = {name: _coerce(hints[name], value, _join(where, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """Plain data (for YAML, JSON, checkpoints): the inverse of `from_dict`."""
    return dataclasses.asdict(config)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {hint}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if hint is Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        item = args[0] if args else Any
        return origin(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-5" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _parse_value(raw: str) -> Any:
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):
        # YAML 1.1 reads "1e-5" (no dot) as a string; on a command line it means a number.
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node = child
    node[last] = value


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name
