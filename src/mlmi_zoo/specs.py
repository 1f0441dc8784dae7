"""Declarations shared by models, data sets and cards: inputs, physical quantities, concepts.

All are frozen dataclasses that serialise to plain JSON (``to_dict`` / ``from_dict``), so a model's
``config.json`` and its card state exactly what the model expects and what it outputs.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Sequence

import torch

from mlmi_zoo.units import convert, parse_unit


class InputSpecError(ValueError):
    """An input violates a model's :class:`InputSpec`. The message names expected and actual."""


class ConceptValueError(InputSpecError):
    """A value given for a concept (a test-time intervention) does not fit its :class:`ConceptSpec`."""


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
        spacing_unit: the unit of ``spacing`` and of every spacing given: ``"mm"``, or ``"DD"`` (optic-disc
            diameters per pixel) for a fundus model whose images carry no size in mm.
    """

    in_channels: int
    spatial_dims: int
    size: tuple[int, ...] = ()
    spacing: tuple[float, ...] | None = None
    intensity: IntensityTransform = field(default_factory=IntensityTransform)
    modality: str = "unknown"
    value_range: tuple[float, float] | None = (0.0, 1.0)
    spacing_unit: str = "mm"

    # -- validation -------------------------------------------------------------------------
    # An image more than this many times larger or smaller than `size` on some axis was almost surely
    # not acquired at the canonical spacing: measuring it needs its own spacing.
    MAX_SIZE_RATIO: ClassVar[float] = 4.0
    # A spacing this many times larger or smaller than the canonical one on some axis is a unit slip
    # (metres or micrometres given as mm are 1000x off) or an image the model never saw the like of:
    # refused, not extrapolated. Beyond WARN_SPACING_RATIO (a centimetre given as mm is 10x) it warns.
    MAX_SPACING_RATIO: ClassVar[float] = 100.0
    WARN_SPACING_RATIO: ClassVar[float] = 10.0

    def validate(self, x: torch.Tensor, spacing: Any = None, name: str = "x") -> None:
        """Raise :class:`InputSpecError` when ``x`` (``(B, C, *spatial)``) does not fit this spec.

        :meth:`check_layout` (type, shape, channels, dtype), then :meth:`check_values` (finite and in
        range), then :meth:`check_spacing` when ``spacing`` is given.

        Args:
            x: the input, ``(B, C, *spatial)`` or ``(B, N, D)`` for feature bags.
            spacing: mm per axis, see :meth:`check_spacing`.
            name: the argument's name in messages.

        Raises:
            InputSpecError: naming what was expected and what arrived.
        """
        self.check_layout(x, name)
        self.check_values(x, name=name)
        if spacing is not None:
            self.check_spacing(spacing, batch=x.shape[0])

    def check_layout(self, x: Any, name: str = "x") -> None:
        """Refuse anything but a non-empty floating-point tensor of this spec's layout and channels.

        numpy arrays and lists are refused, not converted: their dtype, and whether the intensity
        transform was applied already, would be guessed. Integer and bool tensors are refused for the
        same reason (a raw 8-bit or HU image is not in network range); float16/float64 are checked
        against the model's parameters by the model.

        Raises:
            InputSpecError: naming what was expected and what arrived.
        """
        if not isinstance(x, torch.Tensor):
            kind = type(x).__qualname__
            kind = kind if type(x).__module__ == "builtins" else f"{type(x).__module__}.{kind}"
            raise InputSpecError(f"{name} must be a torch.Tensor, got {kind}: arrays and lists are not converted "
                                 f"implicitly; use torch.as_tensor({name}, dtype=torch.float32) after the intensity "
                                 "transform")
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
            raise InputSpecError(f"{name} has dtype {x.dtype}; expected a floating-point tensor: apply the model's "
                                 f"intensity transform (model.input_spec.intensity) to raw images, or {name}.float()")

    def check_values(self, x: torch.Tensor, valid: torch.Tensor | None = None, name: str = "x") -> torch.Tensor:
        """Refuse NaN, Inf and values far outside :attr:`value_range`; return what the model may read.

        Args:
            x: an input whose layout :meth:`check_layout` accepted.
            valid: bool over ``x``'s leading axes (a bag's ``(B, N)`` mask), or None (all valid). Only
                valid entries are checked: the model never reads the others, so they may hold
                anything, and those holding NaN or Inf are set to 0 in the returned tensor (a NaN
                times a zero attention weight would still be NaN).
            name: the argument's name in messages.

        Returns:
            ``x`` itself, or, when excluded entries hold NaN or Inf, a copy with those entries set to 0.

        Raises:
            InputSpecError: naming the case (and the instance of a bag) that holds the first bad value.
        """
        if torch.compiler.is_compiling() or not x.numel():
            # Under torch.export / torch.compile these would be data-dependent guards (a traced graph
            # cannot branch on its input's values); the eager model keeps them.
            return x
        # One streaming reduction, no input-sized temporaries (isfinite(x).all() allocates several,
        # which on long MIL bags costs more than the model): NaN propagates into both, +-Inf into one.
        xmin, xmax = (float(v) for v in torch.aminmax(x))
        finite = math.isfinite(xmin) and math.isfinite(xmax)
        if finite and self._in_range(xmin, xmax):
            return x
        if valid is None:  # the rare path: find what to name
            if not finite:
                bad = ~torch.isfinite(x)
                first = int(bad.flatten(1).any(1).nonzero()[0])
                raise InputSpecError(f"{name} holds {int(bad.sum())} NaN or Inf value(s), the first in case {first}; "
                                     "clean them before the model")
            self._refuse_range(xmin, xmax, name)
            return x
        # (B, N) entries that hold a NaN or Inf; only valid ones must be finite
        nonfinite = ~torch.isfinite(x).flatten(valid.ndim).all(-1)
        bad = (nonfinite & valid).nonzero()
        if bad.numel():
            b, n = (int(i) for i in bad[0])
            raise InputSpecError(f"{name}: bag {b}, instance {n} holds NaN or Inf but is a valid instance (mask True); "
                                 f"clean it or set mask[{b}, {n}] = False")
        inside = torch.aminmax(x[valid])
        self._refuse_range(float(inside.min), float(inside.max), name)
        if finite:
            return x
        return x.masked_fill(nonfinite.view(*nonfinite.shape, *[1] * (x.ndim - valid.ndim)), 0.0)

    def _in_range(self, xmin: float, xmax: float) -> bool:
        """Whether values spanning ``[xmin, xmax]`` fit :attr:`value_range` with its margin."""
        if self.value_range is None:
            return True
        lo, hi = self.intensity.normalised_range(*self.value_range)
        margin = 0.5 * (hi - lo)  # augmentation may overshoot a little; raw HU never fits
        return lo - margin <= xmin and xmax <= hi + margin

    def _refuse_range(self, xmin: float, xmax: float, name: str) -> None:
        """Raise :class:`InputSpecError` when values spanning ``[xmin, xmax]`` do not fit :attr:`value_range`."""
        if self._in_range(xmin, xmax):
            return
        assert self.value_range is not None  # no range, nothing out of it
        lo, hi = self.intensity.normalised_range(*self.value_range)
        raise InputSpecError(
            f"{name} values span [{xmin:.4g}, {xmax:.4g}] but the model expects about [{lo:g}, {hi:g}] after its "
            f"intensity transform ({self.intensity.describe()}); apply model.input_spec.intensity to raw images first"
        )

    def check_spacing(self, spacing: Any, batch: int | None = None) -> torch.Tensor:
        """Return ``spacing`` as a ``(B, spatial_dims)`` float tensor in mm, or raise on bad values.

        Numbers are millimetres; a value may also be a length with its unit, as text that pint
        parses (``"0.7 mm"``, ``"700 um"``) or a pint quantity, converted to mm.

        With a canonical :attr:`spacing`, a value :attr:`MAX_SPACING_RATIO` (100) or more times
        larger or smaller than it on some axis is refused: it is almost always a unit slip (metres or
        micrometres given as numbers are 1000x off), and never an image the model has seen the like
        of. One more than :attr:`WARN_SPACING_RATIO` (10) times off is used, with a ``UserWarning``.

        Raises:
            InputSpecError: for a value that is not a positive, finite length, the wrong number of
                values, or an implausible one.
        """
        u = self.spacing_unit
        with_unit = "a length with its unit, such as '700 um'," if u == "mm" else f"a value with its unit, such as '0.01 {u}',"
        in_unit = _spacing_in(spacing, u)
        try:
            s = torch.as_tensor(in_unit, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:  # torch's errors for ragged or non-numeric nests
            raise InputSpecError(f"spacing {spacing!r} must be numbers ({u}) or "
                                 + ("lengths with a unit such as '0.7 mm'" if u == "mm" else f"values in {u}")
                                 + f", {self.spatial_dims} per image") from err
        if s.ndim == 1:
            s = s.unsqueeze(0)
        if s.ndim != 2 or s.shape[-1] != self.spatial_dims:
            raise InputSpecError(
                f"expected spacing with {self.spatial_dims} values per image ({u} per axis), got shape {tuple(s.shape)}"
            )
        if batch is not None and s.shape[0] not in (1, batch):
            raise InputSpecError(f"expected spacing for 1 or {batch} images, got {s.shape[0]}")
        if not torch.isfinite(s).all() or (s <= 0).any():
            raise InputSpecError(f"spacing must be finite and positive ({u}), got {s.tolist()}")
        if self.spacing is not None:
            ratio = s / torch.tensor(self.spacing, dtype=s.dtype)
            fold = float(torch.maximum(ratio, 1 / ratio).max())  # how far off the farthest axis is, either way
            side = "larger" if float(ratio.max()) * float(ratio.min()) > 1 else "smaller"
            if fold >= self.MAX_SPACING_RATIO * (1 - 1e-9):  # 70 mm / 0.7 mm is 100 to rounding
                raise InputSpecError(
                    f"spacing {s.tolist()} {u} is at least {self.MAX_SPACING_RATIO:g}x {side} than the model's "
                    f"canonical spacing {self.spacing} {u} on some axis: give {u} per pixel ({with_unit} is "
                    "converted), or resample the image nearer the canonical spacing"
                )
            if fold > self.WARN_SPACING_RATIO:
                warnings.warn(f"spacing {s.tolist()} {u} is {fold:.0f}x {side} than the model's canonical spacing "
                              f"{self.spacing} {u}: the model has not seen images at such a scale; check the unit "
                              f"({u} per pixel)", UserWarning, stacklevel=2)
        return s.float()

    def measurement_spacing(self, x: torch.Tensor, spacing: Any = None) -> torch.Tensor | None:
        """The ``(B, dims)`` spacing in mm at which ``x`` is measured: ``spacing`` when given, else the
        canonical :attr:`spacing`; None when neither exists (the data carry no physical scale).

        The canonical spacing is assumed only for an image near the training :attr:`size`: one more
        than :attr:`MAX_SIZE_RATIO` (4) times larger or smaller on some axis was almost surely acquired
        at another spacing, and measuring it at the canonical one would report a wrong size (a
        diameter at the head's maximum), so it is refused.

        Args:
            x: ``(B, C, *spatial)`` images whose layout :meth:`check_layout` accepted.
            spacing: mm per axis, see :meth:`check_spacing`; None for the canonical spacing.

        Raises:
            InputSpecError: for a bad ``spacing``, or none for an image far from the training size.
        """
        batch = x.shape[0]
        if spacing is None:
            if self.spacing is None:
                return None
            spatial = tuple(int(n) for n in x.shape[2:])
            ratios = [n / m for n, m in zip(spatial, self.size)]
            if any(not 1 / self.MAX_SIZE_RATIO <= r <= self.MAX_SIZE_RATIO for r in ratios):
                side = "larger" if max(ratios) > self.MAX_SIZE_RATIO else "smaller"
                raise InputSpecError(
                    f"x is {spatial} pixels, more than {self.MAX_SIZE_RATIO:g}x {side} than the {tuple(self.size)} the "
                    f"model was trained at, and no spacing was given: the canonical {self.spacing} {self.spacing_unit} "
                    f"would be assumed and every size measured wrong; pass spacing= ({self.spacing_unit} per pixel) or "
                    "resample the image to about "
                    f"{tuple(self.size)} pixels"
                )
            spacing = self.spacing
        s = self.check_spacing(spacing, batch=batch)
        return (s.expand(batch, -1) if s.shape[0] == 1 else s).to(x.device)

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


def _spacing_in(spacing: Any, unit: str = "mm") -> Any:
    """``spacing`` with every value given with a unit (text or a pint quantity) converted to ``unit``."""
    if isinstance(spacing, torch.Tensor):
        return spacing
    if isinstance(spacing, (list, tuple)):
        return [_spacing_in(v, unit) for v in spacing]
    if isinstance(spacing, str) or hasattr(spacing, "units"):
        from mlmi_zoo.units import quantity

        try:
            q = quantity(spacing) if isinstance(spacing, str) else spacing
            return float(q.to(unit).magnitude)
        except Exception as err:  # pint raises several unrelated types (parse, dimensionality)
            if unit == "mm":
                raise InputSpecError(f"spacing {spacing!r} is not a length: give mm as numbers, or a length with its "
                                     "unit such as '0.7 mm'") from err
            raise InputSpecError(f"spacing {spacing!r} is not in {unit}: give {unit} as numbers, or a value with its "
                                 f"unit such as '0.01 {unit}'") from err
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
