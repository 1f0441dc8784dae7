"""The ProtoPNet section of an evaluation: its five elements and its faithfulness.

Localization of the top prototype's similarity map, prototype purity of the nearest training
patches (class and lesion) with the prototype gallery, quantities in units, the exact
decomposition, prototype switch-off (computed from the contributions and checked once by really
disabling a prototype) and deletion curves along the top-prototype map.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mlmi_zoo.architectures.protopnet.fields import cell_fields, receptive_field
from mlmi_zoo.architectures.protopnet.prototypes import duplicate_flags
from mlmi_zoo.architectures.protopnet.push import BACKGROUND_SPAN  # push's intensity foreground is its complement
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
from mlmi_zoo.evaluation.evidence import compare
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
        "A high overlap shows where the top prototype matched, not that the matched region is why the case "
        "belongs to its class.", _tp_mask(labels, predicted, model.num_classes), ctx)
    _finding_maps(model, ctx, out)
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
    evidence = _switch_off_all(model, col, ctx)
    if evidence is not None:
        out["transparency"]["metrics"]["switch_off_max_error"] = evidence["max_error"]
        out["transparency"]["evidence"] = evidence
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
    block["evidence"] = _disable_top_vs_random(logits, contributions, top, col, ctx, model.enabled.cpu())
    out["actionability"] = block
    ctx.faithfulness = _deletion(model, col, ctx.limits, ctx.seed, ctx.figures, "top-prototype map",
                                 "A faithful map shows what the model uses, not that it is what a radiologist would use.", ctx)
    _examples_into(out, col, model, labels, logits.softmax(-1), ctx, "top prototype")
    return out


def _finding_maps(model: Any, ctx: _Context, out: dict[str, Any]) -> None:
    """The top prototype's map against each finding's masks, where the evaluated data offer a set of annotated
    images of the same kind (``concept_mask_set``, with ``control_appearance``: IDRiD's segmentation photographs
    for a model graded on the grading photographs).

    One map, the similarity map of the prototype with the largest contribution to the predicted class (the
    localization map), is scored against every finding's masks beside the image-processing control of that
    finding, the centre prior and a uniform map (:func:`~mlmi_zoo.evaluation.lesion_maps.lesion_localization`);
    adds ``evidence_<metric>_<finding>`` comparisons and ``details["finding_maps"]`` to the localization block.
    """
    from mlmi_zoo.evaluation._common import _base_dataset
    from mlmi_zoo.evaluation.lesion_maps import lesion_localization

    base = _base_dataset(ctx.dataset)
    mask_set = getattr(base, "concept_mask_set", None)
    appearance = getattr(base, "control_appearance", None)
    if mask_set is None or not appearance:
        return
    data, train = mask_set("test"), mask_set("train")

    def maps_of(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        exp = model.explain(model.input_spec.intensity(batch["image"].float()))
        rows = torch.arange(exp.logits.shape[0])
        top = exp.contributions[rows, exp.logits.argmax(-1)].argmax(-1)  # (B,) as in the localization map
        m = exp.localization[rows, top]  # (B, H, W)
        return {name: m for name in appearance}

    found = lesion_localization(maps_of, data, train, appearance, q=ctx.limits.activation_q, n_boot=ctx.n_boot,
                                seed=ctx.seed)
    loc = out["localization"]
    loc.setdefault("details", {})["finding_maps"] = {
        "map": "similarity map of the prototype with the largest contribution to the predicted class, one map scored "
               "against each finding",
        "data": f"{type(base).__name__} concept_mask_set('test'): {len(data)} annotated photographs; centre prior "
                f"from concept_mask_set('train') ({len(train)})",
        **{n: {"images": r["images"], "pooled_aupr": r["pooled_aupr"]} for n, r in found.items()}}
    for n, r in found.items():
        for metric in ("pixel_aupr", "activation_precision", "pointing_game"):
            loc[f"evidence_{metric}_{n}"] = r[metric]


def _decision_margin(logits: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """(N,) logit of the predicted class minus the largest other logit."""
    rows = torch.arange(logits.shape[0])
    others = logits.clone()
    others[rows, predicted] = -math.inf
    return logits[rows, predicted] - others.max(-1).values


def _disable_top_vs_random(logits: torch.Tensor, contributions: torch.Tensor, top: torch.Tensor, col: _Collected,
                           ctx: _Context, enabled: torch.Tensor) -> dict[str, Any]:
    """Does acting on the explanation matter more than acting at random?

    Per case: the drop of the decision margin (predicted logit minus the largest other, in logits)
    when the prototype the explanation ranks first for the predicted class is disabled, beside the
    drop when an enabled prototype drawn uniformly at random (seeded) is disabled instead. Disabling removes
    exactly a prototype's stated contributions from every logit (the transparency switch-off test
    checks this in the model), so both drops are read from the contributions.
    """
    n = contributions.shape[0]
    rows = torch.arange(n)
    predicted = logits.argmax(-1)
    margin = _decision_margin(logits, predicted)
    generator = torch.Generator().manual_seed(ctx.seed)
    ids = torch.nonzero(enabled).flatten()  # drawn among the enabled prototypes: a switched-off one has nothing to lose
    drawn = ids[torch.randint(len(ids), (n,), generator=generator)]

    def drop(disabled: torch.Tensor) -> torch.Tensor:
        return margin - _decision_margin(logits - contributions[rows, :, disabled], predicted)

    return compare("decision margin lost when the top prototype is disabled (logit)", drop(top).double().numpy(),
                   {"random_prototype": drop(drawn).double().numpy()}, col.case_groups(),
                   n_boot=ctx.n_boot, seed=ctx.seed)


def _switch_off_all(model: Any, col: _Collected, ctx: _Context) -> dict[str, Any] | None:
    """Disable every prototype in the model, one at a time, on the first evaluated inputs and on
    random ones: each logit must move by exactly minus that prototype's stated contribution."""
    from mlmi_zoo.evaluation._evidence_blocks import inputs_for_switch_off, switch_off_evidence

    inputs = inputs_for_switch_off(col, min(8, ctx.limits.deletion_cases), ctx.seed)
    if not inputs:
        return None
    saved = model.prototype_mask.clone()
    worst, checks = 0.0, 0
    try:
        for z in inputs:
            model.prototype_mask.copy_(saved)
            with torch.no_grad():
                before = model.explain(z)
            for p in range(before.contributions.shape[2]):
                model.prototype_mask.copy_(saved)
                model.disable_prototypes([p])
                with torch.no_grad():
                    after = model(z)
                worst = max(worst, float((after - (before.logits - before.contributions[:, :, p])).abs().max()))
                checks += z.shape[0]
    finally:
        model.prototype_mask.copy_(saved)
    return switch_off_evidence(worst, checks, "each prototype disabled in the model (its similarity masked before "
                                              "the last layer)")


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


