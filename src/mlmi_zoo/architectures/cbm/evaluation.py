"""The concept-bottleneck section of an evaluation: its five elements and its faithfulness.

Localization of concept maps, per-concept quality (and, where nodules were rated by several
radiologists, model-reader beside inter-reader agreement), continuous concepts in physical units,
the exact decomposition of a linear label head, intervention curves under three policies against
an oracle, and deletion curves along the top-concept map.

Where the evaluated data offer a set with one mask per finding (``concept_mask_set``, e.g. IDRiD's
segmentation photographs for a lesion-concept model graded on IDRiD's grading photographs, which have
no mask), the map of each binary concept is scored against its finding's masks beside the controls of
:mod:`mlmi_zoo.evaluation.lesion_maps`, and the continuous concepts against the areas of those masks
(:func:`_finding_section`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Literal, Mapping

import numpy as np
import torch

from mlmi_zoo.evaluation import figures as figs
from mlmi_zoo.evaluation._collect import _Collected
from mlmi_zoo.evaluation._common import _base_dataset, _cat, _Context, _subset
from mlmi_zoo.evaluation._elements import (
    _deletion,
    _examples_into,
    _localization_block,
    _not_applicable,
    _physical_block,
    _tp_mask,
    _transparency_block,
)
from mlmi_zoo.evaluation.bootstrap import bootstrap_ci
from mlmi_zoo.evaluation.evidence import compare
from mlmi_zoo.evaluation.physical import bland_altman, mae
from mlmi_zoo.evaluation.recognizability import (agreement, concept_metrics, inter_reader_agreement,
                                                 leave_reader_out_pairs, model_reader_agreement)
from mlmi_zoo.evaluation.results import element


def _cbm(model: Any, col: _Collected, ctx: _Context) -> dict[str, Any]:
    logits, labels = _cat(col.logits), _cat(col.labels)
    predicted = logits.argmax(-1)
    out: dict[str, Any] = {}
    if not col.contributions:
        reason = "not applicable: the MLP concept->label head is not an exact sum of concept contributions"
        out["localization"] = _not_applicable(reason, "")
        out["transparency"] = _not_applicable(reason, "An MLP head can combine concepts in ways no single number shows.")
    else:
        out["localization"] = _localization_block(
            col, "concept map of the concept unit with the largest contribution to the predicted class",
            "A concept map on the lesion shows where the concept was read, not that the concept's value is correct.",
            _tp_mask(labels, predicted, model.num_classes), ctx)
        out["transparency"] = _transparency_block(
            col, "concept value x label-head weight, one term per bottleneck unit",
            "An exact sum over concepts shows how concepts are weighed, not that the concepts capture everything the "
            "image shows.")
        evidence = _switch_off_all(model, col, ctx)
        if evidence is not None:
            out["transparency"]["metrics"]["switch_off_max_error"] = evidence["max_error"]
            out["transparency"]["evidence"] = evidence
    out["visual_recognizability"] = _concept_quality(model, col, ctx)
    out["physical_attribution"], lim = _physical_block(
        col, model, ctx.dataset, ctx.limits, ctx.figures, _concept_measure_fn(model),
        "Agreement in units on these data does not show agreement on other scanners or spacings outside the "
        "evaluated range.", "the model has no continuous concept in physical units")
    ctx.limitations += lim
    out["actionability"] = _interventions(model, col, ctx)
    _finding_section(model, ctx, out)
    if col.keep_maps:
        ctx.faithfulness = _deletion(model, col, ctx.limits, ctx.seed, ctx.figures, "top-concept map",
                                     "A faithful concept map shows what the concept predictor uses, not that it "
                                     "matches the radiological definition of the concept.", ctx)
        _examples_into(out, col, model, labels, logits.softmax(-1), ctx, "top concept")
    return out


ANCHOR_AUPR = ("IDRiD segmentation challenge, best lesion AUPR at full resolution by dedicated segmentation networks: "
               "0.89 hard exudates, 0.50 microaneurysms (Porwal et al., Medical Image Analysis 2020)")


def _finding_section(model: Any, ctx: _Context, out: dict[str, Any]) -> None:
    """Each binary concept's map against its finding's masks, each continuous concept against the masks' areas.

    Runs when the evaluated data set offers ``concept_mask_set(split)`` (annotated photographs of the same
    kind) and ``control_appearance`` (how each finding looks, for the image-processing control). Adds
    ``evidence_<metric>_<concept>`` comparisons and ``details["finding_maps"]`` to the localization block, and,
    where the model has continuous concepts the masks measure, replaces a physical block that had nothing to
    score with their agreement (Bland–Altman, beside the training mean).
    """
    from mlmi_zoo.evaluation.lesion_maps import lesion_localization

    base = _base_dataset(ctx.dataset)
    mask_set = getattr(base, "concept_mask_set", None)
    appearance = getattr(base, "control_appearance", None)
    if mask_set is None or not appearance:
        return
    units = {s.name: sl.start for s, sl in zip(model.concept_specs, model.codec.slices)}
    names = [s.name for s in model.concept_specs if s.kind == "binary" and s.name in appearance]
    areas = [s for s in model.concept_specs if s.kind == "continuous"]
    data, train = mask_set("test"), mask_set("train")
    measured: dict[str, list[float]] = {s.name: [] for s in areas}
    truth: dict[str, list[float]] = {s.name: [] for s in areas}
    ids: list[str] = []

    def maps_of(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        x = model.input_spec.intensity(batch["image"].float())
        exp = model.explain(x, spacing=batch["spacing"])
        for spec in areas:
            if spec.name in batch["measurements"]:
                measured[spec.name] += torch.as_tensor(exp.measurements[spec.name].value).reshape(-1).tolist()
                truth[spec.name] += torch.as_tensor(batch["measurements"][spec.name]).reshape(-1).tolist()
        ids.extend(str(p) for p in batch["patient_id"])
        return {n: exp.concept_maps[:, units[n]] for n in names}

    found = lesion_localization(maps_of, data, train, appearance, q=ctx.limits.activation_q, n_boot=ctx.n_boot,
                                seed=ctx.seed)
    loc = out["localization"]
    details = loc.setdefault("details", {})
    details["finding_maps"] = {
        "data": f"{type(base).__name__} concept_mask_set('test'): {len(data)} annotated photographs; centre prior "
                f"from concept_mask_set('train') ({len(train)})",
        "anchor": ANCHOR_AUPR,
        **{n: {"images": r["images"], "pooled_aupr": r["pooled_aupr"]} for n, r in found.items()}}
    for n, r in found.items():
        for metric in ("pixel_aupr", "activation_precision", "pointing_game"):
            loc[f"evidence_{metric}_{n}"] = r[metric]
    _finding_areas(model, ctx, out, measured, truth, np.array(ids), train)


def _finding_areas(model: Any, ctx: _Context, out: dict[str, Any], measured: dict[str, list[float]],
                   truth: dict[str, list[float]], ids: np.ndarray, train: Any) -> None:
    """Bland–Altman of each continuous concept against the annotated photographs' areas, beside the training mean."""
    metrics: dict[str, Any] = {}
    details: dict[str, Any] = {}
    by_quantity: dict[str, Any] = {}
    figures: list[str] = []
    train_truth: dict[str, list[float]] = {n: [] for n in truth}
    for i in range(len(train)):
        values = train[i]["measurements"]
        for n in train_truth:
            train_truth[n].append(float(values.get(n, math.nan)))
    for spec in model.concept_specs:
        if spec.name not in truth:
            continue
        pred, true = np.array(measured[spec.name]), np.array(truth[spec.name])
        known = np.isfinite(true)
        if known.sum() < 2:
            continue
        ba = bland_altman(pred[known], true[known])
        metrics.update({f"{spec.name}_mae": mae(torch.as_tensor(pred[known]), torch.as_tensor(true[known])),
                        f"{spec.name}_bias": ba.bias, f"{spec.name}_loa_lower": ba.lower,
                        f"{spec.name}_loa_upper": ba.upper})
        details[spec.name] = {"unit": spec.unit, "n": ba.n, "bland_altman": dataclasses.asdict(ba),
                              "truth": "the specialists' mask of the finding at full resolution, within the field of "
                                       "view, in the photograph's own unit"}
        figures += ctx.figures.draw(f"bland_altman_{spec.name}", figs.plot_bland_altman, pred[known], true[known],
                                    unit=spec.unit)
        mean = float(np.nanmean(train_truth[spec.name]))
        by_quantity[spec.name] = compare(f"absolute error of {spec.name} ({spec.unit})", np.abs(pred - true),
                                         {"training mean": np.abs(mean - true)}, ids, higher_is_better=False,
                                         n_boot=ctx.n_boot, seed=ctx.seed)
    if not metrics or out["physical_attribution"].get("applicable"):
        return
    block = element(True, metrics=metrics, figures=figures, does_not_show=(
        "Agreement on the annotated photographs does not show agreement on the graded ones, whose areas nobody "
        "measured, nor on another camera or field angle."))
    block["details"] = {**details, "data": "the annotated photographs (concept_mask_set('test')); the evaluated "
                                           "split has no areas"}
    block["evidence"] = next(iter(by_quantity.values()))
    block["evidence_by_quantity"] = by_quantity
    out["physical_attribution"] = block


