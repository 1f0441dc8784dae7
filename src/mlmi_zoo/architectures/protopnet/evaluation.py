"""The ProtoPNet section of an evaluation: its five elements and its faithfulness.

Localization of the top prototype's similarity map, prototype purity of the nearest training
patches (class and lesion) with the prototype gallery, quantities in units, the exact
decomposition, prototype switch-off (computed from the contributions and checked once by really
disabling a prototype) and deletion curves along the top-prototype map.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mlmi_zoo.evaluation import figures as figs
from mlmi_zoo.evaluation._collect import _Collected
from mlmi_zoo.evaluation._common import _cat, _Context, _subset, _to_tensor_list
from mlmi_zoo.evaluation._elements import (
    _deletion,
    _examples_into,
    _localization_block,
    _measure_fn,
    _not_applicable,
    _physical_block,
    _tp_mask,
    _transparency_block,
)
from mlmi_zoo.evaluation.recognizability import prototype_purity, unique_prototypes
from mlmi_zoo.evaluation.results import element
from mlmi_zoo.training.data_spec import IndexSubset, SizedDataset


def _protopnet(model: Any, col: _Collected, ctx: _Context) -> dict[str, Any]:
    logits, labels = _cat(col.logits), _cat(col.labels)
    predicted = logits.argmax(-1)
    contributions = _cat(col.contributions)  # (N, C, P)
    top = _cat(col.top).long()  # (N,)
    out: dict[str, Any] = {}
    out["localization"] = _localization_block(
        col, "similarity map of the prototype with the largest contribution to the predicted class",
        "A high overlap shows where the top prototype matched, not that the matched region is why the lesion is "
        "malignant.", _tp_mask(labels, predicted, model.num_classes))
    out["visual_recognizability"] = _prototype_purity(model, ctx)
    out["physical_attribution"], lim = _physical_block(
        col, model, ctx.dataset, ctx.limits, ctx.figures, _measure_fn(model),
        "Agreement in units on these data does not show agreement on other scanners, spacings outside the evaluated "
        "range, or lesions unlike the training phantoms.",
        "the model has no physical head (config.quantities is empty)")
    ctx.limitations += lim
    out["transparency"] = _transparency_block(
        col, "prototype similarity x last-layer weight, one term per prototype",
        "An exact sum shows how the prototypes are combined, not what visual feature each prototype encodes.")
    # actionability: switching a prototype off removes exactly its contribution from every logit
    accuracy = float((predicted == labels).double().mean())
    classes = model.prototype_classes.cpu()
    own = contributions[:, classes, torch.arange(contributions.shape[2])]  # (N, P) contribution to own class
    off_accuracy = torch.stack([((logits - contributions[:, :, p]).argmax(-1) == labels).double().mean()
                                for p in range(contributions.shape[2])])  # (P,)
    drop = accuracy - off_accuracy
    rows = torch.arange(logits.shape[0])
    top_off = ((logits - contributions[rows, :, top]).argmax(-1) == labels).double().mean()
    metrics = {
        "accuracy": accuracy,
        "mean_abs_logit_change_when_disabled": float(own.abs().mean()),
        "max_abs_logit_change_when_disabled": float(own.abs().mean(0).max()),
        "largest_accuracy_drop_one_prototype_disabled": float(drop.max()),
        "prototype_with_largest_drop": int(drop.argmax()),
        "accuracy_top_prototype_of_each_case_disabled": float(top_off),
        "switch_off_check_max_error": _switch_off_check(model, col, ctx),
    }
    block = element(True, metrics=metrics, does_not_show=(
        "Switching a prototype off shows how the decision depends on it, not whether the resulting decision is "
        "clinically right."))
    block["details"] = {"per_prototype_mean_abs_logit_change": own.abs().mean(0).tolist(),
                        "per_prototype_accuracy_when_disabled": off_accuracy.tolist(),
                        "logit_change": "exactly minus the prototype's contribution (similarities are masked before the last layer)"}
    out["actionability"] = block
    ctx.faithfulness = _deletion(model, col, ctx.limits, ctx.seed, ctx.figures, "top-prototype map",
                                 "A faithful map shows what the model uses, not that it is what a radiologist would use.")
    _examples_into(out, col, model, labels, logits.softmax(-1), ctx, "top prototype")
    return out


def _switch_off_check(model: Any, col: _Collected, ctx: _Context) -> float:
    """Disable the first kept case's top prototype for real; max |logit - (logit - contribution)|."""
    if not col.keep_x or not col.top:
        return math.nan
    x = col.keep_x[0]
    p = int(col.top[0][0])
    saved = model.prototype_mask.clone()
    try:
        with torch.no_grad():
            before = model.explain(x)
            model.disable_prototypes([p])
            after = model(x)
    finally:
        model.prototype_mask.copy_(saved)
    expected = before.logits - before.contributions[:, :, p]
    return float((after - expected).abs().max())


