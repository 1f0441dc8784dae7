"""The evidence added to a family's element blocks: controls beside the task, quantities, concepts;
the exact switch-off test of transparency; and the verdict of each element.

The family sections (``architectures/<family>/evaluation.py``) compute each element's own numbers;
what is the same for every family runs here, after them, on the records of the same pass:

* task — the image-statistics baseline's AUROC on the same cases (is the task solved by intensity
  moments, foreground area and texture alone?), and the black-box baseline's, paired per patient;
* physical attribution — each quantity's absolute error beside controls that predict the training
  mean and the training median (the constant with the least absolute error, which matters where
  most cases measure 0) and one that regresses the quantity on image statistics;
* visual recognizability of concepts — each concept beside the image-statistics classifier of it;
* transparency — switching each contribution off *in the model* (a prototype disabled, a concept
  unit zeroed, an instance excluded) must change the logit by exactly the contribution the
  explanation stated;
* actionability of concepts — correcting every concept with its true value against no correction.

:func:`verdicts` then reads one verdict per element (and faithfulness) for the card and the README.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mlmi_zoo.evaluation._collect import _Collected
from mlmi_zoo.evaluation._common import _cat, _Context
from mlmi_zoo.evaluation.evidence import compare, compare_auroc, exact_check, not_assessed
from mlmi_zoo.evaluation.results import ELEMENTS
from mlmi_zoo.families import family_of

__all__ = ["add_evidence", "inputs_for_switch_off", "switch_off_evidence", "verdicts"]

# Float32 arithmetic: a logit recomputed by a different summation order differs by ~1e-6.
EXACT_TOLERANCE = 1e-5


def _stats(col: _Collected) -> np.ndarray | None:
    return np.concatenate(col.stats) if col.stats else None


def task_evidence(probs: torch.Tensor, labels: torch.Tensor, col: _Collected, ctx: _Context,
                  baseline_probs: torch.Tensor | None) -> dict[str, Any] | None:
    """AUROC of the model beside the image-statistics baseline and the black-box baseline.

    A binary task compares the positive class's score. A task of more classes compares each class
    against the others (its one-vs-rest AUROC, on the same cases), one comparison per class with at
    least one case of it and one of another.

    Returns:
        ``{"image_statistics": comparison, "black_box_baseline": comparison}`` for a binary task,
        ``{"image_statistics_class_<c>": ..., "black_box_baseline_class_<c>": ...}`` for more classes
        (each where available), or None.
    """
    out: dict[str, Any] = {}
    groups = col.case_groups()
    y = labels.numpy()
    ref, stats = ctx.reference, _stats(col)
    control = None
    if ref is not None and ref.task is not None and stats is not None and len(stats) == len(y):
        control = ref.task.predict(stats)
        if control.shape[1] != probs.shape[1]:  # the training split lacks a class: no per-class control
            control = None
    binary = probs.shape[1] == 2
    for c in ([1] if binary else range(probs.shape[1])):
        positive = (y == c).astype(np.int64)
        if binary:
            suffix, metric = "", "AUROC"
        elif 0 < positive.sum() < len(positive):
            suffix, metric = f"_class_{c}", f"AUROC of class {c} against the others"
        else:
            continue
        score = probs[:, c].numpy()
        if control is not None:
            out[f"image_statistics{suffix}"] = compare_auroc(metric, score, {"image statistics": control[:, c]},
                                                             positive, groups, n_boot=ctx.n_boot, seed=ctx.seed)
        if baseline_probs is not None:
            out[f"black_box_baseline{suffix}"] = compare_auroc(
                metric, score, {"black-box baseline": baseline_probs[:, c].numpy()}, positive, groups,
                n_boot=ctx.n_boot, seed=ctx.seed)
    return out or None


def _physical(block: dict[str, Any], col: _Collected, ctx: _Context) -> None:
    ref, stats = ctx.reference, _stats(col)
    if not block.get("applicable") or ref is None:
        return
    by_quantity: dict[str, Any] = {}
    for name in col.measured:
        pred, true = _cat(col.measured[name]).numpy(), _cat(col.truth[name]).numpy()
        if len(pred) != col.n_cases:
            continue
        controls: dict[str, np.ndarray] = {}
        if name in ref.measurement_means:
            controls["training mean"] = np.abs(ref.measurement_means[name] - true)
        if name in ref.measurement_medians:  # the constant with the least absolute error (a zero-inflated quantity)
            controls["training median"] = np.abs(ref.measurement_medians[name] - true)
        if name in ref.measurements and stats is not None and len(stats) == len(true):
            controls["image statistics"] = np.abs(ref.measurements[name].predict(stats) - true)
        if controls:
            by_quantity[name] = compare(f"absolute error of {name} ({col.units[name]})", np.abs(pred - true), controls,
                                        col.case_groups(), higher_is_better=False, n_boot=ctx.n_boot, seed=ctx.seed)
    if by_quantity:
        block["evidence"] = next(iter(by_quantity.values()))
        block["evidence_by_quantity"] = by_quantity


def _concepts(block: dict[str, Any], model: Any, col: _Collected, ctx: _Context) -> None:
    """Per-case share of correctly predicted categorical concepts, model vs the image-statistics classifiers."""
    ref, stats = ctx.reference, _stats(col)
    if not block.get("applicable") or ref is None or stats is None or len(stats) != col.n_cases:
        return
    model_correct, control_correct, names = [], [], []
    for spec in model.concept_specs:
        if spec.kind == "continuous" or spec.name not in col.concept_pred or spec.name not in ref.concepts:
            continue
        pred, true = _cat(col.concept_pred[spec.name]), _cat(col.concept_true[spec.name]).numpy()
        if len(true) != len(stats):
            continue
        guess = (pred.argmax(-1) if pred.ndim == 2 else (pred >= 0.5).long()).numpy().astype(np.float64)
        control = ref.concepts[spec.name]
        classes = np.asarray(getattr(control._model, "classes_", []), dtype=np.float64)
        control_guess = classes[control.predict(stats).argmax(1)]
        known = np.isfinite(true)
        model_correct.append(np.where(known, guess == true, np.nan))
        control_correct.append(np.where(known, control_guess == true, np.nan))
        names.append(spec.name)
    if not names:
        return
    with np.errstate(invalid="ignore"):
        m = np.nanmean(np.stack(model_correct), 0)
        c = np.nanmean(np.stack(control_correct), 0)
    block["evidence"] = compare(f"share of correctly predicted concepts ({', '.join(names)})", m,
                                {"image statistics": c}, col.case_groups(), n_boot=ctx.n_boot, seed=ctx.seed)


def inputs_for_switch_off(col: _Collected, n_cases: int, seed: int) -> list[torch.Tensor]:
    """The first evaluated inputs and as many random inputs in their range: what the exact
    switch-off test of each family section runs on."""
    if not col.keep_x:
        return []
    x = _cat(col.keep_x)[:n_cases]
    generator = torch.Generator().manual_seed(seed)
    return [x, torch.rand(x.shape, generator=generator) * (x.max() - x.min()) + x.min()]


def switch_off_evidence(worst: float, checks: int, what: str) -> dict[str, Any]:
    """The transparency comparison of a family's in-model switch-off test (see :func:`exact_check`)."""
    return exact_check("switching a contribution off in the model", worst, EXACT_TOLERANCE, checks,
                       what + ", on evaluated and on random inputs")


