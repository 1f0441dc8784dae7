"""Transparency: can one follow the computation from named terms to the decision?

The transparency element of Wang et al., "A Framework for Interpretability in Machine Learning for
Medical Imaging" (arXiv 2310.01685; IEEE Access 2024). The zoo's models decide by an exact sum of
named contributions (prototype × weight, as in ProtoPNet, Chen et al., NeurIPS 2019; concept ×
weight, as in concept bottleneck models, Koh et al., ICML 2020; instance contributions, as in
additive MIL, Javed et al., NeurIPS 2022). Two measurements follow:

* :func:`decomposition_error` — how far ``sum(contributions) + bias`` is from the logits;
* :func:`explanation_size` — how many terms a decision uses (non-zero terms, and the terms that
  carry a given share of the positive evidence).

What we changed: the size counts only positive evidence toward the explained class, so it stays
monotone and well defined when terms cancel.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from mlmi_zoo.evaluation._arrays import ArrayLike, _class_index, _tensor
from mlmi_zoo.explanations import Explanation

__all__ = ["decomposition_error", "explanation_size"]


def decomposition_error(explanation: Explanation) -> float:
    """max |sum(contributions) + bias - logits| over the batch and classes.

    Args:
        explanation: any :class:`~mlmi_zoo.explanations.Explanation`.

    Returns:
        The largest absolute error in logit units, or NaN for explanations that are not
        decomposable (``explanation.decomposable`` is False).
    """
    return explanation.decomposition_error()


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
