"""``mlmi-zoo evaluate``: measure the task and the five elements of interpretability of one model.

The evaluation runs a model over one split of a data set and writes the results document of
:mod:`mlmi_zoo.evaluation.results` (model cards are generated from it). What is measured follows
the framework of Wang et al., "A Framework for Interpretability in Machine Learning for Medical
Imaging" (arXiv 2310.01685; IEEE Access 2024) and DESIGN.md, per family:

* ProtoPNet (Chen et al., NeurIPS 2019): localization of the top prototype's similarity map
  (activation precision and pointing game against lesion masks; Barnett et al., Nat Mach Intell
  2021), prototype purity on training patches, quantities in units with Bland–Altman agreement and
  spacing invariance, the exact decomposition, prototype switch-off, deletion curves (Petsiuk et
  al., BMVC 2018).
* Concept bottlenecks (Koh et al., ICML 2020): localization of concept maps, per-concept accuracy
  (and, on LIDC-IDRI, model-reader beside inter-reader agreement), continuous concepts in units,
  the exact decomposition, intervention curves with three policies against an oracle.
* Attention / additive MIL (Ilse et al., ICML 2018; Javed et al., NeurIPS 2022): instance AUROC of
  attention / contributions, tumour share of the top instances, tumour area in mm², the exact
  decomposition (additive only), instance exclusion and instance deletion curves.
* Black-box baseline: the task only (and physical quantities when it has a head).

What we chose: expensive parts run on a documented number of cases (:class:`EvaluationLimits`);
the task metrics use a percentile bootstrap over patients when the data name them, else over
cases. Numbers that cannot be measured on the given data (no lesion masks, no pixel spacing) are
reported as "not applicable" with the reason, never estimated.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils.data import DataLoader, Dataset

from mlmi_zoo._config import OverrideError, from_jsonable, parse_override_value, to_jsonable
from mlmi_zoo._version import __version__
from mlmi_zoo.evaluation import figures as figs
from mlmi_zoo.evaluation.metrics import (
    Curve,
    activation_precision,
    bland_altman,
    concept_metrics,
    decomposition_error,
    deletion_curve,
    explanation_size,
    instance_auroc,
    instance_deletion_curve,
    inter_reader_agreement,
    mae,
    model_reader_agreement,
    pointing_game,
    prototype_purity,
    rmse,
    task_metrics,
    unique_prototypes,
)
from mlmi_zoo.evaluation.results import ELEMENTS, SCHEMA_VERSION, element, validate_results
from mlmi_zoo.training.data_spec import DataSpec, IndexSubset, build_dataset, collate_for, describe

__all__ = ["evaluate", "EvaluationLimits", "load_data_spec", "check_split_overlap", "data_spec_to_text"]

log = logging.getLogger(__name__)

IMAGE_FAMILIES = ("protopnet", "cbm", "baseline")
MIL_FAMILIES = ("abmil", "additive_mil")
BLACK_BOX = "not applicable: a black box has no explanation to measure"


@dataclass(frozen=True)
class EvaluationLimits:
    """How many cases the expensive parts of an evaluation use (the task uses every case).

    Attributes:
        deletion_cases: cases (images or bags) of the deletion curves — each needs
            ``2 (deletion_steps + 1)`` forward passes.
        deletion_steps: steps of each deletion curve.
        spacing_cases: cases rendered twice for the spacing-invariance test.
        purity_train_cases: training cases searched for each prototype's nearest patches.
        purity_k: nearest training patches per prototype (ProtoPNet's nearest-patch analysis).
        val_cases: validation cases used to fit the fixed intervention order.
        oracle_train_cases: training cases of the oracle logistic regression (no label rule known).
        intervention_repeats: random intervention orders averaged.
        top_instances: instances per bag in the top-k analyses (at most every valid instance).
        examples: cases drawn in the example-explanation figure.
        activation_q: share of pixels in the activation-precision top set (IAIA-BL used 5%).
    """

    deletion_cases: int = 64
    deletion_steps: int = 10
    spacing_cases: int = 32
    purity_train_cases: int = 256
    purity_k: int = 5
    val_cases: int = 256
    oracle_train_cases: int = 1000
    intervention_repeats: int = 5
    top_instances: int = 10
    examples: int = 4
    activation_q: float = 0.05


# ---------------------------------------------------------------------------------------------
# data specs: files, inline strings, the split-overlap refusal
# ---------------------------------------------------------------------------------------------
_SPEC_FIELDS = {f.name for f in dataclasses.fields(DataSpec)} - {"kind", "params"}


def _split_top_level(text: str) -> list[str]:
    """Split ``a=1,b=[1, 2],c={x: 1}`` at commas outside brackets and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def load_data_spec(data: DataSpec | str | Path | Mapping[str, Any]) -> DataSpec:
    """A :class:`DataSpec` from a spec, a dict, a YAML/JSON file or an inline string.

    Files hold a data spec (``kind``, ``params``, ``train_size``...) or a whole recipe (its ``data``
    section is used). The inline form is ``kind:key=value,key=value``: keys that are fields of
    :class:`DataSpec` (``train_size``, ``val_size``, ``test_size``, ``val_fraction``,
    ``test_fraction``, ``split_seed``) set them, every other key goes to ``params``; values are
    read as YAML (``spacing_range=[0.5, 1.0]``), e.g.
    ``nodule_phantom:seed=0,size=64,train_size=2000,val_size=400,test_size=400``.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: an unreadable file or string, unknown fields or wrong types (naming the key).
    """
    if isinstance(data, DataSpec):
        return data
    if isinstance(data, Mapping):
        doc: Any = dict(data)
    else:
        text = str(data).strip()
        path = Path(text).expanduser()
        if path.suffix.lower() in (".yaml", ".yml", ".json") or path.is_file():
            if not path.is_file():
                raise FileNotFoundError(f"data spec file not found: {str(path)!r}")
            import yaml

            try:
                doc = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML
            except yaml.YAMLError as err:
                raise ValueError(f"{path} is not valid YAML/JSON: {err}") from err
            if isinstance(doc, dict) and "data" in doc and "kind" not in doc:
                doc = doc["data"]
        else:
            kind, sep, rest = text.partition(":")
            if not kind or (not sep and "=" in kind):
                raise ValueError(f"cannot read data spec {text!r}: expected a YAML/JSON file or "
                                 "'kind:key=value,...' (e.g. 'nodule_phantom:seed=0,train_size=200,val_size=50,test_size=100')")
            doc = {"kind": kind.strip(), "params": {}}
            for item in _split_top_level(rest):
                key, eq, value = item.partition("=")
                if not eq or not key.strip():
                    raise ValueError(f"data spec item {item!r} is not of the form key=value")
                key = key.strip().removeprefix("params.")
                target = doc if key in _SPEC_FIELDS else doc["params"]
                target[key] = parse_override_value(value.strip())
    if not isinstance(doc, dict) or "kind" not in doc:
        raise ValueError(f"a data spec is a mapping with at least 'kind'; got {doc!r}")
    try:
        return from_jsonable(DataSpec, doc, where="data")
    except OverrideError:
        raise
    except (TypeError, ValueError) as err:
        raise ValueError(f"invalid data spec: {err}") from err


def data_spec_to_text(spec: DataSpec) -> str:
    """The inline ``kind:key=value,...`` form of ``spec`` that :func:`load_data_spec` reads back."""
    import yaml

    def flow(value: Any) -> str:
        return yaml.safe_dump(to_jsonable(value), default_flow_style=True, width=10_000).strip().removesuffix("...").strip()

    items = [f"{k}={flow(v)}" for k, v in spec.params.items()]
    defaults = DataSpec(kind="folder_csv")
    for name in sorted(_SPEC_FIELDS):
        value = getattr(spec, name)
        if value != getattr(defaults, name):
            items.append(f"{name}={flow(value)}")
    return f"{spec.kind}:" + ",".join(items)


def _case_ids(record: Mapping[str, Any]) -> range | set[Any]:
    """What identifies a split's cases in a :func:`describe` record: a range or a set."""
    if "index_range" in record:
        start, stop = record["index_range"]
        return range(int(start), int(stop))
    if "indices" in record:
        return {int(i) for i in record["indices"]}
    if "patient_ids" in record:
        return {str(p) for p in record["patient_ids"]}
    if "indices_sha256" in record:
        return {record["indices_sha256"]}
    return {"all cases"}


def _source_identity(desc: Mapping[str, Any], split: str) -> tuple[Any, ...] | None:
    """Cases of two splits can coincide only when their source identities are equal (None: unknown)."""
    kind = desc.get("kind")
    source = desc.get("source") or {}
    record = (desc.get("splits") or {}).get(split) or {}
    if kind in ("nodule_phantom", "tilebag_phantom"):
        return (kind, source.get("generator"), record.get("seed", source.get("seed")))
    if kind == "medmnist":
        return (kind, source.get("md5") or source.get("flag"), record.get("official_split", split))
    if kind == "lidc_nodules":
        ident: tuple[Any, ...] = (kind, source.get("sha256"))
        # Without the patient ids, the deterministic patient split is the identity.
        return ident if "patient_ids" in record else ident + (record.get("patient_split", split),)
    if kind in ("folder_csv", "cached_bags"):
        name = record.get("source")
        return (kind, name, json.dumps((source or {}).get(name), sort_keys=True))
    return None


def _overlap(a: range | set[Any], b: range | set[Any]) -> list[Any]:
    if isinstance(a, range) and isinstance(b, range):
        lo, hi = max(a.start, b.start), min(a.stop, b.stop)
        return list(range(lo, hi))
    if isinstance(a, range):
        a, b = b, a
    return sorted((x for x in a if x in b), key=str)


def check_split_overlap(train_description: Mapping[str, Any] | None, evaluated_description: Mapping[str, Any],
                        split: str) -> str | None:
    """Refuse an evaluated split that shares cases with the split the model was trained on.

    Args:
        train_description: the ``data`` record of the model's config.json (written by the trainer).
        evaluated_description: :func:`describe` of the evaluated data spec.
        split: the evaluated split.

    Returns:
        None when the splits are known to be disjoint (or come from different sources); a sentence
        saying why the check could not be made otherwise (e.g. no training description).

    Raises:
        ValueError: naming the shared cases when the splits overlap.
    """
    if not train_description:
        return "The model's config.json holds no training-data description, so overlap with training data was not checked."
    train_record = (train_description.get("splits") or {}).get("train")
    train_id = _source_identity(train_description, "train")
    if train_record is None or train_id is None:
        return (f"The training data ({train_description.get('kind', 'unknown kind')}) are not identified by split, "
                "so overlap with training data was not checked.")
    if train_description.get("kind") != evaluated_description.get("kind"):
        return None
    if train_id != _source_identity(evaluated_description, split):
        return None
    shared = _overlap(_case_ids(train_record), _case_ids(evaluated_description["splits"][split]))
    if shared:
        examples = ", ".join(str(s) for s in shared[:5]) + (" ..." if len(shared) > 5 else "")
        raise ValueError(
            f"the {split!r} split shares {len(shared)} case(s) with the model's training split ({examples}); "
            f"evaluate on cases the model never saw (a disjoint split, e.g. --split test, or another seed/index range)")
    return None


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def _clean(value: Any) -> Any:
    """JSON-safe, with NaN/inf as null (strict JSON) and numpy/torch scalars as Python numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _clean(value.tolist())
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return value


def _nanmean(values: Any) -> float:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else math.nan


def _ci(ci: Any) -> dict[str, Any]:
    return {"estimate": ci.estimate, "low": ci.low, "high": ci.high, "n": ci.n}


def _subset(ds: Dataset, n: int | None) -> Dataset:
    return ds if n is None or n >= len(ds) else IndexSubset(ds, range(n))


def _base_dataset(ds: Any) -> Any:
    while isinstance(ds, IndexSubset):
        ds = ds.dataset
    return ds


class _Figures:
    """Writes PNGs into ``folder``; the document cites them as ``figures/<name>.png``."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.index: dict[str, str] = {}

    def draw(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[str]:
        """Draw one figure; returns ``[relative path]`` (empty when figures are off)."""
        if self.folder is None:
            return []
        fn(*args, path=self.folder / f"{name}.png", **kwargs)
        rel = f"figures/{name}.png"
        self.index[name] = rel
        return [rel]


def _to_tensor_list(values: Any) -> list[Any]:
    if isinstance(values, torch.Tensor):
        return values.reshape(-1).tolist()
    return list(values)


def _batch_groups(batch: Mapping[str, Any], n: int) -> list[str] | None:
    ids = batch.get("patient_id")
    if ids is None:
        return None
    ids = _to_tensor_list(ids)
    if len(ids) != n:
        raise ValueError(f"batch['patient_id'] holds {len(ids)} ids for {n} cases")
    return [str(i) for i in ids]


def _positive_class(num_classes: int) -> int | None:
    return 1 if num_classes == 2 else None


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
    # localization / faithfulness
    ap: list[torch.Tensor] = dataclasses.field(default_factory=list)
    pg: list[torch.Tensor] = dataclasses.field(default_factory=list)
    ap_ceiling: list[torch.Tensor] = dataclasses.field(default_factory=list)  # the mask itself as the map
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
    nodule_ids: list[str] = dataclasses.field(default_factory=list)
    cache_parts: dict[str, list[torch.Tensor]] = dataclasses.field(default_factory=dict)
    missing_concepts: tuple[str, ...] = ()
    data_concepts: dict[str, list[torch.Tensor]] = dataclasses.field(default_factory=dict)
    data_measurements: dict[str, list[torch.Tensor]] = dataclasses.field(default_factory=dict)
    # mil
    inst_scores: list[torch.Tensor] = dataclasses.field(default_factory=list)
    inst_labels: list[torch.Tensor] = dataclasses.field(default_factory=list)
    topk_share: list[float] = dataclasses.field(default_factory=list)
    exclusion_delta: list[torch.Tensor] = dataclasses.field(default_factory=list)
    exclusion_flipped: list[torch.Tensor] = dataclasses.field(default_factory=list)
    curves: dict[str, list[torch.Tensor]] = dataclasses.field(default_factory=dict)
    curve_fractions: torch.Tensor | None = None
    heatmap: tuple[np.ndarray, str] | None = None
    n_cases: int = 0

    def add_groups(self, groups: list[str] | None) -> None:
        if groups is None:
            self.has_groups = False
            return
        self.groups = (self.groups or []) + groups


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().cpu() for p in parts]) if parts else torch.zeros(0)


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


