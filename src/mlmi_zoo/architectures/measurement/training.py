"""Training of a measurement bottleneck: the lesion map, the landmark map and the rule's weak supervision.

One gradient stage, ``maps``, on batches that may mix two kinds of photograph (:class:`~mlmi_zoo.training.
datasets.idrid_joined.IDRiDMacula`): each loss term uses only the cases that carry its truth.

* lesion map, on cases with a lesion mask (``"ex_annotated"``): per latent cell, binary cross-entropy of
  the lesion logit against "some pixel of the cell is lesion" (lesion cells weighted by
  ``pos_weight``) and of the coverage logit against the share of the cell's pixels that are lesion;
* landmark map, on cases with a landmark (finite ``"fovea_xy"``): cross-entropy of the softmax over
  the cells against the cell that holds the landmark;
* the rule, on cases with a grade (``"label"`` >= 0) and a landmark: ``P`` (strongest lesion evidence)
  against "grade >= 1" and ``N`` (strongest within the radius of the *true* landmark) against "grade 2",
  as binary cross-entropies on the scores. The rule is fixed; this teaches the map what the graders saw.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from mlmi_zoo.architectures.blocks.stages import FamilyTraining, LossOutput
from mlmi_zoo.architectures.measurement.config import MeasurementTrainingSettings
from mlmi_zoo.architectures.measurement.model import MeasurementBottleneck

__all__ = ["MeasurementTraining"]


def _cell_targets(mask: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, h, w) "any lesion pixel" and "lesion share" of each latent cell, from (B, 1, H, W) masks."""
    m = mask.float()
    return F.adaptive_max_pool2d(m, grid)[:, 0], F.adaptive_avg_pool2d(m, grid)[:, 0]


class MeasurementTraining(FamilyTraining):
    """The ``maps`` stage of a measurement bottleneck (see the module docstring)."""

    family = "measurement"
    stage_names = ("maps",)
    settings_class = MeasurementTrainingSettings

    def loss(self, model: MeasurementBottleneck, batch: dict[str, Any], stage: str) -> LossOutput:
        s = self.settings
        x = self.inputs(model, batch)
        lesion, landmark = model.maps(x)
        b, _, h, w = lesion.shape
        logs: dict[str, float] = {}
        total = lesion.sum() * 0.0  # stays in the graph when a batch carries no truth for any term
        annotated = batch.get("ex_annotated")
        if annotated is not None and bool(annotated.any()):
            keep = annotated.bool()
            present, share = _cell_targets(batch["ex_mask"][keep], (h, w))
            weight = 1.0 + (s.pos_weight - 1.0) * present
            lesion_term = F.binary_cross_entropy_with_logits(lesion[keep, 0], present, weight=weight)
            coverage_term = F.binary_cross_entropy_with_logits(lesion[keep, 1], share)
            total = total + lesion_term + coverage_term
            logs.update(lesion=lesion_term.item(), coverage=coverage_term.item())
        fovea = batch.get("fovea_xy")
        if fovea is None:  # data with no landmark positions at all: no landmark or rule term
            fovea = torch.full((b, 2), float("nan"), device=x.device)
        fovea = fovea.to(x.dtype)
        has_fovea = torch.isfinite(fovea).all(-1)
        ys, xs = model.cell_centres((h, w), x.device)
        if bool(has_fovea.any()):
            fx, fy = fovea[has_fovea, 0], fovea[has_fovea, 1]
            iy = (ys[None] - fy[:, None]).abs().argmin(-1)  # the cell whose centre is nearest
            ix = (xs[None] - fx[:, None]).abs().argmin(-1)
            landmark_term = F.cross_entropy(landmark[has_fovea].flatten(1), iy * w + ix)
            total = total + s.landmark_coef * landmark_term
            logs["landmark"] = landmark_term.item()
        labels = batch["label"]
        graded = has_fovea & (labels >= 0)
        spacing = batch["spacing"].to(x.dtype)
        if bool(graded.any()) and s.label_coef > 0:
            scores = model.rule_scores(lesion[graded, 0], fovea[graded], spacing[graded])
            y = labels[graded]
            rule_term = (F.binary_cross_entropy_with_logits(scores["P"], (y >= 1).to(x.dtype))
                         + F.binary_cross_entropy_with_logits(scores["N"], (y == 2).to(x.dtype)))
            total = total + s.label_coef * rule_term
            logs["rule"] = rule_term.item()
        logits = model.rule_scores(lesion[:, 0], model.locate_landmark(landmark), spacing)["logits"]
        return LossOutput(total, logits.detach(), logs)
