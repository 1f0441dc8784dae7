"""Metric kernels for the task and for the five elements of interpretability.

Each element of the framework of Wang et al., "A Framework for Interpretability in Machine Learning
for Medical Imaging" (arXiv 2310.01685; IEEE Access 2024) gets the measurement named in DESIGN.md:

* localization — :func:`activation_precision` (Barnett et al., "A case-based interpretable deep
  learning model for classification of mass lesions in digital mammography" (IAIA-BL), Nature Machine
  Intelligence 2021), :func:`pointing_game` (Zhang et al., "Top-down neural attention by excitation
  backprop", ECCV 2016) and :func:`instance_auroc` for multiple-instance models;
* visual recognizability — :func:`prototype_purity`, :func:`unique_prototypes`, :func:`concept_metrics`;
* physical attribution — :func:`bland_altman` (Bland & Altman, Lancet 1986; confidence intervals of the
  limits from Bland & Altman, Stat Methods Med Res 1999), :func:`mae`, :func:`rmse`;
* transparency — :func:`decomposition_error`, :func:`explanation_size`;
* actionability / faithfulness — :func:`deletion_curve`, :func:`insertion_curve` (Petsiuk et al.,
  "RISE", BMVC 2018), :func:`instance_deletion_curve`, :func:`faithfulness_gap`.

Task metrics (:func:`task_metrics`) carry percentile-bootstrap confidence intervals
(:func:`bootstrap_ci`, Efron & Tibshirani 1993) that resample cases, or patients when ``groups`` is
given. The expected calibration error follows Guo et al., "On calibration of modern neural
networks", ICML 2017 (15 equal-width bins on the top-label confidence). Reader agreement uses Cohen's
weighted kappa (Cohen, Psychol Bull 1968).

What we changed: AUROC, average precision, balanced accuracy, the Brier score, F1 and kappa are
scikit-learn's kernels; we add the NaN conventions (an undefined metric is NaN, never an exception
inside a bootstrap), deterministic tie-breaking, and the definitions documented per function.
"""
from __future__ import annotations

import itertools
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    cohen_kappa_score,
    f1_score,
    mean_squared_error,
    roc_auc_score,
)

from mlmi_zoo.explanations import Explanation

__all__ = [
    "BlandAltman",
    "CI",
    "Curve",
    "activation_precision",
    "agreement",
    "bland_altman",
    "bootstrap_ci",
    "concept_metrics",
    "decomposition_error",
    "deletion_curve",
    "expected_calibration_error",
    "explanation_size",
    "faithfulness_gap",
    "insertion_curve",
    "instance_auroc",
    "instance_deletion_curve",
    "inter_reader_agreement",
    "mae",
    "model_reader_agreement",
    "pointing_game",
    "prototype_purity",
    "reliability_bins",
    "rmse",
    "task_metrics",
    "unique_prototypes",
]

logger = logging.getLogger(__name__)

ArrayLike = Any  # torch.Tensor, numpy array or a nested sequence of numbers
ScoreKind = Literal["probability", "logit"]


