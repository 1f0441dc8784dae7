"""The IDRiD data module on the real photographs (Porwal et al., Data 3(3):25, 2018): splits, labels,
annotation flags, coordinates, field of view, the optic-disc-diameter unit and the resized cache.

Every test reads ``<data>/idrid`` at ``size=128`` into one temporary cache folder for the module (the
first test that reads a split builds its cache entries; the others reuse them).
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from mlmi_zoo.training.data_spec import DataSpec, build_dataset, describe
from mlmi_zoo.training.datasets._location import DATA_ENV_VAR, DataNotFoundError
from mlmi_zoo.training.datasets.idrid import (LESIONS, IDRiDGrading, IDRiDSegmentation, macula_region,
                                              median_disc_diameter, original_to_returned, returned_shape)
from mlmi_zoo.units import convert, quantity

SIZE = 128
DATA = Path(os.environ.get(DATA_ENV_VAR) or Path(__file__).resolve().parents[1].parent / "shared" / "data")
IDRID = DATA / "idrid"
pytestmark = [pytest.mark.data,
              pytest.mark.skipif(not IDRID.is_dir(), reason=f"the IDRiD folder {IDRID} is absent (set {DATA_ENV_VAR})")]


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One temporary cache folder for the whole module, through ``$MLMI_ZOO_CACHE``."""
    folder = tmp_path_factory.mktemp("idrid_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLMI_ZOO_CACHE", str(folder))
        yield folder


def grading(split: str, **kwargs: Any) -> IDRiDGrading:
    return IDRiDGrading(DATA, split=split, size=SIZE, **kwargs)


def segmentation(split: str, **kwargs: Any) -> IDRiDSegmentation:
    return IDRiDSegmentation(DATA, split=split, size=SIZE, **kwargs)


def csv_rows(path: Path) -> dict[str, list[str]]:
    with open(path, encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    return {r[0]: r[1:3] for r in rows if r and r[0]}


# ---------------------------------------------------------------------------------------------
# splits, labels, annotation flags (no image is read)
# ---------------------------------------------------------------------------------------------
def test_grading_splits_partition_the_official_parts_and_are_stratified() -> None:
    train, val, test = (grading(s, prepare=False) for s in ("train", "val", "test"))
    assert len(train) + len(val) == 413 and len(test) == 103
    assert len(val) == 83
    assert not set(train.image_ids) & set(val.image_ids)
    assert set(train.image_ids) | set(val.image_ids) == set(csv_rows(IDRID / "grading/labels/train.csv"))
    assert {s.official_part for s in (train, val, test)} == {"train", "test"}
    grades = {k: int(v[0]) for k, v in csv_rows(IDRID / "grading/labels/train.csv").items()}
    for g in range(5):
        n_all = sum(v == g for v in grades.values())
        n_val = sum(grades[i] == g for i in val.image_ids)
        assert abs(n_val - 0.2 * n_all) <= 1, (g, n_val, n_all)
    again = grading("val", prepare=False)
    assert again.image_ids == val.image_ids  # a fixed rule, not a fresh draw


def test_segmentation_splits_and_annotation_flags() -> None:
    train, val, test = (segmentation(s, prepare=False) for s in ("train", "val", "test"))
    assert (len(train) + len(val), len(val), len(test)) == (54, 10, 27)
    assert not set(train.image_ids) & set(val.image_ids)
    se, he = LESIONS.index("SE"), LESIONS.index("HE")
    assert int(train.annotated[:, se].sum() + val.annotated[:, se].sum()) == 26
    assert int(test.annotated[:, se].sum()) == 14
    official_train = dict(zip(train.image_ids + val.image_ids, np.concatenate([train.annotated, val.annotated])))
    assert not official_train["IDRiD_43"][he]
    assert sum(not a[he] for a in official_train.values()) == 1
    assert test.annotated[:, he].all()
    for code in ("MA", "EX", "OD"):
        k = LESIONS.index(code)
        assert train.annotated[:, k].all() and val.annotated[:, k].all() and test.annotated[:, k].all()


def test_labels_match_the_csv() -> None:
    ds = grading("test")
    truth = csv_rows(IDRID / "grading/labels/test.csv")
    assert len(truth) == len(ds)
    for i in range(len(ds)):
        sample = ds[i]
        assert [int(sample["label"]), int(sample["dme_risk"])] == [int(v) for v in truth[sample["image_id"]]]
        assert sample["patient_id"] == f"grading/test/{sample['image_id']}"  # one photograph, one unit


# ---------------------------------------------------------------------------------------------
# geometry: grid, coordinates, field of view
# ---------------------------------------------------------------------------------------------
def test_coordinates_map_the_frame_onto_the_returned_grid() -> None:
    h, w = returned_shape(SIZE)
    assert (h, w) == (round(2848 * SIZE / 4288), SIZE)
    corners = original_to_returned([[-0.5, -0.5], [4287.5, 2847.5]], SIZE)
    np.testing.assert_allclose(corners, [[-0.5, -0.5], [w - 0.5, h - 0.5]])


def test_fovea_lands_in_a_dark_region_and_the_disc_in_a_bright_one() -> None:
    ds = grading("test")
    truth = csv_rows(IDRID / "localization/fovea_test.csv")
    dark = bright = 0
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].shape == (3, *returned_shape(SIZE)) and s["fov"].shape == returned_shape(SIZE)
        expected = original_to_returned([float(v) for v in truth[s["image_id"]]], SIZE)
        np.testing.assert_allclose(s["fovea_xy"].numpy(), expected, rtol=1e-5)
        intensity = s["image"].mean(0)
        fov_mean = float(intensity[s["fov"]].mean())
        r = max(1, round(0.15 * float(s["dd_px"])))

        def window(xy: torch.Tensor) -> float:
            x, y = (int(round(float(c))) for c in xy)
            return float(intensity[max(0, y - r):y + r + 1, max(0, x - r):x + r + 1].mean())

        dark += window(s["fovea_xy"]) < fov_mean
        bright += window(s["optic_disc_xy"]) > fov_mean
    assert dark >= 0.85 * len(ds), f"the fovea is darker than the FOV in only {dark} of {len(ds)} images"
    assert bright >= 0.95 * len(ds), f"the disc is brighter than the FOV in only {bright} of {len(ds)} images"


