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
- :func:`duplicate_flags` names the prototypes that repeat an earlier one (aligned vectors or the
  same source patch), for the sanity checks and for switching such copies off after push.
"""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Iterable, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from mlmi_zoo.architectures.protopnet.model import ProtoPNet

__all__ = [
    "DUPLICATE_COSINE",
    "PrototypeLayer",
    "Similarity",
    "duplicate_flags",
    "duplicate_prototypes",
    "foreground_cells",
    "latent_box",
    "lesion_cells",
]

log = logging.getLogger(__name__)

Similarity = Literal["log_l2", "cosine"]
DUPLICATE_COSINE = 0.99  # prototype vectors at least this aligned show the same thing twice


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


def foreground_cells(model: "ProtoPNet", foreground: torch.Tensor,
                     latent_shape: tuple[int, ...] | torch.Size, share: float = 0.5) -> torch.Tensor:
    """(B, L) bool: latent cells whose window lies mostly (>= ``share``, default half) on the foreground,
    off the grid's border.

    A border cell's receptive field reaches past the image edge (into padding), and its window is
    clipped there, so it is left out even where the foreground reaches the edge (a fundus field of
    view cut by the top and bottom of the photograph).

    Args:
        model: the ProtoPNet (its backbone's stride and offset place the windows).
        foreground: (B, *spatial) or (B, 1, *spatial) foreground masks (bool or [0, 1]).
        latent_shape: the latent grid.
        share: the share of a cell's window that must be foreground (a thin structure, such as a gland
            in an otherwise empty volume, fills little of any window).
    """
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share must be in (0, 1], got {share}")
    dims = len(latent_shape)
    mask = foreground if foreground.ndim == dims + 2 else foreground.unsqueeze(1)
    fraction = model.backbone.cell_fraction(mask.float(), tuple(latent_shape))[:, 0]  # (B, *latent)
    inner = inner_cells(latent_shape, fraction.device)
    return rearrange((fraction >= share) & inner, "b ... -> b (...)")


def inner_cells(latent_shape: tuple[int, ...] | torch.Size, device: torch.device | str | None = None) -> torch.Tensor:
    """(*latent) bool: the cells off the latent grid's border (every cell when an axis has at most two,
    as such a grid has no inside)."""
    dims = len(latent_shape)
    inner = torch.ones(tuple(latent_shape), dtype=torch.bool, device=device)
    if all(n > 2 for n in latent_shape):
        inner = torch.zeros_like(inner)
        inner[(slice(1, -1),) * dims] = True
    return inner


def _lesion_cells(model: "ProtoPNet", batch: dict[str, Any], latent_shape: tuple[int, ...],
                  device: torch.device) -> torch.Tensor:
    if batch.get("mask") is None:
        raise ValueError("push on_lesion=True needs lesion masks: batches without a 'mask' entry")
    return lesion_cells(model, torch.as_tensor(batch["mask"]).to(device), latent_shape)


def duplicate_flags(model: "ProtoPNet", cosine: float = DUPLICATE_COSINE) -> tuple[torch.Tensor, torch.Tensor]:
    """Which enabled prototypes duplicate an earlier enabled one (lower index; the first of a group
    is the original): ``(aligned, same_source)``, each (P,) bool.

    ``aligned``: its vector has a cosine of at least ``cosine`` with an earlier one's.
    ``same_source``: push took it from the same latent cell of the same image as an earlier one.
    Switched-off prototypes (:meth:`ProtoPNet.disable_prototypes`) are neither duplicates nor
    originals: they take no part in any decision.
    """
    enabled = model.enabled.cpu()
    unit = F.normalize(model.prototype_layer.prototypes.detach().flatten(1).cpu(), dim=1)
    both = enabled[:, None] & enabled[None, :]
    aligned = (torch.tril((unit @ unit.T) >= cosine, diagonal=-1) & both).any(1)  # (P,)
    same_source = torch.zeros_like(aligned)
    seen: set[tuple[int, ...]] = set()
    for rec in model.prototype_sources or []:
        if rec is None or not enabled[int(rec["prototype"])]:
            continue
        key = (int(rec["index"]), *(int(v) for v in rec["location"]))
        same_source[int(rec["prototype"])] = key in seen
        seen.add(key)
    return aligned, same_source


def duplicate_prototypes(model: "ProtoPNet", cosine: float = DUPLICATE_COSINE) -> list[int]:
    """Ids of the enabled prototypes that duplicate an earlier enabled one (:func:`duplicate_flags`)."""
    aligned, same_source = duplicate_flags(model, cosine)
    return torch.nonzero(aligned | same_source).flatten().tolist()
