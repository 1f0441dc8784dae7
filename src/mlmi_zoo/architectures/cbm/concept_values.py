"""Concept values in *natural* units (see :mod:`.concepts`), from what a person writes or a batch carries.

:func:`parse_concept_value` reads one value a clinician gives for a concept — a level name, a
probability, ``"1.4 cm"`` or a pint quantity — for the test-time interventions of Concept Bottleneck
Models (Koh, Nguyen, Tang, Mussmann, Pierson, Kim and Liang, ICML 2020; we add levels by name and
quantities in any compatible unit, converted by pint). :func:`concept_values_from_batch`
gathers a collated batch's concept labels into the ``(B, Kc)`` table that training, interventions
and evaluation use.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from mlmi_zoo.architectures.blocks.heads import spacing_exponent
from mlmi_zoo.specs import ConceptSpec, ConceptValueError, Measurement
from mlmi_zoo.units import quantity

__all__ = ["parse_concept_value", "concept_values_from_batch"]


def parse_concept_value(spec: ConceptSpec, value: Any, batch: int | None = None) -> torch.Tensor:
    """Turn a value a person gives for ``spec`` into its natural-unit number(s), or refuse it.

    Every value is checked against the concept: a binary concept takes a probability in [0, 1], a
    level concept one of its levels, a continuous concept a finite number (>= 0 for a length, area
    or volume). NaN (which elsewhere means "not known") and None are refused: to leave a concept
    as predicted, leave it out.

    Args:
        spec: the concept.
        value: binary — ``0``/``1``, ``True``/``False`` or a probability; ordinal/categorical — a
            level name (``"solid"``) or index; continuous — a number in ``spec.unit``, a string such
            as ``"1.4 cm"``, a pint quantity or a :class:`Measurement` in any compatible unit. A
            tensor or array gives one value per case (checked the same way).
        batch: the number of cases; a per-case value must have exactly that many.

    Returns:
        a float tensor, scalar or (B,), in natural units (level index for level concepts).

    Raises:
        ConceptValueError: naming the concept, the value and what the concept takes.
    """
    if isinstance(value, Measurement) and spec.unit is not None:
        try:
            value = value.to(spec.unit).value  # a float or a (B,) tensor in the concept's unit
        except ValueError as err:  # pint's dimensionality error, as Measurement.to raises it
            raise ConceptValueError(f"concept {spec.name!r} is in {spec.unit!r}; cannot express {value} in it") from err
    if isinstance(value, (torch.Tensor, np.ndarray)):
        values = torch.as_tensor(value).detach().to(torch.float32)
        if values.ndim > 1 or (batch is not None and values.ndim == 1 and values.numel() != batch):
            raise ConceptValueError(f"concept {spec.name!r} got {values.numel()} values (shape {tuple(values.shape)}) "
                                    f"for a batch of {batch}; give one value, or one per case")
        for i, v in enumerate(values.reshape(-1).tolist()):
            _check(spec, _one_value(spec, v), v, None if values.ndim == 0 else i)
        return values
    number = _one_value(spec, value)
    _check(spec, number, value, None)
    return torch.tensor(number)


def _one_value(spec: ConceptSpec, value: Any) -> float:
    """One value a person gives for ``spec`` as its natural-unit number (unchecked, see :func:`_check`)."""
    if spec.kind == "binary":
        if isinstance(value, str) or not isinstance(value, (int, float, np.number)):
            raise ConceptValueError(f"binary concept {spec.name!r} takes 0, 1, True, False or a probability, "
                                    f"got {value!r}")
        return float(value)
    if spec.kind in ("ordinal", "categorical"):
        levels = spec.levels or ()
        if isinstance(value, str):
            if value not in levels:
                raise ConceptValueError(f"concept {spec.name!r} has levels {list(levels)}, got {value!r}")
            return float(levels.index(value))
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            raise ConceptValueError(f"concept {spec.name!r} takes a level name {list(levels)} or an index "
                                    f"0..{len(levels) - 1}, got {value!r}")
        return float(value)  # an index; _check refuses one that is not a level's
    # continuous
    assert spec.unit is not None  # ConceptSpec refuses a continuous concept without a unit
    if isinstance(value, str) or hasattr(value, "dimensionality"):
        try:
            q = quantity(value) if isinstance(value, str) else value
            return float(q.to(spec.unit).magnitude)
        except Exception as err:  # pint's parse, DimensionalityError and undefined-unit errors
            raise ConceptValueError(f"concept {spec.name!r} is in {spec.unit!r}; cannot express {value!r} in it "
                                    f"(give e.g. '14 {spec.unit}')") from err
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        example = ("a length such as '14 mm'" if spacing_exponent(spec.unit) == 1
                   else f"a quantity such as '14 {spec.unit}'")
        raise ConceptValueError(f"concept {spec.name!r} takes a number in {spec.unit!r} or {example}, got {value!r}")
    return float(value)


def _check(spec: ConceptSpec, number: float, given: Any, case: int | None) -> None:
    """Refuse a natural-unit ``number`` outside what ``spec`` takes (``given``: what the person wrote)."""
    where = "" if case is None else f" (case {case})"
    if spec.kind == "binary" and not 0.0 <= number <= 1.0:  # NaN fails too
        raise ConceptValueError(f"binary concept {spec.name!r} takes a value in [0, 1], got {given!r}{where}")
    if spec.kind in ("ordinal", "categorical"):
        width = len(spec.levels or ())
        if not (math.isfinite(number) and number == int(number) and 0 <= number < width):
            raise ConceptValueError(f"concept {spec.name!r} takes a level name {list(spec.levels or ())} or an index "
                                    f"0..{width - 1}, got {given!r}{where}")
    if spec.kind == "continuous":
        assert spec.unit is not None  # ConceptSpec refuses a continuous concept without a unit
        if not math.isfinite(number):
            raise ConceptValueError(f"concept {spec.name!r} takes a finite number in {spec.unit!r}, "
                                    f"got {given!r}{where}")
        if number < 0 and spacing_exponent(spec.unit) > 0:
            raise ConceptValueError(f"concept {spec.name!r} is a length, area or volume: it takes a value >= 0, "
                                    f"got {given!r}{where}")


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
