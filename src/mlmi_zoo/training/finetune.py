"""Fine-tune a zoo model on a user's own data (which never leaves the machine), refusing data that cannot work.

``finetune("protopnet_resnet8.lidc_nodule", "my_data/cases.csv")`` loads the model with the classes
of the data (heads whose shape changes are re-initialised and listed in ``model.load_report.skipped``),
trains the stages the base model was trained with (for prototype models this includes the push onto
the new training data, so every prototype is again a real patch of the user's images) on a schedule
derived from the size of the data (see "Defaults" below) and writes a model folder whose ``config.json``
records the base model (``base_model``), the pretrained weights the parent's backbone started from
(``base_weights``, inherited), a description of the data (checksums, split sizes — never the data)
and what fine-tuning adapted to the data (``finetune``). The parent's intensity transform, with the normalisation its base
weights expect, and its training settings (loss coefficients, push choices) carry over.

Before the first epoch :func:`plan_finetune` checks that the data give what the base model and its
stages need, and refuses with the reason and the fix when they do not, so that nothing fails after
training and no run folder is left that looks like a finished model:

* columns: the CSV's spacing (``spacing_mm``, or ``spacing_y_mm`` / ``spacing_x_mm``), the
  measurements a physical head predicts (``diameter_mm``, any ``<quantity>_<unit>`` it names),
  the concepts a bottleneck predicts and a ``mask`` column are found in the header and passed to
  the loader (:mod:`mlmi_zoo.training.datasets.folder_csv`); a physical head without spacing or
  measurements is refused, unless ``model.config.quantities=[]`` drops it (recorded); a bottleneck
  whose concepts the data do not carry is refused, unless ``concepts=`` replaces them with the
  user's own concept columns (:mod:`mlmi_zoo.training.user_concepts`; recorded; the concept and
  label heads start afresh);
* lesion masks: settings that need them (push onto lesion patches, the fine-annotation cost, the
  count map's fit: :data:`MASK_GUIDED_SETTINGS`) are inherited when the data have masks; without
  masks they are switched to their mask-free form and the switch is recorded; a user's explicit
  request for one of them without masks is refused;
* images: channels and spatial dimensions of the base model, one image size;
* intensity: through the base model's intensity transform the training images must neither become
  a near-constant image (8-bit PNGs through a HU window) nor land far outside ``[0, 1]`` (raw HU
  into a model that expects ``[0, 1]``). ``intensity="refit"`` instead re-fits a window to the
  0.5th-99.5th percentiles of the training images and records it; ``"keep"`` trains without the check;
* labels: at least two classes, every class with training cases (the class set is what the data
  hold: labels ``0`` and ``2`` give two classes named ``"0"`` and ``"2"``).

A folder with one sub-folder per class (``DIR/<class>/<image>``, torchvision's ImageFolder layout)
is listed into ``RUN_DIR/image_folder.csv`` and read like a CSV; training and validation cases are
split by a permutation seeded with ``seed`` (``val_fraction`` held out).

Defaults, for what the caller does not say (every layer trains, the base model's stages on a budget of
optimiser steps, no early stopping, the epoch with the best validation AUROC kept, and per family the
training settings and configuration chosen on choosing data) are :mod:`mlmi_zoo.training.finetune_defaults`,
which says what each is and how it was chosen; ``finetune.schedule`` in ``config.json`` records the
result and which values were defaults. Explicit arguments and dotted overrides win over them.
How the defaults transfer to data they were not chosen on is measured by
``bench/bench_transfer.py`` (3D vessels and adrenal glands, mammogram and fundus patches).

It is a thin layer over the trainer: it writes a :class:`~mlmi_zoo.training.recipe.Recipe` with
``model.init_from``, ``model.freeze`` and the stages set, so a fine-tuning run is resumable and
reproducible like any other (``RUN_DIR/recipe.yaml``). :func:`evaluation_data_spec` builds the data
spec that ``mlmi-zoo evaluate MODEL --test-csv`` / ``--test-dir`` evaluates.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from mlmi_zoo.base import InterpretableModel
from mlmi_zoo.training.data_spec import DataSpec, build_dataset
from mlmi_zoo.training.finetune_checks import (_label_problems, _physical_problems, _unreadable_problems,
                                               check_images)
from mlmi_zoo.training.finetune_data import (_LISTING, _REFIT_PERCENTILES, INTENSITY_MODES, FinetuneDataError,
                                             IntensityMode, _bag_problems, _columns_for, _has_class_folders,
                                             _header_of, _overridden_quantities, _own_concepts, _report,
                                             _sample_indices, bag_spec_from_path, data_spec_from_path,
                                             evaluation_data_spec)
from mlmi_zoo.training.finetune_defaults import (DEFAULT_CONFIG, DEFAULT_FREEZE, DEFAULT_PATIENCE, DEFAULT_STEPS,
                                                 DEFAULT_TRAINING, MIN_STEPS, STEP_VOXELS, _check_budget,
                                                 _stages_for_settings, _training_defaults, default_stages,
                                                 default_steps)
from mlmi_zoo.training.push_check import PUSH_DROP_WARNING, _record_push_check, push_check
from mlmi_zoo.training.recipe import ModelSection, OptimSection, Recipe, StageSection, apply_recipe_overrides

__all__ = ["finetune", "plan_finetune", "FinetunePlan", "FinetuneDataError", "data_spec_from_path",
           "evaluation_data_spec", "check_images", "default_stages", "default_steps", "MASK_GUIDED_SETTINGS",
           "MaskGuided", "INTENSITY_MODES", "DEFAULT_FREEZE", "DEFAULT_STEPS", "STEP_VOXELS", "MIN_STEPS",
           "DEFAULT_PATIENCE", "DEFAULT_TRAINING", "DEFAULT_CONFIG", "IN_MEMORY_BYTES", "push_check",
           "PUSH_DROP_WARNING"]

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class MaskGuided:
    """A training setting that needs lesion masks, and its mask-free form.

    Attributes:
        off: the value that uses no mask.
        meaning: what training does with ``off`` (recorded with the switch).
        applies: whether the setting acts on this model at all (no record of a switch that changes nothing).
    """

    off: Any
    meaning: str
    applies: Callable[[InterpretableModel], bool] = lambda model: True


# Training settings (any family's) that need lesion masks; keyed by setting name, so a family gets
# the rule by naming its setting this way.
MASK_GUIDED_SETTINGS: dict[str, MaskGuided] = {
    "push_on_lesion": MaskGuided(False, "push projects prototypes onto any patch of the training images, not only "
                                        "onto lesions"),
    "fa_coef": MaskGuided(0.0, "no fine-annotation cost (it penalises evidence outside the lesion mask)"),
    "measure_map_coef": MaskGuided(0.0, "the physical head's map is not fitted to masks; it learns from the "
                                        "measured values alone", applies=lambda model: bool(model.config.quantities)),
}


IN_MEMORY_BYTES = 2 << 30  # a user's decoded images up to this size are held in memory during fine-tuning


@dataclass(frozen=True)
class FinetunePlan:
    """A checked fine-tuning run, ready for the trainer.

    Attributes:
        recipe: the resolved recipe (``model.init_from`` = the base model).
        run_dir: the run folder; the model will be ``run_dir/final``.
        record: what fine-tuning adapted to the data, written to ``final/config.json`` as ``finetune``.
    """

    recipe: Recipe
    run_dir: Path
    record: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------
def _parent_training(doc: Mapping[str, Any], model: InterpretableModel
                     ) -> tuple[dict[str, Any], list[StageSection], float | None]:
    """The base model's training settings, stages (name, epochs, lr) and peak learning rate, from its config.json."""
    from mlmi_zoo.base import migrate_config

    raw = doc.get("recipe")
    recipe: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    _, moved = migrate_config(type(model).config_class, dict(doc["config"]), int(doc.get("config_version", 1)))
    training = {**moved, **dict(recipe.get("training") or {})}
    stages = [StageSection(str(s["name"]), int(s.get("epochs") or 1),
                           None if s.get("lr") is None else float(s["lr"]))
              for s in recipe.get("stages") or [] if isinstance(s, Mapping) and "name" in s]
    optim = recipe.get("optim")
    lr = optim.get("lr") if isinstance(optim, Mapping) else None
    return training, stages, None if lr is None else float(lr)


