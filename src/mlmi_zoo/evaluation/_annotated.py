"""Localization scored on another, annotated data set where the evaluated split has no truth of its own.

Images: the maps the evaluation reads everywhere, scored against the annotated set's test-split masks
(IDRiD's segmentation photographs for a model graded on IDRiD's grading photographs). Bags: the
instance scores, scored within each bag of an annotated bag set whose instances carry truth, per
finding where the set offers one subset per finding, and the share of finding tiles among each bag's
top tiles.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader

from mlmi_zoo.evaluation._collect import _run_bags, _run_images
from mlmi_zoo.evaluation._common import _Context
from mlmi_zoo.evaluation._data import data_spec_to_text, load_data_spec
from mlmi_zoo.evaluation._elements import _instance_localization_block, _localization_block
from mlmi_zoo.evaluation._reference import _ImageControls, training_reference
from mlmi_zoo.evaluation.evidence import compare
from mlmi_zoo.evaluation.results import element
from mlmi_zoo.training.data_spec import DataSpec, build_dataset, collate_for, describe

__all__ = ["annotated_localization", "annotated_bag_localization", "annotated_test_set"]


class _MaskOnly(torch.utils.data.Dataset):
    """The fields a localization pass reads from an annotated set: image, mask, patient, index.

    The annotated set need not carry the task's labels (a segmentation set has none), nor its
    measurements or concepts; its label is set to -1 so that nothing reads it as a class.
    """

    KEEP = ("image", "mask", "patient_id", "index", "fov", "breast")  # fov / breast: foreground masks

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = self.dataset[i]
        out = {k: sample[k] for k in self.KEEP if k in sample}
        out["label"] = torch.tensor(-1, dtype=torch.int64)
        return out


def annotated_test_set(data: DataSpec | str | Path | Mapping[str, Any]) -> tuple[DataSpec, Any]:
    """The spec of an annotated set and its test split, reduced to image, masks, patient and index
    (label -1)."""
    spec = load_data_spec(data)
    return spec, _MaskOnly(build_dataset(spec, "test"))


def annotated_localization(model: Any, ctx: _Context, data: DataSpec | str | Path | Mapping[str, Any],
                            what_map: str, does_not_show: str) -> tuple[dict[str, Any], Any]:
    """Localization on another data set that has lesion masks where the evaluated split has none.

    The maps are the ones the evaluation reads everywhere (the top contribution to the predicted
    class), scored against the annotated set's test-split masks beside the same controls; the
    centre prior is fitted on the annotated set's training split. Returns the localization block
    and the collected pass (for the cascading randomisation on these images).
    """
    spec, annotated = annotated_test_set(data)
    train = build_dataset(spec, "train") if spec.size_of("train") != 0 else None
    actx = dataclasses.replace(ctx, spec=spec, train_spec=None, split="test", dataset=annotated, limitations=[])
    actx.train_dataset = (lambda: _MaskOnly(train) if train is not None else None)  # type: ignore[method-assign]
    actx.reference = training_reference(model, actx, ctx.limits.control_train_cases)
    loader = DataLoader(annotated, batch_size=ctx.batch_size, shuffle=False, collate_fn=ctx.collate)
    with torch.no_grad():
        col = _run_images(model, loader, ctx.limits, _ImageControls(model, actx.reference, ctx.seed))
    block = _localization_block(col, what_map, does_not_show, None, actx)
    if block.get("applicable"):
        desc = describe(spec)
        block["details"]["annotated_data"] = {
            "spec": data_spec_to_text(spec), "source": desc.get("source"), "split": "test", "cases": len(annotated),
            "centre_prior_from": f"{len(train) if train is not None else 0} training cases of the same set",
            "why": "the evaluated split has no lesion masks; the maps are scored on this annotated set instead"}
    return block, col


def annotated_bag_localization(model: Any, ctx: _Context, data: DataSpec | str | Path | Mapping[str, Any],
                                does_not_show: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Localization and recognizability of a bag model on another bag set whose instances carry truth.

    The instance scores the family's section reads (attention scores, or each instance's contribution
    to the positive class) are scored within each bag of the annotated set's test split beside the
    same controls as in :func:`~mlmi_zoo.evaluation._elements._instance_localization_block`. The share
    of finding tiles among each bag's top-k tiles is compared with the share among all its tiles (what
    k tiles drawn at random hold on average), on the bags that hold a finding. Returns both blocks.
    """
    spec = load_data_spec(data)
    annotated = build_dataset(spec, "test")
    loader = DataLoader(annotated, batch_size=ctx.batch_size, shuffle=False, collate_fn=collate_for(spec))
    actx = dataclasses.replace(ctx, spec=spec, train_spec=None, split="test", dataset=annotated, limitations=[])
    with torch.no_grad():
        col = _run_bags(model, loader, ctx.limits, ctx.seed)
    if not col.inst_scores:
        raise ValueError(f"localization_data {data_spec_to_text(spec)!r} carries no instance labels in its test split; "
                         "a bag model's localization needs bags with instance truth")
    block = _instance_localization_block(col, actx, does_not_show)
    record = {"spec": data_spec_to_text(spec), "source": describe(spec).get("source"), "split": "test",
              "cases": len(annotated),
              "why": "the evaluated bags carry no instance labels; the instance scores are scored on this annotated set"}
    block["details"] = {"annotated_data": record}
    # per finding, when the annotated bags offer one set per finding: the same scores against that finding's tiles
    for finding, data_f in (getattr(annotated, "finding_sets", lambda: {})() or {}).items():
        loader_f = DataLoader(data_f, batch_size=ctx.batch_size, shuffle=False, collate_fn=collate_for(spec))
        with torch.no_grad():
            col_f = _run_bags(model, loader_f, ctx.limits, ctx.seed)
        per_bag = {k: np.asarray(v, dtype=np.float64) for k, v in col_f.per_bag_auroc.items()}
        if np.isfinite(per_bag["model"]).any():
            name = finding.replace("_", " ")
            block[f"evidence_{finding}"] = compare(
                f"instance AUROC within each bag, {name} tiles", per_bag["model"],
                {k: v for k, v in per_bag.items() if k != "model"}, np.asarray(col_f.per_bag_groups),
                n_boot=ctx.n_boot, seed=ctx.seed)
            ap, pointing, groups = _tile_ap_and_pointing(model, data_f)
            block[f"evidence_{finding}_aupr"] = compare(f"tile AUPR within each bag, {name} tiles", ap["model"],
                                                        {k: v for k, v in ap.items() if k != "model"}, groups,
                                                        n_boot=ctx.n_boot, seed=ctx.seed)
            block[f"evidence_{finding}_pointing"] = compare(
                f"pointing game: the top tile holds {name}", pointing["model"],
                {k: v for k, v in pointing.items() if k != "model"}, groups, n_boot=ctx.n_boot, seed=ctx.seed)
    truths = [torch.as_tensor(annotated[i]["instance_labels"]).double() for i in range(len(annotated))]
    holding = [i for i, t in enumerate(truths) if bool((t > 0).any())]  # the bags col.topk_share covers, in order
    k = ctx.limits.top_instances
    top, base = np.asarray(col.topk_share), np.asarray([float(truths[i].nanmean()) for i in holding])
    recognizability = element(True, metrics={f"top{k}_finding_share": float(top.mean()) if top.size else float("nan"),
                                             "all_tiles_finding_share": float(base.mean()) if base.size else float("nan"),
                                             "bags_holding_a_finding": int(top.size)},
                              does_not_show="A top list rich in annotated findings shows the evidence tiles hold "
                                            "findings, not that a specialist would accept them as the reason.")
    recognizability["details"] = {"annotated_data": record}
    if top.size:
        groups = [str(annotated[i]["patient_id"]) for i in holding]
        recognizability["evidence"] = compare(f"share of finding tiles among the top-{k} tiles", top,
                                              {"all tiles of the bag (k drawn at random, on average)": base}, groups,
                                              n_boot=ctx.n_boot, seed=ctx.seed)
    return block, recognizability