def _localize(col: _Collected, maps: torch.Tensor, batch: Mapping[str, Any], q: float) -> None:
    mask = batch.get("mask")
    if mask is None:
        return
    col.masks_seen = True
    col.ap.append(activation_precision(maps, mask, q))
    col.ap_ceiling.append(activation_precision(mask.float(), mask, q))
    col.pg.append(pointing_game(maps, mask))


def _size(col: _Collected, contributions: torch.Tensor, predicted: torch.Tensor) -> None:
    size = explanation_size(contributions, logits_class_index=predicted)
    col.size_nonzero.extend(size["per_case_nonzero"])
    col.size_needed.extend(size["per_case_terms_needed"])
    col.num_terms = size["num_terms"]


def _run_images(model: Any, loader: Iterable[Mapping[str, Any]], limits: EvaluationLimits) -> _Collected:
    from mlmi_zoo.architectures.concepts import concept_values_from_batch

    col = _Collected()
    family = model.family
    for batch in loader:
        x, spacing = _image_batch(model, batch)
        col.spacing_seen |= spacing is not None
        exp = model.explain(x, spacing=spacing) if spacing is not None else model.explain(x)
        n = x.shape[0]
        col.n_cases += n
        predicted = exp.logits.argmax(-1)  # (B,)
        col.logits.append(exp.logits.cpu())
        col.labels.append(torch.as_tensor(batch["label"]).reshape(-1).cpu())
        col.add_groups(_batch_groups(batch, n))
        _collect_measurements(col, exp.measurements, batch)
        maps = None
        if family in ("protopnet", "cbm") and exp.decomposable:
            rows = torch.arange(n)
            top = exp.contributions[rows, predicted].argmax(-1)  # (B,) largest contribution to the decision
            source = exp.localization if family == "protopnet" else exp.concept_maps  # (B, P|K, *spatial)
            maps = source[rows, top]  # (B, *spatial)
            col.top.append(top.cpu())
            col.contributions.append(exp.contributions.cpu())
            col.decomposition = max(col.decomposition, decomposition_error(exp))
            _size(col, exp.contributions, predicted)
            _localize(col, maps, batch, limits.activation_q)
        if family == "cbm":
            _collect_concepts(col, model, exp, batch, spacing, concept_values_from_batch)
        counted = getattr(exp, "measurement_map", None)
        if counted is not None:
            _collect_counted(col, counted, batch, limits, model.physical, spacing)
        _keep(col, limits, x, maps, batch, spacing)
    return col


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
    if "nodule_id" in batch:
        col.nodule_ids.extend(str(i) for i in _to_tensor_list(batch["nodule_id"]))
    missing = [s.name for s in model.concept_specs if s.name not in given]
    if missing:  # interventions need every concept's ground truth (NaN where a case lacks it)
        col.missing_concepts = tuple(missing)
        return
    values = values_from_batch(model.concept_specs, batch)
    true = model.true_bottleneck(values, spacing)
    for key, part in (("predicted", exp.concept_vector), ("true", true), ("labelled", torch.isfinite(values)),
                      ("labels", torch.as_tensor(batch["label"]).reshape(-1))):
        col.cache_parts.setdefault(key, []).append(part.cpu())


