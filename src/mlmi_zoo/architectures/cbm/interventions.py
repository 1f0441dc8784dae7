"""Test-time concept interventions: which concepts to correct first, and what it buys.

Koh et al. ("Concept Bottleneck Models", ICML 2020, section 6) replace predicted concepts by their
true values and measure the task metric as more concepts are corrected. Policies decide the
order: random (Koh et al.), most uncertain first (entropy; Shin et al., "A Closer Look at the
Intervention Procedure of Concept Bottleneck Models", ICML 2023, call it UCP), or a fixed order
fitted greedily on validation data.

What we changed: concepts are typed (a categorical concept is corrected as a whole, all its level
units at once); ground-truth concepts that are missing are skipped (left as predicted), never
imputed from the evaluated split; the curve averages over repeats (not the best repeat); and the
image network runs once per case — every point of the curve re-runs only the label head on cached
bottleneck vectors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Literal

import torch
from torch.utils.data import DataLoader

from mlmi_zoo.architectures.cbm.model import CBM
from mlmi_zoo.architectures.cbm.concept_values import concept_values_from_batch

__all__ = ["InterventionPolicy", "RandomPolicy", "UncertaintyPolicy", "FixedOrderPolicy", "intervention_curve",
           "CachedConcepts", "cache_concepts"]

Metric = Literal["accuracy", "auroc"]


@dataclass(frozen=True)
class CachedConcepts:
    """Everything an intervention curve needs, computed with one pass of the image network.

    Attributes:
        predicted: (N, K) predicted bottleneck vectors.
        true: (N, K) bottleneck vectors of the ground-truth concepts (missing ones imputed; only
            used where ``labelled``).
        labelled: (N, Kc) bool, which ground-truth concepts exist.
        labels: (N,) task labels.
    """

    predicted: torch.Tensor  # (N, K)
    true: torch.Tensor  # (N, K)
    labelled: torch.Tensor  # (N, Kc)
    labels: torch.Tensor  # (N,)


def _as_loader(data: Any, batch_size: int) -> Iterable[dict[str, Any]]:
    if isinstance(data, DataLoader):
        return data
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    return data  # any iterable of collated batches


@torch.no_grad()
def cache_concepts(model: CBM, data: Any, batch_size: int = 64) -> CachedConcepts:
    """Run the image network once over ``data`` (a data set, DataLoader or iterable of batches).

    Batches hold raw ``"image"`` (the model's intensity transform is applied), ``"label"``,
    ``"concepts"``/``"measurements"`` and, for length/area/volume concepts, ``"spacing"``.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    predicted, true, labelled, labels = [], [], [], []
    try:
        for batch in _as_loader(data, batch_size):
            x = model.input_spec.intensity(batch["image"].to(device))
            spacing = batch.get("spacing")
            spacing = None if spacing is None else torch.as_tensor(spacing, dtype=torch.float32, device=device)
            predicted.append(model.codec.bottleneck(model.concept_logits(x, spacing)))
            values = concept_values_from_batch(model.concept_specs, batch, device)
            true.append(model.true_bottleneck(values, spacing))
            labelled.append(torch.isfinite(values))
            labels.append(torch.as_tensor(batch["label"]).to(device))
    finally:
        model.train(was_training)
    if not predicted:
        raise ValueError("intervention data are empty; give a data set or loader with at least one case")
    return CachedConcepts(torch.cat(predicted), torch.cat(true), torch.cat(labelled), torch.cat(labels))


class InterventionPolicy:
    """Decides, per case, the order in which concepts are corrected.

    Attributes:
        name: shown in results.
        deterministic: whether repeats give the same order (then one repeat suffices).
    """

    name: str = "policy"
    deterministic: bool = True

    def order(self, model: CBM, predicted: torch.Tensor, repeat: int) -> torch.Tensor:
        """(N, K) predicted bottleneck vectors -> (N, Kc) concept indices, first corrected first.

        Policies see predictions only, never the ground truth.
        """
        raise NotImplementedError


class RandomPolicy(InterventionPolicy):
    """A random order per case (Koh et al.'s random intervention), reproducible from ``seed``."""

    name = "random"
    deterministic = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def order(self, model: CBM, predicted: torch.Tensor, repeat: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + repeat)
        scores = torch.rand(predicted.shape[0], model.num_concepts, generator=g)
        return scores.argsort(-1).to(predicted.device)


class UncertaintyPolicy(InterventionPolicy):
    """Most uncertain predicted concept first.

    Uncertainty is the entropy of the predicted distribution divided by its maximum (``log 2`` for
    a binary concept, ``log L`` for L levels), so concepts of different widths compare. Continuous
    concepts have no predicted error here and come last, in declaration order.
    """

    name = "uncertainty"

    def order(self, model: CBM, predicted: torch.Tensor, repeat: int) -> torch.Tensor:
        codec = model.codec
        cols = []
        for s, sl in zip(codec.specs, codec.slices):
            p = predicted[:, sl].clamp(1e-7, 1 - 1e-7)
            if s.kind == "binary":
                h = -(p * p.log() + (1 - p) * (1 - p).log()).squeeze(-1) / math.log(2)
            elif s.kind == "continuous":
                h = torch.full_like(p[:, 0], -1.0)
            else:
                h = -(p * p.log()).sum(-1) / math.log(s.width)
            cols.append(h)
        scores = torch.stack(cols, -1)  # (N, Kc)
        return torch.sort(scores, dim=-1, descending=True, stable=True).indices


class FixedOrderPolicy(InterventionPolicy):
    """One order for every case, fitted greedily on validation data (use :meth:`fit`).

    Args:
        concept_order: concept names, first corrected first; must list every concept once.
    """

    name = "fixed"

    def __init__(self, concept_order: tuple[str, ...]) -> None:
        self.concept_order = tuple(concept_order)

    @classmethod
    def fit(cls, model: CBM, val_dataset: Any, metric: Metric = "accuracy", batch_size: int = 64) -> "FixedOrderPolicy":
        """Greedy order: at each step add the concept whose correction most improves the metric.

        Args:
            model: a trained CBM.
            val_dataset: validation data (never the split the curve is evaluated on).
            metric: ``"accuracy"`` or ``"auroc"``.
        """
        cache = cache_concepts(model, val_dataset, batch_size)
        chosen: list[int] = []
        remaining = list(range(model.num_concepts))
        while remaining:
            best, best_value = remaining[0], -math.inf
            for j in remaining:
                selected = torch.zeros(model.num_concepts, dtype=torch.bool, device=cache.labelled.device)
                selected[chosen + [j]] = True
                value = _metric(model, cache, cache.labelled & selected, metric)
                if value > best_value:
                    best, best_value = j, value
            chosen.append(best)
            remaining.remove(best)
        return cls(tuple(model.concept_specs[j].name for j in chosen))

    def order(self, model: CBM, predicted: torch.Tensor, repeat: int) -> torch.Tensor:
        if sorted(self.concept_order) != sorted(s.name for s in model.concept_specs):
            raise ValueError(f"fixed order {self.concept_order} does not list this model's concepts "
                             f"{[s.name for s in model.concept_specs]} exactly once each")
        idx = torch.tensor([model.codec.index(n) for n in self.concept_order], device=predicted.device)
        return idx.expand(predicted.shape[0], -1)


@torch.no_grad()
def _metric(model: CBM, cache: CachedConcepts, known: torch.Tensor, metric: Metric) -> float:
    """Task metric when the ``known`` (N, Kc) concepts are replaced by their ground truth."""
    vector = torch.where(model.codec.unit_mask(known), cache.true, cache.predicted)  # (N, K)
    logits = model.predict_label(vector)  # (N, C)
    labels = cache.labels
    if metric == "accuracy":
        return float((logits.argmax(-1) == labels).float().mean())
    if metric == "auroc":
        from sklearn.metrics import roc_auc_score

        probs = logits.softmax(-1).cpu().numpy()
        y = labels.cpu().numpy()
        try:
            if probs.shape[1] == 2:
                return float(roc_auc_score(y, probs[:, 1]))
            return float(roc_auc_score(y, probs, multi_class="ovr", labels=list(range(probs.shape[1]))))
        except ValueError as err:
            raise ValueError(f"AUROC needs every class among the evaluated labels; {err}") from err
    raise ValueError(f"metric must be 'accuracy' or 'auroc', got {metric!r}")


@torch.no_grad()
def intervention_curve(model: CBM, data: Any, policy: InterventionPolicy, metric: Metric = "accuracy",
                       repeats: int = 5, batch_size: int = 64) -> dict[str, Any]:
    """Task metric after correcting 0, 1, ..., Kc concepts with their ground truth.

    At step k the first k concepts of the policy's order are set to the case's ground truth; a
    concept whose ground truth is missing is skipped (left as predicted) and still uses its place
    in the order.

    Args:
        model: a CBM.
        data: the evaluated split (data set, DataLoader or iterable of collated batches), or its
            :func:`cache_concepts` to compare several policies with one pass of the image network.
        policy: the correction order.
        metric: ``"accuracy"`` or ``"auroc"``.
        repeats: orders drawn for a random policy; the curve is their mean (a deterministic policy
            runs once).

    Returns:
        ``{"metric", "policy", "repeats", "num_cases", "num_corrected": [0..Kc], "values": [Kc + 1
        means], "std": [Kc + 1 standard deviations over repeats], "all_corrected": metric with every
        labelled concept corrected, "none_corrected": metric of the model as is}``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    cache = data if isinstance(data, CachedConcepts) else cache_concepts(model, data, batch_size)
    kc = model.num_concepts
    runs = 1 if policy.deterministic else repeats
    table = torch.zeros(runs, kc + 1, dtype=torch.float64)
    steps = torch.arange(kc, device=cache.labelled.device)
    for r in range(runs):
        order = policy.order(model, cache.predicted, r)  # (N, Kc)
        rank = torch.empty_like(order).scatter_(1, order, steps.expand_as(order))  # (N, Kc) position of each concept
        for k in range(kc + 1):
            table[r, k] = _metric(model, cache, cache.labelled & (rank < k), metric)
    return {
        "metric": metric,
        "policy": policy.name,
        "repeats": runs,
        "num_cases": int(cache.labels.shape[0]),
        "num_corrected": list(range(kc + 1)),
        "values": table.mean(0).tolist(),
        "std": (table.std(0, unbiased=False)).tolist(),
        "all_corrected": _metric(model, cache, cache.labelled, metric),
        "none_corrected": _metric(model, cache, torch.zeros_like(cache.labelled), metric),
    }
