"""A data-driven prototype start: each class's prototypes on latent cells of its own training images.

ProtoPNet (Chen et al., NeurIPS 2019) draws prototypes uniformly in ``[0, 1]^D``; we can instead
start them on latent cells of training images of their class, picked by k-means++ seeding (Arthur
and Vassilvitskii, "k-means++: the advantages of careful seeding", SODA 2007) — what push does at
the end, done once at the start on the untrained add-on output (``prototype_init="data"``).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from mlmi_zoo.architectures.protopnet.model import ProtoPNet
from mlmi_zoo.architectures.protopnet.prototypes import _device_of, _EvalMode

__all__ = ["initialise_prototypes_from_data", "kmeans_pp_pick"]

log = logging.getLogger(__name__)

# cells(batch, x, latent_shape) -> (B, L) bool candidate cells of each image, or None for every cell
CellRule = Callable[[dict[str, Any], torch.Tensor, tuple[int, ...]], "torch.Tensor | None"]


def _cell_distances(cells: torch.Tensor, centre: torch.Tensor, similarity: str) -> torch.Tensor:
    """(N, D) cells, (D,) centre -> (N,) the prototype layer's distance: squared L2 or ``1 - cos``."""
    if similarity == "cosine":
        return (1.0 - F.normalize(cells, dim=-1) @ F.normalize(centre, dim=0)).clamp_min(0.0)
    return (cells - centre).square().sum(-1)


