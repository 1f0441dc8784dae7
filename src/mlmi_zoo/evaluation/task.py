"""Task metrics: discrimination, decision and calibration, each with a bootstrap interval.

:func:`task_metrics` reports AUROC (Hanley & McNeil, Radiology 1982; multi-class one-vs-rest macro),
average precision, balanced accuracy, sensitivity and specificity at the operating point, the
expected calibration error (Guo et al., "On calibration of modern neural networks", ICML 2017: 15
equal-width bins on the top-label confidence; Naeini et al., AAAI 2015) and the Brier score (Brier,
Monthly Weather Review 1950), each with a percentile-bootstrap interval over patients
(:func:`~mlmi_zoo.evaluation.bootstrap.bootstrap_ci`). :func:`reliability_bins` gives the statistics
of the reliability diagram that the ECE sums.

What we changed: the kernels are scikit-learn's; we add the NaN conventions (a metric undefined on a
resample, e.g. a class missing, is NaN there and never raises inside the bootstrap) and the
definitions documented per function.
"""
from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    mean_squared_error,
    multilabel_confusion_matrix,
    roc_auc_score,
)

from mlmi_zoo.evaluation._arrays import ArrayLike, _np
from mlmi_zoo.evaluation.bootstrap import CI, bootstrap_ci

__all__ = ["expected_calibration_error", "reliability_bins", "task_metrics"]


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
    # Right-closed bins, b - 1 < confidence * n_bins <= b, compared after scaling so that a confidence
    # on an edge up to round-off (0.3 with 10 bins) is binned as the ECE always binned it. Not
    # sklearn's calibration_curve: it drops empty bins and returns no counts, which the ECE weighs by.
    bins = np.digitize(confidence * n_bins, np.arange(1, n_bins), right=True)  # (N,) in [0, n_bins)
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
    # Hand-written sum over the bins: scikit-learn and scipy have no calibration error.
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
        counts = multilabel_confusion_matrix(yy, predicted(pp), labels=np.arange(n_classes))  # (C, 2, 2)
        tn, fp, fn, tp = counts.reshape(n_classes, 4).T  # (C,) each, one-vs-rest per class
        return tp / (tp + fn), tn / (tn + fp)  # recall, specificity

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
        # Not brier_score_loss(labels=...): multi-class needs scikit-learn >= 1.7 (we support 1.3), and it
        # warns on every resample when float32 softmax rows sum to 1 only within 1e-7.
        return float(np.sum(mean_squared_error(np.eye(n_classes)[yy], pp, multioutput="raw_values")))

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
