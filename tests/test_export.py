"""Every family's ``forward`` exports with ``torch.export`` and compiles as one graph.

The input checks that depend on the values (NaN/Inf, intensity range) cannot be traced; under
``torch.export`` / ``torch.compile`` they are skipped and the shape, channel and dtype checks stay.
"""
from __future__ import annotations

import pytest
import torch

import mlmi_zoo

BUNDLED = ["protopnet_resnet8.lidc_nodule", "protopnet_resnet8.lidc_nodule3d", "cbm_resnet8.nodule_phantom",
           "baseline_resnet8.lidc_nodule", "abmil_features.tilebag", "additive_mil_features.tilebag"]


def _input(model: mlmi_zoo.InterpretableModel) -> torch.Tensor:
    torch.manual_seed(0)
    c = model.config
    if c.spatial_dims == 0:
        return torch.randn(2, 7, c.in_channels)
    return torch.rand(2, c.in_channels, *c.img_size)


@pytest.mark.parametrize("name", BUNDLED)
def test_forward_exports_and_matches_eager(name: str) -> None:
    model = mlmi_zoo.load(name).eval()
    x = _input(model)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", BUNDLED)
def test_forward_compiles_as_one_graph(name: str) -> None:
    torch._dynamo.reset()
    model = mlmi_zoo.load(name).eval()
    x = _input(model)
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # fullgraph: a graph break raises
    torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-6)


def test_eager_forward_still_checks_values() -> None:
    model = mlmi_zoo.load("protopnet_resnet8.lidc_nodule").eval()
    x = _input(model)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(mlmi_zoo.InputSpecError, match="NaN or Inf"):
        model(x)