def _all_segmentation(**kwargs: Any) -> list[IDRiDSegmentation]:
    return [segmentation(s, **kwargs) for s in ("train", "val", "test")]


def test_lesion_masks_lie_inside_the_field_of_view() -> None:
    """Full resolution: every mask >= 99.9% in the FOV but the stray HE stroke of test IDRiD_61."""
    stray = ("test", "IDRiD_61", "HE")
    for ds in _all_segmentation():
        for image_id, shares in ds.fov_coverage().items():
            for code, share in shares.items():
                if math.isnan(share):
                    continue
                if (ds.official_part, image_id, code) == stray:
                    assert share < 0.99
                else:
                    assert share > 0.999, (ds.official_part, image_id, code, share)
    od = LESIONS.index("OD")
    for ds in _all_segmentation(clip_to_fov=False):
        for i in range(len(ds)):
            s = ds[i]
            drawn, fov = s["mask"], s["fov"]
            assert drawn[od].any() and bool((drawn[od] & ~fov).sum() == 0), s["image_id"]  # the disc is in the FOV
            for k, code in enumerate(LESIONS):
                n = int(drawn[k].sum())
                if n and (ds.official_part, s["image_id"], code) != stray:
                    assert (drawn[k] & fov).sum() > 0.95 * n, (s["image_id"], code)


def test_clipping_cuts_the_stray_stroke_and_keeps_masks_in_the_fov() -> None:
    drawn_ds, clipped_ds = segmentation("test", clip_to_fov=False), segmentation("test")
    i = drawn_ds.image_ids.index("IDRiD_61")
    drawn, clipped = drawn_ds[i], clipped_ds[i]
    he = LESIONS.index("HE")
    assert bool((drawn["mask"][he] & ~drawn["fov"]).any())
    assert not bool((clipped["mask"] & ~clipped["fov"]).any())
    assert int(clipped["mask"][he].sum()) < int(drawn["mask"][he].sum())
    assert bool((clipped["mask"] <= drawn["mask"]).all())