def _run_bags(model: Any, loader: Iterable[Mapping[str, Any]], limits: EvaluationLimits, seed: int) -> _Collected:
    from mlmi_zoo.training.family import training_for

    adapter = training_for(model)
    col = _Collected()
    additive = model.family == "additive_mil"
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
        col.add_groups(_batch_groups(batch, n))
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
        # top-k instances: tumour share (positive bags) and the effect of excluding them
        n_valid = mask.sum(1)  # (B,)
        k = torch.clamp(n_valid - 1, min=0).clamp(max=limits.top_instances)  # keep >= 1 instance
        ranked = scores.masked_fill(~mask, -math.inf).argsort(-1, descending=True)  # (B, N)
        rank = torch.empty_like(ranked).scatter_(1, ranked, torch.arange(mask.shape[1]).expand_as(ranked))
        top_k = (rank < k[:, None]) & mask  # (B, N)
        if inst is not None:
            share_k = torch.minimum(n_valid, torch.tensor(limits.top_instances))
            top_share = (rank < share_k[:, None]) & mask
            for b in range(n):
                if bool(inst[b][mask[b]].any()):  # bags that hold tumour
                    col.topk_share.append(float(inst[b][top_share[b]].float().mean()))
        with torch.no_grad():
            excluded = model(x, mask & ~top_k)  # (B, C)
        rows = torch.arange(n)
        col.exclusion_delta.append((excluded[rows, predicted] - logits[rows, predicted]).cpu())
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
                if int(predicted[b]) == int(target[b]) == int(labels[b]):  # a correctly found positive slide
                    kind = "contributions" if additive else "attention"
                    col.heatmap = (exp.heatmap(b, kind, class_index=int(target[b])), kind)
                    break
    return col


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
            figures += fig.draw("measurement_maps", figs.plot_examples, list(x), list(_cat(col.keep_counted)), titles)
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
    lo, hi = (float(v) for v in getattr(base.config, "spacing_range", (0.5, 1.0)))
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
                                   "truth_mean_abs_diff": float((ta - tb).abs().mean())}
    return out


