"""What fine-tuning does where the caller says nothing: the defaults of :func:`~mlmi_zoo.training.finetune.finetune`.

For what the caller does not say (:func:`default_stages`; ``finetune.schedule`` in ``config.json``
records the result and which values were defaults):

* **every layer trains** (``freeze=()``, :data:`DEFAULT_FREEZE`);
* **the base model's stages and learning rates**, in its order; its special stages (ProtoPNet's push
  and last-layer fit) run as it ran them (the last layer: 30 passes over the cached similarities);
* **epochs from a step budget**: the gradient stages share :data:`DEFAULT_STEPS` = 1000 optimiser
  steps in proportion to the base model's epochs of each (ProtoPNet's warmup : joint, e.g. 3 : 9),
  so a stage runs ``max(1, round(share * 1000 / ceil(train_cases / batch_size)))`` epochs with a
  cosine decay of its rate: 600 images (480 after the validation split), batch 16, give 33 epochs
  of one baseline stage; 6000 images give 3;
* **fewer steps for large images** (:func:`default_steps`): an image of more than
  :data:`STEP_VOXELS` = 2**17 pixels or voxels (a step costs about its size) gets
  ``1000 * 2**17 / voxels`` steps, never fewer than :data:`MIN_STEPS` = 300: a 64³ volume 500, a
  96³ volume 300; 28³, 64 px and 256 px images (65 536 pixels) keep 1000. Cached-feature bags keep
  1000 (their instances are vectors);
* **decoded once**: a CSV's images whose decoded tensors fit in :data:`~mlmi_zoo.training.finetune.IN_MEMORY_BYTES` (2 GiB) are
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
model fine-tunes with the shared defaults (the black box on the same bags: 0.878). Additive MIL
(``additive_mil_features.idrid_rdr``) on the same bags: 0.873 with the defaults, the other settings
again within the seeds' spread or below.
On LIDC-IDRI nodules at 64³ (the ``*.adrenalmnist3d`` parents, 600 training nodules, the 261 validation
nodules) fewer steps cost nothing: mean validation AUROC ProtoPNet / baseline 0.884 / 0.881 with 1000
steps, 0.896 / 0.884 with 500, 0.899 / 0.882 with 300 (``bench/README.md``). So the budget shrinks with
the image's size (:func:`default_steps`): the constants are set so that the 64³ volumes, which ran
over the time budget with 1000 steps, get 500 and the largest image of the 2D choosing and transfer
sets (256 px) keeps the 1000 it was measured with; the floor, 300, is the fewest steps that lost
nothing on those volumes. Sizes between and beyond were not measured.
Explicit arguments (``epochs``, ``steps``, ``patience``, ``lr``, ``freeze``) and dotted overrides
(``stages.1.epochs=10``) win over these.
How the defaults transfer to data they were not chosen on is measured by ``bench/bench_transfer.py``.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Sequence

from mlmi_zoo._config import parse_override_value
from mlmi_zoo.training.recipe import StageSection

__all__ = ["DEFAULT_FREEZE", "DEFAULT_STEPS", "STEP_VOXELS", "MIN_STEPS", "DEFAULT_PATIENCE", "DEFAULT_TRAINING",
           "DEFAULT_CONFIG", "default_steps", "default_stages"]

# The defaults of fine-tuning (module docstring): chosen on PneumoniaMNIST and RetinaMNIST
# (bench/bench_transfer.py --choose), never on the data sets the transfer benchmark reports.
DEFAULT_FREEZE: tuple[str, ...] = ()  # parameter prefixes kept frozen: none, every layer trains
DEFAULT_STEPS = 1000  # optimiser steps shared by the gradient stages
# Larger images get fewer steps, in proportion to their pixels or voxels (default_steps): chosen on LIDC
# nodules at 64³ (500 and 300 steps lost nothing against 1000), so that 64³ volumes fit the time budget.
STEP_VOXELS = 2**17  # pixels or voxels per image up to which the gradient stages get DEFAULT_STEPS
MIN_STEPS = 300  # the fewest steps the size rule gives
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


def _check_budget(epochs: int | None, steps: int | None, patience: int | None) -> None:
    """Refuse a budget that cannot run: ``epochs`` or ``steps`` below 1, ``patience`` below 0 (None: the default)."""
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be >= 1 (or None: derived from the step budget), got {epochs}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1 (or None: {DEFAULT_STEPS}), got {steps}")
    if patience is not None and patience < 0:
        raise ValueError(f"patience must be >= 0 epochs (0: no early stopping), got {patience}")


def default_steps(image_shape: Sequence[int] | None) -> int:
    """The default step budget for images of spatial shape ``image_shape`` (module docstring).

    ``DEFAULT_STEPS`` up to ``STEP_VOXELS`` pixels or voxels per image, then ``DEFAULT_STEPS * STEP_VOXELS /
    voxels`` rounded, never fewer than ``MIN_STEPS``; ``None`` or ``()`` (cases without an image, such as
    bags of cached features): ``DEFAULT_STEPS``.

    Raises:
        ValueError: a dimension below 1.
    """
    if not image_shape:
        return DEFAULT_STEPS
    if any(int(n) < 1 for n in image_shape):
        raise ValueError(f"image_shape must hold sizes >= 1, got {tuple(image_shape)}")
    voxels = math.prod(int(n) for n in image_shape)
    return max(MIN_STEPS, min(DEFAULT_STEPS, round(DEFAULT_STEPS * STEP_VOXELS / voxels)))


def default_stages(parent_stages: Sequence[StageSection], special: Sequence[str], train_cases: int, batch_size: int,
                   epochs: int | None = None, lr: float | None = None, patience: int | None = None,
                   steps: int | None = None, image_shape: Sequence[int] | None = None
                   ) -> tuple[tuple[StageSection, ...], dict[str, Any]]:
    """The fine-tuning stages derived from the base model's stages and the size of the user's data.

    The rule (module docstring): the base model's stages in its order; the gradient
    stages share ``steps`` optimiser steps (default :func:`default_steps` of ``image_shape``) in proportion to the
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
        steps: optimiser steps shared by the gradient stages (default: :func:`default_steps` of ``image_shape``).
        image_shape: the spatial shape of the training images (None: cases without an image), which
            sets the default step budget.

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
    budget = default_steps(image_shape) if steps is None else steps
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
    scaled = steps is None and budget != DEFAULT_STEPS
    size = f" ({DEFAULT_STEPS} scaled to images of {'x'.join(map(str, image_shape or ()))})" if scaled else ""
    rule = ["epochs given" if epochs is not None else
            f"epochs from {budget} optimiser steps{size} shared by the gradient stages in the base model's proportions",
            "learning rate given" if lr is not None else "the base model's learning rates",
            f"early stopping after {wait} epochs without a better val AUROC" if wait else "no early stopping"]
    record = {
        "rule": "; ".join(rule), "train_cases": train_cases, "steps_per_epoch": steps_per_epoch,
        "steps": budget if epochs is None else None, "patience": wait or None,
        "image_shape": list(map(int, image_shape)) if image_shape else None,
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
