"""The measurement-bottleneck section of an evaluation (:mod:`mlmi_zoo.evaluation` imports it on use).

* localization: the lesion map, by the shared block (activation precision and pointing game beside
  the controls); on IDRiD, where the graded photographs have no masks, on the segmentation test
  photographs (``localization_data``), plus the pixel-level average precision (AUPR) of the map
  against the specialists' exudate masks within the field of view, beside a bright-pixel map that
  needs no learning and the masks' prevalence (a uniform map);
* physical attribution: the landmark's error in the rule's unit beside the training-mean landmark;
  on the segmentation test photographs, the lesion area and the landmark-to-nearest-lesion distance
  against the masks (Bland–Altman; the landmark is the model's for both, as those photographs have
  none), and the grade the rule gives from the map against the grade it gives from the mask;
* transparency: every decision recomputed from its measured distance by the published rule, at the
  model's and at moved thresholds and radii (an exact test);
* actionability: the landmark corrected to the truth on every evaluated case, accuracy before and after;
* faithfulness: deletion along the lesion map, beside a random order.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from mlmi_zoo.evaluation import figures as figs
from mlmi_zoo.evaluation._collect import _Collected
from mlmi_zoo.evaluation._common import _base_dataset, _cat, _Context, _nanmean
from mlmi_zoo.evaluation._elements import _deletion, _examples_into, _localization_block, _not_applicable
from mlmi_zoo.evaluation._evidence_blocks import inputs_for_switch_off
from mlmi_zoo.evaluation.evidence import compare, exact_check
from mlmi_zoo.evaluation.lesion_maps import pixel_ap
from mlmi_zoo.evaluation.physical import bland_altman, mae
from mlmi_zoo.evaluation.results import element

MAP = "lesion map (probability that a latent cell holds the lesion)"
MOVED_RULES = ((None, None), (0.3, None), (0.7, None), (None, 0.5), (None, 2.0))  # (threshold, radius) checked


def _measurement(model: Any, col: _Collected, ctx: _Context) -> dict[str, Any]:
    logits, labels = _cat(col.logits), _cat(col.labels)
    out: dict[str, Any] = {}
    out["localization"] = _localization_block(
        col, MAP, "Overlap with the specialists' masks shows where the map marks lesion, not that every marked "
        "cell is one lesion the grade depends on.", None, ctx)
    out["visual_recognizability"] = _not_applicable(
        "not applicable: the model has no prototypes or learnt concepts to recognise; what it reads is a lesion map "
        "(scored under localization) and measurements (scored under physical attribution)")
    annotated = _annotated_pass(model, ctx)
    out["physical_attribution"] = _physical(model, col, ctx, annotated)
    if annotated is not None:  # kept when the evaluation scores the maps on the annotated set (localization_data)
        out["localization"].setdefault("details", {})["pixel_aupr"] = annotated["aupr"]
        out["localization"]["evidence_pixel_aupr"] = annotated["aupr"]["evidence"]
    out["transparency"] = _transparency(model, col, ctx)
    out["actionability"] = _landmark_correction(model, ctx)
    ctx.faithfulness = _deletion(model, col, ctx.limits, ctx.seed, ctx.figures, "lesion-map",
                                 "A faithful map shows what the decision uses, not that it is what a grader would use.",
                                 ctx)
    _examples_into(out, col, model, labels, logits.softmax(-1), ctx, "lesion")
    return out


# ---------------------------------------------------------------------------------------------
# the annotated photographs (IDRiD's segmentation test part)
# ---------------------------------------------------------------------------------------------
def _exudate_set(ctx: _Context, split: str) -> Any:
    """A split of the IDRiD segmentation photographs with their exudate masks, or None for other data."""
    if ctx.spec.kind != "idrid":
        return None
    from mlmi_zoo.training.data_spec import DataSpec, build_dataset

    params = {k: v for k, v in ctx.spec.params.items() if k in ("root", "size")}
    return build_dataset(DataSpec("idrid", {**params, "dataset": "segmentation", "union": "EX"}), split)


def _mask_distance(mask: torch.Tensor, xy: torch.Tensor, spacing: torch.Tensor) -> float:
    """Distance from ``xy`` to the nearest pixel of ``mask`` (H, W) in the spacing's unit; NaN for an empty mask."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if ys.numel() == 0:
        return math.nan
    d = torch.sqrt(((xs.float() - xy[0]) * spacing[1]) ** 2 + ((ys.float() - xy[1]) * spacing[0]) ** 2)
    return float(d.min())