def _localization_block(col: _Collected, what_map: str, does_not_show: str,
                        tp_mask: torch.Tensor | None) -> dict[str, Any]:
    if not col.masks_seen:
        return _not_applicable("not applicable: these data carry no lesion masks to compare the maps with", does_not_show)
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
              does_not_show: str) -> dict[str, Any]:
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
    return _faithfulness_from_curves(curves["attribution"], curves["random"], fig, what_map, does_not_show, "pixels")


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
    return fig.draw("examples", figs.plot_examples, list(x), list(maps), titles)


# ---------------------------------------------------------------------------------------------
# families
# ---------------------------------------------------------------------------------------------
def _tp_mask(labels: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> torch.Tensor:
    correct = labels == predicted
    return correct & (labels == 1) if num_classes == 2 else correct


def _protopnet(model: Any, col: _Collected, ctx: "_Context") -> dict[str, Any]:
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


def _examples_into(out: dict[str, Any], col: _Collected, model: Any, labels: torch.Tensor, probs: torch.Tensor,
                   ctx: "_Context", map_name: str) -> None:
    figures = _examples(col, model, labels, probs, ctx.figures, map_name, ctx.limits)
    if figures and out["localization"]["applicable"]:
        out["localization"]["figures"] += figures


def _switch_off_check(model: Any, col: _Collected, ctx: "_Context") -> float:
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


def _measure_fn(model: Any) -> Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]] | None:
    if not model.config.quantities:
        return None

    def values(x: torch.Tensor, spacing: torch.Tensor) -> dict[str, torch.Tensor]:
        exp = model.explain(x, spacing=spacing)
        return {name: torch.as_tensor(m.value) for name, m in exp.measurements.items()}

    return values


