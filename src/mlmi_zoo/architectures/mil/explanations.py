"""What a MIL explanation holds and shows: attention, exact per-instance contributions, heat maps.

:class:`MILExplanation` is what :meth:`ABMIL.explain <mlmi_zoo.architectures.mil.model.ABMIL.explain>`
returns: the attention over a bag's instances, each instance's share of the bag's physical
measurement, and, with tile coordinates, a heat map of either on the slide grid.
:class:`AdditiveMILExplanation` adds the exact per-instance, per-class logit contributions of
additive MIL (Javed et al., NeurIPS 2022), which sum with one bias to the logits. Heat maps are
percentile-normalised (:func:`percentile_normalise`) so that slides of different sizes and score
ranges read alike.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from mlmi_zoo.explanations import Explanation, html_table, png_data_uri

__all__ = ["MILExplanation", "AdditiveMILExplanation", "percentile_normalise"]


def percentile_normalise(values: np.ndarray, signed: bool, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Normalise per-instance scores by their percentiles so slides are comparable.

    Unsigned scores (attention) map ``[P_low, P_high]`` to ``[0, 1]``; signed scores
    (contributions) are divided by ``P_high`` of their magnitude and clipped to ``[-1, 1]``, so zero
    stays zero and the sign stays readable. Values outside are clipped; NaN stays NaN.

    Args:
        values: scores of any shape (NaN = no instance).
        signed: treat as signed contributions.
        low: lower percentile (unsigned scores only).
        high: upper percentile.
    """
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return values.astype(np.float32)
    if signed:
        scale = float(np.percentile(np.abs(finite), high))
        if scale <= 0:
            return np.where(np.isfinite(values), 0.0, np.nan).astype(np.float32)
        return np.clip(values / scale, -1.0, 1.0).astype(np.float32)
    lo, hi = (float(v) for v in np.percentile(finite, [low, high]))
    if hi <= lo:
        return np.where(np.isfinite(values), 0.5, np.nan).astype(np.float32)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _grid_indices(coords: np.ndarray) -> np.ndarray:
    """(n, k) tile coordinates (grid or pixel) -> (n, k) non-negative grid indices.

    The grid step per axis is the greatest common divisor of the offsets, so pixel coordinates that
    are multiples of the tile size map to the same grid as ``(row, col)`` indices.
    """
    c = np.rint(coords).astype(np.int64)
    c = c - c.min(0)
    step = np.gcd.reduce(c, axis=0)
    step[step == 0] = 1
    return c // step


def _heatmap_png(grid: np.ndarray, signed: bool) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if grid.ndim == 3:  # (D, H, W): maximum-magnitude projection along the first axis
        idx = np.nanargmax(np.nan_to_num(np.abs(grid), nan=-1.0), axis=0)
        grid = np.take_along_axis(grid, idx[None], 0)[0]
    h, w = grid.shape
    scale = 4.0 / max(h, w)
    fig, ax = plt.subplots(figsize=(max(1.5, w * scale), max(1.5, h * scale)), dpi=80)
    cmap = plt.get_cmap("RdBu_r" if signed else "viridis").with_extremes(bad="#eeeeee")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-1.0 if signed else 0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.axis("off")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", pad_inches=0.02)
    plt.close(fig)
    return buf.getvalue()