def test_not_annotated_is_not_absent() -> None:
    ds = segmentation("train", prepare=False)
    if "IDRiD_43" not in ds.image_ids:
        ds = segmentation("val", prepare=False)
    s = ds[ds.image_ids.index("IDRiD_43")]
    he = LESIONS.index("HE")
    assert not bool(s["annotated"][he]) and not bool(s["mask"][he].any())
    assert math.isnan(float(s["concepts"]["haemorrhages"]))
    assert float(s["concepts"]["hard_exudates"]) == 1.0 and bool(s["annotated"][LESIONS.index("EX")])


def test_small_lesions_survive_the_downsampling() -> None:
    """Every drawn microaneurysm pixel is marked in the returned pixel that contains it (max pooling)."""
    ds = segmentation("val", clip_to_fov=False)
    h, w = returned_shape(SIZE)
    ma = LESIONS.index("MA")
    for i, image_id in enumerate(ds.image_ids):
        full = np.asarray(Image.open(IDRID / "segmentation/masks/train/MA" / f"{image_id}_MA.png")) > 0
        returned = ds[i]["mask"][ma].numpy()
        ys, xs = np.nonzero(full)
        assert len(ys) > 0
        assert returned[(ys * h) // 2848, (xs * w) // 4288].all(), image_id


# ---------------------------------------------------------------------------------------------
# the optic-disc diameter
# ---------------------------------------------------------------------------------------------
def test_the_dd_unit_is_its_own_dimension() -> None:
    assert convert(2.5, "DD^2", "DD^2") == pytest.approx(2.5)
    assert (quantity(3.0, "DD") ** 2).to("DD^2").magnitude == pytest.approx(9.0)
    with pytest.raises(ValueError, match="DD"):
        convert(1.0, "DD", "mm")
    with pytest.raises(ValueError):
        convert(1.0, "DD^2", "mm^2")


def test_disc_diameter_spacing_and_exudate_area() -> None:
    ds = segmentation("val")
    s = ds[0]
    od_png, ex_png = (np.asarray(Image.open(IDRID / f"segmentation/masks/train/{c}/{ds.image_ids[0]}_{c}.png")) > 0
                      for c in ("OD", "EX"))
    dd_full = math.sqrt(4.0 * np.count_nonzero(od_png) / math.pi)
    assert float(s["dd_px"]) == pytest.approx(dd_full * SIZE / 4288, rel=1e-5)
    assert float(s["spacing"][1]) == pytest.approx(1.0 / float(s["dd_px"]), rel=1e-5)
    assert float(s["spacing"][0]) == pytest.approx(float(s["spacing"][1]), rel=0.01)
    # on the returned grid the disc mask is max-pooled (a little larger), never smaller
    dd_returned = math.sqrt(4.0 * float(s["mask"][LESIONS.index("OD")].sum()) / math.pi)
    assert 1.0 <= dd_returned / float(s["dd_px"]) < 1.2
    # the exudate area in DD^2 from the drawing at full resolution (IDRiD EX masks lie inside the FOV)
    assert float(s["measurements"]["ex_area_dd2"]) == pytest.approx(np.count_nonzero(ex_png) / dd_full ** 2, rel=1e-3)

    g = grading("val", prepare=False)
    median = median_disc_diameter(DATA)
    assert 400 < median < 650  # the discs of 4288-pixel 50 degree photographs
    assert g.dd_px == pytest.approx(median * SIZE / 4288)


def test_grading_measurements_in_dd() -> None:
    ds = grading("test")
    truth_f = csv_rows(IDRID / "localization/fovea_test.csv")
    truth_d = csv_rows(IDRID / "localization/optic_disc_test.csv")
    s = ds[5]
    f, d = (np.array([float(v) for v in t[s["image_id"]]]) for t in (truth_f, truth_d))
    expected = float(np.linalg.norm(f - d)) / median_disc_diameter(DATA)
    assert float(s["measurements"]["fovea_od_distance_dd"]) == pytest.approx(expected, rel=1e-5)
    assert float(s["measurements"]["fovea_x_px"]) == pytest.approx(float(s["fovea_xy"][0]))
    distances = [float(ds[i]["measurements"]["fovea_od_distance_dd"]) for i in range(len(ds))]
    assert 2.0 < float(np.median(distances)) < 3.0  # ~2.5 DD in adult eyes


def test_macula_region() -> None:
    region = macula_region((40.0, 30.0), 10.0, (85, 128))
    assert region.shape == (85, 128) and region.dtype == torch.bool
    assert bool(region[30, 40]) and bool(region[30, 49]) and not bool(region[30, 51])
    assert int(region.sum()) == pytest.approx(math.pi * 100, rel=0.05)
    assert int(macula_region((40.0, 30.0), 10.0, (85, 128), radius_dd=2.0).sum()) > 3 * int(region.sum())
    with pytest.raises(ValueError, match="dd_px"):
        macula_region((40.0, 30.0), 0.0, (85, 128))
    with pytest.raises(ValueError, match="fovea_xy"):
        macula_region((40.0,), 10.0, (85, 128))


# ---------------------------------------------------------------------------------------------
# the cache, bad input, the data spec
# ---------------------------------------------------------------------------------------------
def test_the_cache_is_reused_and_identical(cache: Path) -> None:
    first = segmentation("val")
    before = [first[i] for i in range(len(first))]
    folder = cache / "idrid" / str(SIZE) / "segmentation" / "train"
    stamps = {p: p.stat().st_mtime_ns for p in folder.glob("*.npz")}
    assert len(stamps) >= len(first)
    start = time.perf_counter()
    second = segmentation("val")
    after = [second[i] for i in range(len(second))]
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0, f"reading 10 cached images took {elapsed:.1f} s: the cache was not used"
    assert {p: p.stat().st_mtime_ns for p in folder.glob("*.npz")} == stamps  # nothing rebuilt
    for a, b in zip(before, after):
        for key in ("image", "mask", "fov", "annotated", "spacing"):
            assert torch.equal(a[key], b[key]), key
    assert not list(cache.rglob("*.tmp")), "a temporary file was left behind"
    assert not any(p.suffix in (".npz", ".tmp") for p in IDRID.rglob("*")), "the data folder was written into"


def test_a_damaged_cache_file_is_rebuilt(cache: Path) -> None:
    ds = segmentation("val")
    reference = ds[0]
    path = cache / "idrid" / str(SIZE) / "segmentation" / "train" / f"{ds.image_ids[0]}.npz"
    path.write_bytes(path.read_bytes()[:100])  # a truncated file, as after a full disk
    again = segmentation("val", prepare=False)[0]
    assert torch.equal(again["mask"], reference["mask"]) and torch.equal(again["image"], reference["image"])


def test_missing_data_folder_names_the_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataNotFoundError, match=DATA_ENV_VAR):
        IDRiDGrading(tmp_path / "nowhere", size=SIZE)
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    with pytest.raises(DataNotFoundError, match=DATA_ENV_VAR):
        IDRiDSegmentation(size=SIZE)


