"""Digital phantoms: determinism, exact ground truth, spacing invariance, bag padding, LIDC readings."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from mlmi_zoo.training.datasets.collate import collate_bags
from mlmi_zoo.training.datasets.nodule_rule import nodule_malignancy_rule
from mlmi_zoo.training.datasets.phantoms import NodulePhantom
from mlmi_zoo.training.datasets.tilebag import TileBagPhantom


def _equal(a, b) -> bool:
    """Bit-identical nested samples (NaN == NaN)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
            torch.nan_to_num(a, nan=-12345.0) if a.is_floating_point() else a,
            torch.nan_to_num(b, nan=-12345.0) if b.is_floating_point() else b)
    return a == b


# ------------------------------------------------------------------------------------------------
# NodulePhantom
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dims,size", [(2, 32), (3, 32)])
def test_case_depends_only_on_seed_and_index(dims, size):
    short = NodulePhantom(5, spatial_dims=dims, size=size, seed=3, p_nodule=0.8, label_noise=0.1)
    long = NodulePhantom(500, spatial_dims=dims, size=size, seed=3, p_nodule=0.8, label_noise=0.1)
    for i in range(5):
        assert _equal(short[i], long[i])
    other_seed = NodulePhantom(5, spatial_dims=dims, size=size, seed=4)
    assert not torch.equal(short[0]["image"], other_seed[0]["image"])


def test_dataloader_workers_give_identical_batches():
    ds = NodulePhantom(8, size=32, seed=1)
    one = list(DataLoader(ds, batch_size=4, num_workers=0))
    two = list(DataLoader(ds, batch_size=4, num_workers=2))
    assert all(_equal(a, b) for a, b in zip(one, two))
    assert one[0]["image"].shape == (4, 1, 32, 32) and one[0]["image"].dtype == torch.float32
    assert one[0]["concepts"]["texture"].shape == (4,)


def test_sample_layout_and_units():
    s = NodulePhantom(1, size=48)[0]
    assert list(s) == ["image", "mask", "spacing", "label", "concepts", "measurements", "index"]
    assert s["mask"].dtype == torch.bool and s["mask"].shape == s["image"].shape == (1, 48, 48)
    assert s["label"].dtype == torch.int64 and s["label"].ndim == 0
    assert 0.5 <= float(s["spacing"][0]) <= 1.0 and s["spacing"][0] == s["spacing"][1]
    img = s["image"][0]
    lung = img[~s["mask"][0]]
    assert -1024 <= float(img.min()) and float(lung.median()) < -600  # lung parenchyma in HU


@pytest.mark.parametrize("dims,size", [(2, 64), (3, 32)])
def test_measurements_are_those_of_the_mask_and_image(dims, size):
    ds = NodulePhantom(6, spatial_dims=dims, size=size, seed=2)
    for i in range(len(ds)):
        s = ds[i]
        mask = s["mask"][0].numpy()
        sp = s["spacing"].double().numpy()
        count = mask.sum()
        assert count > 0
        size_mm = count * np.prod(sp)
        if dims == 2:
            assert float(s["measurements"]["area_mm2"]) == pytest.approx(size_mm, rel=1e-5)
            d = 2 * math.sqrt(size_mm / math.pi)
        else:
            assert float(s["measurements"]["volume_ml"]) == pytest.approx(size_mm / 1000.0, rel=1e-5)
            d = (6 * size_mm / math.pi) ** (1 / 3)
        assert float(s["measurements"]["diameter_mm"]) == pytest.approx(d, rel=1e-5)
        inside = s["image"][0].double().numpy()[mask]
        assert float(s["measurements"]["mean_hu"]) == pytest.approx(inside.mean(), abs=1e-3)


