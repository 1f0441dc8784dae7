"""Each finding's map scored against the specialists' mask of that finding, beside maps that need no learning.

For data that carry one mask per finding (samples with ``"concept_masks"`` and ``"concept_masks_known"``, e.g.
IDRiD's segmentation photographs, :meth:`~mlmi_zoo.training.datasets.idrid_joined.IDRiDLesions.concept_mask_set`),
a model's map of each finding (microaneurysms, haemorrhages, ...) is scored on every image whose mask of that
finding is known and not empty, over the pixels of the field of view (``"fov"``; the whole image when a sample has
none), by three numbers:

* **pixel AUPR**: the average precision of the map's values against the mask (``sklearn.metrics.
  average_precision_score``), the metric of the IDRiD segmentation challenge (Porwal et al., Medical Image
  Analysis 59:101561, 2020);
* **activation precision**: the share of the map's top ``q`` of field-of-view pixels that lie on the mask
  (:func:`~mlmi_zoo.evaluation.localization.activation_precision`);
* **pointing game**: whether the map's maximum lies on the mask (:func:`~.localization.pointing_game`).

Each is put beside the same number for the controls of the evidence rules (``../shared/DESIGN.md``), on the
same images, with paired differences and intervals that resample images (:func:`~.evidence.compare`):

* an **image-processing map** that needs no learning: the green channel, where fundus lesions have the most
  contrast, for findings the data mark ``"bright"`` (exudates), its negative for ``"dark"`` ones
  (microaneurysms, haemorrhages);
* the **centre prior**: where the finding lies on average, the mean training mask of that finding smoothed
  with a Gaussian (:func:`~.controls.centre_prior`), the same map for every image;
* for the AUPR, a **uniform** map, whose average precision is the mask's prevalence (a uniform map has no top
  set or maximum, so it has no activation precision or pointing game).

The AUPR pooled over every pixel of every image is reported beside them, as the challenge reports it.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from mlmi_zoo.evaluation.controls import centre_prior
from mlmi_zoo.evaluation.evidence import compare
from mlmi_zoo.evaluation.localization import activation_precision, pointing_game

__all__ = ["lesion_localization", "green_channel_map", "pixel_ap"]

MapsOf = Callable[[Mapping[str, Any]], Mapping[str, torch.Tensor]]
CONTROLS = ("image processing", "centre prior")


def pixel_ap(score: np.ndarray, truth: np.ndarray) -> float:
    """Average precision of ``score`` against the boolean ``truth`` (1-D); NaN when ``truth`` holds no pixel."""
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(truth, score)) if truth.any() else math.nan


def green_channel_map(image: torch.Tensor, appearance: str) -> torch.Tensor:
    """(3, H, W) RGB image in [0, 1] -> (H, W): the green channel (``"bright"``) or its negative (``"dark"``)."""
    if appearance not in ("bright", "dark"):
        raise ValueError(f"appearance must be 'bright' or 'dark', got {appearance!r}")
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"the image-processing control reads the green channel of an RGB image (3, H, W); got "
                         f"{tuple(image.shape)}")
    green = image[1].float()
    return green if appearance == "bright" else -green


def _prior_maps(train_data: Any, names: Sequence[str], shape: tuple[int, int], sigma_px: float) -> dict[str, torch.Tensor]:
    """Per finding, the smoothed mean of the known training masks, (H, W)."""
    sums = {n: torch.zeros(shape, dtype=torch.float64) for n in names}
    counts = dict.fromkeys(names, 0)
    for i in range(len(train_data)):
        sample = train_data[i]
        for n in names:
            if bool(sample["concept_masks_known"][n]):
                sums[n] += sample["concept_masks"][n].reshape(shape).double()
                counts[n] += 1
    out = {}
    for n in names:
        if counts[n] == 0:
            raise ValueError(f"the training data hold no known mask of {n!r}; the centre prior cannot be fitted")
        out[n] = centre_prior((sums[n] / counts[n])[None].numpy(), (1, *shape), sigma_px)[0]
    return out


def lesion_localization(maps_of: MapsOf, data: Any, train_data: Any, appearance: Mapping[str, str], *,
                        q: float = 0.05, sigma_px: float = 16.0, n_boot: int = 1000, seed: int = 0,
                        batch_size: int = 4) -> dict[str, Any]:
    """Score a model's map of each finding against the masks of ``data`` beside the controls (module docstring).

    Args:
        maps_of: a batch of ``data`` -> finding name -> (B, H, W) map on the image's pixels (higher: more likely
            that finding). Every finding it returns must be in ``appearance``.
        data: the annotated set (samples with ``"image"``, ``"concept_masks"``, ``"concept_masks_known"``,
            ``"patient_id"``, optionally ``"fov"``).
        train_data: the training split of the same kind, for the centre prior.
        appearance: finding name -> ``"bright"`` or ``"dark"``, the image-processing control of each finding.
        q: the top share of field-of-view pixels in activation precision.
        sigma_px: the centre prior's Gaussian, in pixels.
        n_boot, seed: the bootstrap of :func:`~mlmi_zoo.evaluation.evidence.compare`.
        batch_size: images per forward pass.

    Returns:
        finding name -> ``{"images", "pixel_aupr", "activation_precision", "pointing_game"`` (comparison blocks),
        ``"pooled_aupr"`` (model and controls over all pixels)``}``; only findings with at least one scored image.

    Raises:
        ValueError: a map of another shape than its mask, a finding with no appearance, no known training mask.
    """
    records: dict[str, dict[str, list[Any]]] = {}
    pooled: dict[str, dict[str, list[np.ndarray]]] = {}
    priors: dict[str, torch.Tensor] | None = None
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    with torch.no_grad():
        for batch in loader:
            maps = maps_of(batch)
            if priors is None:
                unknown = sorted(set(maps) - set(appearance))
                if unknown:
                    raise ValueError(f"no image-processing control is defined for {unknown}; appearance names "
                                     f"{sorted(appearance)}")
                priors = _prior_maps(train_data, list(maps), tuple(batch["image"].shape[-2:]), sigma_px)
            for name, m in maps.items():
                masks = batch["concept_masks"][name]
                if m.shape[-2:] != masks.shape[-2:]:
                    raise ValueError(f"the map of {name!r} is {tuple(m.shape[-2:])} and its mask {tuple(masks.shape[-2:])}; "
                                     f"maps_of must return maps on the image's pixels")
                rec = records.setdefault(name, {k: [] for k in ("ap", "act", "point", "ids")})
                pool = pooled.setdefault(name, {k: [] for k in ("model", *CONTROLS, "truth")})
                for i in range(m.shape[0]):
                    truth_img = masks[i].reshape(m.shape[-2:]).bool()
                    if not bool(batch["concept_masks_known"][name][i]) or not bool(truth_img.any()):
                        continue
                    fov = batch["fov"][i].bool() if "fov" in batch else torch.ones_like(truth_img)
                    truth = truth_img[fov].numpy()
                    scores = {"model": m[i].float()[fov].numpy(),
                              "image processing": green_channel_map(batch["image"][i], appearance[name])[fov].numpy(),
                              "centre prior": priors[name][fov].numpy()}
                    rec["ap"].append({k: pixel_ap(v, truth) for k, v in scores.items()} | {"uniform": float(truth.mean())})
                    vectors = torch.from_numpy(np.stack(list(scores.values())))  # (3, n_fov): one "image" per map
                    target = torch.from_numpy(truth)[None].expand_as(vectors)
                    rec["act"].append(dict(zip(scores, activation_precision(vectors, target, q).tolist())))
                    rec["point"].append(dict(zip(scores, pointing_game(vectors, target).tolist())))
                    rec["ids"].append(str(batch["patient_id"][i]))
                    for k, v in scores.items():
                        pool[k].append(v.astype(np.float32))
                    pool["truth"].append(truth)
    out: dict[str, Any] = {}
    for name, rec in records.items():
        if not rec["ids"]:
            continue
        ids = np.array(rec["ids"])

        def column(rows: list[dict[str, float]], key: str) -> np.ndarray:
            return np.array([r[key] for r in rows], dtype=np.float64)

        truth_all = np.concatenate(pooled[name]["truth"])
        out[name] = {
            "images": len(ids),
            "pixel_aupr": compare(f"pixel AUPR of the {name} map", column(rec["ap"], "model"),
                                  {**{c: column(rec["ap"], c) for c in CONTROLS}, "uniform": column(rec["ap"], "uniform")},
                                  ids, n_boot=n_boot, seed=seed),
            "activation_precision": compare(f"activation precision (top {q:.0%}) of the {name} map",
                                            column(rec["act"], "model"), {c: column(rec["act"], c) for c in CONTROLS},
                                            ids, n_boot=n_boot, seed=seed),
            "pointing_game": compare(f"pointing game of the {name} map", column(rec["point"], "model"),
                                     {c: column(rec["point"], c) for c in CONTROLS}, ids, n_boot=n_boot, seed=seed),
            "pooled_aupr": {**{k: pixel_ap(np.concatenate(pooled[name][k]), truth_all) for k in ("model", *CONTROLS)},
                            "uniform": float(truth_all.mean())},
        }
    return out