def _prototype_purity(model: Any, ctx: "_Context") -> dict[str, Any]:
    """Purity of each prototype's nearest training patches: on the lesion, and from its class."""
    from mlmi_zoo.architectures.prototypes import prototype_topk_patches

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

    def batches() -> Iterator[Mapping[str, Any]]:
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
    sources = model.prototype_sources
    pushed = sources is not None and any(r is not None for r in sources)
    metrics["pushed"] = pushed
    figures: list[str] = []
    if pushed:
        records = [r for r in sources if r is not None]
        metrics["unique_prototypes"] = unique_prototypes(records)
        figures = _gallery(model, train, records, ctx)
    else:
        ctx.limitations.append("The prototypes were not projected onto training patches (no push), so they are not "
                               "patches of real cases.")
    block = element(True, metrics=metrics, figures=figures, does_not_show=does_not_show)
    block["details"] = {**details, "patch_on_lesion": "the latent cell overlaps the lesion mask (max-pooled to the grid)",
                        "search": f"first {len(subset)} training cases"}
    return block


def _find_sample(ds: Dataset, index: int) -> Mapping[str, Any] | None:
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


def _gallery(model: Any, train: Dataset, records: list[dict[str, Any]], ctx: "_Context") -> list[str]:
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


def _cbm(model: Any, col: _Collected, ctx: "_Context") -> dict[str, Any]:
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
            _tp_mask(labels, predicted, model.num_classes))
        out["transparency"] = _transparency_block(
            col, "concept value x label-head weight, one term per bottleneck unit",
            "An exact sum over concepts shows how concepts are weighed, not that the concepts capture everything the "
            "image shows.")
    out["visual_recognizability"] = _concept_quality(model, col, ctx)
    out["physical_attribution"], lim = _physical_block(
        col, model, ctx.dataset, ctx.limits, ctx.figures, _concept_measure_fn(model),
        "Agreement in units on these data does not show agreement on other scanners or spacings outside the "
        "evaluated range.", "the model has no continuous concept in physical units")
    ctx.limitations += lim
    out["actionability"] = _interventions(model, col, ctx)
    if col.keep_maps:
        ctx.faithfulness = _deletion(model, col, ctx.limits, ctx.seed, ctx.figures, "top-concept map",
                                     "A faithful concept map shows what the concept predictor uses, not that it "
                                     "matches the radiological definition of the concept.")
        _examples_into(out, col, model, labels, logits.softmax(-1), ctx, "top concept")
    return out


def _concept_measure_fn(model: Any) -> Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]] | None:
    if not any(s.kind == "continuous" and s.unit for s in model.concept_specs):
        return None

    def values(x: torch.Tensor, spacing: torch.Tensor) -> dict[str, torch.Tensor]:
        exp = model.explain(x, spacing=spacing)
        return {name: torch.as_tensor(m.value) for name, m in exp.measurements.items()}

    return values


def _concept_quality(model: Any, col: _Collected, ctx: "_Context") -> dict[str, Any]:
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
    if col.nodule_ids:
        metrics.update(_reader_agreement(model, col, details))
    block = element(True, metrics=metrics, does_not_show=does_not_show)
    block["details"] = details
    return block


