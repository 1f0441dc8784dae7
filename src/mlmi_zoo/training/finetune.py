"""Fine-tune a zoo model on a user's own data (which never leaves the machine), refusing data that cannot work.

``finetune("protopnet_resnet8.lidc_nodule", "my_data/cases.csv")`` loads the model with the classes
of the data (heads whose shape changes are re-initialised and listed in ``model.load_report.skipped``),
trains the stages the base model was trained with (for prototype models this includes the push onto
the new training data, so every prototype is again a real patch of the user's images) on a schedule
derived from the size of the data (see "Defaults") and writes a model folder whose ``config.json``
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

Defaults, for what the caller does not say (:func:`default_stages`; ``finetune.schedule`` in
``config.json`` records the result and which values were defaults):

* **every layer trains** (``freeze=()``, :data:`DEFAULT_FREEZE`);
* **the base model's stages and learning rates**, in its order; its special stages (ProtoPNet's push
  and last-layer fit) run as it ran them (the last layer: 30 passes over the cached similarities);
* **epochs from a step budget**: the gradient stages share :data:`DEFAULT_STEPS` = 1000 optimiser
  steps in proportion to the base model's epochs of each (ProtoPNet's warmup : joint, e.g. 3 : 9),
  so a stage runs ``max(1, round(share * 1000 / ceil(train_cases / batch_size)))`` epochs with a
  cosine decay of its rate: 600 images (480 after the validation split), batch 16, give 33 epochs
  of one baseline stage; 6000 images give 3;
* **decoded once**: a CSV's images whose decoded tensors fit in :data:`IN_MEMORY_BYTES` (2 GiB) are
  held in memory (``data.cache``; ``finetune.schedule.in_memory_mib`` records it);
* **prototypes learnt where push will put them** (:data:`DEFAULT_TRAINING`): a prototype model's
  cluster cost measures distances over the cells push may project onto (its foreground, off the
  border, lesions; ``training.cluster_on_push_cells``), so push does not move a prototype learnt on
  the background onto an unrelated patch; ``training.cluster_on_push_cells=false`` trains as the
  base model was trained;
* **a bottleneck's label head learns from predictions and corrections** (:data:`DEFAULT_TRAINING`,
  :data:`DEFAULT_CONFIG`): the bottleneck holds calibrated probabilities
  (``model.config.calibrated_concepts``: a rare concept reads near 0 where it is absent, as its
  correction does, not near 0.5), and the label head is fitted on the frozen concept model's
  predictions (``training.mode=sequential``) with each annotated concept of a training case replaced
  by its true value with probability ``training.intervention_rate=0.25``, so it reads both the
  predictions nobody corrects and the corrections a user makes; ``training.mode=independent`` (the
  head on true concepts only; no rate) or ``joint`` (its stages follow the mode) override it;
* **validation where it is used** (``validate="where_used"``): every epoch of the last stage (the
  selection) and of a stage with a patience, the last epoch of the other stages, every special stage
  (ProtoPNet's warm-up and joint epochs are not scored one by one: nothing reads those numbers);
  ``validate=every_epoch`` logs them all;
* **no early stopping** (:data:`DEFAULT_PATIENCE` = 0); ``patience=N`` stops a gradient stage after
  N epochs without a better validation AUROC and continues from its best epoch. The delivered
  weights are those the trainer selects: the epoch of the last stage with the best validation
  AUROC (for ProtoPNet the last stage is the last-layer fit, after push), on the validation split
  carved from the user's data (``val_fraction``).

They were chosen on two data sets only, PneumoniaMNIST (as RGB PNGs, fine-tuning the RetinaMNIST
models) and RetinaMNIST binarised as grade 0 vs >= 1 (as greyscale PNGs, fine-tuning the
PneumoniaMNIST models), 600 training images each: among a one-factor-at-a-time grid around
"train all, 1000 steps, patience 5, the base model's rates" (``bench/bench_transfer.py --choose``;
the table is in ``bench/README.md``), the configuration with the best validation AUROC (the data
sets' official validation splits, never their test splits), averaged over ProtoPNet and the
baseline, both data sets and three seeds. Mean validation AUROC: 0.879 as above; 0.842 with
patience 5 and 0.852 with patience 10 (a validation split of ~120 images is too noisy to stop on),
0.854 with 300 steps and 0.869 with 3000, 0.865 with ``lr=3e-4`` everywhere, 0.865 with the stem
frozen and 0.686 with the backbone frozen; the previous defaults (backbone frozen, 3 epochs per
stage, ``lr=1e-3``, 3 last-layer passes) 0.566. A later round added ``cluster_on_push_cells`` to
that configuration: 0.884 (ProtoPNet on RetinaMNIST 0.760 -> 0.788; the baselines do not have it).
A bottleneck's training was chosen on LIDC-IDRI nodules with the readers' shape ratings as the
user's concepts (``cbm_resnet8.nodule_phantom`` fine-tuned with ``--concepts``; the patient-split
validation nodules), three seeds each (``bench/README.md`` has the table). With class-balanced scores
in the bottleneck, mean validation AUROC is 0.889 independent, 0.892 sequential, 0.889 joint, 0.891
sequential and 0.885 joint with random interventions at 0.25, but in every one of them correcting
every concept to the readers' rating *lowers* the validation accuracy (0.821 -> 0.757 sequential with
random interventions). With calibrated probabilities: 0.882 independent (accuracy 0.732 -> 0.771 with
every concept corrected), 0.887 sequential (0.805 -> 0.789), 0.885 sequential with random
interventions (0.774 -> 0.784). The rule: the best mean AUROC among the configurations where
correcting every concept does not lower the accuracy; sequential with random interventions on a
calibrated bottleneck is the only one besides calibrated independent (0.882) and is the default.
The rate is Espinosa Zarlenga et al.'s (NeurIPS 2022), not tuned. This choice is not blind to the
transfer benchmark: its MIAS rows showed first that the independent head is far from the black box
and that a sequential head breaks interventions, and calibration was tried after the MIAS rows with
random interventions alone still broke them; the rule above was written after those rows were seen.
Attention MIL's settings were checked on LIDC-IDRI nodules at 64³ as bags of axial slices
(``abmil_features.idrid_rdr`` fine-tuned on 600 training nodules, scored on the 261 validation nodules
of the patient split): mean validation AUROC over three seeds 0.868 with these defaults (range
0.860-0.875), 0.868 with top-instance masking at 0.5, 0.854 with bag normalisation, 0.872 with 300
steps (0.869-0.878) and 0.866 with ``lr=1e-4``; none is better beyond the seeds' spread, so a MIL
model fine-tunes with the shared defaults (the black box on the same bags: 0.878).
Explicit arguments
(``epochs``, ``steps``, ``patience``, ``lr``, ``freeze``) and dotted overrides
(``stages.1.epochs=10``) win over these.
How the defaults transfer to data they were not chosen on is measured by
``bench/bench_transfer.py`` (3D vessels and adrenal glands, mammogram and fundus patches).

It is a thin layer over the trainer: it writes a :class:`~mlmi_zoo.training.recipe.Recipe` with
``model.init_from``, ``model.freeze`` and the stages set, so a fine-tuning run is resumable and
reproducible like any other (``RUN_DIR/recipe.yaml``). :func:`evaluation_data_spec` builds the data
spec that ``mlmi-zoo evaluate MODEL --test-csv`` / ``--test-dir`` evaluates.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from mlmi_zoo._config import parse_override_value
from mlmi_zoo.base import InterpretableModel
from mlmi_zoo.training.data_spec import DataSpec, build_dataset
from mlmi_zoo.training.finetune_data import (_LISTING, _REFIT_PERCENTILES, INTENSITY_MODES, FinetuneDataError,
                                             IntensityMode, _bag_problems, _columns_for, _has_class_folders,
                                             _header_of, _label_problems, _overridden_quantities, _own_concepts,
                                             _physical_problems, _report, _sample_indices, bag_spec_from_path,
                                             check_images, data_spec_from_path, evaluation_data_spec)
from mlmi_zoo.training.recipe import ModelSection, OptimSection, Recipe, StageSection, apply_recipe_overrides

__all__ = ["finetune", "plan_finetune", "FinetunePlan", "FinetuneDataError", "data_spec_from_path", "evaluation_data_spec",
           "check_images", "default_stages", "MASK_GUIDED_SETTINGS", "MaskGuided", "INTENSITY_MODES", "DEFAULT_FREEZE",
           "DEFAULT_STEPS", "DEFAULT_PATIENCE", "DEFAULT_TRAINING", "DEFAULT_CONFIG", "IN_MEMORY_BYTES", "push_check", "PUSH_DROP_WARNING"]

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


# The defaults of fine-tuning (module docstring, "Defaults"): chosen on PneumoniaMNIST and RetinaMNIST
# (bench/bench_transfer.py --choose), never on the data sets the transfer benchmark reports.
DEFAULT_FREEZE: tuple[str, ...] = ()  # parameter prefixes kept frozen: none, every layer trains
DEFAULT_STEPS = 1000  # optimiser steps shared by the gradient stages
DEFAULT_PATIENCE = 0  # epochs without a better val AUROC before a gradient stage stops; 0: no early stopping
# Training settings fine-tuning sets over the base model's, per family; overrides win. Chosen like the
# rest on choosing data (bench/README.md): ProtoPNet's prototypes learnt on the cells push may use; a
# concept bottleneck's label head fitted on its predicted concepts with random corrections (module
# docstring: the rule and what it was not blind to).
DEFAULT_TRAINING: dict[str, dict[str, Any]] = {
    "protopnet": {"cluster_on_push_cells": True},
    "cbm": {"mode": "sequential", "intervention_rate": 0.25},
}
# Model configuration fine-tuning sets over the base model's, per family; model.config overrides win: a
# concept bottleneck holds calibrated probabilities, so its predictions and a user's corrections are on
# one scale.
DEFAULT_CONFIG: dict[str, dict[str, Any]] = {"cbm": {"calibrated_concepts": True}}
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


def _check_budget(epochs: int | None, steps: int | None, patience: int | None) -> None:
    """Refuse a budget that cannot run: ``epochs`` or ``steps`` below 1, ``patience`` below 0 (None: the default)."""
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be >= 1 (or None: derived from the step budget), got {epochs}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1 (or None: {DEFAULT_STEPS}), got {steps}")
    if patience is not None and patience < 0:
        raise ValueError(f"patience must be >= 0 epochs (0: no early stopping), got {patience}")


def default_stages(parent_stages: Sequence[StageSection], special: Sequence[str], train_cases: int, batch_size: int,
                   epochs: int | None = None, lr: float | None = None, patience: int | None = None,
                   steps: int | None = None) -> tuple[tuple[StageSection, ...], dict[str, Any]]:
    """The fine-tuning stages derived from the base model's stages and the size of the user's data.

    The rule (module docstring, "Defaults"): the base model's stages in its order; the gradient
    stages share ``steps`` optimiser steps (default :data:`DEFAULT_STEPS`) in proportion to the
    base model's epochs of each, so a stage runs ``max(1, round(share * steps / steps_per_epoch))``
    epochs, ``steps_per_epoch = ceil(train_cases / batch_size)``; each keeps the base model's
    learning rate and, with a ``patience`` (default :data:`DEFAULT_PATIENCE`; 0: none), stops after
    that many epochs without a better validation AUROC, continuing from its best epoch. Special
    stages (ProtoPNet's push and last-layer fit) run as the base model ran them.

    Args:
        parent_stages: the base model's stages (epochs and learning rate as it was trained).
        special: names of the family's special stages (not gradient descent).
        train_cases: training cases after the validation split.
        batch_size: images per optimiser step.
        epochs: epochs of every gradient stage instead of the step budget.
        lr: peak learning rate of every gradient stage instead of the base model's.
        patience: early-stopping patience in epochs; ``0`` runs every epoch.
        steps: optimiser steps shared by the gradient stages (default :data:`DEFAULT_STEPS`).

    Returns:
        ``(stages, record)``: the recipe stages and a JSON-safe description of how they were derived.

    Raises:
        ValueError: ``train_cases``, ``batch_size``, ``epochs`` or ``steps`` below 1, ``patience`` below 0,
            or no stage.
    """
    if train_cases < 1 or batch_size < 1:
        raise ValueError(f"train_cases and batch_size must be >= 1, got {train_cases} and {batch_size}")
    _check_budget(epochs, steps, patience)
    if not parent_stages:
        raise ValueError("parent_stages is empty; a fine-tuning run needs the base model's stages")
    budget = DEFAULT_STEPS if steps is None else steps
    wait = DEFAULT_PATIENCE if patience is None else patience
    steps_per_epoch = math.ceil(train_cases / batch_size)
    gradient = [s for s in parent_stages if s.name not in special]
    total = sum(s.epochs for s in gradient) or 1
    stages = []
    for stage in parent_stages:
        if stage.name in special:
            stages.append(StageSection(stage.name, stage.epochs, stage.lr))
            continue
        n = epochs if epochs is not None else max(1, round(stage.epochs / total * budget / steps_per_epoch))
        stages.append(StageSection(stage.name, n, stage.lr if lr is None else lr, wait or None))
    rule = ["epochs given" if epochs is not None else
            f"epochs from {budget} optimiser steps shared by the gradient stages in the base model's proportions",
            "learning rate given" if lr is not None else "the base model's learning rates",
            f"early stopping after {wait} epochs without a better val AUROC" if wait else "no early stopping"]
    record = {
        "rule": "; ".join(rule), "train_cases": train_cases, "steps_per_epoch": steps_per_epoch,
        "steps": budget if epochs is None else None, "patience": wait or None,
        "stages": [dataclasses.asdict(s) for s in stages],
    }
    return tuple(stages), record


def _training_defaults(family: str, inherited: Mapping[str, Any], known: set[str], overrides: Sequence[str]
                       ) -> dict[str, Any]:
    """The :data:`DEFAULT_TRAINING` settings that change the base model's, less those the user's own
    ``training.*`` overrides rule out: a bottleneck the user trains with ``training.mode=independent``
    fits its head on true concepts only, so the default intervention rate gives way."""
    defaults = {k: v for k, v in DEFAULT_TRAINING.get(family, {}).items() if k in known and inherited.get(k) != v}
    asked = {key.strip().removeprefix("training."): parse_override_value(value)
             for key, _, value in (o.partition("=") for o in overrides) if key.strip().startswith("training.")}
    if asked.get("mode", defaults.get("mode", inherited.get("mode"))) == "independent" and "intervention_rate" not in asked:
        defaults.pop("intervention_rate", None)
    return defaults


def _stages_for_settings(parent_stages: Sequence[StageSection], adapter: Any, parent_lr: float | None
                         ) -> tuple[list[StageSection], dict[str, Any] | None]:
    """The base model's stages, or those the training settings call for when they decide the stages
    (a concept bottleneck fine-tuned with another ``training.mode``): a stage the base model ran keeps
    its epochs and rate; a new one gets the epochs of all the base model's gradient stages (its share
    of the step budget) and the base model's peak rate.

    Returns:
        ``(stages, change)``: ``change`` is the record of the switch, None when the stages are the base model's.
    """
    wanted = adapter.stages_for_settings()
    names = [s.name for s in parent_stages]
    if wanted is None or list(wanted) == names:
        return list(parent_stages), None
    kept = {s.name: s for s in parent_stages}
    total = sum(s.epochs for s in parent_stages if s.name not in adapter.special_stages) or 1
    stages = [kept.get(name) or StageSection(name, total, parent_lr) for name in wanted]
    return stages, {"key": "stages", "from": names, "to": list(wanted),
                    "reason": "the training settings train these stages (e.g. a concept bottleneck's training.mode)"}


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
    stages, schedule = default_stages(parent_stages, adapter.special_stages, len(train_set), recipe.optim.batch_size,
                                      epochs=epochs, lr=lr, patience=patience, steps=steps)
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
            :data:`DEFAULT_STEPS`).
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


PUSH_DROP_WARNING = 0.1  # validation AUROC lost between the best epoch before push and the delivered weights


def push_check(metrics: str | Path) -> dict[str, Any] | None:
    """How much validation AUROC a prototype model lost in its push, from a run's ``metrics.jsonl``.

    ``before``: the best validation AUROC of the scored epochs before the push (with
    ``validate="where_used"``, the last epoch of each earlier stage); ``after``: the best of
    the push and the stages after it (the weights the trainer delivers come from there: an unpushed
    prototype model is not interpretable, so selection cannot go back before the push). ``dropped``
    when ``before - after`` exceeds :data:`PUSH_DROP_WARNING`.

    Returns:
        the check (values None where the validation split gave no AUROC, e.g. one class only), or None
        for a run without a push.
    """
    lines = [json.loads(x) for x in Path(metrics).read_text(encoding="utf-8").splitlines() if x.strip()]
    units = [x for x in lines if x.get("type") in ("epoch", "special_stage")]
    at = next((i for i, x in enumerate(units) if x.get("stage") == "push"), None)
    if at is None:
        return None
    def best(part: list[dict[str, Any]]) -> float | None:
        values = [x["val_auroc"] for x in part if isinstance(x.get("val_auroc"), (int, float))
                  and math.isfinite(x["val_auroc"])]
        return max(values) if values else None

    before, after = best(units[:at]), best(units[at:])
    drop = None if before is None or after is None else before - after
    return {"val_auroc_before_push": before, "val_auroc_after_push": after, "drop": drop,
            "dropped": bool(drop is not None and drop > PUSH_DROP_WARNING)}


def _record_push_check(final: Path, check: dict[str, Any] | None) -> None:
    """Add the push check to ``final/config.json`` (``finetune.push_check``) and warn when the push cost accuracy."""
    from mlmi_zoo._weights import write_json_atomic

    if check is None:
        return
    path = final / "config.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc.setdefault("finetune", {})["push_check"] = check
    write_json_atomic(path, doc)
    if check["dropped"]:
        log.warning("the push onto your training images lowered the validation AUROC from %.3f to %.3f and the "
                    "last-layer fit did not recover it; the delivered model is the pushed one. Try another --seed, "
                    "more --steps, or compare with the baseline before using it", check["val_auroc_before_push"],
                    check["val_auroc_after_push"])