@pytest.mark.parametrize("size", [0, 16, 4288, 12.5, True, "512"])
def test_a_bad_size_is_refused(size: Any) -> None:
    with pytest.raises(ValueError, match=r"size must be an integer .* got " + repr(size).replace(".", r"\.")):
        IDRiDGrading(DATA, size=size)


def test_bad_split_is_refused() -> None:
    with pytest.raises(ValueError, match="split must be one of"):
        IDRiDSegmentation(DATA, split="validation", size=SIZE)


def test_data_spec_builds_and_describes_idrid() -> None:
    spec = DataSpec(kind="idrid", params={"dataset": "segmentation", "root": str(DATA), "size": SIZE})
    assert len(build_dataset(spec, "val")) == 10
    record = describe(spec)
    splits = record["splits"]
    assert [splits[s]["size"] for s in ("train", "val", "test")] == [44, 10, 27]
    assert not set(splits["train"]["image_ids"]) & set(splits["val"]["image_ids"])
    assert splits["test"]["official_part"] == "test"
    source = record["source"]
    # the checksums are those the data set publishes in MD5SUMS: 81 photographs and 367 masks
    published = dict(line.split()[::-1] for line in (IDRID / "MD5SUMS").read_text().splitlines() if line.strip())
    listing = sorted((name.removeprefix("./"), md5) for name, md5 in published.items()
                     if name.startswith("./segmentation/"))
    assert source["set"] == "segmentation" and source["num_files"] == len(listing) == 81 * 4 + 80 + 40
    assert source["md5_of_listing"] == hashlib.sha256(json.dumps([list(x) for x in listing]).encode()).hexdigest()
    with pytest.raises(ValueError, match="dataset must be"):
        build_dataset(DataSpec(kind="idrid", params={"dataset": "grades", "root": str(DATA)}), "val")


