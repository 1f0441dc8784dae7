"""ProtoPNet options against degenerate prototypes: distinct push images, an intensity foreground, a diversity cost."""
from __future__ import annotations

import pytest
import torch

import mlmi_zoo
from mlmi_zoo.architectures.protopnet.config import ProtoPNetTrainingSettings
from mlmi_zoo.architectures.protopnet.push import intensity_foreground, push_prototypes
from mlmi_zoo.architectures.protopnet.training import diversity_cost


def _model(per_class: int = 3):
    return mlmi_zoo.create_model("protopnet_resnet8", img_size=(32, 32), prototypes_per_class=per_class,
                                 prototype_dim=16, feature_stride=4).eval()


def _loader(n: int = 12, batch: int = 5):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(n, 1, 32, 32, generator=g)
    labels = torch.arange(n) % 2
    return [{"image": images[i:i + batch], "label": labels[i:i + batch], "index": torch.arange(i, min(i + batch, n))}
            for i in range(0, n, batch)]


def test_collapsed_prototypes_go_to_distinct_images_only_when_asked() -> None:
    """Prototypes of a class set to one vector all land on one patch; ``distinct`` spreads them over images,
    each onto its nearest patch in an image no nearer prototype took."""
    model = _model()
    collapsed = model.prototype_layer.prototypes.detach()[:1].expand_as(model.prototype_layer.prototypes).clone()
    with torch.no_grad():
        model.prototype_layer.prototypes.copy_(collapsed)
    same = push_prototypes(model, _loader())
    for c in (0, 1):
        assert len({(r["index"], tuple(r["location"])) for r in same if r["class"] == c}) == 1
    with torch.no_grad():
        model.prototype_layer.prototypes.copy_(collapsed)
    spread = push_prototypes(model, _loader(), distinct=True)
    assert len({r["index"] for r in spread}) == len(spread)
    # the nearest of them keeps the patch the plain push found; every one is of its own class
    labels = torch.arange(12) % 2
    assert all(int(labels[r["index"]]) == r["class"] for r in spread)
    assert min(r["distance"] for r in spread) == pytest.approx(min(r["distance"] for r in same))
    # each prototype equals the add-on output at its recorded cell
    for r in spread:
        image = torch.cat([b["image"] for b in _loader()])[r["index"]][None]
        z = model.latent(model.input_spec.intensity(image))[0]
        assert torch.allclose(z[:, r["location"][0], r["location"][1]], model.prototype_layer.prototypes[r["prototype"]].flatten(),
                              atol=1e-6)


def test_distinct_push_falls_back_to_a_duplicate_when_the_class_has_too_few_images() -> None:
    model = _model(per_class=3)
    records = push_prototypes(model, _loader(n=4, batch=4), distinct=True)  # two images per class, three prototypes
    for c in (0, 1):
        assert len({r["index"] for r in records if r["class"] == c}) == 2


def test_intensity_foreground_is_the_bright_part_and_push_stays_on_it() -> None:
    x = torch.zeros(2, 1, 32, 32)
    x[:, :, 8:24, 10:26] = torch.rand(2, 1, 16, 16) * 0.5 + 0.5
    fg = intensity_foreground(x)
    assert fg.shape == (2, 32, 32) and bool(fg[:, 8:24, 10:26].all()) and not bool(fg[:, :8].any())
    model = _model()
    batch = {"image": x.repeat(3, 1, 1, 1), "label": torch.tensor([0, 1] * 3), "index": torch.arange(6)}
    records = push_prototypes(model, [batch], foreground="intensity")
    latent = tuple(records[0]["latent_shape"])
    fraction = model.backbone.cell_fraction(fg[:1, None].float(), latent)[0, 0]
    assert all(fraction[tuple(r["location"])] >= 0.5 for r in records)
    with pytest.raises(ValueError, match="'intensity' reads a foreground"):
        push_prototypes(model, [batch], foreground="fov")


def test_diversity_cost_is_a_hinge_on_pairwise_angle() -> None:
    import math
    p = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0]], requires_grad=True)
    # pairs: (0,1) at an angle of atan(0.01), (0,2) and (1,2) near 90 degrees; hinge at arccos(0.9)
    cost = diversity_cost(p, 0.9)
    assert float(cost.detach()) == pytest.approx((math.acos(0.9) - math.atan(0.01)) / 3, rel=1e-4)
    cost.backward()
    assert p.grad is not None and float(p.grad[2].abs().sum()) == 0.0  # a pair beyond the hinge has no gradient
    # nearly parallel prototypes still get a gradient that pushes them apart (a cosine hinge's vanishes)
    assert float(p.grad[1, 1]) < 0 and abs(float(p.grad[1, 1])) > 0.1
    assert float(diversity_cost(torch.eye(4), 0.5)) == 0.0
    assert float(diversity_cost(torch.ones(1, 3), 0.5)) == 0.0


