"""Hostile inputs get the zoo's own errors, or the documented result: never a made-up number, never
an error from deep inside torch.

Every case either raises an exception class of mlmi_zoo (``WeightsError``, ``ConfigError``,
``InputSpecError``, ``ConceptValueError``, ``UnknownModelError``) whose message names the argument,
the value and what is expected, or asserts the documented result. The cases are grouped as a user
meets them: a model folder (weights, config.json), the image or bag tensor, its spacing, concept
interventions, and MIL masks and coordinates.
"""
from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import mlmi_zoo
from mlmi_zoo import ConceptValueError, ConfigError, InputSpecError, WeightsError
from mlmi_zoo._weights import MissingWeightsError
from mlmi_zoo.registry import UnknownModelError, bundled_dir
from mlmi_zoo.units import quantity

NODULE = "protopnet_resnet8.lidc_nodule"  # 2D CT, 64x64 at 0.7 mm, a diameter head, stride 8
CBM = "cbm_resnet8.lidc_nodule"  # concepts: 3 ordinal shape ratings, diameter_mm
CBM_BINARY = "cbm_resnet8.nodule_phantom"  # binary calcification, categorical texture, diameter_mm
BAGS = "abmil_features.tilebag"
FAMILIES = [NODULE, CBM, "baseline_resnet8.lidc_nodule", BAGS, "additive_mil_features.tilebag"]


@functools.lru_cache(maxsize=None)
def _model(name: str) -> mlmi_zoo.InterpretableModel[Any]:
    """A bundled model, loaded once for the module (the cases never change it)."""
    return mlmi_zoo.load(name)


@pytest.fixture(scope="module")
def model() -> mlmi_zoo.InterpretableModel[Any]:
    return _model(NODULE)


def _images(model: mlmi_zoo.InterpretableModel[Any], batch: int = 2) -> torch.Tensor:
    """A batch in network range at the model's training size."""
    return torch.rand(batch, model.config.in_channels, *model.config.img_size)


