"""What the controls learn from the training split: the centre prior and the image-statistics regressions.

The controls of :mod:`mlmi_zoo.evaluation.controls` that need data use the *training* split only,
never the evaluated one: the centre prior is the smoothed mean training lesion mask; the trivial
image-statistics baseline is a logistic regression (the label, and each concept) or a ridge
regression (each measured quantity) on :func:`~mlmi_zoo.evaluation.controls.image_statistics` of the
training images. :func:`training_reference` makes one pass over (a capped number of) training
cases and fits them; :class:`_ImageControls` then produces, batch by batch, the control maps that go
through the same localization metrics as the model's maps.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from mlmi_zoo.evaluation._common import _Context, _subset, _to_tensor_list
from mlmi_zoo.evaluation.controls import (StatisticsControl, brightness_map, centre_prior, image_statistics,
                                          random_maps, uniform_map)
from mlmi_zoo.families import family_of

log = logging.getLogger(__name__)

# The centre prior's Gaussian: 1/32 of the image side (2 px at 64 px). A little smoothing so that a
# lesion never seen at a pixel in training still gets a non-zero prior there; the control is not
# tuned, and a sharper or blurrier prior changes activation precision by less than its interval.
PRIOR_SIGMA_FRACTION = 1 / 32


@dataclass
class _Reference:
    """Controls fitted on the training split (any part may be missing when the data do not allow it)."""

    n_cases: int = 0
    prior: torch.Tensor | None = None  # (*spatial) smoothed mean training mask
    task: StatisticsControl | None = None
    measurements: dict[str, StatisticsControl] = field(default_factory=dict)
    measurement_means: dict[str, float] = field(default_factory=dict)
    measurement_medians: dict[str, float] = field(default_factory=dict)  # the best constant under absolute error
    concepts: dict[str, StatisticsControl] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def training_reference(model: Any, ctx: _Context, max_cases: int) -> _Reference:
    """One pass over the first ``max_cases`` training cases: fit the data-driven controls.

    Args:
        model: the evaluated model (its input spec's intensity transform is applied, as in the
            evaluated pass, so the statistics see what the model sees).
        ctx: the evaluation context (its training data spec).
        max_cases: cap on the training cases read.

    Returns:
        A :class:`_Reference`; ``notes`` say what could not be fitted and why.
    """
    ref = _Reference()
    images = family_of(model).inputs == "images"
    if not images and not getattr(model.config, "quantities", ()):
        return ref  # a bag model without measurements: its controls are per bag (see controls.py)
    try:
        train = ctx.train_dataset()
    except (FileNotFoundError, ValueError) as err:
        ref.notes.append(f"the training split could not be read ({err}), so no data-driven control was fitted")
        return ref
    if train is None or len(train) == 0:
        ref.notes.append("no training split, so no data-driven control (centre prior, image statistics) was fitted")
        return ref
    subset = _subset(train, max_cases)
    if not images:  # bags: each measurement's training mean and median, what a head that learnt nothing would say
        for name in {n for i in range(len(subset)) for n in (subset[i].get("measurements") or {})}:
            values = np.array([float(subset[i].get("measurements", {}).get(name, math.nan)) for i in range(len(subset))])
            if np.isfinite(values).sum() >= 2:
                ref.measurement_means[name] = float(np.nanmean(values))
                ref.measurement_medians[name] = float(np.nanmedian(values))
        ref.n_cases = len(subset)
        return ref
    feats, labels, masks = [], [], []
    measured: dict[str, list[np.ndarray]] = {}
    concepts: dict[str, list[np.ndarray]] = {}
    for batch in DataLoader(subset, batch_size=ctx.batch_size, shuffle=False, collate_fn=ctx.collate):
        x = model.input_spec.intensity(batch["image"].float())
        feats.append(image_statistics(x))
        labels.append(np.asarray(_to_tensor_list(batch["label"]), dtype=np.float64))
        if batch.get("mask") is not None:
            masks.append(batch["mask"].reshape(x.shape[0], *x.shape[2:]).bool().cpu())
        for name, v in (batch.get("measurements") or {}).items():
            measured.setdefault(name, []).append(torch.as_tensor(v).reshape(-1).double().numpy())
        for name, v in (batch.get("concepts") or {}).items():
            concepts.setdefault(name, []).append(torch.as_tensor(v).reshape(-1).double().numpy())
    ref.n_cases = len(subset)
    features = np.concatenate(feats)
    y = np.concatenate(labels)
    graded = y >= 0  # label -1: a case that trains something else (a lesion map), not the task
    try:
        ref.task = StatisticsControl("classification").fit(features[graded], y[graded])
    except ValueError as err:
        ref.notes.append(f"image-statistics task control not fitted: {err}")
    for name, parts in measured.items():
        values = np.concatenate(parts)
        if np.isfinite(values).sum() >= 2:
            ref.measurements[name] = StatisticsControl("regression").fit(features, values)
            ref.measurement_means[name] = float(np.nanmean(values))
            ref.measurement_medians[name] = float(np.nanmedian(values))
    for name, parts in concepts.items():
        values = np.concatenate(parts)
        try:
            ref.concepts[name] = StatisticsControl("classification").fit(features, values)
        except ValueError as err:
            ref.notes.append(f"image-statistics control of concept {name!r} not fitted: {err}")
    if masks:
        stacked = torch.cat(masks).float()
        sigma = [max(s * PRIOR_SIGMA_FRACTION, 0.5) for s in stacked.shape[1:]]
        ref.prior = centre_prior(stacked, (1, *stacked.shape[1:]), sigma)[0]
    return ref


class _ImageControls:
    """Control maps for one batch of the evaluated split, in the model's evidence-map shape.

    Controls: ``centre_prior`` (when the training split has masks), ``uniform``, ``random`` (seeded
    per case), ``brightness`` (the image itself) and ``untrained_copy`` (the same architecture with
    every parameter re-initialised, explained the same way as the model: the lesion-agnostic
    saliency of an untrained network).
    """

    def __init__(self, model: Any, ref: _Reference, seed: int) -> None:
        self.ref = ref
        self.seed = seed
        self.first_case = 0
        self.untrained = _untrained_copy(model, seed)
        self.record = family_of(model)

    def maps(self, x: torch.Tensor, spacing: torch.Tensor | None, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """Control maps for the batch ``x`` (intensity-transformed), each of ``shape`` = (B, *spatial)."""
        out: dict[str, torch.Tensor] = {}
        if self.ref.prior is not None and tuple(self.ref.prior.shape) == tuple(shape[1:]):
            out["centre_prior"] = self.ref.prior.expand(shape)
        out["uniform"] = uniform_map(shape)
        out["random"] = random_maps(shape, self.seed, self.first_case)
        bright = brightness_map(x)
        if tuple(bright.shape) == tuple(shape):
            out["brightness"] = bright
        untrained = _evidence_map(self.untrained, self.record, x, spacing)
        if untrained is not None and tuple(untrained.shape) == tuple(shape):
            out["untrained_copy"] = untrained
        self.first_case += shape[0]
        return out


def _untrained_copy(model: Any, seed: int) -> Any:
    """A deep copy of ``model`` with every parameter re-initialised.

    Modules with ``reset_parameters`` (convolutions, linears, norms) are reset by it; a parameter no
    module resets (prototype vectors, a last-layer table held directly) is redrawn from a normal
    distribution with its own mean and standard deviation, which keeps its scale and removes what
    was learnt.
    """
    clone = copy.deepcopy(model)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        _reinitialise(clone)
    finally:
        torch.random.set_rng_state(state)
    return clone.eval()


def _reinitialise(part: torch.nn.Module) -> None:
    """Re-initialise every parameter of ``part`` in place (see :func:`_untrained_copy`)."""
    covered: set[int] = set()
    for module in part.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
            covered.update(id(p) for p in module.parameters(recurse=False))
    with torch.no_grad():
        for param in part.parameters():
            if id(param) not in covered and param.numel() > 1:
                torch.nn.init.normal_(param, float(param.mean()), float(param.std()))


def _evidence_map(model: Any, record: Any, x: torch.Tensor, spacing: torch.Tensor | None) -> torch.Tensor | None:
    """The map the evaluation reads from ``model``: the top contribution's evidence map of its prediction."""
    if record.evidence_maps is None:
        return None
    with torch.no_grad():
        exp = model.explain(x, spacing=spacing) if spacing is not None else model.explain(x)
    if not exp.decomposable:
        return None
    rows = torch.arange(x.shape[0])
    predicted = exp.logits.argmax(-1)
    top = exp.contributions[rows, predicted].argmax(-1)
    return record.evidence_maps(exp)[rows, top]


