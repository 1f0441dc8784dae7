"""A shipped model retrained from the recipe in its folder reproduces its results.json (slow)."""
from __future__ import annotations

import json

import pytest
import torch

from mlmi_zoo.registry import bundled_dir

NAME = "additive_mil_features.tilebag"
# Same seed and recipe; thread count and BLAS may reorder float sums, so the test metrics can move by
# a little. The stated tolerance on test AUROC and on the decomposition error:
AUROC_TOLERANCE = 0.02


@pytest.mark.slow
def test_retrained_model_matches_its_card(tmp_path) -> None:
    from mlmi_zoo.evaluation import evaluate
    from mlmi_zoo.training.recipe import load_recipe
    from mlmi_zoo.training.trainer import train

    folder = bundled_dir() / NAME
    if not (folder / "results.json").is_file():
        pytest.skip(f"{NAME} is not bundled")
    shipped = json.loads((folder / "results.json").read_text())
    torch.set_num_threads(1)  # the release was trained with one thread
    final = train(load_recipe(folder / "recipe.yaml", []), tmp_path / "run", quiet=True)
    results = evaluate(f"local-dir:{final}", None, split="test", n_boot=50)
    assert results["task"]["auroc"]["estimate"] == pytest.approx(shipped["task"]["auroc"]["estimate"], abs=AUROC_TOLERANCE)
    assert results["elements"]["transparency"]["metrics"]["decomposition_error_max"] <= 1e-5