# ---------------------------------------------------------------------------------------------
# the lesion union and localization scored on the segmentation photographs
# ---------------------------------------------------------------------------------------------
def test_union_mask_is_the_or_of_the_annotated_lesions() -> None:
    five, union = segmentation("test"), segmentation("test", union="MA+HE+EX+SE")
    for i in (0, len(five) - 1):
        a, b = five[i], union[i]
        rows = [LESIONS.index(c) for c in ("MA", "HE", "EX", "SE")]
        expected = (a["mask"][rows] & a["annotated"][rows, None, None]).any(0)
        assert b["mask"].shape == (1, *returned_shape(SIZE)) and torch.equal(b["mask"][0], expected)
        assert bool(b["annotated"].all()) == bool(a["annotated"][rows].any())
    with pytest.raises(ValueError, match="union must name lesions"):
        segmentation("test", union="MA+XX")


def test_localization_is_scored_on_the_segmentation_set_when_the_graded_split_has_no_masks(tmp_path: Path) -> None:
    from mlmi_zoo.evaluation.evaluate import EvaluationLimits, evaluate
    from mlmi_zoo.evaluation.localization import activation_precision
    from mlmi_zoo.registry import create_model

    torch.manual_seed(0)
    shape = returned_shape(SIZE)
    model = create_model("protopnet_resnet8", img_size=shape, in_channels=3, label_names=("non-referable", "referable"),
                         prototypes_per_class=2, prototype_dim=16).eval()
    graded = DataSpec("idrid", {"root": str(DATA), "dataset": "grading", "task": "referable", "size": SIZE})
    model.save_pretrained(tmp_path / "model", extra={"data": describe(graded)})
    annotated = {"kind": "idrid", "params": {"root": str(DATA), "dataset": "segmentation", "size": SIZE,
                                             "union": "MA+HE+EX+SE"}}
    limits = EvaluationLimits(deletion_cases=4, deletion_steps=2, spacing_cases=2, purity_train_cases=8, val_cases=4,
                              oracle_train_cases=8, intervention_repeats=1, examples=1, control_train_cases=16)
    doc = evaluate(f"local-dir:{tmp_path / 'model'}", graded, max_cases=8, n_boot=20, batch_size=8, limits=limits,
                   localization_data=annotated)
    loc = doc["elements"]["localization"]
    assert loc["applicable"] and loc["metrics"]["cases_with_mask"] == 27
    assert loc["details"]["annotated_data"]["cases"] == 27 and "--localization-data" in doc["command"]
    masks = torch.stack([s["mask"] for s in segmentation("test", union="MA+HE+EX+SE")])
    ceiling = float(activation_precision(masks.float(), masks).mean())
    assert loc["metrics"]["activation_precision_top5pct_ceiling"] == pytest.approx(ceiling, abs=1e-9)
    assert {"centre_prior", "uniform", "random", "brightness"} <= set(loc["evidence"]["controls"])
    assert doc["verdicts"]["localization"]["metric"] == "activation precision (top 5%)"
    assert doc["n_cases"] == 8 and doc["data"]["source"]["set"] == "grading"  # the task is still the graded split's
    # the same map against each lesion type's own masks, beside that type's image-processing map
    for finding in ("microaneurysms", "haemorrhages", "hard_exudates"):
        assert {"image processing", "centre prior", "uniform"} <= set(loc[f"evidence_pixel_aupr_{finding}"]["controls"])
    assert loc["details"]["finding_maps"]["hard_exudates"]["images"] > 0
    # prototype purity on the annotated photographs: nearest patches searched inside the field of view
    # only, against the share of lesion cells among the same searched cells
    from mlmi_zoo.architectures.protopnet.prototypes import foreground_cells

    rec = doc["elements"]["visual_recognizability"]
    assert rec["details"]["annotated_data"]["foreground"] == "fov" and rec["details"]["annotated_data"]["cases"] == 27
    union = segmentation("test", union="MA+HE+EX+SE")
    with torch.no_grad():
        latent = tuple(model.latent(torch.zeros(1, 3, *shape)).shape[2:])
    fov = torch.stack([s["fov"] for s in union])
    searched = foreground_cells(model, fov, latent)  # (27, L)
    on = torch.nn.functional.adaptive_max_pool2d(masks.float(), latent).flatten(1) > 0  # (27, L)
    assert rec["metrics"]["lesion_cell_share_annotated"] == pytest.approx(float(on[searched].float().mean()), abs=1e-9)
    assert rec["evidence"]["metric"].startswith("lesion purity of each prototype's nearest annotated patches")
    assert len(rec["details"]["lesion_purity_per_prototype_annotated"]) == model.num_prototypes
    from mlmi_zoo.model_cards.card import render_card

    assert "Lesion purity scored on the test split of another data set" in render_card(tmp_path / "model", doc)
    with pytest.raises(ValueError, match="has lesion masks of its own"):
        evaluate(f"local-dir:{tmp_path / 'model'}", annotated, max_cases=4, n_boot=5, batch_size=4, limits=limits,
                 localization_data=annotated)


