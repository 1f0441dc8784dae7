"""Faithfulness: does the model really use what its explanation points at?

Faithfulness is checked, not assumed (DESIGN.md, after Wang et al., "A Framework for
Interpretability in Machine Learning for Medical Imaging", arXiv 2310.01685; IEEE Access 2024):
remove the most-attributed evidence and watch the score of the explained class fall.

* :func:`deletion_curve`, :func:`insertion_curve` — the deletion and insertion metrics of Petsiuk
  et al., "RISE: Randomized input sampling for explanation of black-box models", BMVC 2018;
* :func:`faithfulness_gap` — area between the random-order and the attribution-order deletion
  curves (the random-order control of the evidence rules);
* :func:`instance_deletion_curve` — the deletion curve for bags of a multiple-instance model, which
  masks out instances instead of pixels.

What we changed: the ranking breaks ties by the lower flat index, the removed counts are exact
(``fractions`` report them), the random order is seeded, padding instances never take part, and
``min_keep`` instances stay in every bag because attention pooling over an empty bag is undefined.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
from einops import rearrange

from mlmi_zoo.evaluation._arrays import ArrayLike, _class_index, _descending_order, _tensor

__all__ = ["Curve", "deletion_curve", "faithfulness_gap", "insertion_curve", "instance_deletion_curve"]

ScoreKind = Literal["probability", "logit"]


@dataclass(frozen=True)
class Curve:
    """A deletion or insertion curve.

    Attributes:
        fractions: (S+1,) fraction of pixels (or instances) removed/inserted at each step.
        scores: (S+1,) mean target-class score over the cases.
        per_case: (B, S+1) the score of every case at every step.
        kind: "deletion", "insertion" or "instance_deletion".
        order: "attribution" (most-attributed first) or "random".
        score: "probability" or "logit".
    """

    fractions: torch.Tensor  # (S+1,)
    scores: torch.Tensor  # (S+1,)
    per_case: torch.Tensor  # (B, S+1)
    kind: str
    order: str
    score: str

    @property
    def auc(self) -> float:
        """Area under the mean curve (trapezoid rule over ``fractions``)."""
        return float(torch.trapezoid(self.scores, self.fractions))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (curves as lists, plus the AUC)."""
        return {
            "fractions": self.fractions.tolist(),
            "scores": self.scores.tolist(),
            "auc": self.auc,
            "kind": self.kind,
            "order": self.order,
            "score": self.score,
        }


def _target_score(logits: torch.Tensor, target: torch.Tensor, score: ScoreKind) -> torch.Tensor:
    """(B,) probability or logit of the target class; a single-logit output is read as sigmoid."""
    if logits.ndim != 2:
        raise ValueError(f"the model must return logits of shape (B, C); got {tuple(logits.shape)}")
    if score == "logit":
        values = logits
    elif score == "probability":
        values = logits.sigmoid() if logits.shape[1] == 1 else logits.softmax(-1)
    else:
        raise ValueError(f"score must be 'probability' or 'logit'; got {score!r}")
    return values.gather(1, target[:, None])[:, 0].double()


def _rank(values: torch.Tensor, order: str, seed: int) -> torch.Tensor:
    """(B, N) position of each element in the removal order (0 = removed first)."""
    if order == "attribution":
        keys = values
    elif order == "random":
        generator = torch.Generator().manual_seed(seed)
        keys = torch.rand(values.shape, generator=generator, dtype=torch.float64).to(values.device)
        keys = torch.where(torch.isinf(values) & (values < 0), values.double(), keys)  # padding stays last
    else:
        raise ValueError(f"order must be 'attribution' or 'random'; got {order!r}")
    ordering = _descending_order(keys)  # (B, N)
    positions = torch.arange(values.shape[1], device=values.device).expand_as(ordering)
    return torch.empty_like(ordering).scatter_(1, ordering, positions)