def _switch_off_all(model: Any, col: _Collected, ctx: _Context) -> dict[str, Any] | None:
    """Set each bottleneck unit to 0 in the model and re-run the label head, on the first evaluated
    inputs and on random ones: each logit must move by exactly minus that unit's stated contribution."""
    from mlmi_zoo.evaluation._evidence_blocks import inputs_for_switch_off, switch_off_evidence

    worst, checks = 0.0, 0
    inputs = inputs_for_switch_off(col, min(8, ctx.limits.deletion_cases), ctx.seed)
    if not inputs:
        return None
    for z in inputs:
        with torch.no_grad():
            exp = model.explain(z)
            for k in range(exp.concept_vector.shape[1]):
                zeroed = exp.concept_vector.clone()
                zeroed[:, k] = 0
                after = model.predict_label(zeroed)
                worst = max(worst, float((after - (exp.logits - exp.contributions[:, :, k])).abs().max()))
                checks += z.shape[0]
    return switch_off_evidence(worst, checks, "each concept unit set to 0 in the model's bottleneck and the label "
                                              "head re-run")


def _concept_measure_fn(model: Any) -> Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]] | None:
    if not any(s.kind == "continuous" and s.unit for s in model.concept_specs):
        return None

    def values(x: torch.Tensor, spacing: torch.Tensor) -> dict[str, torch.Tensor]:
        exp = model.explain(x, spacing=spacing)
        return {name: torch.as_tensor(m.value) for name, m in exp.measurements.items()}

    return values


