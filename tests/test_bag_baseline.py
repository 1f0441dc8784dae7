"""The black-box baseline on bags: what it computes, and that it fine-tunes and evaluates on a user's bags
by the same commands as a MIL model, so the two compare on the same features."""
from __future__ import annotations

import json

import pytest
import torch

import mlmi_zoo
from mlmi_zoo.architectures.bag_baseline import BagBaseline
from mlmi_zoo.specs import InputSpecError, QuantitySpec
from mlmi_zoo.training.finetune import finetune

from _mil import write_bags

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_logits_read_the_mean_and_the_maximum_of_the_valid_instances_embeddings():
    torch.manual_seed(0)
    model = mlmi_zoo.create_model("bag_baseline_features", in_features=6, hidden=5, classifier_hidden=0).eval()
    assert isinstance(model, BagBaseline) and not mlmi_zoo.families.family_of(model).interpretable
    feats, mask = torch.randn(2, 4, 6), torch.tensor([[True, True, False, False], [True, True, True, True]])
    feats[0, 2:] = float("nan")  # padding is never read
    h = model.embed(torch.nan_to_num(feats))
    expected = torch.stack([model.classifier(torch.cat([h[b, mask[b]].mean(0), h[b, mask[b]].amax(0)]))
                            for b in range(2)])
    torch.testing.assert_close(model(feats, mask), expected)
    explanation = model.explain(feats, mask=mask, coords=torch.zeros(2, 4, 2))  # a MIL caller's keywords work
    torch.testing.assert_close(explanation.logits, expected)
    assert explanation.measurements == {}
    with pytest.raises(InputSpecError, match="no valid instance"):
        model(feats, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="no physical head"):
        mlmi_zoo.create_model("bag_baseline_features", quantities=(QuantitySpec("area_mm2", "mm^2"),))


def test_it_fine_tunes_and_evaluates_on_a_users_bags_like_a_mil_model(tmp_path):
    from mlmi_zoo.evaluation.cli import main as evaluate_main

    parent = tmp_path / "parent"
    torch.manual_seed(0)
    mlmi_zoo.create_model("bag_baseline_features", in_features=320, label_names=("a", "b", "c")).save_pretrained(parent)
    final = finetune(f"local-dir:{parent}", write_bags(tmp_path / "bags"), out_dir=tmp_path / "run", steps=6,
                     quiet=True)
    config = json.loads((final / "config.json").read_text())
    assert config["data"]["kind"] == "cached_bags" and config["config"]["label_names"] == ["lesion", "none"]
    out = tmp_path / "results.json"
    assert evaluate_main(["evaluate", f"local-dir:{final}", "--test-dir", str(write_bags(tmp_path / "test", n=10, seed=1)),
                          "--out", str(out), "--n-boot", "20"]) == 0
    results = json.loads(out.read_text())
    assert results["n_cases"] == 10 and results["task"]["auroc"]["estimate"] is not None
    assert not any(block["applicable"] for block in results["elements"].values())  # a black box explains nothing
