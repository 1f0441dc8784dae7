"""Real-data loaders: MedMNIST files, DICOM/NIfTI with spacing, resampling, slide tiles, user CSVs."""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mlmi_zoo.training.datasets.medmnist import MedMNIST, file_md5

DATA = Path(os.environ["MLMI_ZOO_DATA"])  # exported by conftest.py
needs_data = pytest.mark.skipif(not (DATA / "pneumoniamnist.npz").is_file(),
                                reason=f"the MedMNIST files are absent from {DATA} ($MLMI_ZOO_DATA)")


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _fake_npz(path: Path, drop: str | None = None, n: int = 6) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8)[:, None]
    if drop:
        del arrays[drop]
    np.savez_compressed(path, **arrays)
    return path


# ------------------------------------------------------------------------------------------------
# MedMNIST
# ------------------------------------------------------------------------------------------------
@pytest.mark.data
@needs_data
def test_pneumoniamnist_splits_shapes_and_counts():
    sizes = {"train": 4708, "val": 524, "test": 624}
    for split, n in sizes.items():
        ds = MedMNIST(DATA, flag="pneumoniamnist", split=split)
        assert len(ds) == n
    ds = MedMNIST(DATA / "pneumoniamnist.npz", split="train")
    assert ds.label_counts() == {"normal": 1214, "pneumonia": 3494}
    assert (ds.task, ds.in_channels, ds.spatial_dims, ds.spacing) == ("binary-class", 1, 2, None)
    s = ds[3]
    assert s["image"].shape == (1, 28, 28) and s["image"].dtype == torch.float32
    assert 0.0 <= float(s["image"].min()) and float(s["image"].max()) <= 1.0
    # exact scaling: stored uint8 / 255
    with np.load(DATA / "pneumoniamnist.npz") as npz:
        raw = npz["train_images"][3]
        assert int(npz["train_labels"][3, 0]) == int(s["label"])
    assert torch.equal(s["image"][0], torch.from_numpy(raw).float() / 255)
    assert s["label"].dtype == torch.int64 and s["label"].ndim == 0
    assert "spacing" not in s  # resized images carry no physical pixel size


@pytest.mark.data
@needs_data
def test_adrenalmnist3d_volumes_and_counts():
    ds = MedMNIST(DATA, flag="adrenalmnist3d", split="train")
    assert len(ds) == 1188 and ds.spatial_dims == 3 and ds.in_channels == 1
    assert ds.label_counts() == {"normal": 929, "hyperplasia": 259}
    assert ds[0]["image"].shape == (1, 28, 28, 28)
    assert [len(MedMNIST(DATA, flag="adrenalmnist3d", split=s)) for s in ("val", "test")] == [98, 298]
    big = MedMNIST(DATA, flag="adrenalmnist3d", split="val", size=64)
    assert len(big) == 98 and big[0]["image"].shape == (1, 64, 64, 64)
    retina = MedMNIST(DATA, flag="retinamnist", split="test")
    assert retina[0]["image"].shape == (3, 28, 28) and retina.task == "ordinal-regression"