def _nearest_patches(model: Any, ds: SizedDataset[dict[str, Any]], ctx: _Context, foreground: str | None = None
                     ) -> tuple[Any, torch.Tensor | None, float]:
    """Each enabled prototype's k nearest latent patches among ``ds``'s cases; whether each lies on the lesion
    ((P, k) bool, None without masks); and the share of the searched latent cells of those cases on the
    lesion (the purity a prototype would get by matching patches at random). With ``foreground`` (the
    batch key of a foreground mask) only the cells push could take are searched and counted."""
    from mlmi_zoo.architectures.protopnet.prototypes import foreground_cells
    from mlmi_zoo.architectures.protopnet.push import prototype_topk_patches

    latent_masks: dict[int, torch.Tensor] = {}
    searched: list[torch.Tensor] = []  # per case, (L,) the cells searched
    latent_shape: list[tuple[int, ...]] = []
    tiled = getattr(model.backbone, "tile", None) is not None

    def batches() -> Iterator[dict[str, Any]]:
        for batch in DataLoader(ds, batch_size=ctx.batch_size, shuffle=False, collate_fn=ctx.collate):
            if batch.get("mask") is not None:
                if not latent_shape:
                    with torch.no_grad():
                        z = model.latent(model.input_spec.intensity(batch["image"][:1].float()))
                    latent_shape.append(tuple(z.shape[2:]))
                mask = batch["mask"].float()
                # A latent cell lies on the lesion when any of its pixels does: of its tile, for a tiled
                # backbone (exact); else of its share of the image.
                if tiled:
                    cells = model.backbone.cell_fraction(mask.amax(1, keepdim=True), latent_shape[0]) > 0
                else:
                    pool = F.adaptive_max_pool2d if mask.ndim == 4 else F.adaptive_max_pool3d
                    cells = pool(mask, latent_shape[0]) > 0  # (B, 1, *latent)
                if foreground is not None:
                    searched.extend(foreground_cells(model, torch.as_tensor(batch[foreground]), latent_shape[0]))
                else:
                    searched.extend(torch.ones(len(cells), int(np.prod(latent_shape[0])), dtype=torch.bool))
                for idx, cell in zip(_to_tensor_list(batch["index"]), cells):
                    latent_masks[int(idx)] = cell[0]
            yield batch

    topk = prototype_topk_patches(model, batches(), k=min(ctx.limits.purity_k, len(ds)), foreground=foreground)
    # one row per enabled prototype: a switched-off one takes no part in any decision
    topk = type(topk)(*(t[model.enabled.cpu()] for t in topk))
    if not latent_masks:
        return topk, None, math.nan
    on_lesion = torch.zeros(topk.indices.shape, dtype=torch.bool)
    for p in range(topk.indices.shape[0]):
        for j in range(topk.indices.shape[1]):
            idx = int(topk.indices[p, j])
            if idx >= 0 and idx in latent_masks:
                on_lesion[p, j] = bool(latent_masks[idx][tuple(int(v) for v in topk.locations[p, j])])
    cells = torch.stack([m.flatten() for m in latent_masks.values()])  # (N, L)
    base_rate = float(cells[torch.stack(searched)].float().mean())
    return topk, on_lesion, base_rate