def _reader_agreement(model: Any, col: _Collected, details: dict[str, Any]) -> dict[str, Any]:
    """Model vs radiologists beside radiologists vs each other, per rated concept (LIDC-IDRI)."""
    metrics: dict[str, Any] = {}
    nodules = np.asarray(col.nodule_ids)
    for spec in model.concept_specs:
        if spec.kind == "continuous" or spec.name not in col.concept_pred:
            continue
        pred, true = _cat(col.concept_pred[spec.name]), _cat(col.concept_true[spec.name]).numpy()
        ratings: dict[str, list[float]] = {}
        model_by: dict[str, float] = {}
        for nodule in np.unique(nodules):
            rows = np.flatnonzero(nodules == nodule)
            ratings[str(nodule)] = [float(v) for v in true[rows]]
            mean = pred[rows].mean(0)  # a nodule's readings are renderings of one object: average the model
            model_by[str(nodule)] = float(mean.argmax()) if mean.ndim else float(mean >= 0.5)
        weights = "quadratic" if spec.kind == "ordinal" else None
        labels = list(range(spec.width)) if spec.kind != "binary" else [0, 1]
        inter = inter_reader_agreement(ratings, weights=weights, labels=labels)
        model_k = model_reader_agreement(model_by, ratings, weights=weights, labels=labels)
        metrics[f"{spec.name}_model_reader_kappa"] = model_k
        metrics[f"{spec.name}_inter_reader_kappa"] = inter
        details.setdefault(spec.name, {})["reader_agreement"] = {
            "weights": weights, "nodules": len(ratings), "model_reader_kappa": model_k, "inter_reader_kappa": inter}
    return metrics


def _interventions(model: Any, col: _Collected, ctx: "_Context") -> dict[str, Any]:
    from mlmi_zoo.architectures.interventions import (CachedConcepts, FixedOrderPolicy, RandomPolicy,
                                                      UncertaintyPolicy, intervention_curve)

    does_not_show = ("Intervention curves show how much correcting concepts can fix the decision on these data, not "
                     "how often a clinician would correct them correctly.")
    if col.missing_concepts or not col.cache_parts:
        return _not_applicable(f"not applicable: these data carry no ground truth for the concept(s) "
                               f"{', '.join(col.missing_concepts)}, so no concept can be corrected", does_not_show)
    cache = CachedConcepts(*(_cat(col.cache_parts[k]) for k in ("predicted", "true", "labelled", "labels")))
    cache = dataclasses.replace(cache, labelled=cache.labelled.bool(), labels=cache.labels.long())
    policies: list[Any] = [RandomPolicy(ctx.seed), UncertaintyPolicy()]
    val = ctx.split_dataset("val")
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
    block["details"] = {"curves": curves, "oracle": definition,
                        "fixed_order": list(policies[-1].concept_order) if len(policies) == 3 else None}
    return block


def _oracle_accuracy(model: Any, col: _Collected, cache: Any, ctx: "_Context") -> tuple[float, str]:
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

    from mlmi_zoo.architectures.interventions import cache_concepts

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


def _mil(model: Any, col: _Collected, ctx: "_Context") -> dict[str, Any]:
    additive = model.family == "additive_mil"
    scores_name = "contribution to the positive class" if additive else "attention score (pre-softmax)"
    out: dict[str, Any] = {}
    loc_dns = (f"A high instance AUROC shows that the {scores_name} ranks tumour tiles first, not that every tumour "
               "region of a slide is found.")
    if col.inst_scores:
        res = instance_auroc(_cat(col.inst_scores)[None], _cat(col.inst_labels)[None])
        figures = []
        if col.heatmap is not None:
            grid, kind = col.heatmap
            figures = ctx.figures.draw("mil_heatmap", figs.plot_heatmap, grid, title=f"instance {kind} (one slide)",
                                       xlabel="tile column", ylabel="tile row", colorbar_label=f"normalised {kind}")
        out["localization"] = element(True, metrics={"instance_auroc": res["auroc"], "instance_ap": res["ap"],
                                                     "instances": res["n_instances"]},
                                      figures=figures, does_not_show=loc_dns)
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
    if col.curves:
        per = {o: torch.cat(v) for o, v in col.curves.items()}
        curves = {o: Curve(col.curve_fractions, p.mean(0), p, "instance_deletion", o, "probability") for o, p in per.items()}
        ctx.faithfulness = _faithfulness_from_curves(curves["attribution"], curves["random"], ctx.figures, scores_name,
                                                     f"A faithful {scores_name} shows what the model uses, not what a "
                                                     "pathologist would look at.", "instances")
    return out


def _baseline(model: Any, col: _Collected, ctx: "_Context") -> dict[str, Any]:
    out = {name: _not_applicable(BLACK_BOX, "A black box states a decision without evidence.") for name in ELEMENTS}
    block, lim = _physical_block(
        col, model, ctx.dataset, ctx.limits, ctx.figures, _measure_fn(model),
        "Agreement in units on these data does not show agreement on other scanners or spacings.",
        "the baseline has no physical head (config.quantities is empty)")
    if block["applicable"]:
        out["physical_attribution"] = block
        ctx.limitations += lim
    else:
        out["physical_attribution"]["reason"] = f"{BLACK_BOX}; {block['reason'].removeprefix('not applicable: ')}"
    ctx.faithfulness = _not_applicable(BLACK_BOX)
    return out


