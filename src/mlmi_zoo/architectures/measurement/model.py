"""Measurement bottleneck: image -> lesion map and landmark -> a distance in clinical units -> a grading rule.

Some grades are *defined* by a measurement. The macular-edema risk of IDRiD (Porwal et al.,
"Indian Diabetic Retinopathy Image Dataset (IDRiD)", Data 3(3):25, 2018), after the Early Treatment
Diabetic Retinopathy Study's clinically significant macular edema (ETDRS Research Group, Arch.
Ophthalmol. 103:1796-1806, 1985), is 0 without hard exudates, 1 with hard exudates none of which lies
within one optic-disc diameter (DD) of the macula centre, and 2 with one within it. A model that
predicts such a grade from pixels alone hides whether it found the exudates, where it put the
macula, and how it measured. This model keeps the definition as its decision and learns only what
the definition measures, in the spirit of concept bottlenecks (Koh et al., "Concept Bottleneck
Models", ICML 2020) with measurements in place of concepts:

1. a **lesion map** on the backbone's latent grid: per cell, the probability that the cell holds
   lesion (the rule reads this) and the share of the cell it covers (the area reads this);
2. a **landmark map**: a softmax over the cells whose mode, refined by the weighted mean of the
   3 x 3 cells around it, is the landmark (the fovea);
3. the **measurements**, in the unit of the spacing (DD per pixel for fundus photographs):
   the lesion area (sum of covered shares x cell area) and the distance from the landmark to the
   nearest lesion cell centre (NaN where no cell is lesion);
4. the **rule**, fixed, with two scores: ``P``, the strongest lesion evidence anywhere
   (``max`` over cells of ``logit(p) - logit(threshold)``), and ``N``, the strongest within
   ``radius`` of the landmark. The logits ``(0, min(P, -N), N)`` give exactly: grade 0 when no cell
   is lesion (``P <= 0``), 2 when a lesion cell lies within the radius (``N > 0``, i.e. the measured
   distance is at most the radius), 1 otherwise. Their softmax ranks cases for AUROC.

A user can act on every step: pass ``landmark_xy`` (a corrected fovea), ``threshold`` (a stricter
or looser lesion call), ``radius`` (another definition) or ``spacing`` (a measured disc diameter)
to :meth:`MeasurementBottleneck.explain`; the decision follows the rule on the new measurement.

The explanation's logits are also an exact sum of two terms, "lesion anywhere" (class 1: ``P``)
and "lesion within the radius" (class 1: ``min(P, -N) - P``, class 2: ``N``); both read the one
lesion map, which is what the evaluation localizes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mlmi_zoo.architectures.blocks.backbones import create_backbone, latent_to_input
from mlmi_zoo.architectures.measurement.config import MeasurementConfig
from mlmi_zoo.base import InterpretableModel
from mlmi_zoo.explanations import Explanation, html_table, png_data_uri
from mlmi_zoo.registry import register_backbones
from mlmi_zoo.specs import InputSpecError, Measurement

__all__ = ["MeasurementBottleneck", "MeasurementExplanation", "TERMS"]

TERMS = ("lesion anywhere", "lesion within the radius")
_NO_CELL = -1.0e4  # N where no cell lies within the radius (never happens on a fundus photograph at 1 DD)


@dataclass(frozen=True, kw_only=True)
class MeasurementExplanation(Explanation):
    """What a measurement bottleneck measured and how the rule turned it into a grade.

    ``contributions.sum(-1) + bias == logits`` exactly.

    Attributes:
        lesion_map: (B, 1, H, W) lesion probability per latent cell, on the input's pixels.
        coverage_map: (B, 1, h, w) predicted lesion share of each latent cell.
        lesion_cells: (B, h, w) bool, the cells the rule calls lesion (probability above ``threshold``).
        nearest_xy: (B, 2) ``(x, y)`` input pixels of the centre of the lesion cell nearest the landmark (NaN
            when no cell is lesion): the end of the measured distance.
        landmark_map: (B, 1, H, W) the landmark softmax, on the input's pixels (sums to 1 over cells).
        landmark_xy: (B, 2) the landmark ``(x, y)`` in input pixels (predicted, or the one given).
        landmark_given: whether ``landmark_xy`` was given rather than predicted.
        distance: (B,) distance from the landmark to the nearest lesion cell centre, in ``unit``; NaN
            when no cell is lesion.
        area: (B,) lesion area in ``unit`` squared.
        presence_score: (B,) ``P``; > 0 when some cell is lesion.
        macula_score: (B,) ``N``; > 0 when a lesion cell lies within ``radius``.
        threshold, radius, unit: the rule's parameters as applied.
        spacing: (B, 2) size of one input pixel in ``unit`` (dy, dx).
        contributions: (B, 3, 2) per class, the terms :data:`TERMS`.
        bias: (3,) zeros.
    """

    family = "measurement"
    decomposable = True

    lesion_map: torch.Tensor
    coverage_map: torch.Tensor
    lesion_cells: torch.Tensor
    nearest_xy: torch.Tensor
    landmark_map: torch.Tensor
    landmark_xy: torch.Tensor
    landmark_given: bool
    distance: torch.Tensor
    area: torch.Tensor
    presence_score: torch.Tensor
    macula_score: torch.Tensor
    threshold: float
    radius: float
    unit: str
    spacing: torch.Tensor
    contributions: torch.Tensor
    bias: torch.Tensor

    def logits_from_contributions(self) -> torch.Tensor:
        """(B, 3) bias + the two terms."""
        return self.contributions.sum(-1) + self.bias

    def rule(self) -> torch.Tensor:
        """(B,) the grade the definition gives for the measured distance: 0 none, 1 beyond, 2 within the radius."""
        found = torch.isfinite(self.distance)
        within = found & (self.distance <= self.radius)
        return torch.where(within, 2, torch.where(found, 1, 0))

    def measurement_png(self, i: int, size: float = 5.0) -> bytes:
        """PNG of case ``i``: the lesion map, the landmark, the rule's circle and the nearest lesion, in the unit."""
        import io

        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.patches import Ellipse

        from mlmi_zoo.explanations import _to_display

        if self.inputs is None:
            raise ValueError("this explanation kept no input image to draw on")
        fig, ax = plt.subplots(figsize=(size, size * self.inputs.shape[-2] / self.inputs.shape[-1]), dpi=90)
        ax.imshow(_to_display(self.inputs[i]), interpolation="bilinear")
        ax.imshow(self.lesion_map[i, 0].cpu().numpy(), cmap="viridis", alpha=0.35, vmin=0, vmax=1)
        fx, fy = (float(v) for v in self.landmark_xy[i])
        sy, sx = (float(v) for v in self.spacing[i])
        ax.add_patch(Ellipse((fx, fy), 2 * self.radius / sx, 2 * self.radius / sy, fill=False, color="white", lw=1.5))
        ax.plot([fx], [fy], marker="+", color="white", ms=12, mew=2)
        near = tuple(float(v) for v in self.nearest_xy[i])
        if math.isfinite(near[0]):
            ax.plot([fx, near[0]], [fy, near[1]], color="yellow", lw=1.5)
            ax.text(near[0], near[1], f" {float(self.distance[i]):.2f} {self.unit}", color="yellow", fontsize=9)
        grade = int(self.rule()[i])
        ax.set_title(f"{self.label_names[grade] if self.label_names else grade}\n"
                     f"circle: {self.radius:g} {self.unit} around the {'given' if self.landmark_given else 'predicted'} "
                     f"landmark; lesion area {float(self.area[i]):.3f} {self.unit}^2", fontsize=8)
        ax.axis("off")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight", pad_inches=0.02)
        plt.close(fig)
        return buf.getvalue()

    def html_sections(self, i: int) -> list[tuple[str, str]]:
        sections = super().html_sections(i)
        if self.inputs is not None:
            img = png_data_uri(self.measurement_png(i))
            sections.insert(1, ("Lesion map, landmark and the rule's circle", f'<img src="{img}" width="480">'))
        d = float(self.distance[i])
        rows = [("landmark (x, y) px", f"({float(self.landmark_xy[i, 0]):.1f}, {float(self.landmark_xy[i, 1]):.1f})"
                 + (" given" if self.landmark_given else " predicted")),
                ("nearest lesion to the landmark", "none found" if not math.isfinite(d) else f"{d:.2f} {self.unit}"),
                ("lesion area", f"{float(self.area[i]):.3f} {self.unit}^2"),
                ("rule", f"lesion where p > {self.threshold:g}; grade 2 within {self.radius:g} {self.unit}"),
                ("grade by the rule", self.label_names[int(self.rule()[i])] if self.label_names else str(int(self.rule()[i])))]
        sections.append(("Measurement and rule", html_table(("", ""), rows)))
        return sections


