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
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mlmi_zoo.architectures.blocks.heads import LesionCountHead
from mlmi_zoo.architectures.protopnet.config import ProtoPNetTrainingSettings
from mlmi_zoo.architectures.protopnet.model import ProtoPNet
from mlmi_zoo.architectures.protopnet.prototypes import _EvalMode, _device_of, lesion_cells, push_prototypes
from mlmi_zoo.architectures.blocks.stages import FamilyTraining, LossOutput, fit_physical_head

__all__ = [
    "ProtoPNetTraining",
    "cluster_separation_costs",
    "fine_annotation_cost",
    "lesion_min_distances",
    "off_class_l1",
    "cached_similarities",
    "fit_last_layer",
    "initialise_prototypes_from_data",
    "kmeans_pp_pick",
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


def off_class_l1(weight: torch.Tensor, prototype_classes: torch.Tensor) -> torch.Tensor:
    """Sum of |w| over last-layer weights (C, P) that link a prototype to another class."""
    classes = torch.arange(weight.shape[0], device=weight.device)
    off = classes[:, None] != prototype_classes[None, :].to(weight.device)  # (C, P)
    return (weight * off).abs().sum()


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
    cells = lesion_cells(model, mask, distance_maps.shape[2:])  # (B, L)
    cells = torch.where(cells.any(1, keepdim=True), cells, torch.ones_like(cells))
    flat = rearrange(distance_maps, "b p ... -> b p (...)")  # (B, P, L)
    return flat.masked_fill(~cells[:, None, :], math.inf).amin(-1)


@torch.no_grad()
def cached_similarities(model: ProtoPNet, loader: Iterable[dict[str, Any]],
                        device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One eval-mode pass: the last layer's inputs (similarities x switch-off mask) and the labels.

    Returns:
        ``(sims (N, P), labels (N,))`` on ``device``.
    """
    device = _device_of(model, device)
    sims, labels = [], []
    with _EvalMode(model):
        for batch in loader:
            x = model.input_spec.intensity(batch["image"].to(device))
            model.validate_input(x)
            sims.append(model.pooled_similarities(model.latent(x)) * model.prototype_mask)  # (B, P)
            labels.append(torch.as_tensor(batch["label"]).reshape(-1).to(device))
    if not sims:
        raise ValueError("the loader yielded no batches; the last layer needs training data")
    return torch.cat(sims), torch.cat(labels)


def fit_last_layer(model: ProtoPNet, loader: Iterable[dict[str, Any]], epochs: int = 20, lr: float = 1e-3,
                   l1: float | None = None, batch_size: int | None = None,
                   device: torch.device | str | None = None) -> dict[str, float]:
    """Fit the last layer on similarity vectors computed once (the backbone runs one pass only).

    Minimises cross-entropy + ``l1`` x L1 of off-class weights — convex in the last layer — with
    Adam over mini-batches of the cached ``(N, P)`` similarities.

    Args:
        model: a (pushed) ProtoPNet.
        loader: training batches.
        epochs: passes over the cache.
        lr: Adam learning rate.
        l1: L1 coefficient (default: :class:`ProtoPNetTrainingSettings`'s ``l1_coef``).
        batch_size: rows per step (default: the loader's batch size, else 64).
        device: where to compute (default: the model's device).

    Returns:
        ``{"loss_before", "loss_after", "cached_cases", "epochs"}`` (full-cache objective values).
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    l1 = ProtoPNetTrainingSettings().l1_coef if l1 is None else float(l1)
    sims, labels = cached_similarities(model, loader, device)  # (N, P), (N,)
    weight = model.last_layer.weight
    classes = model.prototype_classes.to(weight.device)
    batch_size = batch_size or getattr(loader, "batch_size", None) or 64

    def objective(rows: torch.Tensor | slice) -> torch.Tensor:
        return F.cross_entropy(sims[rows] @ weight.T, labels[rows]) + l1 * off_class_l1(weight, classes)

    was_trainable = weight.requires_grad
    weight.requires_grad_(True)
    try:
        with torch.no_grad():
            before = float(objective(slice(None)))
        optimiser = torch.optim.Adam([weight], lr=lr)
        with torch.enable_grad():
            for _ in range(epochs):
                for rows in torch.randperm(sims.shape[0], device=sims.device).split(batch_size):
                    optimiser.zero_grad(set_to_none=True)
                    objective(rows).backward()
                    optimiser.step()
        with torch.no_grad():
            after = float(objective(slice(None)))
    finally:
        weight.grad = None
        weight.requires_grad_(was_trainable)
    return {"loss_before": before, "loss_after": after, "cached_cases": int(sims.shape[0]), "epochs": int(epochs)}


def _cell_distances(cells: torch.Tensor, centre: torch.Tensor, similarity: str) -> torch.Tensor:
    """(N, D) cells, (D,) centre -> (N,) the prototype layer's distance: squared L2 or ``1 - cos``."""
    if similarity == "cosine":
        return (1.0 - F.normalize(cells, dim=-1) @ F.normalize(centre, dim=0)).clamp_min(0.0)
    return (cells - centre).square().sum(-1)


def kmeans_pp_pick(cells: torch.Tensor, k: int, generator: torch.Generator,
                   similarity: str = "log_l2") -> torch.Tensor:
    """Indices of ``k`` rows of ``cells`` chosen by k-means++ seeding.

    The first row is drawn uniformly; each next one with probability proportional to its distance
    to the nearest row already chosen (Arthur and Vassilvitskii, SODA 2007). The distance is the
    prototype layer's: the squared L2 distance (``log_l2``, the ``D(x)^2`` of k-means++) or
    ``1 - cos`` (``cosine``; half the squared L2 distance of the normalised vectors). Picks thus
    spread over the cells' modes without favouring isolated outliers as farthest-point picks do.

    Args:
        cells: (N, D) candidate vectors, N >= 1.
        k: rows to pick, k >= 1. With fewer than ``k`` distinct rows, rows repeat.
        generator: CPU generator; the picks are a function of its state and ``cells``.
        similarity: ``"log_l2"`` or ``"cosine"``.

    Returns:
        (k,) long indices into ``cells``.
    """
    if cells.ndim != 2 or cells.shape[0] < 1:
        raise ValueError(f"cells must be a non-empty (N, D) matrix, got shape {tuple(cells.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    cells = cells.detach().to("cpu", torch.float64)
    first = int(torch.randint(cells.shape[0], (1,), generator=generator))
    picks = [first]
    nearest = _cell_distances(cells, cells[first], similarity)  # (N,)
    for _ in range(1, k):
        total = float(nearest.sum())
        if total > 0.0:
            nxt = int(torch.multinomial(nearest / total, 1, generator=generator))
        else:  # every cell coincides with a pick already made
            nxt = int(torch.randint(cells.shape[0], (1,), generator=generator))
        picks.append(nxt)
        nearest = torch.minimum(nearest, _cell_distances(cells, cells[nxt], similarity))
    return torch.tensor(picks, dtype=torch.long)


@torch.no_grad()
def initialise_prototypes_from_data(model: ProtoPNet, dataset: Any, seed: int, images_per_class: int = 256,
                                    batch_size: int = 64, device: torch.device | str | None = None) -> dict[str, Any]:
    """Set each class's prototypes to latent cells of its own training images (k-means++ seeding).

    ProtoPNet (Chen et al., NeurIPS 2019) starts prototypes uniformly in ``[0, 1]^D`` and, at push,
    makes each one equal to the nearest latent patch of a training image of its class. This starts
    them there instead: for every class, up to ``images_per_class`` of its training images (drawn
    at random under ``seed``) go through the backbone and add-on in eval mode (batch-norm
    statistics untouched), and the class's ``prototypes_per_class`` prototypes are picked among
    all their latent cells by :func:`kmeans_pp_pick` with the model's distance. Every cell of an
    image is a candidate (``push_on_lesion`` is not consulted). A class without training images
    keeps its prototypes.

    Only a generator seeded with ``seed`` is used: the global RNG state is left as it was, so the
    rest of a run draws the same numbers with either initialisation.

    Args:
        model: a ProtoPNet (its current backbone and add-on define the latent cells).
        dataset: map-style data set of samples with ``"image"`` (C, *spatial, before the intensity
            transform) and ``"label"``.
        seed: fixes which images are read and which cells are picked.
        images_per_class: most images read per class.
        batch_size: images per forward pass.
        device: where to compute (default: the model's device).

    Returns:
        JSON-safe summary: ``{"seed", "images_per_class" (list, per class), "cells_per_class",
        "initialised_classes"}``.
    """
    if images_per_class < 1:
        raise ValueError(f"images_per_class must be >= 1, got {images_per_class}")
    device = _device_of(model, device)
    cfg = model.config
    C, K = cfg.num_classes, cfg.prototypes_per_class
    g = torch.Generator().manual_seed(int(seed))
    counts = [0] * C
    cells: list[list[torch.Tensor]] = [[] for _ in range(C)]
    pending: list[tuple[torch.Tensor, int]] = []

    def flush() -> None:
        if not pending:
            return
        x = model.input_spec.intensity(torch.stack([img for img, _ in pending]).to(device))
        model.validate_input(x)
        z = rearrange(model.latent(x), "b d ... -> b (...) d").float().cpu()  # (B, L, D)
        for row, (_, label) in zip(z, pending):
            cells[label].append(row)
        pending.clear()

    with _EvalMode(model):
        for i in torch.randperm(len(dataset), generator=g).tolist():
            if min(counts) >= images_per_class:
                break
            sample = dataset[i]
            label = int(torch.as_tensor(sample["label"]).reshape(-1)[0])
            if not 0 <= label < C:
                raise ValueError(f"sample {i} has label {label}; the model has {C} classes")
            if counts[label] >= images_per_class:
                continue
            image = torch.as_tensor(sample["image"])
            if pending and pending[0][0].shape != image.shape:
                flush()  # one forward pass per input size
            pending.append((image, label))
            counts[label] += 1
            if len(pending) >= batch_size:
                flush()
        flush()

    prototypes = model.prototype_layer.prototypes
    classes = model.prototype_classes.cpu()
    done = []
    for c in range(C):
        if not cells[c]:
            log.warning("prototype_init='data': no training image of class %d; its prototypes stay uniform", c)
            continue
        pool = torch.cat(cells[c])  # (N_c, D)
        picked = pool[kmeans_pp_pick(pool, K, g, cfg.similarity)]  # (K, D)
        rows = (classes == c).nonzero().reshape(-1)
        prototypes[rows.to(prototypes.device)] = picked.to(prototypes.device, prototypes.dtype)
        done.append(c)
    model.set_prototype_sources(None)  # not push records: training moves these prototypes
    summary = {"seed": int(seed), "images_per_class": counts,
               "cells_per_class": [int(sum(t.shape[0] for t in cs)) for cs in cells], "initialised_classes": done}
    log.info("prototype_init='data': %s", summary)
    return summary


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
        """With ``prototype_init="data"``: :func:`initialise_prototypes_from_data`; else nothing.

        Returns:
            the initialisation summary, or None when the prototypes keep their uniform start.
        """
        if self.settings.prototype_init != "data":
            return None
        return initialise_prototypes_from_data(model, train_set, seed, self.init_images_per_class, device=device)

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
        if cfg.push_on_lesion and batch.get("mask") is not None and batch["mask"].ndim == x.ndim:
            # Prototypes will be projected onto lesion cells: pull them towards lesion cells while
            # training, or push would move them far from where they were learnt.
            cluster_distances = lesion_min_distances(model, parts.distance_maps, batch["mask"].to(x.device))
        cluster, _ = cluster_separation_costs(cluster_distances, labels, classes)
        _, separation = cluster_separation_costs(parts.min_distances, labels, classes)
        loss = ce + cfg.clst_coef * cluster + cfg.sep_coef * separation + cfg.l1_coef * l1
        logs.update(cluster=float(cluster.detach()), separation=float(separation.detach()))
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
            records = push_prototypes(model, loader, device, on_lesion=self.settings.push_on_lesion)
            pushed = [r for r in records if r is not None]
            return {"pushed": len(pushed), "not_pushed": len(records) - len(pushed),
                    "mean_distance": sum(r["distance"] for r in pushed) / max(len(pushed), 1)}
        if stage == "last_layer":
            return fit_last_layer(model, loader, epochs=self.last_layer_epochs if epochs is None else epochs,
                                  lr=self.last_layer_lr if lr is None else lr, l1=self.settings.l1_coef, device=device)
        return super().run_special_stage(model, stage, loader, device)
