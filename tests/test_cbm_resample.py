"""A concept bottleneck that resamples its inputs onto its canonical grid (``CBMConfig.resample``):
physical scale on the network's pixels, maps back on the input's pixels, lengths converted with
the canonical spacing."""
from __future__ import annotations

import math

import pytest
import torch

from mlmi_zoo.architectures.cbm.model import CBMConfig
from mlmi_zoo.registry import create_model
from mlmi_zoo.training.datasets.phantoms import NodulePhantom

CANONICAL = (0.75, 0.75)
WINDOW = {"kind": "window", "low": -1000.0, "high": 1000.0, "unit": "HU"}


def _model(**kw):
    torch.manual_seed(0)
    return create_model("cbm_resnet8", img_size=(64, 64), spacing=CANONICAL, resample=True, intensity=WINDOW,
                        **kw).eval()


def _disk(radius_mm: float, spacing: float, n: int = 64) -> torch.Tensor:
    c = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
    yy, xx = torch.meshgrid(c * spacing, c * spacing, indexing="ij")
    return ((yy ** 2 + xx ** 2) <= radius_mm ** 2).float()[None, None]  # (1, 1, n, n)


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_resample_needs_the_canonical_spacing():
    with pytest.raises(ValueError, match="canonical"):
        CBMConfig(resample=True)


def test_a_disk_reaches_the_network_at_its_physical_size_whatever_its_spacing():
    model = _model()
    expected = math.pi * (6.0 / CANONICAL[0]) ** 2  # a 6 mm radius on the 0.75 mm grid, in pixels
    seen = []
    for spacing in (0.5, 0.75, 1.0):
        canonical = model.to_canonical(_disk(6.0, spacing), torch.tensor([spacing, spacing])) > 0.5
        assert abs(float(canonical.sum()) - expected) < 0.08 * expected, spacing
        seen.append(canonical)
    assert _iou(seen[0], seen[2]) > 0.9
    x = _disk(6.0, 0.5)
    assert torch.equal(model.to_canonical(x, torch.tensor(CANONICAL)), x)  # the canonical grid is left alone
    assert torch.equal(model.to_canonical(x, None), x)  # no spacing: x is taken to be canonical


def test_maps_come_back_on_the_input_pixels():
    model = _model()
    spacing = torch.tensor([0.6, 0.6])  # finer than canonical: the canonical grid holds the whole image
    x = _disk(7.0, 0.6)
    back = model.from_canonical(model.to_canonical(x, spacing), spacing) > 0.5
    assert _iou(back, x.bool()) > 0.95
    exp = model.explain(model.input_spec.intensity(x * 1000.0 - 850.0), spacing=spacing)
    assert exp.concept_maps.shape[-2:] == x.shape[-2:]


def test_lengths_are_converted_with_the_canonical_spacing():
    model = _model()
    values = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0, 12.0, -20.0]])  # natural units, NODULE_CONCEPTS order
    at_native = model.true_bottleneck(values, torch.tensor([[0.5, 0.5]]))
    at_canonical = model.true_bottleneck(values, torch.tensor([CANONICAL]))
    assert torch.equal(at_native, at_canonical)  # a resampled pixel is a canonical pixel
    x = torch.rand(2, 1, 64, 64)
    exp = model.explain(x, spacing=torch.tensor([[0.5, 0.5], [1.0, 1.0]]))
    d = exp.measurements["diameter_mm"].value
    pixel = exp.concept_vector[:, model.concept_names.index("diameter_mm")] * model.codec.scale[0] + model.codec.loc[0]
    assert torch.allclose(d, pixel * CANONICAL[0])


def test_two_renderings_of_one_phantom_meet_on_the_canonical_grid():
    ds = NodulePhantom(6, size=64, seed=2)
    model = _model()
    for i in range(6):
        masks = []
        for spacing in (0.5, 1.0):
            sample = ds.render(i, spacing)
            masks.append(model.to_canonical(sample["mask"][None].float(), sample["spacing"]) > 0.5)
        assert _iou(*masks) > 0.8, i


def test_3d_volumes_are_resampled_in_every_axis():
    torch.manual_seed(0)
    model = create_model("cbm_resnet8", spatial_dims=3, img_size=(16, 32, 32), spacing=(2.0, 0.75, 0.75),
                         resample=True).eval()
    x = torch.rand(1, 1, 16, 32, 32)
    out = model.to_canonical(x, torch.tensor([2.0, 0.5, 0.5]))
    assert out.shape == x.shape
    assert (out[..., :, 0, :] == 0).all() and (out[..., :, :, -1] == 0).all()  # beyond the in-plane field of view
    assert (out[..., :, 16, 16] > 0).all()  # the centre keeps every slice (the slice spacing is canonical)
