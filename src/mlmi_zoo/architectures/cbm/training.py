"""Training adapter of concept bottleneck models: Koh et al. (ICML 2020) independent, sequential
and joint training as stages of the shared trainer.

Stages:

- ``"concepts"``: backbone + concept head on the concept loss ``L_c`` only (independent and
  sequential modes; also usable as a warm-up before joint training).
- ``"label_head"``: the concept -> label head alone, on cross-entropy ``L_y``. In ``independent``
  mode it sees the *true* concepts of the batch (missing ones imputed from training-split
  statistics) and never runs the image network; in ``sequential`` (and ``joint``) mode it sees the
  frozen concept model's *predicted* bottleneck vectors. Validation always scores the model as it is
  used, on its predicted concepts, so the epoch kept is the best deployed model, not the best label
  predictor on true concepts.
- ``"joint"``: everything, on ``L_y + joint_lambda * L_c`` — Koh et al.'s weighting (lambda scales
  the concept loss, the label loss keeps weight 1).

With ``intervention_rate > 0`` the label head of the sequential ``label_head`` stage and of the
``joint`` stage reads, for each training case, a random share of the annotated concepts at their true
values and the rest as predicted (:func:`randomly_intervene`; random interventions during training
after Espinosa Zarlenga et al., "Concept Embedding Models: Beyond the Accuracy-Explainability
Trade-Off", NeurIPS 2022). A head fitted on predictions alone can misread corrected concepts, whose
values are sharper than any prediction; one fitted on true concepts alone (independent) misreads the
soft predictions it sees when nobody corrects them. Validation reads predictions only.

``L_c`` is the sum over concepts of each concept's masked, class-balanced loss
(:meth:`~mlmi_zoo.architectures.cbm.concepts.ConceptCodec.loss`).

With attention pooling and ``fa_coef > 0`` the concept and joint stages add ``fa_coef`` times a
fine-annotation cost after IAIA-BL (Barnett, Schwartz, Tao, Chen, Ren, Lo and Rudin, Nature Machine
Intelligence 2021), who penalise a prototype's activation outside the lesion a radiologist drew: here
the attention mass on latent cells whose receptive-field window holds no lesion pixel
(:func:`attention_off_lesion`), averaged over the cases that carry a non-empty mask. Cells that
touch the lesion cost nothing, so the model stays free to read a concept from the lesion's rim or
from any part of it. The masks are moved onto the canonical grid like the images.
With ``pooling="max"`` and ``map_coef > 0`` the concept and joint stages add ``map_coef`` times a
cell-level loss on the map of each binary concept whose mask the batch carries: per latent cell, the
binary cross-entropy of the map's logit against "some pixel of the cell holds the finding" (cells that
do weighted by ``map_pos_weight``), on the cases whose mask of that finding is known
(:func:`cell_map_loss`). The concept's logit is the maximum of that map, so the image-level concept
follows. Each area of ``model.config.area_maps`` adds the binary cross-entropy of each cell's predicted
share against the share of the cell its finding's mask covers. Cases with no label (``"label"`` -1, e.g.
photographs annotated with masks but not graded) train the concepts and are left out of the label loss.
What we changed: typed concepts with units, masking of missing labels, class balance (see
:mod:`.concepts`). Training images can be flipped and turned by the recipe (``data.augment``,
:mod:`mlmi_zoo.training.augment`): the nodule concepts do not change with orientation.
"""
from __future__ import annotations

import math
from collections.abc import Sized
from typing import Any

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from mlmi_zoo.architectures.cbm.config import CBMTrainingSettings
from mlmi_zoo.architectures.cbm.model import CBM
from mlmi_zoo.architectures.cbm.concept_values import concept_values_from_batch
from mlmi_zoo.architectures.blocks.stages import FamilyTraining, LossOutput

__all__ = ["CBMTraining", "STAGES_BY_MODE", "attention_off_lesion", "cell_map_loss", "fit_concept_statistics",
           "randomly_intervene", "start_area_shares"]

# The recipe stages each training mode runs, in order.
STAGES_BY_MODE: dict[str, tuple[str, ...]] = {
    "independent": ("concepts", "label_head"),
    "sequential": ("concepts", "label_head"),
    "joint": ("joint",),
}


def _spacing(batch: dict[str, Any], device: torch.device) -> torch.Tensor | None:
    s = batch.get("spacing")
    return None if s is None else torch.as_tensor(s, dtype=torch.float32, device=device)


