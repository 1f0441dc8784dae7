"""Input validation, units and measurements."""
from __future__ import annotations

import pytest
import torch

import mlmi_zoo
from mlmi_zoo import InputSpecError, Measurement, QuantitySpec
from mlmi_zoo.architectures.blocks.heads import from_pixel_domain, spacing_exponent, to_pixel_domain


@pytest.fixture(scope="module")
def model():
    return mlmi_zoo.create_model("baseline_resnet8", img_size=(16, 16)).eval()


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.rand(2, 3, 16, 16), "expected 1 channels, got 3"),
        (torch.rand(2, 16, 16), "expected a 4-D input"),
        (torch.full((1, 1, 16, 16), float("nan")), "NaN"),
        (torch.full((1, 1, 16, 16), -850.0), "intensity transform"),
        (torch.zeros(1, 1, 16, 16, dtype=torch.long), "floating-point"),
    ],
)
def test_bad_inputs_are_refused_with_expected_and_actual(model, x, match) -> None:
    with pytest.raises(InputSpecError, match=match):
        model(x)
    assert issubclass(InputSpecError, ValueError)


@pytest.mark.parametrize("spacing", [(0.0, 0.7), (-1.0, 1.0), (0.7,), (float("nan"), 1.0)])
def test_bad_spacing_is_refused(model, spacing) -> None:
    with pytest.raises(InputSpecError, match="spacing"):
        model.validate_input(torch.rand(1, 1, 16, 16), spacing=spacing)


def test_measurement_converts_with_pint() -> None:
    m = Measurement("diameter_mm", torch.tensor([14.0, 7.0]), "mm")
    torch.testing.assert_close(m.to("cm").value, torch.tensor([1.4, 0.7]))
    assert Measurement("volume_ml", 2.0, "mL").to("mm**3").value == pytest.approx(2000.0)
    with pytest.raises(ValueError, match="cannot convert"):
        Measurement("d", 1.0, "mm").to("mL")
    with pytest.raises(ValueError, match="unknown unit"):
        Measurement("d", 1.0, "furlongs_per_fortnight_x")


def test_spacing_exponents_from_units() -> None:
    assert [spacing_exponent(u) for u in ("mm", "mm^2", "mL", "HU", "cm**2")] == [1, 2, 3, 0, 2]


def test_pixel_domain_round_trip_and_scaling() -> None:
    spec = QuantitySpec("area_mm2", "mm^2")
    spacing = torch.tensor([[0.5, 0.5], [1.0, 1.0]])
    px = torch.tensor([100.0, 100.0])
    mm2 = from_pixel_domain(px, spacing, spec)
    torch.testing.assert_close(mm2, torch.tensor([25.0, 100.0]))
    torch.testing.assert_close(to_pixel_domain(mm2, spacing, spec), px)
    vol = from_pixel_domain(torch.tensor([1000.0]), torch.tensor([[1.0, 1.0, 1.0]]), QuantitySpec("volume_ml", "mL"))
    torch.testing.assert_close(vol, torch.tensor([1.0]))
