"""The contract every registered architecture keeps (parametrised over the whole registry)."""
from __future__ import annotations

import json

import pytest
import torch

import mlmi_zoo
import mlmi_zoo.registry
from mlmi_zoo import WeightsError
from mlmi_zoo.explanations import Explanation

from _cases import case_for

ARCHITECTURES = mlmi_zoo.list_models()


def build(name: str) -> tuple[mlmi_zoo.InterpretableModel, tuple[torch.Tensor, ...]]:
    family = mlmi_zoo.registry.get_entry(name).model_class.family
    case = case_for(name, family)
    model = mlmi_zoo.create_model(name, **case.overrides)
    return model, case.make_input(3)


def test_registry_is_not_empty() -> None:
    assert "baseline_resnet8" in ARCHITECTURES


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_forward_shape_and_every_parameter_gets_a_gradient(name: str) -> None:
    model, inputs = build(name)
    model.train()
    logits = model(*inputs)
    assert logits.shape == (3, model.num_classes)
    logits.sum().backward()
    # parameters the logits reach only through a discrete choice (a measurement bottleneck's landmark cell) are
    # trained by their own loss, which the family's tests check
    discrete = tuple(getattr(model, "discrete_parameters", ()))
    missing = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith(discrete) and
               (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing, f"parameters without a finite gradient: {missing}"


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_explain_matches_forward_and_decomposes(name: str) -> None:
    model, inputs = build(name)
    model.eval()
    exp = model.explain(*inputs, **case_for(name, model.family).explain_kwargs)
    assert isinstance(exp, Explanation)
    torch.testing.assert_close(exp.logits, model(*inputs), rtol=1e-5, atol=1e-5)
    assert exp.logits.shape == (3, model.num_classes)
    if exp.decomposable:
        assert exp.decomposition_error() <= 1e-5
    json.dumps(exp.to_dict())  # JSON-safe


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_save_load_is_bit_identical(name: str, tmp_path) -> None:
    model, inputs = build(name)
    model.eval()
    model.save_pretrained(tmp_path / "m")
    doc = json.loads((tmp_path / "m" / "config.json").read_text())
    assert doc["architecture"] == name and doc["mlmi_zoo_version"] == mlmi_zoo.__version__
    loaded = mlmi_zoo.load(f"local-dir:{tmp_path / 'm'}")
    assert type(loaded) is type(model) and loaded.config == model.config
    assert torch.equal(loaded(*inputs), model(*inputs))


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_sha_mismatch_is_refused(name: str, tmp_path) -> None:
    model, _ = build(name)
    folder = model.save_pretrained(tmp_path / "m")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256"):
        mlmi_zoo.load(f"local-dir:{folder}")
