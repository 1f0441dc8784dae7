"""Physical attribution: do the model's measurements agree with the reference, in their unit?

The physical-attribution element of Wang et al., "A Framework for Interpretability in Machine
Learning for Medical Imaging" (arXiv 2310.01685; IEEE Access 2024), measured as agreement of a
model's measurements (mm, mm², mL, HU, ...) with reference measurements:

* :func:`bland_altman` — bias and 95% limits of agreement (Bland & Altman, "Statistical methods for
  assessing agreement between two methods of clinical measurement", Lancet 1986), with confidence
  intervals of the bias and of the limits (Bland & Altman, "Measuring agreement in method comparison
  studies", Stat Methods Med Res 1999);
* :func:`mae`, :func:`rmse` — errors in the unit of the inputs.

Spacing invariance (the same object imaged at another spacing) is computed from these by the
evaluation runner. What we changed: non-finite pairs are dropped and counted, and too few pairs give
NaN instead of raising.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import t as student_t
from sklearn.metrics import mean_squared_error

from mlmi_zoo.evaluation._arrays import ArrayLike, _np

__all__ = ["BlandAltman", "bland_altman", "mae", "rmse"]


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
    # Hand-written: neither scipy nor scikit-learn computes Bland–Altman agreement (statsmodels'
    # mean_diff_plot only draws it), and none gives the 1999 confidence intervals of the limits.
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