# -- conversion helpers ------------------------------------------------------------------------------
def _np(x: ArrayLike, dtype: Any = np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _tensor(x: ArrayLike) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    return torch.as_tensor(np.asarray(x))


def _match_mask(maps: torch.Tensor, masks: torch.Tensor, name: str = "masks") -> tuple[torch.Tensor, torch.Tensor]:
    """Bring maps (B, *spatial) and masks (B, *spatial) or (B, 1, *spatial) to the same shape."""
    if masks.ndim == maps.ndim + 1 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if maps.ndim == masks.ndim + 1 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.shape != masks.shape:
        raise ValueError(
            f"maps and {name} must share their shape (B, *spatial); got maps {tuple(maps.shape)} and "
            f"{name} {tuple(masks.shape)}. Resize the maps to the mask resolution first."
        )
    if maps.ndim < 2:
        raise ValueError(f"maps must be (B, *spatial); got shape {tuple(maps.shape)}")
    if torch.isnan(maps.float()).any():
        raise ValueError("maps contain NaN; a saliency map must be finite everywhere")
    return maps, masks.bool()


def _descending_order(values: torch.Tensor) -> torch.Tensor:
    """(B, N) indices that sort each row by decreasing value; ties keep the lower flat index first."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices


# -- localization -------------------------------------------------------------------------------------
def activation_precision(maps: ArrayLike, masks: ArrayLike, q: float = 0.05) -> torch.Tensor:
    """Share of each map's top-``q`` pixels/voxels that lie inside the ground-truth mask.

    The top set holds ``k = max(1, ceil(q * N))`` of the ``N`` pixels, taken by decreasing map value.
    Ties are broken deterministically: among equal values the pixel with the lower flat (row-major)
    index is taken first. A map that is perfectly on the lesion scores 1 only if the lesion holds at
    least ``k`` pixels.

    Args:
        maps: (B, *spatial) or (B, 1, *spatial) saliency/similarity maps at mask resolution.
        masks: (B, *spatial) or (B, 1, *spatial) boolean lesion masks.
        q: fraction of pixels in the top set, in (0, 1].

    Returns:
        (B,) float64 precision in [0, 1]; NaN for cases whose mask is empty (callers skip them).
    """
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q must be a fraction in (0, 1]; got {q}")
    maps, masks = _match_mask(_tensor(maps).float(), _tensor(masks))
    flat_maps = rearrange(maps, "b ... -> b (...)")  # (B, N)
    flat_masks = rearrange(masks, "b ... -> b (...)")  # (B, N)
    k = max(1, math.ceil(q * flat_maps.shape[1]))
    top = _descending_order(flat_maps)[:, :k]  # (B, k)
    inside = flat_masks.gather(1, top).double().mean(1)  # (B,)
    return torch.where(flat_masks.any(1), inside, torch.full_like(inside, math.nan))


def pointing_game(maps: ArrayLike, masks: ArrayLike, tolerance_px: int = 0) -> torch.Tensor:
    """1 if the arg-max of the map falls in the (optionally dilated) mask, else 0.

    The arg-max is the first maximal pixel in row-major order (deterministic for ties). With
    ``tolerance_px = t`` the mask is dilated by a (2t+1)^d square/cube, i.e. a hit within Chebyshev
    distance ``t`` of the lesion counts.

    Args:
        maps: (B, *spatial) or (B, 1, *spatial) saliency maps; spatial is 1-3 dimensional.
        masks: (B, *spatial) or (B, 1, *spatial) boolean lesion masks.
        tolerance_px: dilation radius in pixels/voxels.

    Returns:
        (B,) float64 of 0/1 hits; NaN for cases whose mask is empty.
    """
    if tolerance_px < 0:
        raise ValueError(f"tolerance_px must be >= 0; got {tolerance_px}")
    maps, masks = _match_mask(_tensor(maps).float(), _tensor(masks))
    dims = maps.ndim - 1
    if tolerance_px > 0:
        pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}.get(dims)
        if pool is None:
            raise ValueError(f"tolerance_px needs 1-3 spatial dimensions; got {dims}")
        dilated = pool(masks.float().unsqueeze(1), 2 * tolerance_px + 1, stride=1, padding=tolerance_px)
        dilated = dilated.squeeze(1) > 0
    else:
        dilated = masks
    flat_maps = rearrange(maps, "b ... -> b (...)")  # (B, N)
    hit = rearrange(dilated, "b ... -> b (...)").gather(1, flat_maps.argmax(1, keepdim=True))[:, 0]  # (B,)
    non_empty = rearrange(masks, "b ... -> b (...)").any(1)
    return torch.where(non_empty, hit.double(), torch.full(hit.shape, math.nan, dtype=torch.float64))


def instance_auroc(scores: ArrayLike, instance_labels: ArrayLike, mask: ArrayLike | None = None) -> dict[str, float]:
    """Instance-level AUROC and average precision, pooled over all valid instances of all bags.

    Args:
        scores: (B, N) instance scores (attention, contribution to the positive class, ...).
        instance_labels: (B, N) 0/1 instance labels; NaN marks an instance without a label (skipped).
        mask: (B, N) bool, True for real instances, False for padding; None means all are real.

    Returns:
        ``{"auroc", "ap", "n_instances", "n_positive"}``; AUROC and AP are NaN when the valid
        instances hold a single class.
    """
    s, y = _np(scores), _np(instance_labels)
    if s.shape != y.shape:
        raise ValueError(f"scores and instance_labels must share a shape (B, N); got {s.shape} and {y.shape}")
    valid = np.ones(s.shape, dtype=bool) if mask is None else _np(mask, bool)
    if valid.shape != s.shape:
        raise ValueError(f"mask must have the shape of scores {s.shape}; got {valid.shape}")
    valid &= ~np.isnan(y)
    s, y = s[valid], y[valid]
    if np.isnan(s).any():
        raise ValueError("scores of valid instances contain NaN; check the mask and the model output")
    n_pos = int((y == 1).sum())
    both = 0 < n_pos < y.size
    return {
        "auroc": float(roc_auc_score(y, s)) if both else math.nan,
        "ap": float(average_precision_score(y, s)) if both else math.nan,
        "n_instances": int(y.size),
        "n_positive": n_pos,
    }


# -- physical attribution -----------------------------------------------------------------------------
@dataclass(frozen=True)
class BlandAltman:
    """Bland–Altman agreement of ``pred`` with ``ref`` (differences are ``pred - ref``).

    Attributes:
        bias: mean difference.
        sd: sample standard deviation of the differences (ddof = 1).
        lower: lower 95% limit of agreement, ``bias - 1.96 sd``.
        upper: upper 95% limit of agreement, ``bias + 1.96 sd``.
        n: number of finite pairs used.
        bias_ci: 95% confidence interval of the bias (t distribution, n - 1 degrees of freedom).
        lower_ci: 95% confidence interval of the lower limit (SE ~ sd * sqrt(3 / n), Bland & Altman 1999).
        upper_ci: 95% confidence interval of the upper limit.
    """

    bias: float
    sd: float
    lower: float
    upper: float
    n: int
    bias_ci: tuple[float, float] = (math.nan, math.nan)
    lower_ci: tuple[float, float] = (math.nan, math.nan)
    upper_ci: tuple[float, float] = (math.nan, math.nan)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict of the fields."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _finite_pairs(pred: ArrayLike, ref: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p, r = _np(pred).reshape(-1), _np(ref).reshape(-1)
    if p.shape != r.shape:
        raise ValueError(f"pred and ref must hold the same number of values; got {p.size} and {r.size}")
    keep = np.isfinite(p) & np.isfinite(r)
    return p[keep], r[keep]


def bland_altman(pred: ArrayLike, ref: ArrayLike) -> BlandAltman:
    """Bias and 95% limits of agreement between a measurement and its reference.

    Pairs where either value is NaN/inf are dropped (``n`` counts the pairs used).

    Args:
        pred: (N,) model measurements, in the same unit as ``ref``.
        ref: (N,) reference measurements.

    Returns:
        A :class:`BlandAltman` record; with fewer than two pairs ``sd`` and the limits are NaN.
    """
    from scipy.stats import t as student_t

    p, r = _finite_pairs(pred, ref)
    d = p - r
    n = int(d.size)
    if n == 0:
        return BlandAltman(math.nan, math.nan, math.nan, math.nan, 0)
    bias = float(d.mean())
    if n < 2:
        return BlandAltman(bias, math.nan, math.nan, math.nan, n)
    sd = float(d.std(ddof=1))
    lower, upper = bias - 1.96 * sd, bias + 1.96 * sd
    tq = float(student_t.ppf(0.975, n - 1))
    se_bias, se_limit = sd / math.sqrt(n), sd * math.sqrt(3.0 / n)
    return BlandAltman(
        bias=bias,
        sd=sd,
        lower=lower,
        upper=upper,
        n=n,
        bias_ci=(bias - tq * se_bias, bias + tq * se_bias),
        lower_ci=(lower - tq * se_limit, lower + tq * se_limit),
        upper_ci=(upper - tq * se_limit, upper + tq * se_limit),
    )


def mae(pred: ArrayLike, ref: ArrayLike) -> float:
    """Mean absolute error over finite pairs (in the unit of the inputs); NaN if none."""
    p, r = _finite_pairs(pred, ref)
    return float(np.abs(p - r).mean()) if p.size else math.nan


def rmse(pred: ArrayLike, ref: ArrayLike) -> float:
    """Root mean squared error over finite pairs (in the unit of the inputs); NaN if none."""
    p, r = _finite_pairs(pred, ref)
    return float(math.sqrt(mean_squared_error(r, p))) if p.size else math.nan


# -- transparency -------------------------------------------------------------------------------------
def decomposition_error(explanation: Explanation) -> float:
    """max |sum(contributions) + bias - logits| over the batch and classes.

    Args:
        explanation: any :class:`~mlmi_zoo.explanations.Explanation`.

    Returns:
        The largest absolute error in logit units, or NaN for explanations that are not
        decomposable (``explanation.decomposable`` is False).
    """
    return explanation.decomposition_error()


def _class_index(index: int | Sequence[int] | torch.Tensor | None, batch: int, fallback: torch.Tensor) -> torch.Tensor:
    """(B,) long class indices from an int, a sequence, a tensor, or ``fallback`` when None."""
    if index is None:
        return fallback.long()
    idx = torch.as_tensor(index, dtype=torch.long, device=fallback.device)
    if idx.ndim == 0:
        idx = idx.expand(batch)
    if idx.shape != (batch,):
        raise ValueError(f"class index must be an int or have shape ({batch},); got shape {tuple(idx.shape)}")
    return idx


def explanation_size(
    contributions: ArrayLike,
    logits_class_index: int | Sequence[int] | torch.Tensor | None = None,
    fraction: float = 0.9,
    atol: float = 0.0,
) -> dict[str, Any]:
    """How many named terms a decision uses.

    For each case the terms are the contributions to the explained class (its row of a (B, C, K)
    tensor, or the (B, K) row given). Two sizes are reported:

    * ``nonzero``: the number of terms with ``|contribution| > atol``;
    * ``terms_needed``: the smallest ``m`` such that the ``m`` largest *positive* terms sum to at least
      ``fraction`` of the sum of all positive terms — i.e. how many terms carry ``fraction`` of the
      evidence *toward* the class (the bias and negative terms are left out, which keeps the count
      monotone and well defined when terms cancel). Cases with no positive term need 0 terms.

    For a two-class softmax decision that should be explained as a margin, pass
    ``contributions[:, 1] - contributions[:, 0]`` as a (B, K) tensor.

    Args:
        contributions: (B, C, K) per-class contributions or (B, K) contributions to one decision.
        logits_class_index: class explained per case (int or (B,)); None takes, for (B, C, K) input,
            the class with the largest summed contribution.
        fraction: share of the positive evidence to reach, in (0, 1].
        atol: magnitude at or below which a term counts as zero.

    Returns:
        ``{"nonzero_mean", "nonzero_median", "terms_needed_mean", "terms_needed_median",
        "num_terms", "fraction", "per_case_nonzero", "per_case_terms_needed"}`` (per-case as lists).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction}")
    c = _tensor(contributions).double()
    if c.ndim == 3:
        cls = _class_index(logits_class_index, c.shape[0], c.sum(-1).argmax(-1))
        terms = c[torch.arange(c.shape[0]), cls]  # (B, K)
    elif c.ndim == 2:
        if logits_class_index is not None:
            raise ValueError("logits_class_index only applies to (B, C, K) contributions; got (B, K)")
        terms = c
    else:
        raise ValueError(f"contributions must be (B, C, K) or (B, K); got shape {tuple(c.shape)}")
    nonzero = (terms.abs() > atol).sum(-1)  # (B,)
    positive = torch.sort(terms.clamp(min=0), dim=-1, descending=True).values  # (B, K)
    cumulative = positive.cumsum(-1)  # (B, K)
    total = cumulative[:, -1:]  # (B, 1)
    target = fraction * total * (1 - 1e-12)  # tolerance against round-off at exact fractions
    needed = (cumulative < target).sum(-1) + 1  # (B,)
    needed = torch.where(total[:, 0] > 0, needed, torch.zeros_like(needed))
    nz, nd = nonzero.numpy(), needed.numpy()
    return {
        "nonzero_mean": float(nz.mean()),
        "nonzero_median": float(np.median(nz)),
        "terms_needed_mean": float(nd.mean()),
        "terms_needed_median": float(np.median(nd)),
        "num_terms": int(terms.shape[1]),
        "fraction": float(fraction),
        "per_case_nonzero": [int(v) for v in nz],
        "per_case_terms_needed": [int(v) for v in nd],
    }


