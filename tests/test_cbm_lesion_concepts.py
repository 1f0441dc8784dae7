"""Lesion concepts: binary concepts read at their strongest cell (``pooling="max"``), their maps taught cell by
cell from masks (``map_coef``), areas in optic-disc diameters squared, unlabelled cases left out of the label loss."""
from __future__ import annotations

import math

import pytest
import torch

from mlmi_zoo.architectures.blocks.heads import spacing_exponent, spacing_ruler
from mlmi_zoo.architectures.blocks.stages import training_for
from mlmi_zoo.architectures.cbm.config import CBMConfig, CBMTrainingSettings
from mlmi_zoo.architectures.cbm.training import CBMTraining, _label_ce, cell_map_loss
from mlmi_zoo.registry import create_model
from mlmi_zoo.specs import ConceptSpec

LESIONS = (ConceptSpec("spots", "binary"), ConceptSpec("spots_area_dd2", "continuous", unit="DD^2"))
SPACING_DD = (0.05, 0.05)  # DD per pixel


def make_model(**overrides):
    torch.manual_seed(0)
    kw = dict(concepts=LESIONS, img_size=(32, 32), spacing=SPACING_DD, pooling="max", concept_hidden=4)
    kw.update(overrides)
    return create_model("cbm_resnet8", **kw).eval()