def _rule_grade(distance: float, radius: float) -> int:
    return 0 if not math.isfinite(distance) else (2 if distance <= radius else 1)


def _annotated_pass(model: Any, ctx: _Context) -> dict[str, Any] | None:
    """The model on the segmentation test photographs: pixel AUPR, area, distance and grade against the masks."""
    data = _exudate_set(ctx, "test")
    if data is None:
        return None
    records: dict[str, list[Any]] = {k: [] for k in ("ap", "ap_bright", "ap_uniform", "area", "area_true", "d",
                                                      "d_true", "grade", "grade_true", "ids")}
    pooled: dict[str, list[np.ndarray]] = {"map": [], "bright": [], "truth": []}
    loader = DataLoader(data, batch_size=4, shuffle=False)
    with torch.no_grad():
        for batch in loader:
            x = model.input_spec.intensity(batch["image"].float())
            exp = model.explain(x, spacing=batch["spacing"])
            for i in range(x.shape[0]):
                if not bool(batch["annotated"][i, 0]):
                    continue
                fov = batch["fov"][i]
                mask = batch["mask"][i, 0] & fov
                score = exp.lesion_map[i, 0][fov].numpy()
                bright = batch["image"][i].mean(0)[fov].numpy()  # a bright-pixel map: no learning
                truth = mask[fov].numpy()
                pooled["map"].append(score)
                pooled["bright"].append(bright)
                pooled["truth"].append(truth)
                records["ap"].append(pixel_ap(score, truth))
                records["ap_bright"].append(pixel_ap(bright, truth))
                records["ap_uniform"].append(float(truth.mean()) if truth.any() else math.nan)
                records["area"].append(float(exp.area[i]))
                records["area_true"].append(float(batch["measurements"]["ex_area_dd2"][i]))
                d = float(exp.distance[i])
                d_true = _mask_distance(mask, exp.landmark_xy[i], exp.spacing[i])
                records["d"].append(d)
                records["d_true"].append(d_true)
                records["grade"].append(_rule_grade(d, exp.radius))
                records["grade_true"].append(_rule_grade(d_true, exp.radius))
                records["ids"].append(str(batch["patient_id"][i]))
    truth_all = np.concatenate(pooled["truth"])
    aupr = {
        "pooled_over_pixels": {"model": pixel_ap(np.concatenate(pooled["map"]), truth_all),
                               "bright_pixels": pixel_ap(np.concatenate(pooled["bright"]), truth_all),
                               "uniform": float(truth_all.mean())},
        "images": len(records["ids"]),
        "pixels": "every pixel of the field of view of each segmentation test photograph, at the evaluated size",
        "anchor": "IDRiD challenge, best hard-exudate AUPR 0.89 at full resolution by dedicated segmentation "
                  "networks (Porwal et al., Medical Image Analysis 2020)",
        "evidence": compare("per-image pixel AUPR of the lesion map against the exudate mask", np.array(records["ap"]),
                            {"bright pixels": np.array(records["ap_bright"]),
                             "uniform (the mask's prevalence)": np.array(records["ap_uniform"])},
                            np.array(records["ids"]), n_boot=ctx.n_boot, seed=ctx.seed),
    }
    return {"aupr": aupr, **{k: np.array(v) for k, v in records.items()}}


# ---------------------------------------------------------------------------------------------
# the elements
# ---------------------------------------------------------------------------------------------
def _landmark_reference(ctx: _Context) -> np.ndarray | None:
    """(2,) the mean training landmark position (a control that needs no image), or None."""
    train = ctx.train_dataset()
    positions = getattr(_base_dataset(train), "fovea_positions", None) if train is not None else None
    if positions is None:
        return None
    xy = np.asarray(positions(), dtype=np.float64)
    xy = xy[np.isfinite(xy).all(-1)]
    return xy.mean(0) if len(xy) else None


