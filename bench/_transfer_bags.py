"""Bags for the MIL rows of ``bench_transfer.py``: each 3D volume a bag of its axial slices.

A user with volumes and a MIL model that reads bags of tile features (``abmil_features.*``) makes one
bag per volume: every slice that holds some of the structure (a voxel above :data:`SLICE_THRESHOLD`)
is one instance, encoded as the base model's instances were (64-px tiles through the frozen ImageNet
EfficientNet-Lite0 of :class:`~mlmi_zoo.training.datasets.idrid_bags.IDRiDBagSettings`, the grey slice
repeated into three channels) and written with
:func:`~mlmi_zoo.training.datasets.feature_cache.cache_features`; one ``labels.csv`` (``slide_id,label``)
per folder. That is the layout ``mlmi-zoo finetune --data BAGS`` and ``mlmi-zoo evaluate --test-dir
BAGS`` read (README, "Bags"). A bag's ``slide_id`` is the volume's case id, so its predictions pair with
an image model's on the same case.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

SLICE_THRESHOLD = 0.1  # a slice is an instance when some voxel exceeds this share of the intensity range
BATCH = 256  # slices per encoder pass


def write_slice_bags(folder: Path, train: Sequence[Any], test: Sequence[Any], meta: dict[str, Any],
                     val: Sequence[Any] = ()) -> Path:
    """Write ``folder/train/``, ``folder/test/`` and ``folder/val/`` (one bag file per volume and a
    ``labels.csv`` each; a split without cases is not written) and ``folder/meta.json``.

    Args:
        folder: the data set's folder (replaced when complete: written under a temporary name first).
        train, test, val: cases whose ``image`` is a ``(D, H, W)`` volume in ``[0, 1]``, with ``label`` and
            ``patient`` (the bag's id, unique).
        meta: a JSON-safe description (counts and the encoder are added).

    Returns:
        ``folder``.
    """
    from mlmi_zoo.training.datasets.feature_cache import TileEncoder, cache_features
    from mlmi_zoo.training.datasets.idrid_bags import IDRiDBagSettings

    settings = IDRiDBagSettings()
    encoder = TileEncoder(settings, in_chans=3).eval()
    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    sizes: dict[str, list[int]] = {}
    for split, cases in (("train", train), ("test", test), ("val", val)):
        if not cases:
            continue
        out = partial / split
        out.mkdir(parents=True)
        rows = ["slide_id,label"]
        sizes[split] = []
        for case in cases:
            volume = torch.as_tensor(np.asarray(case.image, dtype=np.float32))  # (D, H, W)
            if volume.ndim != 3:
                raise ValueError(f"case {case.patient}: a bag of slices needs a (D, H, W) volume, got {tuple(volume.shape)}")
            keep = (volume.flatten(1).amax(1) > SLICE_THRESHOLD).nonzero().flatten()
            if keep.numel() == 0:
                keep = torch.arange(volume.shape[0])  # an empty volume: every slice
            tiles = volume[keep][:, None].expand(-1, 3, -1, -1)  # (N, 3, H, W)
            with torch.no_grad():
                feats = torch.cat([encoder(encoder.prepare(chunk)) for chunk in tiles.split(BATCH)])  # (N, D)
            coords = torch.stack([keep, torch.zeros_like(keep)], 1)  # (N, 2): slice index, 0
            cache_features(feats, coords, out / f"{case.patient}.safetensors",
                           meta={"slices": "axial", "encoder": settings.encoder, "init": settings.init})
            rows.append(f"{case.patient},{case.label}")
            sizes[split].append(int(keep.numel()))
        (out / "labels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    doc = {**meta, "encoder": {"name": settings.encoder, "init": settings.init, "features": encoder.out_features,
                               "weights": encoder.weights},
           "instances": f"axial slices with a voxel above {SLICE_THRESHOLD:g}",
           "bags": {split: {"n": len(v), "instances_min": min(v), "instances_median": float(np.median(v)),
                            "instances_max": max(v)} for split, v in sizes.items() if v}}
    (partial / "meta.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    if folder.exists():
        shutil.rmtree(folder)
    partial.rename(folder)
    return folder


def bag_predictions(model_dir: Path, bags: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P(last class), labels and bag ids of the bags in folder ``bags``, read as ``mlmi-zoo evaluate --test-dir``
    reads them (:func:`mlmi_zoo.training.finetune.evaluation_data_spec`)."""
    from torch.utils.data import DataLoader

    import mlmi_zoo
    from mlmi_zoo.architectures.blocks.stages import training_for
    from mlmi_zoo.training.data_spec import build_dataset, collate_for
    from mlmi_zoo.training.finetune import evaluation_data_spec

    uri = f"local-dir:{model_dir}"
    spec = evaluation_data_spec(uri, bags)
    model = mlmi_zoo.load(uri).eval()
    adapter = training_for(model)
    probs, labels, ids = [], [], []
    with torch.no_grad():
        for batch in DataLoader(build_dataset(spec, "test"), batch_size=32, shuffle=False, collate_fn=collate_for(spec)):
            probs.append(model(*adapter.inputs(model, batch)).softmax(-1)[:, -1])
            labels.append(batch["label"])
            ids += list(batch["slide_id"])
    return torch.cat(probs).numpy(), torch.cat(labels).numpy(), np.asarray(ids)


def labels_of(bags: Path) -> dict[str, str]:
    """``{slide_id: label}`` of a bag folder's ``labels.csv``."""
    with (bags / "labels.csv").open(encoding="utf-8", newline="") as fh:
        return {row["slide_id"]: row["label"] for row in csv.DictReader(fh)}
