"""IDRiD photographs as bags of cached field-of-view tile features (Porwal et al. 2018; MIL as in Ilse et al. 2018).

Runs on the real photographs in ``$MLMI_ZOO_DATA/idrid`` (conftest.py points it at ../shared/data) at
128 px long side with 16-px tiles, a small random ResNet-8 encoder and the zoo's cache in a temporary
folder; skipped when the folder is absent.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import mlmi_zoo
from mlmi_zoo.evaluation.evaluate import _baseline_probs, evaluate
from mlmi_zoo.model_cards.release import RECIPES
from mlmi_zoo.training.data_spec import DataSpec, build_dataset, collate_for, describe
from mlmi_zoo.training.datasets._location import DATA_ENV_VAR
from mlmi_zoo.training.datasets.idrid import IDRiDGrading, IDRiDSegmentation
from mlmi_zoo.training.datasets.idrid_bags import CONTROL_NAMES, IDRiDBags, IDRiDBagSettings, fov_tiles, photograph_bag
from mlmi_zoo.training.recipe import load_recipe
from mlmi_zoo.training.trainer import train

DATA = Path(os.environ[DATA_ENV_VAR])  # exported by conftest.py: ../shared/data unless set
IDRID = DATA / "idrid"
pytestmark = [pytest.mark.data,
              pytest.mark.skipif(not IDRID.is_dir(), reason=f"the IDRiD folder {IDRID} is absent (set {DATA_ENV_VAR})")]
SIZE = 128
FAST = {"size": SIZE, "tile_px": 16, "encoder": "resnet8", "init": "random"}


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One temporary cache folder for the whole module, through ``$MLMI_ZOO_CACHE``."""
    folder = tmp_path_factory.mktemp("idrid_bags_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLMI_ZOO_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def segmentation_bags(cache: Path) -> IDRiDBags:
    return IDRiDBags(DATA, dataset="segmentation", split="test", max_images=3, **FAST)


def test_fov_tiles_keep_the_tiles_mostly_in_the_field_of_view() -> None:
    image = torch.rand(3, 40, 64)
    fov = torch.zeros(40, 64, dtype=torch.bool)
    fov[:, :20] = True  # tile columns 0 (all in) and 1 (4 of 16 columns in); rows 0, 1 (row 2 would be cut)
    tiles = fov_tiles(image, fov, 16, min_fov_fraction=0.5)
    assert tiles.coords.tolist() == [[0, 0], [1, 0]]
    assert torch.equal(tiles.images[1], image[:, 16:32, 0:16])
    assert tiles.fov_fraction.tolist() == [1.0, 1.0]
    assert fov_tiles(image, fov, 16, min_fov_fraction=0.2).coords.shape[0] == 4
    with pytest.raises(ValueError, match="larger than"):
        fov_tiles(image, fov, 48)


def test_tile_truth_and_controls_are_read_from_the_masks_and_pixels(segmentation_bags: IDRiDBags) -> None:
    photos = IDRiDSegmentation(DATA, split="test", size=SIZE)
    for i in range(len(segmentation_bags)):
        bag, sample = segmentation_bags[i], photos[i]
        assert bag["image_id"] == sample["image_id"] and int(bag["label"]) == -1
        n = bag["feats"].shape[0]
        assert bag["coords"].shape == (n, 2) and bag["instance_labels"].shape == (n,)
        assert set(bag["instance_controls"]) == set(CONTROL_NAMES)
        known = sample["annotated"][:4]
        lesion = (sample["mask"][:4] & known[:, None, None]).any(0)
        for j, (r, c) in enumerate(bag["coords"].tolist()):
            window = (slice(r * 16, (r + 1) * 16), slice(c * 16, (c + 1) * 16))
            assert bool(bag["instance_labels"][j]) == bool(lesion[window].any())
            green = sample["image"][1][window][sample["fov"][window]]
            assert math.isclose(float(bag["instance_controls"]["bright_pixels"][j]), float(green.max()), rel_tol=1e-6)
            assert math.isclose(float(bag["instance_controls"]["dark_pixels"][j]), -float(green.min()), rel_tol=1e-6)
        assert 0 < float(bag["instance_labels"].mean()) < 1  # every test photograph holds lesions, not everywhere
    prior = bag["instance_controls"]["lesion_prior"]
    assert bool(((prior >= 0) & (prior <= 1)).all()) and float(prior.max()) > 0


def test_the_lesion_prior_counts_training_photographs_only(segmentation_bags: IDRiDBags) -> None:
    train = IDRiDSegmentation(DATA, split="train", size=SIZE)
    counts = torch.zeros(segmentation_bags.grid_shape)
    for i in range(len(train)):
        s = train[i]
        lesion = (s["mask"][:4] & s["annotated"][:4, None, None]).any(0).float()
        counts += F.max_pool2d(lesion[None, None], 16, 16)[0, 0] > 0
    bag = segmentation_bags[0]
    rows, cols = bag["coords"].unbind(1)
    assert torch.allclose(bag["instance_controls"]["lesion_prior"], (counts / len(train))[rows, cols])


def test_one_lesion_type_makes_fewer_positive_tiles(segmentation_bags: IDRiDBags) -> None:
    ex = IDRiDBags(DATA, dataset="segmentation", split="test", max_images=3, lesions="EX", **FAST)
    for i in range(3):
        only_ex, union = ex[i]["instance_labels"], segmentation_bags[i]["instance_labels"]
        assert bool((only_ex <= union).all())
    assert ex.encoded == 0  # the same tiles: the features come from the cache
    with pytest.raises(ValueError, match="lesion types"):
        IDRiDBags(DATA, dataset="segmentation", split="test", max_images=1, lesions="EX+OD", **FAST)


def test_finding_sets_hold_one_lesion_type_each(segmentation_bags: IDRiDBags) -> None:
    sets = segmentation_bags.finding_sets()
    assert list(sets) == ["microaneurysms", "haemorrhages", "hard_exudates", "soft_exudates"]
    union = torch.stack([b["instance_labels"] for b in segmentation_bags.bags[:1]])
    per_type = torch.stack([s.bags[0]["instance_labels"] for s in sets.values()])
    assert torch.equal(per_type.amax(0), union[0])  # the union of the four is the bag's truth
    assert all(s.encoded == 0 and len(s) == len(segmentation_bags) for s in sets.values())


def test_a_new_photograph_becomes_the_same_bag(segmentation_bags: IDRiDBags) -> None:
    sample = IDRiDSegmentation(DATA, split="test", size=SIZE)[0]
    settings = IDRiDBagSettings(**FAST)
    bag = photograph_bag(sample["image"], sample["fov"], settings)
    assert torch.equal(bag["coords"][0], segmentation_bags[0]["coords"])
    assert torch.allclose(bag["feats"][0], segmentation_bags[0]["feats"], rtol=2e-3, atol=2e-3)  # the cache is fp16
    found = photograph_bag(sample["image"], None, settings)  # the field of view found on the photograph itself
    assert abs(found["coords"].shape[1] - bag["coords"].shape[1]) <= 2
    with pytest.raises(ValueError, match="long side 128"):
        photograph_bag(sample["image"][:, :, :100], None, settings)


def test_a_bag_shows_its_photograph_with_its_tiles(segmentation_bags: IDRiDBags) -> None:
    photo, tile_px = segmentation_bags.photograph(0, shrink=4)
    full = IDRiDSegmentation(DATA, split="test", size=SIZE)[0]["image"]
    assert tile_px == 4 and photo.shape == (3, full.shape[1] // 4, full.shape[2] // 4)
    assert torch.equal((photo * 255).round() / 255, photo)  # 8-bit levels: a demo sample stores it as bytes
    r, c = segmentation_bags[0]["coords"][0].tolist()
    assert torch.allclose(photo[:, r * 4, c * 4], full[:, r * 16:r * 16 + 4, c * 16:c * 16 + 4].mean((1, 2)), atol=1 / 255)
    with pytest.raises(ValueError, match="divide"):
        segmentation_bags.photograph(0, shrink=3)


def test_tile_aupr_and_pointing_game_follow_the_scores(segmentation_bags: IDRiDBags) -> None:
    from mlmi_zoo.evaluation._annotated import _rank_metrics

    bags = segmentation_bags.bags
    truths = [b["instance_labels"].numpy() for b in bags]
    ap, pointing, groups = _rank_metrics(truths, bags)  # the truth as the score ranks every positive tile first
    assert list(groups) == [b["patient_id"] for b in bags]
    assert np.allclose(ap["model"], 1.0) and np.allclose(pointing["model"], 1.0)
    shares = [float(t.mean()) for t in truths]
    assert np.allclose(ap["uniform"], shares) and np.allclose(pointing["uniform"], shares)
    worst, _, _ = _rank_metrics([-t for t in truths], bags)  # and last when reversed
    assert (worst["model"] < ap["model"]).all() and set(CONTROL_NAMES) <= set(ap)


def test_grading_bags_carry_the_grade_and_no_tile_truth(cache: Path) -> None:
    bags = IDRiDBags(DATA, dataset="grading", split="val", task="referable", max_images=4, **FAST)
    photos = IDRiDGrading(DATA, split="val", size=SIZE, task="referable", prepare=False)
    for i in range(4):
        assert int(bags[i]["label"]) == photos.label_of(i)
        assert bags[i]["patient_id"] == f"grading/train/{photos.image_ids[i]}"
        assert "instance_labels" not in bags[i] and "instance_controls" not in bags[i]
    again = IDRiDBags(DATA, dataset="grading", split="val", task="referable", max_images=4, **FAST)
    assert again.encoded == 0 and torch.equal(again[0]["feats"], bags[0]["feats"])
    batch = collate_for(DataSpec("idrid_bags", {}))([bags[0], bags[1]])
    assert batch["feats"].shape[0] == 2 and batch["mask"].shape == batch["feats"].shape[:2]


def test_describe_encodes_nothing_and_names_the_photographs(cache: Path) -> None:
    before = sorted(cache.glob("idrid_bags/**/*.safetensors"))
    spec = DataSpec("idrid_bags", {"root": str(DATA), "dataset": "grading", **FAST}, train_size=5, val_size=3,
                    test_size=2)
    record = describe(spec)
    assert sorted(cache.glob("idrid_bags/**/*.safetensors")) == before
    assert record["splits"]["test"] == {"size": 2, "official_part": "test",
                                        "image_ids": list(IDRiDGrading(DATA, split="test", size=SIZE,
                                                                       prepare=False).image_ids[:2])}
    assert record["source"]["features"]["tile_px"] == 16


def test_bad_settings_are_named(cache: Path) -> None:
    with pytest.raises(ValueError, match="unknown idrid_bags parameter"):
        IDRiDBags(DATA, dataset="grading", split="val", max_images=1, tile_size=16)
    with pytest.raises(ValueError, match="tile_px"):
        IDRiDBags(DATA, dataset="grading", split="val", max_images=1, size=SIZE, tile_px=100)
    with pytest.raises(ValueError, match="'grading' or 'segmentation'"):
        IDRiDBags(DATA, dataset="lesions", split="val", max_images=1, **FAST)


@pytest.mark.parametrize("recipe_name", ["abmil_idrid_rdr.yaml", "additive_mil_idrid_rdr.yaml"])
def test_the_recipe_trains_and_is_scored_on_the_annotated_bags(recipe_name: str, tmp_path: Path) -> None:
    overrides = [f"data.params.root={DATA}", *(f"data.params.{k}={v}" for k, v in FAST.items()),
                 "model.config.in_features=128", "model.config.tile_size=16", "data.train_size=8", "data.val_size=6",
                 "data.test_size=6", "stages.0.epochs=1", "optim.batch_size=4"]
    recipe = load_recipe(RECIPES / recipe_name, overrides)
    assert recipe.data.kind == "idrid_bags"
    final = train(recipe, tmp_path / "run", quiet=True)
    assert json.loads((final / "config.json").read_text())["data"]["kind"] == "idrid_bags"
    bag = build_dataset(recipe.data, "test")[0]
    exp = mlmi_zoo.load(f"local-dir:{final}").explain(bag["feats"][None], coords=bag["coords"][None])
    assert exp.logits.shape == (1, 2) and exp.attention.shape == (1, bag["feats"].shape[0])
    annotated = "idrid_bags:" + ",".join(f"{k}={v}" for k, v in {"root": DATA, "dataset": "segmentation", **FAST}.items())
    doc = evaluate(f"local-dir:{final}", None, split="test", n_boot=20, localization_data=annotated + ",test_size=3",
                   figures_dir=tmp_path / "figures")
    loc = doc["elements"]["localization"]
    assert loc["applicable"] and loc["details"]["annotated_data"]["cases"] == 3
    assert set(CONTROL_NAMES) <= set(loc["evidence"]["controls"])
    assert loc["metrics"]["bags_with_both_instance_classes"] == 3
    assert {"figures/mil_heatmap.png", "figures/mil_heatmap_truth.png"} <= set(loc["figures"])  # one photograph's tiles
    # each lesion type against its own tiles, beside the same controls (its own lesion prior)
    assert {"evidence_microaneurysms", "evidence_hard_exudates"} <= set(loc)
    assert set(CONTROL_NAMES) <= set(loc["evidence_hard_exudates"]["controls"])
    aupr, pointing = loc["evidence_hard_exudates_aupr"], loc["evidence_hard_exudates_pointing"]
    assert {*CONTROL_NAMES, "uniform"} <= set(aupr["controls"]) and {*CONTROL_NAMES, "uniform"} <= set(pointing["controls"])
    assert 0.0 <= aupr["model"]["estimate"] <= 1.0 and 0.0 <= pointing["model"]["estimate"] <= 1.0
    seen = doc["elements"]["visual_recognizability"]
    assert seen["applicable"] and seen["metrics"]["bags_holding_a_finding"] == 3
    assert 0 < seen["metrics"]["all_tiles_finding_share"] < 1 and "evidence" in seen
    assert doc["verdicts"]["visual_recognizability"]["status"] != "not applicable"


def test_an_image_baseline_is_matched_to_the_bags_by_photograph(tmp_path: Path) -> None:
    sizes = ["data.train_size=6", "data.val_size=4", "data.test_size=5", "stages.0.epochs=1", "optim.batch_size=3"]
    bags = load_recipe(RECIPES / "abmil_idrid_rdr.yaml", [
        f"data.params.root={DATA}", *(f"data.params.{k}={v}" for k, v in FAST.items()), "model.config.in_features=128",
        "model.config.tile_size=16", *sizes])
    images = load_recipe(RECIPES / "baseline_lite0_idrid_rdr_release.yaml", [
        f"data.params.root={DATA}", f"data.params.size={SIZE}", "model.init=random", "model.config.img_size=[85,128]",
        *sizes])
    model = train(bags, tmp_path / "bags", quiet=True)
    baseline = train(images, tmp_path / "images", quiet=True)
    doc = evaluate(f"local-dir:{model}", None, split="test", n_boot=20, baseline_uri=f"local-dir:{baseline}")
    assert doc["baseline"]["uri"] == f"local-dir:{baseline}"
    # each photograph's probability comes from the baseline reading that photograph, in the bags' order
    base_model = mlmi_zoo.load(f"local-dir:{baseline}").eval()
    photos = build_dataset(images.data, "test")
    with torch.no_grad():
        direct = {photos[i]["patient_id"]: base_model(base_model.input_spec.intensity(photos[i]["image"][None]))
                  .softmax(-1)[0] for i in range(len(photos))}
    bag_data = build_dataset(bags.data, "test")
    order = [str(bag_data[i]["patient_id"]) for i in reversed(range(len(bag_data)))]  # another order than the photos'
    bag_model = mlmi_zoo.load(f"local-dir:{model}")
    matched = _baseline_probs(base_model, f"local-dir:{baseline}", bag_model, bag_data, None, "test", 2, np.asarray(order))
    assert torch.allclose(matched, torch.stack([direct[p] for p in order]), atol=1e-6)
    # an image model at another size than the baseline's is matched the same way (its cases are not read)
    other = mlmi_zoo.create_model("protopnet_resnet8", img_size=(64, 96), in_channels=3,
                                  label_names=("non-referable", "referable"), prototypes_per_class=1)
    again = _baseline_probs(base_model, f"local-dir:{baseline}", other, None, None, "test", 2, np.asarray(order))
    assert torch.allclose(again, matched)
    with pytest.raises(ValueError, match="lack 1 evaluated case"):
        _baseline_probs(base_model, f"local-dir:{baseline}", bag_model, bag_data, None, "test", 2,
                        np.asarray([*order, "grading/test/IDRiD_999"]))