class MeasurementBottleneck(InterpretableModel[MeasurementConfig]):
    """Lesion map + landmark -> distance and area in clinical units -> the fixed grading rule (see the module docstring)."""

    family = "measurement"
    config_class = MeasurementConfig
    # The logits reach the landmark head only through a discrete choice (which cells lie within the radius):
    # it is trained by its own loss (training.MeasurementTraining), not through the decision.
    discrete_parameters = ("landmark_head",)

    def __init__(self, config: MeasurementConfig) -> None:
        super().__init__(config)
        self.backbone = create_backbone(config.backbone, config.in_channels, 2, config.feature_stride)
        f, h = self.backbone.out_channels, config.hidden
        # channel 0: lesion logit (the rule reads it), channel 1: logit of the lesion share of the cell (the area)
        self.lesion_head = nn.Sequential(nn.Conv2d(f, h, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(h, 2, 1))
        self.landmark_head = nn.Sequential(nn.Conv2d(f, h, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(h, 1, 1))

    @property
    def spacing_unit(self) -> str:
        """The rule's unit (``config.unit``, DD per pixel for fundus photographs); the input spec carries it."""
        return self.config.unit

    # -- the parts ----------------------------------------------------------------------------------
    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 2, h, w) lesion and coverage logits and (B, h, w) landmark logits on the latent grid."""
        self.validate_input(x)
        z = self.backbone(x)
        return self.lesion_head(z), self.landmark_head(z)[:, 0]

    def cell_centres(self, grid: tuple[int, int], device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(h,) y and (w,) x input-pixel coordinates of the latent cells' receptive-field centres."""
        stride = self.backbone.stride
        offset = self.backbone.offset if self.backbone.offset is not None else (stride - 1) / 2
        ys = offset + stride * torch.arange(grid[0], dtype=torch.float32, device=device)
        xs = offset + stride * torch.arange(grid[1], dtype=torch.float32, device=device)
        return ys, xs

    def locate_landmark(self, landmark_logits: torch.Tensor) -> torch.Tensor:
        """(B, 2) landmark ``(x, y)`` in input pixels: the mode of the softmax, refined over its 3 x 3 cells."""
        b, h, w = landmark_logits.shape
        ys, xs = self.cell_centres((h, w), landmark_logits.device)
        prob = landmark_logits.flatten(1).softmax(-1).reshape(b, h, w)
        mode = prob.flatten(1).argmax(-1)
        my, mx = mode // w, mode % w
        dy = torch.arange(-1, 2, device=prob.device)
        iy = (my[:, None] + dy[None]).clamp(0, h - 1)  # (B, 3)
        ix = (mx[:, None] + dy[None]).clamp(0, w - 1)
        rows = torch.arange(b, device=prob.device)[:, None, None]
        weight = prob[rows, iy[:, :, None], ix[:, None, :]]  # (B, 3, 3)
        weight = weight / weight.sum((1, 2), keepdim=True)
        y = (weight * ys[iy][:, :, None]).sum((1, 2))
        x = (weight * xs[ix][:, None, :]).sum((1, 2))
        return torch.stack([x, y], -1)

    def _spacing(self, x: torch.Tensor, spacing: Any) -> torch.Tensor:
        s = self.measurement_spacing(x, spacing)
        if s is None:
            raise InputSpecError(f"a measurement bottleneck measures in {self.config.unit}: pass spacing= "
                                 f"({self.config.unit} per pixel, (dy, dx)) or give the model a canonical config.spacing")
        return s.to(device=x.device, dtype=torch.float32)

    def rule_scores(self, lesion_logits: torch.Tensor, landmark_xy: torch.Tensor, spacing: torch.Tensor,
                    threshold: float | None = None, radius: float | None = None) -> dict[str, torch.Tensor]:
        """The rule on the latent grid: scores ``P`` and ``N``, the distance and the logits.

        Args:
            lesion_logits: (B, h, w) lesion logits.
            landmark_xy: (B, 2) landmark ``(x, y)`` in input pixels.
            spacing: (B, 2) pixel size ``(dy, dx)`` in the rule's unit.
            threshold, radius: the rule's parameters (default: the config's).

        Returns:
            ``{"P", "N", "distance", "logits", "cell_distance", "nearest_xy"}``.
        """
        t = self.config.threshold if threshold is None else float(threshold)
        r = self.config.radius if radius is None else float(radius)
        if not 0.0 < t < 1.0 or not (math.isfinite(r) and r > 0):
            raise ValueError(f"threshold must lie strictly between 0 and 1 and radius be positive; got {t}, {r}")
        _, h, w = lesion_logits.shape
        ys, xs = self.cell_centres((h, w), lesion_logits.device)
        dx = (xs[None, None, :] - landmark_xy[:, 0, None, None]) * spacing[:, 1, None, None]
        dy = (ys[None, :, None] - landmark_xy[:, 1, None, None]) * spacing[:, 0, None, None]
        cell_distance = torch.sqrt(dx ** 2 + dy ** 2)  # (B, h, w) in the unit
        s = (lesion_logits - math.log(t / (1 - t))).flatten(1)  # > 0: the cell is lesion
        near = (cell_distance <= r).flatten(1)
        presence = s.max(-1).values
        macula = torch.where(near, s, torch.full_like(s, -math.inf)).max(-1).values
        macula = torch.where(near.any(-1), macula, torch.full_like(macula, _NO_CELL))
        distance, nearest = torch.where(s > 0, cell_distance.flatten(1), torch.full_like(s, math.inf)).min(-1)
        found = torch.isfinite(distance)
        distance = torch.where(found, distance, torch.full_like(distance, math.nan))
        nearest_xy = torch.stack([xs[nearest % w], ys[nearest // w]], -1)
        nearest_xy = torch.where(found[:, None], nearest_xy, torch.full_like(nearest_xy, math.nan))
        logits = torch.stack([torch.zeros_like(presence), torch.minimum(presence, -macula), macula], -1)
        return {"P": presence, "N": macula, "distance": distance, "logits": logits, "cell_distance": cell_distance,
                "nearest_xy": nearest_xy}

    # -- the interface ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3) logits of the rule at the canonical spacing with the predicted landmark."""
        lesion, landmark = self.maps(x)
        return self.rule_scores(lesion[:, 0], self.locate_landmark(landmark), self._spacing(x, None))["logits"]

    @torch.no_grad()
    def explain(self, x: torch.Tensor, spacing: Any = None, landmark_xy: Any = None, threshold: float | None = None,
                radius: float | None = None) -> MeasurementExplanation:
        """Maps, measurements and the rule's decision for ``x``.

        Args:
            x: (B, 3, H, W) network input (after the model's intensity transform).
            spacing: pixel size ``(dy, dx)`` in the rule's unit, one pair or one per case (default:
                the canonical ``config.spacing``), e.g. ``1 / disc diameter in pixels``.
            landmark_xy: (B, 2) or (2,) landmark ``(x, y)`` in input pixels to use instead of the
                predicted one (a corrected fovea).
            threshold: lesion probability above which a cell is lesion (default ``config.threshold``).
            radius: the rule's radius in its unit (default ``config.radius``).

        Raises:
            InputSpecError: a bad ``x`` or ``spacing``.
            ValueError: a ``landmark_xy`` that is not finite (B, 2) pixels, a threshold outside (0, 1)
                or a radius that is not positive.
        """
        s = self._spacing(x, spacing)
        lesion, landmark = self.maps(x)
        b = x.shape[0]
        if landmark_xy is None:
            xy = self.locate_landmark(landmark)
        else:
            xy = torch.as_tensor(landmark_xy, dtype=torch.float32, device=x.device)
            xy = xy.expand(b, 2) if xy.shape == (2,) else xy
            if xy.shape != (b, 2) or not bool(torch.isfinite(xy).all()):
                raise ValueError(f"landmark_xy must be finite (x, y) pixels, shape (2,) or ({b}, 2); "
                                 f"got shape {tuple(torch.as_tensor(landmark_xy).shape)}")
        out = self.rule_scores(lesion[:, 0], xy, s, threshold, radius)
        p, n = out["P"], out["N"]
        contributions = torch.zeros(b, 3, 2, device=x.device)
        contributions[:, 1, 0] = p
        contributions[:, 1, 1] = torch.minimum(p, -n) - p
        contributions[:, 2, 1] = n
        cell_area = s[:, 0] * s[:, 1] * self.backbone.stride ** 2  # unit^2 per latent cell
        coverage = torch.sigmoid(lesion[:, 1:2])
        area = coverage.flatten(1).sum(-1) * cell_area
        size = tuple(x.shape[2:])
        stride, offset = self.backbone.stride, self.backbone.offset
        lesion_map = latent_to_input(torch.sigmoid(lesion[:, 0:1]), size, stride, offset)
        landmark_prob = landmark.flatten(1).softmax(-1).reshape(landmark.shape)[:, None]
        unit = self.config.unit
        measurements = {
            "ex_area_dd2": Measurement("ex_area_dd2", area, f"{unit}^2"),
            "ex_fovea_distance_dd": Measurement("ex_fovea_distance_dd", out["distance"], unit),
            "fovea_x_px": Measurement("fovea_x_px", xy[:, 0], "px"),
            "fovea_y_px": Measurement("fovea_y_px", xy[:, 1], "px"),
        }
        return MeasurementExplanation(
            logits=out["logits"], label_names=self.label_names, measurements=measurements, inputs=x,
            lesion_map=lesion_map, coverage_map=coverage,
            lesion_cells=torch.sigmoid(lesion[:, 0]) > (self.config.threshold if threshold is None else float(threshold)),
            nearest_xy=out["nearest_xy"],
            landmark_map=latent_to_input(landmark_prob, size, stride, offset),
            landmark_xy=xy, landmark_given=landmark_xy is not None, distance=out["distance"], area=area,
            presence_score=p, macula_score=n, threshold=self.config.threshold if threshold is None else float(threshold),
            radius=self.config.radius if radius is None else float(radius), unit=unit, spacing=s,
            contributions=contributions, bias=torch.zeros(3, device=x.device))


register_backbones(MeasurementBottleneck, ("tf_efficientnet_lite0", "resnet18"),
                   "Measurement bottleneck (lesion map + landmark -> distance -> grading rule) on a {backbone} backbone.")
