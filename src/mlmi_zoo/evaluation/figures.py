"""Figures for model cards and evaluation reports, one PNG per function.

Each function draws one figure with matplotlib's Agg backend (imported lazily, so importing
:mod:`mlmi_zoo.evaluation` stays cheap and head-less), writes it to ``path`` (parent folders are
created) and returns the path. Plots follow the conventions of the measurements they show: ROC
(Fawcett, Pattern Recognit Lett 2006), reliability diagrams (Guo et al., ICML 2017), Bland–Altman
plots (Bland & Altman, Lancet 1986), deletion curves (Petsiuk et al., BMVC 2018) and
concept-intervention curves (Koh et al., ICML 2020).
"""
from __future__ import annotations

import textwrap

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from mlmi_zoo.evaluation.faithfulness import Curve
from mlmi_zoo.evaluation.physical import bland_altman
from mlmi_zoo.evaluation.task import _as_prob_matrix, expected_calibration_error, reliability_bins

__all__ = [
    "plot_bland_altman",
    "plot_deletion",
    "plot_examples",
    "plot_heatmap",
    "plot_intervention_curves",
    "plot_prototype_gallery",
    "plot_reliability",
    "plot_roc",
]

DPI = 110


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _array(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _display(image: Any) -> np.ndarray:
    """(C, *spatial) or (*spatial) -> (H, W) or (H, W, 3) in [0, 1]; volumes show their middle slice."""
    img = _array(image)
    if img.ndim == 4:  # (C, D, H, W)
        img = img[:, img.shape[1] // 2]
    if img.ndim == 3:
        img = img[0] if img.shape[0] == 1 else np.moveaxis(img[:3], 0, -1)
    lo, hi = float(np.nanmin(img)), float(np.nanmax(img))
    return (img - lo) / (hi - lo + 1e-8)


def _overlay_slice(overlay: Any) -> np.ndarray:
    """(*spatial) overlay -> (H, W); the middle slice of a volume, matching :func:`_display`."""
    ov = _array(overlay)
    if ov.ndim == 3:
        ov = ov[ov.shape[0] // 2]
    return ov


def plot_roc(probs: Any, labels: Any, path: str | Path) -> Path:
    """ROC curve(s): binary, or one one-vs-rest curve per class; AUROC in the legend.

    Args:
        probs: (N, C) class probabilities or (N,) P(positive).
        labels: (N,) integer labels.
        path: output PNG.

    Returns:
        ``path``.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    p, y = _as_prob_matrix(probs), _array(labels).astype(np.int64)
    classes = [1] if p.shape[1] == 2 else list(range(p.shape[1]))
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    for c in classes:
        target = (y == c).astype(np.int64)
        if target.min() == target.max():
            continue  # ROC undefined with one class
        fpr, tpr, _ = roc_curve(target, p[:, c])
        name = "positive class" if len(classes) == 1 else f"class {c} vs rest"
        ax.plot(fpr, tpr, lw=1.8, label=f"{name} (AUROC {roc_auc_score(target, p[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 − specificity (false-positive rate)",
           ylabel="sensitivity (true-positive rate)", title="ROC curve")
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_reliability(probs: Any, labels: Any, path: str | Path, n_bins: int = 15) -> Path:
    """Reliability diagram (accuracy vs confidence per bin) with the bin counts below; ECE in the title.

    Args:
        probs: (N, C) class probabilities or (N,) P(positive).
        labels: (N,) integer labels.
        path: output PNG.
        n_bins: number of equal-width confidence bins.

    Returns:
        ``path``.
    """
    plt = _pyplot()
    stats = reliability_bins(probs, labels, n_bins)
    ece = expected_calibration_error(probs, labels, n_bins)
    edges = stats["edges"]
    centers, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    fig, (ax, ax_count) = plt.subplots(2, 1, figsize=(4.2, 5.0), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    used = stats["count"] > 0
    ax.bar(centers[used], stats["accuracy"][used], width=width * 0.95, color="tab:blue", alpha=0.8, label="accuracy")
    ax.plot(stats["confidence"][used], stats["accuracy"][used], "o", c="k", ms=3, label="mean confidence")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfect calibration")
    ax.set(ylim=(0, 1), ylabel="accuracy (fraction correct)", title=f"Reliability (ECE {ece:.3f}, {n_bins} bins)")
    ax.legend(loc="upper left", fontsize=8)
    ax_count.bar(centers, stats["count"], width=width * 0.95, color="grey")
    ax_count.set(xlim=(0, 1), xlabel="confidence (top-class probability)", ylabel="cases")
    return _save(fig, path)


def plot_bland_altman(pred: Any, ref: Any, path: str | Path, unit: str) -> Path:
    """Bland–Altman plot: difference vs mean of the pair, with bias and 95% limits of agreement.

    Args:
        pred: (N,) model measurements.
        ref: (N,) reference measurements, same unit.
        path: output PNG.
        unit: unit string shown on the axes (e.g. "mm").

    Returns:
        ``path``.
    """
    plt = _pyplot()
    p, r = _array(pred).reshape(-1), _array(ref).reshape(-1)
    keep = np.isfinite(p) & np.isfinite(r)
    p, r = p[keep], r[keep]
    ba = bland_altman(p, r)
    fig, ax = plt.subplots(figsize=(5.0, 3.8))
    ax.scatter((p + r) / 2, p - r, s=12, alpha=0.6, c="tab:blue", edgecolors="none")
    ax.axhline(ba.bias, c="k", lw=1.5, label=f"bias {ba.bias:+.3g} {unit}")
    for value, name in ((ba.upper, "upper"), (ba.lower, "lower")):
        ax.axhline(value, c="tab:red", ls="--", lw=1.2, label=f"{name} LoA {value:+.3g} {unit}")
    ax.axhline(0, c="grey", lw=0.8)
    ax.set(xlabel=f"mean of model and reference ({unit})", ylabel=f"model − reference ({unit})",
           title=f"Bland–Altman (n = {ba.n})")
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_intervention_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    oracle: float | None,
    path: str | Path,
    xlabel: str = "concepts corrected (count)",
    ylabel: str = "task AUROC",
) -> Path:
    """Task metric against the number of concepts corrected, one line per intervention policy.

    Args:
        curves: policy name -> (x, y) with x the number of corrected concepts and y the metric.
        oracle: the metric with every concept set to its ground truth (a dashed line), or None.
        path: output PNG.
        xlabel: x-axis label.
        ylabel: y-axis label (metric and unit).

    Returns:
        ``path``.
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5.0, 3.8))
    for name, (x, y) in curves.items():
        ax.plot(_array(x), _array(y), marker="o", ms=3, lw=1.6, label=name)
    if oracle is not None:
        ax.axhline(float(oracle), c="k", ls="--", lw=1, label=f"all concepts true ({float(oracle):.3f})")
    ax.set(xlabel=xlabel, ylabel=ylabel, title="Concept interventions")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def plot_deletion(curves: Mapping[str, Curve], path: str | Path) -> Path:
    """Deletion/insertion curves (mean target score vs share removed), AUC in the legend.

    Args:
        curves: name -> :class:`~mlmi_zoo.evaluation.faithfulness.Curve`.
        path: output PNG.

    Returns:
        ``path``.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 3.8))
    kinds = {c.kind for c in curves.values()}
    scores = {c.score for c in curves.values()}
    for name, curve in curves.items():
        ax.plot(100 * _array(curve.fractions), _array(curve.scores), lw=1.8, label=f"{name} (AUC {curve.auc:.3f})")
    unit = "instances" if kinds == {"instance_deletion"} else "pixels"
    verb = "inserted" if kinds == {"insertion"} else "removed"
    score = "probability" if scores == {"probability"} else ("logit" if scores == {"logit"} else "score")
    ax.set(xlabel=f"{unit} {verb} (%)", ylabel=f"target-class {score}", xlim=(0, 100),
           title="Deletion curve" if verb == "removed" else "Insertion curve")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _draw_region(ax: Any, region: Any, shape: tuple[int, ...], colour: str = "yellow", style: str = "-") -> None:
    """Outline a box ``(row0, col0, row1, col1)`` (half-open, pixels; 3D boxes use their last two axes
    pairs ``(z0, row0, col0, z1, row1, col1)``) or the contour of a boolean mask."""
    from matplotlib.patches import Rectangle

    if region is None:
        return
    arr = _array(region)
    if arr.ndim == 1 and arr.size in (4, 6):
        half = arr.size // 2
        r0, c0, r1, c1 = arr[half - 2], arr[half - 1], arr[-2], arr[-1]
        ax.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0, r1 - r0, fill=False, ec=colour, ls=style, lw=1.5))
        return
    mask = _overlay_slice(arr)
    if mask.shape != shape:
        raise ValueError(f"a region must be a box of 4/6 numbers or a mask of the image size {shape}; got {arr.shape}")
    if mask.any() and not mask.all():
        ax.contour(mask > 0.5, levels=[0.5], colors=colour, linestyles=style, linewidths=1.2)


# outline colours and line styles of the regions a gallery panel may carry, in order
_REGION_STYLES = (("yellow", "-"), ("cyan", "--"), ("magenta", "-"))


def plot_prototype_gallery(patches: Sequence[tuple[Any, Any, str]], path: str | Path, columns: int = 5,
                           legend: str | None = None, crop: float | None = None) -> Path:
    """A grid of prototype source images with the prototype's patch outlined.

    Args:
        patches: list of (image (C, *spatial), region, title); a region is a box
            ``(row0, col0, row1, col1)`` in pixels (half-open), a (*spatial) bool mask, None, or a list
            of up to three boxes or masks, outlined in yellow, dashed cyan and magenta.
        path: output PNG.
        columns: images per row.
        legend: a line under the grid saying what each outline is.
        crop: show only a square of this fraction of each image side, centred on the first region (boxes
            only; for data whose licence allows only sample crops); None shows whole images.

    Returns:
        ``path``.
    """
    if crop is not None:
        patches = [_crop_panel(image, region, title, crop) for image, region, title in patches]
    plt = _pyplot()
    if not patches:
        raise ValueError("plot_prototype_gallery needs at least one (image, region, title) entry")
    cols = min(columns, len(patches))
    rows = -(-len(patches) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows + (0.4 if legend else 0.0)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, region, title) in zip(axes.flat, patches):
        disp = _display(image)
        ax.imshow(disp, cmap="gray" if disp.ndim == 2 else None, interpolation="nearest")
        regions = region if isinstance(region, list) else [region]
        if len(regions) > len(_REGION_STYLES):
            raise ValueError(f"a gallery panel outlines at most {len(_REGION_STYLES)} regions, got {len(regions)}")
        for r, (colour, style) in zip(regions, _REGION_STYLES):
            _draw_region(ax, r, disp.shape[:2], colour, style)
        ax.set_title(title, fontsize=8)
    if legend:
        fig.text(0.5, 0.005, legend, ha="center", va="bottom", fontsize=7, wrap=True)
    return _save(fig, path)


def plot_examples(images: Sequence[Any], overlays: Sequence[Any | None], titles: Sequence[str], path: str | Path,
                  crop: float | None = None) -> Path:
    """A row of input images, each with an optional heat-map overlay (e.g. similarity or attention).

    Args:
        images: list of (C, *spatial) images.
        overlays: list of (*spatial) maps at image resolution, or None entries.
        titles: one title per image.
        path: output PNG.
        crop: show only a square of this fraction of each side, centred on the overlay's maximum (the
            image centre without one), for data whose licence allows only sample crops; None shows all.

    Returns:
        ``path``.
    """
    plt = _pyplot()
    if not (len(images) == len(overlays) == len(titles)) or not images:
        raise ValueError(
            f"images, overlays and titles must be non-empty and equally long; got {len(images)}, "
            f"{len(overlays)}, {len(titles)}"
        )
    if crop is not None and not 0.0 < crop <= 1.0:
        raise ValueError(f"crop is a fraction of the image side in (0, 1], got {crop}")
    fig, axes = plt.subplots(1, len(images), figsize=(2.4 * len(images), 2.6), squeeze=False)
    for ax, image, overlay, title in zip(axes[0], images, overlays, titles):
        disp = _display(image)
        heat = None if overlay is None else _overlay_slice(overlay)
        if crop is not None:
            window = _crop_window(disp.shape[:2], heat, crop)
            disp = disp[window]
            heat = None if heat is None else heat[window]
            title = f"{title}\n(crop)"
        ax.imshow(disp, cmap="gray" if disp.ndim == 2 else None, interpolation="nearest")
        if heat is not None:
            ax.imshow(heat, cmap="jet", alpha=0.4, interpolation="bilinear")
        # long class names would run into the next panel's title: wrap each line to the panel's width
        ax.set_title("\n".join(textwrap.fill(line, 36) for line in title.split("\n")), fontsize=8)
        ax.axis("off")
    return _save(fig, path)


def _crop_panel(image: Any, region: Any, title: str, fraction: float) -> tuple[np.ndarray, Any, str]:
    """A gallery panel cut to a ``fraction`` square around its first box; boxes move with the crop."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"crop is a fraction of the image side in (0, 1], got {fraction}")
    img = _array(image)
    regions = region if isinstance(region, list) else [region]
    boxes = [None if r is None else _array(r) for r in regions]
    if any(b is not None and not (b.ndim == 1 and b.size == 4) for b in boxes):
        raise ValueError("a cropped gallery panel outlines 2D boxes (row0, col0, row1, col1) only")
    hw = (int(img.shape[-2]), int(img.shape[-1]))
    heat = None
    if boxes and boxes[0] is not None:
        heat = np.zeros(hw)
        heat[min(max(int((boxes[0][0] + boxes[0][2]) // 2), 0), hw[0] - 1),
             min(max(int((boxes[0][1] + boxes[0][3]) // 2), 0), hw[1] - 1)] = 1.0
    rows, cols = _crop_window(hw, heat, fraction)
    moved = [None if b is None else np.array([b[0] - rows.start, b[1] - cols.start, b[2] - rows.start, b[3] - cols.start])
             for b in boxes]
    return img[..., rows, cols], moved if isinstance(region, list) else moved[0], f"{title}\n(crop)"


def _crop_window(hw: tuple[int, int], heat: np.ndarray | None, fraction: float) -> tuple[slice, slice]:
    """A square of ``fraction`` of each side, centred on ``heat``'s maximum (else the centre), inside the image."""
    size = [max(1, round(n * fraction)) for n in hw]
    if heat is not None and heat.shape[:2] == tuple(hw) and np.isfinite(heat).any():
        centre = np.unravel_index(int(np.nanargmax(heat)), heat.shape[:2])
    else:
        centre = (hw[0] // 2, hw[1] // 2)
    return window_around(hw, (int(centre[0]), int(centre[1])), (size[0], size[1]))


def window_around(hw: tuple[int, int], centre: tuple[int, int], size: tuple[int, int]) -> tuple[slice, slice]:
    """Row and column slices of a ``size`` window centred on ``centre``, moved inside an image of shape ``hw``
    (clipped to the image where it is larger): the crop of licence-restricted figures and demo samples."""
    lo = [min(max(c - n // 2, 0), max(h - n, 0)) for c, n, h in zip(centre, size, hw)]
    return slice(lo[0], lo[0] + size[0]), slice(lo[1], lo[1] + size[1])


def plot_heatmap(
    array: Any,
    path: str | Path,
    title: str,
    xlabel: str = "",
    ylabel: str = "",
    colorbar_label: str = "",
    xticklabels: Sequence[str] | None = None,
    yticklabels: Sequence[str] | None = None,
) -> Path:
    """A 2D array as a heat map with a colour bar (e.g. prototype-class weights, a confusion matrix).

    Args:
        array: (H, W) values.
        path: output PNG.
        title: figure title.
        xlabel: x-axis label.
        ylabel: y-axis label.
        colorbar_label: what the colour encodes (with unit).
        xticklabels: one name per column (e.g. prototype or concept names), or None for indices.
        yticklabels: one name per row (e.g. class names), or None for indices.

    Returns:
        ``path``.
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    arr = _array(array)
    if arr.ndim != 2:
        raise ValueError(f"plot_heatmap needs a 2D array; got shape {arr.shape}")
    size = (float(np.clip(1.5 + 0.35 * arr.shape[1], 3.5, 8.0)), float(np.clip(1.2 + 0.3 * arr.shape[0], 2.8, 8.0)))
    fig, ax = plt.subplots(figsize=size)
    image = ax.imshow(arr, cmap="viridis", aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label=colorbar_label)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    for axis, names, n in ((ax.xaxis, xticklabels, arr.shape[1]), (ax.yaxis, yticklabels, arr.shape[0])):
        if names is not None:
            if len(names) != n:
                raise ValueError(f"expected {n} tick labels for an array of shape {arr.shape}; got {len(names)}")
            axis.set_ticks(range(n), labels=list(names), fontsize=8)
        else:
            axis.set_major_locator(MaxNLocator(integer=True))
    if xticklabels is not None:
        plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    return _save(fig, path)