def _concept_quality(model: Any, col: _Collected, ctx: _Context) -> dict[str, Any]:
    does_not_show = ("Accurate concepts show that the named findings are predicted well on these data, not that the "
                     "model uses them the way a radiologist does.")
    if not col.concept_pred:
        return _not_applicable("not applicable: these data carry no ground truth for the model's concepts", does_not_show)
    metrics: dict[str, Any] = {}
    details: dict[str, Any] = {}
    for spec in model.concept_specs:
        if spec.name not in col.concept_pred:
            continue
        pred, true = _cat(col.concept_pred[spec.name]), _cat(col.concept_true[spec.name])
        if spec.kind in ("ordinal", "categorical"):
            finite = true[torch.isfinite(true)]
            if finite.numel() and (finite.min() < 0 or finite.max() >= spec.width):
                raise ValueError(f"concept {spec.name!r}: the data give values {sorted(set(finite.tolist()))[:8]} but the "
                                 f"model's levels are indices 0..{spec.width - 1}; the data set and model disagree on "
                                 f"the level coding")
        result = concept_metrics(pred, true, spec.kind)
        details[spec.name] = result
        keys = {"binary": ("auroc", "f1"), "ordinal": ("accuracy", "kappa"), "categorical": ("accuracy", "auroc"),
                "continuous": ("mae",)}[spec.kind]
        for key in keys:
            metrics[f"{spec.name}_{key}"] = result[key]
    if col.reader_concepts:
        metrics.update(_reader_agreement(model, col, details, ctx.n_boot, ctx.seed, ctx))
    block = element(True, metrics=metrics, does_not_show=does_not_show)
    block["details"] = details
    return block


