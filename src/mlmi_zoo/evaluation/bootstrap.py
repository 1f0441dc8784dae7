"""Percentile-bootstrap confidence intervals that resample patients, not images.

Every number of a card carries an interval over patients (DESIGN.md, evidence rules): the
percentile bootstrap of Efron & Tibshirani, "An Introduction to the Bootstrap" (1993), computed by
``scipy.stats.bootstrap(method="percentile")``. With ``groups`` the unit of resampling is the group
(cluster bootstrap; Field & Welsh, "Bootstrapping clustered data", JRSS B 2007): groups are drawn
with replacement and the statistic is computed over all cases of the drawn groups, so correlated
images of one patient stay together. All arrays passed together are indexed by the same draw, so a
statistic of two models' outputs (a difference) is a paired comparison.

What we changed: scipy resamples the group indices; a resample on which the metric is undefined
(NaN, e.g. one class only) is skipped rather than making the whole interval NaN, and ``CI.n`` says
how many resamples were used.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
from scipy.stats import DegenerateDataWarning, bootstrap

from mlmi_zoo.evaluation._arrays import ArrayLike, _np

__all__ = ["CI", "bootstrap_ci"]

logger = logging.getLogger(__name__)


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
    cases of each drawn group, in the order drawn. Resamples where ``metric_fn`` returns NaN/inf
    (undefined, e.g. one class only) are skipped; ``CI.n`` says how many were used. ``metric_fn``
    must return NaN rather than raise when the metric is undefined.

    Args:
        metric_fn: function of numpy arrays (row-indexed like ``arrays``) returning a float.
        *arrays: arrays sharing their first dimension N (tensors are converted to numpy).
        n: number of resamples (>= 1).
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
    if n < 1:
        raise ValueError(f"n (bootstrap resamples) must be >= 1; got {n}")
    data = [_np(a, None) for a in arrays]  # dtype kept: labels stay integers
    n_cases = len(data[0])
    if any(len(a) != n_cases for a in data):
        raise ValueError(f"all arrays must share their first dimension; got lengths {[len(a) for a in data]}")
    estimate = float(metric_fn(*data))

    if groups is None:
        members = None
        n_units = n_cases
    else:
        group_ids = _np(groups, None)
        if len(group_ids) != n_cases:
            raise ValueError(f"groups must hold one id per case ({n_cases}); got {len(group_ids)}")
        _, inverse = np.unique(group_ids, return_inverse=True)
        members = [np.flatnonzero(inverse == g) for g in range(inverse.max(initial=-1) + 1)]  # cases per group
        n_units = len(members)

    def statistic(units: np.ndarray) -> float:
        """The metric over every case of the drawn units (cases, or all cases of each drawn group)."""
        idx = units if members is None else np.concatenate([members[u] for u in units])
        return float(metric_fn(*(a[idx] for a in data)))

    if n_units < 2:
        # scipy refuses a sample of fewer than two units; every resample of one unit is the data itself.
        values = np.full(n, estimate)
        scipy_interval = None
    else:
        with warnings.catch_warnings():
            # scipy has no nan_policy here: one undefined resample makes its interval NaN and warns.
            # We take the same percentile interval over the defined resamples below instead.
            warnings.simplefilter("ignore", DegenerateDataWarning)
            result = bootstrap(
                (np.arange(n_units),),
                statistic,
                n_resamples=n,
                vectorized=False,
                confidence_level=1.0 - alpha,
                method="percentile",
                # scipy's name up to 1.14, still accepted; ``rng=`` (the name pyright sees) needs scipy >= 1.15
                random_state=np.random.default_rng(seed),  # pyright: ignore[reportCallIssue]
            )
        values = result.bootstrap_distribution
        scipy_interval = result.confidence_interval
    defined = values[np.isfinite(values)]
    if defined.size < n:
        logger.info("bootstrap: metric undefined in %d of %d resamples; they were skipped", n - defined.size, n)
    if defined.size == 0:
        return CI(estimate, math.nan, math.nan, 0)
    if scipy_interval is not None and defined.size == n:
        low, high = scipy_interval
    else:
        low, high = np.quantile(defined, [alpha / 2, 1 - alpha / 2])  # scipy's percentile definition
    return CI(estimate, float(low), float(high), int(defined.size))
