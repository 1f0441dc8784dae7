"""Declarations shared by models, data sets and cards: inputs, physical quantities, concepts.

All are frozen dataclasses that serialise to plain JSON (``to_dict`` / ``from_dict``), so a model's
``config.json`` and its card state exactly what the model expects and what it outputs.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch

from mlmi_zoo.units import convert, parse_unit


class InputSpecError(ValueError):
    """An input violates a model's :class:`InputSpec`. The message names expected and actual."""


@dataclass(frozen=True)
class IntensityTransform:
    """How raw intensities are mapped to what the network sees.

    ``kind``:
      - ``"window"``: clip to ``[low, high]`` (e.g. a HU window) and scale to ``[0, 1]``;
      - ``"scale"``: divide by ``high`` (e.g. 8-bit images: ``high=255``) — ``low`` unused;
      - ``"identity"``: the data already arrive in network range.

    ``mean`` / ``std``: the normalisation that pretrained weights expect, applied after ``kind`` to its
    ``[0, 1]`` values: ``(x - mean) / std`` per channel of a 2D image ``(..., C, H, W)`` (pretrained
    backbones are timm's 2D networks). ``None`` (random initialisation): nothing more is done.
    """

    kind: Literal["window", "scale", "identity"] = "identity"
    low: float = 0.0
    high: float = 1.0
    unit: str | None = None  # e.g. "HU" for a CT window; documents the raw intensity unit
    # one value per input channel; set from the base weights (WeightsProvenance) by the trainer
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.mean is None and self.std is None:
            return
        if self.mean is None or self.std is None or len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"intensity mean and std must both be given, one value per input channel; "
                             f"got mean={self.mean!r}, std={self.std!r}")
        if any(not s > 0 for s in self.std):
            raise ValueError(f"intensity std must be > 0 per channel, got {self.std!r}")
        # from a JSON list (InputSpec.from_dict): keep the dataclass hashable and comparable
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "window":
            x = (x.clamp(self.low, self.high) - self.low) / (self.high - self.low)
        elif self.kind == "scale":
            x = x / self.high
        if self.mean is None or self.std is None:
            return x
        channels = len(self.mean)
        if channels > 1 and (x.ndim < 3 or x.shape[-3] != channels):
            raise InputSpecError(f"the intensity normalisation has {channels} channels and expects (..., C, H, W) "
                                 f"images with C={channels}; got shape {tuple(x.shape)}")
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device)
        if channels > 1:
            mean, std = mean.view(channels, 1, 1), std.view(channels, 1, 1)  # (C, 1, 1) against (..., C, H, W)
        return (x - mean) / std

    def normalised_range(self, low: float, high: float) -> tuple[float, float]:
        """Where ``[low, high]`` (values after ``kind``) lands after ``mean`` / ``std``, over all channels."""
        if self.mean is None or self.std is None:
            return low, high
        ends = [((low - m) / s, (high - m) / s) for m, s in zip(self.mean, self.std)]
        return min(lo for lo, _ in ends), max(hi for _, hi in ends)

    def describe(self) -> str:
        if self.kind == "window":
            text = f"window [{self.low:g}, {self.high:g}] {self.unit or ''} -> [0, 1]".replace("  ", " ")
        elif self.kind == "scale":
            text = f"divide by {self.high:g} -> [0, 1]"
        else:
            text = "none (inputs already in [0, 1])"
        if self.mean is None or self.std is None:
            return text
        return f"{text}, then (x - mean) / std with mean {_values(self.mean)}, std {_values(self.std)}"