def test_diversity_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="div_coef"):
        ProtoPNetTrainingSettings(div_coef=-1.0)
    with pytest.raises(ValueError, match="div_cosine"):
        ProtoPNetTrainingSettings(div_cosine=1.0)


def test_near_data_cost_is_each_prototypes_nearest_own_class_image() -> None:
    from mlmi_zoo.architectures.protopnet.training import near_data_cost
    d = torch.tensor([[1.0, 5.0, 2.0], [3.0, 0.5, 4.0]])  # (B=2, P=3)
    labels = torch.tensor([0, 0])
    classes = torch.tensor([0, 0, 1])  # prototype 2's class is absent from the batch
    assert float(near_data_cost(d, labels, classes)) == pytest.approx((1.0 + 0.5) / 2)
    assert float(near_data_cost(d, torch.tensor([2, 2]), classes)) == 0.0
    with pytest.raises(ValueError, match="near_data_coef"):
        ProtoPNetTrainingSettings(near_data_coef=-0.1)


def test_off_border_push_never_takes_a_border_cell() -> None:
    model = _model()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(6, 1, 32, 32, generator=g) * 0.3
    x[:, :, :, :6] = 1.0  # a bright strip at the left edge: the nearest patches of most prototypes
    batch = {"image": x, "label": torch.tensor([0, 1] * 3), "index": torch.arange(6)}
    free = push_prototypes(model, [batch])
    records = push_prototypes(model, [batch], off_border=True)
    latent = records[0]["latent_shape"]
    for r in records:
        assert all(0 < v < n - 1 for v, n in zip(r["location"], latent)), r["location"]
    assert any(not all(0 < v < n - 1 for v, n in zip(r["location"], latent)) for r in free)


def test_a_thin_foreground_needs_a_lower_share() -> None:
    """A one-pixel line fills a quarter of no 4-px window: at the default share no cell qualifies and the
    prototypes are not pushed; with a low share every pushed cell touches the line."""
    model = _model()
    x = torch.zeros(4, 1, 32, 32)
    x[:, :, 16, 4:28] = 1.0
    batch = {"image": x, "label": torch.tensor([0, 1, 0, 1]), "index": torch.arange(4)}
    assert all(r is None for r in push_prototypes(model, [batch], foreground="intensity"))
    records = push_prototypes(model, [batch], foreground="intensity", foreground_share=0.05)
    fraction = model.backbone.cell_fraction(intensity_foreground(x)[:1, None].float(), tuple(records[0]["latent_shape"]))[0, 0]
    assert all(r is not None and fraction[tuple(r["location"])] >= 0.05 for r in records)
    with pytest.raises(ValueError, match="push_foreground_share"):
        ProtoPNetTrainingSettings(push_foreground_share=0.0)


def test_cell_fields_are_the_cells_true_and_effective_receptive_field() -> None:
    """The true field of a cell covers its stride window and every pixel it depends on, shifts with the cell,
    is clipped at the image edge, and the weights' gradients are not touched."""
    from mlmi_zoo.architectures.protopnet.fields import cell_fields

    model = _model()
    image = torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(3))
    centre = cell_fields(model, image, (4, 4))
    corner = cell_fields(model, image, (0, 0))
    (r0, r1), (c0, c1) = centre["theoretical_px"]
    assert r1 - r0 > model.backbone.stride and c1 - c0 > model.backbone.stride  # more than the stride window
    assert corner["theoretical_px"][0][0] == 0 and corner["theoretical_px"][0][1] < r1  # clipped, and elsewhere
    for a in range(2):  # the effective field lies inside the true one
        assert centre["theoretical_px"][a][0] <= centre["effective_px"][a][0] < centre["effective_px"][a][1] \
            <= centre["theoretical_px"][a][1]
    # a pixel outside the true field does not change the cell
    x = model.input_spec.intensity(image[None])
    z = model.latent(x)[0, :, 4, 4]
    x2 = x.clone()
    x2[..., 0, 0] += 1.0 if r0 > 0 else 0.0
    assert torch.allclose(model.latent(x2)[0, :, 4, 4], z) or r0 == 0
    assert all(p.grad is None for p in model.parameters())