def _prototype_purity(model: Any, ctx: _Context) -> dict[str, Any]:
    """Purity of each prototype's nearest patches (training and evaluated split), the sanity checks of
    its sources, and the receptive field of a latent cell."""
    does_not_show = ("Purity shows that a prototype's nearest patches share a label or lie on lesions, not "
                     "that a person recognises the same visual concept in them.")
    train = ctx.train_dataset()
    if train is None or len(train) == 0:
        return _not_applicable("not applicable: the training split is not available to search for nearest patches",
                               does_not_show)
    subset = _subset(train, ctx.limits.purity_train_cases)
    topk, on_lesion, _ = _nearest_patches(model, subset, ctx)
    enabled = model.enabled.cpu()
    classes = model.prototype_classes.cpu()[enabled]
    class_purity = prototype_purity(topk.labels, classes)
    metrics: dict[str, Any] = {"class_purity_mean": class_purity["purity_mean"], "num_prototypes": int(classes.numel()),
                               "k": int(topk.indices.shape[1]), "training_cases_searched": len(subset)}
    # the per-prototype lists below follow these ids (switched-off prototypes are left out)
    details: dict[str, Any] = {"prototype_ids": torch.nonzero(enabled).flatten().tolist(),
                               "class_purity_per_prototype": class_purity["per_prototype"]}
    if on_lesion is not None:
        lesion = prototype_purity(on_lesion)
        metrics["lesion_purity_mean"] = lesion["purity_mean"]
        metrics["lesion_purity_median"] = lesion["purity_median"]
        details["lesion_purity_per_prototype"] = lesion["per_prototype"]
    sources: list[dict[str, Any] | None] = model.prototype_sources or []  # None before the push
    records = [r for r in sources if r is not None and enabled[int(r["prototype"])]]
    pushed = bool(records)
    metrics["pushed"] = pushed
    figures: list[str] = []
    if pushed:
        metrics["unique_prototypes"] = unique_prototypes(records)
        figures, fields = _gallery(model, train, records, ctx)
        details["prototype_fields"] = fields
    else:
        ctx.limitations.append("The prototypes were not projected onto training patches (no push), so they are not "
                               "patches of real cases.")
    sanity = prototype_sanity(model, train)
    metrics.update({f"prototypes_{k}": v for k, v in sanity.items() if k not in ("prototypes", "degenerate_ids")})
    field = receptive_field(model)
    if field:
        metrics["latent_cell_receptive_field_share_of_input"] = field["theoretical_share_of_input"]
    block = element(True, metrics=metrics, figures=figures, does_not_show=does_not_show)
    block["details"] = {**details, "patch_on_lesion": "the latent cell overlaps the lesion mask (max-pooled to the grid)",
                        "search": f"first {len(subset)} training cases", "sanity": sanity, "receptive_field": field}
    # Evidence on the evaluated split: each prototype's lesion purity among its nearest evaluated
    # patches against the share of lesion cells (what matching patches at random gives), resampling
    # prototypes; and no verdict of "demonstrated" while degenerate prototypes exceed the limit.
    test_topk, test_on_lesion, base_rate = _nearest_patches(model, ctx.dataset, ctx)
    if test_on_lesion is not None:
        per_prototype = test_on_lesion.double().mean(1).numpy()
        metrics["lesion_purity_mean_evaluated_split"] = float(per_prototype.mean())
        metrics["lesion_cell_share_evaluated_split"] = base_rate
        block["evidence"] = _purity_evidence(per_prototype, base_rate, sanity, "evaluated", ctx)
    else:
        # Without lesion masks there is no purity to compare with a control, so nothing is demonstrated;
        # the sentence says whether the prototypes at least pass the sanity checks.
        counts = _sanity_counts(sanity)
        if sanity["degenerate_share"] > DEGENERATE_LIMIT:
            sentence = (f"not demonstrated on this data: {counts}, above the {DEGENERATE_LIMIT:.0%} limit; the data "
                        "carry no lesion masks for a purity comparison")
        else:
            sentence = (f"not demonstrated on this data: the prototypes pass the sanity checks ({counts}, within the "
                        f"{DEGENERATE_LIMIT:.0%} limit), but the data carry no lesion masks, so what they show is not "
                        "compared with any control")
        block["evidence"] = {"metric": "prototype sanity (degenerate share)", "verdict": {
            "status": "not demonstrated on this data", "control": "prototype sanity checks", "sentence": sentence,
            "difference": None}}
    return block


