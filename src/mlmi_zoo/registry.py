"""One strict registry of architectures, and the list of bundled pretrained weights.

Names follow ``family_backbone`` for architectures and ``family_backbone.tag`` for weights. A
duplicate registration raises, so two modules can never silently shadow each other.
"""
from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from mlmi_zoo._config import ConfigError
from mlmi_zoo.base import CONFIG_FILE, InterpretableModel

__all__ = ["build_config", "register_backbones", "register_model", "create_model", "list_models", "get_entry", "model_entries", "bundled_dir", "UnknownModelError"]


class UnknownModelError(KeyError, ValueError):
    """A model name that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; a user wants the sentence
        return str(self.args[0])


@dataclass(frozen=True)
class ModelEntry:
    """A registered architecture: its factory and the model class the factory builds."""

    name: str
    factory: Callable[..., InterpretableModel[Any]]
    model_class: type[InterpretableModel[Any]]
    doc: str


_REGISTRY: dict[str, ModelEntry] = {}
F = TypeVar("F", bound=Callable[..., InterpretableModel[Any]])


def register_model(name: str) -> Callable[[F], F]:
    """Register a factory ``fn(**overrides) -> model`` under ``name``.

    The factory's return annotation names the model class, so a saved ``config.json`` can be read
    back into the right config dataclass.

    Raises:
        ValueError: when ``name`` is already registered, or the factory has no model-class annotation.
    """

    def decorator(fn: F) -> F:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered (by {_REGISTRY[name].factory.__module__}); names must be unique")
        hints = typing.get_type_hints(fn)
        cls = hints.get("return")
        if not (isinstance(cls, type) and issubclass(cls, InterpretableModel)):
            raise ValueError(f"factory {fn.__qualname__} must be annotated to return an InterpretableModel subclass")
        _REGISTRY[name] = ModelEntry(name, fn, cls, (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "")
        return fn

    return decorator


def build_config(config_class: type, backbone: str, overrides: dict[str, Any]) -> Any:
    """A family's config for ``backbone`` with ``overrides`` type-checked against its fields."""
    from mlmi_zoo._config import apply_overrides

    if "backbone" in overrides:
        raise ValueError("`backbone` is part of the model name; pick the registered name with that backbone instead")
    return apply_overrides(config_class(backbone=backbone), overrides)


def register_backbones(model_class: type[InterpretableModel[Any]], backbones: tuple[str, ...], summary: str) -> None:
    """Register ``f"{family}_{backbone}"`` for each backbone with the standard factory.

    The factory builds ``model_class(config)`` from the family's config dataclass with the backbone set
    and the overrides type-checked. ``summary`` is formatted with ``{backbone}``.
    """

    def factory(backbone: str) -> Callable[..., InterpretableModel[Any]]:
        def build(**overrides: Any) -> InterpretableModel[Any]:
            return model_class(build_config(model_class.config_class, backbone, overrides))

        build.__doc__ = summary.format(backbone=backbone)
        build.__annotations__["return"] = model_class
        build.__qualname__ = f"{model_class.family}_{backbone}"
        return build

    for backbone in backbones:
        register_model(f"{model_class.family}_{backbone}")(factory(backbone))


def _ensure_registered() -> None:
    # Importing the architectures package runs every family's @register_model.
    importlib.import_module("mlmi_zoo.architectures")


def model_entries() -> dict[str, ModelEntry]:
    """All registered architectures, by name."""
    _ensure_registered()
    return dict(_REGISTRY)


def get_entry(name: str) -> ModelEntry:
    """Return the registry entry for an architecture name, or raise naming close matches."""
    entries = model_entries()
    if name not in entries:
        close = [n for n in entries if n.split("_")[0] == name.split("_")[0]] or sorted(entries)[:10]
        raise UnknownModelError(f"unknown architecture {name!r}; registered ones include {close}. See `mlmi-zoo list`.")
    return entries[name]


def create_model(name: str, **overrides: Any) -> InterpretableModel[Any]:
    """Build a registered architecture with random initialisation.

    Args:
        name: ``family_backbone`` (see :func:`list_models`).
        overrides: config fields, type-checked against the family's config dataclass.
    """
    entry = get_entry(name)
    model = entry.factory(**overrides)
    if model.architecture != name:
        raise ValueError(f"{name!r} built a model that calls itself {model.architecture!r}; do not override `backbone` here")
    return model


def bundled_dir() -> Path:
    """The folder of bundled pretrained models (``model_cards/`` in the repository)."""
    # find_spec locates the folder without importing the card tooling (and its dependencies).
    spec = importlib.util.find_spec("mlmi_zoo.model_cards")
    assert spec is not None and spec.submodule_search_locations is not None  # a package of this distribution
    return Path(next(iter(spec.submodule_search_locations)))


def _bundled_weights() -> list[str]:
    root = bundled_dir()
    return sorted(p.parent.name for p in root.glob(f"*/{CONFIG_FILE}") if "." in p.parent.name)


def list_models(pattern: str | None = None, pretrained: bool = False) -> list[str]:
    """Names of registered architectures, or of bundled pretrained weights when ``pretrained``.

    Args:
        pattern: a shell-style filter such as ``"protopnet_*"``.
        pretrained: list ``family_backbone.tag`` weights that ship with the package (offline).
    """
    names = _bundled_weights() if pretrained else sorted(model_entries())
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def read_config(directory: Path) -> dict[str, Any]:
    """Read a model folder's config.json, with a clear error when it is missing or invalid.

    Raises:
        FileNotFoundError: when there is no config.json.
        ConfigError: when it is not valid JSON, or not a JSON object.
    """
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a model folder holds config.json and model.safetensors")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(doc, dict):
        kind = {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(doc), "number")
        raise ConfigError(f"{path} holds a JSON {kind}; expected an object with architecture, config and "
                          "weights_sha256")
    return doc
