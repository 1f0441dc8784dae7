"""Nodule-phantom concepts as a concept bottleneck sees them: the Lung-RADS-like size category that
makes the label rule linear in the concepts."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import DataLoader

from mlmi_zoo.architectures.cbm.model import NODULE_CONCEPTS
from mlmi_zoo.architectures.cbm.training import fit_concept_statistics
from mlmi_zoo.architectures.cbm.concept_values import concept_values_from_batch
from mlmi_zoo.architectures.cbm.interventions import RandomPolicy, intervention_curve
from mlmi_zoo.registry import create_model
from mlmi_zoo.training.datasets import phantoms
from mlmi_zoo.training.datasets.nodule_rule import nodule_size_category
from mlmi_zoo.training.datasets.phantoms import NodulePhantom

WINDOW = {"kind": "window", "low": -1000.0, "high": 1000.0, "unit": "HU"}


def _batch(ds: NodulePhantom) -> dict:
    return next(iter(DataLoader(ds, batch_size=len(ds))))


def test_size_category_follows_the_rule_thresholds_in_every_input_type():
    d = [0.0, 4.0, 7.999, 8.0, 14.99, 15.0, 21.0]
    expected = [math.nan, 0.0, 0.0, 1.0, 1.0, 2.0, 2.0]
    as_numpy = nodule_size_category(np.array(d))
    as_tensor = nodule_size_category(torch.tensor(d))
    as_float = [nodule_size_category(v) for v in d]
    for got in (as_numpy.tolist(), as_tensor.tolist(), as_float):
        assert math.isnan(got[0]) and got[1:] == expected[1:]


def test_phantom_declares_the_size_category_the_cbm_default_predicts():
    ds = NodulePhantom(4, size=48, seed=0)
    declared = {s.name: s for s in ds.concept_specs}
    model_default = {s.name: s for s in NODULE_CONCEPTS}
    assert declared["size_category"] == model_default["size_category"]
    assert declared["size_category"].kind == "ordinal"
    assert declared["size_category"].levels == phantoms.SIZE_CATEGORY_LEVELS
    # every concept the phantom declares is one the default model predicts, with the same coding
    assert all(model_default[name] == spec for name, spec in declared.items())


def test_size_category_is_the_native_diameter_category_and_survives_rerendering():
    ds = NodulePhantom(40, size=64, seed=3, p_nodule=0.8)  # 64 px: room for >= 15 mm
    batch = _batch(ds)
    category = batch["concepts"]["size_category"]
    d = batch["measurements"]["diameter_mm"]
    assert torch.equal(torch.isnan(category), d == 0)  # missing exactly when there is no nodule
    assert torch.allclose(category[d > 0], nodule_size_category(d)[d > 0])
    assert set(category[d > 0].tolist()) == {0.0, 1.0, 2.0}
    for i in range(8):
        for spacing in (0.5, 1.0):
            again = ds.render(i, spacing)["concepts"]["size_category"]
            assert torch.equal(again, category[i]) or (torch.isnan(again) and torch.isnan(category[i]))


def _rule_head(model) -> None:
    """Set the linear head to 3 [>= 15] + [8-15] + 2 spic + [part-solid] - 10 calc >= 2 (class 1)."""
    weights = {"spiculation": 2.0, "calcification": -10.0, "texture=part-solid": 1.0,
               "size_category=8-15 mm": 1.0, "size_category=>=15 mm": 3.0}
    with torch.no_grad():
        model.label_head.weight.zero_()
        model.label_head.bias.zero_()
        for name, w in weights.items():
            model.label_head.weight[1, model.concept_names.index(name)] = w
        model.label_head.bias[1] = -1.5  # halfway between the integer scores 1 and 2


def test_a_linear_head_on_the_true_concepts_reproduces_the_label_rule_exactly():
    ds = NodulePhantom(300, size=64, seed=5)
    model = create_model("cbm_resnet8", img_size=(64, 64), intensity=WINDOW).eval()
    fit_concept_statistics(model, ds)
    batch = _batch(ds)
    values = concept_values_from_batch(model.concept_specs, batch)
    true = model.true_bottleneck(values, batch["spacing"])
    _rule_head(model)
    predicted = model.predict_label(true).argmax(-1)
    assert torch.equal(predicted, batch["label"])
    # the same through the intervention curve: correcting every concept reaches the oracle
    curve = intervention_curve(model, ds, RandomPolicy(0), repeats=1, batch_size=300)
    assert curve["all_corrected"] == 1.0
    # without the size category the rule is not linear in what the head sees: the same head misses cases
    broken = true.clone()
    size_units = [model.concept_names.index(n) for n in model.concept_names if n.startswith("size_category=")]
    broken[:, size_units] = model.codec.level_prior[-3:]  # the category replaced by its prior
    assert (model.predict_label(broken).argmax(-1) != batch["label"]).any()


