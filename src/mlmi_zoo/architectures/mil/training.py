"""How the shared trainer trains attention MIL and additive MIL (:mod:`mlmi_zoo.architectures.mil.model`).

Batches are padded bags: ``batch["feats"]`` (B, N, D) cached features or ``batch["tiles"]``
(B, N, C, t, t) raw tiles, ``batch["mask"]`` (B, N) bool, ``batch["label"]`` (B,), and for the
physical head ``batch["measurements"][name]`` (B,) bag areas and, when the data know them,
per-instance areas ``batch["instance_measurements"][name]`` (B, N) (or ``batch["instance_area_mm2"]``
(B, N) in mm² for the first quantity). An optional ``batch["microns_per_pixel"]`` (B,) overrides
the configured pixel size per slide.

Stages. ``"joint"``: loss = cross-entropy + ``physical_weight`` x physical loss +
``attention_instance_weight`` x instance-label loss + ``attention_bag_weight`` x bag-label instance
loss. ``"area_head"``: the physical loss alone, only the area head trains (the attention and the
classifier stay as they are). A bag classifier on a few hundred bags can overfit within a few epochs
while the per-tile area head still learns; with this second stage each part is kept at its own best
validation epoch (``select_metric: val_stage_loss``: in this stage the stage loss is the physical one).

Physical loss. Per-instance areas, when present, give a binary cross-entropy on each tile's covered
fraction: a proper scoring rule, so each predicted fraction estimates the tile's expected fraction
and their sum the bag's area without bias. Only quantities without per-instance areas fall back to
a bag-area loss, a squared error in log space, ``(log(pred + a) - log(target + a))²`` with ``a`` =
one tile's area: relative errors count the same on small and large tumours, and slides without
tumour (target 0) are fine because the offset of one tile keeps the logarithm finite. (Added to
the per-instance term, that loss drove the fractions down: in a tumour-free bag of 300 tiles a
predicted 1% per tile already costs ``log(4)² = 1.9``, against a mean per-tile cross-entropy of
0.01.)

Instance-label loss, when the bags carry instance labels (``batch["instance_labels"]`` (B, N),
0/1): a binary cross-entropy of each valid instance's raw attention score (with its bag offset)
against its label. It makes the scores an instance classifier that is comparable across bags,
which the softmax alone leaves undetermined up to one constant per bag. For additive MIL it adds
the same loss on each instance's positive-class term ``psi(h_n)[1]`` (two classes only), so that
the sign of its contribution marks tumour tiles.

Bag-label instance loss (:func:`bag_label_instance_loss`), from the bag labels alone under the
standard MIL assumption (Dietterich, Lathrop & Lozano-Pérez, "Solving the multiple instance problem
with axis-parallel rectangles", Artificial Intelligence 1997: a bag is positive if and only if at
least one of its instances is): a binary cross-entropy of the raw attention scores, against 0 for
every instance of a negative bag and against 1 for the highest-scored instance of a positive bag,
as the max-pooling instance classifier of Wang et al., "Revisiting multiple instance neural
networks", Pattern Recognition 2018 (mi-Net), is trained.

During training each bag is randomly subsampled to ``train_max_instances`` valid instances
(deterministic given torch's RNG); the bag-area prediction of a subsample is scaled by
``n_valid / n_kept``, the unbiased estimate of the full-bag sum under uniform sampling.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from mlmi_zoo.architectures.mil.config import MILTrainingSettings
from mlmi_zoo.architectures.mil.heads import InstanceAreaHead
from mlmi_zoo.architectures.mil.model import BagOutputs, _MILModel
from mlmi_zoo.architectures.blocks.stages import FamilyTraining, LossOutput
from mlmi_zoo.units import convert

__all__ = ["MILInputs", "MILTraining", "feature_bag_inputs", "AdditiveMILTraining", "subsample_instances", "gather_instances",
           "bag_label_instance_loss"]


def bag_label_instance_loss(scores: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of raw instance scores against what two-class bag labels imply.

    Every valid instance of a negative bag (label 0) has target 0; the highest-scored valid
    instance of a positive bag (label 1) has target 1. The negative term is the mean over all
    negative instances of the batch, the positive term the mean over positive bags; a batch
    without one kind of bag contributes only the other term.

    Args:
        scores: (B, N) raw instance scores (logits).
        mask: (B, N) bool, True at valid instances.
        labels: (B,) bag labels in {0, 1}.

    Raises:
        ValueError: for a label other than 0 or 1.
    """
    labels = labels.to(scores.device).long()
    if bool(((labels != 0) & (labels != 1)).any()):
        raise ValueError(f"bag labels must be 0 (negative) or 1 (positive), got {sorted(set(labels.tolist()))}")
    loss = scores.new_zeros(())
    negative = mask & (labels == 0)[:, None]  # (B, N)
    if negative.any():
        loss = loss + nn.functional.binary_cross_entropy_with_logits(scores[negative], torch.zeros_like(scores[negative]))
    positive = labels == 1  # (B,)
    if positive.any():
        top = scores[positive].masked_fill(~mask[positive], -torch.inf).amax(1)  # (P,)
        loss = loss + nn.functional.binary_cross_entropy_with_logits(top, torch.ones_like(top))
    return loss