@pytest.mark.data
@needs_data
def test_flipped_byte_is_refused_naming_file_and_both_md5s(tmp_path):
    copy = tmp_path / "pneumoniamnist.npz"
    data = bytearray((DATA / "pneumoniamnist.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(ValueError) as err:
        MedMNIST(copy)
    msg = str(err.value)
    assert str(copy) in msg and "28209eda62fecd6e6a2d98b1501bb15f" in msg and _md5(copy) in msg


@pytest.mark.data
@needs_data
def test_truncated_file_is_refused(tmp_path):
    copy = tmp_path / "pneumoniamnist.npz"
    copy.write_bytes((DATA / "pneumoniamnist.npz").read_bytes()[:100_000])
    with pytest.raises(ValueError, match="MD5 mismatch"):
        MedMNIST(copy)
    with pytest.raises(ValueError, match="truncated or corrupt") as err:  # unverified: the zip reader refuses it
        MedMNIST(copy, verify=False)
    assert str(copy) in str(err.value)


def test_missing_split_key_is_named(tmp_path):
    path = _fake_npz(tmp_path / "mymnist.npz", drop="test_images")
    with pytest.raises(ValueError, match="test_images") as err:
        MedMNIST(path, split="train", verify=False)
    assert str(path) in str(err.value)


def test_unknown_file_needs_explicit_md5_or_verify_false(tmp_path):
    path = _fake_npz(tmp_path / "mymnist.npz")
    with pytest.raises(ValueError, match="verify=False"):
        MedMNIST(path)
    ds = MedMNIST(path, split="val", verify=_md5(path))
    assert len(ds) == 6 and ds.label_names == ("0", "1") and ds[1]["label"].item() == 1
    with pytest.raises(ValueError, match="MD5 mismatch"):
        MedMNIST(path, verify="0" * 32)


def test_md5_cache_follows_file_changes(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"first")
    assert file_md5(path) == hashlib.md5(b"first").hexdigest()
    path.write_bytes(b"second!")
    os.utime(path, ns=(1, 1))  # a different mtime and size: the cached digest must not be reused
    assert file_md5(path) == hashlib.md5(b"second!").hexdigest()


def test_directory_resolution_env_var_and_no_download(tmp_path, monkeypatch):
    _fake_npz(tmp_path / "mymnist.npz")
    monkeypatch.setenv("MLMI_ZOO_DATA", str(tmp_path))
    assert len(MedMNIST(flag="mymnist", split="test", verify=False)) == 6
    with pytest.raises(FileNotFoundError, match="never downloads"):
        MedMNIST(flag="othermnist", verify=False)


def test_data_location_argument_then_env_then_error_naming_both(tmp_path, monkeypatch):
    from mlmi_zoo.training.datasets._location import DataNotFoundError, data_root
    from mlmi_zoo.training.datasets.lidc_index import resolve_lidc_path

    arg, env = tmp_path / "arg", tmp_path / "env"
    for folder in (arg, env):
        folder.mkdir()
        _fake_npz(folder / "mymnist.npz")
        (folder / "lidc_idri_annotations.sqlite").write_bytes(b"")  # only its place is resolved here
    monkeypatch.setenv("MLMI_ZOO_DATA", str(env))
    # 1. an explicit argument wins over the environment
    assert data_root(arg, file="x", argument="root") == arg
    assert MedMNIST(arg, flag="mymnist", verify=False).path == arg / "mymnist.npz"
    assert resolve_lidc_path(arg) == (arg / "lidc_idri_annotations.sqlite").resolve()
    # 2. else $MLMI_ZOO_DATA
    assert MedMNIST(flag="mymnist", verify=False).path == env / "mymnist.npz"
    assert resolve_lidc_path() == (env / "lidc_idri_annotations.sqlite").resolve()
    # a folder without the file: the error names the path looked at
    with pytest.raises(DataNotFoundError, match="looked for") as err:
        MedMNIST(flag="othermnist", verify=False)
    assert str(env / "othermnist.npz") in str(err.value)
    # 3. else an error that names the file, the argument and the variable
    monkeypatch.delenv("MLMI_ZOO_DATA")
    for build, file, argument in ((lambda: MedMNIST(flag="mymnist", verify=False), "mymnist.npz", "path_or_dir="),
                                  (resolve_lidc_path, "lidc_idri_annotations.sqlite", "lidc_path=")):
        with pytest.raises(FileNotFoundError) as err:
            build()
        msg = str(err.value)
        assert isinstance(err.value, DataNotFoundError)
        assert file in msg and argument in msg and "export MLMI_ZOO_DATA=/path/to/data" in msg


# ------------------------------------------------------------------------------------------------
# DICOM / NIfTI
# ------------------------------------------------------------------------------------------------
pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")
from mlmi_zoo.training.datasets.medical_io import load_image, resample_to_spacing  # noqa: E402


@pytest.fixture(scope="module")
def ct_small() -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    if path is None:
        pytest.skip("pydicom test file CT_small.dcm not available")
    return Path(path)


def test_dicom_spacing_and_hounsfield_units(ct_small):
    ds = pydicom.dcmread(ct_small)
    img = load_image(ct_small)
    # array axes (columns, rows): spacing[0] is the column spacing = PixelSpacing[1]
    assert img.spacing == pytest.approx((float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0])), abs=1e-9)
    assert img.meta["slice_thickness_mm"] == float(ds.SliceThickness)
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    assert intercept != 0  # the file really needs the rescale
    hu = ds.pixel_array.astype(np.float64) * slope + intercept
    assert img.array.shape == (1, 128, 128) and img.array.dtype == np.float32
    np.testing.assert_array_equal(img.array[0], hu.T.astype(np.float32))
    assert (img.meta["rescale_slope"], img.meta["rescale_intercept"]) == (slope, intercept)