# ---------------------------------------------------------------------------------------------
# the runner
# ---------------------------------------------------------------------------------------------
@dataclass
class _Context:
    spec: DataSpec
    train_spec: DataSpec | None
    split: str
    dataset: Dataset
    limits: EvaluationLimits
    figures: _Figures
    seed: int
    batch_size: int
    collate: Callable[[list[Any]], Any]
    limitations: list[str] = dataclasses.field(default_factory=list)
    faithfulness: dict[str, Any] | None = None

    def split_dataset(self, split: str) -> Dataset | None:
        if self.spec.size_of(split) == 0:
            return None
        return build_dataset(self.spec, split)

    def train_dataset(self) -> Dataset | None:
        spec = self.train_spec or self.spec
        if spec.size_of("train") == 0:
            return None
        return build_dataset(spec, "train")


def _predict(model: Any, loader: Iterable[Mapping[str, Any]]) -> torch.Tensor:
    """(N, C) probabilities of any zoo model over a loader."""
    from mlmi_zoo.training.family import training_for

    adapter = training_for(model)
    probs = []
    with torch.no_grad():
        for batch in loader:
            inputs = adapter.inputs(model, batch)
            logits = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
            probs.append(logits.softmax(-1).cpu())
    return torch.cat(probs)


def _train_spec_from_config(config_doc: Mapping[str, Any]) -> DataSpec | None:
    recipe = config_doc.get("recipe") or {}
    if isinstance(recipe, Mapping) and isinstance(recipe.get("data"), Mapping):
        return load_data_spec(recipe["data"])
    return None


def _default_command(model_uri: str, spec_text: str, split: str, out: Path | None, figures_dir: Path | None,
                     baseline_uri: str | None, n_boot: int, seed: int, batch_size: int, max_cases: int | None) -> str:
    parts = ["mlmi-zoo", "evaluate", model_uri, "--data", spec_text, "--split", split]
    if out is not None:
        parts += ["--out", str(out)]
    if figures_dir is not None:
        parts += ["--figures", str(figures_dir)]
    if baseline_uri:
        parts += ["--baseline", baseline_uri]
    parts += ["--n-boot", str(n_boot), "--seed", str(seed), "--batch-size", str(batch_size)]
    if max_cases is not None:
        parts += ["--max-cases", str(max_cases)]
    return " ".join(shlex.quote(p) for p in parts)