def spots(n: int = 6, seed: int = 0) -> dict:
    """A batch of noise images, half with one bright 3x3 spot; the spot's mask, presence, area in DD^2, labels."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(n, 1, 32, 32, generator=g) * 0.2
    mask = torch.zeros(n, 1, 32, 32, dtype=torch.bool)
    for i in range(0, n, 2):
        y, x = (int(v) for v in torch.randint(2, 28, (2,), generator=g))
        mask[i, 0, y:y + 3, x:x + 3] = True
    image[mask] += 0.7
    present = mask.flatten(1).any(1).float()
    area = mask.flatten(1).sum(1).float() * SPACING_DD[0] * SPACING_DD[1]
    labels = present.long()
    labels[1] = -1  # one case with no grade: it trains the concepts only
    return {"image": image, "label": labels, "spacing": torch.tensor(SPACING_DD).expand(n, 2),
            "concepts": {"spots": present}, "measurements": {"spots_area_dd2": area},
            "concept_masks": {"spots": mask}, "concept_masks_known": {"spots": torch.ones(n, dtype=torch.bool)},
            "index": torch.arange(n)}


def test_dd_powers_scale_with_a_spacing_in_dd_and_never_mix_with_mm():
    assert [spacing_exponent(u) for u in ("DD", "DD^2", "mm^2", "mL", "HU")] == [1, 2, 2, 3, 0]
    assert spacing_ruler("DD^2") == "DD" and spacing_ruler("mm") == "mm" and spacing_ruler("HU") == "mm"
    with pytest.raises(ValueError, match="neither a power of length"):
        spacing_exponent("mm*DD")
    with pytest.raises(ValueError, match="one ruler, mm or DD"):
        CBMConfig(concepts=(ConceptSpec("a", "continuous", unit="mm"), ConceptSpec("b", "continuous", unit="DD")))


def test_max_pooled_binary_logits_are_the_maximum_of_their_maps_and_areas_the_mean():
    model = make_model()
    assert model.input_spec.spacing_unit == "DD"  # spacings are read, checked and reported in DD
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        maps = model.concept_maps_latent(x)
        raw = model.concept_logits(x)
    assert torch.equal(raw[:, 0], maps[:, 0].flatten(1).amax(-1))
    assert torch.allclose(raw[:, 1], maps[:, 1].flatten(1).mean(-1))
    exp = model.explain(x, spacing=SPACING_DD)
    assert torch.allclose(exp.logits, model(x), atol=1e-6) and exp.decomposition_error() < 1e-5
    # the area is in DD^2 and follows the spacing (a pixel-domain area times the pixel's area)
    twice = model.explain(x, spacing=(0.1, 0.1))
    assert exp.measurements["spots_area_dd2"].unit == "DD^2"
    assert torch.allclose(twice.measurements["spots_area_dd2"].value, 4 * exp.measurements["spots_area_dd2"].value,
                          rtol=1e-4)


def test_max_pooling_is_refused_where_it_has_nothing_to_read_or_cannot_be_averaged():
    with pytest.raises(ValueError, match="these concepts have none"):
        CBMConfig(concepts=(ConceptSpec("area", "continuous", unit="mm^2"),), pooling="max")
    with pytest.raises(ValueError, match="keeps means but not maxima"):
        CBMConfig(concepts=LESIONS, pooling="max", dihedral_views=True, img_size=(32, 32))
    with pytest.raises(ValueError, match="concept_hidden"):
        CBMConfig(concepts=LESIONS, concept_hidden=-1)
    with pytest.raises(ValueError, match="needs model.config.pooling='max'"):
        training_for(make_model(pooling="mean"), {"map_coef": 1.0})
    with pytest.raises(ValueError, match="map_pos_weight"):
        CBMTrainingSettings(map_pos_weight=0.0)


def test_cell_map_loss_reads_the_cells_that_hold_the_finding_on_known_cases_only():
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    mask[0, 0, 0, 0] = True  # one pixel of the top-left cell of a 2x2 grid
    perfect = torch.full((2, 2, 2), -20.0)
    perfect[0, 0, 0] = 20.0
    known = torch.tensor([True, True])
    assert float(cell_map_loss(perfect, mask, known)) < 1e-6
    wrong = -perfect
    assert float(cell_map_loss(wrong, mask, known)) > 10
    # the cells that hold the finding weigh pos_weight times more
    flat = torch.zeros(2, 2, 2)
    assert float(cell_map_loss(flat, mask, known, pos_weight=3.0)) == pytest.approx(
        math.log(2) * (8 + 2) / 8, rel=1e-5)
    # an unknown mask teaches nothing, and no known case gives 0 with a graph
    first_wrong = perfect.clone()
    first_wrong[0] = -perfect[0]
    assert float(cell_map_loss(first_wrong, mask, torch.tensor([False, True]))) < 1e-6
    none = cell_map_loss(flat.requires_grad_(), mask, torch.tensor([False, False]))
    assert float(none.detach()) == 0.0 and none.requires_grad


def test_unlabelled_cases_train_the_concepts_and_stay_out_of_the_label_loss():
    logits = torch.tensor([[2.0, 0.0], [0.0, 5.0], [0.0, 1.0]])
    assert float(_label_ce(logits, torch.tensor([0, -1, 1]))) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits[[0, 2]], torch.tensor([0, 1]))))
    none = _label_ce(logits.requires_grad_(), torch.tensor([-1, -1, -1]))
    assert float(none.detach()) == 0.0 and none.requires_grad


def test_joint_training_with_the_map_loss_moves_the_map_onto_the_spots():
    batch = spots(8)
    model = make_model().train()
    adapter = training_for(model, {"mode": "joint", "map_coef": 1.0, "map_pos_weight": 3.0})
    adapter.prepare(model, [{k: (v[i] if not isinstance(v, dict) else {n: t[i] for n, t in v.items()})
                             for k, v in batch.items()} for i in range(8)])
    out = adapter.loss(model, batch, "joint")
    assert {"concept_maps", "ce", "concepts"} <= set(out.logs)
    without = CBMTraining(CBMTrainingSettings(mode="joint")).loss(make_model().train(), batch, "joint")
    assert "concept_maps" not in without.logs
    optim = torch.optim.Adam(adapter.trainable_parameters(model, "joint"), lr=0.01)
    first = out.logs["concept_maps"]
    for _ in range(40):
        optim.zero_grad()
        out = adapter.loss(model, batch, "joint")
        out.loss.backward()
        optim.step()
    assert out.logs["concept_maps"] < 0.5 * first
    model.eval()
    with torch.no_grad():
        maps = model.concept_maps_latent(model.input_spec.intensity(batch["image"]))[:, 0]  # (B, h, w)
    cells = torch.nn.functional.adaptive_max_pool2d(batch["concept_masks"]["spots"].float(), maps.shape[1:])[:, 0] > 0
    # on every image with a spot, the spot's cells score higher than the others
    for m, c in zip(maps, cells):
        if c.any():
            assert float(m[c].mean()) > float(m[~c].mean())


def test_an_area_read_as_a_sum_of_cell_shares_is_never_negative_and_is_taught_by_the_mask_shares():
    model = make_model(area_maps=(("spots_area_dd2", "spots"),))
    model.codec.loc.fill_(40.0)  # a fitted standardisation: 40 +- 30 pixels
    model.codec.scale.fill_(30.0)
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        maps = model.concept_maps_latent(x)
        raw = model.concept_logits(x)
        shares = model.cell_shares(maps, "spots_area_dd2", (32, 32))
    assert bool(((shares > 0) & (shares < 1)).all())
    # the concept is the standardised pixel area: the sum of the shares times each cell's pixels
    cell_px = 32 * 32 / shares[0].numel()
    area_px = shares.flatten(1).sum(1) * cell_px
    assert torch.allclose(raw[:, 1], (area_px - 40.0) / 30.0, atol=1e-4)
    exp = model.explain(x, spacing=SPACING_DD)
    area = exp.measurements["spots_area_dd2"].value
    assert bool((area > 0).all())
    assert torch.allclose(area, area_px * SPACING_DD[0] * SPACING_DD[1], rtol=1e-4)
    assert exp.decomposition_error() < 1e-5
    # the cell-level loss gains the shares' term against the masks' shares
    batch = spots(8)
    model.train()
    adapter = training_for(model, {"mode": "joint", "map_coef": 1.0, "map_pos_weight": 3.0})
    with_shares = adapter._map_loss(model, model.concept_maps_latent(model.input_spec.intensity(batch["image"])),
                                    batch, None)
    without = training_for(make_model(), {"mode": "joint", "map_coef": 1.0})._map_loss(
        make_model().train(), make_model().concept_maps_latent(batch["image"]), batch, None)
    assert with_shares is not None and without is not None
    assert float(with_shares.detach()) != float(without.detach())
    # training starts every cell at the share that gives the training mean area
    from mlmi_zoo.architectures.cbm.training import start_area_shares

    start_area_shares(model)
    model.concept_head[-1].weight.data.zero_()  # the bias alone: the start
    with torch.no_grad():
        start = model.concept_logits(model.input_spec.intensity(batch["image"]))[:, 1]
    assert torch.allclose(start, torch.zeros_like(start), atol=1e-3)  # the standardised mean
    with pytest.raises(ValueError, match="area of the image plane"):
        CBMConfig(concepts=LESIONS, area_maps=(("spots", "spots"),))
    with pytest.raises(ValueError, match="is not one of the concepts"):
        CBMConfig(concepts=LESIONS, area_maps=(("spots_area_dd2", "dots"),))