def fit_concept_statistics(model: CBM, dataset: Dataset, max_cases: int = 2000) -> None:
    """Fit the model's concept priors, class weights and continuous normalisation on ``dataset``.

    Reads up to ``max_cases`` samples evenly spread over the training split; concepts come from
    ``sample["concepts"]`` or ``sample["measurements"]``, spacing from ``sample["spacing"]``.
    """
    if not isinstance(dataset, Sized):
        raise TypeError(f"fitting concept statistics needs a map-style data set with a length, got {type(dataset).__name__}")
    n = len(dataset)
    if n == 0:
        raise ValueError("cannot fit concept statistics on an empty training split")
    idx = torch.linspace(0, n - 1, steps=min(n, max_cases)).round().long().unique().tolist()
    rows = [dataset[i] for i in idx]
    values = torch.cat([concept_values_from_batch(model.concept_specs, r) for r in rows])  # (N, Kc)
    spacing = None
    if all(r.get("spacing") is not None for r in rows):
        spacing = torch.stack([torch.as_tensor(r["spacing"], dtype=torch.float64).reshape(-1) for r in rows])  # (N, dims)
    model.codec.fit(values, model.codec_spacing(spacing))


def attention_off_lesion(attention: torch.Tensor, cell_fraction: torch.Tensor) -> torch.Tensor:
    """Fine-annotation cost: the attention mass on cells with no lesion in their window.

    Args:
        attention: (B, 1, *latent) spatial attention, summing to 1 over the grid per case.
        cell_fraction: (B, 1, *latent) lesion fraction of each cell's window, e.g.
            :meth:`Backbone.cell_fraction` of the lesion masks on the same grid.

    Returns:
        scalar in [0, 1]: the mean over cases with a lesion of the attention off the lesion; 0 (with
        a gradient graph) when no case has one.

    Raises:
        ValueError: when the two shapes differ.
    """
    if attention.shape != cell_fraction.shape:
        raise ValueError(f"attention {tuple(attention.shape)} and cell fractions {tuple(cell_fraction.shape)} "
                         f"must have the same (B, 1, *latent) shape")
    off = rearrange((attention * (cell_fraction <= 0)), "b 1 ... -> b (...)").sum(-1)  # (B,)
    annotated = rearrange(cell_fraction, "b 1 ... -> b (...)").amax(-1) > 0  # (B,)
    if not annotated.any():
        return attention.sum() * 0.0
    return off[annotated].mean()


def cell_map_loss(maps: torch.Tensor, masks: torch.Tensor, known: torch.Tensor, pos_weight: float = 1.0) -> torch.Tensor:
    """Cell-level binary cross-entropy of one concept's latent map against a mask of the finding.

    Args:
        maps: (B, *latent) the concept's logit per latent cell.
        masks: (B, 1, *spatial) bool, where the finding lies, on the grid the network saw.
        known: (B,) bool, the cases whose mask is known (an absent finding is a known, empty mask).
        pos_weight: weight of the cells that hold the finding.

    Returns:
        scalar: the mean over the known cases' cells; 0 (with a gradient graph) when no case is known.
    """
    if not bool(known.any()):
        return maps.sum() * 0.0
    pool = F.adaptive_max_pool3d if maps.ndim == 4 else F.adaptive_max_pool2d
    target = pool(masks[known].float(), tuple(maps.shape[1:]))[:, 0]  # (b, *latent): a pixel of the cell holds it
    weight = 1.0 + (pos_weight - 1.0) * target
    return F.binary_cross_entropy_with_logits(maps[known], target, weight=weight)


def start_area_shares(model: CBM) -> None:
    """Set the bias of each ``area_maps`` unit so that every cell starts at the share that gives the training mean area.

    With the bias at 0 every cell would start half covered, an area thousands of standard deviations above
    the mean, whose loss would swamp every other term in the first steps (the prior-probability start of
    Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, applied to a share).
    """
    if not model.config.area_maps:
        return
    last = model.concept_head[-1] if isinstance(model.concept_head, nn.Sequential) else model.concept_head
    bias = last.bias
    assert isinstance(bias, torch.Tensor)  # the concept head ends in a convolution with a bias
    pixels = math.prod(model.config.img_size)
    with torch.no_grad():
        for unit, c in model._share_units:
            share = float(model.codec.loc[c]) / pixels
            share = min(max(share, 1e-5), 0.5)
            bias[unit] = math.log(share / (1.0 - share))


