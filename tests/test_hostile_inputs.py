"""Hostile inputs get the zoo's own errors: an empty batch, a dtype the model does not hold, spacing with units."""
from __future__ import annotations

import pytest
import torch

import mlmi_zoo
from mlmi_zoo import InputSpecError
from mlmi_zoo.units import quantity


@pytest.fixture(scope="module")
def model() -> mlmi_zoo.InterpretableModel:
    return mlmi_zoo.load("protopnet_resnet8.lidc_nodule")


def test_an_empty_batch_is_refused_by_name(model) -> None:
    with pytest.raises(InputSpecError, match=r"the batch is empty \(shape \(0, 1, 64, 64\)\)"):
        model(torch.zeros(0, 1, 64, 64))
    bags = mlmi_zoo.load("abmil_features.tilebag")
    with pytest.raises(InputSpecError, match="the batch is empty"):
        bags(torch.zeros(0, 5, bags.config.in_features))


def test_a_float64_input_is_refused_with_the_fix(model) -> None:
    x = torch.rand(2, 1, 64, 64, dtype=torch.float64)
    with pytest.raises(InputSpecError, match=r"input dtype torch.float64 differs from the model's parameters "
                                             r"\(torch.float32\); convert the input with x.to\(torch.float32\)"):
        model(x)
    torch.testing.assert_close(model(x.float()), model(x.to(torch.float32)))  # the fix it names works
    double = mlmi_zoo.load("protopnet_resnet8.lidc_nodule").double()  # the other fix: a float64 model
    assert double(x).dtype == torch.float64


@pytest.mark.parametrize("given", [("0.7 mm", "0.7 mm"), ("700 um", "0.07 cm"), (quantity(0.7, "mm"), "0.7mm"),
                                   [[0.7, "0.7 mm"]]])
def test_spacing_with_units_is_converted_to_mm(model, given) -> None:
    x = torch.rand(1, 1, 64, 64)
    reference = model.explain(x, spacing=(0.7, 0.7)).measurements["diameter_mm"].value
    measured = model.explain(x, spacing=given).measurements["diameter_mm"].value
    torch.testing.assert_close(measured, reference)


@pytest.mark.parametrize("given", [("0.7 s", "0.7 s"), ("0.7 apples", "0.7 mm"), ("seven mm", "0.7 mm")])
def test_spacing_that_is_not_a_length_is_refused(model, given) -> None:
    with pytest.raises(InputSpecError, match="is not a length: give mm as numbers, or a length with its unit"):
        model.explain(torch.rand(1, 1, 64, 64), spacing=given)