def _purity_evidence(per_prototype: np.ndarray, base_rate: float, sanity: dict[str, Any], where: str,
                     ctx: _Context) -> dict[str, Any]:
    """Each prototype's lesion purity among its nearest ``where`` patches against the lesion-cell share
    (what matching patches at random gives), resampling prototypes; no "demonstrated" while
    degenerate prototypes exceed the limit."""
    evidence = compare(f"lesion purity of each prototype's nearest {where} patches (intervals over prototypes)",
                       per_prototype, {"random patches (lesion-cell share)": np.full_like(per_prototype, base_rate)},
                       np.arange(len(per_prototype)).astype(str), n_boot=ctx.n_boot, seed=ctx.seed)
    if sanity["degenerate_share"] > DEGENERATE_LIMIT:
        evidence["verdict"]["status"] = "not demonstrated on this data"
        evidence["verdict"]["sentence"] = (f"not demonstrated on this data: {_sanity_counts(sanity)}, above the "
                                           f"{DEGENERATE_LIMIT:.0%} limit; " + evidence["verdict"]["sentence"])
    elif sanity.get("switched_off"):
        evidence["verdict"]["sentence"] += f" ({_sanity_counts(sanity)})"
    return evidence


def _sanity_counts(sanity: Mapping[str, Any]) -> str:
    """The sanity counts in words, with the prototypes switched off (not counted) when there are any."""
    off = sanity.get("switched_off", 0)
    return (f"{sanity['degenerate']} of {sanity['prototypes']} {'enabled ' if off else ''}prototypes "
            f"({sanity['degenerate_share']:.0%}) are degenerate (border {sanity['on_border']}, background "
            f"{sanity['on_background']}, duplicate {sanity['duplicates']})"
            + (f"; {off} more were switched off after push as duplicates and take no part in any decision"
               if off else ""))


FOREGROUND_KEYS = ("fov", "breast")  # the foreground masks real data sets carry (fundus field of view, breast)


def annotated_purity(model: Any, block: dict[str, Any], data: Any, ctx: _Context) -> dict[str, Any]:
    """Prototype lesion purity on an annotated set where the evaluated split has no masks (the family
    record's ``annotated_recognizability``).

    Each prototype's nearest patches among the annotated set's test cases (one per case; only cells
    push could take, on the set's foreground mask when it carries one) are checked against the
    lesion masks, and the share on a lesion is compared with the share of all searched cells on a
    lesion, resampling prototypes, under the same degenerate-prototype rule as on the evaluated split.
    """
    from mlmi_zoo.evaluation._annotated import annotated_test_set
    from mlmi_zoo.evaluation._data import data_spec_to_text

    if not block.get("applicable") or "sanity" not in block.get("details", {}):
        return block
    spec, annotated = annotated_test_set(data)
    foreground = next((key for key in FOREGROUND_KEYS if key in annotated[0]), None)
    topk, on_lesion, base_rate = _nearest_patches(model, annotated, ctx, foreground)
    if on_lesion is None:
        return block
    per_prototype = on_lesion.double().mean(1).numpy()
    out = {**block, "metrics": {**block["metrics"], "lesion_purity_mean_annotated": float(per_prototype.mean()),
                                "lesion_cell_share_annotated": base_rate}}
    out["details"] = {**block["details"], "lesion_purity_per_prototype_annotated": per_prototype.tolist(),
                      "annotated_data": {"spec": data_spec_to_text(spec), "split": "test", "cases": len(annotated),
                                         "foreground": foreground, "k": int(on_lesion.shape[1]),
                                         "why": "the evaluated split has no lesion masks; each prototype's nearest "
                                                "patches are searched on this annotated set",
                                         "nearest_cases": topk.indices.tolist()}}
    out["evidence"] = _purity_evidence(per_prototype, base_rate, block["details"]["sanity"], "annotated", ctx)
    return out


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