def _reader_agreement(model: Any, col: _Collected, details: dict[str, Any], n_boot: int = 500,
                      seed: int = 0, ctx: _Context | None = None) -> dict[str, Any]:
    """Model vs radiologists beside radiologists vs each other, per rated concept (LIDC-IDRI).

    Each case is one nodule whose image no rating entered, carrying every reader's own rating. Over
    all ordered pairs of two different readers ``(p, q)`` of a nodule, the model's rating is paired with
    reader ``q`` exactly as reader ``p`` is, so the two weighted kappas are computed on the same pairs;
    their difference gets a paired bootstrap over patients. Where the data can draw a nodule without one
    reader's outline (``render_leaving_out``), the model's rating paired with reader ``q`` is read from
    the image that holds nothing ``q`` drew (leave-reader-out): the consensus outline is made of the
    readers' own outlines, and an outline and its reader's shape ratings are not independent.
    """
    metrics: dict[str, Any] = {}
    patients = col.case_groups()
    left_out = _leave_reader_out_ratings(model, col, ctx) if ctx is not None else {}
    for spec in model.concept_specs:
        if spec.kind == "continuous" or spec.name not in col.concept_pred or spec.name not in col.reader_concepts:
            continue
        pred = _cat(col.concept_pred[spec.name])
        readers = _cat(col.reader_concepts[spec.name]).numpy()  # (N, max readers), NaN-padded
        per_case = _rating(pred).numpy()
        case, reader = np.nonzero(np.isfinite(readers))
        ratings = {str(i): readers[i][np.isfinite(readers[i])].tolist() for i in range(len(readers))}
        weights: Literal["quadratic"] | None = "quadratic" if spec.kind == "ordinal" else None
        labels = list(range(spec.width)) if spec.kind != "binary" else [0, 1]
        inter = inter_reader_agreement(ratings, weights=weights, labels=labels)
        model_k = model_reader_agreement({str(i): float(v) for i, v in enumerate(per_case)}, ratings, weights=weights,
                                         labels=labels)
        # (model, reader q, reader p) over ordered reader pairs p != q of one nodule: one row per reading, the
        # model's rating repeated (or, left out, its rating of the image without q), the pairing of
        # leave_reader_out_pairs.
        m_i, r_j, r_i, pair_case = leave_reader_out_pairs(per_case[case], readers[case, reader], case.astype(str).tolist())
        metrics[f"{spec.name}_model_reader_kappa"] = model_k
        metrics[f"{spec.name}_inter_reader_kappa"] = inter
        record: dict[str, Any] = {"weights": weights, "nodules": len(ratings), "readings": int(len(case)),
                                  "model_reader_kappa": model_k, "inter_reader_kappa": inter,
                                  "model_reader_kappa_on_reader_pairs": agreement(m_i, r_j, weights, labels)
                                  if len(m_i) else math.nan}
        if spec.name in left_out:
            # the same pairs, the model's rating of the image without reader q beside reader q
            own = left_out[spec.name]  # (N, max readers): the model on the image without that reader, NaN if none
            m_i, r_j, r_i, pair_case, order = _pairs_leaving_out(own, readers)
            lro = agreement(m_i, r_j, weights, labels) if len(m_i) else math.nan
            metrics[f"{spec.name}_model_reader_kappa_leave_reader_out"] = lro
            record["model_reader_kappa_leave_reader_out"] = lro
            record["paired"] = order
        if len(m_i):
            def margin(mi: np.ndarray, rj: np.ndarray, ri: np.ndarray) -> float:
                return agreement(mi, rj, weights, labels) - agreement(ri, rj, weights, labels)

            groups = patients[pair_case.astype(np.int64)]
            ci = bootstrap_ci(margin, m_i, r_j, r_i, n=n_boot, seed=seed, groups=groups)
            record["model_minus_inter_reader"] = {"estimate": ci.estimate, "low": ci.low, "high": ci.high,
                                                  "resampled": "patients", "patients": int(len(np.unique(groups)))}
            metrics[f"{spec.name}_model_minus_inter_reader_kappa"] = {
                "estimate": ci.estimate, "low": ci.low, "high": ci.high}
        details.setdefault(spec.name, {})["reader_agreement"] = record
    return metrics