def cascading_randomisation(model: Any, x: torch.Tensor, spacing: torch.Tensor | None, seed: int) -> list[dict[str, Any]]:
    """Adebayo et al.'s cascading parameter randomisation (NeurIPS 2018): re-initialise the model's
    top-level parts from the output towards the input, one more at each step, and measure how much
    the evidence map still resembles the trained model's (Spearman rank correlation per case,
    ``scipy.stats.spearmanr``, averaged). An explanation that does not change when the parameters
    are destroyed does not explain the model.

    Returns:
        One record per step: ``{"randomised": [names...], "spearman_mean": float}``; empty when the
        model has no evidence map.
    """
    from scipy.stats import spearmanr

    record = family_of(model)
    reference = _evidence_map(model, record, x, spacing)
    if reference is None:
        return []
    parts = [name for name, child in model.named_children() if any(True for _ in child.parameters())]
    clone = copy.deepcopy(model).eval()
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    steps: list[dict[str, Any]] = []
    try:
        for k, name in enumerate(reversed(parts)):
            _reinitialise(getattr(clone, name))
            maps = _evidence_map(clone, record, x, spacing)
            if maps is None:
                break
            rho = []
            for a, b in zip(reference.flatten(1).numpy(), maps.flatten(1).numpy()):
                rho.append(float(getattr(spearmanr(a, b), "statistic")) if a.std() > 0 and b.std() > 0 else float("nan"))
            finite = [r for r in rho if r == r]
            steps.append({"randomised": list(reversed(parts))[: k + 1],
                          "spearman_mean": float(np.mean(finite)) if finite else float("nan")})
    finally:
        torch.random.set_rng_state(state)
    return steps
