"""Element blocks shared by the families: each turns collected records into one results element.

Physical attribution (MAE, RMSE, Bland–Altman per quantity, the count head's on-lesion share and
spacing invariance), localization against lesion masks, transparency of an exact decomposition,
faithfulness from deletion curves, the example-explanation figure, and the small helpers several
family sections use (true-positive mask, examples added to localization, the physical read-out).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from mlmi_zoo.evaluation import figures as figs
from mlmi_zoo.evaluation._collect import _Collected
from mlmi_zoo.evaluation._common import EvaluationLimits, _base_dataset, _cat, _Context, _Figures, _nanmean
from mlmi_zoo.evaluation.evidence import compare
from mlmi_zoo.evaluation.faithfulness import Curve, deletion_curve
from mlmi_zoo.evaluation.localization import instance_auroc
from mlmi_zoo.evaluation.physical import bland_altman, mae, rmse
from mlmi_zoo.evaluation.results import element


# ---------------------------------------------------------------------------------------------
# element blocks shared by the families
# ---------------------------------------------------------------------------------------------
def _not_applicable(reason: str, does_not_show: str = "") -> dict[str, Any]:
    return element(False, reason=reason, does_not_show=does_not_show)


def _physical_block(col: _Collected, model: Any, ds: Dataset, limits: EvaluationLimits, fig: _Figures,
                    explain_values: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]] | None,
                    does_not_show: str, what: str) -> tuple[dict[str, Any], list[str]]:
    """MAE, RMSE and Bland–Altman per quantity, plus spacing invariance when the data can be re-rendered."""
    limitations: list[str] = []
    if not col.measured:
        if not col.spacing_seen and col.n_cases and model.config.spatial_dims:
            return _not_applicable("not applicable: the images carry no pixel spacing, so no quantity in physical "
                                   "units can be stated or checked", does_not_show), limitations
        return _not_applicable(f"not applicable: {what}", does_not_show), limitations
    metrics: dict[str, Any] = {}
    figures: list[str] = []
    details: dict[str, Any] = {}
    for name in col.measured:
        pred, true = _cat(col.measured[name]), _cat(col.truth[name])
        unit = col.units[name]
        ba = bland_altman(pred, true)
        metrics[f"{name}_mae"] = mae(pred, true)
        metrics[f"{name}_rmse"] = rmse(pred, true)
        metrics[f"{name}_bias"] = ba.bias
        metrics[f"{name}_loa_lower"] = ba.lower
        metrics[f"{name}_loa_upper"] = ba.upper
        details[name] = {"unit": unit, "n": ba.n, "bland_altman": dataclasses.asdict(ba)}
        if ba.n >= 2:
            figures += fig.draw(f"bland_altman_{name}", figs.plot_bland_altman, pred, true, unit=unit)
    if col.counted_on_lesion:
        share = _cat(col.counted_on_lesion)
        # The count head's map is the measurement: how much of what it counted lies on the drawn lesion.
        metrics["counted_area_on_lesion_share"] = _nanmean(share)
        # What the mask's own tile fractions score: the tiles' blockiness alone keeps this below 1.
        metrics["counted_area_on_lesion_share_ceiling"] = _nanmean(_cat(col.counted_on_lesion_ceiling))
    if col.keep_counted:
        n = sum(m.shape[0] for m in col.keep_counted)
        x = _cat(col.keep_x)[:n]
        titles = []
        for i in range(n):
            parts = [f"{name}: {float(_cat(col.measured[name])[i]):.1f} {col.units[name]}\n"
                     f"(true {float(_cat(col.truth[name])[i]):.1f})" for name in col.measured]
            titles.append("\n".join(parts) or "counted lesion fraction")
        if n and len(x) == n:
            figures += fig.draw("measurement_maps", figs.plot_examples, list(x), list(_cat(col.keep_counted)), titles,
                                crop=fig.image_crop)
    if explain_values is not None:
        invariance = _spacing_invariance(col, model, ds, limits, explain_values)
        if invariance is None:
            limitations.append("Spacing invariance was not measured: these data cannot re-render a case at another spacing.")
        else:
            details["spacing_invariance"] = invariance
            for name, rec in invariance["quantities"].items():
                metrics[f"{name}_spacing_invariance_mean_abs_diff"] = rec["model_mean_abs_diff"]
                metrics[f"{name}_spacing_invariance_truth_diff"] = rec["truth_mean_abs_diff"]
    block = element(True, metrics=metrics, figures=figures, does_not_show=does_not_show)
    block["details"] = details
    return block, limitations


def _spacing_invariance(col: _Collected, model: Any, ds: Dataset, limits: EvaluationLimits,
                        explain_values: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]) -> dict[str, Any] | None:
    """Render the same objects at the data set's smallest and largest spacing; compare the predictions.

    Each rendering is fed at its own spacing; the result is the mean |difference| of the predicted
    quantity between the two renderings, in the quantity's unit, beside the same difference of the
    ground truth (which moves a little with the rasterisation).
    """
    base = _base_dataset(ds)
    if not callable(getattr(base, "render", None)) or not col.keep_spacing:
        return None
    rendered = getattr(base, "spacing_range", None) or getattr(getattr(base, "config", None), "spacing_range", (0.5, 1.0))
    lo, hi = (float(v) for v in rendered)
    if lo == hi:
        lo, hi = lo, 2 * lo
    native = _cat(col.keep_spacing)
    indices = col.keep_index[: limits.spacing_cases]
    pred: dict[str, list[torch.Tensor]] = {}
    truth: dict[str, list[torch.Tensor]] = {}
    for s in (lo, hi):
        samples = []
        for j, idx in enumerate(indices):
            sp = [s] * native.shape[1]
            if native.shape[1] == 3:
                sp[0] = float(native[j, 0])  # slice spacing kept: in-plane resampling only
            samples.append(base.render(idx, sp))
        images = torch.stack([smp["image"] for smp in samples]).float()
        spacing = torch.stack([torch.as_tensor(smp["spacing"], dtype=torch.float32) for smp in samples])
        values = explain_values(model.input_spec.intensity(images), spacing)
        for name, v in values.items():
            if name in samples[0]["measurements"]:
                pred.setdefault(name, []).append(v.double().cpu())
                truth.setdefault(name, []).append(torch.tensor([float(smp["measurements"][name]) for smp in samples],
                                                               dtype=torch.float64))
    out = {"spacings_mm": [lo, hi], "n_cases": len(indices), "quantities": {}}
    for name in pred:
        a, b = pred[name]
        ta, tb = truth[name]
        out["quantities"][name] = {"model_mean_abs_diff": float((a - b).abs().mean()),
                                   # a case without a finding (a normal film) has no true size
                                   "truth_mean_abs_diff": _nanmean((ta - tb).abs())}
    return out


def _localization_block(col: _Collected, what_map: str, does_not_show: str,
                        tp_mask: torch.Tensor | None, ctx: _Context | None = None) -> dict[str, Any]:
    if not col.masks_seen:
        block = _not_applicable("not applicable: these data carry no lesion masks to compare the maps with", does_not_show)
        block["details"] = {"map": what_map}  # what another, annotated data set would score
        return block
    ap, pg = _cat(col.ap), _cat(col.pg)
    annotated = torch.isfinite(ap)
    if not annotated.any():
        return _not_applicable("not applicable: no evaluated case has a non-empty lesion mask", does_not_show)
    ceiling = _cat(col.ap_ceiling)
    metrics = {
        "activation_precision_top5pct": _nanmean(ap),
        # A perfect map (the mask itself) scores below 1 on lesions smaller than the top 5% of the image.
        "activation_precision_top5pct_ceiling": _nanmean(ceiling),
        "pointing_game": _nanmean(pg),
        "cases_with_mask": int(annotated.sum()),
    }
    if tp_mask is not None:
        tp = tp_mask & annotated
        metrics["true_positives_with_map_on_lesion_share"] = float((ap[tp] >= 0.5).double().mean()) if tp.any() else math.nan
        metrics["true_positives_activation_precision_top5pct"] = _nanmean(ap[tp]) if tp.any() else math.nan
        metrics["true_positives_activation_precision_top5pct_ceiling"] = _nanmean(ceiling[tp]) if tp.any() else math.nan
        metrics["true_positives_with_mask"] = int(tp.sum())
    block = element(True, metrics=metrics, does_not_show=does_not_show)
    block["details"] = {"map": what_map, "q": 0.05}
    if ctx is not None and col.control_ap and len(col.loc_groups) == len(ap):
        groups = np.asarray(col.loc_groups)
        block["evidence"] = compare("activation precision (top 5%)", ap, {k: _cat(v) for k, v in col.control_ap.items()},
                                    groups, n_boot=ctx.n_boot, seed=ctx.seed)
        block["evidence_pointing_game"] = compare("pointing game", pg, {k: _cat(v) for k, v in col.control_pg.items()},
                                                  groups, n_boot=ctx.n_boot, seed=ctx.seed)
    return block


def _instance_localization_block(col: _Collected, ctx: _Context, does_not_show: str) -> dict[str, Any]:
    """Localization of a bag model's instance scores against the bags' instance labels, beside the controls.

    Per bag, the instance AUROC of the scores is compared with that of each control collected in the
    same pass (bag-constant, uniform attention, an untrained copy, and the per-instance data controls
    a bag data set supplies) as a paired bootstrap over patients. Pooled over bags, instance AUROC
    also rewards ranking *bags* (positive instances live in positive bags), so it is stated beside the
    bag-constant control's pooled AUROC; the verdict uses the AUROC inside each bag, where a
    bag-constant score is exactly 0.5.
    """
    res = instance_auroc(_cat(col.inst_scores)[None], _cat(col.inst_labels)[None])
    figures = []
    if col.heatmap is not None:
        grid, kind = col.heatmap
        figures = ctx.figures.draw("mil_heatmap", figs.plot_heatmap, grid, title=f"instance {kind} (one bag)",
                                   xlabel="tile column", ylabel="tile row", colorbar_label=f"normalised {kind}")
        if col.heatmap_truth is not None:
            figures += ctx.figures.draw("mil_heatmap_truth", figs.plot_heatmap, col.heatmap_truth,
                                        title="instance truth (the same bag)", xlabel="tile column", ylabel="tile row",
                                        colorbar_label="1: holds the finding")
    pooled_control = instance_auroc(_cat(col.inst_bag_scores)[None], _cat(col.inst_labels)[None])
    per_bag = {k: np.asarray(v, dtype=np.float64) for k, v in col.per_bag_auroc.items()}
    defined = np.isfinite(per_bag["model"])
    metrics = {"instance_auroc_per_bag_mean": float(per_bag["model"][defined].mean()) if defined.any() else math.nan,
               "bags_with_both_instance_classes": int(defined.sum()),
               "instance_auroc_pooled": res["auroc"], "instance_auroc_pooled_bag_constant_control": pooled_control["auroc"],
               "instance_ap": res["ap"], "instances": res["n_instances"]}
    block = element(True, metrics=metrics, figures=figures, does_not_show=does_not_show)
    if defined.any():
        block["evidence"] = compare(
            "instance AUROC within each bag", per_bag["model"], {k: v for k, v in per_bag.items() if k != "model"},
            np.asarray(col.per_bag_groups), n_boot=ctx.n_boot, seed=ctx.seed)
    hits = {k: np.asarray(v, dtype=np.float64) for k, v in col.per_bag_top_hit.items()}
    hit_defined = np.isfinite(hits["model"]) if "model" in hits else np.zeros(0, dtype=bool)
    if hit_defined.any():
        metrics["top_instance_hit_rate"] = float(hits["model"][hit_defined].mean())
        metrics["bags_with_a_positive_instance"] = int(hit_defined.sum())
        # the lesion hit rate of the top tile, beside the same controls' top tiles (ties count at their share)
        block["evidence_top_instance_hit"] = compare(
            "top instance on the finding", hits["model"], {k: v for k, v in hits.items() if k != "model"},
            np.asarray(col.per_bag_groups), n_boot=ctx.n_boot, seed=ctx.seed)
    return block


def _transparency_block(col: _Collected, what: str, does_not_show: str) -> dict[str, Any]:
    nz, nd = np.asarray(col.size_nonzero), np.asarray(col.size_needed)
    metrics = {
        "decomposition_error_max": col.decomposition,
        "explanation_terms": col.num_terms,
        "nonzero_terms_mean": float(nz.mean()) if nz.size else math.nan,
        "terms_for_90pct_of_positive_evidence_mean": float(nd.mean()) if nd.size else math.nan,
        "terms_for_90pct_of_positive_evidence_median": float(np.median(nd)) if nd.size else math.nan,
    }
    block = element(True, metrics=metrics, does_not_show=does_not_show)
    block["details"] = {"terms": what, "decomposition_error_unit": "logit"}
    return block


def _deletion(model: Any, col: _Collected, limits: EvaluationLimits, seed: int, fig: _Figures, what_map: str,
              does_not_show: str, ctx: _Context | None = None) -> dict[str, Any]:
    """Deletion curves of the kept cases: the map's order against a random order; the gap is
    ``AUC(random) - AUC(attribution)`` (:func:`faithfulness_gap`'s definition, on all kept cases)."""
    n = min(limits.deletion_cases, sum(m.shape[0] for m in col.keep_maps))
    if n == 0:
        return _not_applicable("not applicable: no case was evaluated", does_not_show)
    x, maps = _cat(col.keep_x)[:n], _cat(col.keep_maps)[:n]
    baseline = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)  # (B, 1, ...) each image's mean value
    scorer = model
    if col.keep_spacing and sum(s.shape[0] for s in col.keep_spacing) >= n:
        # the cases' own spacing, for models whose decision uses it (a CBM that resamples its input)
        spacing = _cat(col.keep_spacing)[:n]

        def scorer(z: torch.Tensor) -> torch.Tensor:
            return model.explain(z, spacing=spacing).logits

    with torch.no_grad():
        target = scorer(x).argmax(-1)
    curves = {order: deletion_curve(scorer, x, maps, steps=limits.deletion_steps, baseline=baseline, class_index=target,
                                    order=order, seed=seed) for order in ("attribution", "random")}
    block = _faithfulness_from_curves(curves["attribution"], curves["random"], fig, what_map, does_not_show, "pixels")
    if ctx is None:
        return block
    # Controls: the same deletion along orders that need no model. A lower per-case AUC is better
    # (the tracked score falls sooner); each case's curve is integrated with the same trapezoid rule.
    controls = {"random order": _per_case_auc(curves["random"])}
    prior = ctx.reference.prior if ctx.reference is not None else None
    if prior is not None and tuple(prior.shape) == tuple(maps.shape[1:]):
        centre = deletion_curve(scorer, x, prior.expand(maps.shape), steps=limits.deletion_steps, baseline=baseline,
                                class_index=target, order="attribution", seed=seed)
        controls["centre-prior order"] = _per_case_auc(centre)
        block["metrics"]["deletion_auc_centre_prior"] = centre.auc
        block["details"]["centre_prior"] = centre.to_dict()
    groups = col.case_groups()[:n]  # the kept cases are the first n of the split
    block["evidence"] = compare("deletion AUC (lower: the map finds what the decision uses)",
                                _per_case_auc(curves["attribution"]), controls, groups,
                                higher_is_better=False, n_boot=ctx.n_boot, seed=ctx.seed)
    return block


