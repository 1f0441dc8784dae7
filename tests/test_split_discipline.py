"""Test-split discipline: training and model selection never read the test split.

Every selection a run makes (the best epoch, early stopping, the last-layer fit, prototype push)
uses the training and validation splits; the test split is scored once, by ``evaluate``. The
trainer reaches data only through ``RunData.dataset``; these tests record every split it asks for.
"""
from __future__ import annotations

import json

import pytest
import yaml

from mlmi_zoo.training import run_data
from mlmi_zoo.training.recipe import load_recipe
from mlmi_zoo.training.trainer import train

RECIPE = {
    "model": {"name": "protopnet_resnet8",
              "config": {"img_size": [16, 16], "prototypes_per_class": 2,
                         "intensity": {"kind": "window", "low": -1000.0, "high": 400.0, "unit": "HU"}}},
    "data": {"kind": "nodule_phantom", "params": {"size": 16, "seed": 0, "spacing_range": [1.5, 2.0],
                                                  "diameter_range_mm": [4.0, 14.0]},
             "train_size": 16, "val_size": 8, "test_size": 8},
    "optim": {"name": "adamw", "lr": 0.01, "batch_size": 8},
    "stages": [{"name": "warmup", "epochs": 1}, {"name": "joint", "epochs": 1}, {"name": "push"},
               {"name": "last_layer", "epochs": 1}],
    "seed": 0,
    "device": "cpu",
}


@pytest.fixture
def requested_splits(monkeypatch) -> list[str]:
    seen: list[str] = []
    original = run_data.build_dataset

    def recording(spec, split):
        seen.append(split)
        return original(spec, split)

    monkeypatch.setattr(run_data, "build_dataset", recording)
    return seen


def test_training_with_model_selection_never_builds_the_test_split(tmp_path, requested_splits) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(RECIPE))))
    train(load_recipe(path), tmp_path / "run", quiet=True)
    assert "train" in requested_splits and "val" in requested_splits  # the recorder does see the run's data
    assert "test" not in requested_splits, f"training asked for the test split: {requested_splits}"