@dataclass(frozen=True, kw_only=True)
class MILExplanation(Explanation):
    """Why a bag got its logits: attention over instances and per-instance physical attribution.

    Attributes:
        attention: (B, N) softmax weights, summing to 1 over valid instances, 0 at padding.
        attention_scores: (B, N) raw pre-softmax scores (padding keeps an arbitrary value).
        contributions: (B, N, C) exact per-instance, per-class logit contributions (additive MIL);
            ``None`` for attention MIL, whose classifier acts on the pooled embedding.
        bias: (C,) the one global bias of additive MIL; ``None`` otherwise.
        instance_measurements: name -> (B, N) each instance's share of the bag measurement, in the
            measurement's unit (0 at padding); summed over N it equals ``measurements[name]``.
        coords: (B, N, 2|3) tile coordinates (grid or pixel), when given to ``explain``.
        mask: (B, N) bool, True at valid instances.
    """

    family: ClassVar[str] = "abmil"
    decomposable: ClassVar[bool] = False

    attention: torch.Tensor  # (B, N)
    attention_scores: torch.Tensor  # (B, N)
    mask: torch.Tensor  # (B, N)
    contributions: torch.Tensor | None = None  # (B, N, C)
    bias: torch.Tensor | None = None  # (C,)
    instance_measurements: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B, N)
    coords: torch.Tensor | None = None  # (B, N, 2|3)

    def instance_scores(self, i: int, scores: str = "contributions", class_index: int | None = None) -> torch.Tensor:
        """(n_valid,) the scores of bag ``i``'s valid instances.

        Args:
            i: bag index.
            scores: ``"contributions"`` (signed, to ``class_index``) or ``"attention"``.
            class_index: class of the contributions; default: the predicted class.

        Raises:
            ValueError: for contributions of a model that has none, or an unknown ``scores``.
        """
        valid = self.mask[i]
        if scores == "attention":
            return self.attention[i][valid]
        if scores != "contributions":
            raise ValueError(f"scores must be 'contributions' or 'attention', got {scores!r}")
        if self.contributions is None:
            raise ValueError(f"{type(self).__name__} has no per-instance contributions (attention MIL pools "
                             f"before classifying); use scores='attention' or an additive_mil model")
        c = int(self.predicted()[i]) if class_index is None else class_index
        return self.contributions[i, :, c][valid]

    def heatmap(self, i: int, scores: str = "contributions", class_index: int | None = None) -> np.ndarray:
        """Render bag ``i``'s instance scores on the slide grid.

        Scores are percentile-normalised (:func:`percentile_normalise`: attention 1st-99th
        percentile -> [0, 1]; contributions by the 99th percentile of their magnitude -> [-1, 1]),
        so heat maps of slides of different sizes are comparable. Cells without an instance are NaN.

        Args:
            i: bag index.
            scores: ``"contributions"`` or ``"attention"``.
            class_index: class of the contributions; default: the predicted class.

        Returns:
            float32 array with one axis per coordinate column, e.g. (rows, cols).

        Raises:
            ValueError: when ``explain`` was not given ``coords``.
        """
        if self.coords is None:
            raise ValueError("this explanation has no coords; pass coords=(B, N, 2) tile positions to explain()")
        values = self.instance_scores(i, scores, class_index).detach().cpu().numpy().astype(np.float64)
        grid_idx = _grid_indices(self.coords[i][self.mask[i]].detach().cpu().numpy())
        shape = tuple(int(v) + 1 for v in grid_idx.max(0))
        if math.prod(shape) > 50_000_000:
            raise ValueError(f"coords span a {shape} grid; pass grid (row, col) indices or tile-aligned pixel coords")
        grid = np.full(shape, np.nan)
        grid[tuple(grid_idx.T)] = values
        return percentile_normalise(grid, signed=scores == "contributions")

    def html_sections(self, i: int) -> list[tuple[str, str]]:
        sections = super().html_sections(i)
        kinds = ["attention"] + (["contributions"] if self.contributions is not None else [])
        if self.coords is not None:
            images = []
            for kind in kinds:
                png = _heatmap_png(self.heatmap(i, kind), signed=kind == "contributions")
                images.append(f'<figure><img src="{png_data_uri(png)}"><figcaption>{kind}</figcaption></figure>')
            sections.append(("Instance heat map (percentile-normalised)", '<div class="gallery">' + "".join(images) + "</div>"))
        sections.append(("Top instances", self._top_table(i, kinds[-1])))
        return sections

    def _top_table(self, i: int, kind: str, k: int = 10) -> str:
        c = int(self.predicted()[i])
        order_scores = self.instance_scores(i, kind)
        order_scores = order_scores.abs() if kind == "contributions" else order_scores
        index = self.mask[i].nonzero().flatten()
        top = index[order_scores.argsort(descending=True)[:k]].tolist()
        name = self.label_names[c] if self.label_names else str(c)
        header = ["instance", "coords", "attention"]
        if self.contributions is not None:
            header.append(f"contribution to {name}")
        header += [f"{q} ({self.measurements[q].unit})" if q in self.measurements else q for q in self.instance_measurements]
        rows = []
        for n in top:
            row: list[Any] = [n, "-" if self.coords is None else tuple(int(v) for v in self.coords[i, n].tolist()),
                              f"{float(self.attention[i, n]):.4f}"]
            if self.contributions is not None:
                row.append(f"{float(self.contributions[i, n, c]):+.4f}")
            row += [f"{float(v[i, n]):.4g}" for v in self.instance_measurements.values()]
            rows.append(tuple(row))
        return html_table(tuple(header), rows)


@dataclass(frozen=True, kw_only=True)
class AdditiveMILExplanation(MILExplanation):
    """Additive MIL: ``contributions.sum(1) + bias == logits`` exactly."""

    family: ClassVar[str] = "additive_mil"
    decomposable: ClassVar[bool] = True

    def logits_from_contributions(self) -> torch.Tensor:
        """(B, C) bias + sum of the per-instance contributions."""
        assert self.contributions is not None and self.bias is not None  # AdditiveMIL.explain sets both
        return self.contributions.sum(1) + self.bias
