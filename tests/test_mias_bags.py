"""mini-MIAS as bags of cached breast-tile features (Suckling et al. 1994; MIL as in Ilse et al. 2018).

Runs on the real films in ``$MLMI_ZOO_DATA/mias`` (conftest.py points it at ../shared/data), passed
explicitly as the data root, at 1.6 mm pixels with a small random ResNet-8 encoder and the zoo's cache
in a temporary folder; skipped when the folder is absent.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import mlmi_zoo
from mlmi_zoo.evaluation.evaluate import _baseline_probs
from mlmi_zoo.model_cards.release import RECIPES
from mlmi_zoo.training.data_spec import DataSpec, build_dataset, collate_for, describe
from mlmi_zoo.training.datasets._location import DATA_ENV_VAR
from mlmi_zoo.training.datasets.catalog import source_for
from mlmi_zoo.training.datasets.mias import MIAS, breast_tiles
from mlmi_zoo.training.datasets.mias_bags import CONTROL_NAMES, BagFeatureSettings, MiasBags
from mlmi_zoo.training.recipe import load_recipe
from mlmi_zoo.training.trainer import train

DATA = Path(os.environ[DATA_ENV_VAR])  # exported by conftest.py: ../shared/data unless set
INFO = DATA / "mias" / "Info.txt"
pytestmark = [pytest.mark.data,
              pytest.mark.skipif(not INFO.is_file(), reason=f"the mini-MIAS folder is absent: no {INFO} "
                                                            f"(set ${DATA_ENV_VAR})")]
FAST = {"spacing_mm": 1.6, "tile_mm": 25.6, "encoder": "resnet8", "init": "random", "input_px": 32}
# abnormal with circles (one small, one large), two normal, one abnormal without a centre
IMAGES = ("mdb001", "mdb002", "mdb028", "mdb059", "mdb184")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory):
    """The zoo's cache folder for this module: a temporary one."""
    folder = tmp_path_factory.mktemp("zoo_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLMI_ZOO_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def bags(cache: Path) -> MiasBags:
    return MiasBags(DATA, split="all", images=IMAGES, **FAST)


def test_instance_labels_match_the_radiologist_circles(bags: MiasBags) -> None:
    spacing = FAST["spacing_mm"]
    for record, bag in zip(bags.records, bags.bags):
        labels, coords = bag["instance_labels"], bag["coords"]
        side = FAST["tile_mm"]  # no overlap: the grid step is the tile
        if record.abnormal and not record.has_centre:
            assert torch.isnan(labels).all(), record.name
            continue
        assert torch.isfinite(labels).all() and set(labels.unique().tolist()) <= {0.0, 1.0}
        if not record.abnormal:
            assert labels.sum() == 0, record.name
            continue
        top_left = coords.double() * side  # (N, 2) mm
        for row, col, _ in record.circles_mm():
            holds_centre = ((top_left <= torch.tensor([row, col])) & (torch.tensor([row, col]) < top_left + side)).all(-1)
            assert bool((labels[holds_centre] == 1).all()), f"{record.name}: the tile holding a centre is not positive"
        # a tile farther from every centre than the radius plus one pixel's diagonal cannot touch a disc
        far = torch.ones(len(labels), dtype=torch.bool)
        for row, col, radius in record.circles_mm():
            nearest = torch.maximum(top_left, torch.minimum(torch.tensor([row, col]), top_left + side))
            far &= torch.linalg.vector_norm(nearest - torch.tensor([row, col]), dim=-1) > radius + spacing * math.sqrt(2)
        assert far.any() and bool((labels[far] == 0).all()), record.name
        assert labels.sum() >= 1


def test_lesion_areas_and_radius_of_each_bag(bags: MiasBags) -> None:
    """Each tile's disc area is 0 exactly where its label is 0; the bag's area is their sum and at most the discs'
    own area (plus the rasterisation of one pixel rim); the radius is the largest circle's."""
    spacing = FAST["spacing_mm"]
    seen_positive = False
    for record, bag in zip(bags.records, bags.bags):
        areas, labels, truth = bag["instance_area_mm2"], bag["instance_labels"], bag["measurements"]
        assert areas.shape == labels.shape
        if record.abnormal and not record.has_centre:
            assert torch.isnan(areas).all() and math.isnan(float(truth["lesion_area_mm2"])), record.name
            continue
        assert bool(((areas > 0) == (labels == 1)).all()), record.name
        assert float(truth["lesion_area_mm2"]) == pytest.approx(float(areas.sum()), rel=1e-5)
        circles = record.circles_mm()
        if not circles:
            assert float(truth["lesion_area_mm2"]) == 0 and math.isnan(float(truth["radius_mm"]))
            continue
        seen_positive = True
        assert float(truth["radius_mm"]) == pytest.approx(max(c[2] for c in circles), rel=1e-6)
        discs = sum(math.pi * (r + spacing) ** 2 for _, _, r in circles)
        assert 0 < float(truth["lesion_area_mm2"]) <= discs, record.name
    assert seen_positive


def test_bags_carry_the_image_label_and_the_woman(bags: MiasBags) -> None:
    for record, bag in zip(bags.records, bags.bags):
        assert int(bag["label"]) == int(record.abnormal)
        assert bag["patient_id"] == f"mias-w{(record.number + 1) // 2:03d}"
        assert bag["feats"].dtype == torch.float32 and bag["feats"].shape == (len(bag["coords"]), bags.feature_dim)
        assert torch.isfinite(bag["feats"]).all()
    assert {"mias-w001"} == {bags.bags[0]["patient_id"], bags.bags[1]["patient_id"]}  # mdb001 and mdb002: one woman


def test_one_woman_is_never_in_two_splits(cache: Path) -> None:
    before = sorted(cache.glob("mias_bags/*/*.safetensors"))
    record = describe(DataSpec("mias_bags", {"root": str(DATA), **FAST}))
    women = {split: set(record["splits"][split]["women"]) for split in ("train", "val", "test")}
    assert not women["train"] & women["val"] and not women["train"] & women["test"] and not women["val"] & women["test"]
    assert sum(len(w) for w in women.values()) == 161
    assert sum(record["splits"][s]["size"] for s in women) == 322
    assert sorted(cache.glob("mias_bags/*/*.safetensors")) == before  # describing the splits encodes nothing
    assert source_for(record).name == "mini-MIAS" and source_for(record).license == "research-use-only"


def test_features_are_cached_once_and_reused(cache: Path) -> None:
    first = MiasBags(DATA, split="all", images=IMAGES[:2], **{**FAST, "encoder_seed": 7})
    assert first.encoded == 2
    files = sorted(first.cache_folder.glob("*.safetensors"))
    assert [f.stem for f in files] == list(IMAGES[:2]) and first.cache_folder.is_relative_to(cache)
    stamps = [f.stat().st_mtime_ns for f in files]
    again = MiasBags(DATA, split="all", images=IMAGES[:2], **{**FAST, "encoder_seed": 7})
    assert again.encoded == 0 and [f.stat().st_mtime_ns for f in files] == stamps
    for a, b in zip(first.bags, again.bags):
        assert torch.equal(a["feats"], b["feats"])
    other = MiasBags(DATA, split="all", images=IMAGES[:1], **{**FAST, "encoder_seed": 8})
    assert other.encoded == 1 and other.cache_folder != first.cache_folder  # other weights, other cache
    assert not torch.equal(other.bags[0]["feats"], first.bags[0]["feats"])
    assert not list((DATA / "mias").rglob("*.safetensors"))  # nothing is written into the data folder


def test_instance_controls_are_aligned_with_the_features(bags: MiasBags) -> None:
    images = MIAS(DATA, split="all", spacing_mm=FAST["spacing_mm"])
    position = {r.name: i for i, r in enumerate(images.records)}
    for record, bag in zip(bags.records, bags.bags):
        controls = bag["instance_controls"]
        assert tuple(controls) == CONTROL_NAMES
        n = bag["feats"].shape[0]
        assert all(v.shape == (n,) and torch.isfinite(v).all() for v in controls.values())
        tiles = breast_tiles(images[position[record.name]], FAST["tile_mm"])
        torch.testing.assert_close(controls["brightness"], tiles.images.mean(dim=(1, 2, 3)))
        assert (controls["breast_centre"] <= 0).all()
        # the tile nearest the breast's centroid is well inside the breast, the farthest near its edge
        nearest = int(controls["breast_centre"].argmax())
        assert tiles.breast_fraction[nearest] == 1.0
    batch = collate_for(DataSpec("mias_bags", {}))([bags[0], bags[2]])
    assert set(batch["instance_controls"]) == set(CONTROL_NAMES)
    assert batch["instance_controls"]["brightness"].shape == batch["mask"].shape == batch["instance_labels"].shape


def test_bad_settings_name_the_argument(cache: Path) -> None:
    with pytest.raises(ValueError, match="input_px"):
        BagFeatureSettings(input_px=4)
    with pytest.raises(ValueError, match="init"):
        BagFeatureSettings(init="file:x.safetensors")
    with pytest.raises(ValueError, match="tile_size"):
        MiasBags(DATA, split="all", images=IMAGES[:1], tile_size=3)
    with pytest.raises(ValueError, match="mdb999"):
        MiasBags(DATA, split="test", images=["mdb999"], **FAST)


@pytest.mark.parametrize("recipe_name", ["abmil_mias.yaml", "additive_mil_mias.yaml"])
def test_the_recipe_builds_and_trains_one_tiny_epoch(recipe_name, cache: Path, tmp_path: Path) -> None:
    overrides = [f"data.params.root={DATA}", *(f"data.params.{k}={v}" for k, v in FAST.items()),
                 "model.config.in_features=128", "data.train_size=6", "data.val_size=6", "data.test_size=2",
                 "stages.0.epochs=1", "optim.batch_size=3"]
    if recipe_name == "abmil_mias.yaml":  # its second stage trains the size head alone
        overrides.append("stages.1.epochs=1")
    recipe = load_recipe(RECIPES / recipe_name, overrides)
    assert recipe.data.kind == "mias_bags"
    final = train(recipe, tmp_path / "run", quiet=True)
    config = json.loads((final / "config.json").read_text())
    assert config["data"]["kind"] == "mias_bags"
    model = mlmi_zoo.load(f"local-dir:{final}")
    bag = build_dataset(recipe.data, "test")[0]
    exp = model.explain(bag["feats"][None], coords=bag["coords"][None])
    assert exp.logits.shape == (1, 2) and exp.attention.shape == (1, bag["feats"].shape[0])
    assert "image" not in bag and all(k != "tiles" for k in bag)  # a bag holds features, never pixels


def test_an_image_baseline_is_matched_to_each_film_of_a_woman(cache: Path, tmp_path: Path) -> None:
    """A woman has two films: the baseline's probability of each bag is the one of that film, not her other."""
    images = load_recipe(RECIPES / "baseline_lite0_mias_release.yaml", [
        f"data.params.root={DATA}", "data.params.spacing_mm=1.6", "model.init=random", "model.config.img_size=[128,128]",
        "model.config.spacing=[1.6,1.6]", "data.train_size=4", "data.val_size=2", "data.test_size=4",
        "stages.0.epochs=1", "optim.batch_size=2"])
    baseline = train(images, tmp_path / "images", quiet=True)
    base_model = mlmi_zoo.load(f"local-dir:{baseline}").eval()
    films = build_dataset(images.data, "test")
    with torch.no_grad():
        direct = {films[i]["name"]: base_model(base_model.input_spec.intensity(films[i]["image"][None])).softmax(-1)[0]
                  for i in range(len(films))}
    bag_data = MiasBags(DATA, split="test", max_images=4, **FAST)
    order = list(reversed(range(len(bag_data))))  # another order than the films'
    groups = np.asarray([bag_data[i]["patient_id"] for i in order])
    names = [bag_data[i]["name"] for i in order]
    assert len(set(groups.tolist())) == 2 and len(groups) == 4  # two women, two films each
    bag_model = mlmi_zoo.create_model("abmil_features", in_features=bag_data.feature_dim, label_names=("normal", "abnormal"),
                                      quantities=())
    matched = _baseline_probs(base_model, f"local-dir:{baseline}", bag_model, bag_data, None, "test", 2, groups, names)
    assert torch.allclose(matched, torch.stack([direct[n] for n in names]), atol=1e-6)
    with pytest.raises(ValueError, match="several cases per patient"):
        _baseline_probs(base_model, f"local-dir:{baseline}", bag_model, bag_data, None, "test", 2, groups)


def test_the_photograph_of_a_bag_and_its_annotations_line_up_with_its_tiles(bags: MiasBags) -> None:
    index = bags.records.index(next(r for r in bags.records if r.has_centre))
    image, tile_px = bags.photograph(index)  # shrunk twice
    marks = bags.photograph_annotations(index)
    film = bags.images[bags.images.records.index(bags.records[index])]
    assert image.shape == (1, film["image"].shape[-2] // 2, film["image"].shape[-1] // 2)
    assert tile_px == round(FAST["tile_mm"] / FAST["spacing_mm"]) // 2
    assert marks["mask"].shape == image.shape and marks["breast"].shape == image.shape[-2:]
    assert torch.allclose(marks["spacing"], film["spacing"] * 2)
    # every tile that holds a disc pixel shows a disc pixel in the shrunk mask, and the others none
    bag = bags.bags[index]
    for (r, c), label in zip(bag["coords"].tolist(), bag["instance_labels"].tolist()):
        assert bool(marks["mask"][0, r * tile_px:(r + 1) * tile_px, c * tile_px:(c + 1) * tile_px].any()) == (label == 1)
    assert torch.equal(image * 255, (image * 255).round())  # 8-bit levels
    with pytest.raises(ValueError, match="shrink"):
        bags.photograph(index, shrink=3)
