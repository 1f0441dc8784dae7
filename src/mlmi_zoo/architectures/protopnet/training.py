"""Training ProtoPNet: its losses, its four stages, and the last-layer fit on cached similarities.

Losses follow Chen et al., "This Looks Like That" (NeurIPS 2019): cross-entropy + cluster cost
(distance of each image to its nearest own-class prototype) + separation cost (distance to its
nearest other-class prototype, with a negative weight) + L1 on off-class last-layer weights. The
optional fine-annotation loss follows Barnett et al., "A case-based interpretable deep learning model
for classification of mass lesions in digital mammography" (Nature Machine Intelligence 2021,
IAIA-BL): own-class prototype activation outside the annotated lesion is penalised.

Stages: ``warmup`` (add-on, prototypes and physical head; backbone frozen), ``joint`` (everything),
``push`` (projection onto training patches) and ``last_layer``. ``push`` and ``last_layer`` are
special stages: the last layer is fitted on similarity vectors computed once (one pass over the
data), never re-running the backbone, since the objective (cross-entropy + L1) is convex in it.

What we changed:

- The fine-annotation loss works on the latent grid: the lesion mask is reduced to the fraction of
  lesion pixels in each cell's window, centred on the cell's receptive field, and the penalty is the mean over cells of
  ``((1 - fraction) * similarity)^2`` — IAIA-BL's pixel-level ``||(1 - m) * g||^2`` under nearest
  upsampling, divided by the number of cells so ``fa_coef`` does not depend on the grid size. Images
  whose mask is empty (no lesion, hence no annotation) are left out; IAIA-BL's penalty on other-class
  prototypes is not used.
- With ``push_on_lesion``, the cluster cost measures each image's distance to its own-class
  prototypes over lesion cells only (the cells push may use), so prototypes are learnt where they
  will be projected; the separation cost and the logits still use every cell.
- Optional diversity cost (``div_coef``): a hinge on the cosine of every pair of prototypes, in the
  spirit of the within-class orthogonality of TesNet (Wang et al., "Interpretable image recognition
  by constructing transparent embedding space", ICCV 2021), so that prototypes differ in direction,
  not only by a small distance around the Sigmoid's midpoint; with ``push_distinct`` push then takes
  a different image for each prototype.
- Optional prototype-to-data cost (``near_data_coef``): the first interpretability regulariser of Li
  et al., "Deep learning for case-based reasoning through prototypes" (AAAI 2018), every prototype
  close to at least one encoded input, here to a cell of an own-class image of the batch.
- ``joint`` trains the last layer too (ProtoPNet trains it with a small learning rate there).
- Optional data-driven prototype start (``prototype_init="data"``,
  :func:`initialise_prototypes_from_data`): ProtoPNet draws prototypes uniformly in ``[0, 1]^D``;
  we can instead start each class's prototypes on latent cells of its own training images, picked
  by k-means++ seeding (Arthur and Vassilvitskii, "k-means++: the advantages of careful seeding",
  SODA 2007). It is what push (Chen et al. 2019, section 2.2) does at the end — a prototype equal
  to a training patch of its class — done once at the start, on the untrained add-on output.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mlmi_zoo.architectures.blocks.heads import LesionCountHead
from mlmi_zoo.architectures.blocks.stages import (
    FamilyTraining,
    LossOutput,
    fit_physical_head,
)
from mlmi_zoo.architectures.protopnet.config import ProtoPNetTrainingSettings
from mlmi_zoo.architectures.protopnet.data_init import initialise_prototypes_from_data
from mlmi_zoo.architectures.protopnet.last_layer import fit_last_layer, off_class_l1
from mlmi_zoo.architectures.protopnet.model import ProtoPNet
from mlmi_zoo.architectures.protopnet.prototypes import duplicate_prototypes, lesion_cells
from mlmi_zoo.architectures.protopnet.push import INTENSITY_FOREGROUND, push_cells, push_prototypes

__all__ = [
    "ProtoPNetTraining",
    "cluster_separation_costs",
    "diversity_cost",
    "near_data_cost",
    "fine_annotation_cost",
    "lesion_min_distances",
    "min_distances_over",
]

log = logging.getLogger(__name__)


def cluster_separation_costs(min_distances: torch.Tensor, labels: torch.Tensor,
                             prototype_classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ProtoPNet's cluster and separation costs.

    Args:
        min_distances: (B, P) distance of each prototype to its nearest patch in each image.
        labels: (B,) class of each image.
        prototype_classes: (P,) class of each prototype.

    Returns:
        ``(cluster, separation)``: batch means of the distance to the nearest own-class prototype
        and to the nearest other-class prototype.
    """
    own = labels[:, None] == prototype_classes[None, :]  # (B, P)
    cluster = min_distances.masked_fill(~own, math.inf).amin(1)  # (B,)
    separation = min_distances.masked_fill(own, math.inf).amin(1)  # (B,)
    return cluster.mean(), separation.mean()