# ---------------------------------------------------------------------------------------------
# the macula set (both sets, for a macular-edema model)
# ---------------------------------------------------------------------------------------------
def test_macula_set_joins_both_sets_and_marks_what_each_photograph_lacks() -> None:
    from torch.utils.data import default_collate

    from mlmi_zoo.training.datasets.idrid_joined import IDRiDMacula

    for split, n_seg, n_grading in (("train", 44, 330), ("val", 10, 83)):
        ds = IDRiDMacula(DATA, split, SIZE, prepare=False)
        assert len(ds) == n_seg + n_grading
        assert ds.image_ids[:n_seg] == tuple(f"segmentation/{i}" for i in segmentation(split, prepare=False).image_ids)
        seg, graded = ds[0], ds[n_seg]
        assert set(seg) == set(graded) == set(IDRiDMacula.KEYS)
        assert int(seg["label"]) == -1 and torch.isnan(seg["fovea_xy"]).all()
        assert not bool(graded["ex_annotated"]) and not graded["ex_mask"].any()
        # the segmentation photograph's exudate mask is its own EX channel
        own = segmentation(split)[0]
        assert torch.equal(seg["ex_mask"][0], own["mask"][LESIONS.index("EX")])
        # the graded photograph's label is its DME risk, and its fovea the grading set's
        reference = grading(split, task="dme")[0]
        assert int(graded["label"]) == int(reference["dme_risk"]) == ds.label_of(n_seg)
        assert torch.equal(graded["fovea_xy"], reference["fovea_xy"])
        default_collate([seg, graded])  # one batch may hold both
    test = IDRiDMacula(DATA, "test", SIZE, prepare=False)
    assert len(test) == 103 and all(i.startswith("grading/") for i in test.image_ids)
    labels = csv_rows(IDRID / "grading" / "labels" / "test.csv")
    assert [test.label_of(i) for i in range(len(test))] == [int(labels[i.split("/")[1]][1]) for i in test.image_ids]