def _physical(model: Any, col: _Collected, ctx: _Context, annotated: dict[str, Any] | None) -> dict[str, Any]:
    unit = model.config.unit
    metrics: dict[str, Any] = {}
    details: dict[str, Any] = {}
    figures: list[str] = []
    evidence = None
    by_quantity: dict[str, Any] = {}
    if "fovea_x_px" in col.measured and "fovea_y_px" in col.measured:
        pred = torch.stack([_cat(col.measured["fovea_x_px"]), _cat(col.measured["fovea_y_px"])], -1).numpy()
        true = torch.stack([_cat(col.truth["fovea_x_px"]), _cat(col.truth["fovea_y_px"])], -1).numpy()
        spacing = np.asarray(model.config.spacing, dtype=np.float64)[::-1]  # (dx, dy) per pixel
        error = np.sqrt((((pred - true) * spacing) ** 2).sum(-1))
        metrics[f"landmark_error_{unit.lower()}_mean"] = _nanmean(error)
        metrics[f"landmark_error_{unit.lower()}_median"] = float(np.nanmedian(error))
        metrics["landmark_within_0.25_share"] = float(np.mean(error <= 0.25))
        reference = _landmark_reference(ctx)
        controls = {}
        if reference is not None:
            controls["training-mean position"] = np.sqrt((((reference - true) * spacing) ** 2).sum(-1))
            metrics[f"landmark_error_{unit.lower()}_training_mean_position"] = _nanmean(controls["training-mean position"])
        if controls:
            evidence = compare(f"landmark (fovea) error ({unit})", error, controls, col.case_groups(),
                               higher_is_better=False, n_boot=ctx.n_boot, seed=ctx.seed)
            by_quantity["fovea_error"] = evidence
        details["landmark"] = {"cases": len(error), "unit": unit,
                               "spacing": "the canonical spacing (the median disc diameter) for every case"}
    if annotated is not None and len(annotated["ids"]):
        area, area_true = annotated["area"], annotated["area_true"]
        ba = bland_altman(area, area_true)
        metrics.update({f"ex_area_{unit.lower()}2_mae": mae(torch.as_tensor(area), torch.as_tensor(area_true)),
                        f"ex_area_{unit.lower()}2_bias": ba.bias, f"ex_area_{unit.lower()}2_loa_lower": ba.lower,
                        f"ex_area_{unit.lower()}2_loa_upper": ba.upper})
        details["ex_area"] = {"unit": f"{unit}^2", "n": ba.n, "bland_altman": ba.__dict__,
                              "truth": "the specialists' exudate mask at full resolution, in the photograph's own DD"}
        figures += ctx.figures.draw("bland_altman_ex_area", figs.plot_bland_altman, area, area_true, unit=f"{unit}^2")
        d, d_true = annotated["d"], annotated["d_true"]
        both = np.isfinite(d) & np.isfinite(d_true)
        dba = bland_altman(d, d_true)
        metrics.update({f"ex_fovea_distance_{unit.lower()}_bias": dba.bias,
                        f"ex_fovea_distance_{unit.lower()}_loa_lower": dba.lower,
                        f"ex_fovea_distance_{unit.lower()}_loa_upper": dba.upper,
                        f"ex_fovea_distance_{unit.lower()}_mae": float(np.abs(d[both] - d_true[both]).mean())
                        if both.any() else math.nan})
        details["ex_fovea_distance"] = {
            "unit": unit, "n": dba.n, "bland_altman": dba.__dict__,
            "truth": "distance from the model's fovea to the nearest pixel of the exudate mask (these photographs "
                     "have no fovea position), against the distance to the nearest lesion cell of the map"}
        if dba.n >= 2:
            figures += ctx.figures.draw("bland_altman_ex_fovea_distance", figs.plot_bland_altman, d[both], d_true[both],
                                        unit=unit)
        grade, grade_true = annotated["grade"], annotated["grade_true"]
        metrics["grade_from_map_equals_grade_from_mask_share"] = float(np.mean(grade == grade_true))
        details["grade_from_map_vs_mask"] = {
            "confusion": [[int(np.sum((grade_true == a) & (grade == b))) for b in range(3)] for a in range(3)],
            "rows": "grade by the rule from the mask", "columns": "grade by the rule from the map",
            "fovea": "the model's, for both"}
        # the area against the training mean (a control that needs no image)
        train_area = _train_area(ctx)
        if train_area is not None:
            by_quantity["ex_area"] = compare(f"absolute error of the exudate area ({unit}^2)", np.abs(area - area_true),
                                             {"training mean": np.abs(train_area - area_true)}, annotated["ids"],
                                             higher_is_better=False, n_boot=ctx.n_boot, seed=ctx.seed)
    if not metrics:
        return _not_applicable("not applicable: these data carry neither a landmark position nor lesion masks",
                               "")
    block = element(True, metrics=metrics, figures=figures, does_not_show=(
        "Agreement in DD rests on the median disc diameter for the graded photographs (about +-12% per eye); it "
        "does not show agreement on another camera or field angle."))
    block["details"] = details
    if evidence is not None or by_quantity:
        block["evidence"] = evidence if evidence is not None else next(iter(by_quantity.values()))
        block["evidence_by_quantity"] = by_quantity
    return block


