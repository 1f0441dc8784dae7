"""ONNX export of ``forward`` for every family, run with onnxruntime, and reduced-precision forward.

``torch.onnx.export(model, (x,), dynamo=True)`` goes through ``torch.export`` (the input checks that
depend on values are skipped while tracing, see ``mlmi_zoo.specs``); the exported graph must give the
model's logits under onnxruntime. Skipped where onnx, onnxscript or onnxruntime are not installed.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import mlmi_zoo

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

CASES = [("protopnet_resnet8.lidc_nodule", 2e-3), ("cbm_resnet8.lidc_nodule", 1e-4), ("abmil_features.tilebag", 1e-4),
         ("additive_mil_features.tilebag", 1e-4), ("baseline_resnet8.lidc_nodule3d", 1e-4)]


def _input(model: mlmi_zoo.InterpretableModel) -> torch.Tensor:
    torch.manual_seed(0)
    if model.input_spec.spatial_dims == 0:
        return torch.rand(1, 20, model.input_spec.in_channels)
    return torch.rand(2, model.input_spec.in_channels, *model.input_spec.size)


@pytest.mark.parametrize("name,atol", CASES)
def test_forward_exports_to_onnx_and_runs_in_onnxruntime(name, atol, tmp_path) -> None:
    model = mlmi_zoo.load(name).eval()
    x = _input(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    assert program is not None
    path = tmp_path / "model.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path))
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    assert out.shape == expected.shape
    assert abs(out - expected).max() <= atol


@pytest.mark.parametrize("name", ["cbm_resnet8.lidc_nodule", "abmil_features.tilebag"])
def test_bfloat16_forward_stays_close_for_linear_heads(name) -> None:
    model = mlmi_zoo.load(name).eval()
    x = _input(model)
    with torch.no_grad():
        reference = model(x)
        low = model.to(torch.bfloat16)(x.to(torch.bfloat16)).float()
    assert (low - reference).abs().max() < 0.1


def test_protopnet_log_similarity_is_not_reliable_in_bfloat16() -> None:
    # Documented in README: log((d + 1) / (d + eps)) of small prototype distances loses most of its
    # digits in bfloat16, so ProtoPNet runs in float32 (the zoo refuses a float16 input to a float32 model).
    model = mlmi_zoo.load("protopnet_resnet8.lidc_nodule").eval()
    x = _input(model)
    with torch.no_grad():
        reference = model(x)
        low = model.to(torch.bfloat16)(x.to(torch.bfloat16)).float()
    assert (low - reference).abs().max() > 0.1
