"""Contact sheets of the digital phantoms: what a person looks at before trusting a benchmark.

Each panel shows one case (CT in a lung window with the nodule mask outlined; a slide mosaic of H&E
tiles with tumour tiles outlined) and prints its ground truth under it. matplotlib is imported
lazily with the Agg backend, so this module costs nothing until it is used.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["show_phantoms"]

_KINDS = ("nodule", "nodule3d", "lidc", "tilebag")


def _fmt(v: Any) -> str:
    v = float(v)
    if math.isnan(v):
        return "-"
    return f"{v:.0f}" if v == round(v) and abs(v) < 1e4 else f"{v:.3g}"


def _nodule_panel(sample: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, str]:
    img = sample["image"][0].numpy()
    mask = sample["mask"][0].numpy()
    if img.ndim == 3:  # show the slice with the largest mask area
        k = int(mask.reshape(mask.shape[0], -1).sum(1).argmax())
        img, mask = img[k], mask[k]
    m = sample["measurements"]
    size = f"A={_fmt(m['area_mm2'])}mm²" if "area_mm2" in m else f"V={float(m['volume_ml']):.2f}mL"
    sp = "x".join(f"{float(s):.2f}" for s in sample["spacing"])
    lines = [f"d={float(m['diameter_mm']):.1f}mm {size}", f"HU={float(m['mean_hu']):.0f} sp={sp}"]
    c = sample["concepts"]
    if "patient_id" in sample:
        keys = ("sphericity", "lobulation", "spiculation")
        lines.append(" ".join(f"{k[:4]}={_fmt(c[k])}" for k in keys if k in c))
        lines.append(f"{sample['patient_id'][-4:]} {sample['readers']} readers y={int(sample['label'])}")
    else:
        lines.append(" ".join(f"{k[:4]}={_fmt(v)}" for k, v in c.items()) + f" y={int(sample['label'])}")
    return img, mask, "\n".join(lines)


def _tilebag_panel(sample: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, str]:
    tiles = sample["tiles"].numpy()  # (N, 3, t, t)
    coords = sample["coords"].numpy()  # (N, 2)
    labels = sample["instance_labels"].numpy()
    t = tiles.shape[-1]
    lo = coords.min(0)
    extent = coords.max(0) - lo + 1
    canvas = np.ones((extent[0] * t, extent[1] * t, 3), dtype=np.float32)
    mask = np.zeros(canvas.shape[:2], dtype=bool)
    for tile, (r, c), y in zip(tiles, coords - lo, labels):
        canvas[r * t:(r + 1) * t, c * t:(c + 1) * t] = tile.transpose(1, 2, 0)
        mask[r * t:(r + 1) * t, c * t:(c + 1) * t] = bool(y)
    area = float(sample["measurements"]["tumour_area_mm2"])
    text = f"N={len(labels)} tumour tiles={int(labels.sum())}\narea={area:.4f}mm² y={int(sample['label'])}"
    return canvas, mask, text


def show_phantoms(kind: str, n: int, out: str | Path, seed: int = 0, **kw: Any) -> Path:
    """Save a contact sheet PNG of ``n`` phantom cases with mask outlines and their ground truth.

    Args:
        kind: ``"nodule"`` (2D synthetic), ``"nodule3d"`` (3D synthetic, the slice with the largest
            mask), ``"lidc"`` (LIDC-grounded nodules) or ``"tilebag"`` (slide mosaics of H&E tiles).
        n: number of cases.
        out: output PNG path.
        seed: data-set seed.
        **kw: further constructor arguments of the data set (e.g. ``size``, ``split``, ``bag_size``).

    Returns:
        The path written.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if kind == "tilebag":
        from mlmi_zoo.training.datasets.tilebag import TileBagPhantom

        ds: Any = TileBagPhantom(n, seed=seed, **kw)
        panel = _tilebag_panel
    else:
        from mlmi_zoo.training.datasets.phantoms import LUNG_WINDOW_HU, NodulePhantom

        if kind == "lidc":
            ds = NodulePhantom(None, seed=seed, source="lidc", **kw)
        else:
            ds = NodulePhantom(n, seed=seed, spatial_dims=3 if kind == "nodule3d" else 2, **kw)
        panel = _nodule_panel
    n = min(n, len(ds))
    cols = min(n, 6)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 3.3 * rows), squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if k >= n:
            continue
        img, mask, text = panel(ds[k])
        if kind == "tilebag":
            ax.imshow(img, interpolation="nearest")
        else:
            ax.imshow(img, cmap="gray", vmin=LUNG_WINDOW_HU[0], vmax=LUNG_WINDOW_HU[1], interpolation="nearest")
        if mask.any():
            ax.contour(mask.astype(float), levels=[0.5], colors=["#ff3030"], linewidths=0.8)
        ax.set_title(text, fontsize=6.5, y=-0.02, va="top", family="monospace")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