def _pixel_curve(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    maps: ArrayLike,
    steps: int,
    baseline: float | torch.Tensor,
    class_index: int | Sequence[int] | torch.Tensor | None,
    order: str,
    seed: int,
    score: ScoreKind,
    kind: str,
) -> Curve:
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    if x.ndim < 3:
        raise ValueError(f"x must be (B, C, *spatial); got shape {tuple(x.shape)}")
    batch, spatial = x.shape[0], x.shape[2:]
    attribution = _tensor(maps).to(x.device).double()
    if attribution.ndim == x.ndim and attribution.shape[1] == 1:
        attribution = attribution[:, 0]
    if attribution.shape != (batch, *spatial):
        raise ValueError(
            f"maps must be (B, *spatial) = {(batch, *spatial)} at input resolution; got "
            f"{tuple(attribution.shape)}. Upsample the maps to the input size first."
        )
    if torch.isnan(attribution).any():
        raise ValueError("maps contain NaN; a saliency map must be finite everywhere")
    rank = _rank(rearrange(attribution, "b ... -> b (...)"), order, seed)  # (B, N)
    n_pixels = rank.shape[1]
    base = torch.as_tensor(baseline, dtype=x.dtype, device=x.device).expand_as(x)  # (B, C, *spatial)
    counts = [math.floor(s * n_pixels / steps + 0.5) for s in range(steps + 1)]
    per_case = []
    with torch.no_grad():
        target = _class_index(class_index, batch, model(x).argmax(-1))
        for k in counts:
            selected = (rank < k).reshape(batch, 1, *spatial)  # (B, 1, *spatial), broadcast over channels
            perturbed = torch.where(selected, base, x) if kind == "deletion" else torch.where(selected, x, base)
            per_case.append(_target_score(model(perturbed), target, score).cpu())
    per_case_t = torch.stack(per_case, 1)  # (B, S+1)
    fractions = torch.tensor(counts, dtype=torch.float64) / n_pixels
    return Curve(fractions, per_case_t.mean(0), per_case_t, kind, order, score)


def deletion_curve(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    maps: ArrayLike,
    steps: int = 20,
    baseline: float | torch.Tensor = 0.0,
    class_index: int | Sequence[int] | torch.Tensor | None = None,
    order: Literal["attribution", "random"] = "attribution",
    seed: int = 0,
    score: ScoreKind = "probability",
) -> Curve:
    """Remove the most-attributed pixels first and record the target-class score.

    At step ``s`` of ``S`` the ``round(s N / S)`` highest-ranked of the ``N`` pixels/voxels are
    replaced, in every channel, by the baseline. Ranking is by decreasing map value, ties by lower flat
    index; ``order="random"`` uses a random permutation per case drawn from ``seed``. The model is
    called under ``torch.no_grad()`` and as given: put it in ``eval()`` mode first.

    Args:
        model: callable mapping (B, C, *spatial) inputs to (B, C_out) logits.
        x: (B, C, *spatial) network input (already intensity-transformed).
        maps: (B, *spatial) or (B, 1, *spatial) attribution maps at input resolution.
        steps: number of steps S.
        baseline: replacement value, or a tensor broadcastable to ``x`` (e.g. a blurred image).
        class_index: class tracked per case (int or (B,)); None tracks the class predicted on ``x``.
        order: "attribution" or "random".
        seed: seed of the random order.
        score: "probability" (softmax; sigmoid for one output) or "logit".

    Returns:
        A :class:`Curve` with ``kind="deletion"``; ``fractions`` are the exact removed fractions.
    """
    return _pixel_curve(model, x, maps, steps, baseline, class_index, order, seed, score, "deletion")


def insertion_curve(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    maps: ArrayLike,
    steps: int = 20,
    baseline: float | torch.Tensor = 0.0,
    class_index: int | Sequence[int] | torch.Tensor | None = None,
    order: Literal["attribution", "random"] = "attribution",
    seed: int = 0,
    score: ScoreKind = "probability",
) -> Curve:
    """Start from the baseline image and insert the most-attributed pixels first.

    The mirror of :func:`deletion_curve` (same ranking, arguments and conventions); a faithful map
    makes the insertion curve rise fast (high AUC).

    Args:
        model: callable mapping (B, C, *spatial) inputs to (B, C_out) logits.
        x: (B, C, *spatial) network input.
        maps: (B, *spatial) or (B, 1, *spatial) attribution maps at input resolution.
        steps: number of steps S.
        baseline: value (or tensor broadcastable to ``x``) of the pixels not yet inserted.
        class_index: class tracked per case; None tracks the class predicted on ``x``.
        order: "attribution" or "random".
        seed: seed of the random order.
        score: "probability" or "logit".

    Returns:
        A :class:`Curve` with ``kind="insertion"``.
    """
    return _pixel_curve(model, x, maps, steps, baseline, class_index, order, seed, score, "insertion")