def _image_shape(dataset: Any) -> tuple[int, ...] | None:
    """The spatial shape of the first case's image (the step budget depends on it); None for cases
    without one (bags of cached features) or no case."""
    if len(dataset) == 0:
        return None
    image = dataset[0].get("image")
    return tuple(int(n) for n in image.shape[1:]) if isinstance(image, torch.Tensor) and image.ndim >= 3 else None


def _fits_in_memory(spec: DataSpec, train_set: Any, asked: set[str]) -> int | None:
    """The bytes of every decoded case of a user's CSV when they fit in :data:`IN_MEMORY_BYTES` (else None).

    Cases of a CSV depend only on their index, so holding them decoded
    (:class:`~mlmi_zoo.training.data_spec.MaterializedDataset`) changes nothing but speed: a NIfTI
    volume is otherwise decompressed again every epoch. Augmentation acts after the cache. Not when
    the user set ``data.cache`` themselves, nor for bags or other sources.
    """
    if spec.kind != "folder_csv" or spec.cache or "data.cache" in asked or not len(train_set):
        return None
    sample = train_set[0]
    per_case = sum(v.nbytes for v in sample.values() if torch.is_tensor(v))
    total = int(per_case * len(train_set) / max(1.0 - spec.val_fraction, 1e-6))  # the validation cases too
    return total if total <= IN_MEMORY_BYTES else None


