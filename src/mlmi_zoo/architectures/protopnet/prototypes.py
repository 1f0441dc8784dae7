"""The prototype layer and its projection ("push") onto real training patches.

Implements the prototype layer of ProtoPNet (Chen, Li, Tao, Barnett, Su, Rudin, "This Looks Like
That: Deep Learning for Interpretable Image Recognition", NeurIPS 2019): each of ``P`` prototypes is
a vector in the latent space of the add-on layers; its similarity to every latent location of an
image is ``log((d + 1) / (d + eps))`` of the squared L2 distance ``d``, and after training each
prototype is projected onto (made equal to) its nearest latent patch of a training image of its own
class, so that it *is* a piece of a real case.

What we changed:

- Distances to all prototypes are one batched matrix product, ``||z||^2 + ||p||^2 - 2 z.p`` over
  the flattened latent grid (channels last), for 2D and 3D grids alike; a cosine similarity is
  offered as well (distance ``1 - cos``, similarity ``cos``).
- Push streams over the loader and is vectorised over prototypes and images: one distance
  computation per batch, then a class-restricted masked minimum over (images, locations) for all
  prototypes at once, keeping only the running best per prototype (memory ``O(P * D)``).
- The push record of a prototype stores its source as the latent cell's window in input pixels
  (``box_px``, half-open ``[start, stop)`` per axis; ``box_mm`` when the spacing is known): the
  ``stride``-wide box centred on the cell's receptive-field centre, the window the maps and the
  lesion fractions use. This *cell box* is a lower bound of the receptive field, not ProtoPNet's
  95th-percentile region of the upsampled similarity map; :func:`render_prototypes` draws that map
  on request.
- The nearest training patches of each prototype (:func:`prototype_topk_patches`), for prototype
  purity, keep the nearest location of each image and the ``k`` nearest images, as ProtoPNet's
  nearest-patch analysis does.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Literal, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from mlmi_zoo.architectures.protopnet.model import ProtoPNet

__all__ = [
    "PrototypeLayer",
    "Similarity",
    "push_prototypes",
    "prototype_topk_patches",
    "render_prototypes",
    "TopkPatches",
    "latent_box",
    "lesion_cells",
]

log = logging.getLogger(__name__)

Similarity = Literal["log_l2", "cosine"]


class PrototypeLayer(nn.Module):
    """``P`` prototype vectors compared with every location of a latent grid (2D or 3D).

    Args:
        num_prototypes: ``P``.
        prototype_dim: ``D``, the channels of the latent grid.
        similarity: ``"log_l2"`` (ProtoPNet: ``log((d + 1) / (d + eps))`` of the squared L2
            distance ``d``) or ``"cosine"`` (distance ``1 - cos``, similarity ``cos``).
        eps: the ``eps`` of the log similarity; it bounds the similarity by ``log(1 / eps)``.
    """

    def __init__(self, num_prototypes: int, prototype_dim: int, similarity: Similarity = "log_l2",
                 eps: float = 1e-4) -> None:
        super().__init__()
        if similarity not in ("log_l2", "cosine"):
            raise ValueError(f"similarity must be 'log_l2' or 'cosine', got {similarity!r}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0 (it keeps the log similarity finite), got {eps}")
        self.similarity_kind = similarity
        self.eps = float(eps)
        # ProtoPNet draws prototypes uniformly in [0, 1]^D: the range of its Sigmoid add-on output.
        self.prototypes = nn.Parameter(torch.rand(num_prototypes, prototype_dim))  # (P, D)

    @property
    def num_prototypes(self) -> int:
        return int(self.prototypes.shape[0])

    def _raw_distances(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, *latent) -> (B, L, P) distances, squared L2 possibly a rounding error below 0."""
        zl = rearrange(z, "b d ... -> (b ...) d")  # (B*L, D), a view when z is channels-last in memory
        p = self.prototypes  # (P, D)
        if self.similarity_kind == "cosine":
            raw = 1.0 - F.normalize(zl, dim=-1) @ F.normalize(p, dim=-1).T
        else:
            z2 = torch.linalg.vector_norm(zl, dim=-1, keepdim=True).square()  # (B*L, 1), one pass over z
            # ||z||^2 + ||p||^2 - 2 z.p for all locations and prototypes in one matrix product.
            raw = torch.addmm(z2 + p.square().sum(-1), zl, p.T, alpha=-2.0)  # (B*L, P)
        return raw.unflatten(0, (z.shape[0], -1))  # (B, L, P)

    def _to_maps(self, raw: torch.Tensor, latent: torch.Size) -> torch.Tensor:
        return raw.clamp_min(0.0).movedim(-1, 1).unflatten(2, latent)  # (B, L, P) -> (B, P, *latent)

    def distances(self, z: torch.Tensor) -> torch.Tensor:
        """Distance of every prototype to every latent location.

        Args:
            z: (B, D, *latent) add-on output.

        Returns:
            (B, P, *latent) squared L2 distances (``log_l2``) or ``1 - cos`` (``cosine``).
        """
        return self._to_maps(self._raw_distances(z), z.shape[2:])

    def similarity(self, distances: torch.Tensor) -> torch.Tensor:
        """Map distances (any shape) to similarities: decreasing, so ``max sim = sim(min d)``."""
        if self.similarity_kind == "cosine":
            return 1.0 - distances
        return torch.log((distances + 1.0) / (distances + self.eps))

    def pooled_similarity(self, distances: torch.Tensor, k: int = 1) -> torch.Tensor:
        """Pool distance maps into one similarity per prototype: the mean similarity of the ``k``
        nearest locations (IAIA-BL's top-k average pooling; ``k=1`` is ProtoPNet's max pooling).

        Args:
            distances: (B, P, *latent) distance maps (:meth:`distances`).
            k: locations averaged, at most the number of latent locations.

        Returns:
            (B, P) similarities.
        """
        flat = distances.flatten(2)  # (B, P, L)
        if not 1 <= k <= flat.shape[-1]:
            raise ValueError(f"top-k pooling needs 1 <= k <= {flat.shape[-1]} latent locations, got k={k}")
        nearest = flat.amin(-1, keepdim=True) if k == 1 else flat.topk(k, dim=-1, largest=False).values  # (B, P, k)
        return self.similarity(nearest).mean(-1)

    def nearest_distances(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, *latent) -> (B, P) distance of each prototype to its nearest location (min pooling)."""
        # Clamping after the minimum gives the same value (clamping is monotone) on P, not L x P, values.
        return self._raw_distances(z).amin(1).clamp_min(0.0)

    def min_distances(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distance maps and their minimum over the grid (ProtoPNet's min pooling).

        Args:
            z: (B, D, *latent).

        Returns:
            ``(maps (B, P, *latent), min_d (B, P))``; ``min_d`` equals :meth:`nearest_distances` exactly.
        """
        raw = self._raw_distances(z)  # (B, L, P)
        return self._to_maps(raw, z.shape[2:]), raw.amin(1).clamp_min(0.0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, *latent) -> (B, P, *latent) similarity maps."""
        return self.similarity(self.distances(z))

    def extra_repr(self) -> str:
        p, d = self.prototypes.shape
        return f"num_prototypes={p}, prototype_dim={d}, similarity={self.similarity_kind!r}"


# ---------------------------------------------------------------------------------------------
# plumbing shared by push and nearest-patch search
# ---------------------------------------------------------------------------------------------
def _device_of(model: nn.Module, device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else next(model.parameters()).device


class _EvalMode:
    """Put every module in eval mode (frozen BN statistics) and restore each one's mode after."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modes: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> None:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc: Any) -> None:
        for m, mode in self.modes:
            m.training = mode