class MILInputs(NamedTuple):
    """The model inputs of a bag batch: call ``model(*inputs)``."""

    feats: torch.Tensor  # (B, N, D) features or (B, N, C, t, t) tiles
    mask: torch.Tensor  # (B, N) bool


def _with_mask(x: torch.Tensor, batch: Mapping[str, Any]) -> MILInputs:
    """``x`` with the batch's (B, N) bool mask; every instance valid when the batch has none."""
    mask = batch.get("mask")
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return MILInputs(x, mask.bool())


def feature_bag_inputs(model: Any, batch: Mapping[str, Any]) -> MILInputs:
    """(feats, mask) of a collated batch of cached-feature bags, for any model that reads them.

    Raises:
        ValueError: when the batch holds no ``feats``.
    """
    if "feats" not in batch:
        raise ValueError(f"{model.architecture} takes cached features: expected batch['feats'] (B, N, D), "
                         f"got keys {sorted(batch)}")
    return _with_mask(batch["feats"].float(), batch)


def subsample_instances(mask: torch.Tensor, max_instances: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick up to ``max_instances`` valid instances per bag uniformly at random.

    Args:
        mask: (B, N) bool, True at valid instances.
        max_instances: M, the subsample size (M < N).
        generator: random generator; default: torch's global one (so runs are seeded by torch).

    Returns:
        (B, M) sorted instance indices; bags with fewer than M valid instances keep all of them and
        fill the rest with padding indices (still masked after :func:`gather_instances`).
    """
    # Drawn on the CPU generator, so the subsample is the same on every device for a given seed.
    keys = torch.rand(mask.shape, generator=generator).to(mask.device)  # (B, N)
    keys = keys.masked_fill(~mask, 2.0)  # valid instances draw keys in [0, 1): they come first
    return keys.topk(max_instances, dim=1, largest=False).indices.sort(dim=1).values


def gather_instances(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, N, ...) per-instance tensor, (B, M) indices -> (B, M, ...)."""
    rows = torch.arange(x.shape[0], device=x.device)[:, None]  # (B, 1)
    return x[rows, index.to(x.device)]


class MILTraining(FamilyTraining):
    """Attention MIL: cross-entropy plus the physical-head loss, on randomly subsampled bags."""

    family = "abmil"
    stage_names = ("joint", "area_head")
    settings_class = MILTrainingSettings
    settings: MILTrainingSettings

    def check(self, model: _MILModel) -> None:
        """The bag-label instance loss reads bag labels as negative / positive: it needs two classes."""
        if self.settings.attention_bag_weight > 0 and model.num_classes != 2:
            raise ValueError("training.attention_bag_weight reads bag labels as negative (class 0) and positive "
                             f"(class 1); it needs two classes, got {model.num_classes}")

    def inputs(self, model: _MILModel, batch: Mapping[str, Any]) -> MILInputs:
        """(feats or tiles, mask) of a collated bag batch; tiles go through the intensity transform.

        Raises:
            ValueError: when the batch holds neither ``feats`` nor ``tiles``.
        """
        if model.config.instance_encoder is None:
            return feature_bag_inputs(model, batch)
        if "tiles" not in batch:
            raise ValueError(f"{model.architecture} encodes raw tiles: expected batch['tiles'] (B, N, C, t, t), "
                             f"got keys {sorted(batch)}")
        return _with_mask(model.input_spec.intensity(batch["tiles"].float()), batch)

    def trainable_parameters(self, model: _MILModel, stage: str) -> list[nn.Parameter]:
        """Every parameter in ``"joint"``; the area head's alone in ``"area_head"``."""
        if stage == "area_head":
            if model.area_head is None:
                raise ValueError("stage 'area_head' trains the area head, and this model has none "
                                 "(model.config.quantities is empty)")
            return list(model.area_head.parameters())
        return super().trainable_parameters(model, stage)

    def loss(self, model: _MILModel, batch: dict[str, Any], stage: str) -> LossOutput:
        x, mask = self.inputs(model, batch)
        instance_targets = self._instance_targets(model, batch)
        labels = batch.get("instance_labels")
        att_weight = self.settings.attention_instance_weight
        instance_labels = labels.to(x.device).float() if labels is not None and att_weight > 0 else None  # (B, N)
        scale = torch.ones(x.shape[0], device=x.device)  # (B,) full-bag / subsample instance count
        limit = self.settings.max_instances(encodes_tiles=model.encoder is not None)
        if model.training and limit is not None and x.shape[1] > limit:
            index = subsample_instances(mask, limit)  # (B, M)
            kept_mask = gather_instances(mask, index)
            scale = mask.sum(1).float() / kept_mask.sum(1).float()
            x, mask = gather_instances(x, index), kept_mask
            instance_targets = {k: gather_instances(v, index) for k, v in instance_targets.items()}
            if instance_labels is not None:
                instance_labels = gather_instances(instance_labels, index)
        out = model.forward_bag(x, mask)
        ce = nn.functional.cross_entropy(out.logits, batch["label"].to(out.logits.device).long())
        logs = {"ce": float(ce.detach())}
        if stage == "area_head":
            if model.area_head is None:
                raise ValueError("stage 'area_head' trains the area head, and this model has none")
            return LossOutput(self._physical_loss(model.area_head, out, batch, scale, instance_targets, logs),
                              out.logits.detach(), logs)
        loss = ce
        if model.area_head is not None and self.settings.physical_weight > 0:
            phys = self._physical_loss(model.area_head, out, batch, scale, instance_targets, logs)
            loss = loss + self.settings.physical_weight * phys
        if instance_labels is not None:
            valid = mask & torch.isfinite(instance_labels)
            target = instance_labels[valid]
            att = nn.functional.binary_cross_entropy_with_logits(out.attention_scores[valid], target)
            logs["attention_instance"] = float(att.detach())
            if out.instance_logits is not None:
                if out.instance_logits.shape[-1] != 2:
                    raise ValueError(f"the instance-label loss of additive MIL needs two classes (negative, positive), "
                                     f"got {out.instance_logits.shape[-1]}; set attention_instance_weight=0")
                term = nn.functional.binary_cross_entropy_with_logits(out.instance_logits[..., 1][valid], target)
                logs["contribution_instance"] = float(term.detach())
                att = att + term
            loss = loss + att_weight * att
        if self.settings.attention_bag_weight > 0:
            bag_term = bag_label_instance_loss(out.attention_scores, mask, batch["label"])
            logs["attention_bag"] = float(bag_term.detach())
            loss = loss + self.settings.attention_bag_weight * bag_term
        return LossOutput(loss, out.logits.detach(), logs)

    # -- physical head ---------------------------------------------------------------------------------
    @staticmethod
    def _instance_targets(model: _MILModel, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """name -> (B, N) per-instance target areas in the quantity's unit, where the batch has them."""
        if model.area_head is None:
            return {}
        given = dict(batch.get("instance_measurements") or {})
        first = model.area_head.quantities[0]
        if first.name not in given and "instance_area_mm2" in batch:
            given[first.name] = batch["instance_area_mm2"] * float(convert(1.0, "mm^2", first.unit))
        return {q.name: given[q.name].float() for q in model.area_head.quantities if q.name in given}

    @staticmethod
    def _physical_loss(head: InstanceAreaHead, out: BagOutputs, batch: dict[str, Any], scale: torch.Tensor,
                       instance_targets: dict[str, torch.Tensor], logs: dict[str, float]) -> torch.Tensor:
        """The area loss of the model's area head ``head`` on one batch."""
        area_logits = out.area_logits
        assert area_logits is not None  # a model with an area head scores every instance
        mpp = batch.get("microns_per_pixel")
        tile_area = head.tile_area(out.mask.shape[0], mpp, out.mask.device)  # (B, Q)
        areas = head.instance_areas(area_logits, out.mask, tile_area)  # (B, N, Q)
        measurements = batch.get("measurements") or {}
        terms = []
        for j, q in enumerate(head.quantities):
            if q.name in measurements and q.name not in instance_targets:
                target = measurements[q.name].to(areas.device).float()  # (B,)
                valid = torch.isfinite(target)
                if valid.any():
                    pred = areas[..., j].sum(1) * scale  # (B,)
                    eps = tile_area[:, j]
                    err = (torch.log(pred + eps) - torch.log(target.clamp_min(0) + eps))[valid]
                    terms.append(err.pow(2).mean())
                    logs[f"{q.name}_log"] = float(terms[-1].detach())
            if q.name in instance_targets:
                fraction = (instance_targets[q.name].to(areas.device) / tile_area[:, j, None]).clamp(0, 1)  # (B, N)
                valid = out.mask & torch.isfinite(fraction)
                if valid.any():
                    bce = nn.functional.binary_cross_entropy_with_logits(area_logits[..., j][valid], fraction[valid])
                    terms.append(bce)
                    logs[f"instance_{q.name}"] = float(bce.detach())
        if not terms:
            return out.logits.sum() * 0.0
        return torch.stack(terms).sum()


class AdditiveMILTraining(MILTraining):
    """Training adapter of additive MIL (same losses; the decomposition needs no extra term)."""

    family = "additive_mil"
