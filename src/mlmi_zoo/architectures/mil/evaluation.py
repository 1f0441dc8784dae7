"""The MIL section of an evaluation (attention and additive MIL): its five elements and faithfulness.

Instance AUROC of the instance scores against tile labels with a slide heatmap, the tumour share
of the top instances, tumour area agreement, the exact decomposition (additive MIL only), the
effect of excluding the top instances, and instance deletion curves collected by the bag pass.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from mlmi_zoo.evaluation._collect import _Collected
from mlmi_zoo.evaluation._common import _cat, _Context
from mlmi_zoo.evaluation._elements import (
    _faithfulness_from_curves,
    _instance_localization_block,
    _not_applicable,
    _per_case_auc,
    _physical_block,
    _transparency_block,
)
from mlmi_zoo.evaluation.evidence import compare
from mlmi_zoo.evaluation.faithfulness import Curve
from mlmi_zoo.evaluation.results import element
from mlmi_zoo.families import family_of


def _mil(model: Any, col: _Collected, ctx: _Context) -> dict[str, Any]:
    additive = family_of(model).instance_scores == "contributions"
    scores_name = "contribution to the positive class" if additive else "attention score (pre-softmax)"
    out: dict[str, Any] = {}
    loc_dns = (f"A high instance AUROC shows that the {scores_name} ranks tumour tiles first, not that every tumour "
               "region of a slide is found.")
    if col.inst_scores:
        out["localization"] = _instance_localization_block(col, ctx, loc_dns)
        share = np.asarray(col.topk_share)
        out["visual_recognizability"] = element(
            True, metrics={f"top{ctx.limits.top_instances}_tumour_share": float(share.mean()) if share.size else math.nan,
                           "positive_bags": int(share.size)},
            does_not_show="A tumour-rich top list shows the evidence tiles are tumour, not that a pathologist would "
                          "accept the tiles as diagnostic.")
    else:
        reason = "not applicable: these bags carry no instance labels"
        out["localization"] = _not_applicable(reason, loc_dns)
        out["visual_recognizability"] = _not_applicable(reason, "")
    out["physical_attribution"], lim = _physical_block(
        col, model, ctx.dataset, ctx.limits, ctx.figures, None,
        "Area agreement at the configured microns per pixel does not show agreement at other magnifications or stains.",
        "the model has no area head or the bags carry no reference area")
    ctx.limitations += lim
    if out["physical_attribution"]["applicable"]:
        for name in col.measured:
            pred, true = _cat(col.measured[name]), _cat(col.truth[name])
            positive = true > 0
            rel = ((pred - true).abs() / true)[positive]
            out["physical_attribution"]["metrics"][f"{name}_relative_error_positive_bags"] = float(rel.mean()) if rel.numel() else math.nan
    if additive:
        out["transparency"] = _transparency_block(
            col, "per-instance contribution to the class, one term per tile",
            "Exact per-tile contributions show how tiles add up, not why the instance classifier scores a tile high.")
    else:
        out["transparency"] = _not_applicable(
            "not applicable: attention weights are not an exact decomposition of the logit (the classifier acts on the "
            "pooled embedding)", "Attention shows where the model pooled from, not how much each tile moved the logit.")
    delta, flipped = _cat(col.exclusion_delta), _cat(col.exclusion_flipped)
    out["actionability"] = element(True, metrics={
        "mean_logit_change_top_instances_excluded": float(delta.mean()),
        "positive_bags_flipped_share": float(flipped.double().mean()) if flipped.numel() else math.nan,
        "positive_bags_predicted": int(flipped.numel()),
    }, does_not_show="Excluding tiles shows how the decision rests on them, not that the remaining tiles are benign.")
    out["actionability"]["details"] = {"k": f"min({ctx.limits.top_instances}, valid instances - 1)", "ranked_by": scores_name}
    # acting on the explanation against acting at random: the same number of tiles, drawn uniformly (seeded)
    out["actionability"]["evidence"] = compare(
        "logit of the predicted class lost when its top-k tiles are excluded", (-delta).double().numpy(),
        {"random_k_tiles": (-_cat(col.exclusion_delta_random)).double().numpy()}, col.case_groups(),
        n_boot=ctx.n_boot, seed=ctx.seed)
    if col.curves:
        fractions = col.curve_fractions
        if fractions is None:
            raise RuntimeError("the collection pass kept instance deletion curves but not their fractions")
        per = {o: torch.cat(v) for o, v in col.curves.items()}
        curves = {o: Curve(fractions, p.mean(0), p, "instance_deletion", o, "probability") for o, p in per.items()}
        ctx.faithfulness = _faithfulness_from_curves(curves["attribution"], curves["random"], ctx.figures, scores_name,
                                                     f"A faithful {scores_name} shows what the model uses, not what a "
                                                     "pathologist would look at.", "instances")
        n = per["attribution"].shape[0]
        ctx.faithfulness["evidence"] = compare(
            "instance deletion AUC (lower: the scores find what the decision uses)", _per_case_auc(curves["attribution"]),
            {"random order": _per_case_auc(curves["random"])}, col.case_groups()[:n], higher_is_better=False,
            n_boot=ctx.n_boot, seed=ctx.seed)
    return out