def test_prune_duplicates_switches_off_each_later_copy_and_the_sanity_check_counts_it_apart() -> None:
    """Collapsed prototypes pushed onto one patch per class: pruning keeps prototype 0, switches off its copies
    (they then contribute nothing), and the sanity check reads only the enabled ones."""
    from mlmi_zoo.architectures.protopnet.evaluation import prototype_sanity
    from mlmi_zoo.architectures.protopnet.prototypes import duplicate_prototypes
    from mlmi_zoo.architectures.protopnet.training import ProtoPNetTraining

    model = _model()
    with torch.no_grad():
        model.prototype_layer.prototypes.copy_(model.prototype_layer.prototypes[:1].expand_as(
            model.prototype_layer.prototypes))
    training = ProtoPNetTraining(ProtoPNetTrainingSettings(prune_duplicates=True))
    before = prototype_sanity(model, None)
    assert before["cosine_099"] == 5 and before["switched_off"] == 0  # every prototype after the first
    out = training.run_special_stage(model, "push", _loader(), torch.device("cpu"))
    # within a class all three land on one patch (same source); the Sigmoid add-on makes even the two classes'
    # patches point the same way here, so only prototype 0 may stay
    dup = duplicate_prototypes(model)
    assert {1, 2, 4, 5} <= set(out["switched_off_duplicates"]) and 0 not in out["switched_off_duplicates"]
    assert model.enabled.tolist() == [i not in out["switched_off_duplicates"] for i in range(6)]
    assert dup == []  # no enabled prototype duplicates another now
    sanity = prototype_sanity(model, None)
    assert sanity["prototypes"] == 6 - len(out["switched_off_duplicates"])
    assert sanity["switched_off"] == len(out["switched_off_duplicates"]) and sanity["duplicates"] == 0
    x = torch.rand(3, 1, 32, 32)
    exp = model.explain(x)
    assert exp.contributions[:, :, ~model.enabled].abs().max() == 0
    # without the setting, push leaves every prototype on
    fresh = _model()
    assert "switched_off_duplicates" not in ProtoPNetTraining(ProtoPNetTrainingSettings()).run_special_stage(
        fresh, "push", _loader(), torch.device("cpu"))
    assert bool(fresh.enabled.all())


def test_push_cells_combine_the_push_rules() -> None:
    from mlmi_zoo.architectures.protopnet.prototypes import foreground_cells, inner_cells
    from mlmi_zoo.architectures.protopnet.push import push_cells

    model = _model()
    x = torch.zeros(2, 1, 32, 32)
    x[:, :, 4:20, 4:20] = 1.0  # bright square reaching the latent grid's border cells
    latent = tuple(model.latent(x).shape[2:])
    batch = {"image": x, "label": torch.tensor([0, 1])}
    assert push_cells(model, batch, x, latent) is None  # no rule: every cell
    fg = foreground_cells(model, intensity_foreground(x), latent)
    assert torch.equal(push_cells(model, batch, x, latent, foreground="intensity"), fg)
    inner = inner_cells(latent).flatten()
    assert torch.equal(push_cells(model, batch, x, latent, off_border=True), inner[None].expand(2, -1))
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:16, 8:16] = 1.0
    both = push_cells(model, {**batch, "mask": mask}, x, latent, on_lesion=True, foreground="intensity")
    assert bool(both.any()) and not bool((both & ~fg).any())
    with pytest.raises(ValueError, match="needs lesion masks"):
        push_cells(model, batch, x, latent, on_lesion=True)


def test_min_distances_over_allowed_cells_and_every_cell_without_any() -> None:
    from mlmi_zoo.architectures.protopnet.training import min_distances_over

    d = torch.tensor([[[[1.0, 4.0], [3.0, 2.0]]], [[[5.0, 6.0], [7.0, 0.5]]]])  # (B=2, P=1, 2, 2)
    cells = torch.tensor([[False, True, True, False], [False, False, False, False]])
    assert min_distances_over(d, cells).tolist() == [[3.0], [0.5]]  # the second image has no allowed cell


def test_cluster_on_push_cells_measures_the_cluster_cost_where_push_projects() -> None:
    from mlmi_zoo.architectures.blocks.stages import training_for
    from mlmi_zoo.architectures.protopnet.training import cluster_separation_costs, min_distances_over

    model = _model()
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 1, 32, 32, generator=g) * 0.05
    x[:, :, 10:22, 10:22] = 0.6 + 0.4 * torch.rand(4, 1, 12, 12, generator=g)
    batch = {"image": x, "label": torch.tensor([0, 1, 0, 1])}
    settings = {"push_foreground": "intensity", "push_foreground_share": 0.5}
    with torch.no_grad():
        parts = model.forward_parts(model.input_spec.intensity(x))
    cells = push_cells_of(model, x, parts.distance_maps.shape[2:])
    assert bool(cells.any()) and not bool(cells.all())
    want_on = cluster_separation_costs(min_distances_over(parts.distance_maps, cells), batch["label"],
                                       model.prototype_classes)[0]
    want_off = cluster_separation_costs(parts.min_distances, batch["label"], model.prototype_classes)[0]
    assert float(want_on) > float(want_off)  # the nearest cells are not all on the foreground
    on = training_for(model, {**settings, "cluster_on_push_cells": True}).loss(model, batch, "joint")
    off = training_for(model, settings).loss(model, batch, "joint")
    assert on.logs["cluster"] == pytest.approx(float(want_on), rel=1e-5)
    assert off.logs["cluster"] == pytest.approx(float(want_off), rel=1e-5)


def push_cells_of(model, x, latent):
    from mlmi_zoo.architectures.protopnet.push import push_cells

    return push_cells(model, {"image": x}, model.input_spec.intensity(x), tuple(latent), foreground="intensity")
