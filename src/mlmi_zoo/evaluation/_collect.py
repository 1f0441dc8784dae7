"""The pass over the evaluated split: what it collects per case (:class:`_Collected`).

:func:`_run_images` runs ProtoPNet, concept-bottleneck and baseline models over image batches and
:func:`_run_bags` runs the MIL models over bags; both record logits and labels, and, where the
model and data allow, localization scores, decompositions, physical measurements, concept
predictions, top-instance analyses and deletion curves, and keep the first cases for the deletion
curves, the example figures and the spacing-invariance test. The element blocks and the family
sections turn these records into the results document.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from einops import rearrange

from mlmi_zoo.architectures.mil.heads import instance_ranks
from mlmi_zoo.evaluation._common import (
    EvaluationLimits,
    _batch_groups,
    _cat,
    _positive_class,
    _to_tensor_list,
)
from mlmi_zoo.evaluation._reference import _untrained_copy
from mlmi_zoo.evaluation.faithfulness import instance_deletion_curve
from mlmi_zoo.evaluation.localization import activation_precision, pointing_game
from mlmi_zoo.evaluation.transparency import decomposition_error, explanation_size
from mlmi_zoo.families import family_of


# ---------------------------------------------------------------------------------------------
# what one pass over the split collects
# ---------------------------------------------------------------------------------------------
@dataclass
class _Collected:
    """Per-case records of the pass over the evaluated split (lists of per-batch tensors)."""

    logits: list[torch.Tensor] = dataclasses.field(default_factory=list)
    labels: list[torch.Tensor] = dataclasses.field(default_factory=list)
    groups: list[str] | None = None
    has_groups: bool = True
    names: list[str] = dataclasses.field(default_factory=list)  # each case's name (an image), where the data give one
    # localization / faithfulness
    ap: list[torch.Tensor] = dataclasses.field(default_factory=list)
    pg: list[torch.Tensor] = dataclasses.field(default_factory=list)
    ap_ceiling: list[torch.Tensor] = dataclasses.field(default_factory=list)  # the mask itself as the map
    control_ap: dict[str, list[torch.Tensor]] = dataclasses.field(default_factory=dict)  # control -> per-case AP
    control_pg: dict[str, list[torch.Tensor]] = dataclasses.field(default_factory=dict)
    loc_groups: list[str] = dataclasses.field(default_factory=list)  # the patient of each localized case
    stats: list[np.ndarray] = dataclasses.field(default_factory=list)  # (B, F) image statistics per batch
    masks_seen: bool = False
    spacing_seen: bool = False
    keep_x: list[torch.Tensor] = dataclasses.field(default_factory=list)
    keep_maps: list[torch.Tensor] = dataclasses.field(default_factory=list)
    keep_masks: list[torch.Tensor] = dataclasses.field(default_factory=list)
    keep_index: list[int] = dataclasses.field(default_factory=list)
    keep_spacing: list[torch.Tensor] = dataclasses.field(default_factory=list)
    # transparency
    decomposition: float = 0.0
    contributions: list[torch.Tensor] = dataclasses.field(default_factory=list)
    top: list[torch.Tensor] = dataclasses.field(default_factory=list)
    size_nonzero: list[int] = dataclasses.field(default_factory=list)
    size_needed: list[int] = dataclasses.field(default_factory=list)
    num_terms: int = 0
    # physical: name -> lists of predicted / true values, unit
    measured: dict[str, list[torch.Tensor]] = dataclasses.field(default_factory=dict)
    truth: dict[str, list[torch.Tensor]] = dataclasses.field(default_factory=dict)
    units: dict[str, str] = dataclasses.field(default_factory=dict)
    counted_on_lesion: list[torch.Tensor] = dataclasses.field(default_factory=list)  # count head: share on the mask
    counted_on_lesion_ceiling: list[torch.Tensor] = dataclasses.field(default_factory=list)  # the mask's own tiles
    keep_counted: list[torch.Tensor] = dataclasses.field(default_factory=list)  # (n, *spatial) counted maps
    # cbm
    concept_pred: dict[str, list[torch.Tensor]] = dataclasses.field(default_factory=dict)
    concept_true: dict[str, list[torch.Tensor]] = dataclasses.field(default_factory=dict)
    reader_concepts: dict[str, list[torch.Tensor]] = dataclasses.field(default_factory=dict)  # (n, readers)
    reader_case_index: list[int] = dataclasses.field(default_factory=list)  # each such case's "index" in its data set
    cache_parts: dict[str, list[torch.Tensor]] = dataclasses.field(default_factory=dict)
    missing_concepts: tuple[str, ...] = ()
    data_concepts: dict[str, list[torch.Tensor]] = dataclasses.field(default_factory=dict)
    data_measurements: dict[str, list[torch.Tensor]] = dataclasses.field(default_factory=dict)
    # mil
    inst_scores: list[torch.Tensor] = dataclasses.field(default_factory=list)
    inst_labels: list[torch.Tensor] = dataclasses.field(default_factory=list)
    inst_bag_scores: list[torch.Tensor] = dataclasses.field(default_factory=list)  # each instance's bag P(positive)
    per_bag_auroc: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # scorer -> per-bag AUROC
    per_bag_top_hit: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # scorer -> top tile on the finding
    per_bag_groups: list[str] = dataclasses.field(default_factory=list)
    topk_share: list[float] = dataclasses.field(default_factory=list)
    exclusion_delta: list[torch.Tensor] = dataclasses.field(default_factory=list)
    exclusion_delta_random: list[torch.Tensor] = dataclasses.field(default_factory=list)  # as many random tiles
    exclusion_flipped: list[torch.Tensor] = dataclasses.field(default_factory=list)
    curves: dict[str, list[torch.Tensor]] = dataclasses.field(default_factory=dict)
    curve_fractions: torch.Tensor | None = None
    heatmap: tuple[np.ndarray, str] | None = None
    heatmap_truth: np.ndarray | None = None  # the same bag's instance labels on its grid
    n_cases: int = 0

    def case_groups(self) -> np.ndarray:
        """(N,) the patient of each evaluated case, or the case's position where the data name none."""
        if self.has_groups and self.groups:
            return np.asarray(self.groups)
        return np.arange(self.n_cases).astype(str)

    def add_groups(self, groups: list[str] | None, names: Any = None) -> None:
        if names is not None:
            self.names += [str(n) for n in names]
        if groups is None:
            self.has_groups = False
            return
        self.groups = (self.groups or []) + groups


