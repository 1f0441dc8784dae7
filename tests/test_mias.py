"""mini-MIAS (Suckling et al. 1994): parsing, splits by woman, orientation, circles, breast mask, cache, tiles.

Runs on the real films in ``$MLMI_ZOO_DATA/mias`` (conftest.py points it at ../shared/data) at 1.6 mm
pixels, with the cache in a temporary folder; skipped when the folder is absent.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mlmi_zoo.training.data_spec import DataSpec, build_dataset, describe
from mlmi_zoo.training.datasets._location import DATA_ENV_VAR, DataNotFoundError
from mlmi_zoo.training.datasets.catalog import source_for
from mlmi_zoo.training.datasets.mias import (FILM_PIXEL_MM, MIAS, OFF_TISSUE_CIRCLES, SPACINGS_MM, breast_tiles,
                                             check_spacing, circle_mask, parse_info, split_of_woman)

DATA = Path(os.environ[DATA_ENV_VAR])  # exported by conftest.py
INFO = DATA / "mias" / "Info.txt"
pytestmark = [pytest.mark.data,
              pytest.mark.skipif(not INFO.is_file(), reason=f"the mini-MIAS folder is absent: no {INFO} "
                                                            f"(set ${DATA_ENV_VAR})")]
FAST = 1.6  # mm: 128 x 128 images
CENTRELESS = ("mdb059", "mdb216", "mdb233", "mdb245")
# sha256 of the published split (woman -> split, JSON with sorted keys): changing the rule must be deliberate
SPLIT_SHA256 = "23ad771c8f35148bcc91f6df04e481f08b7c4ad1be6d02298713873775f67485"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory):
    """The zoo's cache folder for this module: a temporary one."""
    folder = tmp_path_factory.mktemp("zoo_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLMI_ZOO_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def every(cache: Path) -> MIAS:
    """All 322 films at 1.6 mm, cache built."""
    ds = MIAS(DATA, split="all", spacing_mm=FAST)
    ds.build_cache()
    return ds


@pytest.fixture(scope="module")
def samples(every: MIAS) -> dict[str, dict]:
    return {every.records[i].name: every[i] for i in range(len(every))}


def _records():
    return parse_info(INFO)


# ------------------------------------------------------------------------------------------------
# Info.txt
# ------------------------------------------------------------------------------------------------
def test_info_has_322_images_of_161_women_and_the_published_counts():
    records = _records()
    assert len(records) == 322 and [r.number for r in records] == list(range(1, 323))
    rows = [a for r in records for a in r.abnormalities]
    assert len(rows) + sum(not r.abnormal for r in records) == 330
    women = {}
    for r in records:
        women.setdefault(r.woman, []).append(r.number)
    assert len(women) == 161 and all(v == [2 * w - 1, 2 * w] for w, v in women.items())
    counts = {k: sum(a.kind == k for a in rows) for k in ("CALC", "CIRC", "ARCH", "SPIC", "MISC", "ASYM")}
    assert counts == {"CALC": 30, "CIRC": 25, "ARCH": 19, "SPIC": 19, "MISC": 15, "ASYM": 15}
    assert sum(not r.abnormal for r in records) == 207
    assert (sum(a.severity == "B" for a in rows), sum(a.severity == "M" for a in rows)) == (69, 54)
    assert sum(a.has_centre for a in rows) == 119
    assert tuple(r.name for r in records if r.abnormal and not r.has_centre) == CENTRELESS
    assert all(records[2 * w - 2].tissue == records[2 * w - 1].tissue for w in women)  # one woman, one tissue
    radii = [a.radius_mm for a in rows if a.radius_mm is not None]
    assert min(radii) == pytest.approx(0.6) and max(radii) == pytest.approx(39.4)


def test_info_rows_become_mm_with_the_y_origin_at_the_bottom():
    mdb001 = _records()[0].abnormalities[0]  # "mdb001 G CIRC B 535 425 197"
    assert (mdb001.x_px, mdb001.y_px, mdb001.radius_px) == (535, 425, 197)
    assert mdb001.centre_mm == pytest.approx(((1024 - 425 + 0.5) * 0.2, (535 + 0.5) * 0.2))
    assert mdb001.radius_mm == pytest.approx(197 * 0.2)
    mdb005 = _records()[4]
    assert len(mdb005.abnormalities) == 2 and mdb005.has_centre and mdb005.chest_wall_right
    # an odd film is flipped left-right: its circles are mirrored about the 204.8 mm field's centre
    (row, col, radius), = _records()[0].circles_mm()
    assert col == pytest.approx(1024 * 0.2 - (535 + 0.5) * 0.2) and radius == pytest.approx(39.4)


def test_malformed_info_is_refused_naming_the_line(tmp_path: Path):
    lines = INFO.read_text().splitlines()
    bad = tmp_path / "Info.txt"
    at = next(i for i, line in enumerate(lines) if line.startswith("mdb003"))
    bad.write_text("\n".join(lines[:at] + ["mdb003 X NORM"] + lines[at + 1:]))
    with pytest.raises(ValueError, match=rf"line {at + 1}.*tissue.*mdb003 X NORM"):
        parse_info(bad)
    bad.write_text("\n".join(lines[:at] + ["mdb003 D CIRC B 12 abc 4"] + lines[at + 1:]))
    with pytest.raises(ValueError, match="three whole numbers"):
        parse_info(bad)
    bad.write_text("\n".join(line for line in lines if not line.startswith("mdb100 ")))
    with pytest.raises(ValueError, match="missing.*mdb100"):
        parse_info(bad)


# ------------------------------------------------------------------------------------------------
# splits
# ------------------------------------------------------------------------------------------------
def test_splits_by_woman_sizes_and_balance(cache: Path, capsys: pytest.CaptureFixture[str]):
    splits = {s: MIAS(DATA, split=s, spacing_mm=FAST) for s in ("train", "val", "test")}
    tables = {s: ds.split_table() for s, ds in splits.items()}
    women = {s: {r.woman for r in ds.records} for s, ds in splits.items()}
    assert not (women["train"] & women["val"] or women["train"] & women["test"] or women["val"] & women["test"])
    assert sum(len(w) for w in women.values()) == 161 and sum(t["images"] for t in tables.values()) == 322
    assert all(t["images"] == 2 * t["women"] for t in tables.values())  # both breasts of a woman together
    assert 92 <= tables["train"]["women"] <= 102 and all(29 <= tables[s]["women"] <= 35 for s in ("val", "test"))
    total = {k: sum(t[k] for t in tables.values()) for k in ("images", "abnormal", "malignant")}
    for t in tables.values():  # stratified by the woman's worst finding: each split near the overall shares
        for k in ("abnormal", "malignant"):
            assert abs(t[k] / t["images"] - total[k] / total["images"]) < 0.06, (k, tables)
    with capsys.disabled():
        print("\nmini-MIAS split: women / images / abnormal / malignant / with circles")
        for s, t in tables.items():
            print(f"  {s:5s} {t['women']:4d} {t['images']:6d} {t['abnormal']:8d} {t['malignant']:9d} {t['with_centre']:6d}")
    published = json.dumps({str(w): s for w, s in sorted(split_of_woman(_records()).items())}, sort_keys=True)
    assert hashlib.sha256(published.encode()).hexdigest() == SPLIT_SHA256


def test_cv_folds_partition_the_training_women_only(cache: Path):
    train = MIAS(DATA, split="train", spacing_mm=FAST)
    test_women = {r.woman for r in MIAS(DATA, split="test", spacing_mm=FAST).records}
    folds = train.cv_folds(5)
    held = [i for _, h in folds for i in h]
    assert sorted(held) == list(range(len(train)))  # every training image held out exactly once
    for fit, held_out in folds:
        assert sorted(fit + held_out) == list(range(len(train)))
        fit_women = {train.records[i].woman for i in fit}
        held_women = {train.records[i].woman for i in held_out}
        assert not fit_women & held_women and not (fit_women | held_women) & test_women
        assert 0 < sum(train.records[i].malignant for i in held_out)  # every fold sees malignant women
    assert [len(h) for _, h in folds] == [len(h) for _, h in train.cv_folds(5)]
    with pytest.raises(ValueError, match="training women only"):
        MIAS(DATA, split="val", spacing_mm=FAST).cv_folds(5)
    with pytest.raises(ValueError, match="k must be"):
        train.cv_folds(1)


# ------------------------------------------------------------------------------------------------
# samples
# ------------------------------------------------------------------------------------------------
def test_samples_labels_and_the_four_centreless_images(every: MIAS, samples: dict[str, dict]):
    assert len(every) == 322
    s = samples["mdb001"]
    assert s["image"].shape == (1, 128, 128) and s["image"].dtype == torch.float32
    assert 0.0 <= float(s["image"].min()) and float(s["image"].max()) <= 1.0
    assert s["mask"].shape == (1, 128, 128) and s["mask"].dtype == torch.bool
    assert s["breast"].shape == (128, 128) and s["breast"].dtype == torch.bool
    assert torch.equal(s["spacing"], torch.tensor([FAST, FAST]))
    assert (int(s["label"]), s["patient_id"], s["index"], s["has_centre"]) == (1, "mias-w001", 0, True)
    assert float(s["measurements"]["radius_mm"]) == pytest.approx(39.4)
    assert float(s["measurements"]["diameter_mm"]) == pytest.approx(78.8)  # the circle's diameter, for size heads
    assert int(s["concepts"]["abnormality"]) == 2 and int(s["concepts"]["tissue"]) == 1  # CIRC, G
    for name, sample in samples.items():
        record = every.records[sample["index"]]
        assert record.name == name and int(sample["label"]) == int(record.abnormal)
        assert bool(sample["mask"].any()) == record.has_centre == sample["has_centre"]
        assert math.isnan(float(sample["measurements"]["radius_mm"])) != record.has_centre
    assert [n for n, sample in samples.items() if sample["abnormal"] and not sample["has_centre"]] == list(CENTRELESS)
    severity = MIAS(DATA, split="all", spacing_mm=FAST, task="severity")
    assert len(severity) == 115 and severity.label_names == ("benign", "malignant")
    assert sum(severity.label_of(r) for r in severity.records) == sum(r.malignant for r in severity.records) > 0
    with pytest.raises(ValueError, match="task must be one of"):
        MIAS(DATA, task="birads")


def _disc_and_ring_contrast(image: np.ndarray, spacing: float, circle: tuple[float, float, float]) -> float:
    """Mean grey level in the disc minus the mean in the ring out to twice its radius."""
    disc = circle_mask(image.shape, spacing, [circle])
    ring = circle_mask(image.shape, spacing, [(circle[0], circle[1], 2 * circle[2])]) & ~disc
    return float(image[disc].mean() - image[ring].mean())


def test_circles_sit_on_the_lesions_only_with_the_y_flip(every: MIAS, samples: dict[str, dict],
                                                         capsys: pytest.CaptureFixture[str]):
    flipped, unflipped = [], []
    for record in every.records:
        image = samples[record.name]["image"][0].numpy() * 255.0
        for a, circle in zip([a for a in record.abnormalities if a.has_centre], record.circles_mm()):
            assert a.y_px is not None
            flipped.append(_disc_and_ring_contrast(image, FAST, circle))
            # the same circle read with the origin at the top (row = y): the wrong reading
            unflipped.append(_disc_and_ring_contrast(image, FAST, ((a.y_px + 0.5) * FILM_PIXEL_MM, *circle[1:])))
    flipped_a, unflipped_a = np.array(flipped), np.array(unflipped)
    with capsys.disabled():
        print(f"\ncircle - ring contrast (grey levels, {len(flipped)} circles at {FAST} mm): row = 1024 - y median "
              f"{np.median(flipped_a):+.1f}, positive {np.mean(flipped_a > 0):.1%}; row = y median "
              f"{np.median(unflipped_a):+.1f}, positive {np.mean(unflipped_a > 0):.1%}")
    assert len(flipped) == 119
    assert np.median(flipped_a) > 10.0 and np.mean(flipped_a > 0) >= 0.9
    assert np.median(flipped_a) > np.median(unflipped_a) + 5.0 and np.mean(flipped_a > 0) > np.mean(unflipped_a > 0)


def _left_band_brighter(image: np.ndarray, breast: np.ndarray, band: float = 0.1) -> bool:
    """Within the breast, the band of its leftmost columns (10% of its width) is brighter than the rightmost."""
    cols = np.flatnonzero(breast.any(axis=0))
    c0, c1 = int(cols[0]), int(cols[-1]) + 1
    q = max(1, round((c1 - c0) * band))
    left, right = image[:, c0:c0 + q][breast[:, c0:c0 + q]], image[:, c1 - q:c1][breast[:, c1 - q:c1]]
    return float(left.mean()) > float(right.mean())


def test_chest_wall_is_on_the_left_after_orientation(every: MIAS, samples: dict[str, dict],
                                                    capsys: pytest.CaptureFixture[str]):
    # Two signs of the chest wall: the breast's edge band there is brighter (pectoral muscle, thick
    # tissue) than the nipple side's skin line, and the breast is tallest there (it narrows to the
    # nipple). Both are measured on the breast mask; "stored" undoes the flip of the odd films.
    oriented, stored, tallest_left = [], [], []
    for record in every.records:
        s = samples[record.name]
        image, breast = s["image"][0].numpy(), s["breast"].numpy()
        oriented.append(_left_band_brighter(image, breast))
        flip = (lambda a: a[:, ::-1]) if record.chest_wall_right else (lambda a: a)
        stored.append(_left_band_brighter(flip(image), flip(breast)))
        cols = np.flatnonzero(breast.any(axis=0))
        tallest_left.append(int(breast.sum(axis=0).argmax()) < (cols[0] + cols[-1] + 1) / 2)
    with capsys.disabled():
        print(f"\nbrighter edge band on the left: oriented {np.mean(oriented):.1%}, as stored {np.mean(stored):.1%}; "
              f"tallest breast column in the left half: {np.mean(tallest_left):.1%}")
    assert np.mean(oriented) >= 0.95 and np.mean(tallest_left) >= 0.95
    assert np.mean(stored) <= 0.6  # as stored, half the films have the chest wall on the right


def test_breast_mask_covers_the_circle_centres_and_leaves_labels_out(every: MIAS, samples: dict[str, dict]):
    outside = []
    for record in every.records:
        breast = samples[record.name]["breast"].numpy()
        assert 0.1 < breast.mean() < 0.95, record.name
        for row, col, _ in record.circles_mm():
            if not breast[int(row // FAST), int(col // FAST)]:
                outside.append(record.name)
    assert sorted(outside) == sorted(OFF_TISSUE_CIRCLES)
    # the film label "JM" of mdb006 touches the breast at the top edge (film rows 0-110, columns 630-720)
    label = samples["mdb006"]["image"][0, :14, 79:90]
    assert float(label.mean()) > 0.8 and not samples["mdb006"]["breast"][:14, 81:88].any()
    # the scanner's grey band along the top of mdb283 is not joined to the breast
    band = samples["mdb283"]["breast"][:3]
    assert float(band.float().mean()) < 0.5


# ------------------------------------------------------------------------------------------------
# pixel size
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", SPACINGS_MM)
def test_radius_in_mm_is_radius_px_times_0_2_at_every_spacing(cache: Path, spacing: float):
    ds = MIAS(DATA, split="all", spacing_mm=spacing)
    for name in ("mdb028", "mdb184", "mdb211"):  # radius 56, 114 and 13 film pixels, one circle each
        i = next(i for i, r in enumerate(ds.records) if r.name == name)
        (a,), s = ds.records[i].abnormalities, ds[i]
        assert a.radius_px is not None
        assert s["image"].shape[-1] == round(1024 * 0.2 / spacing)
        assert float(s["measurements"]["radius_mm"]) == pytest.approx(a.radius_px * 0.2, abs=1e-5)
        # the rasterised disc has the radius in mm within one returned pixel
        equivalent_radius = math.sqrt(float(s["mask"].sum()) * spacing ** 2 / math.pi)
        assert abs(equivalent_radius - a.radius_px * 0.2) <= spacing, (name, spacing, equivalent_radius)


def test_the_same_circle_has_the_same_mm_radius_at_0_4_and_0_8(cache: Path):
    radii = {}
    for spacing in (0.4, 0.8):
        ds = MIAS(DATA, split="all", spacing_mm=spacing)
        i = next(i for i, r in enumerate(ds.records) if r.name == "mdb028")
        s = ds[i]
        radii[spacing] = (float(s["measurements"]["radius_mm"]), math.sqrt(float(s["mask"].sum()) * spacing ** 2 / math.pi))
    assert radii[0.4][0] == radii[0.8][0] == pytest.approx(56 * 0.2)
    assert radii[0.4][1] == pytest.approx(radii[0.8][1], abs=0.4)


def test_bad_spacing_is_refused_clearly(cache: Path):
    for bad in (0.5, 0.0, -0.8, 3.2, "0.8", True, float("nan")):
        with pytest.raises(ValueError, match=r"spacing_mm must be one of \(0.2, 0.4, 0.8, 1.6\)"):
            MIAS(DATA, spacing_mm=bad)  # type: ignore[arg-type]
    assert check_spacing(0.8000000001) == 0.8


def test_missing_data_folder_names_the_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(DataNotFoundError, match=DATA_ENV_VAR) as err:
        MIAS(tmp_path / "absent")
    assert "absent" in str(err.value) and "mias/Info.txt" in str(err.value)
    monkeypatch.delenv(DATA_ENV_VAR)
    with pytest.raises(DataNotFoundError, match=DATA_ENV_VAR):
        MIAS()


# ------------------------------------------------------------------------------------------------
# cache
# ------------------------------------------------------------------------------------------------
def test_cache_lives_in_the_cache_folder_and_a_damaged_entry_is_rebuilt(every: MIAS, cache: Path,
                                                                        samples: dict[str, dict]):
    folder = cache / "mias" / f"{FAST:g}mm"
    files = sorted(p.name for p in folder.iterdir())
    assert files == sorted(f"{r.name}.npz" for r in every.records)  # no temporary file left behind
    assert not any(p.suffix == ".npz" for p in (DATA / "mias").rglob("*"))  # nothing written into the data
    assert every.build_cache() == 0
    (folder / "mdb002.npz").write_bytes(b"not a zip")
    again = every[1]
    assert torch.equal(again["image"], samples["mdb002"]["image"]) and torch.equal(again["breast"], samples["mdb002"]["breast"])
    with np.load(folder / "mdb002.npz", allow_pickle=False) as z:
        assert np.array_equal(z["image"], samples["mdb002"]["image"][0].numpy())


# ------------------------------------------------------------------------------------------------
# tiles
# ------------------------------------------------------------------------------------------------
def test_breast_tiles_boxes_images_and_instance_truth(samples: dict[str, dict]):
    s = samples["mdb184"]
    tiles = breast_tiles(s, tile_mm=16.0)
    assert tiles.tile_px == 10 and tiles.stride_px == 10 and tiles.tile_mm == pytest.approx(16.0)
    n = tiles.boxes.shape[0]
    assert n > 0 and tiles.images.shape == (n, 1, 10, 10) and tiles.instance_truth.shape == (n,)
    lesion, breast = s["mask"][0], s["breast"]
    for (r0, c0, r1, c1), tile, truth, frac in zip(tiles.boxes.tolist(), tiles.images, tiles.instance_truth,
                                                   tiles.breast_fraction):
        assert torch.equal(tile, s["image"][:, r0:r1, c0:c1])
        assert float(frac) == pytest.approx(float(breast[r0:r1, c0:c1].float().mean())) and float(frac) >= 0.5
        assert float(truth) == float(lesion[r0:r1, c0:c1].any())
    pixel_mm2 = float(s["spacing"][0]) ** 2
    for (r0, c0, r1, c1), area in zip(tiles.boxes.tolist(), tiles.lesion_area_mm2):  # the disc pixels inside, in mm²
        assert float(area) == pytest.approx(float(lesion[r0:r1, c0:c1].sum()) * pixel_mm2, rel=1e-5)
    assert 0 < int(tiles.instance_truth.sum()) < n
    # overlapping tiles, all kept: the whole grid, and the positive tiles cover every lesion pixel of its area
    overlap = breast_tiles(s, tile_mm=16.0, stride_mm=8.0, min_breast_fraction=0.0)
    assert overlap.stride_px == 5 and overlap.boxes.shape[0] == ((128 - 10) // 5 + 1) ** 2
    covered = torch.zeros_like(lesion)
    for r0, c0, r1, c1 in overlap.boxes[overlap.instance_truth == 1].tolist():
        covered[r0:r1, c0:c1] = True
    reach = int(overlap.boxes[:, 2].max())
    assert bool(lesion[:reach, :reach].any()) and bool(covered[:reach, :reach][lesion[:reach, :reach]].all())
    assert torch.isnan(breast_tiles(samples["mdb059"], 16.0).instance_truth).all()  # abnormal, no circle
    assert torch.isnan(breast_tiles(samples["mdb059"], 16.0).lesion_area_mm2).all()
    assert (breast_tiles(samples["mdb003"], 16.0).lesion_area_mm2 == 0).all()
    assert (breast_tiles(samples["mdb003"], 16.0).instance_truth == 0).all()  # normal
    with pytest.raises(ValueError, match="tile_mm"):
        breast_tiles(s, tile_mm=0.5)
    with pytest.raises(ValueError, match="larger than"):
        breast_tiles(s, tile_mm=300.0)
    with pytest.raises(ValueError, match="min_breast_fraction"):
        breast_tiles(s, 16.0, min_breast_fraction=1.5)
    with pytest.raises(ValueError, match="lacks"):
        breast_tiles({"image": s["image"]}, 16.0)


# ------------------------------------------------------------------------------------------------
# data spec and catalog
# ------------------------------------------------------------------------------------------------
def test_data_spec_builds_and_describes_the_split(every: MIAS):
    spec = DataSpec("mias", {"root": str(DATA), "spacing_mm": FAST}, val_size=5)
    train, val = build_dataset(spec, "train"), build_dataset(spec, "val")
    assert len(train) == MIAS(DATA, split="train", spacing_mm=FAST).split_table()["images"] and len(val) == 5
    assert train[0]["image"].shape == (1, 128, 128)
    record = describe(spec)
    women = [set(record["splits"][s]["women"]) for s in ("train", "val", "test")]
    assert not (women[0] & women[1] or women[0] & women[2] or women[1] & women[2])
    assert record["splits"]["val"]["size"] == 5 and len(record["splits"]["val"]["images"]) == 5
    assert record["splits"]["test"]["films"]["num_files"] == record["splits"]["test"]["size"]
    info_sha = hashlib.sha256(INFO.read_bytes()).hexdigest()
    assert record["source"]["Info.txt"]["sha256"] == info_sha
    source = source_for({"kind": "mias", "params": {}})
    assert source.license == "research-use-only" and source.has_spacing
    assert "Suckling" in source.bibtex[0] and "1994" in source.bibtex[0]


def test_render_gives_the_same_film_at_another_spacing(every: MIAS, samples: dict[str, dict]) -> None:
    i = 183  # the case's "index": mdb184
    coarse = every.render(i, [FAST, FAST])
    assert torch.equal(coarse["image"], samples["mdb184"]["image"])
    fine = every.render(i, [0.8, 0.8])
    assert fine["name"] == "mdb184" and fine["image"].shape == (1, 256, 256)
    assert torch.allclose(fine["spacing"], torch.tensor([0.8, 0.8]))
    assert float(fine["measurements"]["radius_mm"]) == float(samples["mdb184"]["measurements"]["radius_mm"])
    # the same film: 2 x 2 averaged, the fine one is the coarse one (up to 8-bit rounding of each level)
    pooled = torch.nn.functional.avg_pool2d(fine["image"][None], 2)[0]
    assert (pooled - coarse["image"]).abs().mean() < 0.01
    assert MIAS.spacing_range[0] < MIAS.spacing_range[1]
    with pytest.raises(ValueError):
        every.render(i, [0.8, 0.4])
    with pytest.raises(ValueError):
        every.render(i, [0.3, 0.3])
    with pytest.raises(ValueError, match="mdb010"):  # a test film is not in the training split
        MIAS(DATA, split="train", spacing_mm=FAST).render(9, [FAST, FAST])