def _batch_indices(batch: dict[str, Any], start: int, n: int) -> torch.Tensor:
    """(B,) data-set indices of a batch: ``batch["index"]`` or, without it, running positions."""
    if "index" in batch:
        return torch.as_tensor(batch["index"]).reshape(-1).long().cpu()
    return torch.arange(start, start + n)


def latent_box(location: Iterable[int], latent_shape: Iterable[int], input_shape: Iterable[int],
               stride: int | None = None, offset: float | None = None) -> list[list[int]]:
    """The input-pixel box of one latent cell: half-open ``[start, stop)`` per spatial axis.

    With the backbone's ``stride`` and ``offset`` (the input pixel of cell 0's receptive-field
    centre), the box is the ``stride``-wide window centred on cell ``i``'s centre
    ``offset + stride * i``, clipped to the image — where the cell's map value is drawn. Without
    them, the cell is scaled by the actual input/latent size ratio. Either way it is a lower bound
    of the true receptive field.

    Args:
        location: latent index per axis.
        latent_shape: latent grid size per axis.
        input_shape: input size per axis.
        stride: the backbone's total stride, or None.
        offset: the input-pixel coordinate of cell 0's centre, or None.
    """
    box = []
    for i, n_lat, n_in in zip(location, latent_shape, input_shape):
        if stride is not None and offset is not None and math.isfinite(offset):
            centre = offset + stride * i
            start, stop = math.floor(centre - stride / 2 + 0.5), math.floor(centre + stride / 2 + 0.5)
        else:
            scale = n_in / n_lat
            start, stop = math.floor(i * scale), math.ceil((i + 1) * scale)
        box.append([int(max(0, start)), int(min(n_in, stop))])
    return box


# ---------------------------------------------------------------------------------------------
# push
# ---------------------------------------------------------------------------------------------
def lesion_cells(model: "ProtoPNet", mask: torch.Tensor, latent_shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """(B, L) bool: latent cells whose receptive-field window lies mostly (>= half) on the lesion.

    Images whose lesion is too small to cover half of any cell's window fall back to the cells that
    overlap it at all, so every annotated image keeps candidates; an empty mask gives no cell.

    Args:
        model: the ProtoPNet (its backbone's stride and offset place the windows).
        mask: (B, 1, *spatial) lesion masks.
        latent_shape: the latent grid.
    """
    fraction = rearrange(model.backbone.cell_fraction(mask.float(), tuple(latent_shape)), "b 1 ... -> b (...)")  # (B, L)
    mostly = fraction >= 0.5
    return torch.where(mostly.any(1, keepdim=True), mostly, fraction > 0)


def _lesion_cells(model: "ProtoPNet", batch: dict[str, Any], latent_shape: tuple[int, ...],
                  device: torch.device) -> torch.Tensor:
    if batch.get("mask") is None:
        raise ValueError("push on_lesion=True needs lesion masks: batches without a 'mask' entry")
    return lesion_cells(model, torch.as_tensor(batch["mask"]).to(device), latent_shape)


@torch.no_grad()
def push_prototypes(model: "ProtoPNet", loader: Iterable[dict[str, Any]],
                    device: torch.device | str | None = None, on_lesion: bool = False) -> list[dict[str, Any] | None]:
    """Project every prototype onto its nearest latent patch of a training image of its own class.

    Streams over ``loader`` once, in eval mode (batch-norm statistics do not move; each module's
    mode is restored afterwards), with one distance computation per batch for all prototypes and
    only the running best kept per prototype. Afterwards each prototype vector *equals* the
    add-on output at one latent location of one training image of its class.

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
    proto_class = model.prototype_classes.to(device)  # (P,)
    best_d = torch.full((P,), math.inf, device=device)
    best_vec = layer.prototypes.detach().clone()  # (P, D)
    best_index = torch.full((P,), -1, dtype=torch.long)
    best_loc = torch.zeros(P, dtype=torch.long)
    best_spacing = torch.full((P, model.config.spatial_dims), math.nan)  # (P, dims) mm; NaN = unknown
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
            L = d.shape[-1]
            own = proto_class[:, None] == labels[None, :]  # (P, B)
            d = d.masked_fill(~own[..., None], math.inf)
            if on_lesion:
                d = d.masked_fill(~_lesion_cells(model, batch, latent_shape, device)[None], math.inf)
            batch_d, flat = rearrange(d, "p b l -> p (b l)").min(-1)  # (P,), (P,)
            better = batch_d < best_d  # strict: the first best patch in loader order wins ties
            if not better.any():
                continue
            b_idx, l_idx = flat // L, flat % L
            vectors = rearrange(z, "b d ... -> b (...) d")[b_idx, l_idx]  # (P, D)
            best_d = torch.where(better, batch_d, best_d)
            best_vec = torch.where(better[:, None], vectors, best_vec)
            better_cpu, b_cpu = better.cpu(), b_idx.cpu()
            best_index = torch.where(better_cpu, index[b_cpu], best_index)
            best_loc = torch.where(better_cpu, l_idx.cpu(), best_loc)
            if batch.get("spacing") is not None:
                spacing = torch.as_tensor(batch["spacing"], dtype=torch.float32).reshape(B, -1)  # (B, dims)
                best_spacing = torch.where(better_cpu[:, None], spacing[b_cpu], best_spacing)
            else:
                best_spacing = torch.where(better_cpu[:, None], torch.tensor(math.nan), best_spacing)
        found = torch.isfinite(best_d)
        layer.prototypes.data.copy_(torch.where(found[:, None], best_vec, layer.prototypes.data))

    records: list[dict[str, Any] | None] = []
    best_d_cpu = best_d.cpu()
    sims = layer.similarity(best_d_cpu.clamp_max(torch.finfo(best_d_cpu.dtype).max))
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
            "distance": float(best_d_cpu[j]),
            "similarity": float(sims[j]),
        })
    model.set_prototype_sources(records)
    return records


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
                           device: torch.device | str | None = None) -> TopkPatches:
    """The ``k`` nearest training patches of every prototype, streaming and vectorised.

    Each image contributes its nearest location only, so the ``k`` patches come from ``k``
    distinct images; images of every class compete (purity asks whether they share the
    prototype's class and lie on the lesion).

    Args:
        model: a ProtoPNet.
        loader: batches with ``"image"``, ``"label"`` and ideally ``"index"``.
        k: patches per prototype.
        device: where to compute (default: the model's device).

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
            d, loc = rearrange(layer.distances(z), "b p ... -> p b (...)").min(-1)  # (P, B) each
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