def _has_masks(dataset: Any) -> bool:
    flag = getattr(dataset, "has_masks", None)
    if isinstance(flag, bool):
        return flag
    return len(dataset) > 0 and dataset[0].get("mask") is not None


def _model_for(recipe: Recipe) -> InterpretableModel:
    """The model as the trainer will build it from ``recipe`` (``init_from`` with the recipe's config keys)."""
    from mlmi_zoo.hub import load
    from mlmi_zoo.training.recipe import model_config

    section = recipe.model
    assert section.init_from is not None
    config = model_config(section)
    return load(section.init_from, **{k: getattr(config, k) for k in section.config})


def plan_finetune(
    name_or_uri: str,
    data: DataSpec | str | Path,
    label_names: Sequence[str] | None = None,
    freeze: Sequence[str] | None = None,
    epochs: int | None = None,
    out_dir: str | Path | None = None,
    lr: float | None = None,
    batch_size: int = 16,
    seed: int = 0,
    overrides: Sequence[str] = (),
    resume: bool = False,
    val_fraction: float = 0.2,
    intensity: IntensityMode = "check",
    patience: int | None = None,
    steps: int | None = None,
    concepts: Sequence[str] | None = None,
) -> FinetunePlan:
    """Check the data against the base model and write the recipe of a fine-tuning run (nothing is trained).

    Args: as :func:`finetune`.

    Returns:
        the plan: recipe, run folder and the record of what was adapted to the data.

    Raises:
        FinetuneDataError: the data do not give what the model or its stages need (every problem
            with its fix, in one message).
        ValueError: a CSV with bad rows (each named by row and column), bad arguments.
        FileNotFoundError: no such model or data.
        FileExistsError: ``out_dir`` already holds a run and ``resume`` is false.
        OverrideError: an unknown recipe key or a value of the wrong type.
    """
    import mlmi_zoo
    from mlmi_zoo.families import family_of
    from mlmi_zoo.training.checkpoint import find_checkpoint

    if intensity not in INTENSITY_MODES:
        raise ValueError(f"intensity must be one of {INTENSITY_MODES}, got {intensity!r}")
    _check_budget(epochs, steps, patience)
    if lr is not None and not lr > 0:
        raise ValueError(f"lr must be > 0 (or None: the base model's learning rates), got {lr}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1): a share of the data held out for validation, got {val_fraction}")
    parent = mlmi_zoo.load(name_or_uri)
    bags = family_of(parent).inputs == "bags"
    if bags and intensity == "refit":
        raise ValueError(f"{name_or_uri} takes bags of features; intensity='refit' applies to images only")
    run_dir = Path(out_dir) if out_dir is not None else Path(f"finetune-{parent.architecture}")
    if not resume and (find_checkpoint(run_dir / "checkpoints" / "last") is not None or (run_dir / "final").exists()):
        raise FileExistsError(f"{run_dir} already holds a run; pass resume=True (--resume) or another out_dir (--out)")
    created = not run_dir.exists()
    try:
        return _plan(parent, name_or_uri, data, run_dir, label_names=label_names, freeze=freeze, epochs=epochs,
                     lr=lr, batch_size=batch_size, seed=seed, overrides=overrides, resume=resume,
                     val_fraction=val_fraction, intensity=intensity, patience=patience, steps=steps, bags=bags,
                     concepts=concepts)
    except BaseException:
        if created and run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {_LISTING}:
            shutil.rmtree(run_dir)  # only the listing of a class folder was written: leave no run folder behind
        raise


