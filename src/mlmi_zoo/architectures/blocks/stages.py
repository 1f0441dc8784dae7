"""How the one trainer talks to each model family.

The trainer (``mlmi_zoo.training.trainer``) owns the loop: data order, optimiser, checkpoints,
resume, progress, distributed reduction. A family contributes only what differs between families:
which tensors a batch feeds the model, the loss of each stage, which parameters each stage trains,
and the stages that are not gradient descent (ProtoPNet's push and convex last-layer fit).

What a family's training needs beyond the architecture (loss coefficients, where push may project,
how prototypes start) is its *training settings*: a frozen dataclass (:attr:`FamilyTraining.settings_class`)
filled from the recipe's ``training:`` section, never part of the model's config.
"""
from __future__ import annotations

from collections.abc import Mapping, Sized
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mlmi_zoo.base import InterpretableModel

if TYPE_CHECKING:
    from mlmi_zoo.architectures.blocks.heads import LesionCountHead, PhysicalHead

__all__ = ["FamilyTraining", "LossOutput", "NoSettings", "training_for", "fit_physical_head"]


@dataclass(frozen=True)
class NoSettings:
    """Training settings of a family whose training needs none (the black-box baseline)."""


@dataclass
class LossOutput:
    """What one training step produced.

    Attributes:
        loss: scalar to back-propagate.
        logits: (B, C) logits, used for running metrics.
        logs: named scalar parts of the loss (e.g. ``{"ce": ..., "cluster": ...}``) for the run log.
    """

    loss: torch.Tensor
    logits: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)


class FamilyTraining:
    """Default behaviour for image classifiers; families override what differs.

    Attributes:
        family: the model family this serves (``model.family``).
        stage_names: stages the recipe may list, in their usual order.
        special_stages: stages that are not gradient descent (run by :meth:`run_special_stage`).
        settings_class: the frozen dataclass of the family's training settings (the recipe's
            ``training:`` section is type-checked against it).
        settings: this instance's settings (the class defaults unless given).
    """

    family: ClassVar[str] = "baseline"
    stage_names: ClassVar[tuple[str, ...]] = ("joint",)
    special_stages: ClassVar[tuple[str, ...]] = ()
    settings_class: ClassVar[type[Any]] = NoSettings

    def __init__(self, settings: Any = None) -> None:
        if settings is not None and not isinstance(settings, self.settings_class):
            raise TypeError(f"{type(self).__name__} takes {self.settings_class.__name__} settings, "
                            f"got {type(settings).__name__}")
        self.settings = settings if settings is not None else self.settings_class()

    def check(self, model: InterpretableModel) -> None:
        """Refuse settings that this model cannot train with (default: any model is fine)."""

    def stages_for_settings(self) -> tuple[str, ...] | None:
        """The gradient and special stages these settings train with, in order, when the settings decide
        them (a concept bottleneck's ``mode``); None when any of :attr:`stage_names` may be listed."""
        return None

    def prepare(self, model: InterpretableModel, train_set: Dataset) -> None:
        """Fit training-split statistics the model stores (e.g. physical-head normalisation)."""

    def initialise(self, model: InterpretableModel, train_set: Dataset, seed: int,
                   device: torch.device) -> dict[str, Any] | None:
        """Data-dependent initialisation before the first stage of a fresh run (default: none).

        The trainer calls it once, after :meth:`prepare` and after moving the model to ``device``,
        only when the run neither resumes (the checkpoint holds the weights) nor starts from
        ``model.init_from`` weights. It must use ``seed`` for any randomness, never the global RNG.

        Returns:
            a JSON-safe summary, or None when nothing was done.
        """
        return None

    def inputs(self, model: InterpretableModel, batch: Mapping[str, Any]) -> torch.Tensor:
        """The network input for a collated batch: raw images through the model's intensity transform."""
        return model.input_spec.intensity(batch["image"])

    def loss(self, model: InterpretableModel, batch: dict[str, Any], stage: str) -> LossOutput:
        """Loss of one batch in ``stage``. Default: cross-entropy (+ physical head when present)."""
        x = self.inputs(model, batch)
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, batch["label"])
        return LossOutput(loss, logits.detach(), {"ce": loss.item()})

    def trainable_parameters(self, model: InterpretableModel, stage: str) -> list[nn.Parameter]:
        """Parameters optimised in ``stage`` (the others are frozen, their modules put in eval mode)."""
        return [p for p in model.parameters()]

    def run_special_stage(self, model: InterpretableModel, stage: str, loader: DataLoader,
                          device: torch.device) -> dict[str, Any]:
        """Run a non-gradient stage (e.g. push); returns JSON-safe records for the run log."""
        raise ValueError(f"{self.family} has no special stage {stage!r}; its stages are {self.stage_names}")


def training_for(model: InterpretableModel, settings: Mapping[str, Any] | None = None) -> FamilyTraining:
    """The training stages of ``model``'s family (from its :class:`~mlmi_zoo.families.Family` record).

    Args:
        model: the model to train.
        settings: the recipe's ``training:`` section (keys of the family's settings class, type-checked);
            None or empty keeps the defaults.

    Raises:
        OverrideError: a key that the family's settings do not have, or a value of the wrong type.
        ValueError: settings this model cannot train with (e.g. a fine-annotation cost without the
            attention pooling it acts on).
    """
    from mlmi_zoo._config import from_jsonable
    from mlmi_zoo.families import family_of

    default = family_of(model).training
    if not settings:
        default.check(model)
        return default
    adapter = type(default)(from_jsonable(default.settings_class, dict(settings), where="training"))
    adapter.check(model)
    return adapter


def fit_physical_head(head: PhysicalHead | LesionCountHead, dataset: Dataset, max_cases: int = 2000) -> None:
    """Set a :class:`PhysicalHead`'s normalisation from the training split's measurements.

    Reads ``sample["measurements"]`` and ``sample["spacing"]`` of up to ``max_cases`` cases (evenly
    spread over the data set) and stores the mean/std of their pixel-domain values.
    """
    from mlmi_zoo.architectures.blocks.heads import to_pixel_domain

    if not isinstance(dataset, Sized):
        raise TypeError(f"fitting a physical head needs a map-style data set with a length, got {type(dataset).__name__}")
    n = len(dataset)
    idx = torch.linspace(0, n - 1, steps=min(n, max_cases)).round().long().unique().tolist()
    rows = [dataset[i] for i in idx]
    if any(r.get("spacing") is None for r in rows):
        raise ValueError("a physical head needs samples with a 'spacing' (mm); this data set has none")
    spacing = torch.stack([torch.as_tensor(r["spacing"], dtype=torch.float64) for r in rows])  # (N, dims)
    cols = []
    for q in head.quantities:
        values = torch.tensor([float(r["measurements"][q.name]) for r in rows], dtype=torch.float64)
        cols.append(to_pixel_domain(values, spacing, q))
    pixel = torch.stack(cols, -1)  # (N, Q)
    finite = torch.isfinite(pixel)
    loc = torch.stack([pixel[finite[:, j], j].mean() for j in range(pixel.shape[1])])
    scale = torch.stack([pixel[finite[:, j], j].std() for j in range(pixel.shape[1])])
    head.set_normalisation(loc.float(), scale.float())
