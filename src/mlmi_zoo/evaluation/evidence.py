"""The evidence rules applied to one number: the model, each control on the same cases, the verdict.

DESIGN.md, evidence rules: a number in a card is evidence only beside the controls that could
produce it without the model, computed on the same cases by the same code path, with a 95% interval
over patients (bootstrap resampling patients, paired for differences); an element reads
"demonstrated" only where the paired difference to every control has a lower bound above 0. The idea
of scoring an explanation against model-independent and randomised-model maps is that of Adebayo et
al., "Sanity Checks for Saliency Maps", NeurIPS 2018; the cluster bootstrap is Field & Welsh,
"Bootstrapping clustered data", JRSS B 2007, run by :func:`mlmi_zoo.evaluation.bootstrap.bootstrap_ci`
(``scipy.stats.bootstrap`` underneath).

Every function here returns one JSON-safe *comparison* block, the form the results document stores
under an element's ``"evidence"`` key and the card renders::

    {"metric": str, "higher_is_better": bool, "n_cases": int, "n_patients": int,
     "model": {"estimate", "low", "high"},
     "controls": {name: {"score": {"estimate", "low", "high"},
                         "difference": {"estimate", "low", "high", "n_cases", "n_patients"}}},
     "verdict": {"status", "control", "sentence", "difference": {...}}}

``difference`` is always "model better than control" when positive: model minus control for a
higher-is-better metric (activation precision, AUROC), control minus model for a lower-is-better
one (absolute error, deletion AUC).

:func:`compare` takes per-case values (a mean over cases is the statistic); :func:`compare_auroc`
takes per-case scores and labels (AUROC is a statistic of the whole sample, so each resample
recomputes it for the model and every control on the same drawn patients); :func:`exact_check` is
the verdict of a test that has no statistical control because it is exact (a switch-off that must
change a logit by exactly the stated contribution).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from mlmi_zoo.evaluation._arrays import ArrayLike, _np
from mlmi_zoo.evaluation.bootstrap import bootstrap_ci
from mlmi_zoo.evaluation.verdicts import DEMONSTRATED, NOT_DEMONSTRATED, DifferenceCI, paired_difference_ci, verdict

__all__ = ["compare", "compare_auroc", "exact_check", "not_assessed", "NOT_ASSESSED"]

NOT_ASSESSED = "not assessed against a control"


def _ci_dict(ci: Any) -> dict[str, float]:
    return {"estimate": float(ci.estimate), "low": float(ci.low), "high": float(ci.high)}


def _groups(groups: ArrayLike | None, n: int) -> np.ndarray:
    if groups is None:
        return np.arange(n).astype(str)
    g = np.asarray(_np(groups, None)).astype(str)
    if g.shape != (n,):
        raise ValueError(f"groups must hold one patient id per case ({n}); got shape {g.shape}")
    return g


def _block(metric: str, higher: bool, n_cases: int, n_patients: int, model: Any,
           controls: dict[str, dict[str, Any]], differences: dict[str, DifferenceCI]) -> dict[str, Any]:
    v = verdict(differences, metric)
    return {"metric": metric, "higher_is_better": higher, "n_cases": n_cases, "n_patients": n_patients,
            "model": _ci_dict(model), "controls": controls,
            "verdict": {"status": v.status, "control": v.control, "sentence": v.sentence,
                        "difference": v.difference.to_dict()}}


def compare(
    metric: str,
    model_values: ArrayLike,
    controls: Mapping[str, ArrayLike],
    groups: ArrayLike | None,
    *,
    higher_is_better: bool = True,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The model's per-case values beside each control's on the same cases, with a verdict.

    The statistic is the mean over cases. A case counts for a control only where both its model
    value and the control's value are finite (an empty lesion mask leaves activation precision
    undefined, for one); the model's own interval uses every case where its value is finite.

    Args:
        metric: the metric's name, as the card states it (e.g. ``"activation precision (top 5%)"``).
        model_values: (N,) the model's per-case values.
        controls: control name -> (N,) values of the control on the same cases, in the same order.
        groups: (N,) patient id per case (the unit of resampling); None resamples cases.
        higher_is_better: False for errors and deletion AUCs.
        n_boot: bootstrap resamples.
        seed: seed of the resampling.

    Returns:
        The comparison block (see the module docstring).

    Raises:
        ValueError: no control, arrays of different lengths, or no case with a finite model value.
    """
    if not controls:
        raise ValueError(f"compare needs at least one control for {metric!r}; got none")
    model = _np(model_values).astype(np.float64).reshape(-1)
    g = _groups(groups, len(model))
    finite = np.isfinite(model)
    if not finite.any():
        raise ValueError(f"{metric}: no case has a finite model value (of {len(model)} cases)")
    sign = 1.0 if higher_is_better else -1.0
    model_ci = bootstrap_ci(np.mean, model[finite], n=n_boot, seed=seed, groups=g[finite])
    blocks: dict[str, dict[str, Any]] = {}
    differences: dict[str, DifferenceCI] = {}
    for name, values in controls.items():
        control = _np(values).astype(np.float64).reshape(-1)
        if control.shape != model.shape:
            raise ValueError(f"{metric}: control {name!r} has {control.shape[0]} values for {model.shape[0]} cases")
        both = finite & np.isfinite(control)
        score = bootstrap_ci(np.mean, control[both], n=n_boot, seed=seed, groups=g[both]) if both.any() else None
        if both.any():
            diff = paired_difference_ci(sign * model, sign * control, g, n_boot=n_boot, seed=seed, statistic=np.mean)
        else:
            diff = DifferenceCI(math.nan, math.nan, math.nan, 0, 0)
        differences[name] = diff
        blocks[name] = {"score": _ci_dict(score) if score is not None else
                        {"estimate": math.nan, "low": math.nan, "high": math.nan},
                        "difference": diff.to_dict()}
    return _block(metric, higher_is_better, int(finite.sum()), len(np.unique(g[finite])), model_ci, blocks, differences)