def _transparency(block: dict[str, Any], model: Any, col: _Collected) -> None:
    if not block.get("applicable") or "evidence" in block:
        return
    if family_of(model).inputs == "bags" and col.exclusion_delta:
        block["evidence"] = not_assessed(
            "an instance excluded from an attention-pooled bag renormalises the other instances' attention, so its "
            "stated contribution is not what exclusion removes; the decomposition is exact only with the attention fixed")


def _interventions(block: dict[str, Any], ctx: _Context) -> None:
    metrics = block.get("metrics", {}) if block.get("applicable") else {}
    per_case = block.get("details", {}).pop("per_case_correct", None)
    if per_case is None or "accuracy_all_concepts_corrected" not in metrics:
        return
    before, after = (np.asarray(per_case[k], dtype=np.float64) for k in ("none", "all"))
    block["evidence"] = compare("accuracy after correcting every concept with its true value", after,
                                {"no correction": before}, per_case.get("groups"), n_boot=ctx.n_boot, seed=ctx.seed)


def add_evidence(model: Any, blocks: dict[str, Any], col: _Collected, ctx: _Context) -> None:
    """Add the shared comparisons (``"evidence"`` keys) to the family's element blocks, in place."""
    _physical(blocks["physical_attribution"], col, ctx)
    if family_of(model).concepts:
        _concepts(blocks["visual_recognizability"], model, col, ctx)
        _interventions(blocks["actionability"], ctx)
    _transparency(blocks["transparency"], model, col)


def verdicts(blocks: dict[str, Any], faithfulness: dict[str, Any]) -> dict[str, Any]:
    """One verdict per element and for faithfulness: the comparison's, or why there is none."""
    out: dict[str, Any] = {}
    for name, block in [*((e, blocks[e]) for e in ELEMENTS), ("faithfulness", faithfulness)]:
        if not block.get("applicable"):
            out[name] = {"status": "not applicable", "control": None, "sentence": block.get("reason") or "not applicable",
                         "difference": None}
        elif "evidence" in block:
            out[name] = {"metric": block["evidence"].get("metric"), **block["evidence"]["verdict"]}
            shifted = (block.get("off_centre") or {}).get("evidence")
            if shifted is not None:  # lesion-centred crops: both placements must be demonstrated
                v = shifted["verdict"]
                both = out[name]["status"] == v["status"] == "demonstrated"
                failing = v if v["status"] != "demonstrated" else out[name]
                out[name] = {**failing, "metric": block["evidence"].get("metric"),
                             "status": "demonstrated" if both else "not demonstrated on this data",
                             "sentence": f"centred crops — {out[name]['sentence']}; off-centre crops — {v['sentence']}"}
        else:
            out[name] = not_assessed("no control comparison is implemented for this element of this family yet")["verdict"]
    return out