# ---------------------------------------------------------------------------------------------
# the pass over the split
# ---------------------------------------------------------------------------------------------
def _image_batch(model: Any, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Network input (intensity-transformed) and (B, dims) spacing or None."""
    x = model.input_spec.intensity(batch["image"].float())
    spacing = batch.get("spacing")
    if spacing is not None:
        spacing = torch.as_tensor(spacing, dtype=torch.float32).reshape(x.shape[0], -1)
    return x, spacing


def _keep(col: _Collected, limits: EvaluationLimits, x: torch.Tensor, maps: torch.Tensor | None,
          batch: Mapping[str, Any], spacing: torch.Tensor | None) -> None:
    """Keep the first cases (inputs and maps) for deletion curves, examples and the spacing test."""
    room = max(limits.deletion_cases, limits.spacing_cases, limits.examples) - len(col.keep_index)
    if room <= 0:
        return
    n = min(room, x.shape[0])
    col.keep_x.append(x[:n].cpu())
    if maps is not None:
        col.keep_maps.append(maps[:n].cpu())
    if batch.get("mask") is not None:
        col.keep_masks.append(batch["mask"][:n].bool().cpu())
    col.keep_index.extend(int(i) for i in _to_tensor_list(batch["index"])[:n])
    if spacing is not None:
        col.keep_spacing.append(spacing[:n].cpu())


def _collect_measurements(col: _Collected, measurements: Mapping[str, Any], batch: Mapping[str, Any]) -> None:
    truth = batch.get("measurements") or {}
    for name, m in measurements.items():
        if name not in truth:
            continue
        col.measured.setdefault(name, []).append(torch.as_tensor(m.value).reshape(-1).double().cpu())
        col.truth.setdefault(name, []).append(torch.as_tensor(truth[name]).reshape(-1).double().cpu())
        col.units[name] = m.unit


def _localize(col: _Collected, maps: torch.Tensor, batch: Mapping[str, Any], q: float,
              control_maps: Mapping[str, torch.Tensor] | None = None) -> None:
    mask = batch.get("mask")
    if mask is None:
        return
    col.masks_seen = True
    n = maps.shape[0]
    col.loc_groups.extend(_batch_groups(batch, n) or [f"case-{i}" for i in _to_tensor_list(batch["index"])])
    col.ap.append(activation_precision(maps, mask, q))
    col.ap_ceiling.append(activation_precision(mask.float(), mask, q))
    col.pg.append(pointing_game(maps, mask))
    for name, control in (control_maps or {}).items():  # the same metrics on maps that need no model
        col.control_ap.setdefault(name, []).append(activation_precision(control, mask, q))
        col.control_pg.setdefault(name, []).append(pointing_game(control, mask))


def _size(col: _Collected, contributions: torch.Tensor, predicted: torch.Tensor) -> None:
    size = explanation_size(contributions, logits_class_index=predicted)
    col.size_nonzero.extend(size["per_case_nonzero"])
    col.size_needed.extend(size["per_case_terms_needed"])
    col.num_terms = size["num_terms"]


def _run_images(model: Any, loader: Iterable[Mapping[str, Any]], limits: EvaluationLimits,
                controls: Any = None) -> _Collected:
    """The pass over image batches; ``controls`` (an ``_ImageControls``) adds the control maps."""
    from mlmi_zoo.architectures.cbm.concept_values import concept_values_from_batch
    from mlmi_zoo.evaluation.controls import image_statistics

    col = _Collected()
    record = family_of(model)
    for batch in loader:
        x, spacing = _image_batch(model, batch)
        col.spacing_seen |= spacing is not None
        exp = model.explain(x, spacing=spacing) if spacing is not None else model.explain(x)
        n = x.shape[0]
        col.n_cases += n
        predicted = exp.logits.argmax(-1)  # (B,)
        col.logits.append(exp.logits.cpu())
        col.labels.append(torch.as_tensor(batch["label"]).reshape(-1).cpu())
        col.add_groups(_batch_groups(batch, n), batch.get("name"))
        _collect_measurements(col, exp.measurements, batch)
        if controls is not None:
            col.stats.append(image_statistics(x))
        maps = None
        if record.evidence_maps is not None and exp.decomposable:
            rows = torch.arange(n)
            top = exp.contributions[rows, predicted].argmax(-1)  # (B,) largest contribution to the decision
            source = record.evidence_maps(exp)  # (B, T, *spatial): one map per contribution
            maps = source[rows, top]  # (B, *spatial)
            col.top.append(top.cpu())
            col.contributions.append(exp.contributions.cpu())
            col.decomposition = max(col.decomposition, decomposition_error(exp))
            _size(col, exp.contributions, predicted)
            control_maps = None
            if controls is not None and batch.get("mask") is not None:
                control_maps = controls.maps(x, spacing, tuple(maps.shape))
            _localize(col, maps, batch, limits.activation_q, control_maps)
        if record.concepts:
            _collect_concepts(col, model, exp, batch, spacing, concept_values_from_batch)
        counted = getattr(exp, "measurement_map", None)
        if counted is not None:
            _collect_counted(col, counted, batch, limits, model.physical, spacing)
        _keep(col, limits, x, maps, batch, spacing)
    _drop_without_truth(col)
    return col


def _drop_without_truth(col: _Collected) -> None:
    """Forget the quantities and concepts whose truth is missing (NaN) on every evaluated case: these data do not
    measure them (IDRiD's graded photographs carry no lesion area), so nothing about them can be scored here."""
    for pred, truth in ((col.measured, col.truth), (col.concept_pred, col.concept_true)):
        for name in [n for n, t in truth.items() if not bool(torch.isfinite(_cat(t)).any())]:
            pred.pop(name, None)
            truth.pop(name)
            if truth is col.concept_true:  # no concept of these can be corrected to its truth either
                col.missing_concepts = tuple(dict.fromkeys((*col.missing_concepts, name)))


def _collect_counted(col: _Collected, counted: torch.Tensor, batch: Mapping[str, Any], limits: EvaluationLimits,
                     head: Any, spacing: torch.Tensor | None) -> None:
    """A count head's map (B, 1, *spatial): keep the first for the figure, and the share of the
    counted area that lies on the lesion mask, beside the same share for the mask's own tile
    fractions (a perfect map: tiles that straddle the boundary put part of it off the mask)."""
    room = limits.examples - sum(m.shape[0] for m in col.keep_counted)
    if room > 0:
        col.keep_counted.append(counted[:room, 0].cpu())
    mask = batch.get("mask")
    if mask is None:
        return
    mask = mask.reshape(counted.shape).float().to(counted.device)
    s = None if spacing is None else spacing.to(counted.device)
    tiles = head.tiles(counted.shape[2:])
    exact = head.to_input(head.mask_fractions(head.to_canonical(mask, s), tiles), counted.shape[2:], s)
    on = mask.flatten(1).cpu()
    for maps, out in ((counted, col.counted_on_lesion), (exact, col.counted_on_lesion_ceiling)):
        flat = maps.flatten(1).cpu()
        total = flat.sum(1)
        out.append(torch.where(total > 0, (flat * on).sum(1) / total.clamp_min(1e-12), torch.nan))


def _collect_concepts(col: _Collected, model: Any, exp: Any, batch: Mapping[str, Any],
                      spacing: torch.Tensor | None, values_from_batch: Callable[..., torch.Tensor]) -> None:
    given = {**(batch.get("concepts") or {}), **(batch.get("measurements") or {})}
    for name, v in (batch.get("concepts") or {}).items():
        col.data_concepts.setdefault(name, []).append(torch.as_tensor(v).reshape(-1).double())
    for name, v in (batch.get("measurements") or {}).items():
        col.data_measurements.setdefault(name, []).append(torch.as_tensor(v).reshape(-1).double())
    for spec in model.concept_specs:
        pred = exp.concepts.get(spec.name)
        if spec.name not in given or pred is None:
            continue
        value = pred.value if hasattr(pred, "value") else pred
        col.concept_pred.setdefault(spec.name, []).append(torch.as_tensor(value).double().cpu())
        col.concept_true.setdefault(spec.name, []).append(torch.as_tensor(given[spec.name]).reshape(-1).double())
    readers = batch.get("reader_concepts") or {}
    for name, v in readers.items():  # each reader's own rating (LIDC), NaN-padded
        if name in col.concept_pred:
            col.reader_concepts.setdefault(name, []).append(torch.as_tensor(v).double().reshape(len(v), -1))
    if readers:
        col.reader_case_index.extend(int(i) for i in _to_tensor_list(batch["index"]))
    missing = [s.name for s in model.concept_specs if s.name not in given]
    if missing:  # interventions need every concept's ground truth (NaN where a case lacks it)
        col.missing_concepts = tuple(missing)
        return
    values = values_from_batch(model.concept_specs, batch)
    true = model.true_bottleneck(values, spacing)
    for key, part in (("predicted", exp.concept_vector), ("true", true), ("labelled", torch.isfinite(values)),
                      ("labels", torch.as_tensor(batch["label"]).reshape(-1))):
        col.cache_parts.setdefault(key, []).append(part.cpu())


def _per_bag(col: _Collected, model: Any, x: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor,
             inst: torch.Tensor, bag_p: torch.Tensor, groups: list[str] | None, untrained: Any,
             batch_controls: Mapping[str, Any] | None = None) -> None:
    """Instance AUROC inside each bag, for the model and the MIL controls (bags with one instance
    class are undefined and recorded as NaN)."""
    from mlmi_zoo.evaluation.controls import bag_constant_scores, instance_auroc_per_bag, top_instance_hit, uniform_attention

    labels = inst.to(mask.device).double()
    with torch.no_grad():
        untrained_scores = untrained.explain(x, mask=mask).attention  # (B, N) attention of an untrained copy
    scorers = {"model": scores, "bag_constant": bag_constant_scores(bag_p, mask), "uniform": uniform_attention(mask),
               "feature_norm": torch.linalg.vector_norm(x.float(), dim=-1), "untrained_copy": untrained_scores}
    # Data-specific controls a bag data set provides per instance (e.g. a tile's brightness or its
    # closeness to the organ's centre): (B, N) scores under batch["instance_controls"][name].
    for name, extra in (batch_controls or {}).items():
        scorers[str(name)] = torch.as_tensor(extra).to(mask.device).reshape(mask.shape)
    for name, sc in scorers.items():
        res = instance_auroc_per_bag(sc.detach().double().cpu(), labels.cpu(), mask.cpu())
        col.per_bag_auroc.setdefault(name, []).extend(res.per_bag.tolist())
        hit = top_instance_hit(sc.detach().double().cpu(), labels.cpu(), mask.cpu())
        col.per_bag_top_hit.setdefault(name, []).extend(hit.tolist())
    col.per_bag_groups.extend(groups or [f"bag-{len(col.per_bag_groups) + i}" for i in range(x.shape[0])])


def _truth_grid(coords: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """A bag's instance labels on the grid its heat map uses (cells without an instance are NaN)."""
    from mlmi_zoo.architectures.mil.explanations import _grid_indices

    idx = _grid_indices(coords.detach().cpu().numpy())
    grid = np.full(tuple(int(v) + 1 for v in idx.max(0)), np.nan)
    grid[tuple(idx.T)] = labels.detach().double().cpu().numpy()
    return grid


def _run_bags(model: Any, loader: Iterable[Mapping[str, Any]], limits: EvaluationLimits, seed: int) -> _Collected:
    """Run a bag model over ``loader``: logits and labels, and for a MIL model its instance scores, the
    exclusion of its top instances against random ones, deletion curves and a heat map."""
    from mlmi_zoo.architectures.blocks.stages import training_for

    adapter = training_for(model)
    col = _Collected()
    if not family_of(model).interpretable:  # a black box on bags: its decisions only, no instance to rank
        for batch in loader:
            x, mask = adapter.inputs(model, batch)
            logits = model(x, mask)
            col.n_cases += x.shape[0]
            col.logits.append(logits.cpu())
            col.labels.append(torch.as_tensor(batch["label"]).reshape(-1).cpu())
            col.add_groups(_batch_groups(batch, x.shape[0]), batch.get("name"))
        return col
    additive = family_of(model).instance_scores == "contributions"
    untrained = _untrained_copy(model, seed)
    draws = torch.Generator().manual_seed(seed)  # the random tiles excluded beside the top ones
    kept = 0
    for batch in loader:
        x, mask = adapter.inputs(model, batch)
        coords = batch.get("coords")
        exp = model.explain(x, mask=mask, coords=coords)
        n = x.shape[0]
        col.n_cases += n
        logits = exp.logits
        predicted = logits.argmax(-1)
        labels = torch.as_tensor(batch["label"]).reshape(-1)
        col.logits.append(logits.cpu())
        col.labels.append(labels.cpu())
        col.add_groups(_batch_groups(batch, n), batch.get("name"))
        _collect_measurements(col, exp.measurements, batch)
        pos = _positive_class(logits.shape[1])
        target = predicted if pos is None else torch.full_like(predicted, pos)  # (B,)
        if additive:
            scores = exp.contributions[torch.arange(n), :, target]  # (B, N) contribution to the tracked class
            col.decomposition = max(col.decomposition, decomposition_error(exp))
            _size(col, rearrange(exp.contributions, "b n c -> b c n"), predicted)
        else:
            scores = exp.attention  # (B, N)
        # Attention weights sum to 1 within each bag, so across bags of different sizes they are not
        # comparable; the pre-softmax scores rank instances the same way within a bag and are.
        pooled_scores = scores if additive else exp.attention_scores  # (B, N)
        inst = batch.get("instance_labels")
        if inst is not None:
            col.inst_scores.append(pooled_scores[mask].double().cpu())
            col.inst_labels.append(inst.to(mask.device)[mask].double().cpu())
            bag_p = logits.softmax(-1)[torch.arange(n), target]  # (B,) P(tracked class) of each bag
            col.inst_bag_scores.append(bag_p[:, None].expand_as(mask)[mask].double().cpu())
            _per_bag(col, model, x, mask, scores, inst, bag_p, _batch_groups(batch, n), untrained,
                     batch.get("instance_controls"))
        # top-k instances: tumour share (positive bags) and the effect of excluding them
        n_valid = mask.sum(1)  # (B,)
        k = torch.clamp(n_valid - 1, min=0).clamp(max=limits.top_instances)  # keep >= 1 instance
        rank = instance_ranks(scores, mask)  # (B, N)
        top_k = (rank < k[:, None]) & mask  # (B, N)
        if inst is not None:
            share_k = torch.minimum(n_valid, torch.tensor(limits.top_instances))
            top_share = (rank < share_k[:, None]) & mask
            for b in range(n):
                if bool(inst[b][mask[b]].any()):  # bags that hold tumour
                    col.topk_share.append(float(inst[b][top_share[b]].float().mean()))
        random_k = (instance_ranks(torch.rand(mask.shape, generator=draws).to(mask.device), mask) < k[:, None]) & mask
        with torch.no_grad():
            excluded = model(x, mask & ~top_k)  # (B, C)
            excluded_random = model(x, mask & ~random_k)
        rows = torch.arange(n)
        col.exclusion_delta.append((excluded[rows, predicted] - logits[rows, predicted]).cpu())
        col.exclusion_delta_random.append((excluded_random[rows, predicted] - logits[rows, predicted]).cpu())
        flipped = excluded.argmax(-1) != predicted
        col.exclusion_flipped.append(flipped[predicted == pos].cpu() if pos is not None else flipped.cpu())
        # instance deletion curves on the first bags
        if kept < limits.deletion_cases:
            take = min(n, limits.deletion_cases - kept)
            kept += take

            def model_fn(f: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
                return model(f, m)

            for order in ("attribution", "random"):
                curve = instance_deletion_curve(model_fn, x[:take], mask[:take], scores[:take], steps=limits.deletion_steps,
                                                class_index=target[:take], order=order, seed=seed)
                col.curves.setdefault(order, []).append(curve.per_case)
                col.curve_fractions = curve.fractions
        if col.heatmap is None and coords is not None:
            for b in range(n):
                # a correctly found positive slide; where the bag label is unknown (-1), a bag that holds a finding
                known = int(labels[b]) >= 0
                if (int(predicted[b]) == int(target[b]) == int(labels[b])) if known else \
                        (inst is not None and bool((inst[b][mask[b]] > 0).any())):
                    kind = "contributions" if additive else "attention"
                    col.heatmap = (exp.heatmap(b, kind, class_index=int(target[b])), kind)
                    if inst is not None:
                        col.heatmap_truth = _truth_grid(coords[b][mask[b]], inst[b][mask[b]])
                    break
    return col