def _train_area(ctx: _Context) -> float | None:
    """The mean exudate area of the segmentation training photographs (DD^2), or None."""
    train = _exudate_set(ctx, "train")
    if train is None:
        return None
    return _nanmean([float(train[i]["measurements"]["ex_area_dd2"]) for i in range(len(train))])


def _transparency(model: Any, col: _Collected, ctx: _Context) -> dict[str, Any]:
    worst, checks = 0.0, 0
    spacing = torch.as_tensor(model.config.spacing, dtype=torch.float32) if model.config.spacing else None
    for x in inputs_for_switch_off(col, 16, ctx.seed):
        for threshold, radius in MOVED_RULES:
            with torch.no_grad():
                exp = model.explain(x, spacing=spacing, threshold=threshold, radius=radius)
            mismatch = (exp.logits.argmax(-1) != exp.rule()).double()
            worst = max(worst, float(mismatch.max()))
            checks += int(mismatch.numel())
    block = element(True, metrics={"decomposition_error_max": col.decomposition, "rule_mismatches_max": worst,
                                   "rule_checks": checks, "explanation_terms": 2}, does_not_show=(
        "That the decision is the definition applied to the measurement shows how the grade follows from the map and "
        "the landmark, not that the map found every exudate."))
    block["details"] = {"terms": "lesion anywhere; lesion within the radius of the landmark",
                        "rules_checked": [{"threshold": t if t is not None else model.config.threshold,
                                           "radius": r if r is not None else model.config.radius} for t, r in MOVED_RULES]}
    block["evidence"] = exact_check(
        "the decision recomputed from the measured distance by the published rule", worst, 0.0, checks,
        "each decision recomputed from its measured distance (none; beyond; within the radius), at the model's and at "
        "moved thresholds and radii, on evaluated and on random inputs")
    return block


def _landmark_correction(model: Any, ctx: _Context) -> dict[str, Any]:
    """Accuracy with the predicted landmark and with the true one, on the same cases."""
    before, after, groups = [], [], []
    loader = DataLoader(ctx.dataset, batch_size=ctx.batch_size, shuffle=False, collate_fn=ctx.collate)
    with torch.no_grad():
        for batch in loader:
            if "fovea_xy" not in batch:
                return _not_applicable("not applicable: these data carry no landmark position to correct the model's with")
            x = model.input_spec.intensity(batch["image"].float())
            spacing = batch.get("spacing")
            labels = torch.as_tensor(batch["label"]).reshape(-1)
            own = model.explain(x, spacing=spacing)
            fixed = model.explain(x, spacing=spacing, landmark_xy=batch["fovea_xy"].float())
            before.append((own.logits.argmax(-1) == labels).double())
            after.append((fixed.logits.argmax(-1) == labels).double())
            groups += [str(p) for p in batch["patient_id"]]
    b, a = torch.cat(before).numpy(), torch.cat(after).numpy()
    metrics = {"accuracy": float(b.mean()), "accuracy_true_landmark": float(a.mean()),
               "errors_fixed": int(((b == 0) & (a == 1)).sum()), "errors_introduced": int(((b == 1) & (a == 0)).sum())}
    block = element(True, metrics=metrics, does_not_show=(
        "Correcting the fovea shows what a grader's click changes, not what correcting the exudate map would."))
    block["details"] = {"action": "the fovea replaced by the graders' fovea position; the rule reapplied"}
    block["evidence"] = compare("accuracy after correcting the fovea", a, {"no correction": b}, np.array(groups),
                                n_boot=ctx.n_boot, seed=ctx.seed)
    return block
