"""Push: projecting each prototype onto its nearest training patch, and the patches a prototype matches.

Chen et al., "This Looks Like That" (NeurIPS 2019), section 2.2: after training, each prototype is
replaced by the nearest latent patch of a training image of its class, so every prototype *is* a
real patch that a person can look at. With lesion masks, push may be restricted to lesion cells
(IAIA-BL, Barnett et al. 2021). :func:`prototype_topk_patches` finds the training patches most
similar to each prototype (for purity and the gallery), :func:`render_prototypes` draws them.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, NamedTuple

import torch
from einops import rearrange

if TYPE_CHECKING:  # the model imports the prototype layer; push only reads a built model
    from mlmi_zoo.architectures.protopnet.model import ProtoPNet
from mlmi_zoo.architectures.protopnet.prototypes import (
    _batch_indices,
    _device_of,
    _EvalMode,
    _lesion_cells,
    foreground_cells,
    inner_cells,
    latent_box,
)

__all__ = ["push_prototypes", "push_cells", "intensity_foreground", "TopkPatches", "prototype_topk_patches",
           "render_prototypes"]

log = logging.getLogger(__name__)


INTENSITY_FOREGROUND = "intensity"  # push_prototypes(foreground=...): a foreground read from the image itself
BACKGROUND_SPAN = 0.1  # intensity foreground: above the image's minimum by this share of its range


def intensity_foreground(x: torch.Tensor) -> torch.Tensor:
    """(B, *spatial) bool: pixels brighter than the image's minimum by 10% of its range (channel mean).

    The foreground of images that carry no mask (MedMNIST thumbnails, a user's PNGs): the dark
    surround of a scan or an empty corner of a volume is not tissue. It is the complement of what
    the prototype sanity check calls background (a near-constant patch at the image's minimum).

    Args:
        x: (B, C, *spatial) images after the model's intensity transform.
    """
    grey = x.float().mean(1)  # (B, *spatial)
    flat = grey.flatten(1)
    low, high = flat.amin(1), flat.amax(1)  # (B,)
    threshold = low + BACKGROUND_SPAN * (high - low)
    return grey > threshold.reshape(-1, *([1] * (grey.ndim - 1)))


def push_cells(model: "ProtoPNet", batch: dict[str, Any], x: torch.Tensor, latent_shape: tuple[int, ...],
               on_lesion: bool = False, foreground: str | None = None, off_border: bool = False,
               foreground_share: float = 0.5) -> torch.Tensor | None:
    """(B, L) bool: the latent cells of each image that push may project a prototype onto.

    The rules of :func:`push_prototypes` (its arguments of the same names), combined: lesion cells,
    foreground cells off the border, cells off the border. Training uses the same cells for the
    cluster cost (``ProtoPNetTrainingSettings.cluster_on_push_cells``), so that prototypes are
    learnt where push will put them.

    Args:
        batch: the collated batch (``"mask"`` for ``on_lesion``, the ``foreground`` key unless it is
            ``"intensity"``).
        x: (B, C, *spatial) the batch's images after the model's intensity transform.
        latent_shape: the latent grid.

    Returns:
        the cells, or None when every cell may be used.

    Raises:
        ValueError: ``on_lesion`` without masks, or a ``foreground`` key the batch lacks.
    """
    device = x.device
    allowed: torch.Tensor | None = None
    if on_lesion:
        allowed = _lesion_cells(model, batch, latent_shape, device)
    if foreground is not None:
        if foreground == INTENSITY_FOREGROUND:
            fg = intensity_foreground(x)
        elif batch.get(foreground) is None:
            raise ValueError(f"push foreground={foreground!r}: the batches have no {foreground!r} entry "
                             f"(they have {sorted(batch)}); 'intensity' reads a foreground from the images")
        else:
            fg = torch.as_tensor(batch[foreground]).to(device)
        cells = foreground_cells(model, fg, latent_shape, foreground_share)
        allowed = cells if allowed is None else allowed & cells
    if off_border:
        inner = inner_cells(latent_shape, device).flatten()[None].expand(x.shape[0], -1)
        allowed = inner if allowed is None else allowed & inner
    return allowed


@torch.no_grad()
def push_prototypes(model: "ProtoPNet", loader: Iterable[dict[str, Any]],
                    device: torch.device | str | None = None, on_lesion: bool = False,
                    foreground: str | None = None, distinct: bool = False,
                    off_border: bool = False, foreground_share: float = 0.5) -> list[dict[str, Any] | None]:
    """Project every prototype onto its nearest latent patch of a training image of its own class.

    Streams over ``loader`` once, in eval mode (batch-norm statistics do not move; each module's
    mode is restored afterwards), with one distance computation per batch for all prototypes and
    only the running best candidates kept per prototype. Afterwards each prototype vector *equals*
    the add-on output at one latent location of one training image of its class.

    Args:
        model: a :class:`~mlmi_zoo.architectures.protopnet.model.ProtoPNet`.
        loader: collated batches with ``"image"`` (raw intensities; the model's intensity
            transform is applied), ``"label"``, and ideally ``"index"`` (data-set index; without it
            the running position in the loader is recorded, valid only for an unshuffled loader)
            and ``"spacing"`` (mm, for ``box_mm``).
        device: where to compute (default: the model's device).
        on_lesion: project only onto latent cells that overlap the lesion (``batch["mask"]``, a
            (B, 1, *spatial) lesion mask); images without a lesion are not candidates. With lesion
            masks this makes every prototype a piece of a lesion, not of the background around it.
        foreground: the batch key of a foreground mask (``(B, H, W)`` or ``(B, 1, H, W)``), or
            ``"intensity"`` for a mask read from each image (:func:`intensity_foreground`): project
            only onto latent cells whose window lies mostly on it, off the latent grid's border
            (:func:`~mlmi_zoo.architectures.protopnet.prototypes.foreground_cells`).
        distinct: no two prototypes are projected onto the same training image. Prototypes are
            placed in order of their nearest distance; each takes its nearest patch in an image no
            earlier prototype took (the candidates are each prototype's nearest patches in as
            many distinct images as there are prototypes, so one is always free when the class has
            that many images). Without it, prototypes that were learnt close together are
            projected onto one patch and show the same thing twice.
        off_border: project only onto cells off the latent grid's border, whose receptive field
            does not reach into the padding past the image edge (a foreground implies it).
        foreground_share: with ``foreground``, the share of a cell's window that must lie on it.

    Returns:
        one record per prototype (also stored on the model and saved with it): ``prototype``,
        ``class``, ``class_name``, ``index``, ``location`` (latent index per axis), ``latent_shape``,
        ``input_shape``, ``box_px`` (half-open per axis), ``spacing`` and ``box_mm`` (or None),
        ``distance`` (before projection) and ``similarity`` (before projection); ``None`` for a
        prototype whose class had no image in ``loader`` (its vector is left unchanged).
    """
    device = _device_of(model, device)
    layer = model.prototype_layer
    P, D = layer.prototypes.shape
    K = P if distinct else 1  # candidates kept per prototype, each from a different image
    dims = model.config.spatial_dims
    proto_class = model.prototype_classes.to(device)  # (P,)
    cand_d = torch.full((P, K), math.inf, device=device)
    cand_vec = torch.zeros(P, K, D, device=device)
    cand_index = torch.full((P, K), -1, dtype=torch.long)
    cand_loc = torch.zeros(P, K, dtype=torch.long)
    cand_spacing = torch.full((P, K, dims), math.nan)  # mm; NaN = unknown
    latent_shape: tuple[int, ...] = ()
    input_shape: tuple[int, ...] = ()
    seen = 0
    with _EvalMode(model):
        for batch in loader:
            x = model.input_spec.intensity(batch["image"].to(device))
            model.validate_input(x)
            labels = torch.as_tensor(batch["label"]).to(device).reshape(-1)  # (B,)
            B = x.shape[0]
            index = _batch_indices(batch, seen, B)
            seen += B
            z = model.latent(x)  # (B, D, *latent)
            if input_shape and tuple(x.shape[2:]) != input_shape:
                raise ValueError(f"push needs one input size per loader (flat latent locations are recorded), got "
                                 f"{tuple(x.shape[2:])} after {input_shape}; resize or crop the images to one size")
            latent_shape, input_shape = tuple(z.shape[2:]), tuple(x.shape[2:])
            d = rearrange(layer.distances(z), "b p ... -> p b (...)")  # (P, B, L)
            own = proto_class[:, None] == labels[None, :]  # (P, B)
            d = d.masked_fill(~own[..., None], math.inf)
            allowed = push_cells(model, batch, x, latent_shape, on_lesion=on_lesion, foreground=foreground,
                                 off_border=off_border, foreground_share=foreground_share)
            if allowed is not None:
                d = d.masked_fill(~allowed[None], math.inf)
            image_d, image_loc = d.min(-1)  # (P, B): each image's nearest cell (the first on ties)
            vectors = rearrange(z, "b d ... -> b (...) d")[torch.arange(B, device=device)[None], image_loc]  # (P, B, D)
            if batch.get("spacing") is not None:
                spacing = torch.as_tensor(batch["spacing"], dtype=torch.float32).reshape(B, -1)  # (B, dims)
            else:
                spacing = torch.full((B, dims), math.nan)
            # Merge with the running candidates; a stable sort keeps earlier images first on ties.
            all_d = torch.cat([cand_d, image_d], 1)  # (P, K + B)
            order = torch.sort(all_d, dim=1, stable=True).indices[:, :K]  # (P, K)
            cand_d = all_d.gather(1, order)
            cand_vec = torch.cat([cand_vec, vectors], 1).gather(1, order[..., None].expand(-1, -1, D))
            order_cpu = order.cpu()
            cand_index = torch.cat([cand_index, index[None].expand(P, -1)], 1).gather(1, order_cpu)
            cand_loc = torch.cat([cand_loc, image_loc.cpu()], 1).gather(1, order_cpu)
            cand_spacing = torch.cat([cand_spacing, spacing[None].expand(P, -1, -1)], 1).gather(
                1, order_cpu[..., None].expand(-1, -1, dims))

    pick = _assign(cand_d.cpu(), cand_index, distinct)  # (P,) which candidate each prototype takes
    rows = torch.arange(P)
    best_d = cand_d.cpu()[rows, pick]
    found = torch.isfinite(best_d)
    layer.prototypes.data.copy_(torch.where(found[:, None].to(device), cand_vec[rows.to(device), pick.to(device)],
                                            layer.prototypes.data))
    best_index, best_loc, best_spacing = cand_index[rows, pick], cand_loc[rows, pick], cand_spacing[rows, pick]

    records: list[dict[str, Any] | None] = []
    sims = layer.similarity(best_d.clamp_max(torch.finfo(best_d.dtype).max))
    for j in range(P):
        if not bool(found[j]):
            log.warning("prototype %d (class %s) found no image of its class; it was not projected", j,
                        model.label_names[int(proto_class[j])])
            records.append(None)
            continue
        loc = [int(v) for v in torch.unravel_index(best_loc[j], latent_shape)]
        box = latent_box(loc, latent_shape, input_shape, model.backbone.stride, model.backbone.offset)
        sp = None if torch.isnan(best_spacing[j]).any() else [float(v) for v in best_spacing[j]]
        records.append({
            "prototype": j,
            "class": int(proto_class[j]),
            "class_name": model.label_names[int(proto_class[j])],
            "index": int(best_index[j]),
            "location": loc,
            "latent_shape": list(latent_shape),
            "input_shape": list(input_shape),
            "box_px": box,
            "spacing": sp,
            "box_mm": None if sp is None else [[lo * s, hi * s] for (lo, hi), s in zip(box, sp)],
            "distance": float(best_d[j]),
            "similarity": float(sims[j]),
        })
    model.set_prototype_sources(records)
    return records


def _assign(distances: torch.Tensor, indices: torch.Tensor, distinct: bool) -> torch.Tensor:
    """(P,) the candidate each prototype takes: its nearest, or with ``distinct`` a greedy
    one-image-per-prototype assignment in order of the prototypes' nearest distances (a prototype
    whose candidates are all taken keeps its nearest and is then a duplicate the sanity check counts).

    Args:
        distances: (P, K) candidate distances, ascending per row (inf: no candidate).
        indices: (P, K) the candidates' image indices.
    """
    P = distances.shape[0]
    pick = torch.zeros(P, dtype=torch.long)
    if not distinct:
        return pick
    taken: set[int] = set()
    for j in torch.argsort(distances[:, 0], stable=True).tolist():
        for k in range(distances.shape[1]):
            if not math.isfinite(float(distances[j, k])):
                break
            if int(indices[j, k]) not in taken:
                pick[j] = k
                break
        if math.isfinite(float(distances[j, pick[j]])):
            taken.add(int(indices[j, pick[j]]))
    return pick


# ---------------------------------------------------------------------------------------------
# nearest training patches (prototype purity)
# ---------------------------------------------------------------------------------------------
class TopkPatches(NamedTuple):
    """The ``k`` nearest training images of each prototype, at their nearest latent location.

    Attributes:
        indices: (P, k) data-set indices (``-1`` where the loader held fewer than ``k`` images).
        locations: (P, k, spatial_dims) latent index per axis.
        distances: (P, k) distances, ascending.
        labels: (P, k) class labels of those images.
    """

    indices: torch.Tensor  # (P, k)
    locations: torch.Tensor  # (P, k, dims)
    distances: torch.Tensor  # (P, k)
    labels: torch.Tensor  # (P, k)


@torch.no_grad()
def prototype_topk_patches(model: "ProtoPNet", loader: Iterable[dict[str, Any]], k: int = 5,
                           device: torch.device | str | None = None, foreground: str | None = None) -> TopkPatches:
    """The ``k`` nearest training patches of every prototype, streaming and vectorised.

    Each image contributes its nearest location only, so the ``k`` patches come from ``k``
    distinct images; images of every class compete (purity asks whether they share the
    prototype's class and lie on the lesion).

    Args:
        model: a ProtoPNet.
        loader: batches with ``"image"``, ``"label"`` and ideally ``"index"``.
        k: patches per prototype.
        device: where to compute (default: the model's device).
        foreground: the batch key of a foreground mask: only cells that push could take (mostly on
            it, off the grid's border; :func:`~.prototypes.foreground_cells`) are searched. ``None``: every cell.

    Returns:
        a :class:`TopkPatches` (a named tuple ``(indices, locations, distances, labels)``).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    device = _device_of(model, device)
    layer = model.prototype_layer
    P = layer.num_prototypes
    dims = model.config.spatial_dims
    best_d = torch.full((P, k), math.inf, device=device)
    best_index = torch.full((P, k), -1, dtype=torch.long, device=device)
    best_loc = torch.zeros(P, k, dtype=torch.long, device=device)
    best_label = torch.full((P, k), -1, dtype=torch.long, device=device)
    latent_shape: tuple[int, ...] = (1,) * dims
    seen = 0
    with _EvalMode(model):
        for batch in loader:
            x = model.input_spec.intensity(batch["image"].to(device))
            labels = torch.as_tensor(batch["label"]).to(device).reshape(-1)
            B = x.shape[0]
            index = _batch_indices(batch, seen, B).to(device)
            seen += B
            z = model.latent(x)
            latent_shape = tuple(z.shape[2:])
            d = rearrange(layer.distances(z), "b p ... -> p b (...)")  # (P, B, L)
            if foreground is not None:
                fg = torch.as_tensor(batch[foreground]).to(device)
                d = d.masked_fill(~foreground_cells(model, fg, latent_shape)[None], math.inf)
            d, loc = d.min(-1)  # (P, B) each
            cand_d = torch.cat([best_d, d], 1)  # (P, k + B)
            cand_index = torch.cat([best_index, index.expand(P, B)], 1)
            cand_loc = torch.cat([best_loc, loc], 1)
            cand_label = torch.cat([best_label, labels.expand(P, B)], 1)
            best_d, order = cand_d.topk(k, dim=1, largest=False, sorted=True)  # (P, k)
            best_index = cand_index.gather(1, order)
            best_loc = cand_loc.gather(1, order)
            best_label = cand_label.gather(1, order)
    locations = torch.stack(torch.unravel_index(best_loc.cpu(), latent_shape), -1)  # (P, k, dims)
    return TopkPatches(best_index.cpu(), locations, best_d.cpu(), best_label.cpu())


# ---------------------------------------------------------------------------------------------
# rendering (on request, never inside push)
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def render_prototypes(model: "ProtoPNet", dataset: Any, out_dir: str | Path) -> list[Path]:
    """Draw each pushed prototype's source image with its cell box and similarity map.

    Writes ``prototype_{j:03d}.png`` per prototype with a push record (3D volumes show the slice
    through the box centre) and stores the path in the record as ``render_path``, so
    explanations made afterwards embed the patch in their HTML.

    Args:
        model: a pushed ProtoPNet.
        dataset: the data set ``push_prototypes`` ran on (``dataset[index]`` is a sample dict).
        out_dir: created if needed.

    Returns:
        the written PNG paths, in prototype order.

    Raises:
        ValueError: when the model has not been pushed.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from mlmi_zoo.explanations import _to_display

    sources = model.prototype_sources
    if sources is None:
        raise ValueError("the model has no push records; run push_prototypes(model, loader) first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    paths = []
    with _EvalMode(model):
        for j, rec in enumerate(sources):
            if rec is None:
                continue
            sample = dataset[rec["index"]]
            x = model.input_spec.intensity(torch.as_tensor(sample["image"])[None].to(device))  # (1, C, *S)
            sim = model.prototype_layer(model.latent(x))[:, j : j + 1]  # (1, 1, *latent)
            heat = model.backbone.to_input(sim, x.shape[2:])[0, 0].cpu()
            image, box = x[0].cpu(), rec["box_px"]
            if image.ndim == 4:  # (C, D, H, W): the slice through the box centre
                k = (box[0][0] + box[0][1]) // 2
                image, heat, box = image[:, k], heat[k], box[1:]
            fig, axes = plt.subplots(1, 2, figsize=(5, 2.6), dpi=80)
            axes[0].imshow(_to_display(image), cmap="gray", interpolation="nearest")
            axes[0].imshow(heat.numpy(), cmap="jet", alpha=0.35, interpolation="bilinear")
            (y0, y1), (x0, x1) = box
            axes[0].add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, color="yellow", lw=1.5))
            axes[0].set_title(f"#{j} {rec['class_name']} (case {rec['index']})", fontsize=8)
            axes[1].imshow(_to_display(image[:, y0:y1, x0:x1]), cmap="gray", interpolation="nearest")
            axes[1].set_title("patch", fontsize=8)
            for ax in axes:
                ax.axis("off")
            path = out / f"prototype_{j:03d}.png"
            fig.savefig(path, bbox_inches="tight", pad_inches=0.02)
            plt.close(fig)
            rec["render_path"] = str(path)
            paths.append(path)
    return paths
