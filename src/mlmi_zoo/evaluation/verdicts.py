"""Verdicts: is an interpretability number better than what a control gets on the same cases?

DESIGN.md, evidence rules: intervals are over patients, "bootstrap resampling patients, paired for
differences", and an element is "demonstrated" only where the paired difference to the strongest
control has a 95% lower bound above 0; otherwise it is "not demonstrated on this data", with the
numbers. The controls are those of :mod:`mlmi_zoo.evaluation.controls` (after Adebayo et al.,
"Sanity Checks for Saliency Maps", NeurIPS 2018); the per-case values are, for instance, activation
precision (Barnett et al., Nature Machine Intelligence 2021) or pointing-game hits (Zhang et al.,
ECCV 2016 / IJCV 2018) of the model and of a control on the same cases.

:func:`paired_difference_ci` reuses :func:`mlmi_zoo.evaluation.bootstrap.bootstrap_ci` unchanged: it
already resamples patients through ``scipy.stats.bootstrap`` and indexes every array it is given by
the same draw, which is exactly a paired patient bootstrap when given the model's and the control's
values; no second resampler is written here.

What we changed: a case counts only where both the model's and the control's value are defined
(finite), so the two statistics are always computed on the same cases.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from mlmi_zoo.evaluation._arrays import ArrayLike, _np
from mlmi_zoo.evaluation.bootstrap import bootstrap_ci

__all__ = ["DEMONSTRATED", "NOT_DEMONSTRATED", "DifferenceCI", "Verdict", "paired_difference_ci", "verdict"]

DEMONSTRATED = "demonstrated"
NOT_DEMONSTRATED = "not demonstrated on this data"
Status = Literal["demonstrated", "not demonstrated on this data"]


@dataclass(frozen=True)
class DifferenceCI:
    """The model-minus-control difference of a statistic, with a paired patient-bootstrap interval.

    Attributes:
        estimate: ``statistic(model) - statistic(control)`` on all paired cases.
        low: lower bound of the 95% percentile interval.
        high: upper bound.
        n_cases: cases where both values are defined (those used).
        n_patients: distinct patients (groups) among them, the unit of resampling.
    """

    estimate: float
    low: float
    high: float
    n_cases: int
    n_patients: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict of the fields."""
        return asdict(self)


def paired_difference_ci(
    model_values: ArrayLike,
    control_values: ArrayLike,
    groups: ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    statistic: Callable[[np.ndarray], float] = np.nanmean,
) -> DifferenceCI:
    """Model-minus-control difference of per-case metric values, with a paired patient bootstrap.

    Each bootstrap resample draws patients (``groups``) with replacement, takes all cases of each
    drawn patient, and computes ``statistic(model[cases]) - statistic(control[cases])`` on the same
    cases for both (paired); the 95% interval is the percentile interval of ``scipy.stats.bootstrap``
    via :func:`~mlmi_zoo.evaluation.bootstrap.bootstrap_ci`. Cases where either value is NaN or
    infinite (e.g. activation precision on an empty mask, a bag with one instance class) are dropped
    first, from both.

    Args:
        model_values: (N,) the model's per-case metric values.
        control_values: (N,) the control's values on the same cases, in the same order.
        groups: (N,) patient id per case (woman, eye, ...).
        n_boot: number of bootstrap resamples.
        seed: seed of the resampling; equal seeds give equal intervals.
        statistic: summary of a (n,) array of values; the mean by default.

    Returns:
        A :class:`DifferenceCI`.

    Raises:
        ValueError: when the arrays differ in length or no case has both values defined.
    """
    model, control, patient = _np(model_values), _np(control_values), _np(groups, None)
    if not (model.ndim == control.ndim == patient.ndim == 1) or not (len(model) == len(control) == len(patient)):
        raise ValueError(
            f"model_values, control_values and groups must be (N,) arrays of one length; got shapes "
            f"{model.shape}, {control.shape} and {patient.shape}"
        )
    paired = np.isfinite(model) & np.isfinite(control)
    if not paired.any():
        raise ValueError(f"no case has both a model and a control value defined (of {len(model)} cases)")
    model, control, patient = model[paired], control[paired], patient[paired]

    def difference(m: np.ndarray, c: np.ndarray) -> float:
        return float(statistic(m)) - float(statistic(c))

    ci = bootstrap_ci(difference, model, control, n=n_boot, seed=seed, alpha=0.05, groups=patient)
    return DifferenceCI(ci.estimate, ci.low, ci.high, int(paired.sum()), len(np.unique(patient)))


@dataclass(frozen=True)
class Verdict:
    """The verdict on one element against its strongest control.

    Attributes:
        status: ``"demonstrated"`` or ``"not demonstrated on this data"``.
        control: name of the strongest control.
        difference: model minus that control, with its interval and n.
        sentence: one line for a card.
    """

    status: Status
    control: str
    difference: DifferenceCI
    sentence: str

    @property
    def demonstrated(self) -> bool:
        """True when the status is "demonstrated"."""
        return self.status == DEMONSTRATED

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict of the fields."""
        return asdict(self)


def verdict(differences: Mapping[str, DifferenceCI], metric: str = "the metric") -> Verdict:
    """"demonstrated" only where the difference to every control has a 95% lower bound above 0.

    The DESIGN's rule names the strongest control; a reviewer may run any of them, so the model must
    beat each one. The control the verdict names is, when every lower bound is above 0, the strongest
    — the one that scores highest on the metric, i.e. with the smallest model-minus-control
    *estimate* (ties: smaller lower bound, then name); otherwise the control that is not beaten with
    the smallest lower bound. A control with an undefined (NaN) estimate or bound is not beaten,
    since nothing was shown against it.

    Args:
        differences: control name -> model-minus-control :class:`DifferenceCI` on the same cases.
        metric: the metric's name, for the sentence (e.g. "activation precision (top 5%)").

    Returns:
        A :class:`Verdict`.
    """
    if not differences:
        raise ValueError("verdict needs at least one control; got none. Score the model against the DESIGN's controls.")

    def low_of(d: DifferenceCI) -> float:
        return -math.inf if math.isnan(d.low) or math.isnan(d.estimate) else d.low

    def strength(item: tuple[str, DifferenceCI]) -> tuple[float, float, str]:
        name, d = item
        return (-math.inf if math.isnan(d.estimate) else d.estimate, low_of(d), name)

    not_beaten = {n: d for n, d in differences.items() if not low_of(d) > 0}
    if not_beaten:
        control, d = min(not_beaten.items(), key=lambda item: (low_of(item[1]), item[0]))
        status: Status = NOT_DEMONSTRATED
    else:
        control, d = min(differences.items(), key=strength)
        status = DEMONSTRATED
    sentence = (
        f"{status}: {metric} minus the {'strongest' if status == DEMONSTRATED else 'unbeaten'} control ({control}) is {d.estimate:+.3f} "
        f"(95% CI {d.low:+.3f} to {d.high:+.3f}; {d.n_cases} cases, {d.n_patients} patients)"
    )
    return Verdict(status, control, d, sentence)