def test_concepts_are_visible_in_the_image():
    ds = NodulePhantom(300, size=64, seed=5)
    calc_max, plain_max, ggo, solid = [], [], [], []
    for i in range(len(ds)):
        s = ds[i]
        c = {k: float(v) for k, v in s["concepts"].items()}
        inside = s["image"][s["mask"]]
        (calc_max if c["calcification"] else plain_max).append(float(inside.max()))
        if not c["calcification"] and c["texture"] == 2:
            ggo.append(float(s["measurements"]["mean_hu"]))
        if not c["calcification"] and c["texture"] == 0:
            solid.append(float(s["measurements"]["mean_hu"]))
    assert min(calc_max) >= 200.0  # a calcified core is >= +200 HU
    assert np.median(plain_max) < 200.0
    assert max(ggo) < -300.0 < min(solid)


def test_label_is_the_documented_rule_plus_noise():
    clean = NodulePhantom(250, seed=7, p_nodule=0.9)  # default 64 x 64 at 0.5-1.0 mm
    noisy = NodulePhantom(250, seed=7, p_nodule=0.9, label_noise=0.2)
    batch = default_collate([clean[i] for i in range(250)])
    rule = clean.oracle_label(batch["concepts"], batch["measurements"])
    assert torch.equal(rule, batch["label"])  # oracle-concept accuracy is exactly 1 without noise
    assert 0.3 < batch["label"].float().mean() < 0.7  # roughly balanced
    empty = batch["mask"].flatten(1).sum(1) == 0
    assert empty.any() and (batch["label"][empty] == 0).all()
    assert torch.isnan(batch["concepts"]["spiculation"][empty]).all()
    assert (batch["measurements"]["diameter_mm"][empty] == 0).all()
    flipped = torch.stack([noisy[i]["label"] for i in range(250)]) != batch["label"]
    assert 0.12 < flipped.float().mean() < 0.28


def test_rule_by_hand():
    # calcification, spiculation, texture, diameter
    assert nodule_malignancy_rule(0, 0, 0, 16.0) == 1
    assert nodule_malignancy_rule(1, 1, 0, 16.0) == 0  # calcified: benign whatever else
    assert nodule_malignancy_rule(0, 1, 0, 5.0) == 1
    assert nodule_malignancy_rule(0, 0, 1, 8.0) == 1 and nodule_malignancy_rule(0, 0, 1, 7.9) == 0
    assert nodule_malignancy_rule(0, 0, 2, 14.9) == 0
    assert nodule_malignancy_rule(math.nan, math.nan, math.nan, 0.0) == 0


@pytest.mark.parametrize("dims", [2, 3])
def test_render_keeps_the_object_across_spacings(dims):
    size = 64 if dims == 2 else 40
    ds = NodulePhantom(8 if dims == 2 else 3, spatial_dims=dims, size=size, seed=11,
                       spacing_range=(0.5, 1.0), slice_spacing_range=(1.0, 1.0))
    for i in range(len(ds)):
        fine = ds.render(i, (0.5,) * dims if dims == 2 else (1.0, 0.5, 0.5))
        coarse = ds.render(i, (1.0,) * dims)
        d_fine = float(fine["measurements"]["diameter_mm"])
        d_coarse = float(coarse["measurements"]["diameter_mm"])
        assert abs(d_fine - d_coarse) <= 0.5  # half a pixel of the coarser spacing
        assert _equal(fine["concepts"], coarse["concepts"]) and fine["label"] == coarse["label"] == ds[i]["label"]
    with pytest.raises(ValueError, match="spacing"):
        ds.render(0, (0.5,) * (dims + 1))


def test_config_refusals():
    with pytest.raises(ValueError, match="spatial_dims"):
        NodulePhantom(3, spatial_dims=4)
    with pytest.raises(ValueError, match="cannot hold"):
        NodulePhantom(3, size=8, spacing_range=(0.5, 0.5))
    with pytest.raises(IndexError):
        NodulePhantom(3, size=32)[3]


