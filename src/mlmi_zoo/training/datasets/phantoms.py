"""Digital lung-nodule phantoms: CT-like patches in Hounsfield units with exact ground truth.

A procedural stand-in for low-dose chest CT nodule patches (the setting of LIDC-IDRI, Armato et al.,
Medical Physics 2011), built so that every element of interpretability can be *measured*: the lesion
mask is exact, the concepts (spiculation, calcification, texture, margin) are the parameters that drew
the nodule and its Lung-RADS-like size category is read from the measured diameter, the physical
measurements (diameter in mm, area in mm^2 / volume in mL, mean HU) are computed from the mask at the
true spacing, and the label follows a documented Lung-RADS-like rule
(American College of Radiology, Lung-RADS v1.1, 2019; simplified — see ``PHANTOMS.md``).

What we changed with respect to a real CT: the anatomy is a patch of parenchyma, a few vessels, an
optional chest wall and correlated noise (:mod:`.lung_background`); the nodule is a star-shaped body
defined in millimetres (:mod:`.nodule_shape`), so the same object can be rendered at any spacing
(:meth:`NodulePhantom.render`). This module holds the data set: its configuration, how a case is drawn
and rendered; the measurements and sample layout are in :mod:`.nodule_sample`, the label rule in
:mod:`.nodule_rule`. ``source="lidc"`` replaces the drawn nodule by a real radiologist contour from
LIDC-IDRI (see :mod:`.lidc`).

Case ``i`` depends only on ``(seed, i)``: all its random numbers come from
``numpy.random.default_rng([seed, i])``, so it is bit-identical at any data-set length and in any
DataLoader worker.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from mlmi_zoo.specs import ConceptSpec, QuantitySpec
from mlmi_zoo.training.data_spec import SizedDataset
from mlmi_zoo.training.datasets._grid import unit_rows
from mlmi_zoo.training.datasets.lung_background import (AIR_HU, BackgroundParams, correlated_noise, draw_background,
                                                        render_background)
from mlmi_zoo.training.datasets.nodule_rule import nodule_malignancy_rule, nodule_size_category
from mlmi_zoo.training.datasets.nodule_sample import equivalent_diameter_mm, nodule_sample, ordered
from mlmi_zoo.training.datasets.nodule_shape import NoduleShape, render_nodule

__all__ = ["LUNG_WINDOW_HU", "NodulePhantom", "NodulePhantomConfig", "SIZE_CATEGORY_LEVELS", "TEXTURE_LEVELS"]

LUNG_WINDOW_HU = (-1350.0, 150.0)  # level -600, width 1500: the usual lung window

TEXTURE_LEVELS = ("solid", "part-solid", "ground-glass")
# Lung-RADS-like size categories, cut at the label rule's own thresholds (see nodule_size_category).
SIZE_CATEGORY_LEVELS = ("<8 mm", "8-15 mm", ">=15 mm")

_CENTRE_OFFSET_MM = 1.0  # max |offset| of the nodule centre from the patch centre, per axis
_BORDER_MM = 1.0  # free margin between the furthest nodule point and the patch edge
_SPIKE_MM = (1.0, 3.5)  # spicule length range (absolute, so large nodules still fit)
_LOBULATION_MAX = 0.10  # sum of |lobulation amplitudes| (relative radius)
_N_LOB = 3  # lobulation terms
_MAX_SPIKES = 12


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodulePhantomConfig:
    """Everything that defines a :class:`NodulePhantom`; case ``i`` is a function of this and ``i``.

    Args:
        length: number of cases; ``None`` in ``source="lidc"`` mode means all nodules of the split.
        spatial_dims: 2 (a patch ``(H, W)``) or 3 (a volume ``(D, H, W)``).
        size: patch size in pixels; an int means the same on every axis.
        spacing_range: in-plane pixel spacing (mm) drawn uniformly per case (synthetic source).
        slice_spacing_range: slice spacing (mm) drawn uniformly per case (3D synthetic source).
        diameter_range_mm: base diameter of the nodule body, drawn uniformly; the upper end is
            lowered so the nodule always fits the smallest field of view (see ``max_diameter_mm``).
        seed: data-set seed.
        source: ``"synthetic"`` or ``"lidc"`` (real LIDC-IDRI contours and ratings, one case per nodule).
        p_nodule: probability that a case holds a nodule (synthetic only).
        label_noise: probability that the rule's label is flipped.
        lidc_path: the LIDC-IDRI annotation SQLite or its folder (``source="lidc"``; else ``$MLMI_ZOO_DATA``).
        split: ``"train"``, ``"val"``, ``"test"`` or ``None`` (all patients), LIDC only.
        p_spiculation: prior of spiculated nodules.
        p_calcification: prior of calcified nodules.
        texture_probs: priors of solid / part-solid / ground-glass.
        p_sharp: prior of a sharp margin.
        p_chest_wall: probability of a chest-wall region in the patch.
    """

    length: int | None = None
    spatial_dims: int = 2
    size: int | tuple[int, ...] = 64
    spacing_range: tuple[float, float] = (0.5, 1.0)
    slice_spacing_range: tuple[float, float] = (1.0, 2.5)
    diameter_range_mm: tuple[float, float] = (4.0, 30.0)
    seed: int = 0
    source: str = "synthetic"
    p_nodule: float = 1.0
    label_noise: float = 0.0
    lidc_path: str | None = None
    split: str | None = None
    p_spiculation: float = 0.3
    p_calcification: float = 0.15
    texture_probs: tuple[float, float, float] = (0.6, 0.2, 0.2)
    p_sharp: float = 0.5
    p_chest_wall: float = 0.3

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if self.source not in ("synthetic", "lidc"):
            raise ValueError(f"source must be 'synthetic' or 'lidc', got {self.source!r}")
        if self.source == "synthetic" and (self.length is None or self.length < 0):
            raise ValueError(f"a synthetic NodulePhantom needs a length >= 0, got {self.length!r}")
        if not 0.0 <= self.label_noise <= 0.5:
            raise ValueError(f"label_noise must be in [0, 0.5], got {self.label_noise}")
        if not 0.0 <= self.p_nodule <= 1.0:
            raise ValueError(f"p_nodule must be in [0, 1], got {self.p_nodule}")
        lo, hi = self.spacing_range
        if not 0 < lo <= hi:
            raise ValueError(f"spacing_range must be (low, high) with 0 < low <= high mm, got {self.spacing_range}")
        if abs(sum(self.texture_probs) - 1.0) > 1e-6:
            raise ValueError(f"texture_probs must sum to 1, got {self.texture_probs}")
        shape = self.shape
        if len(shape) != self.spatial_dims or min(shape) < 8:
            raise ValueError(f"size must be an int or {self.spatial_dims} ints >= 8, got {self.size!r}")
        if self.source == "synthetic" and self.max_diameter_mm <= self.diameter_range_mm[0]:
            raise ValueError(
                f"a {shape} patch at {self.spacing_range[0]} mm spacing cannot hold a nodule of "
                f">= {self.diameter_range_mm[0]} mm; use a larger size or spacing"
            )

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape ``(H, W)`` or ``(D, H, W)`` in pixels."""
        if isinstance(self.size, int):
            return (self.size,) * self.spatial_dims
        return tuple(int(s) for s in self.size)

    @property
    def max_diameter_mm(self) -> float:
        """Largest base diameter drawn: ``min(diameter_range_mm[1], what fits the smallest FOV)``.

        The furthest nodule point is at most ``R (1 + 0.10) + spike_max_mm`` from its centre, the centre is
        at most 1 mm off the patch centre per axis, and 1 mm of border is kept.
        """
        half = 0.5 * self.min_fov_mm - _BORDER_MM - _CENTRE_OFFSET_MM * math.sqrt(self.spatial_dims) - self.spike_max_mm
        return min(self.diameter_range_mm[1], 2.0 * half / (1.0 + _LOBULATION_MAX))

    @property
    def min_fov_mm(self) -> float:
        """Smallest field of view over axes at the smallest spacings (mm)."""
        return min(n * s for n, s in zip(self.shape, self._min_spacing()))

    @property
    def spike_max_mm(self) -> float:
        """Longest spicule: 3.5 mm, or a tenth of the smallest field of view if that is less."""
        return min(_SPIKE_MM[1], 0.1 * self.min_fov_mm)

    def _min_spacing(self) -> tuple[float, ...]:
        if self.spatial_dims == 2:
            return (self.spacing_range[0],) * 2
        return (self.slice_spacing_range[0], self.spacing_range[0], self.spacing_range[0])