def diversity_cost(prototypes: torch.Tensor, cosine: float) -> torch.Tensor:
    """Mean over prototype pairs of ``max(0, arccos(cosine) - angle(p_i, p_j))``, in radians.

    A hinge on the angle rather than on the cosine itself: the cosine's gradient vanishes as two
    vectors become parallel (``d cos / d angle = -sin(angle)``), exactly where duplicates need
    pushing apart, while the angle's does not.

    Args:
        prototypes: (P, D, ...) prototype vectors.
        cosine: pairs whose cosine is above this (whose angle is below ``arccos(cosine)``) are penalised.

    Returns:
        scalar; 0 when no two prototypes are closer than ``arccos(cosine)`` in angle.
    """
    unit = F.normalize(prototypes.flatten(1), dim=1)
    P = unit.shape[0]
    if P < 2:
        return prototypes.sum() * 0.0
    i, j = torch.triu_indices(P, P, offset=1, device=unit.device)
    # clamped off +-1, where arccos has an infinite slope
    angle = torch.arccos((unit[i] * unit[j]).sum(-1).clamp(-1.0 + 1e-6, 1.0 - 1e-6))
    return F.relu(math.acos(cosine) - angle).mean()


def near_data_cost(min_distances: torch.Tensor, labels: torch.Tensor, prototype_classes: torch.Tensor) -> torch.Tensor:
    """Mean over prototypes of the distance to their nearest cell in an own-class image of the batch.

    Args:
        min_distances: (B, P) distance of each prototype to its nearest patch in each image.
        labels: (B,) class of each image.
        prototype_classes: (P,) class of each prototype.

    Returns:
        scalar over the prototypes whose class is in the batch (0 when none is).
    """
    own = labels[:, None] == prototype_classes[None, :]  # (B, P)
    present = own.any(0)  # (P,)
    if not present.any():
        return min_distances.sum() * 0.0
    nearest = min_distances.masked_fill(~own, math.inf).amin(0)  # (P,)
    return nearest[present].mean()