# -- faithfulness -------------------------------------------------------------------------------------
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
    kwargs = dict(steps=steps, baseline=baseline, class_index=class_index, seed=seed, score=score)
    attributed = deletion_curve(model, x, maps, order="attribution", **kwargs)
    random = deletion_curve(model, x, maps, order="random", **kwargs)
    return random.auc - attributed.auc


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


# -- bootstrap ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CI:
    """A point estimate with a percentile-bootstrap confidence interval.

    Attributes:
        estimate: the metric on all cases.
        low: lower bound (``alpha / 2`` quantile of the bootstrap distribution).
        high: upper bound (``1 - alpha / 2`` quantile).
        n: number of bootstrap resamples on which the metric was defined (and used).
    """

    estimate: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict of the fields."""
        return asdict(self)


def bootstrap_ci(
    metric_fn: Callable[..., float],
    *arrays: ArrayLike,
    n: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    groups: ArrayLike | None = None,
) -> CI:
    """Percentile-bootstrap confidence interval of ``metric_fn(*arrays)``.

    Every resample draws the same indices for all arrays. Without ``groups`` it draws N cases with
    replacement; with ``groups`` (e.g. patient ids) it draws G groups with replacement and takes all
    cases of each drawn group, so correlated cases of one patient stay together. Resamples where
    ``metric_fn`` returns NaN/inf (undefined, e.g. one class only) are skipped; ``CI.n`` says how many
    were used. ``metric_fn`` must return NaN rather than raise when the metric is undefined.

    Args:
        metric_fn: function of numpy arrays (row-indexed like ``arrays``) returning a float.
        *arrays: arrays sharing their first dimension N (tensors are converted to numpy).
        n: number of resamples.
        seed: seed of numpy's generator; equal seeds give equal intervals.
        alpha: 1 - confidence level.
        groups: (N,) group id per case, or None to resample cases.

    Returns:
        A :class:`CI`; low/high are NaN when no resample was defined.
    """
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1); got {alpha}")
    data = [a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a) for a in arrays]
    n_cases = len(data[0])
    if any(len(a) != n_cases for a in data):
        raise ValueError(f"all arrays must share their first dimension; got lengths {[len(a) for a in data]}")
    estimate = float(metric_fn(*data))
    rng = np.random.default_rng(seed)
    if groups is None:
        draw = lambda: rng.integers(0, n_cases, n_cases)  # noqa: E731
    else:
        group_ids = groups.detach().cpu().numpy() if isinstance(groups, torch.Tensor) else np.asarray(groups)
        if len(group_ids) != n_cases:
            raise ValueError(f"groups must hold one id per case ({n_cases}); got {len(group_ids)}")
        _, inverse = np.unique(group_ids, return_inverse=True)
        members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
        draw = lambda: np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])  # noqa: E731
    values = []
    for _ in range(n):
        idx = draw()
        value = float(metric_fn(*(a[idx] for a in data)))
        if math.isfinite(value):
            values.append(value)
    if len(values) < n:
        logger.info("bootstrap: metric undefined in %d of %d resamples; they were skipped", n - len(values), n)
    if not values:
        return CI(estimate, math.nan, math.nan, 0)
    low, high = np.quantile(np.asarray(values), [alpha / 2, 1 - alpha / 2])
    return CI(estimate, float(low), float(high), len(values))


# -- task metrics -------------------------------------------------------------------------------------
def reliability_bins(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Top-label reliability diagram statistics in ``n_bins`` equal-width confidence bins.

    Confidence is the largest class probability; a case is correct when its arg-max class equals the
    label. Bins are right-closed, ``((b-1)/n_bins, b/n_bins]`` (a confidence of exactly 0 joins the
    first bin).

    Args:
        probs: (N, C) class probabilities, or (N,) probability of the positive class (binary).
        labels: (N,) integer labels.
        n_bins: number of bins.

    Returns:
        ``{"edges" (n_bins+1,), "confidence" (n_bins,), "accuracy" (n_bins,), "count" (n_bins,)}``;
        empty bins hold NaN confidence/accuracy and count 0.
    """
    p = _as_prob_matrix(probs)
    y = _np(labels, np.int64)
    confidence = p.max(1)
    correct = (p.argmax(1) == y).astype(np.float64)
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(bins, confidence, n_bins) / count
        accuracy = np.bincount(bins, correct, n_bins) / count
    return {"edges": np.linspace(0.0, 1.0, n_bins + 1), "confidence": mean_conf, "accuracy": accuracy, "count": count}