def _plan(parent: InterpretableModel, name_or_uri: str, data: DataSpec | str | Path, run_dir: Path, *,
          label_names: Sequence[str] | None, freeze: Sequence[str] | None, epochs: int | None, lr: float | None,
          batch_size: int, seed: int, overrides: Sequence[str], resume: bool, val_fraction: float,
          intensity: IntensityMode, patience: int | None, steps: int | None, bags: bool = False,
          concepts: Sequence[str] | None = None) -> FinetunePlan:
    """The body of :func:`plan_finetune`, once the base model is loaded and the run folder chosen."""
    from mlmi_zoo.architectures.blocks.stages import training_for
    from mlmi_zoo.hub import resolve
    from mlmi_zoo.registry import read_config

    own_concepts = None if concepts is None else _own_concepts(parent, name_or_uri, data, concepts)
    if isinstance(data, DataSpec):
        spec = data
    elif bags:
        spec = bag_spec_from_path(data, label_names, val_fraction=val_fraction, split_seed=seed)
    else:
        path = Path(data)
        header = _header_of(path)
        columns, problems = _columns_for(parent, header, "image", "label", require=True,
                                         concepts=None if own_concepts is None else [c.name for c in own_concepts],
                                         quantities=_overridden_quantities(overrides))
        if problems:
            raise FinetuneDataError(_report(f"cannot fine-tune {name_or_uri} on {path}", problems))
        listing = run_dir / _LISTING if _has_class_folders(path) else None
        before = listing.read_text(encoding="utf-8") if listing is not None and listing.is_file() else None
        spec = data_spec_from_path(path, label_names, val_fraction=val_fraction, split_seed=seed, columns=columns,
                                   listing=listing)
        if listing is not None and resume and before is not None and before != listing.read_text(encoding="utf-8"):
            listing.write_text(before, encoding="utf-8")
            raise ValueError(f"{path} changed since the run in {run_dir} started (its listing {listing} differs); "
                             "resume with the same images or start a new run")
    names = tuple(label_names) if label_names is not None else tuple(getattr(build_dataset(spec, "train"), "label_names"))
    log.info("classes, in index order: %s", ", ".join(names))

    inherited, parent_stages, parent_lr = _parent_training(read_config(resolve(name_or_uri)), parent)
    adapter = training_for(parent)
    if not parent_stages or not all(s.name in adapter.stage_names for s in parent_stages):
        parent_stages = [StageSection(name) for name in adapter.stage_names]  # equal shares of the budget
    known = {f.name for f in dataclasses.fields(adapter.settings_class)}
    frozen = DEFAULT_FREEZE if freeze is None else tuple(freeze)
    training_defaults = _training_defaults(adapter.family, inherited, known, overrides)
    asked = {o.partition("=")[0].strip() for o in overrides}
    fields = {f.name for f in dataclasses.fields(parent.config)}
    config_defaults = {k: v for k, v in DEFAULT_CONFIG.get(adapter.family, {}).items()
                       if k in fields and getattr(parent.config, k) != v}

    def resolved(stages: tuple[StageSection, ...]) -> Recipe:
        """The recipe with ``stages``, the user's overrides applied (type-checked, defaults filled)."""
        config: dict[str, Any] = {"label_names": list(names), **config_defaults}
        if own_concepts is not None:  # the user's bottleneck; area maps name the base model's concepts
            config.update(concepts=[c.to_dict() for c in own_concepts], area_maps=[])
        recipe = Recipe(
            model=ModelSection(parent.architecture, config, init_from=str(name_or_uri), freeze=frozen),
            data=spec,
            optim=OptimSection(name="adamw", lr=lr or parent_lr or OptimSection.lr, batch_size=batch_size,
                               schedule="cosine"),
            stages=stages,
            training={**{k: v for k, v in inherited.items() if k in known}, **training_defaults},
            seed=seed,
            select_metric="val_auroc",
            validate="where_used",
        )
        return apply_recipe_overrides(recipe, list(overrides))

    # The schedule depends on the training split's size, which overrides (data.val_fraction ...) may change.
    recipe = resolved(tuple(parent_stages))
    parent_stages, switched = _stages_for_settings(parent_stages, training_for(parent, recipe.training), parent_lr)
    train_set = build_dataset(recipe.data, "train")
    unreadable = _unreadable_problems(train_set)
    if unreadable:  # before any case is decoded
        raise FinetuneDataError(_report(f"cannot fine-tune {name_or_uri} on {data}", unreadable))
    stages, schedule = default_stages(parent_stages, adapter.special_stages, len(train_set), recipe.optim.batch_size,
                                      epochs=epochs, lr=lr, patience=patience, steps=steps,
                                      image_shape=_image_shape(train_set))
    in_memory = _fits_in_memory(recipe.data, train_set, asked=asked)
    if in_memory is not None:  # decode each file once, not once per epoch
        spec = dataclasses.replace(spec, cache=True)
        schedule["in_memory_mib"] = round(in_memory / 2**20, 3)
    recipe = resolved(stages)  # the user's stages.N.* overrides win over the derived stages
    schedule.update(freeze=list(recipe.model.freeze), stages=[dataclasses.asdict(s) for s in recipe.stages],
                    training={k: recipe.training[k] for k in training_defaults},
                    config={k: recipe.model.config[k] for k in config_defaults},
                    defaults=[name for name, given in (("freeze", freeze), ("epochs", epochs), ("lr", lr),
                                                       ("patience", patience), ("steps", steps)) if given is None])
    record: dict[str, Any] = {"base_model": str(name_or_uri), "intensity": intensity, "schedule": schedule,
                              "changes": []}
    if switched is not None:
        record["changes"].append(switched)

    # Settings that need lesion masks: inherited ones switch to their mask-free form, asked-for ones are refused.
    if not _has_masks(train_set):
        training = dict(recipe.training)
        refused = []
        for key, rule in MASK_GUIDED_SETTINGS.items():
            off = rule.off
            if key not in training or training[key] == off or not rule.applies(parent):
                continue
            if f"training.{key}" in asked or f"model.config.{key}" in asked:
                refused.append(f"training.{key}={training[key]!r} needs lesion masks and the data have none: add a "
                               "'mask' column (mask image paths) or drop the override")
                continue
            record["changes"].append({"key": f"training.{key}", "from": training[key], "to": off,
                                      "reason": f"the data have no lesion masks: {rule.meaning}"})
            training[key] = off
        if refused:
            raise FinetuneDataError(_report(f"cannot fine-tune {name_or_uri}", refused))
        if record["changes"]:
            recipe = dataclasses.replace(recipe, training=training)
            for change in record["changes"]:
                log.warning("fine-tuning without lesion masks: %s %r -> %r (%s)", change["key"], change["from"],
                            change["to"], change["reason"])

    kept = _overridden_quantities(overrides)
    if kept is not None and kept != [q.name for q in parent.config.quantities]:
        record["changes"].append({"key": "model.config.quantities", "from": [q.name for q in parent.config.quantities],
                                  "to": kept, "reason": "override: the physical head measures these only"})
    if own_concepts is not None:
        record["changes"].append({"key": "model.config.concepts",
                                  "from": [c.name for c in parent.config.concepts],
                                  "to": [f"{c.name} ({c.kind})" for c in own_concepts],
                                  "reason": "the user's own concept columns (concepts=): the concept and label heads "
                                            "start afresh"})
    problems = _label_problems(train_set, recipe.model.config.get("label_names", names), recipe.data.val_fraction)
    if own_concepts is not None and "spacing_columns" not in recipe.data.params:
        from mlmi_zoo.architectures.blocks.heads import spacing_exponent

        sized = [c.name for c in own_concepts if c.kind == "continuous" and spacing_exponent(c.unit or "")]
        if sized:
            problems.append(f"the concept(s) {sized} are sizes in physical units and need each image's pixel spacing: "
                            "add a column 'spacing_mm' holding e.g. '0.7x0.7' (mm per axis)")
    if intensity == "refit":
        if any(k.startswith("model.config.intensity") for k in asked):
            raise ValueError("intensity='refit' and a model.config.intensity override both set the intensity "
                             "transform; keep one")
        image_problems, fitted = check_images(parent, train_set, "refit")
        problems += image_problems
        if fitted is not None:
            config = {**recipe.model.config, "intensity": fitted}
            recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, config=config))
            before_text = parent.input_spec.intensity.describe()
            record["changes"].append({"key": "model.config.intensity", "from": before_text,
                                      "to": f"window [{fitted['low']:.4g}, {fitted['high']:.4g}] -> [0, 1]",
                                      "reason": f"re-fitted to the {_REFIT_PERCENTILES[0]}th-{_REFIT_PERCENTILES[1]}th "
                                                "percentiles of the training images (intensity='refit')"})
            log.warning("intensity transform re-fitted to the training images: window [%.4g, %.4g] -> [0, 1] "
                        "(the base model's: %s)", fitted["low"], fitted["high"], before_text)
    if problems:
        raise FinetuneDataError(_report(f"cannot fine-tune {name_or_uri} on {data}", problems))

    model = _model_for(recipe)  # as the trainer will build it: the recipe's classes, intensity and config keys
    training_for(model, recipe.training)  # refuses settings this model cannot train with
    samples = [train_set[i] for i in _sample_indices(len(train_set), 4)]
    if bags:
        problems = _bag_problems(model, train_set, samples)
    else:
        problems = _physical_problems(model, train_set, samples)
        problems += check_images(model, train_set, "keep" if intensity == "keep" else "check")[0]
    if problems:
        raise FinetuneDataError(_report(f"cannot fine-tune {name_or_uri} on {data}", problems))
    return FinetunePlan(recipe, run_dir, record)