def kmeans_pp_pick(cells: torch.Tensor, k: int, generator: torch.Generator,
                   similarity: str = "log_l2") -> torch.Tensor:
    """Indices of ``k`` rows of ``cells`` chosen by k-means++ seeding.

    The first row is drawn uniformly; each next one with probability proportional to its distance
    to the nearest row already chosen (Arthur and Vassilvitskii, SODA 2007). The distance is the
    prototype layer's: the squared L2 distance (``log_l2``, the ``D(x)^2`` of k-means++) or
    ``1 - cos`` (``cosine``; half the squared L2 distance of the normalised vectors). Picks thus
    spread over the cells' modes without favouring isolated outliers as farthest-point picks do.

    Args:
        cells: (N, D) candidate vectors, N >= 1.
        k: rows to pick, k >= 1. With fewer than ``k`` distinct rows, rows repeat.
        generator: CPU generator; the picks are a function of its state and ``cells``.
        similarity: ``"log_l2"`` or ``"cosine"``.

    Returns:
        (k,) long indices into ``cells``.
    """
    if cells.ndim != 2 or cells.shape[0] < 1:
        raise ValueError(f"cells must be a non-empty (N, D) matrix, got shape {tuple(cells.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    cells = cells.detach().to("cpu", torch.float64)
    first = int(torch.randint(cells.shape[0], (1,), generator=generator))
    picks = [first]
    nearest = _cell_distances(cells, cells[first], similarity)  # (N,)
    for _ in range(1, k):
        total = float(nearest.sum())
        if total > 0.0:
            nxt = int(torch.multinomial(nearest / total, 1, generator=generator))
        else:  # every cell coincides with a pick already made
            nxt = int(torch.randint(cells.shape[0], (1,), generator=generator))
        picks.append(nxt)
        nearest = torch.minimum(nearest, _cell_distances(cells, cells[nxt], similarity))
    return torch.tensor(picks, dtype=torch.long)


@torch.no_grad()
def initialise_prototypes_from_data(model: ProtoPNet, dataset: Any, seed: int, images_per_class: int = 256,
                                    batch_size: int = 64, device: torch.device | str | None = None,
                                    cells: CellRule | None = None, keys: Sequence[str] = ()) -> dict[str, Any]:
    """Set each class's prototypes to latent cells of its own training images (k-means++ seeding).

    ProtoPNet (Chen et al., NeurIPS 2019) starts prototypes uniformly in ``[0, 1]^D`` and, at push,
    makes each one equal to the nearest latent patch of a training image of its class. This starts
    them there instead: for every class, up to ``images_per_class`` of its training images (drawn
    at random under ``seed``) go through the backbone and add-on in eval mode (batch-norm
    statistics untouched), and the class's ``prototypes_per_class`` prototypes are picked among
    all their latent cells by :func:`kmeans_pp_pick` with the model's distance. Every cell of an
    image is a candidate unless ``cells`` narrows them (the cells push may use; an image with no
    such cell offers every cell). A class without training images keeps its prototypes.

    Only a generator seeded with ``seed`` is used: the global RNG state is left as it was, so the
    rest of a run draws the same numbers with either initialisation.

    Args:
        model: a ProtoPNet (its current backbone and add-on define the latent cells).
        dataset: map-style data set of samples with ``"image"`` (C, *spatial, before the intensity
            transform) and ``"label"``.
        seed: fixes which images are read and which cells are picked.
        images_per_class: most images read per class.
        batch_size: images per forward pass.
        device: where to compute (default: the model's device).
        cells: ``cells(batch, x, latent_shape)`` -> ``(B, L)`` bool, the candidate cells of each image
            (``batch`` holds ``"image"`` and ``keys``; ``x`` the images after the intensity
            transform), or None for every cell.
        keys: the sample entries ``cells`` reads besides the image, stacked into its batch.

    Returns:
        JSON-safe summary: ``{"seed", "images_per_class" (list, per class), "cells_per_class",
        "initialised_classes"}``.
    """
    if images_per_class < 1:
        raise ValueError(f"images_per_class must be >= 1, got {images_per_class}")
    device = _device_of(model, device)
    cfg = model.config
    C, K = cfg.num_classes, cfg.prototypes_per_class
    g = torch.Generator().manual_seed(int(seed))
    counts = [0] * C
    pool: list[list[torch.Tensor]] = [[] for _ in range(C)]  # each image's candidate cells, per class
    pending: list[tuple[dict[str, Any], int]] = []

    def flush() -> None:
        if not pending:
            return
        batch = {key: torch.stack([torch.as_tensor(sample[key]) for sample, _ in pending]).to(device)
                 for key in ("image", *keys)}
        x = model.input_spec.intensity(batch["image"])
        model.validate_input(x)
        latent = model.latent(x)
        z = rearrange(latent, "b d ... -> b (...) d").float().cpu()  # (B, L, D)
        allowed = None if cells is None else cells(batch, x, tuple(latent.shape[2:]))
        for k, (row, (_, label)) in enumerate(zip(z, pending)):
            if allowed is not None and bool(allowed[k].any()):
                row = row[allowed[k].cpu()]
            pool[label].append(row)
        pending.clear()

    with _EvalMode(model):
        for i in torch.randperm(len(dataset), generator=g).tolist():
            if min(counts) >= images_per_class:
                break
            sample = dataset[i]
            label = int(torch.as_tensor(sample["label"]).reshape(-1)[0])
            if not 0 <= label < C:
                raise ValueError(f"sample {i} has label {label}; the model has {C} classes")
            if counts[label] >= images_per_class:
                continue
            image = torch.as_tensor(sample["image"])
            if pending and pending[0][0]["image"].shape != image.shape:
                flush()  # one forward pass per input size
            pending.append(({"image": image, **{key: sample[key] for key in keys}}, label))
            counts[label] += 1
            if len(pending) >= batch_size:
                flush()
        flush()

    prototypes = model.prototype_layer.prototypes
    classes = model.prototype_classes.cpu()
    done = []
    for c in range(C):
        if not pool[c]:
            log.warning("prototype_init='data': no training image of class %d; its prototypes stay uniform", c)
            continue
        candidates = torch.cat(pool[c])  # (N_c, D)
        picked = candidates[kmeans_pp_pick(candidates, K, g, cfg.similarity)]  # (K, D)
        rows = (classes == c).nonzero().reshape(-1)
        prototypes[rows.to(prototypes.device)] = picked.to(prototypes.device, prototypes.dtype)
        done.append(c)
    model.set_prototype_sources(None)  # not push records: training moves these prototypes
    summary = {"seed": int(seed), "images_per_class": counts,
               "cells_per_class": [int(sum(t.shape[0] for t in cs)) for cs in pool], "initialised_classes": done}
    log.info("prototype_init='data': %s", summary)
    return summary