def _tile_ap_and_pointing(model: Any, bags: Any) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """Per bag, the tile AUPR and the pointing game of the model's instance scores and of the controls.

    The scores are those the family's section ranks instances by (attention scores, or each instance's
    contribution to the positive class, else to the predicted class); see :func:`_rank_metrics`.
    """
    from mlmi_zoo.evaluation._common import _positive_class
    from mlmi_zoo.families import family_of

    additive = family_of(model).instance_scores == "contributions"
    scores = []
    for i in range(len(bags)):
        bag = bags[i]
        with torch.no_grad():
            exp = model.explain(torch.as_tensor(bag["feats"]).float()[None], coords=torch.as_tensor(bag["coords"])[None])
        if additive:
            pos = _positive_class(exp.logits.shape[1])
            target = int(exp.logits.argmax(-1)) if pos is None else pos
            scores.append(exp.contributions[0, :, target].double().numpy())
        else:
            scores.append(exp.attention_scores[0].double().numpy())
    return _rank_metrics(scores, [bags[i] for i in range(len(bags))])


def _rank_metrics(model_scores: list[np.ndarray], bags: list[Mapping[str, Any]]
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """Per bag, the tile AUPR (average precision) and the pointing game (the top tile is positive) of each score.

    The scores are the model's (one array per bag), the bag's per-instance data controls, and a uniform
    score, whose expected AUPR and pointing game are both the bag's share of positive tiles. A bag
    without a positive tile, or without a negative one for AUPR, is NaN. Returns ``(aupr, pointing,
    patient ids)``, the first two keyed ``"model"``, ``"uniform"`` and by control.
    """
    from sklearn.metrics import average_precision_score

    ap: dict[str, list[float]] = {}
    pointing: dict[str, list[float]] = {}
    for model_score, bag in zip(model_scores, bags):
        truth = torch.as_tensor(bag["instance_labels"]).double().numpy() > 0
        scores = {"model": np.asarray(model_score, dtype=np.float64),
                  **{str(k): torch.as_tensor(v).double().numpy() for k, v in bag.get("instance_controls", {}).items()}}
        both = bool(0 < truth.sum() < truth.size)
        share = float(truth.mean())
        for name, sc in scores.items():
            ap.setdefault(name, []).append(float(average_precision_score(truth, sc)) if both else float("nan"))
            pointing.setdefault(name, []).append(float(truth[int(np.argmax(sc))]) if truth.any() else float("nan"))
        ap.setdefault("uniform", []).append(share if both else float("nan"))
        pointing.setdefault("uniform", []).append(share if truth.any() else float("nan"))
    groups = np.asarray([str(b["patient_id"]) for b in bags])
    return ({k: np.asarray(v, dtype=np.float64) for k, v in ap.items()},
            {k: np.asarray(v, dtype=np.float64) for k, v in pointing.items()}, groups)
