"""Visual recognizability: is the evidence something a clinician can recognise?

The visual-recognizability element of Wang et al., "A Framework for Interpretability in Machine
Learning for Medical Imaging" (arXiv 2310.01685; IEEE Access 2024), for the two kinds of
recognisable evidence in the zoo:

* named concepts (concept bottleneck models, Koh et al., ICML 2020) — :func:`concept_metrics` scores
  a predicted concept against its ground truth; :func:`agreement`, :func:`inter_reader_agreement`
  and :func:`model_reader_agreement` compare the model with radiologists on the readers' own scale
  by weighted kappa (Cohen, "Weighted kappa", Psychol Bull 1968), with readers of LIDC-IDRI
  (Armato et al., Med Phys 2011) pooled per nodule;
* prototypes that are real training patches (ProtoPNet, Chen et al., "This looks like that",
  NeurIPS 2019) — :func:`prototype_purity` is the share of a prototype's nearest training patches
  that lie on the lesion (or come from its class), and :func:`unique_prototypes` counts distinct
  source patches after push (two prototypes on one patch are duplicates).

What we changed: cases without ground truth (NaN) are left out, the kappa scale is fixed by the
rating range (or given), and a metric undefined on the cases at hand is NaN instead of raising.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch
from sklearn.metrics import cohen_kappa_score, f1_score, roc_auc_score

from mlmi_zoo.evaluation._arrays import ArrayLike, _np, _tensor
from mlmi_zoo.evaluation.physical import mae, rmse

__all__ = [
    "agreement",
    "concept_metrics",
    "inter_reader_agreement",
    "leave_reader_out_pairs",
    "model_reader_agreement",
    "prototype_purity",
    "unique_prototypes",
]


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
            # sklearn takes a float here; pyright infers str from the default "warn"
            "f1": float(f1_score(y, hard, zero_division=0.0)) if n else math.nan,  # pyright: ignore[reportArgumentType]
            "accuracy": float((hard == y).mean()) if n else math.nan,
            "n": n,
        }
    if kind in ("categorical", "ordinal"):
        y = t.astype(np.int64)
        if p.ndim == 2:
            hard, n_levels = p.argmax(1), p.shape[1]
            levels = np.unique(y)
            present = levels[(levels >= 0) & (levels < n_levels)]
            one_vs_rest = y[:, None] == present[None]  # (N, levels present); macro AUROC over its columns
            auroc = float(roc_auc_score(one_vs_rest, p[:, present])) if present.size >= 2 else math.nan
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


def leave_reader_out_pairs(model: ArrayLike, ratings: ArrayLike, nodules: Sequence[str]
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Ordered pairs of two different readings of the same nodule, for leave-reader-out agreement.

    Leave-reader-out pairs the model's rating of reading ``i`` with the rating of every *other* reading
    ``j != i`` of the nodule, exactly as readers are paired with each other
    (:func:`inter_reader_agreement`), so the two kappas are computed on the same pairs. Where a case's
    image were made from one reader's reading, scoring the model against that same reader would reward
    reading the rating back from the image; leaving the reader out removes that. Where the image is
    made from no rating (the LIDC-IDRI nodules of this library), pass one row per reading with the
    model's rating of the nodule repeated: the pairs are then the model against each reader ``q``
    beside each other reader ``p`` against ``q``.

    Args:
        model: (N,) the model's rating of each case (one case = one reading's image).
        ratings: (N,) the reader rating of each case.
        nodules: (N,) nodule id of each case.

    Returns:
        ``(model_i, rating_j, rating_i, nodule)`` arrays over all ordered pairs ``i != j``.
    """
    m, r = _np(model).reshape(-1), _np(ratings).reshape(-1)
    ids = np.asarray([str(n) for n in nodules])
    if not (len(m) == len(r) == len(ids)):
        raise ValueError(f"model, ratings and nodules must have one entry per case; got {len(m)}, {len(r)}, {len(ids)}")
    out: list[tuple[float, float, float, str]] = []
    for nodule in np.unique(ids):
        rows = np.flatnonzero(ids == nodule)
        out.extend((float(m[i]), float(r[j]), float(r[i]), str(nodule)) for i in rows for j in rows if i != j)
    if not out:
        empty = np.zeros(0)
        return empty, empty, empty, np.zeros(0, dtype=str)
    a, b, c, d = zip(*out)
    return np.asarray(a), np.asarray(b), np.asarray(c), np.asarray(d)


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
    if isinstance(prototype_sources, (torch.Tensor, np.ndarray)):
        return len(np.unique(_np(prototype_sources, None), axis=0))

    def freeze(value: Any) -> Any:
        if isinstance(value, (torch.Tensor, np.ndarray)):
            value = value.tolist()
        if isinstance(value, (list, tuple)):
            return tuple(freeze(v) for v in value)
        return value

    keys = set()
    for record in prototype_sources:
        if isinstance(record, Mapping):
            if "index" not in record or "location" not in record:
                raise ValueError(f"a source record needs keys 'index' and 'location'; got keys {sorted(record)}")
            keys.add((freeze(record["index"]), freeze(record["location"])))
        else:
            keys.add(freeze(record))
    return len(keys)