def _auroc(y: np.ndarray, s: np.ndarray) -> float:
    if y.size == 0 or np.unique(y).size < 2:
        return math.nan
    return float(roc_auc_score(y, s))


def compare_auroc(
    metric: str,
    model_scores: ArrayLike,
    controls: Mapping[str, ArrayLike],
    labels: ArrayLike,
    groups: ArrayLike | None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """AUROC of the model's scores beside each control's scores on the same cases, with a verdict.

    Each resample draws patients, and the model's and every control's AUROC are computed on the same
    drawn cases (a paired bootstrap of the AUROC difference). Resamples with one class only are
    skipped (:func:`~mlmi_zoo.evaluation.bootstrap.bootstrap_ci` counts them).

    Args:
        metric: the metric's name for the card (e.g. ``"test AUROC"``).
        model_scores: (N,) the model's score of the positive class.
        controls: control name -> (N,) scores of the control on the same cases.
        labels: (N,) 0/1 labels.
        groups: (N,) patient ids; None resamples cases.
        n_boot: bootstrap resamples.
        seed: seed of the resampling.

    Returns:
        The comparison block (see the module docstring).
    """
    if not controls:
        raise ValueError(f"compare_auroc needs at least one control for {metric!r}; got none")
    s = _np(model_scores).astype(np.float64).reshape(-1)
    y = _np(labels).astype(np.int64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"{metric}: {s.shape[0]} scores for {y.shape[0]} labels")
    g = _groups(groups, len(s))
    model_ci = bootstrap_ci(lambda yy, ss: _auroc(yy, ss), y, s, n=n_boot, seed=seed, groups=g)
    blocks: dict[str, dict[str, Any]] = {}
    differences: dict[str, DifferenceCI] = {}
    for name, values in controls.items():
        c = _np(values).astype(np.float64).reshape(-1)
        if c.shape != s.shape:
            raise ValueError(f"{metric}: control {name!r} has {c.shape[0]} scores for {s.shape[0]} cases")
        score = bootstrap_ci(lambda yy, cc: _auroc(yy, cc), y, c, n=n_boot, seed=seed, groups=g)
        diff_ci = bootstrap_ci(lambda yy, ss, cc: _auroc(yy, ss) - _auroc(yy, cc), y, s, c, n=n_boot, seed=seed, groups=g)
        diff = DifferenceCI(diff_ci.estimate, diff_ci.low, diff_ci.high, int(len(s)), len(np.unique(g)))
        differences[name] = diff
        blocks[name] = {"score": _ci_dict(score), "difference": diff.to_dict()}
    return _block(metric, True, int(len(s)), len(np.unique(g)), model_ci, blocks, differences)


def exact_check(metric: str, max_error: float, tolerance: float, n_cases: int, what: str) -> dict[str, Any]:
    """The verdict of an exact test (no statistical control): demonstrated when ``max_error <= tolerance``.

    Args:
        metric: what was checked, for the card.
        max_error: the largest error observed (NaN when the check could not run).
        tolerance: the largest error that still counts as exact.
        n_cases: cases (or case × term pairs) checked.
        what: one sentence saying what was done to the model.

    Returns:
        A block with ``metric``, ``max_error``, ``tolerance``, ``n_cases`` and a ``verdict``.
    """
    ok = math.isfinite(max_error) and max_error <= tolerance
    status = DEMONSTRATED if ok else NOT_DEMONSTRATED
    sentence = (f"{status}: {what}; the largest difference from the stated contribution is {max_error:.1e} "
                f"(tolerance {tolerance:.0e}; {n_cases} checks)")
    return {"metric": metric, "max_error": float(max_error), "tolerance": tolerance, "n_cases": int(n_cases),
            "verdict": {"status": status, "control": "exact test", "sentence": sentence, "difference": None}}


def not_assessed(reason: str) -> dict[str, Any]:
    """A verdict block for an element that has no control comparison yet: the card says so, with the reason."""
    return {"verdict": {"status": NOT_ASSESSED, "control": None, "sentence": f"{NOT_ASSESSED}: {reason}",
                        "difference": None}}