def _bag(batch: int = 2, n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (B, N, D) and a mask whose last bag has two padded instances."""
    feats = torch.randn(batch, n, _model(BAGS).config.in_features, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[-1, n - 2:] = False
    return feats, mask


# -- an empty batch, float64, spacing with units ----------------------------------------------------------
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


# -- weights integrity ------------------------------------------------------------------------------------
def _copy(name: str, tmp_path: Path) -> Path:
    """config.json and model.safetensors of a bundled model, without its card: only config.json vouches
    for the weights, so nothing else can be what refuses a case."""
    folder = tmp_path / name
    folder.mkdir()
    for file in ("config.json", "model.safetensors"):
        shutil.copy(bundled_dir() / name / file, folder / file)
    return folder


def _edit(folder: Path, path: tuple[str, ...], value: Any = None, delete: bool = False) -> None:
    """Set (or delete) ``doc[path[0]][path[1]]...`` in ``folder/config.json``."""
    doc = json.loads((folder / "config.json").read_text())
    node = doc
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    (folder / "config.json").write_text(json.dumps(doc))


def _flip_a_byte(weights: Path) -> None:
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return _copy("baseline_resnet8.pneumoniamnist", tmp_path)


@pytest.fixture
def never_deserialise(monkeypatch) -> None:
    def must_not_run(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("deserialised weights that were not verified")

    monkeypatch.setattr("safetensors.torch.load_file", must_not_run)


def test_a_copied_folder_loads_and_predicts_as_the_bundled_model(folder) -> None:
    x = torch.rand(2, 1, 28, 28)
    name = "baseline_resnet8.pneumoniamnist"
    torch.testing.assert_close(mlmi_zoo.load(f"local-dir:{folder}")(x), _model(name)(x), rtol=0, atol=0)


def test_a_flipped_byte_is_refused_before_deserialising(folder, never_deserialise) -> None:
    _flip_a_byte(folder / "model.safetensors")
    with pytest.raises(WeightsError, match=r"model\.safetensors: sha256 [0-9a-f]{64} differs from the recorded"):
        mlmi_zoo.load(f"local-dir:{folder}")


@pytest.mark.parametrize("value", [None, "", "abc", "0" * 63, "0" * 65, "z" * 64, 123, ["0" * 64]],
                         ids=["null", "empty", "short", "63-hex", "65-hex", "not-hex", "number", "list"])
def test_a_missing_or_malformed_checksum_never_switches_the_check_off(folder, never_deserialise, value) -> None:
    _edit(folder, ("weights_sha256",), value)
    with pytest.raises(WeightsError, match=r"'weights_sha256' must be the sha256 of model\.safetensors "
                                           r"\(64 hex digits\); got ") as caught:
        mlmi_zoo.load(f"local-dir:{folder}")
    assert str(caught.value).endswith(f"got {value!r}")


def test_a_config_without_a_checksum_is_refused(folder, never_deserialise) -> None:
    _edit(folder, ("weights_sha256",), delete=True)
    with pytest.raises(WeightsError, match=r"config\.json lacks 'weights_sha256'.*never loaded unverified"):
        mlmi_zoo.load(f"local-dir:{folder}")


@pytest.mark.parametrize("extra", [{"verify_weights": False}, {"skip_checksum": True},
                                   {"trust_remote_code": True, "weights_sha256_check": "off"}],
                         ids=["verify_weights", "skip_checksum", "trust"])
def test_no_extra_key_switches_the_checksum_off(folder, never_deserialise, extra) -> None:
    doc = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**doc, **extra}))
    _flip_a_byte(folder / "model.safetensors")
    with pytest.raises(WeightsError, match="differs from the recorded"):
        mlmi_zoo.load(f"local-dir:{folder}")


@pytest.mark.parametrize("weights_file", ["../model.safetensors", "/tmp/model.safetensors", "sub/model.safetensors",
                                          "", 7])
def test_weights_outside_the_model_folder_are_refused(folder, never_deserialise, weights_file) -> None:
    _edit(folder, ("weights_file",), weights_file)
    with pytest.raises(WeightsError, match=r"'weights_file' must name a \.safetensors file in the model folder"):
        mlmi_zoo.load(f"local-dir:{folder}")


def test_a_missing_weights_file_is_named(folder) -> None:
    (folder / "model.safetensors").unlink()
    with pytest.raises(MissingWeightsError, match=r"weights file not found: .*model\.safetensors") as caught:
        mlmi_zoo.load(f"local-dir:{folder}")
    assert isinstance(caught.value, FileNotFoundError)  # what callers caught before still works


def test_weights_of_other_shapes_are_refused(folder) -> None:
    other = bundled_dir() / "baseline_resnet8.retinamnist" / "model.safetensors"  # 3 input channels, not 1
    shutil.copy(other, folder / "model.safetensors")
    _edit(folder, ("weights_sha256",), json.loads(other.with_name("config.json").read_text())["weights_sha256"])
    with pytest.raises(WeightsError, match=r"weights do not fit this configuration \(backbone.*: file \(\d+, 3"):
        mlmi_zoo.load(f"local-dir:{folder}")


def test_weights_of_another_architecture_are_refused(folder) -> None:
    other = bundled_dir() / "protopnet_resnet8.pneumoniamnist" / "model.safetensors"
    shutil.copy(other, folder / "model.safetensors")
    _edit(folder, ("weights_sha256",), json.loads(other.with_name("config.json").read_text())["weights_sha256"])
    with pytest.raises(WeightsError, match=r"weights do not match the architecture: missing \[.*unexpected \["):
        mlmi_zoo.load(f"local-dir:{folder}")


@pytest.mark.parametrize("text, match", [("{not json", "is not valid JSON"), ("", "is not valid JSON"),
                                         ("[1, 2]", "holds a JSON list; expected an object"),
                                         ('"config"', "holds a JSON string; expected an object")],
                         ids=["broken", "empty", "list", "string"])
def test_a_config_json_that_is_not_a_json_object_is_refused(folder, text, match) -> None:
    (folder / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=r"config\.json " + match):
        mlmi_zoo.load(f"local-dir:{folder}")


# -- config completeness ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, key", [("baseline_resnet8.pneumoniamnist", "label_names"),
                                       ("baseline_resnet8.pneumoniamnist", "intensity"),
                                       ("baseline_resnet8.lidc_nodule", "spacing"),  # it measures diameters
                                       ("baseline_resnet8.pneumoniamnist", "in_channels"),
                                       ("cbm_resnet8.lidc_nodule", "spacing")])  # a length concept
def test_a_config_field_that_states_a_fact_is_never_defaulted(tmp_path, name, key) -> None:
    folder = _copy(name, tmp_path)
    _edit(folder, ("config", key), delete=True)
    with pytest.raises(ConfigError, match=rf"config\.json: the config lacks '{key}'.*never assumed"):
        mlmi_zoo.load(f"local-dir:{folder}")


def test_a_model_without_a_physical_scale_may_omit_spacing(tmp_path) -> None:
    folder = _copy("baseline_resnet8.pneumoniamnist", tmp_path)  # no quantity, no length concept
    _edit(folder, ("config", "spacing"), delete=True)
    assert mlmi_zoo.load(f"local-dir:{folder}").config.spacing is None


@pytest.mark.parametrize("key", ["architecture", "config"])
def test_a_config_json_without_its_sections_is_refused(folder, key) -> None:
    _edit(folder, (key,), delete=True)
    with pytest.raises(ConfigError, match=rf"config\.json lacks '{key}'"):
        mlmi_zoo.load(f"local-dir:{folder}")


def test_an_unknown_architecture_is_named(folder) -> None:
    _edit(folder, ("architecture",), "baseline_resnet99")
    with pytest.raises(UnknownModelError, match=r"unknown architecture 'baseline_resnet99'; registered ones include"):
        mlmi_zoo.load(f"local-dir:{folder}")


@pytest.mark.parametrize("version, match", [(99, r"config_version 99 is newer than this mlmi-zoo reads \(2\)"),
                                            ("two", r"config_version 'two'; expected an integer from 1 to 2"),
                                            (0, r"config_version 0; expected an integer from 1 to 2"),
                                            (2.5, r"config_version 2.5; expected an integer from 1 to 2")])
def test_an_unknown_config_version_is_refused(folder, version, match) -> None:
    _edit(folder, ("config_version",), version)
    with pytest.raises(ConfigError, match=match):
        mlmi_zoo.load(f"local-dir:{folder}")


def test_a_config_section_that_is_not_an_object_is_refused(folder) -> None:
    _edit(folder, ("config",), ["resnet8"])
    with pytest.raises(ConfigError, match=r"'config' must be a JSON object of the model's fields; got a list"):
        mlmi_zoo.load(f"local-dir:{folder}")


# -- tensors ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_an_empty_batch_is_refused_in_every_family(name) -> None:
    m = _model(name)
    x = torch.zeros(0, 5, m.config.in_features) if m.input_spec.spatial_dims == 0 else _images(m, 0)
    with pytest.raises(InputSpecError, match=r"the batch is empty \(shape \(0, "):
        m.explain(x)


@pytest.mark.parametrize("dtype, match", [
    (torch.float16, r"input dtype torch.float16 differs from the model's parameters \(torch.float32\)"),
    (torch.int64, r"x has dtype torch.int64; expected a floating-point tensor"),
    (torch.uint8, r"x has dtype torch.uint8; expected a floating-point tensor.*intensity transform"),
    (torch.bool, r"x has dtype torch.bool; expected a floating-point tensor")])
def test_a_dtype_the_model_does_not_hold_is_refused(model, dtype, match) -> None:
    with pytest.raises(InputSpecError, match=match):
        model(_images(model).to(dtype))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_or_inf_in_an_image_is_refused_naming_the_case(model, bad) -> None:
    x = _images(model, 3)
    x[1, 0, 10, 20] = bad
    with pytest.raises(InputSpecError, match=r"x holds 1 NaN or Inf value\(s\), the first in case 1"):
        model.explain(x)


@pytest.mark.parametrize("name, size", [(NODULE, (4, 4)), (CBM, (8, 64)), ("baseline_resnet8.lidc_nodule", (1, 1)),
                                        ("protopnet_resnet8.lidc_nodule3d", (4, 32, 32))])
def test_an_image_smaller_than_the_backbone_stride_is_refused(name, size) -> None:
    m = _model(name)
    with pytest.raises(InputSpecError, match=r"x has spatial size \(.*\), smaller than one cell of the backbone's "
                                             r"latent grid \(\d+ pixels per axis\)"):
        m(torch.rand(1, m.config.in_channels, *size))


@pytest.mark.parametrize("name", [NODULE, CBM, "baseline_resnet8.lidc_nodule"])
def test_an_image_far_from_the_training_size_needs_its_spacing(name) -> None:
    m = _model(name)
    big = torch.rand(1, 1, 640, 640)
    with pytest.raises(InputSpecError, match=r"x is \(640, 640\) pixels, more than 4x larger than the \(64, 64\) "
                                             r"the model was trained at, and no spacing was given"):
        m.explain(big)
    assert torch.isfinite(m(big)).all()  # the decision needs no spacing: only measurements are refused


def test_a_large_image_with_its_spacing_is_measured_at_that_spacing() -> None:
    regression = _model("baseline_resnet8.lidc_nodule")  # a regression head: its length is pixels x spacing
    big = torch.rand(1, 1, 640, 640)
    at_fine = regression.explain(big, spacing=(0.07, 0.07)).measurements["diameter_mm"].value
    at_double = regression.explain(big, spacing=(0.14, 0.14)).measurements["diameter_mm"].value
    torch.testing.assert_close(at_double, 2 * at_fine)
    assert float(at_double.max()) < regression.config.quantities[0].high  # not the head's saturated maximum


@pytest.mark.parametrize("name, shape, match", [
    ("protopnet_resnet8.lidc_nodule3d", (1, 1, 32, 32), r"expected a 5-D input \(B, C, D, H, W\)"),
    (NODULE, (1, 1, 8, 64, 64), r"expected a 4-D input \(B, C, H, W\)"),
    (NODULE, (1, 64, 64), r"expected a 4-D input \(B, C, H, W\).*got shape \(1, 64, 64\)"),
    (NODULE, (1, 3, 64, 64), r"expected 1 channels, got 3"),
    ("protopnet_resnet8.retinamnist", (1, 1, 28, 28), r"expected 3 channels, got 1")],
    ids=["2d-into-3d", "3d-into-2d", "no-batch-axis", "rgb-into-ct", "grey-into-rgb"])
def test_a_tensor_of_the_wrong_layout_is_refused(name, shape, match) -> None:
    with pytest.raises(InputSpecError, match=match):
        _model(name).explain(torch.rand(*shape))


@pytest.mark.parametrize("name", [NODULE, CBM, BAGS])
@pytest.mark.parametrize("convert", [lambda t: t.numpy(), lambda t: t.tolist()], ids=["numpy", "list"])
@pytest.mark.parametrize("method", ["forward", "explain"])
def test_a_non_tensor_input_is_refused_with_the_conversion(name, convert, method) -> None:
    m = _model(name)
    x = _bag()[0] if name == BAGS else _images(m)
    call = m if method == "forward" else m.explain
    with pytest.raises(InputSpecError, match=r"(x|feats) must be a torch.Tensor, got (numpy.ndarray|list).*"
                                             r"torch.as_tensor\((x|feats), dtype=torch.float32\)"):
        call(convert(x))


# -- spacing ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", [(-0.7, 0.7), (0.0, 0.7), (math.nan, 0.7), (0.7, math.inf)],
                         ids=["negative", "zero", "nan", "inf"])
def test_a_spacing_that_is_not_finite_and_positive_is_refused(model, spacing) -> None:
    with pytest.raises(InputSpecError, match=r"spacing must be finite and positive \(mm\), got \[\["):
        model.explain(_images(model), spacing=spacing)


@pytest.mark.parametrize("spacing, match", [((0.7, 0.7, 0.7), r"expected spacing with 2 values per image .*\(1, 3\)"),
                                            ((0.7,), r"expected spacing with 2 values per image .*\(1, 1\)"),
                                            ([(0.7, 0.7)] * 3, r"expected spacing for 1 or 2 images, got 3"),
                                            ((None, 0.7), r"spacing \(None, 0.7\) must be numbers \(mm\)")],
                         ids=["3-values", "1-value", "3-rows", "none"])
def test_a_spacing_of_the_wrong_form_is_refused(model, spacing, match) -> None:
    with pytest.raises(InputSpecError, match=match):
        model.explain(_images(model), spacing=spacing)


def test_a_volume_is_not_a_spacing(model) -> None:
    with pytest.raises(InputSpecError, match="'0.7 mL' is not a length"):
        model.explain(_images(model), spacing=("0.7 mL", "0.7 mL"))


@pytest.mark.parametrize("spacing", [(70.0, 70.0), (0.007, 0.007), ("0.7 m", "0.7 m"), (0.0007, 0.0007), (700, 0.7)],
                         ids=["100x", "1/100x", "metres-with-unit", "metres-as-numbers", "micrometres-as-numbers"])
def test_an_implausible_spacing_is_refused(model, spacing) -> None:
    with pytest.raises(InputSpecError, match=r"spacing \[\[.*\]\] mm is at least 100x (larger|smaller) than the "
                                             r"model's canonical spacing \(0.7, 0.7\) mm on some axis"):
        model.explain(_images(model), spacing=spacing)


@pytest.mark.parametrize("spacing", [(8.0, 8.0), (0.05, 0.05)], ids=["11x", "1/14x"])
def test_an_unusual_spacing_is_used_with_a_warning(spacing) -> None:
    regression = _model("baseline_resnet8.lidc_nodule")
    x = _images(regression)
    at_canonical = regression.explain(x).measurements["diameter_mm"].value
    with pytest.warns(UserWarning, match=r"x (larger|smaller) than the model's canonical spacing \(0.7, 0.7\) mm"):
        measured = regression.explain(x, spacing=spacing).measurements["diameter_mm"].value
    torch.testing.assert_close(measured, torch.clamp(spacing[0] / 0.7 * at_canonical, max=60.0))


def test_a_plausible_spacing_is_used_as_given() -> None:
    regression = _model("baseline_resnet8.lidc_nodule")
    x = _images(regression)
    at_canonical = regression.explain(x).measurements["diameter_mm"].value
    at_double = regression.explain(x, spacing=(1.4, 1.4)).measurements["diameter_mm"].value  # 2x: plausible
    torch.testing.assert_close(at_double, 2 * at_canonical)


# -- concept interventions --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cbm() -> mlmi_zoo.InterpretableModel[Any]:
    return _model(CBM)


@pytest.mark.parametrize("name, concept, value, match", [
    (CBM, "diameter_mm", math.nan, r"concept 'diameter_mm' takes a finite number in 'mm', got nan"),
    (CBM, "diameter_mm", math.inf, r"concept 'diameter_mm' takes a finite number in 'mm', got inf"),
    (CBM, "diameter_mm", "inf mm", r"concept 'diameter_mm' takes a finite number in 'mm', got 'inf mm'"),
    (CBM, "diameter_mm", None, r"concept 'diameter_mm' takes a number in 'mm' or a length such as '14 mm', got None"),
    (CBM_BINARY, "calcification", None,
     r"binary concept 'calcification' takes 0, 1, True, False or a probability, got None"),
    (CBM, "sphericity", None, r"concept 'sphericity' takes a level name \[.*\] or an index 0..4, got None"),
    (CBM_BINARY, "calcification", math.nan, r"binary concept 'calcification' takes a value in \[0, 1\], got nan"),
], ids=["nan", "inf", "inf-text", "none", "none-binary", "none-level", "nan-binary"])
def test_a_missing_or_infinite_intervention_is_refused(name, concept, value, match) -> None:
    model = _model(name)
    with pytest.raises(ConceptValueError, match=match):
        model.intervene(_images(model), {concept: value})


@pytest.mark.parametrize("name, concept, value, match", [
    (CBM_BINARY, "calcification", 1.5, r"binary concept 'calcification' takes a value in \[0, 1\], got 1.5"),
    (CBM_BINARY, "calcification", -0.1, r"binary concept 'calcification' takes a value in \[0, 1\], got -0.1"),
    (CBM, "sphericity", 7, r"concept 'sphericity' takes a level name .* or an index 0..4, got 7"),
    (CBM, "sphericity", 2.5, r"concept 'sphericity' takes a level name .* or an index 0..4, got 2.5"),
    (CBM, "sphericity", "6 very round", r"concept 'sphericity' has levels \[.*\], got '6 very round'"),
    (CBM, "diameter_mm", -5.0, r"concept 'diameter_mm' is a length, area or volume: it takes a value >= 0, got -5.0"),
    (CBM, "diameter_mm", True, r"concept 'diameter_mm' takes a number in 'mm' or a length such as '14 mm', got True"),
], ids=["binary-above", "binary-below", "level-index", "level-fraction", "level-name", "negative-length", "bool"])
def test_a_value_outside_the_concepts_range_is_refused(name, concept, value, match) -> None:
    model = _model(name)
    with pytest.raises(ConceptValueError, match=match):
        model.intervene(_images(model), {concept: value})


@pytest.mark.parametrize("value, match", [
    ("big", r"concept 'diameter_mm' is in 'mm'; cannot express 'big' in it \(give e.g. '14 mm'\)"),
    ("12", r"concept 'diameter_mm' is in 'mm'; cannot express '12' in it"),
    ("12 s", r"concept 'diameter_mm' is in 'mm'; cannot express '12 s' in it")])
def test_a_string_that_is_not_a_length_is_refused_for_a_length_concept(cbm, value, match) -> None:
    with pytest.raises(ConceptValueError, match=match):
        cbm.intervene(_images(cbm), {"diameter_mm": value})


def test_a_string_is_refused_for_a_binary_concept() -> None:
    model = _model(CBM_BINARY)
    with pytest.raises(ConceptValueError, match=r"binary concept 'calcification' takes 0, 1, True, False or a "
                                                r"probability, got 'yes'"):
        model.intervene(_images(model), {"calcification": "yes"})


def test_an_unknown_concept_is_refused_with_the_known_ones(cbm) -> None:
    with pytest.raises(ConceptValueError, match=r"unknown concept 'size'; this model's concepts are \['spiculation', "
                                                r"'lobulation', 'sphericity'"):
        cbm.intervene(_images(cbm), {"size": 1})


@pytest.mark.parametrize("value, match", [
    (torch.tensor([10.0, 12.0, 14.0]), r"concept 'diameter_mm' got 3 values \(shape \(3,\)\) for a batch of 2"),
    (torch.ones(2, 2), r"concept 'diameter_mm' got 4 values \(shape \(2, 2\)\) for a batch of 2"),
    (torch.tensor([10.0, math.nan]), r"concept 'diameter_mm' takes a finite number in 'mm', got nan \(case 1\)"),
    (np.array([10.0, 12.0, 14.0]), r"concept 'diameter_mm' got 3 values \(shape \(3,\)\) for a batch of 2")],
    ids=["3-for-2", "matrix", "nan-in-case-1", "numpy-3-for-2"])
def test_per_case_values_must_fit_the_batch(cbm, value, match) -> None:
    with pytest.raises(ConceptValueError, match=match):
        cbm.intervene(_images(cbm), {"diameter_mm": value})


def test_a_valid_intervention_is_what_the_explanation_reports(cbm) -> None:
    x = _images(cbm)
    given = cbm.intervene(x, {"diameter_mm": "1.4 cm", "sphericity": "5 round"})
    torch.testing.assert_close(given.measurements["diameter_mm"].value, torch.tensor([14.0, 14.0]),
                               rtol=1e-5, atol=1e-4)
    assert given.concepts["sphericity"].argmax(-1).tolist() == [4, 4]
    binary = _model(CBM_BINARY)
    given = binary.intervene(_images(binary), {"calcification": torch.tensor([0.0, 1.0])})
    torch.testing.assert_close(given.concepts["calcification"], torch.tensor([0.0, 1.0]))


# -- MIL --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[BAGS, "additive_mil_features.tilebag"])
def bags(request) -> mlmi_zoo.InterpretableModel[Any]:
    return _model(request.param)


def test_a_bag_whose_mask_is_all_false_is_refused_by_index(bags) -> None:
    feats, mask = _bag()
    mask[1] = False
    with pytest.raises(InputSpecError, match=r"bag\(s\) \[1\] have no valid instance \(all-False mask\)"):
        bags(feats, mask)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_in_a_masked_out_instance_is_never_looked_at(bags, bad) -> None:
    feats, mask = _bag()
    clean = bags.explain(feats, mask)
    feats[1, 4] = bad  # instance 4 of bag 1 is padding
    hostile = bags.explain(feats, mask)
    torch.testing.assert_close(hostile.logits, clean.logits, rtol=0, atol=0)
    torch.testing.assert_close(hostile.attention, clean.attention, rtol=0, atol=0)
    for name, m in clean.measurements.items():
        torch.testing.assert_close(hostile.measurements[name].value, m.value, rtol=0, atol=0)


def test_nan_in_a_valid_instance_is_refused_naming_bag_and_instance(bags) -> None:
    feats, mask = _bag()
    feats[1, 2, 7] = math.nan
    with pytest.raises(InputSpecError, match=r"feats: bag 1, instance 2 holds NaN or Inf but is a valid instance "
                                             r"\(mask True\); clean it or set mask\[1, 2\] = False"):
        bags(feats, mask)


@pytest.mark.parametrize("mask, match", [
    (torch.ones(2, 4, dtype=torch.bool), r"expected a mask of shape \(B, N\) = \(2, 5\), got \(2, 4\)"),
    (torch.ones(2, 5, 1, dtype=torch.bool), r"expected a mask of shape \(B, N\) = \(2, 5\), got \(2, 5, 1\)"),
    (torch.ones(2, 5), r"expected a bool mask \(B, N\), got dtype torch.float32; use mask.bool\(\) on 0/1 masks"),
    (torch.full((2, 5), 2), r"an integer mask holds 0 and 1 only; got values \[2\]"),
    ([[1] * 5] * 2, r"mask must be a torch.Tensor \(B, N\) of bool, got list")],
    ids=["short", "extra-axis", "float", "int-2", "list"])
def test_a_mask_of_the_wrong_shape_or_dtype_is_refused(bags, mask, match) -> None:
    with pytest.raises(InputSpecError, match=match):
        bags(_bag()[0], mask)


def test_an_integer_0_1_mask_is_read_as_bool(bags) -> None:
    feats, mask = _bag()
    torch.testing.assert_close(bags(feats, mask.long()), bags(feats, mask), rtol=0, atol=0)


def test_features_of_the_wrong_width_are_refused(bags) -> None:
    with pytest.raises(InputSpecError, match=r"expected 512 features per instance, got 100 \(shape \(2, 5, 100\)\)"):
        bags(torch.randn(2, 5, 100))


def test_a_bag_without_instances_is_refused(bags) -> None:
    with pytest.raises(InputSpecError, match=r"expected bags with at least one instance, got N=0"):
        bags(torch.randn(2, 0, bags.config.in_features))


def test_a_bag_of_one_instance_gives_it_all_the_attention(bags) -> None:
    one = bags.explain(torch.randn(1, 1, bags.config.in_features))
    assert torch.equal(one.attention, torch.ones(1, 1))
    if one.contributions is not None:  # additive MIL: the one instance's contribution is the whole logit
        torch.testing.assert_close(one.contributions.sum(1) + one.bias, one.logits)
    area = one.measurements["tumour_area_mm2"].value
    assert bool(torch.isfinite(area).all()) and bool((area >= 0).all())


@pytest.mark.parametrize("coords, match", [
    (torch.zeros(2, 5), r"expected coords of shape \(B, N, 2\|3\) with \(B, N\) = \(2, 5\), got \(2, 5\)"),
    (torch.zeros(2, 5, 4), r"expected coords of shape \(B, N, 2\|3\) with \(B, N\) = \(2, 5\), got \(2, 5, 4\)"),
    (torch.zeros(2, 4, 2), r"expected coords of shape \(B, N, 2\|3\) with \(B, N\) = \(2, 5\), got \(2, 4, 2\)"),
    ([[0, 0]] * 5, r"coords must be a torch.Tensor \(B, N, 2\|3\), got list")],
    ids=["no-axis", "4-values", "short", "list"])
def test_coords_of_the_wrong_shape_are_refused(bags, coords, match) -> None:
    with pytest.raises(InputSpecError, match=match):
        bags.explain(*_bag(), coords=coords)
