"""Concept values in *natural* units (see :mod:`.concepts`), from what a person writes or a batch carries.

:func:`parse_concept_value` reads one value a clinician gives for a concept — a level name, a
probability, ``"1.4 cm"`` or a pint quantity — for the test-time interventions of Concept Bottleneck
Models (Koh, Nguyen, Tang, Mussmann, Pierson, Kim and Liang, ICML 2020; we add levels by name and
quantities in any compatible unit, converted by pint). :func:`concept_values_from_batch`
gathers a collated batch's concept labels into the ``(B, Kc)`` table that training, interventions
and evaluation use.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from mlmi_zoo.specs import ConceptSpec, Measurement
from mlmi_zoo.units import quantity

__all__ = ["parse_concept_value", "concept_values_from_batch"]


def parse_concept_value(spec: ConceptSpec, value: Any) -> torch.Tensor:
    """Turn a value a person gives for ``spec`` into its natural-unit number(s).

    Args:
        spec: the concept.
        value: binary — ``0``/``1``, ``True``/``False`` or a probability; ordinal/categorical — a
            level name (``"solid"``) or index; continuous — a number in ``spec.unit``, a string such
            as ``"1.4 cm"``, a pint quantity or a :class:`Measurement` in any compatible unit. A
            tensor gives one value per case.

    Returns:
        a float tensor, scalar or (B,), in natural units (level index for level concepts).

    Raises:
        ValueError: for an unknown level, a probability outside [0, 1] or an incompatible unit.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float32)
    if spec.kind == "binary":
        if isinstance(value, str):
            raise ValueError(f"binary concept {spec.name!r} takes 0, 1, True, False or a probability, got {value!r}")
        v = float(value)
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"binary concept {spec.name!r} takes a value in [0, 1], got {value!r}")
        return torch.tensor(v)
    if spec.kind in ("ordinal", "categorical"):
        levels = spec.levels or ()
        if isinstance(value, str):
            if value not in levels:
                raise ValueError(f"concept {spec.name!r} has levels {list(levels)}, got {value!r}")
            return torch.tensor(float(levels.index(value)))
        if isinstance(value, bool) or float(value) != int(value) or not 0 <= int(value) < len(levels):
            raise ValueError(f"concept {spec.name!r} takes a level name {list(levels)} or an index 0..{len(levels) - 1}, got {value!r}")
        return torch.tensor(float(value))
    # continuous
    assert spec.unit is not None  # ConceptSpec refuses a continuous concept without a unit
    if isinstance(value, Measurement):
        return torch.as_tensor(value.to(spec.unit).value, dtype=torch.float32)
    if isinstance(value, str) or hasattr(value, "dimensionality"):
        q = quantity(value) if isinstance(value, str) else value
        try:
            magnitude = q.to(spec.unit).magnitude
        except Exception as err:  # pint's DimensionalityError and undefined-unit errors
            raise ValueError(f"concept {spec.name!r} is in {spec.unit!r}; cannot express {value!r} in it "
                             f"(give e.g. '14 {spec.unit}')") from err
        return torch.tensor(float(magnitude))
    return torch.tensor(float(value))


def concept_values_from_batch(specs: Sequence[ConceptSpec], batch: Mapping[str, Any],
                              device: torch.device | None = None) -> torch.Tensor:
    """(B, Kc) natural-unit ground truth from a collated batch (NaN = missing).

    Each concept is read from ``batch["concepts"][name]``, else from ``batch["measurements"][name]``
    (continuous concepts such as ``diameter_mm`` or ``mean_hu`` usually live there).

    Raises:
        ValueError: when a concept is in neither dict.
    """
    concepts = batch.get("concepts") or {}
    measurements = batch.get("measurements") or {}
    cols = []
    for s in specs:
        if s.name in concepts:
            v = concepts[s.name]
        elif s.name in measurements:
            v = measurements[s.name]
        else:
            raise ValueError(f"concept {s.name!r} is in neither batch['concepts'] ({sorted(concepts)}) nor "
                             f"batch['measurements'] ({sorted(measurements)}); label it (NaN where unknown) "
                             f"or remove it from the model's concepts")
        cols.append(torch.as_tensor(v, dtype=torch.float32).reshape(-1))
    out = torch.stack(cols, -1)  # (B, Kc)
    return out if device is None else out.to(device)