# ------------------------------------------------------------------------------------------------
# TileBagPhantom and collate_bags
# ------------------------------------------------------------------------------------------------
def test_tilebag_ground_truth_is_consistent():
    ds = TileBagPhantom(12, bag_size=(10, 40), tile_size=16, seed=2)
    labels = []
    for b in range(len(ds)):
        s = ds[b]
        n = len(s["coords"])
        assert 10 <= n <= 40 and s["tiles"].shape == (n, 3, 16, 16)
        assert 0.0 <= float(s["tiles"].min()) and float(s["tiles"].max()) <= 1.0
        assert len(torch.unique(s["coords"], dim=0)) == n  # one tile per grid position
        assert bool(s["label"]) == bool(s["instance_labels"].any())
        assert torch.equal(s["instance_labels"].bool(), s["instance_area_mm2"] > 0)
        total = float(s["instance_area_mm2"].double().sum())
        assert float(s["measurements"]["tumour_area_mm2"]) == pytest.approx(total, rel=1e-6, abs=1e-12)
        tile_mm2 = (16 * 0.5e-3) ** 2
        assert float(s["instance_area_mm2"].max()) <= tile_mm2 * (1 + 1e-6)
        labels.append(int(s["label"]))
    assert 0 < sum(labels) < len(labels)
    assert _equal(ds[3], TileBagPhantom(40, bag_size=(10, 40), tile_size=16, seed=2)[3])


def test_tumour_tiles_look_different():
    s = TileBagPhantom(1, bag_size=(150, 150), positive_fraction=1.0, tumour_fraction=(0.3, 0.3), seed=1)[0]
    darkness = 1.0 - s["tiles"].mean((1, 2, 3))  # haematoxylin-dense tiles are darker
    tum = s["instance_area_mm2"] >= s["instance_area_mm2"].max() * 0.99
    normal = s["instance_labels"] == 0
    assert darkness[tum].mean() > darkness[normal].mean() + 0.05


def test_features_only_mode():
    ds = TileBagPhantom(3, bag_size=(300, 300), features_only=True, feature_dim=16, seed=0,
                        positive_fraction=1.0, tumour_fraction=(0.3, 0.3))
    s = ds[0]
    assert "tiles" not in s and s["feats"].shape == (300, 16) and s["feats"].dtype == torch.float32
    proj = s["feats"] @ torch.from_numpy(ds.tumour_direction)
    frac = s["instance_area_mm2"] / s["instance_area_mm2"].max()
    assert np.corrcoef(proj.numpy(), frac.numpy())[0, 1] > 0.2  # the tumour direction carries signal
    assert _equal(s, TileBagPhantom(1, bag_size=(300, 300), features_only=True, feature_dim=16, seed=0,
                                    positive_fraction=1.0, tumour_fraction=(0.3, 0.3))[0])


def test_collate_bags_pads_with_a_mask():
    ds = TileBagPhantom(3, bag_size=(4, 12), tile_size=8, seed=4)
    bags = [ds[i] for i in range(3)]
    sizes = [len(b["coords"]) for b in bags]
    batch = collate_bags(bags)
    n_max = max(sizes)
    assert batch["tiles"].shape == (3, n_max, 3, 8, 8)
    assert batch["mask"].dtype == torch.bool and batch["mask"].sum(1).tolist() == sizes
    for j, b in enumerate(bags):
        assert torch.equal(batch["tiles"][j, : sizes[j]], b["tiles"])
        assert (batch["instance_labels"][j, sizes[j]:] == 0).all()
    assert torch.allclose(batch["instance_area_mm2"].sum(1), batch["measurements"]["tumour_area_mm2"], rtol=1e-5)
    assert batch["label"].shape == (3,)
    with pytest.raises(ValueError, match="empty"):
        collate_bags([])


# ------------------------------------------------------------------------------------------------
# LIDC-grounded nodules (need the annotation database)
# ------------------------------------------------------------------------------------------------
def _lidc_index():
    from mlmi_zoo.training.datasets.lidc_index import load_lidc_index

    try:
        return load_lidc_index()
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.mark.data
def test_lidc_splits_are_by_patient_one_case_per_nodule_and_exclude_indeterminate():
    index = _lidc_index()
    sets, nodules = {}, []
    for split in ("train", "val", "test"):
        ds = NodulePhantom(None, source="lidc", split=split, size=32)
        sets[split] = set(ds._lidc.patient_ids())
        nodules += ds._lidc.nodule_ids()
        assert all(m != 3.0 for m in ds._lidc.malignancy) and len(ds) > 100
        for rows, median in zip(ds._lidc.readings, ds._lidc.malignancy):  # the case's readers are its nodule's
            assert set(index.nodule_id[rows]) == {index.nodule_id[rows[0]]}
            assert median == np.median(index.ratings["malignancy"][rows])
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert len(nodules) == len(set(nodules))  # one case per nodule
    total = NodulePhantom(None, source="lidc", size=32)
    assert len(total) == len(nodules)