def test_macula_spec_describes_both_sets_and_stays_disjoint() -> None:
    spec = DataSpec(kind="idrid", params={"dataset": "macula", "size": SIZE})
    desc = describe(spec)
    assert desc["source"]["set"] == "macula"
    assert {k: v["size"] for k, v in desc["splits"].items()} == {"train": 374, "val": 93, "test": 103}
    # IDRiD numbers the photographs of each official part from 001: a case is its part and its id
    ids = {k: {f"{v['official_part']}/{i}" for i in v["image_ids"]} for k, v in desc["splits"].items()}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]


# ---------------------------------------------------------------------------------------------
# the lesion set (both sets, for a lesion-concept model of DR)
# ---------------------------------------------------------------------------------------------
def test_lesion_set_carries_each_lesion_type_as_concept_area_and_mask_where_known() -> None:
    from torch.utils.data import default_collate

    from mlmi_zoo.training.datasets.idrid_joined import AREA_CONCEPTS, LESION_CONCEPTS, IDRiDLesions

    ds = IDRiDLesions(DATA, "train", SIZE, prepare=False)
    assert len(ds) == 44 + 330 and ds.label_names == ("non-referable (grade 0-1)", "referable (grade 2-4)")
    own = segmentation("train")[0]
    seg, graded = ds[0], ds[44]
    for k, name in enumerate(LESION_CONCEPTS):
        assert bool(seg["concept_masks_known"][name]) == bool(own["annotated"][k])
        assert torch.equal(seg["concept_masks"][name][0], own["mask"][k] & own["fov"])
        torch.testing.assert_close(seg["concepts"][name], own["concepts"][name], equal_nan=True)
        assert not bool(graded["concept_masks_known"][name]) and math.isnan(float(graded["concepts"][name]))
    for name in AREA_CONCEPTS:
        torch.testing.assert_close(seg["measurements"][name], own["measurements"][name], equal_nan=True)
        assert math.isnan(float(graded["measurements"][name]))
    assert float(seg["measurements"]["ex_area_dd2"]) > 0
    assert int(seg["label"]) == -1 and int(graded["label"]) == int(grading("train", task="referable")[0]["label"])
    assert ds.label_of(44) == int(graded["label"]) and ds.label_of(0) == -1
    default_collate([seg, graded])  # one batch may hold both
    test = IDRiDLesions(DATA, "test", SIZE, prepare=False)
    assert len(test) == 103 and all(i.startswith("grading/") for i in test.image_ids)
    annotated = test.concept_mask_set("test")
    assert len(annotated) == 27 and annotated.image_ids == tuple(f"segmentation/{i}" for i in segmentation("test").image_ids)
    assert IDRiDLesions(DATA, "train", SIZE, prepare=False, task="grade").label_of(44) == int(grading("train")[0]["label"])
    with pytest.raises(ValueError, match="part must be one of"):
        IDRiDLesions(DATA, "train", SIZE, prepare=False, part="masks")
    with pytest.raises(ValueError, match="task must be"):
        IDRiDLesions(DATA, "train", SIZE, prepare=False, task="dme")
    desc = describe(DataSpec(kind="idrid", params={"dataset": "lesions", "size": SIZE}))
    assert desc["source"]["set"] == "lesions"
    assert {k: v["size"] for k, v in desc["splits"].items()} == {"train": 374, "val": 93, "test": 103}