def test_dicom_series_folder_gets_slice_spacing(ct_small, tmp_path):
    for i in range(3):
        ds = pydicom.dcmread(ct_small)
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [*map(float, ds.ImagePositionPatient[:2]), float(ds.ImagePositionPatient[2]) + 2.5 * i]
        ds.save_as(tmp_path / f"slice{i}.dcm")
    img = load_image(tmp_path)
    ps = float(pydicom.dcmread(ct_small).PixelSpacing[0])
    assert img.array.shape == (1, 128, 128, 3)
    assert img.spacing == pytest.approx((ps, ps, 2.5), abs=1e-6)


def test_nifti_spacing_equals_header_zooms(tmp_path):
    data = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    affine[:3, 3] = (-12.0, 4.0, 30.0)
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "vol.nii.gz")
    img = load_image(tmp_path / "vol.nii.gz")
    zooms = nib.load(tmp_path / "vol.nii.gz").header.get_zooms()
    assert img.spacing == pytest.approx(tuple(float(z) for z in zooms), abs=1e-6)
    assert img.spacing == pytest.approx((0.7, 0.7, 2.5), abs=1e-6)
    assert img.orientation == "RAS"
    np.testing.assert_array_equal(img.array[0], data)
    flipped = np.diag([-0.7, 0.7, 2.5, 1.0])
    nib.save(nib.Nifti1Image(data, flipped), tmp_path / "las.nii")
    las = load_image(tmp_path / "las.nii")
    assert las.orientation == "LAS" and las.spacing == pytest.approx((0.7, 0.7, 2.5), abs=1e-6)


@pytest.mark.parametrize("name", ["anatomical.nii", "standard.nii.gz"])
def test_nibabel_shipped_files(name):
    from nibabel.testing import data_path

    path = Path(data_path) / name
    if not path.is_file():
        pytest.skip(f"{name} not shipped with this nibabel")
    img = load_image(path)
    zooms = nib.load(path).header.get_zooms()[:3]
    assert img.spacing == pytest.approx(tuple(float(z) for z in zooms), abs=1e-5)
    assert img.array.shape[1:] == nib.load(path).shape[:3]