def fine_annotation_cost(similarity_maps: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                         prototype_classes: torch.Tensor, cell_fraction: torch.Tensor | None = None) -> torch.Tensor:
    """IAIA-BL fine-annotation cost on the latent grid: own-class similarity outside the lesion.

    Args:
        similarity_maps: (B, P, *latent) similarity of each prototype at each latent location.
        mask: (B, 1, *spatial) lesion mask at input resolution (bool or [0, 1]).
        labels: (B,) class of each image.
        prototype_classes: (P,) class of each prototype.
        cell_fraction: (B, 1, *latent) lesion fraction of each cell's window, e.g.
            :meth:`Backbone.cell_fraction` (centred on the receptive fields); default: the cell's
            share of the input (adaptive average pooling of ``mask``).

    Returns:
        scalar: mean over annotated images (non-empty mask) and their own-class prototypes of the
        mean over cells of ``((1 - lesion fraction of the cell) * similarity)^2``; 0 when every
        image's own-class similarity lies inside its mask, or when no image is annotated.
    """
    latent = similarity_maps.shape[2:]
    if cell_fraction is None:
        if len(latent) == 2:
            h, w = latent
            cell_fraction = F.adaptive_avg_pool2d(mask.to(similarity_maps.dtype), (h, w))
        else:
            d, h, w = latent
            cell_fraction = F.adaptive_avg_pool3d(mask.to(similarity_maps.dtype), (d, h, w))
    inside = cell_fraction.to(similarity_maps.dtype)  # (B, 1, *latent) lesion fraction per cell
    outside = rearrange(1.0 - inside, "b 1 ... -> b 1 (...)")  # (B, 1, L)
    sims = rearrange(similarity_maps, "b p ... -> b p (...)")  # (B, P, L)
    per_pair = ((outside * sims) ** 2).mean(-1)  # (B, P)
    annotated = rearrange(mask, "b 1 ... -> b (...)").any(-1)  # (B,)
    own = (labels[:, None] == prototype_classes[None, :]) & annotated[:, None]  # (B, P)
    if not own.any():
        return similarity_maps.sum() * 0.0
    return per_pair[own].mean()