@pytest.mark.data
@pytest.mark.parametrize("dims", [2, 3])
def test_no_rating_enters_an_lidc_image(dims):
    """The image and mask are made from the readers' contours alone: other ratings give the same pixels."""
    _lidc_index()
    ds = NodulePhantom(None, source="lidc", split="val", size=32, spatial_dims=dims)
    before = [ds[i] for i in range(6)]
    ratings = ds._lidc.index.ratings
    saved = {k: v.copy() for k, v in ratings.items()}
    try:
        rng = np.random.default_rng(0)
        for k, v in ratings.items():
            if k != "malignancy":  # the case list (median malignancy != 3) stays the same
                v[:] = rng.integers(1, 6, size=v.shape)
        after = [ds[i] for i in range(6)]
    finally:
        for k, v in saved.items():
            ratings[k][:] = v
    for x, y in zip(before, after):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
        assert any(not torch.equal(x["reader_concepts"][k], y["reader_concepts"][k]) for k in x["reader_concepts"])


@pytest.mark.data
def test_lidc_concepts_are_the_readers_median_and_travel_with_each_readers_own():
    index = _lidc_index()
    ds = NodulePhantom(None, source="lidc", split="val", size=32)
    seen = set()
    for i in range(0, 80, 3):
        s = ds[i]
        rows = ds._lidc.readings[i]
        assert s["readers"] == len(rows)
        assert int(s["label"]) == int(np.median(index.ratings["malignancy"][rows]) > 3)
        for name in ("sphericity", "lobulation", "spiculation"):
            own = s["reader_concepts"][name]
            assert own[: len(rows)].tolist() == [float(index.ratings[name][a] - 1) for a in rows]
            assert torch.isnan(own[len(rows):]).all()
            values = sorted(own[: len(rows)].tolist())
            assert float(s["concepts"][name]) == values[(len(values) - 1) // 2]  # the lower median
        assert float(s["concepts"]["spiculated"]) == float(s["concepts"]["spiculation"] >= 2)
        seen.add(len(rows))
    assert {1, 2, 4} <= seen
    assert set(s["concepts"]) == {"sphericity", "lobulation", "spiculation", "spiculated", "lobulated", "round"}


def test_rasterise_polygon_closed_and_open():
    from mlmi_zoo.training.datasets.contour_masks import rasterise_polygon, shoelace_area

    square = np.array([[0, 0], [4, 0], [4, 4], [0, 4]])
    grid = np.arange(-1, 6)
    assert rasterise_polygon(square, grid, grid).sum() == 25  # 5 x 5 lattice points, edges included
    assert rasterise_polygon(square, grid, grid, closed=False).sum() == 9  # strict interior
    triangle = np.array([[0, 0], [6, 0], [0, 6]])
    # Pick: A = I + B/2 - 1 with A = 18, B = 18 lattice points on the edges -> I = 10, I + B = 28
    assert shoelace_area(triangle) == 18.0
    assert rasterise_polygon(triangle, np.arange(8), np.arange(8)).sum() == 28


@pytest.mark.data
def test_lidc_sample_mask_is_the_readers_consensus():
    from mlmi_zoo.training.datasets.contour_masks import _by_slice, _rasterise_slice, shoelace_area

    index = _lidc_index()
    ds = NodulePhantom(None, source="lidc", split="val", size=64)
    checked_single = checked_consensus = 0
    for i in range(0, 120, 2):
        s = ds[i]
        rows = ds._lidc.readings[i]
        ps = float(index.pixel_spacing[rows[0]])
        assert s["patient_id"] == index.patient_id[rows[0]] and s["nodule_id"].startswith(s["patient_id"])
        assert torch.allclose(s["spacing"], torch.tensor([ps, ps], dtype=torch.float32))
        area_px = int(s["mask"].sum())
        assert float(s["measurements"]["area_mm2"]) == pytest.approx(area_px * ps * ps, rel=1e-5)
        readers = [_by_slice(index.contours(int(a))) for a in rows]
        pts_all = np.concatenate([p for r in readers for v in r.values() for _, p in v])
        lo, hi = pts_all.min(0), pts_all.max(0)
        if (hi - lo).max() >= 60:  # the nodule does not fit the 64-pixel crop
            continue
        grid_r, grid_c = np.arange(lo[1], hi[1] + 1), np.arange(lo[0], hi[0] + 1)
        zs = sorted({z for r in readers for z in r})
        votes = {z: sum(_rasterise_slice(r[z], grid_r, grid_c).astype(int) for r in readers if z in r) for z in zs}
        need = -(-len(rows) // 2)
        counts = {z: int((v >= need).sum()) for z, v in votes.items()}
        if max(counts.values()) == 0:
            continue  # readers without a common half: the union, checked by construction only
        assert area_px == max(counts.values())  # the largest consensus slice, wholly inside the crop
        if len(rows) == 1:
            polys = readers[0][max(counts, key=counts.get)]
            if len(polys) == 1 and polys[0][0]:
                shoelace, pts = shoelace_area(polys[0][1]), np.unique(polys[0][1], axis=0)
                # closed polygon = interior + boundary lattice points: A <= I + B <= A + B/2 + 1 (Pick)
                assert shoelace <= area_px <= shoelace + len(pts) / 2 + 1 + 1e-6
                checked_single += 1
        elif len(rows) >= 3:
            union = max(int((v >= 1).sum()) for v in votes.values())
            assert area_px <= union
            checked_consensus += 1
    assert checked_single >= 3 and checked_consensus >= 5


@pytest.mark.data
def test_lidc_readings_of_one_nodule_share_an_id():
    index = _lidc_index()
    from collections import Counter

    sizes = Counter(Counter(index.nodule_id.tolist()).values())
    assert sum(v for k, v in sizes.items() if k <= 4) / sum(sizes.values()) > 0.99  # at most 4 readers
    assert sizes[4] > 500


@pytest.mark.data
def test_an_lidc_case_drawn_without_one_reader_holds_nothing_that_reader_drew():
    from mlmi_zoo.training.datasets.contour_masks import _by_slice

    index = _lidc_index()
    ds = NodulePhantom(None, source="lidc", split="val", size=64)
    checked = 0
    for i in range(len(ds)):
        rows = ds._lidc.readings[i]
        if len(rows) != 2:
            continue
        full, without = ds[i], ds.render_leaving_out(i, 0)
        # same random draws and the case's own concepts and label; only the outline changes
        assert torch.equal(without["concepts"]["spiculation"], full["concepts"]["spiculation"])
        assert int(without["label"]) == int(full["label"]) and without["readers"] == 2
        # with two readers, the outline drawn without reader 0 is reader 1's alone (half of one reader is one)
        only = NodulePhantom(None, source="lidc", split="val", size=64)
        only._lidc.readings[i] = rows[1:]
        assert torch.equal(without["mask"], only[i]["mask"]) and torch.equal(without["image"], only[i]["image"])
        assert _by_slice(index.contours(int(rows[1])))  # reader 1 drew something
        checked += 1
        if checked == 3:
            break
    assert checked == 3
    single = next(i for i in range(len(ds)) if len(ds._lidc.readings[i]) == 1)
    with pytest.raises(ValueError, match="one of several readers"):
        ds.render_leaving_out(single, 0)
    with pytest.raises(ValueError, match="source='lidc'"):
        NodulePhantom(4, size=32).render_leaving_out(0, 0)