def test_a_lesion_concept_model_is_scored_per_lesion_type_against_the_masks(tmp_path: Path) -> None:
    from mlmi_zoo.evaluation.evaluate import EvaluationLimits, evaluate
    from mlmi_zoo.registry import create_model
    from mlmi_zoo.specs import ConceptSpec
    from mlmi_zoo.training.datasets.idrid_joined import AREA_CONCEPTS, LESION_CONCEPTS

    torch.manual_seed(0)
    concepts = (*(ConceptSpec(n, "binary") for n in LESION_CONCEPTS),
                *(ConceptSpec(n, "continuous", unit="DD^2") for n in AREA_CONCEPTS))
    spacing = tuple(1.0 / d for d in grading("test", prepare=False).dd_px_yx)
    model = create_model("cbm_resnet18", img_size=returned_shape(SIZE), spacing=spacing, concepts=concepts,
                         pooling="max", in_channels=3, label_names=("non-referable", "referable")).eval()
    spec = DataSpec("idrid", {"root": str(DATA), "dataset": "lesions", "size": SIZE})
    model.save_pretrained(tmp_path / "model", extra={"data": describe(spec)})
    annotated = {"kind": "idrid", "params": {"root": str(DATA), "dataset": "segmentation", "size": SIZE,
                                             "union": "MA+HE+EX+SE"}}
    limits = EvaluationLimits(deletion_cases=4, deletion_steps=2, spacing_cases=2, examples=1, control_train_cases=16)
    doc = evaluate(f"local-dir:{tmp_path / 'model'}", spec, max_cases=8, n_boot=20, batch_size=8, limits=limits,
                   localization_data=annotated)
    el = doc["elements"]
    loc = el["localization"]
    found = loc["details"]["finding_maps"]
    # soft exudates are outlined on 14 of the 27 test photographs; the other types on every one
    assert {n: found[n]["images"] for n in LESION_CONCEPTS} == {"microaneurysms": 27, "haemorrhages": 27,
                                                                 "hard_exudates": 27, "soft_exudates": 14}
    for n in LESION_CONCEPTS:
        assert set(loc[f"evidence_pixel_aupr_{n}"]["controls"]) == {"image processing", "centre prior", "uniform"}
        assert set(loc[f"evidence_pointing_game_{n}"]["controls"]) == {"image processing", "centre prior"}
    physical = el["physical_attribution"]
    assert physical["applicable"] and set(physical["evidence_by_quantity"]) == set(AREA_CONCEPTS)
    assert physical["details"]["ex_area_dd2"]["n"] == 27 and physical["details"]["se_area_dd2"]["n"] == 14
    # the graded photographs carry no concept: nothing to correct, nothing to score a concept against
    assert not el["actionability"]["applicable"] and "no ground truth" in el["actionability"]["reason"]
    assert not el["visual_recognizability"]["applicable"]


def test_a_measurement_bottleneck_is_evaluated_against_the_masks_and_the_fovea(tmp_path: Path) -> None:
    from mlmi_zoo.evaluation.evaluate import EvaluationLimits, evaluate
    from mlmi_zoo.registry import create_model

    torch.manual_seed(0)
    shape = returned_shape(SIZE)
    spacing = tuple(1.0 / d for d in grading("test", prepare=False).dd_px_yx)
    model = create_model("measurement_resnet18", img_size=shape, spacing=spacing, hidden=4).eval()
    spec = DataSpec("idrid", {"root": str(DATA), "dataset": "macula", "size": SIZE})
    model.save_pretrained(tmp_path / "model", extra={"data": describe(spec)})
    annotated = {"kind": "idrid", "params": {"root": str(DATA), "dataset": "segmentation", "size": SIZE, "union": "EX"}}
    limits = EvaluationLimits(deletion_cases=4, deletion_steps=2, spacing_cases=2, examples=1, control_train_cases=16)
    doc = evaluate(f"local-dir:{tmp_path / 'model'}", spec, max_cases=8, n_boot=20, batch_size=8, limits=limits,
                   localization_data=annotated)
    el = doc["elements"]
    assert doc["n_cases"] == 8 and el["localization"]["details"]["annotated_data"]["cases"] == 27
    aupr = el["localization"]["details"]["pixel_aupr"]
    assert aupr["images"] == 27 - 0 and set(aupr["evidence"]["controls"]) == {"bright pixels",
                                                                              "uniform (the mask's prevalence)"}
    physical = el["physical_attribution"]
    assert physical["details"]["landmark"]["cases"] == 8 and "training-mean position" in physical["evidence"]["controls"]
    assert physical["details"]["ex_area"]["n"] == aupr["images"]
    # the transparency check is exact, and the landmark correction scores the same cases
    assert doc["verdicts"]["transparency"]["status"] == "demonstrated"
    assert el["actionability"]["evidence"]["n_cases"] == 8