def lesion_min_distances(model: ProtoPNet, distance_maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, P) distance of each prototype to its nearest *lesion* cell of each image.

    Lesion cells are those push may project onto (:func:`~mlmi_zoo.architectures.protopnet.prototypes.lesion_cells`:
    receptive-field windows mostly on the lesion, else any overlap); images without a lesion use
    every cell.

    Args:
        model: the ProtoPNet (its backbone defines the cells' windows).
        distance_maps: (B, P, *latent).
        mask: (B, 1, *spatial) lesion masks.
    """
    return min_distances_over(distance_maps, lesion_cells(model, mask, distance_maps.shape[2:]))


def min_distances_over(distance_maps: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """(B, P) distance of each prototype to its nearest allowed cell of each image.

    Args:
        distance_maps: (B, P, *latent).
        cells: (B, L) bool, the allowed cells; an image with none uses every cell.
    """
    cells = torch.where(cells.any(1, keepdim=True), cells, torch.ones_like(cells))
    flat = rearrange(distance_maps, "b p ... -> b p (...)")  # (B, P, L)
    return flat.masked_fill(~cells[:, None, :], math.inf).amin(-1)


class ProtoPNetTraining(FamilyTraining):
    """ProtoPNet's stages and losses for the shared trainer.

    Stages: ``warmup`` and ``joint`` are gradient stages; ``push`` and ``last_layer`` are special
    (:meth:`run_special_stage`): push projects prototypes, last_layer fits the last layer on cached
    similarities (:func:`fit_last_layer`).
    """

    family = "protopnet"
    stage_names = ("warmup", "joint", "push", "last_layer")
    special_stages = ("push", "last_layer")
    settings_class = ProtoPNetTrainingSettings
    settings: ProtoPNetTrainingSettings
    last_layer_epochs = 20  # default passes over the cache when the trainer passes none
    last_layer_lr = 1e-3

    init_images_per_class = 256  # training images per class read by prototype_init="data"

    def prepare(self, model: ProtoPNet, train_set: Any) -> None:
        """Fit the physical head's normalisation on the training split (when there is a head)."""
        if model.physical is not None:
            fit_physical_head(model.physical, train_set)

    def initialise(self, model: ProtoPNet, train_set: Any, seed: int, device: torch.device) -> dict[str, Any] | None:
        """With ``prototype_init="data"``: :func:`initialise_prototypes_from_data` (with ``cluster_on_push_cells``,
        among the cells push may use); else nothing.

        Returns:
            the initialisation summary, or None when the prototypes keep their uniform start.
        """
        if self.settings.prototype_init != "data":
            return None

        def cells(batch: dict[str, Any], x: torch.Tensor, latent_shape: tuple[int, ...]) -> torch.Tensor | None:
            return self.push_cells(model, batch, x, latent_shape, batch.get("mask") is not None)

        return initialise_prototypes_from_data(model, train_set, seed, self.init_images_per_class, device=device,
                                               cells=cells if self.settings.cluster_on_push_cells else None,
                                               keys=self._cell_keys() if self.settings.cluster_on_push_cells else ())

    def _cell_keys(self) -> tuple[str, ...]:
        """The sample entries :meth:`push_cells` reads besides the image."""
        cfg = self.settings
        keys = ("mask",) if cfg.push_on_lesion else ()
        if cfg.push_foreground is not None and cfg.push_foreground != INTENSITY_FOREGROUND:
            keys += (cfg.push_foreground,)
        return keys

    def loss(self, model: ProtoPNet, batch: dict[str, Any], stage: str) -> LossOutput:
        """Cross-entropy + cluster + separation + L1 (+ fine-annotation, + physical head).

        In ``last_layer`` (when run as a gradient stage) only the convex part, CE + L1, is used. A
        gradient step on pushed prototypes drops the push records, which would no longer be true.
        """
        cfg = self.settings
        if (stage != "last_layer" and model.prototype_sources is not None and torch.is_grad_enabled()
                and model.prototype_layer.prototypes.requires_grad):
            # The prototypes are about to move off the patches they were projected onto.
            log.info("training prototypes after push: dropping push records (push again to restore them)")
            model.set_prototype_sources(None)
        x = self.inputs(model, batch)
        labels = batch["label"].to(x.device)
        spacing = batch.get("spacing")
        spacing = None if spacing is None else torch.as_tensor(spacing).to(x.device, torch.float32).reshape(x.shape[0], -1)
        parts = model.forward_parts(x, spacing)
        classes = model.prototype_classes
        ce = F.cross_entropy(parts.logits, labels)
        l1 = off_class_l1(model.last_layer.weight, classes)
        logs = {"ce": float(ce.detach()), "l1": float(l1.detach())}
        if stage == "last_layer":
            return LossOutput(ce + cfg.l1_coef * l1, parts.logits.detach(), logs)
        cluster_distances = parts.min_distances
        has_mask = batch.get("mask") is not None and batch["mask"].ndim == x.ndim
        if cfg.cluster_on_push_cells:
            # Where push will project (foreground, off the border, lesions): prototypes are learnt there.
            cells = self.push_cells(model, batch, x, tuple(parts.distance_maps.shape[2:]), has_mask)
            if cells is not None:
                cluster_distances = min_distances_over(parts.distance_maps, cells)
        elif cfg.push_on_lesion and has_mask:
            # Prototypes will be projected onto lesion cells: pull them towards lesion cells while
            # training, or push would move them far from where they were learnt.
            cluster_distances = lesion_min_distances(model, parts.distance_maps, batch["mask"].to(x.device))
        cluster, _ = cluster_separation_costs(cluster_distances, labels, classes)
        _, separation = cluster_separation_costs(parts.min_distances, labels, classes)
        loss = ce + cfg.clst_coef * cluster + cfg.sep_coef * separation + cfg.l1_coef * l1
        logs.update(cluster=float(cluster.detach()), separation=float(separation.detach()))
        if cfg.near_data_coef:
            near = near_data_cost(cluster_distances, labels, classes)
            loss = loss + cfg.near_data_coef * near
            logs["near_data"] = float(near.detach())
        if cfg.div_coef:
            div = diversity_cost(model.prototype_layer.prototypes, cfg.div_cosine)
            loss = loss + cfg.div_coef * div
            logs["diversity"] = float(div.detach())
        if cfg.fa_coef and batch.get("mask") is not None and batch["mask"].ndim == x.ndim:
            maps = model.prototype_layer.similarity(parts.distance_maps)
            mask = batch["mask"].to(x.device)
            fa = fine_annotation_cost(maps, mask, labels, classes, model.backbone.cell_fraction(mask, maps.shape[2:]))
            loss = loss + cfg.fa_coef * fa
            logs["fine_annotation"] = float(fa.detach())
        if model.physical is not None and parts.quantities is not None:
            phys = model.physical.loss(parts.quantities, {k: v.to(x.device) for k, v in batch["measurements"].items()},
                                       batch["spacing"].to(x.device, parts.quantities.dtype))
            loss = loss + phys
            logs["physical"] = float(phys.detach())
        if isinstance(model.physical, LesionCountHead) and parts.lesion_fraction is not None and cfg.measure_map_coef \
                and batch.get("mask") is not None and batch["mask"].ndim == x.ndim:
            # The count head's map is fitted to each tile's lesion share: dense supervision of what is counted.
            fit = model.physical.map_loss(parts.lesion_fraction, batch["mask"].to(x.device), spacing)
            loss = loss + cfg.measure_map_coef * fit
            logs["measure_map"] = float(fit.detach())
        return LossOutput(loss, parts.logits.detach(), logs)

    def push_cells(self, model: ProtoPNet, batch: dict[str, Any], x: torch.Tensor, latent_shape: tuple[int, ...],
                   has_mask: bool = True) -> torch.Tensor | None:
        """(B, L) bool: the cells push may project onto under these settings (:func:`push_cells`); None: any.

        Args:
            has_mask: whether the batch carries lesion masks (``push_on_lesion`` reads them only then).
        """
        cfg = self.settings
        return push_cells(model, batch, x, latent_shape, on_lesion=cfg.push_on_lesion and has_mask,
                          foreground=cfg.push_foreground, off_border=cfg.push_off_border,
                          foreground_share=cfg.push_foreground_share)

    def trainable_parameters(self, model: ProtoPNet, stage: str) -> list[nn.Parameter]:
        """warmup: add-on, prototypes (+ physical head); joint: all; last_layer: last layer; push: none."""
        if stage == "warmup":
            modules = [model.add_on, model.prototype_layer] + ([model.physical] if model.physical is not None else [])
            return [p for m in modules for p in m.parameters()]
        if stage == "joint":
            return list(model.parameters())
        if stage == "last_layer":
            return list(model.last_layer.parameters())  # its weight: the last layer has no bias
        if stage == "push":
            return []
        raise ValueError(f"unknown ProtoPNet stage {stage!r}; expected one of {self.stage_names}")

    def run_special_stage(self, model: ProtoPNet, stage: str, loader: Any, device: torch.device,
                          epochs: int | None = None, lr: float | None = None) -> dict[str, Any]:
        """``push``: project prototypes; ``last_layer``: fit on cached similarities.

        Args:
            epochs, lr: for ``last_layer`` (defaults: ``last_layer_epochs``, ``last_layer_lr``).

        Returns:
            JSON-safe summary for the run log.
        """
        if stage == "push":
            records = push_prototypes(model, loader, device, on_lesion=self.settings.push_on_lesion,
                                      foreground=self.settings.push_foreground,
                                      distinct=self.settings.push_distinct,
                                      off_border=self.settings.push_off_border,
                                      foreground_share=self.settings.push_foreground_share)
            pushed = [r for r in records if r is not None]
            out = {"pushed": len(pushed), "not_pushed": len(records) - len(pushed),
                   "mean_distance": sum(r["distance"] for r in pushed) / max(len(pushed), 1)}
            if self.settings.prune_duplicates:
                duplicates = duplicate_prototypes(model)
                model.disable_prototypes(duplicates)
                out["switched_off_duplicates"] = duplicates
                if duplicates:
                    log.info("push: %d of %d prototypes duplicate an earlier one and are switched off: %s",
                             len(duplicates), len(records), duplicates)
            return out
        if stage == "last_layer":
            return fit_last_layer(model, loader, epochs=self.last_layer_epochs if epochs is None else epochs,
                                  lr=self.last_layer_lr if lr is None else lr, l1=self.settings.l1_coef, device=device)
        return super().run_special_stage(model, stage, loader, device)