def faithfulness_gap(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    maps: ArrayLike,
    steps: int = 20,
    baseline: float | torch.Tensor = 0.0,
    class_index: int | Sequence[int] | torch.Tensor | None = None,
    seed: int = 0,
    score: ScoreKind = "probability",
) -> float:
    """Area between the random-order and the attribution-order deletion curves.

    ``AUC(random) - AUC(attribution)``: positive when removing the most-attributed pixels lowers the
    score faster than removing pixels at random, i.e. the map points at what the model uses.
    Arguments are those of :func:`deletion_curve`.

    Args:
        model: callable mapping inputs to (B, C_out) logits.
        x: (B, C, *spatial) network input.
        maps: (B, *spatial) attribution maps at input resolution.
        steps: number of steps.
        baseline: replacement value.
        class_index: class tracked per case; None tracks the predicted class.
        seed: seed of the random order.
        score: "probability" or "logit".

    Returns:
        The gap in score units (probability or logit) times fraction removed.
    """
    curve = functools.partial(
        deletion_curve, model, x, maps, steps=steps, baseline=baseline, class_index=class_index, seed=seed, score=score
    )
    return curve(order="random").auc - curve(order="attribution").auc


def instance_deletion_curve(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    feats: torch.Tensor,
    mask: torch.Tensor | None,
    scores: ArrayLike,
    steps: int = 20,
    class_index: int | Sequence[int] | torch.Tensor | None = None,
    order: Literal["attribution", "random"] = "attribution",
    seed: int = 0,
    score: ScoreKind = "probability",
    min_keep: int = 1,
) -> Curve:
    """Deletion curve for bags: mask out the most-attributed instances first.

    At step ``s`` bag ``b`` loses its ``min(round(s n_b / S), n_b - min_keep)`` highest-scoring valid
    instances (``n_b`` = its number of valid instances) by setting their mask to False; padding never
    takes part. ``min_keep`` instances always remain, because attention pooling over an empty bag is
    undefined; ``fractions`` are therefore the nominal ``s / S``.

    Args:
        model_fn: callable ``(feats (B, N, D), mask (B, N) bool) -> logits (B, C)``.
        feats: (B, N, D) instance features.
        mask: (B, N) bool, True for real instances; None means all are real.
        scores: (B, N) instance attributions toward the tracked class (e.g. attention, or
            ``contributions[arange(B), target]`` of an additive MIL explanation).
        steps: number of steps S.
        class_index: class tracked per bag; None tracks the class predicted on the full bag.
        order: "attribution" or "random".
        seed: seed of the random order.
        score: "probability" or "logit".
        min_keep: instances kept in every bag at the last steps (>= 0).

    Returns:
        A :class:`Curve` with ``kind="instance_deletion"``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    if min_keep < 0:
        raise ValueError(f"min_keep must be >= 0; got {min_keep}")
    batch, n_inst = feats.shape[:2]
    valid = torch.ones(batch, n_inst, dtype=torch.bool, device=feats.device) if mask is None else mask.bool()
    attribution = _tensor(scores).to(feats.device).double()
    if attribution.shape != valid.shape:
        raise ValueError(f"scores must be (B, N) = {tuple(valid.shape)}; got {tuple(attribution.shape)}")
    if torch.isnan(attribution[valid]).any():
        raise ValueError("scores of valid instances contain NaN")
    attribution = attribution.masked_fill(~valid, -math.inf)  # padding ranks last
    rank = _rank(attribution, order, seed)  # (B, N)
    n_valid = valid.sum(1)  # (B,)
    per_case = []
    with torch.no_grad():
        target = _class_index(class_index, batch, model_fn(feats, valid).argmax(-1))
        for s in range(steps + 1):
            k = torch.floor(n_valid.double() * s / steps + 0.5).long()
            k = torch.minimum(k, (n_valid - min_keep).clamp(min=0))  # (B,)
            kept = valid & ~(rank < k[:, None])  # (B, N)
            per_case.append(_target_score(model_fn(feats, kept), target, score).cpu())
    per_case_t = torch.stack(per_case, 1)  # (B, S+1)
    fractions = torch.arange(steps + 1, dtype=torch.float64) / steps
    return Curve(fractions, per_case_t.mean(0), per_case_t, "instance_deletion", order, score)