def test_load_image_refusals(ct_small, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.nii"):
        load_image(tmp_path / "nope.nii")
    (tmp_path / "x.png").write_bytes(b"\x89PNG")
    with pytest.raises(ValueError, match="unsupported"):
        load_image(tmp_path / "x.png")
    ds = pydicom.dcmread(ct_small)
    ds.PixelSpacing = [0.0, 0.661468]
    ds.save_as(tmp_path / "zero.dcm")
    with pytest.raises(ValueError, match="positive"):
        load_image(tmp_path / "zero.dcm")


def _disc(diameter_mm: float, spacing_mm: float, fov_mm: float = 32.0, supersample: int = 8) -> torch.Tensor:
    """A centred disc with partial-volume edges (area-weighted by supersampling)."""
    n = int(round(fov_mm / spacing_mm))
    sub = (np.arange(n * supersample) + 0.5) / supersample * spacing_mm - fov_mm / 2
    yy, xx = np.meshgrid(sub, sub, indexing="ij")
    inside = (yy**2 + xx**2 <= (diameter_mm / 2) ** 2).astype(np.float32)
    img = inside.reshape(n, supersample, n, supersample).mean(axis=(1, 3))
    return torch.from_numpy(img)[None]  # (1, H, W)


def test_resample_to_spacing_preserves_physical_size():
    target = 0.75
    diameters = []
    for spacing in (0.5, 1.0):
        out = resample_to_spacing(_disc(20.0, spacing), (spacing, spacing), (target, target))
        assert out.ndim == 3 and out.dtype == torch.float32
        area_mm2 = float((out > 0.5).sum()) * target**2
        diameters.append(2 * math.sqrt(area_mm2 / math.pi))
    assert all(abs(d - 20.0) <= target / 2 for d in diameters), diameters
    assert abs(diameters[0] - diameters[1]) <= target / 2


def test_resample_3d_nearest_keeps_labels_and_refuses_bad_spacing():
    mask = torch.zeros(1, 4, 8, 8)
    mask[0, 1:3, 2:6, 2:6] = 2.0
    out = resample_to_spacing(mask, (2.0, 1.0, 1.0), (1.0, 0.5, 0.5), mode="nearest")
    assert out.shape == (1, 7, 15, 15)
    assert set(out.unique().tolist()) == {0.0, 2.0}
    with pytest.raises(ValueError, match="positive"):
        resample_to_spacing(mask, (2.0, 0.0, 1.0), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        resample_to_spacing(mask, (2.0, 1.0, 1.0), (1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="3 values"):
        resample_to_spacing(mask, (1.0, 1.0), (1.0, 1.0, 1.0))


# ------------------------------------------------------------------------------------------------
# slides
# ------------------------------------------------------------------------------------------------
tifffile = pytest.importorskip("tifffile")
from mlmi_zoo.training.datasets.feature_cache import cache_features, encode_tiles, load_cached_features  # noqa: E402
from mlmi_zoo.training.datasets.slides import CachedBagDataset  # noqa: E402
from mlmi_zoo.training.datasets.tiling import tile_slide  # noqa: E402

H, W, T = 1536, 2048, 256
TISSUE = (slice(300, 1100), slice(500, 1500))


@pytest.fixture(scope="module")
def slide_image() -> np.ndarray:
    img = np.full((H, W, 3), 243, np.uint8)  # white glass
    img[TISSUE] = (205, 110, 175)  # eosin pink
    return img


def _expected_tiles(threshold: float) -> set[tuple[int, int]]:
    mask = np.zeros((H, W), bool)
    mask[TISSUE] = True
    frac = mask.reshape(H // T, T, W // T, T).mean(axis=(1, 3))  # (rows, cols)
    return {(int(r), int(c)) for r, c in zip(*np.nonzero(1 - frac <= threshold))}


@pytest.mark.parametrize("layout", ["uncompressed", "tiled-zlib", "strips-zlib"])
def test_tile_slide_keeps_tissue_with_correct_coordinates(tmp_path, slide_image, layout):
    kw = {"uncompressed": {}, "tiled-zlib": {"tile": (128, 128), "compression": "zlib"},
          "strips-zlib": {"rowsperstrip": 100, "compression": "zlib"}}[layout]
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, slide_image, resolution=(40000.0, 40000.0), resolutionunit="CENTIMETER", **kw)
    ts = tile_slide(path, tile_size=T, background_threshold=0.75)
    kept = {tuple(map(int, rc)) for rc in ts.coords}
    assert kept == _expected_tiles(0.75)
    assert len(kept) == 16 and ts.grid_shape == (6, 8)
    # every tile fully inside the tissue is kept; no all-white tile is kept
    assert {(r, c) for r in (2, 3) for c in (2, 3, 4)} <= kept
    assert (0, 0) not in kept and (5, 7) not in kept
    assert ts.microns_per_pixel == pytest.approx(0.25)  # 40000 px/cm
    tiles = list(ts.iter_tiles())
    for (y, x), tile in zip(ts.pixel_coords, tiles):
        np.testing.assert_array_equal(tile, slide_image[y:y + T, x:x + T])
    mask = np.zeros((H, W), bool)
    mask[TISSUE] = True
    frac = mask.reshape(H // T, T, W // T, T).mean(axis=(1, 3))  # (rows, cols)
    np.testing.assert_allclose(ts.tissue_fraction, frac[ts.coords[:, 0], ts.coords[:, 1]], atol=1e-6)


def test_tile_slide_pyramid_level_scales_microns(tmp_path, slide_image):
    path = tmp_path / "pyr.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(slide_image, subifds=1, tile=(256, 256), resolution=(40000.0, 40000.0), resolutionunit="CENTIMETER")
        tw.write(slide_image[::2, ::2], subfiletype=1, tile=(256, 256))
    ts = tile_slide(path, tile_size=128, level=1)
    assert ts.level_shape == (H // 2, W // 2) and ts.microns_per_pixel == pytest.approx(0.5)
    assert {tuple(map(int, rc)) for rc in ts.coords} == _expected_tiles(0.75)
    with pytest.raises(ValueError, match="level 2"):
        tile_slide(path, level=2)


def test_feature_cache_round_trip_is_exact_in_fp16(tmp_path):
    feats = torch.randn(37, 24) * 10
    coords = torch.randint(0, 500, (37, 2))
    meta = {"encoder": "toy", "tile_size": 256, "microns_per_pixel": 0.5}
    path = cache_features(feats, coords, tmp_path / "slideA", meta)
    assert path.name == "slideA.safetensors"
    back = load_cached_features(path)
    assert back.feats.dtype == torch.float16 and torch.equal(back.feats, feats.half())
    assert back.coords.dtype == torch.int64 and torch.equal(back.coords, coords)
    assert back.meta == meta
    with pytest.raises(ValueError, match="float16"):
        cache_features(torch.full((2, 3), 1e6), torch.zeros(2, 2), tmp_path / "big")
    with pytest.raises(ValueError, match=r"\(37, 2\)"):
        cache_features(feats, coords[:5], tmp_path / "bad")


def test_cached_bag_dataset_and_encode_tiles(tmp_path):
    tiles = [np.full((8, 8, 3), v, np.uint8) for v in range(0, 250, 25)]  # 10 tiles

    class MeanColour(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, T, T) -> (B, 3)
            return x.mean(dim=(2, 3))

    feats = encode_tiles(MeanColour(), iter(tiles), batch_size=3)  # 3 + 3 + 3 + 1
    expected = torch.tensor([[v / 255] * 3 for v in range(0, 250, 25)])
    torch.testing.assert_close(feats, expected)
    cache_features(feats, torch.arange(20).view(10, 2), tmp_path / "s1", {})
    cache_features(feats[:4], torch.zeros(4, 2), tmp_path / "s2", {})
    (tmp_path / "labels.csv").write_text("slide_id,label\ns1,tumour\ns2,normal\ns3,normal\n")
    ds = CachedBagDataset(tmp_path, tmp_path / "labels.csv", label_names=["normal", "tumour"])
    assert len(ds) == 2
    item = ds[0]
    assert item["slide_id"] == "s1" and int(item["label"]) == 1 and item["feats"].shape == (10, 3)
    assert item["feats"].dtype == torch.float32 and torch.equal(item["coords"], torch.arange(20).view(10, 2))
    assert int(ds[1]["label"]) == 0
    with pytest.raises(ValueError, match="s2"):
        CachedBagDataset(tmp_path, {"s1": 1})


# ------------------------------------------------------------------------------------------------
# folder + CSV
# ------------------------------------------------------------------------------------------------
from PIL import Image  # noqa: E402

from mlmi_zoo.training.datasets.folder_csv import FolderCSVDataset  # noqa: E402


@pytest.fixture()
def png_folder(tmp_path) -> Path:
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (12, 10), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    return tmp_path


def test_folder_csv_loads_labels_concepts_measurements_spacing(png_folder):
    csv_text = (
        "image,label,spiculation,diameter_mm,volume_ml,mean_hu,spacing_mm\n"
        "img0.png,malignant,1,12.5,0.9,-650,0.7x0.7\n"
        "img1.png,benign,,4.0,,30,0.5x0.6\n"
        "img2.png,benign,0,6,0.1,-20,\n"
    )
    (png_folder / "cases.csv").write_text(csv_text)
    ds = FolderCSVDataset(
        png_folder / "cases.csv", label_names=["benign", "malignant"], concept_columns=["spiculation"],
        measurement_columns=["diameter_mm", "volume_ml", "mean_hu"], spacing_columns="spacing_mm",
    )
    assert len(ds) == 3
    assert ds.measurement_units == {"diameter_mm": "mm", "volume_ml": "mL", "mean_hu": "HU"}
    s0, s1, s2 = ds[0], ds[1], ds[2]
    expected = np.asarray(Image.open(png_folder / "img0.png"), dtype=np.float32) / 255
    assert s0["image"].shape == (1, 12, 10)
    np.testing.assert_array_equal(s0["image"][0].numpy(), expected)
    assert int(s0["label"]) == 1 and int(s1["label"]) == 0
    assert float(s0["concepts"]["spiculation"]) == 1.0 and math.isnan(float(s1["concepts"]["spiculation"]))
    assert float(s0["measurements"]["diameter_mm"]) == 12.5 and float(s0["measurements"]["mean_hu"]) == -650
    assert math.isnan(float(s1["measurements"]["volume_ml"]))
    assert s0["spacing"].tolist() == pytest.approx([0.7, 0.7]) and s1["spacing"].tolist() == pytest.approx([0.5, 0.6])
    assert "spacing" not in s2  # blank = unknown
    assert [q.unit for q in ds.quantities] == ["mm", "mL", "HU"]
    d = ds.describe()
    json.dumps(d)
    assert d["csv_sha256"] == hashlib.sha256(csv_text.encode()).hexdigest()
    assert d["num_rows"] == 3 and d["label_counts"] == {"benign": 2, "malignant": 1}
    assert "img0" not in json.dumps(d)  # no per-image data in the description


def test_folder_csv_units_integer_labels_and_per_axis_spacing_in_cm(png_folder):
    (png_folder / "c.csv").write_text("image,label,spacing_y_cm,spacing_x_cm\nrgb.png,2,0.07,0.05\nimg0.png,0,,\n")
    ds = FolderCSVDataset(png_folder / "c.csv", spacing_columns=["spacing_y_cm", "spacing_x_cm"])
    assert ds.label_names == ("0", "2")  # the classes the CSV holds: no empty class "1"
    s = ds[0]
    assert s["image"].shape == (3, 12, 10) and int(s["label"]) == 1
    assert s["spacing"].tolist() == pytest.approx([0.7, 0.5])  # cm -> mm by pint


def test_folder_csv_dicom_row_takes_header_spacing(png_folder, ct_small):
    shutil.copy(ct_small, png_folder / "ct.dcm")
    (png_folder / "d.csv").write_text("image,label\nct.dcm,1\nimg0.png,0\n")
    s = FolderCSVDataset(png_folder / "d.csv")[0]
    ps = float(pydicom.dcmread(ct_small).PixelSpacing[0])
    assert s["image"].shape == (1, 128, 128) and s["spacing"].tolist() == pytest.approx([ps, ps])
    assert float(s["image"].min()) < -500  # HU, not rescaled to [0, 1]


def test_folder_csv_reports_every_bad_row_at_once(png_folder):
    (png_folder / "bad.csv").write_text(
        "image,label,diameter_mm\n"
        "missing.png,benign,3\n"  # row 2: file not found
        "img0.png,benign,4\n"  # row 3: fine
        "img1.png,benign,abc\n"  # row 4: unparseable number
        "img2.png,mystery,5\n"  # row 5: unknown label
    )
    with pytest.raises(ValueError) as err:
        FolderCSVDataset(png_folder / "bad.csv", label_names=["benign", "malignant"], measurement_columns=["diameter_mm"])
    msg = str(err.value)
    assert "row 2" in msg and "missing.png" in msg
    assert "row 4" in msg and "abc" in msg
    assert "row 5" in msg and "mystery" in msg
    assert "row 3" not in msg


def test_folder_csv_unknown_unit_suffix_is_reported_with_rows(png_folder):
    (png_folder / "u.csv").write_text("image,label,size_furlong\nimg0.png,0,3\nnope.png,1,4\n")
    with pytest.raises(ValueError) as err:
        FolderCSVDataset(png_folder / "u.csv", measurement_columns=["size_furlong"])
    msg = str(err.value)
    assert "row 1" in msg and "furlong" in msg and "row 3" in msg