def evaluate(
    model_uri: str,
    data: DataSpec | str | Path | Mapping[str, Any] | None,
    split: str = "test",
    out: str | Path | None = None,
    figures_dir: str | Path | None = None,
    baseline_uri: str | None = None,
    n_boot: int = 500,
    seed: int = 0,
    batch_size: int = 32,
    max_cases: int | None = None,
    command: str | None = None,
    limits: EvaluationLimits = EvaluationLimits(),
) -> dict[str, Any]:
    """Evaluate one model on one split: the task with bootstrap CIs and the five elements.

    Args:
        model_uri: anything :func:`mlmi_zoo.load` accepts (bundled name, ``hf-hub:``, ``local-dir:``, a folder).
        data: the data (a :class:`DataSpec`, a dict, a YAML/JSON file or ``kind:key=value,...``);
            None uses the data section of the recipe stored in the model's config.json.
        split: ``"train"``, ``"val"`` or ``"test"``; a split that shares cases with the model's
            training split is refused.
        out: where to write the results JSON (None: only returned).
        figures_dir: folder of the PNG figures; default ``out``'s folder + ``figures/`` (no figures
            without either). The document cites them as ``figures/<name>.png``.
        baseline_uri: a black-box model evaluated on the same cases for the task comparison.
        n_boot: bootstrap resamples of the task metrics' 95% intervals.
        seed: seed of the bootstrap, the random deletion order and the random intervention policy.
        batch_size: cases per forward pass.
        max_cases: evaluate only the first ``max_cases`` cases of the split.
        command: the command line recorded in the document (default: the equivalent CLI call).
        limits: caps on the expensive parts (see :class:`EvaluationLimits`).

    Returns:
        The results document (it validates with :func:`~mlmi_zoo.evaluation.results.validate_results`).

    Raises:
        ValueError: overlapping splits, a data set that does not fit the model, bad arguments.
        FileNotFoundError: a model or data file that does not exist.
    """
    import mlmi_zoo
    from mlmi_zoo.hub import resolve
    from mlmi_zoo.registry import read_config

    start = time.perf_counter()
    if n_boot < 1 or batch_size < 1 or (max_cases is not None and max_cases < 1):
        raise ValueError(f"n_boot, batch_size and max_cases must be >= 1; got {n_boot}, {batch_size}, {max_cases}")
    config_doc = read_config(resolve(model_uri))
    model = mlmi_zoo.load(model_uri)
    model.eval()
    train_spec = _train_spec_from_config(config_doc)
    if data is None:
        if train_spec is None:
            raise ValueError(f"{model_uri} records no training recipe; pass the data to evaluate on (--data SPEC)")
        spec = train_spec
    else:
        spec = load_data_spec(data)
    description = describe(spec)
    if split not in description["splits"]:
        raise ValueError(f"split must be one of {sorted(description['splits'])}; got {split!r}")
    limitations: list[str] = []
    unchecked = check_split_overlap(config_doc.get("data"), description, split)
    if unchecked:
        limitations.append(unchecked)
    dataset = build_dataset(spec, split)
    full_size = len(dataset)
    if max_cases is not None:
        dataset = _subset(dataset, max_cases)
    if len(dataset) == 0:
        raise ValueError(f"the {split!r} split of {spec.kind} is empty; set data.{split}_size or choose another split")
    collate = collate_for(spec)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    folder = Path(figures_dir) if figures_dir is not None else (Path(out).parent / "figures" if out is not None else None)
    fig = _Figures(folder)
    ctx = _Context(spec, train_spec, split, dataset, limits, fig, seed, batch_size, collate, limitations)

    family = model.family
    with torch.no_grad():
        if family in MIL_FAMILIES:
            col = _run_bags(model, loader, limits, seed)
        elif family in IMAGE_FAMILIES:
            col = _run_images(model, loader, limits)
        else:
            raise ValueError(f"no evaluation is defined for family {family!r}; known: {IMAGE_FAMILIES + MIL_FAMILIES}")
    logits, labels = _cat(col.logits), _cat(col.labels).long()
    probs = logits.softmax(-1)
    groups = np.asarray(col.groups) if col.has_groups and col.groups else None
    operating_point = float(model.config.operating_point)
    task = {k: _ci(v) for k, v in task_metrics(probs, labels, operating_point, groups, n_boot, seed).items()}
    fig.draw("roc", figs.plot_roc, probs, labels)
    fig.draw("reliability", figs.plot_reliability, probs, labels)

    blocks = {"protopnet": _protopnet, "cbm": _cbm, "baseline": _baseline, "abmil": _mil, "additive_mil": _mil}[family](model, col, ctx)
    faithfulness = ctx.faithfulness or _not_applicable("not applicable: no attribution map to delete along")

    baseline = None
    if baseline_uri:
        base_model = mlmi_zoo.load(baseline_uri)
        base_model.eval()
        base_probs = _predict(base_model, DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate))
        base_task = task_metrics(base_probs, labels, float(base_model.config.operating_point), groups, n_boot, seed)
        base_sha = read_config(resolve(baseline_uri)).get("weights_sha256")
        baseline = {"uri": baseline_uri, "architecture": base_model.architecture, "weights_sha256": base_sha,
                    "task": {k: _ci(v) for k, v in base_task.items()}}

    description["evaluated"] = {"split": split, "cases": len(dataset),
                                "first_cases_only": len(dataset) < full_size}
    if len(dataset) < full_size:
        limitations.append(f"Only the first {len(dataset)} cases of the {split} split were evaluated.")
    num_parameters = sum(p.numel() for p in model.parameters())
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "model": {"uri": model_uri, "architecture": model.architecture, "family": family,
                  "weights_sha256": config_doc.get("weights_sha256"), "num_parameters": num_parameters,
                  "label_names": list(model.label_names), "operating_point": operating_point},
        "data": description,
        "split": split,
        "n_cases": len(dataset),
        "command": command or _default_command(model_uri, data_spec_to_text(spec), split,
                                               Path(out) if out is not None else None, folder, baseline_uri, n_boot,
                                               seed, batch_size, max_cases),
        "mlmi_zoo_version": __version__,
        "seed": seed,
        "bootstrap": {"description": (
            f"95% percentile bootstrap, {n_boot} resamples of "
            + ("patients (all cases of a drawn patient)" if groups is not None else "cases")
            + f", seed {seed}; operating point {operating_point:g} on P({model.label_names[-1]})"), "n": n_boot},
        "task": task,
        "baseline": baseline,
        "elements": {name: blocks[name] for name in ELEMENTS},
        "faithfulness": faithfulness,
        "figures": dict(fig.index),
        "limitations": ctx.limitations,
        "evaluation_limits": dataclasses.asdict(limits),
    }
    doc["elapsed_s"] = round(time.perf_counter() - start, 2)
    doc = _clean(doc)
    problems = validate_results(doc)
    if problems:
        raise ValueError("the results document does not validate: " + "; ".join(problems))
    if out is not None:
        from mlmi_zoo._weights import write_text_atomic

        write_text_atomic(Path(out), json.dumps(doc, indent=2, allow_nan=False) + "\n")
    log.info("evaluated %s on %d %s cases in %.1f s", model_uri, len(dataset), split, doc["elapsed_s"])
    return doc