GALLERY_LEGEND = ("yellow: the latent cell's stride window (where its map value is drawn); dashed cyan: its true "
                  "receptive field (every pixel with a non-zero gradient); magenta: its effective field (the centred "
                  "box holding half of the gradient)")


def _gallery(model: Any, train: SizedDataset[dict[str, Any]], records: list[dict[str, Any]], ctx: _Context
             ) -> tuple[list[str], list[dict[str, Any]]]:
    """The gallery of prototype sources (each with its stride window, true and effective receptive
    field) and the fields per prototype; a volume shows the slice through the cell's centre."""
    patches, fields = [], []
    for rec in records[:20]:
        sample = _find_sample(train, int(rec["index"]))
        if sample is None:
            continue
        image = model.input_spec.intensity(torch.as_tensor(sample["image"]).float()[None])[0]
        field = cell_fields(model, image, rec["location"])
        fields.append({"prototype": int(rec["prototype"]), **field})
        boxes = [rec["box_px"], field["theoretical_px"], field["effective_px"]]
        if image.ndim == 4:  # (C, D, H, W): the slice through the window's centre, boxes in-plane
            z = (int(rec["box_px"][0][0]) + int(rec["box_px"][0][1]) - 1) // 2
            image, boxes = image[:, z], [b[1:] for b in boxes]
        flat = [[b[0] for b in box] + [b[1] for b in box] for box in boxes]  # (row0, col0, row1, col1)
        patches.append((image, flat, f"#{rec['prototype']} {rec['class_name']}\n(case {rec['index']})"))
    if not patches:
        return [], fields
    crop = ctx.figures.image_crop
    tile = getattr(model.backbone, "tile", None)
    if crop is None and tile is not None:  # one tile of a large photograph: shown with about four tiles around it
        crop = min(1.0, 4 * tile / max(patches[0][0].shape[-2:]))
    return ctx.figures.draw("prototype_gallery", figs.plot_prototype_gallery, patches, legend=GALLERY_LEGEND,
                            crop=crop), fields


# ---------------------------------------------------------------------------------------------
# sanity checks of the prototypes (Xu-Darme et al., "Sanity checks for patch visualisation in
# prototype-based image classification", CVPR workshops 2023; Adebayo et al., NeurIPS 2018)
# ---------------------------------------------------------------------------------------------
DEGENERATE_LIMIT = 0.10  # a model with more degenerate prototypes than this is not shipped as recognizable


def prototype_sanity(model: Any, train: SizedDataset[dict[str, Any]] | None) -> dict[str, Any]:
    """Count the enabled prototypes whose source is degenerate: on the latent grid's border, on
    background (a near-constant dark patch), or a duplicate (the same source as another, or cosine
    >= 0.99; :func:`~mlmi_zoo.architectures.protopnet.prototypes.duplicate_flags`). Switched-off
    prototypes take no part in any decision and are counted apart (``switched_off``)."""
    enabled = model.enabled.cpu()
    records = [r for r in (model.prototype_sources or []) if r is not None and enabled[int(r["prototype"])]]
    n_all = int(enabled.numel())
    near, same_source = duplicate_flags(model)
    border = torch.zeros(n_all, dtype=torch.bool)
    background = torch.zeros(n_all, dtype=torch.bool)
    for rec in records:
        p = int(rec["prototype"])
        border[p] = any(int(v) in (0, int(s) - 1) for v, s in zip(rec["location"], rec["latent_shape"]))
        sample = _find_sample(train, int(rec["index"])) if train is not None else None
        if sample is not None:
            image = model.input_spec.intensity(torch.as_tensor(sample["image"]).float()[None])[0].mean(0)
            box = tuple(slice(int(b[0]), int(b[1])) for b in rec["box_px"])
            patch, span = image[box], float(image.max() - image.min())
            background[p] = bool(span > 0 and float(patch.std()) < 0.02 * span
                                 and float(patch.mean()) <= float(image.min()) + BACKGROUND_SPAN * span)
    duplicate = same_source | near
    degenerate = border | background | duplicate
    n = int(enabled.sum())
    return {"prototypes": n, "switched_off": n_all - n, "on_border": int(border.sum()),
            "on_background": int(background.sum()), "same_source": int(same_source.sum()),
            "cosine_099": int(near.sum()), "duplicates": int(duplicate.sum()), "degenerate": int(degenerate.sum()),
            "degenerate_share": float(degenerate.sum()) / n if n else math.nan,
            "degenerate_ids": torch.nonzero(degenerate).flatten().tolist(), "checked_sources": len(records)}