def _prototype_purity(model: Any, ctx: _Context) -> dict[str, Any]:
    """Purity of each prototype's nearest training patches: on the lesion, and from its class."""
    from mlmi_zoo.architectures.protopnet.push import prototype_topk_patches

    does_not_show = ("Purity shows that a prototype's nearest training patches share a label or lie on lesions, not "
                     "that a person recognises the same visual concept in them.")
    train = ctx.train_dataset()
    if train is None or len(train) == 0:
        return _not_applicable("not applicable: the training split is not available to search for nearest patches",
                               does_not_show)
    subset = _subset(train, ctx.limits.purity_train_cases)
    latent_masks: dict[int, torch.Tensor] = {}
    latent_shape: list[tuple[int, ...]] = []
    saw_mask = [False]

    def batches() -> Iterator[dict[str, Any]]:
        for batch in DataLoader(subset, batch_size=ctx.batch_size, shuffle=False, collate_fn=ctx.collate):
            if batch.get("mask") is not None:
                saw_mask[0] = True
                if not latent_shape:
                    with torch.no_grad():
                        z = model.latent(model.input_spec.intensity(batch["image"][:1].float()))
                    latent_shape.append(tuple(z.shape[2:]))
                pool = F.adaptive_max_pool2d if batch["mask"].ndim == 4 else F.adaptive_max_pool3d
                # A latent cell lies on the lesion when any of its pixels does.
                cells = pool(batch["mask"].float(), latent_shape[0]) > 0  # (B, 1, *latent)
                for idx, cell in zip(_to_tensor_list(batch["index"]), cells):
                    latent_masks[int(idx)] = cell[0]
            yield batch

    k = min(ctx.limits.purity_k, len(subset))
    topk = prototype_topk_patches(model, batches(), k=k)
    classes = model.prototype_classes.cpu()
    class_purity = prototype_purity(topk.labels, classes)
    metrics: dict[str, Any] = {"class_purity_mean": class_purity["purity_mean"], "num_prototypes": int(classes.numel()),
                               "k": k, "training_cases_searched": len(subset)}
    details: dict[str, Any] = {"class_purity_per_prototype": class_purity["per_prototype"]}
    if saw_mask[0]:
        on_lesion = torch.zeros(topk.indices.shape, dtype=torch.bool)
        for p in range(topk.indices.shape[0]):
            for j in range(topk.indices.shape[1]):
                idx = int(topk.indices[p, j])
                if idx >= 0 and idx in latent_masks:
                    on_lesion[p, j] = bool(latent_masks[idx][tuple(int(v) for v in topk.locations[p, j])])
        lesion = prototype_purity(on_lesion)
        metrics["lesion_purity_mean"] = lesion["purity_mean"]
        metrics["lesion_purity_median"] = lesion["purity_median"]
        details["lesion_purity_per_prototype"] = lesion["per_prototype"]
    sources: list[dict[str, Any] | None] = model.prototype_sources or []  # None before the push
    records = [r for r in sources if r is not None]
    pushed = bool(records)
    metrics["pushed"] = pushed
    figures: list[str] = []
    if pushed:
        metrics["unique_prototypes"] = unique_prototypes(records)
        figures = _gallery(model, train, records, ctx)
    else:
        ctx.limitations.append("The prototypes were not projected onto training patches (no push), so they are not "
                               "patches of real cases.")
    block = element(True, metrics=metrics, figures=figures, does_not_show=does_not_show)
    block["details"] = {**details, "patch_on_lesion": "the latent cell overlaps the lesion mask (max-pooled to the grid)",
                        "search": f"first {len(subset)} training cases"}
    return block


def _find_sample(ds: SizedDataset[dict[str, Any]], index: int) -> Mapping[str, Any] | None:
    """The sample whose ``"index"`` is ``index`` (the generator index of phantoms)."""
    if isinstance(ds, IndexSubset):
        indices = list(ds.indices)
        if index in indices:
            return ds[indices.index(index)]
        return None
    if 0 <= index < len(ds):
        sample = ds[index]
        if int(sample.get("index", index)) == index:
            return sample
    return None


def _gallery(model: Any, train: SizedDataset[dict[str, Any]], records: list[dict[str, Any]], ctx: _Context) -> list[str]:
    patches = []
    for rec in records[:20]:
        sample = _find_sample(train, int(rec["index"]))
        if sample is None:
            continue
        image = model.input_spec.intensity(torch.as_tensor(sample["image"]).float()[None])[0]
        box = rec["box_px"]
        flat = [b[0] for b in box] + [b[1] for b in box]  # (row0, col0, row1, col1) or the 3D form
        patches.append((image, flat, f"#{rec['prototype']} {rec['class_name']} (case {rec['index']})"))
    if not patches:
        return []
    return ctx.figures.draw("prototype_gallery", figs.plot_prototype_gallery, patches)