def _values(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


@dataclass(frozen=True)
class InputSpec:
    """What a model accepts.

    Args:
        in_channels: image channels (1 for CT/X-ray, 3 for RGB); for feature-bag models, the
            feature dimension ``D``.
        spatial_dims: 2 or 3; 0 for models that take bags of feature vectors.
        size: canonical spatial size the model was trained at (informative; fully convolutional
            models accept other sizes).
        spacing: canonical pixel/voxel spacing in mm per spatial axis, or ``None`` when the data
            carry no physical scale (e.g. resized MedMNIST images).
        intensity: transform from raw intensities to network input.
        modality: e.g. ``"CT"``, ``"CXR"``, ``"fundus"``, ``"histopathology"``.
        value_range: range of the values ``intensity.kind`` produces (``[0, 1]``); with the weights'
            normalisation (``intensity.mean`` / ``std``) :meth:`validate` expects this range mapped
            through it (``intensity.normalised_range``). Inputs far outside it are refused.
    """

    in_channels: int
    spatial_dims: int
    size: tuple[int, ...] = ()
    spacing: tuple[float, ...] | None = None
    intensity: IntensityTransform = field(default_factory=IntensityTransform)
    modality: str = "unknown"
    value_range: tuple[float, float] | None = (0.0, 1.0)

    # -- validation -------------------------------------------------------------------------
    def validate(self, x: torch.Tensor, spacing: Any = None) -> None:
        """Raise :class:`InputSpecError` when ``x`` (``(B, C, *spatial)``) does not fit this spec."""
        if not isinstance(x, torch.Tensor):
            raise InputSpecError(f"expected a torch.Tensor, got {type(x).__name__}")
        expected_ndim = 2 + self.spatial_dims if self.spatial_dims else 3
        if x.ndim != expected_ndim:
            layout = "(B, C, " + ", ".join("DHW"[3 - self.spatial_dims:]) + ")" if self.spatial_dims else "(B, N, D)"
            raise InputSpecError(
                f"expected a {expected_ndim}-D input {layout} for spatial_dims={self.spatial_dims}, "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[0] == 0:
            raise InputSpecError(f"the batch is empty (shape {tuple(x.shape)}); pass at least one case")
        channels = x.shape[1] if self.spatial_dims else x.shape[-1]
        if channels != self.in_channels:
            what = "channels" if self.spatial_dims else "features per instance"
            raise InputSpecError(f"expected {self.in_channels} {what}, got {channels} (shape {tuple(x.shape)})")
        if not x.is_floating_point():
            raise InputSpecError(f"expected a floating-point tensor, got {x.dtype}")
        if torch.compiler.is_compiling():
            # Under torch.export / torch.compile the value checks below would be data-dependent
            # guards (a traced graph cannot branch on its input's values); shape, channels and
            # dtype were checked above, and the eager model keeps the value checks.
            if spacing is not None:
                self.check_spacing(spacing, batch=x.shape[0])
            return
        # One streaming reduction, no input-sized temporaries (isfinite(x).all() allocates several,
        # which on long MIL bags costs more than the model): NaN propagates into both, +-Inf into one.
        xmin, xmax = (float(v) for v in torch.aminmax(x)) if x.numel() else (0.0, 0.0)
        if not (math.isfinite(xmin) and math.isfinite(xmax)):
            raise InputSpecError("input contains NaN or Inf values; clean or mask them before the model")
        if self.value_range is not None and x.numel():
            lo, hi = self.intensity.normalised_range(*self.value_range)
            margin = 0.5 * (hi - lo)  # augmentation may overshoot a little; raw HU never fits
            if xmin < lo - margin or xmax > hi + margin:
                raise InputSpecError(
                    f"input values span [{xmin:.4g}, {xmax:.4g}] but the model expects about "
                    f"[{lo:g}, {hi:g}] after its intensity transform ({self.intensity.describe()}); "
                    f"apply model.input_spec.intensity to raw images first"
                )
        if spacing is not None:
            self.check_spacing(spacing, batch=x.shape[0])

    def check_spacing(self, spacing: Any, batch: int | None = None) -> torch.Tensor:
        """Return ``spacing`` as a ``(B, spatial_dims)`` float tensor in mm, or raise on bad values.

        Numbers are millimetres; a value may also be a length with its unit, as text that pint
        parses (``"0.7 mm"``, ``"700 um"``) or a pint quantity, converted to mm.
        """
        s = torch.as_tensor(_spacing_in_mm(spacing), dtype=torch.float64)
        if s.ndim == 1:
            s = s.unsqueeze(0)
        if s.ndim != 2 or s.shape[-1] != self.spatial_dims:
            raise InputSpecError(
                f"expected spacing with {self.spatial_dims} values per image (mm per axis), got shape {tuple(s.shape)}"
            )
        if batch is not None and s.shape[0] not in (1, batch):
            raise InputSpecError(f"expected spacing for 1 or {batch} images, got {s.shape[0]}")
        if not torch.isfinite(s).all() or (s <= 0).any():
            raise InputSpecError(f"spacing must be finite and positive (mm), got {s.tolist()}")
        return s.float()

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InputSpec":
        d = dict(d)
        d["intensity"] = IntensityTransform(**d.get("intensity", {}))
        for key in ("size", "spacing", "value_range"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)


def _spacing_in_mm(spacing: Any) -> Any:
    """``spacing`` with every length given with a unit (text or a pint quantity) converted to mm."""
    if isinstance(spacing, torch.Tensor):
        return spacing
    if isinstance(spacing, (list, tuple)):
        return [_spacing_in_mm(v) for v in spacing]
    if isinstance(spacing, str) or hasattr(spacing, "units"):
        from mlmi_zoo.units import quantity

        try:
            q = quantity(spacing) if isinstance(spacing, str) else spacing
            return float(q.to("mm").magnitude)
        except Exception as err:  # pint raises several unrelated types (parse, dimensionality)
            raise InputSpecError(f"spacing {spacing!r} is not a length: give mm as numbers, or a length with its "
                                 "unit such as '0.7 mm'") from err
    return spacing


@dataclass(frozen=True)
class QuantitySpec:
    """A physical quantity a head outputs: name (with the unit in it), pint unit, valid range."""

    name: str  # e.g. "diameter_mm"
    unit: str  # pint unit string, e.g. "mm"
    low: float = 0.0
    high: float = math.inf

    def __post_init__(self) -> None:
        parse_unit(self.unit)  # fail at declaration time, not at the first measurement

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "unit": self.unit, "low": self.low, "high": None if math.isinf(self.high) else self.high}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantitySpec":
        return cls(d["name"], d["unit"], d.get("low", 0.0), math.inf if d.get("high") is None else d["high"])


ConceptKind = Literal["binary", "ordinal", "categorical", "continuous"]


@dataclass(frozen=True)
class ConceptSpec:
    """A named, typed concept (Koh et al. 2020) — what a radiologist would say about an image.

    Args:
        name: e.g. ``"spiculation"``, ``"diameter_mm"``.
        kind: ``binary`` (probability of present), ``ordinal`` / ``categorical`` (one of ``levels``),
            ``continuous`` (a number in ``unit``).
        unit: pint unit for continuous concepts (``"mm"``, ``"HU"``, ``"mL"``).
        levels: level names for ordinal/categorical concepts, lowest first for ordinal ones.
        group: optional group name, used by intervention policies that correct groups together.
    """

    name: str
    kind: ConceptKind
    unit: str | None = None
    levels: tuple[str, ...] | None = None
    group: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("binary", "ordinal", "categorical", "continuous"):
            raise ValueError(f"concept {self.name!r}: kind must be binary/ordinal/categorical/continuous, got {self.kind!r}")
        if self.kind == "continuous":
            if not self.unit:
                raise ValueError(f"continuous concept {self.name!r} needs a unit (e.g. 'mm', 'HU')")
            parse_unit(self.unit)
        if self.kind in ("ordinal", "categorical") and (not self.levels or len(self.levels) < 2):
            raise ValueError(f"{self.kind} concept {self.name!r} needs at least two levels, got {self.levels!r}")
        if self.levels is not None and not isinstance(self.levels, tuple):
            object.__setattr__(self, "levels", tuple(self.levels))

    @property
    def width(self) -> int:
        """Number of outputs this concept occupies in a concept vector."""
        if self.kind in ("ordinal", "categorical"):
            assert self.levels is not None  # __post_init__ requires levels for these kinds
            return len(self.levels)
        return 1

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ConceptSpec":
        return cls(**d)


@dataclass(frozen=True)
class Measurement:
    """A measured physical quantity: ``value`` (scalar or per-case tensor) in ``unit``.

    ``Measurement("diameter_mm", t, "mm").to("cm")`` converts with pint.
    """

    name: str
    value: Any  # float or tensor (B,) of magnitudes in `unit`
    unit: str

    def __post_init__(self) -> None:
        parse_unit(self.unit)

    def to(self, unit: str) -> "Measurement":
        """Return the same measurement expressed in ``unit`` (converted by pint)."""
        value = self.value
        if isinstance(value, torch.Tensor):
            factor = float(convert(1.0, self.unit, unit))
            offset = float(convert(0.0, self.unit, unit))
            converted: Any = value * (factor - offset) + offset
        else:
            converted = convert(value, self.unit, unit)
        return Measurement(self.name, converted, unit)

    def to_dict(self) -> dict[str, Any]:
        v = self.value
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().tolist()
        return {"name": self.name, "value": v, "unit": self.unit}

    def __str__(self) -> str:
        v = self.value
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = float(v)
        return f"{v:.3g} {self.unit}" if isinstance(v, float) else f"{v} {self.unit}"


def specs_to_dicts(specs: Sequence[Any]) -> list[dict[str, Any]]:
    return [s.to_dict() for s in specs]