def _rating(pred: torch.Tensor) -> torch.Tensor:
    """(N,) the model's rating on the readers' scale: the most likely level, or a binary concept at 0.5."""
    return (pred.argmax(-1) if pred.ndim == 2 else (pred >= 0.5).long()).double()


def _leave_reader_out_ratings(model: Any, col: _Collected, ctx: _Context) -> dict[str, np.ndarray]:
    """Per rated concept, ``(N, max readers)``: the model's rating of each case drawn without that reader.

    Empty when the data cannot draw a case without a reader. NaN where the reader does not exist or is the
    nodule's only one.
    """
    render = getattr(_base_dataset(ctx.dataset), "render_leaving_out", None)
    names = [s.name for s in model.concept_specs if s.kind != "continuous" and s.name in col.reader_concepts]
    if render is None or not names or len(col.reader_case_index) != len(_cat(col.reader_concepts[names[0]])):
        return {}
    present = np.isfinite(_cat(col.reader_concepts[names[0]]).numpy())  # (N, max readers)
    out = {name: np.full(present.shape, np.nan) for name in names}
    jobs = [(i, j) for i in range(len(present)) if present[i].sum() >= 2 for j in np.flatnonzero(present[i])]
    for start in range(0, len(jobs), ctx.batch_size):
        chunk = jobs[start:start + ctx.batch_size]
        samples = [render(col.reader_case_index[i], int(j)) for i, j in chunk]
        x = model.input_spec.intensity(torch.stack([s["image"] for s in samples]).float())
        spacing = torch.stack([torch.as_tensor(s["spacing"], dtype=torch.float32) for s in samples])
        with torch.no_grad():
            exp = model.explain(x, spacing=spacing)
        for name in names:
            value = exp.concepts[name]
            rating = _rating(torch.as_tensor(value.value if hasattr(value, "value") else value).double().cpu())
            for (i, j), r in zip(chunk, rating.tolist()):
                out[name][i, j] = r
    return out