# ---------------------------------------------------------------------------------------------
# the data set
# ---------------------------------------------------------------------------------------------
class NodulePhantom(SizedDataset[dict[str, Any]]):
    """CT-like lung-nodule patches in HU with exact masks, concepts, measurements and labels.

    Args:
        length: number of cases (synthetic); in ``source="lidc"`` mode, ``None`` = all nodules of
            the split, otherwise the first ``length`` of them.
        spatial_dims: 2 or 3.
        size: patch size in pixels (int or per-axis tuple).
        spacing_range: in-plane spacing range (mm) for the synthetic source.
        seed: data-set seed; case ``i`` depends only on ``(seed, i)``.
        source: ``"synthetic"`` or ``"lidc"``.
        p_nodule: probability of a nodule (synthetic); cases without one have an empty mask, label
            0, measurements 0 and NaN concepts.
        label_noise: probability of flipping the rule's label.
        lidc_path: LIDC-IDRI annotation SQLite, or the folder holding it (else ``$MLMI_ZOO_DATA``).
        split: LIDC patient split ``"train"``/``"val"``/``"test"`` or ``None`` for all patients.
        **kwargs: further :class:`NodulePhantomConfig` fields (e.g. ``slice_spacing_range``).

    Each sample is ``{"image": (1, *S) float32 HU, "mask": (1, *S) bool, "spacing": (dims,) mm,
    "label": int64, "concepts": {name: float32}, "measurements": {name: float32}, "index": int}``;
    LIDC samples add ``"reader_concepts"`` (each reader's concepts, NaN-padded), ``"patient_id"``,
    ``"nodule_id"`` and ``"readers"``.
    """

    label_names: tuple[str, ...] = ("benign", "malignant")

    def __init__(self, length: int | None = None, spatial_dims: int = 2, size: int | tuple[int, ...] = 64,
                 spacing_range: tuple[float, float] = (0.5, 1.0), seed: int = 0, source: str = "synthetic",
                 p_nodule: float = 1.0, label_noise: float = 0.0, lidc_path: str | None = None,
                 split: str | None = None, **kwargs: Any) -> None:
        spacing_lo, spacing_hi = spacing_range  # a list (from YAML) becomes the config's tuple
        self.config = NodulePhantomConfig(
            length=length, spatial_dims=spatial_dims, size=size, spacing_range=(spacing_lo, spacing_hi), seed=seed,
            source=source, p_nodule=p_nodule, label_noise=label_noise,
            lidc_path=None if lidc_path is None else str(lidc_path), split=split, **kwargs)
        self._lidc = None
        if source == "lidc":
            if p_nodule != 1.0:
                raise ValueError(f"p_nodule applies to the synthetic source only; source='lidc' got {p_nodule}")
            from mlmi_zoo.training.datasets.lidc import LidcNodules

            self._lidc = LidcNodules(self.config)
            self._length = len(self._lidc) if length is None else length
            if self._length > len(self._lidc):
                raise ValueError(f"length={length} but split {split!r} holds {len(self._lidc)} LIDC nodules; "
                                 f"pass length=None for all of them")
        else:
            self._length = int(length)  # type: ignore[arg-type]

    # -- declarations ---------------------------------------------------------------------------
    @property
    def concept_specs(self) -> tuple[ConceptSpec, ...]:
        """The concepts in each sample's ``concepts`` dict."""
        if self._lidc is not None:
            return self._lidc.concept_specs
        return (
            ConceptSpec("spiculation", "binary", group="margin"),
            ConceptSpec("calcification", "binary", group="density"),
            ConceptSpec("texture", "categorical", levels=TEXTURE_LEVELS, group="density"),
            ConceptSpec("margin_sharp", "binary", group="margin"),
            ConceptSpec("size_category", "ordinal", levels=SIZE_CATEGORY_LEVELS, group="size"),
        )

    @property
    def quantity_specs(self) -> tuple[QuantitySpec, ...]:
        """The measurements in each sample's ``measurements`` dict."""
        size = (QuantitySpec("area_mm2", "mm^2", 0.0, 5000.0) if self.config.spatial_dims == 2
                else QuantitySpec("volume_ml", "mL", 0.0, 200.0))
        return (QuantitySpec("diameter_mm", "mm", 0.0, 100.0), size, QuantitySpec("mean_hu", "HU", -1024.0, 3071.0))

    def __len__(self) -> int:
        return self._length

    # -- drawing ----------------------------------------------------------------------------------
    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, i])

    def _draw(self, rng: np.random.Generator) -> tuple[NoduleShape | None, BackgroundParams, tuple[float, ...], bool]:
        """Draw nodule shape, background, native spacing and the label flip.

        A fixed number of values is drawn whatever the outcome, so every field of a case has its own
        place in the case's random stream.
        """
        cfg = self.config
        dims = cfg.spatial_dims
        u = rng.random(24)
        normals = rng.standard_normal((_N_LOB + _MAX_SPIKES, dims))
        s = cfg.spacing_range[0] + (cfg.spacing_range[1] - cfg.spacing_range[0]) * u[0]
        if dims == 2:
            spacing: tuple[float, ...] = (s, s)
        else:
            lo, hi = cfg.slice_spacing_range
            spacing = (lo + (hi - lo) * u[1], s, s)
        has_nodule = u[2] < cfg.p_nodule
        flip = u[3] < cfg.label_noise
        texture = int(np.searchsorted(np.cumsum(cfg.texture_probs)[:-1], u[4], side="right"))
        calcified = bool(u[5] < cfg.p_calcification)
        spiculated = bool(u[6] < cfg.p_spiculation)
        sharp = bool(u[7] < cfg.p_sharp)
        d_lo, d_hi = cfg.diameter_range_mm[0], cfg.max_diameter_mm
        radius = 0.5 * (d_lo + (d_hi - d_lo) * u[8])
        lob_weights = -np.log(np.maximum(u[9:9 + _N_LOB], 1e-12))  # Dirichlet(1, 1, 1) via exponentials
        lob_amp = lob_weights / lob_weights.sum() * (0.02 + (_LOBULATION_MAX - 0.02) * u[12])
        n_spikes = (6 + int(u[13] * 7)) if spiculated else 0  # 6..12
        spike_u = rng.random((2, _MAX_SPIKES))
        spike_hi = cfg.spike_max_mm
        spike_lo = min(_SPIKE_MM[0], 0.5 * spike_hi)
        shape = NoduleShape(
            centre_mm=_CENTRE_OFFSET_MM * (2.0 * rng.random(dims) - 1.0),
            radius_mm=radius,
            lob_amp=lob_amp,
            lob_dir=unit_rows(normals[:_N_LOB]),
            lob_freq=1.0 + 1.5 * spike_u[1, :_N_LOB],
            lob_phase=2 * np.pi * spike_u[1, _N_LOB:2 * _N_LOB],
            spike_len_mm=(spike_lo + (spike_hi - spike_lo) * spike_u[0])[:n_spikes],
            spike_dir=unit_rows(normals[_N_LOB:])[:n_spikes],
            spike_power=40.0 + 50.0 * float(u[14]),
            texture=texture,
            calcified=calcified,
            sharp=sharp,
            hu_solid=50.0 * float(u[15]),
            hu_ggo=-680.0 + 160.0 * float(u[16]),
            hu_calc=300.0 + 600.0 * float(u[17]),
            core_frac=0.35 + 0.25 * float(u[18]),
            calc_frac=0.3 + 0.25 * float(u[19]),
            edge_mm=1.0 + float(u[20]),
        )
        keep_out = radius * (1 + _LOBULATION_MAX) + spike_hi + _CENTRE_OFFSET_MM * math.sqrt(dims)
        bg = draw_background(rng, dims, cfg.min_fov_mm, keep_out, cfg.p_chest_wall)
        return (shape if has_nodule else None), bg, spacing, flip

    def _render(self, i: int, spacing: tuple[float, ...] | None) -> tuple[dict[str, Any], bool]:
        rng = self._rng(i)
        shape, bg, native, flip = self._draw(rng)
        spacing = native if spacing is None else spacing
        grid = self.config.shape
        img = render_background(bg, grid, spacing)
        if shape is not None:
            img, mask = render_nodule(shape, img, spacing)
        else:
            mask = np.zeros(grid, dtype=bool)
        img = img + np.float32(bg.noise_hu) * correlated_noise(rng, grid, bg.noise_smoothing)
        np.maximum(img, np.float32(AIR_HU), out=img)
        concepts: dict[str, float]
        if shape is not None:
            concepts = {"spiculation": float(len(shape.spike_len_mm) > 0), "calcification": float(shape.calcified),
                        "texture": float(shape.texture), "margin_sharp": float(shape.sharp)}
        else:
            concepts = dict.fromkeys(("spiculation", "calcification", "texture", "margin_sharp"), math.nan)
        # The diameter as the sample stores it (float32), so category and label agree with it exactly.
        diameter = float(np.float32(equivalent_diameter_mm(mask, spacing)[0]))
        # A property of the object measured at its native spacing, like the label (render() keeps it).
        concepts["size_category"] = nodule_size_category(diameter)
        sample = nodule_sample(i, img, mask, spacing, concepts)
        clean = int(nodule_malignancy_rule(concepts["calcification"], concepts["spiculation"], concepts["texture"],
                                           diameter))
        sample["label"] = torch.tensor(clean ^ int(flip), dtype=torch.int64)
        return sample, flip

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if not 0 <= i < self._length:
            raise IndexError(f"index {i} out of range for a NodulePhantom of length {self._length}")
        if self._lidc is not None:
            return self._lidc.sample(i, self._rng(i), None)
        sample, _ = self._render(i, None)
        return ordered(sample)

    def render(self, i: int, spacing: float | Sequence[float]) -> dict[str, Any]:
        """Render case ``i``'s object (same geometry in mm, same concepts) at another spacing.

        Args:
            i: case index.
            spacing: mm per pixel; a number means the same on every axis, else one per axis
                (``(sy, sx)`` or ``(sz, sy, sx)``).

        Returns:
            A sample like ``self[i]`` at that spacing: mask and measurements are recomputed, the
            label and ``size_category`` are the case's (properties of the object, fixed at its native
            spacing), and the noise is the same draw; the field of view changes with the spacing.
        """
        dims = self.config.spatial_dims
        sp = (float(spacing),) * dims if np.isscalar(spacing) else tuple(float(s) for s in spacing)  # type: ignore[arg-type]
        if len(sp) != dims or min(sp) <= 0:
            raise ValueError(f"spacing must be a positive number or {dims} positive numbers (mm), got {spacing!r}")
        if self._lidc is not None:
            return self._lidc.sample(int(i), self._rng(int(i)), sp)
        sample, _ = self._render(int(i), sp)
        native = self[int(i)]
        sample["label"] = native["label"]
        sample["concepts"]["size_category"] = native["concepts"]["size_category"]
        return ordered(sample)

    def render_leaving_out(self, i: int, reader: int) -> dict[str, Any]:
        """LIDC case ``i`` drawn from every reader's outline but reader ``reader``'s (``reader_concepts`` order).

        For comparing a model with that reader on an image that holds nothing the reader drew; the same
        random draws as ``self[i]``, so only the nodule's outline changes. Needs ``source="lidc"`` and a
        nodule with at least two readers.
        """
        if self._lidc is None:
            raise ValueError("render_leaving_out needs source='lidc': synthetic nodules have no readers")
        i = int(i)
        if not 0 <= i < self._length:
            raise IndexError(f"index {i} out of range for a NodulePhantom of length {self._length}")
        return self._lidc.sample(i, self._rng(i), None, leave_out=int(reader))

    def oracle_label(self, concepts: dict[str, Any], measurements: dict[str, Any]) -> Any:
        """The label rule applied to (batched) ground-truth concepts and measurements, without noise."""
        if self._lidc is not None:
            raise ValueError("LIDC labels are radiologist malignancy ratings, not a rule of the concepts")
        return nodule_malignancy_rule(concepts["calcification"], concepts["spiculation"], concepts["texture"],
                                      measurements["diameter_mm"])