def _per_case_auc(curve: Curve) -> np.ndarray:
    """(B,) area under each case's curve (trapezoid over the curve's fractions)."""
    return torch.trapezoid(curve.per_case.double(), curve.fractions.double(), dim=-1).numpy()


def _faithfulness_from_curves(attributed: Curve, random: Curve, fig: _Figures, what: str, does_not_show: str,
                              unit: str) -> dict[str, Any]:
    figures = fig.draw("deletion_curve", figs.plot_deletion, {f"{what} order": attributed, "random order": random})
    metrics = {
        "deletion_auc_attribution": attributed.auc,
        "deletion_auc_random": random.auc,
        "faithfulness_gap": random.auc - attributed.auc,
        "score_full_input": float(attributed.scores[0]),
        "cases": int(attributed.per_case.shape[0]),
    }
    block = element(True, metrics=metrics, figures=figures, does_not_show=does_not_show)
    block["details"] = {"order": what, "removed": unit, "score": attributed.score,
                        "replacement": "each image's mean value" if unit == "pixels" else "instance masked out",
                        "attribution": attributed.to_dict(),
                        "random": random.to_dict()}
    return block


def _examples(col: _Collected, model: Any, labels: torch.Tensor, probs: torch.Tensor, fig: _Figures, map_name: str,
              limits: EvaluationLimits) -> list[str]:
    n = min(limits.examples, sum(m.shape[0] for m in col.keep_maps))
    if n == 0:
        return []
    x, maps = _cat(col.keep_x)[:n], _cat(col.keep_maps)[:n]
    names = model.label_names
    titles = [f"label {names[int(labels[i])]}; p({names[int(probs[i].argmax())]}) = {float(probs[i].max()):.2f}\n"
              f"overlay: {map_name} map" for i in range(n)]
    return fig.draw("examples", figs.plot_examples, list(x), list(maps), titles, crop=fig.image_crop)


# ---------------------------------------------------------------------------------------------
# helpers shared by the family sections
# ---------------------------------------------------------------------------------------------
def _tp_mask(labels: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> torch.Tensor:
    correct = labels == predicted
    return correct & (labels == 1) if num_classes == 2 else correct


def _examples_into(out: dict[str, Any], col: _Collected, model: Any, labels: torch.Tensor, probs: torch.Tensor,
                   ctx: _Context, map_name: str) -> None:
    figures = _examples(col, model, labels, probs, ctx.figures, map_name, ctx.limits)
    if figures and out["localization"]["applicable"]:
        out["localization"]["figures"] += figures


def _measure_fn(model: Any) -> Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]] | None:
    if not model.config.quantities:
        return None

    def values(x: torch.Tensor, spacing: torch.Tensor) -> dict[str, torch.Tensor]:
        exp = model.explain(x, spacing=spacing)
        return {name: torch.as_tensor(m.value) for name, m in exp.measurements.items()}

    return values