def finetune(
    name_or_uri: str,
    data: DataSpec | str | Path,
    label_names: Sequence[str] | None = None,
    freeze: Sequence[str] | None = None,
    epochs: int | None = None,
    out_dir: str | Path | None = None,
    lr: float | None = None,
    batch_size: int = 16,
    seed: int = 0,
    overrides: Sequence[str] = (),
    resume: bool = False,
    quiet: bool = False,
    val_fraction: float = 0.2,
    intensity: IntensityMode = "check",
    patience: int | None = None,
    steps: int | None = None,
    concepts: Sequence[str] | None = None,
) -> Path:
    """Fine-tune ``name_or_uri`` on ``data`` and return the new model folder.

    Every check runs before the first epoch (:func:`plan_finetune`); ``final/`` is written only when
    training ends, in one rename.

    Args:
        name_or_uri: a bundled name, ``hf-hub:ORG/REPO``, ``local-dir:PATH`` or a model folder.
        data: a data spec; a CSV or a folder with one CSV (see :func:`data_spec_from_path`); or a
            folder with one sub-folder per class.
        label_names: the classes in index order (default: the labels the data hold, sorted).
        freeze: parameter-name prefixes kept frozen (``()`` trains everything; default
            :data:`DEFAULT_FREEZE`).
        epochs: epochs of each gradient stage of the base model's stages (default: derived from
            the step budget and the number of training cases, see :func:`default_stages`).
        out_dir: run directory (default ``finetune-<architecture>``); the model is ``out_dir/final``.
        lr: peak learning rate of every gradient stage (default: the base model's, stage by stage).
        batch_size: batch size.
        seed: seed of the train/val split, initialisation of the re-initialised heads and data order.
        overrides: further recipe ``key=value`` overrides, e.g. ``["training.fa_coef=0",
            "data.params.channels=1"]``.
        resume: continue an interrupted fine-tuning run in ``out_dir``.
        quiet: no progress bars.
        val_fraction: share of a CSV or image folder held out for validation.
        intensity: ``"check"`` refuses images that the base model's intensity transform would turn
            into a near-constant image or push far out of range; ``"refit"`` re-fits a window to the
            training images (recorded); ``"keep"`` trains without the check.
        patience: early stopping: a gradient stage stops after this many epochs without a better
            validation AUROC and continues from its best epoch (default :data:`DEFAULT_PATIENCE`:
            ``0``, every epoch runs).
        steps: optimiser steps shared by the gradient stages when ``epochs`` is not given (default
            :data:`DEFAULT_STEPS`, fewer for images of more than 2**17 pixels or voxels:
            :func:`~mlmi_zoo.training.finetune_defaults.default_steps`).
        concepts: a concept bottleneck on the user's own concepts: CSV columns, each ``NAME`` or
            ``NAME:KIND`` (:mod:`mlmi_zoo.training.user_concepts`); they replace the base model's
            concepts, whose concept and label heads then start afresh (default: the base model's
            concepts, read from columns of the same names).

    Returns:
        ``out_dir/final``, loadable with ``mlmi_zoo.load("local-dir:...")``; its config.json has
        ``base_model`` (the uri), the parent's ``base_weights`` (when it has them), ``data`` (the
        description of the data) and ``finetune`` (settings switched for the data, with the reason).

    Raises:
        FinetuneDataError, ValueError, FileNotFoundError, FileExistsError, OverrideError: see
            :func:`plan_finetune`; nothing is trained then.
    """
    from mlmi_zoo.training.trainer import train

    plan = plan_finetune(name_or_uri, data, label_names=label_names, freeze=freeze, epochs=epochs, out_dir=out_dir,
                         lr=lr, batch_size=batch_size, seed=seed, overrides=overrides, resume=resume,
                         val_fraction=val_fraction, intensity=intensity, patience=patience, steps=steps,
                         concepts=concepts)
    if any(s.name == "push" for s in plan.recipe.stages):
        log.info("fine-tuning a prototype model: prototypes will be pushed onto the new training data")
    final = train(plan.recipe, plan.run_dir, resume=resume, quiet=quiet, final_extra={"finetune": plan.record})
    _record_push_check(final, push_check(plan.run_dir / "metrics.jsonl"))
    return final
