"""Frozen config dataclasses <-> JSON, and type-checked ``key=value`` overrides.

Every model config, recipe section and data spec is a frozen dataclass. This module turns them into
plain JSON and back (reconstructing nested dataclasses and tuples from the type hints), and applies
overrides such as ``model.num_prototypes=20`` with a clear error naming the key when the key does
not exist or the value has the wrong type.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union

__all__ = ["to_jsonable", "from_jsonable", "apply_overrides", "parse_override_value", "ConfigError", "OverrideError"]


class ConfigError(ValueError):
    """A configuration is refused: unreadable, incomplete, of an unknown version, or of a wrong type."""


class OverrideError(ConfigError):
    """A configuration key does not exist or a value has the wrong type."""


def to_jsonable(obj: Any) -> Any:
    """Convert dataclasses, tuples and floats (inf/nan) into JSON-safe structures."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, float) and (math.isinf(obj) or math.isnan(obj)):
        return str(obj)  # JSON has no inf/nan literal; from_jsonable reads them back via float()
    return obj


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_jsonable(tp: Any, value: Any, where: str = "config") -> Any:
    """Rebuild a value of type ``tp`` (a dataclass, tuple[...], Optional, Literal, primitive).

    Raises:
        OverrideError: naming ``where`` when the value cannot be of that type.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return from_jsonable(arg, value, where)
            except OverrideError as err:
                errors.append(str(err))
        if len(errors) == 1:  # X | None: say what is wrong with the X
            raise OverrideError(errors[0])
        raise OverrideError(f"{where}: {value!r} matches none of {tp} ({'; '.join(errors)})")
    if origin is Literal:
        if value not in args:
            raise OverrideError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise OverrideError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        hints = _hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        unknown = set(value) - names
        if unknown:
            raise OverrideError(f"{where}: unknown key(s) {sorted(unknown)} for {tp.__name__}; valid keys: {sorted(names)}")
        kwargs = {k: from_jsonable(hints[k], v, f"{where}.{k}") for k, v in value.items()}
        return tp(**kwargs)
    if origin in (tuple, list):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise OverrideError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = tuple(from_jsonable(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        elif origin is tuple and args:
            if len(args) != len(value):
                raise OverrideError(f"{where}: expected {len(args)} values, got {len(value)}")
            items = tuple(from_jsonable(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        else:
            inner = args[0] if args else Any
            items = tuple(from_jsonable(inner, v, f"{where}[{i}]") for i, v in enumerate(value))
        return items if origin is tuple else list(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise OverrideError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise OverrideError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise OverrideError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and value.lower() in ("inf", "-inf", "nan"):
            return float(value)
        raise OverrideError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise OverrideError(f"{where}: expected a string, got {value!r}")
    return value


def parse_override_value(text: str) -> Any:
    """Parse the right-hand side of ``key=value`` as YAML (``3``, ``0.1``, ``true``, ``[1, 2]``)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise OverrideError(f"cannot parse override value {text!r}: {err}") from err


def apply_overrides(obj: Any, overrides: dict[str, Any], where: str = "") -> Any:
    """Return a copy of dataclass ``obj`` with dotted-key overrides applied and type-checked.

    ``apply_overrides(recipe, {"model.num_prototypes": 20, "optim.lr": 1e-3})``.

    Raises:
        OverrideError: for an unknown key (listing the valid ones) or a value of the wrong type.
    """
    grouped: dict[str, dict[str, Any]] = {}
    direct: dict[str, Any] = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if rest:
            grouped.setdefault(head, {})[rest] = value
        else:
            direct[key] = value
    names = {f.name for f in dataclasses.fields(obj)}
    hints = _hints(type(obj))
    changes: dict[str, Any] = {}
    for key in list(direct) + list(grouped):
        if key not in names:
            full = f"{where}{key}"
            if key in getattr(type(obj), "TRAINING_FIELDS_V1", ()):
                raise OverrideError(f"{full!r} is a training setting, not part of the model config: give it in the "
                                    f"recipe's training section (training.{key}=...) or to the family's training "
                                    "settings class")
            raise OverrideError(f"unknown key {full!r}; valid keys here: {sorted(names)}")
    for key, value in direct.items():
        changes[key] = from_jsonable(hints[key], value, f"{where}{key}")
    for key, sub in grouped.items():
        current = getattr(obj, key)
        if not dataclasses.is_dataclass(current):
            raise OverrideError(f"{where}{key} is not a section; cannot set {sorted(sub)} inside it")
        changes[key] = apply_overrides(current, sub, f"{where}{key}.")
    return dataclasses.replace(obj, **changes)