def expected_calibration_error(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Expected calibration error, ``sum_b (n_b / N) |accuracy_b - confidence_b|`` (Guo et al. 2017).

    Uses the top-label bins of :func:`reliability_bins` (15 equal-width bins by default).

    Args:
        probs: (N, C) class probabilities, or (N,) probability of the positive class.
        labels: (N,) integer labels.
        n_bins: number of bins.

    Returns:
        ECE in [0, 1]; NaN for an empty input.
    """
    stats = reliability_bins(probs, labels, n_bins)
    total = stats["count"].sum()
    if total == 0:
        return math.nan
    used = stats["count"] > 0
    gap = np.abs(stats["accuracy"][used] - stats["confidence"][used])
    return float((stats["count"][used] / total * gap).sum())


def _as_prob_matrix(probs: ArrayLike) -> np.ndarray:
    """(N, C) probabilities from (N, C), (N, 1) or (N,) (the latter two: P(positive) of a binary task)."""
    p = _np(probs)
    if p.ndim == 2 and p.shape[1] == 1:
        p = p[:, 0]
    if p.ndim == 1:
        p = np.stack([1.0 - p, p], 1)
    if p.ndim != 2:
        raise ValueError(f"probs must be (N, C) or (N,); got shape {p.shape}")
    return p


def _all_classes(y: np.ndarray, n_classes: int) -> bool:
    return np.unique(y).size == n_classes


def task_metrics(
    probs: ArrayLike,
    labels: ArrayLike,
    operating_point: float = 0.5,
    groups: ArrayLike | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, CI]:
    """Discrimination, decision and calibration metrics, each with a 95% bootstrap CI.

    * ``auroc``: binary AUROC of P(positive); multi-class: macro one-vs-rest AUROC.
    * ``auprc``: average precision (binary); macro over one-vs-rest classes (multi-class).
    * ``balanced_accuracy``, ``sensitivity``, ``specificity`` at the operating point: binary predicts
      positive when ``P(positive) >= operating_point``; multi-class predicts the arg-max and reports
      macro sensitivity (mean per-class recall) and macro specificity (mean per-class TN / (TN + FP)).
    * ``ece``: expected calibration error on the top-label confidence, 15 equal-width bins
      (:func:`expected_calibration_error`); independent of the operating point.
    * ``brier``: binary ``mean (P(positive) - y)^2``; multi-class ``mean_i sum_c (p_ic - y_ic)^2``.

    A metric undefined on a resample (a class missing) is NaN there and the resample is skipped for
    that metric only; all metrics use the same resamples (same ``seed``).

    Args:
        probs: (N, C) class probabilities (rows sum to 1), or (N,) P(positive) for a binary task.
        labels: (N,) integer labels in ``[0, C)``.
        operating_point: decision threshold on P(positive) (binary only).
        groups: (N,) patient/group ids for a group-level bootstrap, or None.
        n_boot: number of bootstrap resamples.
        seed: bootstrap seed.

    Returns:
        ``{name: CI}`` for the seven metrics above.
    """
    p = _as_prob_matrix(probs)
    y = _np(labels, np.int64)
    n_classes = p.shape[1]
    if y.shape != (p.shape[0],):
        raise ValueError(f"labels must be (N,) = ({p.shape[0]},); got shape {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}); got range [{y.min()}, {y.max()}]")
    if not np.allclose(p.sum(1), 1.0, atol=1e-3):
        raise ValueError("probs rows must sum to 1; pass softmax probabilities, not logits")
    binary = n_classes == 2

    def predicted(pp: np.ndarray) -> np.ndarray:
        return (pp[:, 1] >= operating_point).astype(np.int64) if binary else pp.argmax(1)

    def auroc(pp: np.ndarray, yy: np.ndarray) -> float:
        if not _all_classes(yy, n_classes):
            return math.nan
        if binary:
            return roc_auc_score(yy, pp[:, 1])
        return roc_auc_score(yy, pp, multi_class="ovr", average="macro", labels=np.arange(n_classes))

    def auprc(pp: np.ndarray, yy: np.ndarray) -> float:
        if not _all_classes(yy, n_classes):
            return math.nan
        if binary:
            return average_precision_score(yy, pp[:, 1])
        return average_precision_score(np.eye(n_classes)[yy], pp, average="macro")

    def balanced_accuracy(pp: np.ndarray, yy: np.ndarray) -> float:
        return balanced_accuracy_score(yy, predicted(pp)) if _all_classes(yy, n_classes) else math.nan

    def per_class_rates(pp: np.ndarray, yy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pred = predicted(pp)
        cls = np.arange(n_classes)[:, None]  # (C, 1)
        is_true, is_pred = yy[None] == cls, pred[None] == cls  # (C, N)
        recall = (is_true & is_pred).sum(1) / is_true.sum(1)
        specificity = (~is_true & ~is_pred).sum(1) / (~is_true).sum(1)
        return recall, specificity

    def sensitivity(pp: np.ndarray, yy: np.ndarray) -> float:
        if not _all_classes(yy, n_classes):
            return math.nan
        recall, _ = per_class_rates(pp, yy)
        return float(recall[1] if binary else recall.mean())

    def specificity(pp: np.ndarray, yy: np.ndarray) -> float:
        if not _all_classes(yy, n_classes):
            return math.nan
        recall, spec = per_class_rates(pp, yy)
        return float(recall[0] if binary else spec.mean())

    def ece(pp: np.ndarray, yy: np.ndarray) -> float:
        return expected_calibration_error(pp, yy, 15)

    def brier(pp: np.ndarray, yy: np.ndarray) -> float:
        if binary:
            return brier_score_loss(yy, pp[:, 1], pos_label=1) if yy.size else math.nan
        return float(mean_squared_error(np.eye(n_classes)[yy], pp, multioutput="raw_values").sum())

    fns = {
        "auroc": auroc,
        "auprc": auprc,
        "balanced_accuracy": balanced_accuracy,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "ece": ece,
        "brier": brier,
    }
    return {name: bootstrap_ci(fn, p, y, n=n_boot, seed=seed, groups=groups) for name, fn in fns.items()}


# -- concepts and readers -----------------------------------------------------------------------------
def concept_metrics(pred: ArrayLike, true: ArrayLike, kind: str) -> dict[str, float]:
    """Prediction quality of one concept; cases whose ground truth is NaN are left out.

    * ``binary``: ``pred`` (N,) P(concept present); AUROC, F1 and accuracy at threshold 0.5.
    * ``categorical``: ``pred`` (N, L) level probabilities/scores or (N,) predicted level indices;
      accuracy of the arg-max, macro one-vs-rest AUROC over the levels present in ``true`` (NaN for
      level predictions or when fewer than two levels are present).
    * ``ordinal``: as categorical, plus ``kappa`` — quadratic weighted Cohen's kappa between the
      predicted and true level indices, on the scale ``0..L-1``.
    * ``continuous``: ``pred`` (N,) in the concept's unit; MAE, RMSE and bias (mean pred - true).

    Args:
        pred: predictions as above.
        true: (N,) ground truth (level indices 0..L-1 for categorical/ordinal), NaN = missing.
        kind: "binary", "categorical", "ordinal" or "continuous" (``ConceptSpec.kind``).

    Returns:
        A dict of the metrics of that kind, plus ``n`` (cases with ground truth).
    """
    p, t = _np(pred), _np(true).reshape(-1)
    if p.shape[0] != t.shape[0]:
        raise ValueError(f"pred and true must hold the same number of cases; got {p.shape[0]} and {t.shape[0]}")
    keep = ~np.isnan(t)
    p, t = p[keep], t[keep]
    n = int(t.size)
    if kind == "binary":
        if p.ndim != 1:
            raise ValueError(f"binary concept predictions must be (N,) probabilities; got shape {p.shape}")
        y, hard = t.astype(np.int64), (p >= 0.5).astype(np.int64)
        two = np.unique(y).size == 2
        return {
            "auroc": float(roc_auc_score(y, p)) if two else math.nan,
            "f1": float(f1_score(y, hard, zero_division=0.0)) if n else math.nan,
            "accuracy": float((hard == y).mean()) if n else math.nan,
            "n": n,
        }
    if kind in ("categorical", "ordinal"):
        y = t.astype(np.int64)
        if p.ndim == 2:
            hard, n_levels = p.argmax(1), p.shape[1]
            present = [lv for lv in np.unique(y) if 0 <= lv < n_levels]
            aucs = [roc_auc_score(y == lv, p[:, lv]) for lv in present] if len(present) >= 2 else []
            auroc = float(np.mean(aucs)) if aucs else math.nan
            scale = np.arange(n_levels)
        elif p.ndim == 1:
            hard, auroc = np.rint(p).astype(np.int64), math.nan
            scale = np.arange(min(hard.min(initial=0), y.min(initial=0)), max(hard.max(initial=0), y.max(initial=0)) + 1)
        else:
            raise ValueError(f"{kind} concept predictions must be (N, L) scores or (N,) levels; got {p.shape}")
        out = {"accuracy": float((hard == y).mean()) if n else math.nan, "auroc": auroc}
        if kind == "ordinal":
            out["kappa"] = _kappa(hard, y, "quadratic", scale) if n else math.nan
        out["n"] = n
        return out
    if kind == "continuous":
        p = p.reshape(-1)
        return {"mae": mae(p, t), "rmse": rmse(p, t), "bias": float((p - t).mean()) if n else math.nan, "n": n}
    raise ValueError(f"kind must be binary, categorical, ordinal or continuous; got {kind!r}")


def _kappa(a: np.ndarray, b: np.ndarray, weights: str | None, labels: np.ndarray | None) -> float:
    if labels is None:
        values = np.union1d(a, b)
        integral = np.all(values == np.round(values))
        labels = np.arange(values.min(), values.max() + 1) if integral and values.size else values
    value = cohen_kappa_score(a, b, weights=weights, labels=labels)
    return float(value)


def agreement(
    a: ArrayLike,
    b: ArrayLike,
    weights: Literal["quadratic", "linear"] | None = "quadratic",
    labels: Sequence[float] | None = None,
) -> float:
    """Cohen's (weighted) kappa between two raters of the same items.

    Weighted kappa depends on the distance between rating levels, so the scale matters: by default
    integer-valued ratings use every integer from the lowest to the highest rating seen (e.g. 1..5
    even if 2 never occurs); pass ``labels`` to fix the scale explicitly (e.g. ``range(1, 6)``).
    Pairs with a NaN are dropped.

    Args:
        a: (N,) ratings of rater A.
        b: (N,) ratings of rater B.
        weights: "quadratic", "linear", or None for unweighted kappa.
        labels: the ordered rating scale, or None (see above).

    Returns:
        kappa; NaN when no pair remains or every rating is the same level.
    """
    x, y = _np(a).reshape(-1), _np(b).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"a and b must rate the same items; got {x.size} and {y.size} ratings")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    if x.size == 0 or np.union1d(x, y).size < 2:
        return math.nan
    return _kappa(x, y, weights, None if labels is None else np.asarray(labels, dtype=np.float64))


def _reader_pairs(ratings_by_nodule: Mapping[str, Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    first, second = [], []
    for ratings in ratings_by_nodule.values():
        r = [float(v) for v in ratings if not math.isnan(float(v))]
        for i, j in itertools.permutations(range(len(r)), 2):
            first.append(r[i])
            second.append(r[j])
    return np.asarray(first), np.asarray(second)


def inter_reader_agreement(
    ratings_by_nodule: Mapping[str, Sequence[float]],
    weights: Literal["quadratic", "linear"] | None = "quadratic",
    labels: Sequence[float] | None = None,
) -> float:
    """Weighted kappa between readers of the same nodule, pooled over all reader pairs.

    LIDC-IDRI readers are anonymous and differ between nodules, so readers cannot be matched across
    nodules. Pairing: every nodule with ``r >= 2`` ratings contributes all ``r (r - 1)`` *ordered*
    pairs of its ratings (both orders of each of the ``r (r - 1) / 2`` reader pairs, so the result does
    not depend on the order of the list), and one weighted kappa is computed over the pooled pairs.
    NaN ratings are dropped; nodules with fewer than two ratings contribute nothing.

    Args:
        ratings_by_nodule: nodule id -> the readers' ratings of that nodule.
        weights: "quadratic", "linear", or None.
        labels: the rating scale (see :func:`agreement`).

    Returns:
        kappa; NaN when no pair exists.
    """
    first, second = _reader_pairs(ratings_by_nodule)
    return agreement(first, second, weights, labels)


def model_reader_agreement(
    model_by_nodule: Mapping[str, float],
    ratings_by_nodule: Mapping[str, Sequence[float]],
    weights: Literal["quadratic", "linear"] | None = "quadratic",
    labels: Sequence[float] | None = None,
) -> float:
    """Weighted kappa between the model and the readers, comparable with :func:`inter_reader_agreement`.

    Pairing: the model's rating of a nodule is paired with each reader rating of that nodule; one
    kappa over all pooled (model, reader) pairs. Nodules missing from ``model_by_nodule`` are skipped.

    Args:
        model_by_nodule: nodule id -> the model's rating on the readers' scale.
        ratings_by_nodule: nodule id -> the readers' ratings.
        weights: "quadratic", "linear", or None.
        labels: the rating scale (see :func:`agreement`).

    Returns:
        kappa; NaN when no pair exists.
    """
    model, reader = [], []
    for nodule, ratings in ratings_by_nodule.items():
        if nodule not in model_by_nodule:
            continue
        for value in ratings:
            model.append(float(model_by_nodule[nodule]))
            reader.append(float(value))
    return agreement(np.asarray(model), np.asarray(reader), weights, labels)


# -- prototypes ---------------------------------------------------------------------------------------
def prototype_purity(topk: ArrayLike, prototype_class: ArrayLike | None = None) -> dict[str, Any]:
    """Share of each prototype's k nearest training patches that are "right".

    Two readings, chosen by the inputs:

    * ``topk`` (P, k) bool, ``prototype_class`` None: True where the patch lies on the lesion; purity
      is the share of lesion patches.
    * ``topk`` (P, k) integer classes and ``prototype_class`` (P,): purity is the share of patches that
      come from the prototype's class.

    Args:
        topk: (P, k) per-prototype top-k patch records as above.
        prototype_class: (P,) class of each prototype, or None.

    Returns:
        ``{"purity_mean", "purity_median", "per_prototype" (list), "num_prototypes", "k"}``.
    """
    t = _tensor(topk)
    if t.ndim != 2:
        raise ValueError(f"topk must be (P, k); got shape {tuple(t.shape)}")
    if prototype_class is None:
        if t.dtype != torch.bool:
            raise ValueError("without prototype_class, topk must be a bool (P, k) 'patch on lesion' table")
        right = t
    else:
        cls = _tensor(prototype_class).long()
        if cls.shape != (t.shape[0],):
            raise ValueError(f"prototype_class must be (P,) = ({t.shape[0]},); got {tuple(cls.shape)}")
        right = t.long() == cls[:, None]
    per_prototype = right.double().mean(1)  # (P,)
    return {
        "purity_mean": float(per_prototype.mean()),
        "purity_median": float(np.median(per_prototype.numpy())),
        "per_prototype": per_prototype.tolist(),
        "num_prototypes": int(t.shape[0]),
        "k": int(t.shape[1]),
    }


def unique_prototypes(prototype_sources: ArrayLike | Sequence[Any]) -> int:
    """Number of distinct training sources (image index, location) of the prototypes after push.

    Two prototypes projected onto the same patch of the same image are duplicates.

    Args:
        prototype_sources: a (P, 1 + dims) tensor/array of ``[index, *location]`` rows, or a
            sequence of ``(index, location)`` pairs, or of mappings with keys ``"index"`` and
            ``"location"`` (other keys are ignored).

    Returns:
        The number of distinct sources.
    """

    def freeze(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            value = value.tolist()
        if isinstance(value, np.ndarray):
            value = value.tolist()
        if isinstance(value, (list, tuple)):
            return tuple(freeze(v) for v in value)
        return value

    if isinstance(prototype_sources, (torch.Tensor, np.ndarray)):
        rows = freeze(prototype_sources)
        return len(set(rows))
    keys = set()
    for record in prototype_sources:
        if isinstance(record, Mapping):
            if "index" not in record or "location" not in record:
                raise ValueError(f"a source record needs keys 'index' and 'location'; got keys {sorted(record)}")
            keys.add((freeze(record["index"]), freeze(record["location"])))
        else:
            keys.add(freeze(record))
    return len(keys)
