"""Typed concepts <-> the vectors a concept bottleneck model predicts and reasons with.

Concept Bottleneck Models (Koh, Nguyen, Tang, Mussmann, Pierson, Kim, Liang; ICML 2020) predict
human-interpretable concepts from the image and the label from the concepts only. The paper treats
every concept as a scalar (a sigmoid for binary attributes, a regression for ordinal grades). What we
changed:

- **typed concepts**: a :class:`~mlmi_zoo.specs.ConceptSpec` is binary (1 logit), ordinal or
  categorical (one logit per level, softmax and cross-entropy; an ordinal concept's order lives in
  its level names, not in the loss), or continuous with a pint unit (1 value). Continuous
  concepts whose unit is a power of length (mm, mm^2, mL) are predicted in the *pixel domain* and
  converted with the image spacing, exactly as :class:`~mlmi_zoo.architectures.blocks.heads.PhysicalHead`
  does, so that ``diameter_mm`` follows the spacing the user passes; intensities (HU) are not scaled.
  Continuous values are standardised with training-split mean/std held in buffers (saved with the
  weights).
- **missing labels are masked**: a NaN concept label contributes nothing to the loss (and no
  gradient), instead of being dropped with its whole case.
- **per-concept class balance**: ``pos_weight`` for binary concepts and level weights for
  ordinal/categorical concepts, fitted on the training split.

Three representations appear throughout, all with one column per concept (``Kc`` of them) or one per
bottleneck unit (``K`` = sum of the concepts' widths):

- *natural* ``(B, Kc)``: what a person writes — binary 0/1 (or a probability), the level index of an
  ordinal/categorical concept, a continuous value in the concept's unit. NaN = missing. Read from
  a person's words or a batch by :mod:`.concept_values`.
- *internal* ``(B, Kc)``: the loss targets — binary as is, level index, continuous standardised
  pixel-domain value. NaN = missing.
- *bottleneck* ``(B, K)``: what the label head sees — binary probability, level probabilities,
  standardised continuous value.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from mlmi_zoo.architectures.blocks.heads import from_pixel_domain, spacing_exponent, to_pixel_domain
from mlmi_zoo.specs import ConceptSpec, ConceptValueError, Measurement, QuantitySpec

log = logging.getLogger(__name__)

__all__ = ["ConceptCodec", "unit_names"]


def unit_names(specs: Sequence[ConceptSpec]) -> tuple[str, ...]:
    """Names of the bottleneck units: ``"spiculation"``, ``"texture=solid"``, ``"diameter_mm"``."""
    names: list[str] = []
    for s in specs:
        if s.kind in ("ordinal", "categorical"):
            assert s.levels is not None  # ConceptSpec requires levels for these kinds
            names.extend(f"{s.name}={level}" for level in s.levels)
        else:
            names.append(s.name)
    return tuple(names)


def _quantity_spec(spec: ConceptSpec) -> QuantitySpec:
    """The :class:`QuantitySpec` the physical-unit conversions expect (range unused here)."""
    return QuantitySpec(spec.name, spec.unit or "", -math.inf, math.inf)


class ConceptCodec(nn.Module):
    """Encode typed concepts, compute their masked losses, and decode predictions into units.

    Buffers (saved with the weights, fitted on the training split by :meth:`fit`):
        ``binary_prior`` (n_binary,): share of positive labels per binary concept.
        ``level_prior`` (n_level_units,): share of each level, concept after concept.
        ``loc``, ``scale`` (n_continuous,): mean and std of the pixel-domain continuous values.

    Args:
        specs: the concepts, in bottleneck order.
        balance: weight the losses by inverse class frequency (``pos_weight`` for binary concepts,
            level weights for ordinal/categorical ones).
        max_weight: cap on a class weight, so a concept with a handful of positives cannot dominate.
        calibrated: :meth:`bottleneck` removes those weights' shift from the logits, so the bottleneck
            holds probabilities at the training split's rates (:attr:`~mlmi_zoo.architectures.cbm.config.CBMConfig.calibrated_concepts`).
    """

    unit_owner: torch.Tensor  # (K,) buffer
    binary_prior: torch.Tensor  # (n_binary,) buffer
    level_prior: torch.Tensor  # (n_level_units,) buffer
    loc: torch.Tensor  # (n_continuous,) buffer
    scale: torch.Tensor  # (n_continuous,) buffer

    def __init__(self, specs: Sequence[ConceptSpec], balance: bool = True, max_weight: float = 10.0,
                 calibrated: bool = False) -> None:
        super().__init__()
        self.specs = tuple(specs)
        if not self.specs:
            raise ValueError("a concept bottleneck needs at least one ConceptSpec")
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"concept names must be unique, got {names}")
        self.balance = balance
        self.max_weight = max_weight
        self.calibrated = calibrated
        self.unit_names = unit_names(self.specs)
        self.slices: tuple[slice, ...] = ()
        start = 0
        slices = []
        for s in self.specs:
            slices.append(slice(start, start + s.width))
            start += s.width
        self.slices = tuple(slices)
        self.binary = tuple(j for j, s in enumerate(self.specs) if s.kind == "binary")
        self.leveled = tuple(j for j, s in enumerate(self.specs) if s.kind in ("ordinal", "categorical"))
        self.continuous = tuple(j for j, s in enumerate(self.specs) if s.kind == "continuous")
        self.exponents = {j: spacing_exponent(self.specs[j].unit) for j in self.continuous}  # refuse odd units early
        self._binary_units = [self.slices[j].start for j in self.binary]
        self._continuous_units = [self.slices[j].start for j in self.continuous]
        level_slices, offset = [], 0
        for j in self.leveled:
            level_slices.append(slice(offset, offset + self.specs[j].width))
            offset += self.specs[j].width
        self._level_prior_slices = tuple(level_slices)  # concept j's levels inside level_prior
        owner = torch.cat([torch.full((s.width,), j, dtype=torch.long) for j, s in enumerate(self.specs)])
        self.register_buffer("unit_owner", owner, persistent=False)  # (K,) concept index of each unit
        self.register_buffer("binary_prior", torch.full((len(self.binary),), 0.5))
        self.register_buffer("level_prior", torch.cat(
            [torch.full((self.specs[j].width,), 1.0 / self.specs[j].width) for j in self.leveled]
        ) if self.leveled else torch.zeros(0))
        self.register_buffer("loc", torch.zeros(len(self.continuous)))
        self.register_buffer("scale", torch.ones(len(self.continuous)))

    # -- sizes ------------------------------------------------------------------------------------
    @property
    def num_concepts(self) -> int:
        """Number of concepts ``Kc``."""
        return len(self.specs)

    @property
    def width(self) -> int:
        """Number of bottleneck units ``K``."""
        return len(self.unit_names)

    def index(self, name: str) -> int:
        """Position of concept ``name``.

        Raises:
            ConceptValueError: for an unknown name, listing the known ones.
        """
        for j, s in enumerate(self.specs):
            if s.name == name:
                return j
        raise ConceptValueError(f"unknown concept {name!r}; this model's concepts are {[s.name for s in self.specs]}")

    def unit_mask(self, known: torch.Tensor) -> torch.Tensor:
        """(B, Kc) bool per concept -> (B, K) bool per bottleneck unit."""
        return known[:, self.unit_owner]

    def needs_spacing(self) -> bool:
        """Whether some continuous concept is a length, area or volume (converted with the spacing)."""
        return any(k > 0 for k in self.exponents.values())

    # -- training-split statistics ------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, values: torch.Tensor, spacing: torch.Tensor | None) -> None:
        """Fit priors, class weights and continuous normalisation on training-split labels.

        Args:
            values: (N, Kc) natural-unit labels, NaN = missing.
            spacing: (N, dims) mm per pixel, needed when a continuous concept is a length/area/volume.
        """
        values = values.to(torch.float64)
        for b, j in enumerate(self.binary):
            col = values[:, j]
            col = col[torch.isfinite(col)]
            if col.numel() == 0:
                log.warning("binary concept %r has no label in the training split; keeping prior 0.5", self.specs[j].name)
                continue
            self.binary_prior[b] = col.mean().clamp(1e-3, 1 - 1e-3).to(self.binary_prior.dtype)
        for sl, j in zip(self._level_prior_slices, self.leveled):
            col = values[:, j]
            col = col[torch.isfinite(col)]
            width = self.specs[j].width
            if ((col != col.round()) | (col < 0) | (col >= width)).any():
                raise ValueError(f"concept {self.specs[j].name!r} needs level indices 0..{width - 1} "
                                 f"(levels {list(self.specs[j].levels or ())}), got {col.unique()[:8].tolist()}")
            counts = torch.bincount(col.long(), minlength=width).to(torch.float64) + 1.0  # Laplace smoothing
            self.level_prior[sl] = (counts / counts.sum()).to(self.level_prior.dtype)
        if self.continuous:
            internal = self._pixel_domain(values, spacing)
            for c, j in enumerate(self.continuous):
                col = internal[:, j]
                col = col[torch.isfinite(col)]
                if col.numel() < 2:
                    log.warning("continuous concept %r has < 2 labels in the training split; keeping loc 0, scale 1",
                                self.specs[j].name)
                    continue
                self.loc[c] = col.mean().to(self.loc.dtype)
                self.scale[c] = col.std().clamp_min(1e-6).to(self.scale.dtype)

    def pos_weight(self) -> torch.Tensor:
        """(n_binary,) weight of positive labels: (1 - p) / p, capped at ``max_weight`` either way."""
        p = self.binary_prior
        if not self.balance:
            return torch.ones_like(p)
        return ((1 - p) / p).clamp(1 / self.max_weight, self.max_weight)

    def level_weight(self, j: int) -> torch.Tensor:
        """(L,) weight of each level of concept ``j``: 1 / (L p_l), capped at ``max_weight``."""
        sl = self._level_prior_slices[self.leveled.index(j)]
        p = self.level_prior[sl]
        if not self.balance:
            return torch.ones_like(p)
        return (1.0 / (p.numel() * p)).clamp(max=self.max_weight)

    # -- natural <-> internal -----------------------------------------------------------------------
    def _pixel_domain(self, values: torch.Tensor, spacing: torch.Tensor | None) -> torch.Tensor:
        """Continuous columns of (B, Kc) natural values -> pixel domain (other columns unchanged)."""
        out = values.clone()
        for j in self.continuous:
            col = values[:, j]
            if self.exponents[j] == 0:
                continue  # intensities and dimensionless values are not scaled by the spacing
            if not torch.isfinite(col).any():
                continue  # nothing to convert; spacing not needed
            if spacing is None:
                raise ValueError(f"concept {self.specs[j].name!r} is in {self.specs[j].unit!r} and is predicted in pixels; "
                                 f"pass the spacing (mm per pixel, one value per axis) to convert it")
            s = spacing.to(device=col.device, dtype=col.dtype)
            s = s.expand(col.shape[0], -1) if s.shape[0] == 1 else s
            out[:, j] = to_pixel_domain(col, s, _quantity_spec(self.specs[j]))
        return out

    def to_internal(self, values: torch.Tensor, spacing: torch.Tensor | None = None) -> torch.Tensor:
        """(B, Kc) natural values -> (B, Kc) loss targets (NaN stays NaN).

        Args:
            values: natural units (binary 0..1, level index, continuous in the concept's unit).
            spacing: (B, dims) or (1, dims) mm per pixel; needed for length/area/volume concepts.

        Raises:
            ConceptValueError: for values of another shape, a binary value outside [0, 1] or a level
                index that does not exist.
        """
        if values.ndim != 2 or values.shape[1] != self.num_concepts:
            raise ConceptValueError(f"expected concept values of shape (B, {self.num_concepts}), "
                                    f"got {tuple(values.shape)}")
        values = values.to(torch.float32)
        for j in self.binary:
            col = values[:, j]
            bad = torch.isfinite(col) & ((col < 0) | (col > 1))
            if bad.any():
                raise ConceptValueError(f"binary concept {self.specs[j].name!r} needs values in [0, 1] "
                                        f"(NaN = missing), got {col[bad][:5].tolist()}")
        for j in self.leveled:
            col = values[:, j]
            fin = col[torch.isfinite(col)]
            if ((fin != fin.round()) | (fin < 0) | (fin >= self.specs[j].width)).any():
                raise ConceptValueError(f"concept {self.specs[j].name!r} needs level indices "
                                        f"0..{self.specs[j].width - 1} (levels {list(self.specs[j].levels or ())}), "
                                        f"got {fin[:8].tolist()}")
        out = self._pixel_domain(values, spacing) if self.continuous else values.clone()
        for c, j in enumerate(self.continuous):
            out[:, j] = (out[:, j] - self.loc[c]) / self.scale[c]
        return out

    # -- predictions --------------------------------------------------------------------------------
    def bottleneck(self, raw: torch.Tensor) -> torch.Tensor:
        """(B, K) raw head outputs -> (B, K) bottleneck: probabilities, level probabilities, values."""
        parts = []
        for j, (s, sl) in enumerate(zip(self.specs, self.slices)):
            r = raw[:, sl]
            if s.kind == "binary":
                if self.calibrated:  # the balanced loss's optimum is logit(p) + log(pos_weight)
                    r = r - self.pos_weight()[self.binary.index(j)].log().to(r.dtype)
                parts.append(torch.sigmoid(r))
            elif s.kind == "continuous":
                parts.append(r)
            else:
                if self.calibrated:  # the weighted cross-entropy's optimum is log p_l + log w_l + const
                    r = r - self.level_weight(j).log().to(r.dtype)
                parts.append(r.softmax(-1))
        return torch.cat(parts, -1)

    def target_bottleneck(self, internal: torch.Tensor) -> torch.Tensor:
        """(B, Kc) internal targets -> (B, K) the bottleneck vector of those concepts.

        Missing (NaN) concepts are imputed from training-split statistics: the positive rate of a
        binary concept, the level frequencies of a level concept, the mean of a continuous one.
        """
        b = internal.shape[0]
        parts = []
        for j, s in enumerate(self.specs):
            col = internal[:, j]
            known = torch.isfinite(col)
            if s.kind == "binary":
                prior = self.binary_prior[self.binary.index(j)]
                parts.append(torch.where(known, col, prior.to(col.dtype))[:, None])
            elif s.kind == "continuous":
                parts.append(torch.where(known, col, torch.zeros_like(col))[:, None])
            else:
                prior = self.level_prior[self._level_prior_slices[self.leveled.index(j)]]
                onehot = F.one_hot(torch.where(known, col, 0).long(), s.width).to(internal.dtype)  # (B, L)
                parts.append(torch.where(known[:, None], onehot, prior.to(internal.dtype).expand(b, -1)))
        return torch.cat(parts, -1)

    def loss(self, raw: torch.Tensor, internal: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Sum over concepts of each concept's masked, class-weighted loss (Koh et al.'s L_C).

        Binary: BCE with logits and ``pos_weight``; ordinal/categorical: level-weighted
        cross-entropy; continuous: smooth-L1 on standardised pixel-domain values. Each concept's
        loss is a mean over the cases that carry its label; NaN labels contribute exactly 0 and no
        gradient, and a concept with no label in the batch contributes 0.

        Args:
            raw: (B, K) raw head outputs (logits / standardised values).
            internal: (B, Kc) targets from :meth:`to_internal`.

        Returns:
            the total loss and ``{concept name: its loss}``.
        """
        parts: dict[str, torch.Tensor] = {}
        zero = raw.sum() * 0.0
        if self.binary:
            t = internal[:, list(self.binary)]  # (B, nb)
            valid = torch.isfinite(t)
            bce = F.binary_cross_entropy_with_logits(raw[:, self._binary_units], torch.where(valid, t, 0.0),
                                                     pos_weight=self.pos_weight(), reduction="none")
            per = (bce * valid).sum(0) / valid.sum(0).clamp_min(1)  # (nb,)
            for b, j in enumerate(self.binary):
                parts[self.specs[j].name] = per[b]
        for j in self.leveled:
            t = internal[:, j]
            valid = torch.isfinite(t)
            idx = torch.where(valid, t, 0.0).long()
            w = self.level_weight(j).to(raw.dtype)
            ce = F.cross_entropy(raw[:, self.slices[j]], idx, weight=w, reduction="none")  # (B,) already x w[idx]
            denom = (w[idx] * valid).sum()
            parts[self.specs[j].name] = (ce * valid).sum() / denom.clamp_min(1e-12)  # 0 when no label
        if self.continuous:
            t = internal[:, list(self.continuous)]  # (B, nc)
            valid = torch.isfinite(t)
            l1 = F.smooth_l1_loss(raw[:, self._continuous_units], torch.where(valid, t, 0.0), reduction="none")
            per = (l1 * valid).sum(0) / valid.sum(0).clamp_min(1)
            for c, j in enumerate(self.continuous):
                parts[self.specs[j].name] = per[c]
        total = zero + sum(parts.values())
        return total, parts

    # -- decoding -----------------------------------------------------------------------------------
    def continuous_value(self, vector: torch.Tensor, j: int, spacing: torch.Tensor | None) -> torch.Tensor | None:
        """(B,) value of continuous concept ``j`` in its unit, from (B, K) bottleneck vectors.

        Returns ``None`` for a length/area/volume concept when no spacing is known.
        """
        c = self.continuous.index(j)
        pixel = vector[:, self.slices[j].start] * self.scale[c] + self.loc[c]  # (B,)
        if self.exponents[j] == 0:
            s = torch.ones(pixel.shape[0], 1, dtype=pixel.dtype, device=pixel.device)
        elif spacing is None:
            return None
        else:
            s = spacing.to(device=pixel.device, dtype=pixel.dtype)
            s = s.expand(pixel.shape[0], -1) if s.shape[0] == 1 else s
        return from_pixel_domain(pixel, s, _quantity_spec(self.specs[j]))

    def describe(self, vector: torch.Tensor, spacing: torch.Tensor | None) -> dict[str, Any]:
        """(B, K) bottleneck vectors -> named concepts in natural units.

        Returns:
            name -> (B,) probability (binary), (B, L) level probabilities (ordinal/categorical), or a
            :class:`Measurement` with a (B,) value (continuous). Length/area/volume concepts are
            left out when no spacing is known.
        """
        out: dict[str, Any] = {}
        for j, (s, sl) in enumerate(zip(self.specs, self.slices)):
            if s.kind == "binary":
                out[s.name] = vector[:, sl.start]
            elif s.kind == "continuous":
                value = self.continuous_value(vector, j, spacing)
                if value is not None:
                    assert s.unit is not None  # ConceptSpec requires a unit for continuous concepts
                    out[s.name] = Measurement(s.name, value, s.unit)
            else:
                out[s.name] = vector[:, sl]
        return out