def randomly_intervene(model: CBM, predicted: torch.Tensor, internal: torch.Tensor, rate: float) -> torch.Tensor:
    """Replace each annotated concept of each case by its true value with probability ``rate``.

    Args:
        model: the CBM whose codec maps concepts to bottleneck units.
        predicted: (B, K) predicted bottleneck vectors.
        internal: (B, Kc) internal concept targets (NaN = not annotated; never replaced).
        rate: probability of replacing each annotated concept, in [0, 1].

    Returns:
        (B, K) bottleneck vectors: true values where a draw replaced the concept, predictions elsewhere
        (gradients flow through the predicted units that were kept).
    """
    known = torch.isfinite(internal)  # (B, Kc)
    drawn = torch.rand(known.shape, device=internal.device) < rate
    replace = model.codec.unit_mask(known & drawn)  # (B, K)
    return torch.where(replace, model.codec.target_bottleneck(internal).to(predicted.dtype), predicted)


def _label_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the labelled cases (label >= 0); 0 (with a gradient graph) when none is."""
    labels = labels.to(logits.device)
    if not bool((labels >= 0).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, ignore_index=-1)


class CBMTraining(FamilyTraining):
    """Losses and trainable parameters of each CBM training stage (see the module docstring)."""

    family = "cbm"
    stage_names = ("concepts", "label_head", "joint")
    settings_class = CBMTrainingSettings
    settings: CBMTrainingSettings

    def check(self, model: CBM) -> None:
        """The fine-annotation cost acts on the concept attention: it needs ``pooling='attention'``."""
        if self.settings.fa_coef > 0 and model.config.pooling != "attention":
            raise ValueError("training.fa_coef > 0 penalises the attention outside the lesion and needs "
                             f"model.config.pooling='attention'; this model pools with {model.config.pooling!r}")
        if self.settings.map_coef > 0 and model.config.pooling != "max":
            raise ValueError("training.map_coef > 0 teaches the maps of max-pooled binary concepts cell by cell and "
                             f"needs model.config.pooling='max'; this model pools with {model.config.pooling!r}")

    def stages_for_settings(self) -> tuple[str, ...]:
        """The stages of this ``mode`` (:data:`STAGES_BY_MODE`)."""
        return STAGES_BY_MODE[self.settings.mode]

    def prepare(self, model: CBM, train_set: Dataset) -> None:
        """Fit concept normalisation and imbalance weights on the training split; start each ``area_maps`` share
        at the training split's mean area (spread evenly over the cells)."""
        fit_concept_statistics(model, train_set)
        start_area_shares(model)

    def _check_stage(self, model: CBM, stage: str) -> None:
        if stage not in self.stage_names:
            raise ValueError(f"unknown CBM stage {stage!r}; stages are {self.stage_names}")
        if stage == "joint" and self.settings.mode != "joint":
            raise ValueError(f"stage 'joint' needs mode='joint'; this model has mode={self.settings.mode!r}, "
                             f"whose stages are {STAGES_BY_MODE[self.settings.mode]}")

    def concept_targets(self, model: CBM, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
        """(B, Kc) internal concept targets of a batch (NaN = missing)."""
        values = concept_values_from_batch(model.concept_specs, batch, device)
        return model.internal_targets(values, _spacing(batch, device))

    def loss(self, model: CBM, batch: dict[str, Any], stage: str) -> LossOutput:
        self._check_stage(model, stage)
        labels = batch["label"]
        if stage == "label_head" and self.settings.mode == "independent":
            # Koh et al.'s independent model: the label head learns from the true concepts only.
            device = next(model.label_head.parameters()).device
            vector = model.codec.target_bottleneck(self.concept_targets(model, batch, device))  # (B, K)
            logits = model.predict_label(vector)
            ce = _label_ce(logits, labels)
            if not model.training:
                # Validation scores the model as it is used, on its own predicted concepts: the true-concept
                # logits would make every validation metric (and so the kept epoch) the label predictor's on
                # true concepts, which no deployed model sees. The stage loss stays the training objective.
                x = self.inputs(model, batch)
                with torch.no_grad():
                    logits = model.predict_label(model.codec.bottleneck(model.concept_logits(x, _spacing(batch, x.device))))
            return LossOutput(ce, logits.detach(), {"ce": float(ce.detach())})
        x = self.inputs(model, batch)
        spacing = _spacing(batch, x.device)  # the model resamples onto its canonical grid with it (config.resample)
        rate = self.settings.intervention_rate if model.training else 0.0
        if stage == "label_head":  # sequential (and joint fine-tuning): predicted concepts, frozen
            with torch.no_grad():
                vector = model.codec.bottleneck(model.concept_logits(x, spacing))
            if rate > 0:
                vector = randomly_intervene(model, vector, self.concept_targets(model, batch, x.device), rate)
            logits = model.predict_label(vector)
            ce = _label_ce(logits, labels)
            return LossOutput(ce, logits.detach(), {"ce": float(ce.detach())})
        maps, attention = model.concept_maps_and_attention(x, spacing)  # (B, K, *latent), (B, 1, *latent)
        raw = model.pool(maps)  # (B, K), as model.concept_logits
        targets = self.concept_targets(model, batch, x.device)  # (B, Kc)
        concept_loss, parts = model.codec.loss(raw, targets)
        logs = {f"concept/{k}": float(v.detach()) for k, v in parts.items()}
        logs["concepts"] = float(concept_loss.detach())
        mask = batch.get("mask")
        if self.settings.fa_coef > 0 and attention is not None and mask is not None and mask.ndim == x.ndim:
            # the masks go onto the canonical grid with the images (bilinear, then cut at one half)
            canonical_mask = model.to_canonical(mask.to(device=x.device, dtype=x.dtype), spacing)
            fractions = model.backbone.cell_fraction(canonical_mask > 0.5, attention.shape[2:])
            fa = attention_off_lesion(attention, fractions)
            concept_loss = concept_loss + self.settings.fa_coef * fa
            logs["fine_annotation"] = float(fa.detach())
        if self.settings.map_coef > 0:
            map_loss = self._map_loss(model, maps, batch, spacing)
            if map_loss is not None:
                concept_loss = concept_loss + self.settings.map_coef * map_loss
                logs["concept_maps"] = float(map_loss.detach())
        if stage == "concepts":
            with torch.no_grad():
                logits = model.predict_label(model.codec.bottleneck(raw))
            return LossOutput(concept_loss, logits, logs)
        vector = model.codec.bottleneck(raw)  # joint: gradients flow through the bottleneck
        if rate > 0:
            vector = randomly_intervene(model, vector, targets, rate)
        logits = model.predict_label(vector)
        ce = _label_ce(logits, labels)
        logs["ce"] = float(ce.detach())
        return LossOutput(ce + self.settings.joint_lambda * concept_loss, logits.detach(), logs)

    def _map_loss(self, model: CBM, maps: torch.Tensor, batch: dict[str, Any],
                  spacing: torch.Tensor | None) -> torch.Tensor | None:
        """The mean cell-level loss over the max-pooled binary concepts and the ``area_maps`` areas whose masks the
        batch carries."""
        masks, known = batch.get("concept_masks"), batch.get("concept_masks_known")
        if not masks or known is None:
            return None
        canonical: dict[str, torch.Tensor] = {}

        def mask_of(name: str) -> torch.Tensor:  # each finding's mask onto the canonical grid once
            if name not in canonical:
                mask = masks[name].to(device=maps.device, dtype=maps.dtype)
                canonical[name] = model.to_canonical(mask, spacing) > 0.5
            return canonical[name]

        terms = []
        for spec, sl in zip(model.concept_specs, model.codec.slices):
            if spec.kind != "binary" or spec.name not in masks:
                continue
            terms.append(cell_map_loss(maps[:, sl.start], mask_of(spec.name), known[spec.name].to(maps.device).bool(),
                                       self.settings.map_pos_weight))
        for area, finding in model.config.area_maps:
            if finding not in masks:
                continue
            mask = mask_of(finding)
            keep = known[finding].to(maps.device).bool()
            if bool(keep.any()):
                pool = F.adaptive_avg_pool3d if maps.ndim == 5 else F.adaptive_avg_pool2d
                grid: Any = tuple(maps.shape[2:])
                target = pool(mask[keep].float(), grid)[:, 0]  # (b, *latent): the share each cell holds
                share = model.cell_shares(maps[keep], area, tuple(mask.shape[2:])).clamp(1e-6, 1 - 1e-6)
                terms.append(F.binary_cross_entropy(share, target))
        return torch.stack(terms).mean() if terms else None

    def trainable_parameters(self, model: CBM, stage: str) -> list[nn.Parameter]:
        self._check_stage(model, stage)
        if stage == "concepts":
            attention = [] if model.attention_head is None else list(model.attention_head.parameters())
            return [*model.backbone.parameters(), *model.concept_head.parameters(), *attention]
        if stage == "label_head":
            return list(model.label_head.parameters())
        return list(model.parameters())
