"""Shared pieces of the MIL tests: tiny configs, a model builder, the training adapter, padding, a folder of bags."""
from __future__ import annotations

from pathlib import Path

import torch

import mlmi_zoo
from mlmi_zoo.architectures.blocks.stages import training_for
from mlmi_zoo.architectures.mil.training import MILTraining

D = 16
TINY = {"in_features": D, "hidden": 8, "attention_hidden": 8, "classifier_hidden": 6}
TINY_TRAINING = {"train_max_instances": None}  # the tests' training settings: every instance unless told
FEATURE_MODELS = ["abmil_features", "additive_mil_features"]
TILE_AREA_MM2 = (256 * 0.5e-3) ** 2  # default tile: 256 px at 0.5 µm = 0.128 mm a side


def make(name: str, **overrides) -> mlmi_zoo.InterpretableModel:
    model = mlmi_zoo.create_model(name, **{**TINY, **overrides}).eval()
    # The bag-context maps start at zero; random weights make every test exercise them.
    torch.manual_seed(0)
    for p in (model.score_offset.parameters() if model.score_offset is not None else ()):
        torch.nn.init.normal_(p)
    head = model.area_head
    if head is not None and head.prior is not None:  # stored divided by the head's gain
        for p in [*head.prior.parameters(), head.calibration_out, *head.fraction.parameters()]:
            torch.nn.init.normal_(p, std=1.0 / head.gain)
    return model


def trainer_for(model: mlmi_zoo.InterpretableModel, **settings) -> MILTraining:
    """The model's training adapter with the tests' settings (TINY_TRAINING, then ``settings``)."""
    adapter = training_for(model, {**TINY_TRAINING, **settings})
    assert isinstance(adapter, MILTraining)
    return adapter


def padded(bags: list[torch.Tensor], fill: float = 37.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad bags (n_i, D) into (B, N, D) with a conspicuous fill value, and the (B, N) mask."""
    n = max(b.shape[0] for b in bags)
    x = torch.full((len(bags), n, bags[0].shape[1]), fill)
    mask = torch.zeros(len(bags), n, dtype=torch.bool)
    for i, b in enumerate(bags):
        x[i, : len(b)] = b
        mask[i, : len(b)] = True
    return x, mask


def write_bags(folder: Path, n: int = 24, width: int = 320, seed: int = 0) -> Path:
    """``n`` bags of ``width``-wide instance features; a "lesion" bag holds a few shifted instances."""
    from mlmi_zoo.training.datasets.feature_cache import cache_features

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    rows = ["slide_id,label"]
    for i in range(n):
        feats = torch.rand(int(torch.randint(12, 30, (1,), generator=g)), width, generator=g)
        lesion = i % 2 == 1
        if lesion:
            feats[:3, :16] += 2.0
        cache_features(feats, torch.zeros(len(feats), 2, dtype=torch.int64), folder / f"eye{i:02d}.safetensors")
        rows.append(f"eye{i:02d},{'lesion' if lesion else 'none'}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder
