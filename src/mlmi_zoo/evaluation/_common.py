"""Shared pieces of an evaluation: the limits, the run context and small helpers.

:class:`EvaluationLimits` caps the expensive parts of an evaluation; :class:`_Context` carries what
the family sections need from the runner (the data spec and evaluated split, the limits, the
figure writer, the seed, the limitations and the faithfulness block they fill in); :class:`_Figures`
writes the PNGs the results document cites; the rest are small tensor, dataset and batch helpers
used by the collection passes, the element blocks and the families.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from mlmi_zoo.training.data_spec import DataSpec, IndexSubset, MaterializedDataset, SizedDataset, build_dataset


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
        control_train_cases: training cases read to fit the data-driven controls (the centre prior,
            the image-statistics regressions).
        off_centre_cases: first cases of the split scored again off the centre (localization of
            lesion-centred crops where the centre prior cannot help).
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
    control_train_cases: int = 500
    off_centre_cases: int = 256


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


def _subset(ds: SizedDataset[dict[str, Any]], n: int | None) -> SizedDataset[dict[str, Any]]:
    return ds if n is None or n >= len(ds) else IndexSubset(ds, range(n))


def _base_dataset(ds: Any) -> Any:
    """The data set under the zoo's wrappers (a subset of cases, cases kept in memory)."""
    while isinstance(ds, (IndexSubset, MaterializedDataset)):
        ds = ds.dataset
    return ds


class _Figures:
    """Writes PNGs into ``folder``; the document cites them as ``figures/<name>.png``."""

    def __init__(self, folder: Path | None, image_crop: float | None = None) -> None:
        self.folder = folder
        self.index: dict[str, str] = {}
        # Figures of input images show only this fraction of each side (None: whole images); set for data whose
        # licence allows a card only a few sample crops (DataSource.whole_images_shareable).
        self.image_crop = image_crop

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


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().cpu() for p in parts]) if parts else torch.zeros(0)


# ---------------------------------------------------------------------------------------------
# the context the runner hands to the family sections
# ---------------------------------------------------------------------------------------------
def _has_split(spec: DataSpec, split: str) -> bool:
    """False for a user's CSV spec that names no file for ``split`` (an evaluation spec holds ``test_csv`` only)."""
    if spec.kind != "folder_csv" or "csv" in spec.params:
        return True
    return f"{split}_csv" in spec.params


@dataclass
class _Context:
    spec: DataSpec
    train_spec: DataSpec | None
    split: str
    dataset: SizedDataset[dict[str, Any]]
    limits: EvaluationLimits
    figures: _Figures
    seed: int
    batch_size: int
    collate: Callable[[list[Any]], Any]
    limitations: list[str] = dataclasses.field(default_factory=list)
    faithfulness: dict[str, Any] | None = None
    n_boot: int = 1000  # bootstrap resamples of every interval
    reference: Any = None  # the controls fitted on the training split (evaluation._reference._Reference)

    def split_dataset(self, split: str) -> SizedDataset[dict[str, Any]] | None:
        if self.spec.size_of(split) == 0 or not _has_split(self.spec, split):
            return None
        return build_dataset(self.spec, split)

    def validation_dataset(self) -> SizedDataset[dict[str, Any]] | None:
        """The evaluated data's validation split, else the model's own (a fine-tuned model evaluated on a
        user's test CSV: the validation cases carved from its training data), else None."""
        own = self.split_dataset("val")
        if own is not None or self.train_spec is None or self.train_spec.size_of("val") == 0 \
                or not _has_split(self.train_spec, "val"):
            return own
        return build_dataset(self.train_spec, "val")

    def train_dataset(self) -> SizedDataset[dict[str, Any]] | None:
        spec = self.train_spec or self.spec
        if spec.size_of("train") == 0:
            return None
        return build_dataset(spec, "train")
