"""The lesion-count physical head: sizes measured as the ground truth of a mask is defined."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mlmi_zoo
from mlmi_zoo.architectures.blocks.backbones import latent_to_input
from mlmi_zoo.architectures.blocks.heads import LesionCountHead
from mlmi_zoo.specs import QuantitySpec
from mlmi_zoo.training.datasets.nodule_sample import equivalent_diameter_mm
from mlmi_zoo.architectures.blocks.stages import training_for

DIAMETER = QuantitySpec("diameter_mm", "mm", 0.0, 100.0)
AREA = QuantitySpec("area_mm2", "mm**2", 0.0, 1e4)
VOLUME = QuantitySpec("volume_ml", "mL", 0.0, 100.0)


def _disc(shape: tuple[int, ...], centre: tuple[float, ...], radius: float) -> torch.Tensor:
    grids = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij")
    return (sum((g - c) ** 2 for g, c in zip(grids, centre)) <= radius ** 2)[None, None]  # (1, 1, *shape)


def _measure(head: LesionCountHead, fractions: torch.Tensor, spacing: torch.Tensor) -> dict[str, float]:
    standardised = (head.pixel_values(head.count(fractions)) - head.loc) / head.scale
    return {k: float(m.value[0]) for k, m in head.measure(standardised, spacing).items()}


@pytest.mark.parametrize("shape", [(40, 36), (20, 18, 22)])
def test_exact_fractions_reproduce_the_masks_own_measurements(shape) -> None:
    dims = len(shape)
    quantities = (DIAMETER, AREA if dims == 2 else VOLUME)
    head = LesionCountHead(8, quantities, dims, stride=8, tile=4)
    mask = _disc(shape, tuple(n / 2 - 1.3 for n in shape), 6.2)
    tiles = tuple(math.ceil(n / 8) * 2 for n in shape)  # the latent grid covers the padded image
    fractions = head.mask_fractions(mask, tiles)
    assert float(head.count(fractions)) == pytest.approx(float(mask.sum()), rel=1e-6)
    spacing = (0.6, 0.8) if dims == 2 else (2.0, 0.7, 0.7)
    diameter, size = equivalent_diameter_mm(mask[0, 0].numpy(), spacing)
    got = _measure(head, fractions, torch.tensor([spacing]))
    assert got["diameter_mm"] == pytest.approx(diameter, rel=1e-5)
    if dims == 2:
        assert got["area_mm2"] == pytest.approx(size, rel=1e-5)
    else:
        assert got["volume_ml"] == pytest.approx(size / 1000.0, rel=1e-5)


def test_one_object_at_two_spacings_gives_one_size_in_mm() -> None:
    """A disc of 8 mm drawn at 0.5 and at 1.0 mm: twice the pixels across, one diameter in mm."""
    head = LesionCountHead(8, (DIAMETER,), 2, stride=8, tile=4)
    fine, coarse = _disc((64, 64), (31.5, 31.5), 8.0), _disc((32, 32), (15.5, 15.5), 4.0)
    d_fine = _measure(head, head.mask_fractions(fine, (16, 16)), torch.tensor([[0.5, 0.5]]))["diameter_mm"]
    d_coarse = _measure(head, head.mask_fractions(coarse, (8, 8)), torch.tensor([[1.0, 1.0]]))["diameter_mm"]
    truth_fine = equivalent_diameter_mm(fine[0, 0].numpy(), (0.5, 0.5))[0]
    truth_coarse = equivalent_diameter_mm(coarse[0, 0].numpy(), (1.0, 1.0))[0]
    assert d_fine == pytest.approx(truth_fine, rel=1e-5) and d_coarse == pytest.approx(truth_coarse, rel=1e-5)
    assert abs(d_fine - d_coarse) < 0.5


def test_fraction_map_covers_the_image_in_tiles_and_reads_context_at_tile_centres() -> None:
    head = LesionCountHead(3, (DIAMETER,), 2, stride=8, tile=2, image_channels=1, offset=0.0)
    assert head.context_offset == pytest.approx(-0.25)  # cell 0 at pixel 0; tile 0's centre is pixel 0.5
    with torch.no_grad():
        fractions = head.fraction_map(torch.rand(2, 1, 15, 23), torch.rand(2, 3, 2, 3))
    assert fractions.shape == (2, 1, 8, 12) and bool(((fractions > 0) & (fractions < 1)).all())
    pixels = head.to_input(fractions, (15, 23))  # each tile's value on its own pixels, cropped to the image
    assert pixels.shape == (2, 1, 15, 23)
    torch.testing.assert_close(pixels[:, 0, 5, 7], fractions[:, 0, 2, 3])  # pixel (5, 7) lies in tile (2, 3)
    # a context that is constant per latent cell reaches each tile from the nearest cell centres only
    feats = torch.zeros(1, 3, 2, 3)
    feats[0, 0, 1, 2] = 1.0  # cell (1, 2), centred on pixel (8, 16) = tile coordinate (3.75, 7.75)
    context = latent_to_input(feats, (8, 12), 4, head.context_offset)
    assert float(context[0, 0, 7, 11]) == 1.0 and float(context[0, 0, 0, 0]) == 0.0
    assert 0.0 < float(context[0, 0, 3, 7]) < 1.0


def test_refuses_what_it_cannot_count() -> None:
    with pytest.raises(ValueError, match="regress it instead"):
        LesionCountHead(8, (QuantitySpec("mean_hu", "HU", -1024, 3071),), 2, stride=8)
    with pytest.raises(ValueError, match="regress it instead"):
        LesionCountHead(8, (AREA,), 3, stride=8)  # the area of a 3D lesion is not its count
    for tile in (3, 16):
        with pytest.raises(ValueError, match="power of 2 that divides the feature stride"):
            LesionCountHead(8, (DIAMETER,), 2, stride=8, tile=tile)


def test_map_loss_is_smallest_at_the_masks_own_fractions() -> None:
    head = LesionCountHead(8, (DIAMETER,), 2, stride=8, tile=4)
    mask = _disc((32, 32), (15.0, 17.0), 7.0)
    exact = head.mask_fractions(mask, (8, 8))
    best = float(head.map_loss(exact, mask))
    for shift in (0.05, -0.05):
        assert float(head.map_loss((exact + shift).clamp(0, 1), mask)) > best


def test_protopnet_with_a_count_head_explains_trains_and_round_trips(tmp_path) -> None:
    model = mlmi_zoo.create_model("protopnet_resnet8", img_size=(32, 32), prototypes_per_class=2, prototype_dim=8,
                                  quantities=(DIAMETER,), count_head={"tile": 4})
    x = torch.rand(3, 1, 32, 32)
    mask = torch.zeros(3, 1, 32, 32, dtype=torch.bool)
    mask[:, :, 10:20, 12:22] = True
    batch = {"image": x, "label": torch.tensor([0, 1, 1]), "mask": mask, "spacing": torch.full((3, 2), 0.7),
             "measurements": {"diameter_mm": torch.full((3,), equivalent_diameter_mm(mask[0, 0].numpy(), (0.7, 0.7))[0])}}
    out = training_for(model).loss(model, batch, "joint")
    assert {"physical", "measure_map"} <= set(out.logs)
    out.loss.backward()
    assert model.physical.fraction[0].weight.grad.abs().sum() > 0
    model.eval()
    exp = model.explain(x, spacing=(0.7, 0.7))
    assert exp.measurement_map.shape == (3, 1, 32, 32)
    counted = exp.measurement_map.flatten(1).sum(1) * 0.7 * 0.7  # mm^2 the head counted
    torch.testing.assert_close(exp.measurements["diameter_mm"].value, 2 * (counted / np.pi).sqrt(), rtol=1e-5, atol=1e-4)
    assert "What the measurement counted" in [title for title, _ in exp.html_sections(0)]
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    assert again.config.count_head == model.config.count_head and again.config.count_head is not None
    torch.testing.assert_close(again.explain(x, spacing=(0.7, 0.7)).measurements["diameter_mm"].value,
                               exp.measurements["diameter_mm"].value)


def test_a_resampling_head_counts_one_object_at_two_spacings_on_one_grid() -> None:
    """A 16 mm disc in 64-px images at 0.5 and at 1.0 mm is a 10.7-px-radius disc on the 0.75 mm grid."""
    head = LesionCountHead(8, (DIAMETER,), 2, stride=8, tile=4, canonical_spacing=(0.75, 0.75))
    sizes = []
    for spacing, radius in ((0.5, 16.0), (1.0, 8.0)):
        mask = _disc((64, 64), (31.5, 31.5), radius).float()
        s = torch.tensor([[spacing, spacing]])
        on_grid = head.to_canonical(mask, s)
        assert float(on_grid.sum()) == pytest.approx(math.pi * (8.0 / 0.75) ** 2, rel=0.06)
        fractions = head.mask_fractions(on_grid, (16, 16))
        sizes.append(_measure(head, fractions, s)["diameter_mm"])  # converted with the canonical spacing
    assert sizes[0] == pytest.approx(16.0, abs=0.4) and sizes[1] == pytest.approx(16.0, abs=0.4)
    assert abs(sizes[0] - sizes[1]) < 0.3
    torch.testing.assert_close(head.pixel_spacing(torch.tensor([[0.5, 0.5]])), torch.tensor([[0.75, 0.75]]))
    same = torch.rand(1, 1, 64, 64)
    assert head.to_canonical(same, torch.tensor([[0.75, 0.75]])) is same  # already canonical: untouched
    back = head.from_canonical(head.to_canonical(mask, torch.tensor([[1.0, 1.0]])), torch.tensor([[1.0, 1.0]]))
    assert float((back[..., 24:40, 24:40] - mask[..., 24:40, 24:40]).abs().max()) < 0.5  # the lesion returns in place


def test_protopnet_count_head_resampling_needs_a_canonical_spacing_and_uses_it() -> None:
    with pytest.raises(ValueError, match="count_head.resample counts on the canonical grid"):
        mlmi_zoo.create_model("protopnet_resnet8", img_size=(32, 32), quantities=(DIAMETER,), count_head={"resample": True})
    model = mlmi_zoo.create_model("protopnet_resnet8", img_size=(32, 32), prototypes_per_class=2, prototype_dim=8,
                                  spacing=(0.75, 0.75), quantities=(DIAMETER,), count_head={"resample": True}).eval()
    x = torch.rand(2, 1, 32, 32)
    spacing = torch.tensor([[0.5, 0.5], [1.0, 1.0]])
    with torch.no_grad():
        parts = model.forward_parts(x, spacing)
        exp = model.explain(x, spacing=spacing)
    counted = parts.lesion_fraction.flatten(1).sum(1) * 16 * 0.75 ** 2  # mm^2 on the canonical grid
    torch.testing.assert_close(exp.measurements["diameter_mm"].value, 2 * (counted / math.pi).sqrt(), rtol=1e-5, atol=1e-4)
    assert exp.measurement_map.shape == (2, 1, 32, 32)
    torch.testing.assert_close(exp.logits, model(x))  # the decision does not depend on the spacing


def test_a_detached_count_head_does_not_train_the_backbone() -> None:
    x = torch.rand(2, 1, 32, 32)
    for detach in (False, True):
        model = mlmi_zoo.create_model("protopnet_resnet8", img_size=(32, 32), prototypes_per_class=2, prototype_dim=8,
                                      quantities=(DIAMETER,), count_head={"detach": detach})
        model.forward_parts(x).quantities.sum().backward()
        backbone_grad = sum(float(p.grad.abs().sum()) for p in model.backbone.parameters() if p.grad is not None)
        assert (backbone_grad == 0.0) == detach
        assert model.physical.fraction[0].weight.grad.abs().sum() > 0


def test_a_canonical_context_reads_the_backbone_on_the_resampled_image() -> None:
    """With count_head.context='canonical' the count head's features are the backbone's of the image
    resampled to the canonical grid: the map equals fraction_map on those features, unresampled."""
    with pytest.raises(ValueError, match="count_head.resample=true"):
        mlmi_zoo.create_model("protopnet_resnet8", img_size=(32, 32), spacing=(0.75, 0.75), quantities=(DIAMETER,),
                              count_head={"context": "canonical"})
    with pytest.raises(ValueError, match="count_head.context|expected one of"):
        mlmi_zoo.create_model("protopnet_resnet8", img_size=(32, 32), spacing=(0.75, 0.75), quantities=(DIAMETER,),
                              count_head={"resample": True, "context": "both"})
    kwargs = dict(img_size=(32, 32), prototypes_per_class=2, prototype_dim=8, spacing=(0.75, 0.75),
                  quantities=(DIAMETER,))
    model = mlmi_zoo.create_model("protopnet_resnet8", count_head={"resample": True, "context": "canonical"},
                                  **kwargs).eval()
    kwargs["count_head"] = {"resample": True}
    given = mlmi_zoo.create_model("protopnet_resnet8", **kwargs).eval()
    given.load_state_dict(model.state_dict())  # same parameters: the option adds none
    x, spacing = torch.rand(2, 1, 32, 32), torch.tensor([[0.5, 0.5], [1.0, 1.0]])
    with torch.no_grad():
        parts = model.forward_parts(x, spacing)
        feats = model.backbone(model.physical.to_canonical(x, spacing))
        expected = model.physical.fraction_map(x, feats, spacing, canonical_feats=True)
        torch.testing.assert_close(parts.lesion_fraction, expected)
        assert not torch.allclose(parts.lesion_fraction, given.forward_parts(x, spacing).lesion_fraction)
        torch.testing.assert_close(parts.logits, given.forward_parts(x, spacing).logits)  # the decision is the same
        # at the canonical spacing the two contexts coincide
        canonical = torch.tensor([[0.75, 0.75]] * 2)
        torch.testing.assert_close(model.forward_parts(x, canonical).lesion_fraction,
                                   given.forward_parts(x, canonical).lesion_fraction)
    model.train()
    model.forward_parts(x, spacing).quantities.sum().backward()  # the second pass trains the backbone too
    assert sum(float(p.grad.abs().sum()) for p in model.backbone.parameters() if p.grad is not None) > 0


def test_an_own_context_backbone_keeps_the_measurement_out_of_the_prototypes_backbone() -> None:
    with pytest.raises(ValueError, match="count_head.detach"):
        mlmi_zoo.create_model("protopnet_resnet8", img_size=(32, 32), spacing=(0.75, 0.75), quantities=(DIAMETER,),
                              count_head={"resample": True, "context": "own", "detach": True})
    model = mlmi_zoo.create_model("protopnet_resnet8", img_size=(32, 32), prototypes_per_class=2, prototype_dim=8,
                                  spacing=(0.75, 0.75), quantities=(DIAMETER,), count_head={"resample": True, "context": "own"})
    own = model.physical.context_backbone
    assert own is not None and own is not model.backbone
    assert any(k.startswith("physical.context_backbone.") for k in model.state_dict())
    x, spacing = torch.rand(2, 1, 32, 32), torch.tensor([[0.5, 0.5], [1.0, 1.0]])
    with torch.no_grad():
        parts = model.eval().forward_parts(x, spacing)
        expected = model.physical.fraction_map(x, own(model.physical.to_canonical(x, spacing)), spacing, canonical_feats=True)
        torch.testing.assert_close(parts.lesion_fraction, expected)
    model.train()
    parts = model.forward_parts(x, spacing)
    parts.quantities.sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())  # the measurement trains only its own backbone
    assert sum(float(p.grad.abs().sum()) for p in own.parameters() if p.grad is not None) > 0
    # the warm-up stage trains the head, own backbone included
    from mlmi_zoo.architectures.blocks.stages import training_for
    warm = {id(p) for p in training_for(model).trainable_parameters(model, "warmup")}
    assert all(id(p) in warm for p in own.parameters())
