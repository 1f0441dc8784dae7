"""Controls: what produces an interpretability number without the model, scored on the same cases.

DESIGN.md, evidence rules: "a card is evidence only if a sceptical reviewer cannot produce the same
number without the model", so every localization or MIL number is reported beside the same metric
computed, by the same code path, on maps or instance scores that need no model (or need only the
model's bag prediction). The idea is that of Adebayo et al., "Sanity Checks for Saliency Maps",
NeurIPS 2018: an explanation metric means little until it is compared with what a model-independent
edge detector or a randomised model scores on it. The metrics these controls feed are the pointing
game (Zhang et al., "Top-down neural attention by excitation backprop", ECCV 2016 / IJCV 2018) and
activation precision (Barnett et al., IAIA-BL, Nature Machine Intelligence 2021), in
:mod:`mlmi_zoo.evaluation.localization`.

Localization controls return (B, *spatial) float32 maps, the shape of a model's evidence map, so they
go through the very same metric functions:

* :func:`centre_prior` — the mean training lesion mask, smoothed with a Gaussian: "lesions are
  usually here", learnt from training labels only;
* :func:`uniform_map` — no information at all;
* :func:`random_maps` — a seeded random map per case (chance level with random tie-breaking);
* :func:`brightness_map` — the image intensity itself, an image-processing map where bright pixels
  are the lesion (exudates in a fundus image, a nodule in a lung window).

The fifth localization control of the DESIGN, an untrained (parameter-randomised) copy's saliency,
needs a model and is computed by the evaluation with the model's own ``explain``.

MIL controls return (B, N) instance scores like a model's (0 at padding, as the model's attention):

* :func:`bag_constant_scores` — every instance gets its bag's score: what the *bag* prediction alone
  says about instances;
* :func:`uniform_attention` — attention spread evenly over a bag's valid instances.

:func:`instance_auroc_per_bag` scores instance rankings within each bag. Pooled instance AUROC
(:func:`mlmi_zoo.evaluation.localization.instance_auroc`) ranks instances of *all* bags together, so
it rewards ranking bags: positive instances live only in positive bags, and a score that is constant
inside each bag but higher in positive bags (a bag-constant control) ranks most positive instances
above most negative ones and reaches a high pooled AUROC without telling one instance of a bag from
another. Within one bag such a score ties every instance and its AUROC is exactly 0.5.

What we changed: nothing of the metrics; the controls are ours. A random map's value at case ``i``
depends only on ``(seed, i)``, so chunking the split into batches does not change it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from sklearn.metrics import roc_auc_score

from mlmi_zoo.evaluation._arrays import ArrayLike, _np, _tensor
from mlmi_zoo.training.data_spec import SizedDataset

__all__ = [
    "IMAGE_STATISTICS",
    "OffCentre",
    "PerBagAUROC",
    "StatisticsControl",
    "bag_constant_scores",
    "brightness_map",
    "centre_prior",
    "image_statistics",
    "instance_auroc_per_bag",
    "random_maps",
    "uniform_attention",
    "uniform_map",
]


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be (B, *spatial) with positive sizes, e.g. (8, 64, 64); got {shape}")
    return shape


# --------------------------------------------------------------------------- localization controls


def centre_prior(train_masks: ArrayLike, shape: Sequence[int], sigma_px: float | Sequence[float]) -> torch.Tensor:
    """The mean training lesion mask, smoothed with a Gaussian, as every case's map.

    The map is the same for every case: it is where lesions lie on average in the *training* split,
    so it uses no test image and no model. It is smoothed with ``scipy.ndimage.gaussian_filter``
    (``mode="reflect"``, the scipy default, so no mass is lost at the border); ``sigma_px = 0`` keeps
    the plain mean.

    Args:
        train_masks: (N, *spatial) or (N, 1, *spatial) binary lesion masks of the training cases.
        shape: (B, *spatial) of the maps to return; spatial must equal the masks' spatial shape.
        sigma_px: standard deviation of the Gaussian in pixels/voxels, one value or one per spatial
            axis (for anisotropic voxels).

    Returns:
        (B, *spatial) float32, the smoothed mean mask repeated for each case.
    """
    shape = _check_shape(shape)
    spatial = shape[1:]
    masks = _np(train_masks)
    if masks.ndim == len(spatial) + 2 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.shape[1:] != spatial or masks.shape[0] == 0:
        raise ValueError(
            f"train_masks must be (N >= 1, *spatial) with spatial {spatial} (the maps' spatial shape); got "
            f"{masks.shape}. Resample the training masks to the evaluation resolution first."
        )
    sigmas = np.broadcast_to(np.asarray(sigma_px, dtype=np.float64), (len(spatial),))
    if (sigmas < 0).any():
        raise ValueError(f"sigma_px must be >= 0; got {sigma_px}")
    prior = gaussian_filter(masks.mean(0), sigma=tuple(sigmas.tolist()))  # (*spatial)
    return torch.from_numpy(np.ascontiguousarray(prior)).float().expand(shape).clone()


def uniform_map(shape: Sequence[int]) -> torch.Tensor:
    """A constant map: no information about where the lesion is.

    Note that the localization metrics break ties by the lower flat index, so a constant map's top
    set is the first pixels in row-major order and its arg-max is pixel 0: the uniform control
    measures a fixed corner, not chance. :func:`random_maps` gives chance level.

    Args:
        shape: (B, *spatial).

    Returns:
        (B, *spatial) float32 ones.
    """
    return torch.ones(_check_shape(shape))


def random_maps(shape: Sequence[int], seed: int, first_case: int = 0) -> torch.Tensor:
    """An independent uniform [0, 1) random map per case, reproducible from the seed.

    Case ``i``'s map is drawn from ``numpy.random.SeedSequence(seed, spawn_key=(first_case + i,))``,
    so it depends on ``(seed, first_case + i)`` only: a split scored in batches (``first_case`` the
    index of the batch's first case) gets the same maps as a split scored at once.

    Args:
        shape: (B, *spatial).
        seed: non-negative seed; equal seeds give equal maps.
        first_case: index of the first case of this batch within the split.

    Returns:
        (B, *spatial) float32 in [0, 1).
    """
    shape = _check_shape(shape)
    if seed < 0 or first_case < 0:
        raise ValueError(f"seed and first_case must be >= 0; got seed={seed}, first_case={first_case}")
    maps = np.stack([
        np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(first_case + i,))).random(shape[1:], dtype=np.float32)
        for i in range(shape[0])
    ])  # (B, *spatial)
    return torch.from_numpy(maps)


def brightness_map(x: ArrayLike) -> torch.Tensor:
    """The image intensity itself (mean over channels): "bright pixels are the lesion".

    The localization metrics only rank pixels, so any monotone window or normalisation of the input
    gives the same scores; pass the images as the model receives them.

    Args:
        x: (B, C, *spatial) images.

    Returns:
        (B, *spatial) float32 channel-mean intensity.
    """
    images = _tensor(x).float()
    if images.ndim < 3:
        raise ValueError(f"x must be (B, C, *spatial) images; got shape {tuple(images.shape)}. Add the channel axis: x[:, None].")
    return images.mean(1)


# --------------------------------------------------------------------------- MIL controls


def _bag_mask(mask: ArrayLike) -> torch.Tensor:
    valid = _tensor(mask).bool()
    if valid.ndim != 2:
        raise ValueError(f"mask must be (B, N), True at valid instances; got shape {tuple(valid.shape)}")
    if not valid.any(1).all():
        empty = torch.nonzero(~valid.any(1)).flatten().tolist()
        raise ValueError(f"every bag needs at least one valid instance; bags {empty} have none. Drop empty bags first.")
    return valid


def bag_constant_scores(bag_scores: ArrayLike, mask: ArrayLike) -> torch.Tensor:
    """Every valid instance gets its bag's score (0 at padding).

    The control for instance explanations of a MIL model: it knows the bag prediction and nothing
    about which instance caused it. Within a bag it ties every instance (per-bag AUROC 0.5); pooled
    over bags it can score high (see the module docstring).

    Args:
        bag_scores: (B,) one score per bag (the model's positive-class probability or logit).
        mask: (B, N) bool, True at valid instances.

    Returns:
        (B, N) float32 scores.
    """
    valid = _bag_mask(mask)
    scores = _tensor(bag_scores).float()
    if scores.shape != valid.shape[:1]:
        raise ValueError(f"bag_scores must be (B,) with B={valid.shape[0]} (the mask's bags); got shape {tuple(scores.shape)}")
    return torch.where(valid, scores[:, None], torch.zeros((), dtype=scores.dtype))


def uniform_attention(mask: ArrayLike) -> torch.Tensor:
    """Attention spread evenly: ``1 / n_valid`` at each valid instance of a bag, 0 at padding.

    Args:
        mask: (B, N) bool, True at valid instances.

    Returns:
        (B, N) float32 weights that sum to 1 over each bag's valid instances.
    """
    valid = _bag_mask(mask).float()
    return valid / valid.sum(1, keepdim=True)


@dataclass(frozen=True)
class PerBagAUROC:
    """Instance AUROC computed inside each bag.

    Attributes:
        per_bag: (B,) float64 AUROC of each bag's valid, labelled instances; NaN where the bag holds
            a single instance class (every instance of a negative bag, for one).
        mean: mean of ``per_bag`` over the bags where it is defined; NaN when none is.
        n_bags: number of bags where it is defined.
    """

    per_bag: np.ndarray  # (B,)
    mean: float
    n_bags: int


def instance_auroc_per_bag(scores: ArrayLike, labels: ArrayLike, mask: ArrayLike | None = None) -> PerBagAUROC:
    """Instance AUROC within each bag (scikit-learn's ``roc_auc_score`` per bag), and its mean.

    Unlike pooled instance AUROC, a per-bag AUROC gives no credit for ranking bags: a bag-constant
    score has AUROC 0.5 in every bag that holds both classes, and bags with one class (negative
    bags) are undefined and left out of the mean.

    Args:
        scores: (B, N) instance scores.
        labels: (B, N) 0/1 instance labels; NaN marks an instance without a label (skipped).
        mask: (B, N) bool, True at valid instances; None means all are valid.

    Returns:
        A :class:`PerBagAUROC`.
    """
    s, y = _np(scores), _np(labels)
    if s.ndim != 2 or s.shape != y.shape:
        raise ValueError(f"scores and labels must share a shape (B, N); got {s.shape} and {y.shape}")
    valid = np.ones(s.shape, dtype=bool) if mask is None else _np(mask, bool)
    if valid.shape != s.shape:
        raise ValueError(f"mask must have the shape of scores {s.shape}; got {valid.shape}")
    valid = valid & ~np.isnan(y)
    per_bag = np.full(s.shape[0], math.nan)
    for b in range(s.shape[0]):
        sb, yb = s[b, valid[b]], y[b, valid[b]]
        if np.isnan(sb).any():
            raise ValueError(f"scores of valid instances of bag {b} contain NaN; check the mask and the model output")
        if 0 < (yb == 1).sum() < yb.size:
            per_bag[b] = float(roc_auc_score(yb, sb))
    defined = per_bag[~np.isnan(per_bag)]
    return PerBagAUROC(per_bag, float(defined.mean()) if defined.size else math.nan, int(defined.size))


def top_instance_hit(scores: ArrayLike, labels: ArrayLike, mask: ArrayLike | None = None) -> np.ndarray:
    """Per bag, whether its highest-scored instance holds the finding (the lesion hit rate of the top tile).

    Ties at the top are broken at random in expectation: a bag's value is the share of positive
    instances among those sharing the highest score, so a bag-constant or uniform score hits at the
    bag's positive share, not at whichever instance happens to come first.

    Args:
        scores: (B, N) instance scores.
        labels: (B, N) 0/1 instance labels; NaN marks an instance without a label.
        mask: (B, N) bool, True at valid instances; None means all are valid.

    Returns:
        (B,) float in [0, 1]; NaN for a bag without a positive instance or with an unlabelled one.
    """
    s, y = _np(scores), _np(labels)
    if s.ndim != 2 or s.shape != y.shape:
        raise ValueError(f"scores and labels must share a shape (B, N); got {s.shape} and {y.shape}")
    valid = np.ones(s.shape, dtype=bool) if mask is None else _np(mask, bool)
    out = np.full(s.shape[0], math.nan)
    for b in range(s.shape[0]):
        sb, yb = s[b, valid[b]], y[b, valid[b]]
        if yb.size == 0 or np.isnan(yb).any() or not (yb == 1).any():
            continue
        top = sb == sb.max()
        out[b] = float(yb[top].mean())
    return out


# --------------------------------------------------------------------------- image-statistics control

IMAGE_STATISTICS = ("mean", "std", "skewness", "kurtosis", "p10", "p50", "p90", "bright_share",
                    "centre_minus_surround", "gradient_mean", "laplacian_abs_mean")


def image_statistics(x: ArrayLike) -> np.ndarray:
    """Eleven statistics per image that a trivial classifier or regressor can use (no learning of features).

    Intensity moments (mean, standard deviation, skewness, excess kurtosis), the 10th/50th/90th
    percentiles, the share of pixels brighter than the image's midpoint between its 1st and 99th
    percentile (a foreground area), the mean of the central half of the image minus the mean of
    the rest (what a centred crop gives away), and two texture statistics: the mean gradient
    magnitude and the mean absolute Laplacian (``scipy.ndimage``). The DESIGN's "trivial
    image-statistics baseline" fits a logistic or linear regression on these
    (:class:`StatisticsControl`); a number that this baseline reaches is not evidence of a model.

    Args:
        x: (B, C, *spatial) images, as the model receives them (channels are averaged).

    Returns:
        (B, 11) float64 features, in the order of ``IMAGE_STATISTICS``.
    """
    from scipy.ndimage import gaussian_gradient_magnitude, laplace
    from scipy.stats import kurtosis, skew

    images = _np(x).astype(np.float64)
    if images.ndim < 3:
        raise ValueError(f"x must be (B, C, *spatial) images; got shape {images.shape}")
    images = images.mean(1)  # (B, *spatial)
    spatial = images.shape[1:]
    centre = tuple(slice(s // 4, s - s // 4) for s in spatial)
    inner = np.zeros(spatial, dtype=bool)
    inner[centre] = True
    rows = []
    for img in images:
        flat = img.reshape(-1)
        p1, p10, p50, p90, p99 = np.percentile(flat, [1, 10, 50, 90, 99])
        spread = float(flat.std())
        rows.append([
            flat.mean(), spread,
            float(skew(flat)) if spread > 0 else 0.0, float(kurtosis(flat)) if spread > 0 else 0.0,
            p10, p50, p90, float((flat > (p1 + p99) / 2).mean()),
            float(img[inner].mean() - img[~inner].mean()) if (~inner).any() else 0.0,
            float(gaussian_gradient_magnitude(img, sigma=1.0).mean()), float(np.abs(laplace(img)).mean()),
        ])
    return np.asarray(rows, dtype=np.float64)


class StatisticsControl:
    """A logistic (classes) or ridge (quantities) regression on :func:`image_statistics`.

    scikit-learn does the fitting (``StandardScaler`` then ``LogisticRegression`` or ``RidgeCV``);
    the zoo only chooses the features. Fitted on the *training* split, scored on the evaluated one.

    Args:
        kind: ``"classification"`` or ``"regression"``.
    """

    def __init__(self, kind: str) -> None:
        if kind not in ("classification", "regression"):
            raise ValueError(f"kind must be 'classification' or 'regression'; got {kind!r}")
        self.kind = kind
        self._model: object | None = None

    def fit(self, features: np.ndarray, targets: np.ndarray) -> "StatisticsControl":
        """Fit on (N, F) features and (N,) targets; cases with a non-finite target are left out.

        Raises:
            ValueError: fewer than 2 usable cases, or a single class for classification.
        """
        from sklearn.linear_model import LogisticRegression, RidgeCV
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        y = np.asarray(targets, dtype=np.float64).reshape(-1)
        keep = np.isfinite(y) & np.isfinite(features).all(1)
        if keep.sum() < 2 or (self.kind == "classification" and np.unique(y[keep]).size < 2):
            raise ValueError(f"the statistics control needs >= 2 training cases (and 2 classes); got {int(keep.sum())}")
        estimator = LogisticRegression(max_iter=2000) if self.kind == "classification" else RidgeCV()
        self._model = make_pipeline(StandardScaler(), estimator).fit(features[keep], y[keep].astype(
            np.int64 if self.kind == "classification" else np.float64))
        return self

    def predict(self, features: np.ndarray) -> np.ndarray:
        """(N, K) class probabilities (classification) or (N,) values (regression)."""
        if self._model is None:
            raise RuntimeError("StatisticsControl.predict before fit")
        model: Any = self._model
        return model.predict_proba(features) if self.kind == "classification" else model.predict(features)


# --------------------------------------------------------------------------- evaluation off the centre


class OffCentre(SizedDataset[dict[str, Any]]):
    """The cases of a lesion-centred data set, each shifted by a seeded random offset.

    Crops centred on the lesion let a fixed centre map localize as well as any model; shifting each
    case moves the lesion to a random position where the centre prior cannot help. Case ``i`` is
    shifted by an offset drawn uniformly from ``[-max_shift, max_shift]`` pixels per spatial axis
    (``max_shift = round(shift_fraction * size)``), from ``numpy.random.SeedSequence(seed,
    spawn_key=(i,))``: fixed for a seed, the same in every run. The image is shifted with reflected
    padding (``numpy.pad(mode="reflect")``: the border tissue continues, no black band a model could
    read), the lesion mask with zeros; measurements and labels are unchanged (a shift moves no
    lesion in physical size).

    Args:
        dataset: a sized dataset of dicts with ``"image"`` (C, *spatial) and ``"mask"``.
        seed: seed of the offsets.
        shift_fraction: largest shift per axis as a fraction of the size (default 1/4: a lesion in
            the central half stays inside the crop).
    """

    def __init__(self, dataset: Any, seed: int = 0, shift_fraction: float = 0.25) -> None:
        if not 0.0 < shift_fraction < 0.5:
            raise ValueError(f"shift_fraction must be in (0, 0.5); got {shift_fraction}")
        self.dataset = dataset
        self.seed = seed
        self.shift_fraction = shift_fraction

    def __len__(self) -> int:
        return len(self.dataset)

    def offset(self, index: int, spatial: Sequence[int]) -> tuple[int, ...]:
        """The shift of case ``index`` (pixels per spatial axis)."""
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(index,)))
        return tuple(int(rng.integers(-round(self.shift_fraction * s), round(self.shift_fraction * s) + 1))
                     for s in spatial)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.dataset[index])
        image = _np(sample["image"]).astype(np.float32)
        spatial = image.shape[1:]
        shift = self.offset(index, spatial)
        sample["image"] = torch.from_numpy(_shift(image, shift, "reflect"))
        if sample.get("mask") is not None:
            mask = _np(sample["mask"])
            sample["mask"] = torch.from_numpy(_shift(mask, shift, "constant")).to(torch.as_tensor(sample["mask"]).dtype)
        sample["offset_px"] = torch.tensor(shift)
        return sample


def _shift(array: np.ndarray, shift: Sequence[int], mode: str) -> np.ndarray:
    """Shift the trailing ``len(shift)`` axes of ``array`` by ``shift`` pixels, padding by ``mode``.

    ``numpy.pad`` then a crop: a shift of +d moves content d pixels towards higher indices.
    """
    lead = array.ndim - len(shift)
    pad = [(0, 0)] * lead + [(max(d, 0), max(-d, 0)) for d in shift]
    padded = np.pad(array, pad, mode=mode)  # type: ignore[call-overload]
    crop = [slice(None)] * lead + [slice(max(-d, 0), max(-d, 0) + s) for d, s in zip(shift, array.shape[lead:])]
    return np.ascontiguousarray(padded[tuple(crop)])