def _pairs_leaving_out(own: np.ndarray, readers: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """``(model on the image without q, reader q, reader p, case)`` over ordered reader pairs ``p != q``."""
    rows: list[tuple[float, float, float, int]] = []
    for i in range(len(readers)):
        present = np.flatnonzero(np.isfinite(readers[i]))
        rows.extend((float(own[i, q]), float(readers[i, q]), float(readers[i, p]), i)
                    for q in present for p in present if p != q)
    if not rows:
        empty = np.zeros(0)
        return empty, empty, empty, np.zeros(0, dtype=np.int64), "leave-reader-out"
    m, rq, rp, case = (np.asarray(v) for v in zip(*rows))
    return m, rq, rp, case.astype(np.int64), "leave-reader-out: the model's rating of the image drawn without reader q"


def _interventions(model: Any, col: _Collected, ctx: _Context) -> dict[str, Any]:
    from mlmi_zoo.architectures.cbm.interventions import (CachedConcepts, FixedOrderPolicy, RandomPolicy,
                                                      UncertaintyPolicy, intervention_curve)

    does_not_show = ("Intervention curves show how much correcting concepts can fix the decision on these data, not "
                     "how often a clinician would correct them correctly.")
    if col.missing_concepts or not col.cache_parts:
        return _not_applicable(f"not applicable: these data carry no ground truth for the concept(s) "
                               f"{', '.join(col.missing_concepts)}, so no concept can be corrected", does_not_show)
    cache = CachedConcepts(*(_cat(col.cache_parts[k]) for k in ("predicted", "true", "labelled", "labels")))
    cache = dataclasses.replace(cache, labelled=cache.labelled.bool(), labels=cache.labels.long())
    policies: list[Any] = [RandomPolicy(ctx.seed), UncertaintyPolicy()]
    val = ctx.validation_dataset()
    if val is not None and len(val):
        policies.append(FixedOrderPolicy.fit(model, _subset(val, ctx.limits.val_cases), batch_size=ctx.batch_size))
    else:
        ctx.limitations.append("No validation split was available, so the fixed intervention order was not fitted.")
    curves = {p.name: intervention_curve(model, cache, p, "accuracy", repeats=ctx.limits.intervention_repeats)
              for p in policies}
    all_corrected = next(iter(curves.values()))["all_corrected"]
    oracle, definition = _oracle_accuracy(model, col, cache, ctx)
    metrics: dict[str, Any] = {"accuracy_no_intervention": next(iter(curves.values()))["none_corrected"],
                               "accuracy_all_concepts_corrected": all_corrected}
    for name, c in curves.items():
        metrics[f"accuracy_after_{max(1, len(c['values']) // 2)}_corrected_{name}"] = c["values"][max(1, len(c["values"]) // 2)]
        metrics[f"intervention_auc_{name}"] = float(np.mean(c["values"]))
    metrics["oracle_accuracy"] = oracle
    metrics["gap_all_corrected_to_oracle"] = oracle - all_corrected
    figures = ctx.figures.draw("intervention_curves", figs.plot_intervention_curves,
                               {n: (c["num_corrected"], c["values"]) for n, c in curves.items()}, oracle,
                               ylabel="task accuracy (fraction correct)")
    block = element(True, metrics=metrics, figures=figures, does_not_show=does_not_show)
    with torch.no_grad():  # per case, for the paired comparison of "all corrected" against "none corrected"
        corrected = torch.where(model.codec.unit_mask(cache.labelled), cache.true, cache.predicted)
        per_case = {"none": (model.predict_label(cache.predicted).argmax(-1) == cache.labels).double().tolist(),
                    "all": (model.predict_label(corrected).argmax(-1) == cache.labels).double().tolist(),
                    "groups": col.case_groups().tolist() if len(col.case_groups()) == len(cache.labels) else None}
    block["details"] = {"per_case_correct": per_case, "curves": curves, "oracle": definition,
                        "fixed_order": list(policies[-1].concept_order) if len(policies) == 3 else None}
    return block


def _oracle_accuracy(model: Any, col: _Collected, cache: Any, ctx: _Context) -> tuple[float, str]:
    """Accuracy reachable from the true concepts: the data set's label rule when it has one, else a
    logistic regression fitted on the training split's true concept vectors."""
    labels = cache.labels.numpy()
    rule = getattr(_base_dataset(ctx.dataset), "oracle_label", None)
    if callable(rule) and getattr(getattr(_base_dataset(ctx.dataset), "config", None), "source", "") != "lidc":
        concepts = {k: _cat(v) for k, v in col.data_concepts.items()}
        measurements = {k: _cat(v) for k, v in col.data_measurements.items()}
        predicted = np.asarray(rule(concepts, measurements)).reshape(-1)
        return float((predicted == labels).mean()), (
            "the data set's label rule applied to the true concepts and measurements of this split (label noise "
            "makes it lower than 1)")
    from sklearn.linear_model import LogisticRegression

    from mlmi_zoo.architectures.cbm.interventions import cache_concepts

    train = ctx.train_dataset()
    if train is None or len(train) == 0:
        return math.nan, "not computed: no training split to fit the oracle on"
    train_cache = cache_concepts(model, _subset(train, ctx.limits.oracle_train_cases), batch_size=ctx.batch_size)
    y = train_cache.labels.cpu().numpy()
    if np.unique(y).size < 2:
        return math.nan, "not computed: the training cases searched hold a single class"
    reg = LogisticRegression(max_iter=2000).fit(train_cache.true.cpu().numpy(), y)
    score = float((reg.predict(cache.true.cpu().numpy()) == labels).mean())
    return score, (f"a logistic regression (scikit-learn, L2, C=1) fitted on the true concept vectors of the first "
                   f"{len(y)} training cases, evaluated on this split's true concept vectors")
