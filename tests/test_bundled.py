"""Every shipped model: its card checks, it loads, it explains its bundled samples; README agrees."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mlmi_zoo
from mlmi_zoo.model_cards import check_card
from mlmi_zoo.model_cards.demo import explain_sample, load_samples, run_demo
from mlmi_zoo.model_cards.readme_table import update_readme
from mlmi_zoo.registry import bundled_dir

BUNDLED = mlmi_zoo.list_models(pretrained=True)
README = Path(__file__).resolve().parents[1] / "README.md"
# an ImageNet backbone at full depth (EfficientNet-Lite0 baseline: 3.4 M parameters, 13.6 MB) is the smallest
# honest black box for photographs; the release as a whole stays within test_release_fits_the_size_budget
MAX_WEIGHTS_BYTES = 16 * 2**20


@pytest.mark.parametrize("name", BUNDLED)
def test_card_check_passes(name: str) -> None:
    assert check_card(bundled_dir() / name) == []


@pytest.mark.parametrize("name", BUNDLED)
def test_model_loads_and_explains_its_samples(name: str) -> None:
    folder = bundled_dir() / name
    assert (folder / "model.safetensors").stat().st_size <= MAX_WEIGHTS_BYTES
    model = mlmi_zoo.load(name)
    samples = load_samples(folder)
    assert samples, f"{name} ships no sample case for the demo"
    for tensors, _ in samples:
        exp = explain_sample(model, tensors)
        assert torch.isfinite(exp.logits).all()
        if exp.decomposable:
            assert exp.decomposition_error() <= 1e-5


# The wheel carries every bundled folder, and PyPI refuses a file over 100 MB unless a larger limit is granted:
# the bundled folders stay within 90 MiB, which leaves room for the code and the wheel's own overhead.
RELEASE_BUDGET_BYTES = 90 * 2**20


def test_release_fits_the_size_budget() -> None:
    total = sum(p.stat().st_size for p in bundled_dir().glob("*/*") if p.is_file())
    total += sum(p.stat().st_size for p in bundled_dir().glob("*/*/*") if p.is_file())
    assert total <= RELEASE_BUDGET_BYTES, f"the bundled folders hold {total / 2**20:.1f} MiB"


def test_readme_model_table_is_generated_from_the_cards() -> None:
    assert update_readme(README, check=True), "run python -m mlmi_zoo.model_cards.readme_table"


def test_card_numbers_are_results_numbers() -> None:
    for name in BUNDLED:
        results = json.loads((bundled_dir() / name / "results.json").read_text())
        assert results["model"]["weights_sha256"] == json.loads((bundled_dir() / name / "config.json").read_text())["weights_sha256"]


@pytest.mark.skipif(not BUNDLED, reason="no bundled models")
def test_demo_writes_a_report(tmp_path) -> None:
    page = run_demo(tmp_path)
    html = page.read_text()
    assert html.count("<h2") == len(BUNDLED)
    assert "data:image/png;base64" in html
    for name in BUNDLED:
        assert name in html
    pushed = [n for n in BUNDLED if (bundled_dir() / n / "figures" / "prototype_gallery.png").is_file()]
    assert html.count("the training patches they are") == len(pushed)


def test_eight_bit_sample_images_are_stored_as_bytes_and_restored_exactly(tmp_path) -> None:
    from mlmi_zoo.model_cards.demo import save_samples

    photo = torch.randint(0, 256, (3, 100, 120), generator=torch.Generator().manual_seed(0)).float() / 255.0
    ct = torch.randn(1, 16, 16) * 300  # HU: not 8-bit, kept as it is
    save_samples(tmp_path, "photo", {"image": photo, "fov": torch.ones(100, 120, dtype=torch.bool)}, {"label": "a"})
    save_samples(tmp_path, "ct", {"image": ct}, {"label": "b"})
    assert (tmp_path / "samples" / "photo.safetensors").stat().st_size < photo.numel() * 4 // 2
    (ct_back, ct_meta), (photo_back, photo_meta) = load_samples(tmp_path)  # sorted by name
    assert torch.equal(photo_back["image"], photo) and photo_back["image"].dtype == torch.float32
    assert torch.equal(ct_back["image"], ct) and ct_meta["label"] == "b"
    assert photo_meta == {"label": "a", "name": "photo"}
    # stored as a lossless PNG: a smooth photograph takes less than its raw bytes
    smooth = (torch.linspace(0, 1, 120)[None, None, :] * torch.linspace(0, 1, 100)[None, :, None]).expand(3, 100, 120)
    smooth = (smooth * 255).round() / 255.0
    save_samples(tmp_path / "smooth", "photo", {"image": smooth}, {})
    assert (tmp_path / "smooth" / "samples" / "photo.safetensors").stat().st_size < smooth.numel() // 2
    ((back, _),) = load_samples(tmp_path / "smooth")
    assert torch.equal(back["image"], smooth)


def _prototype_models() -> list[str]:
    return [n for n in BUNDLED if "sanity" in json.loads((bundled_dir() / n / "results.json").read_text())
            .get("elements", {}).get("visual_recognizability", {}).get("details", {})]


@pytest.mark.parametrize("name", _prototype_models())
def test_shipped_prototypes_pass_the_sanity_checks(name: str) -> None:
    """No prototype network ships with more than 10% degenerate prototypes among those it uses, and the card's
    duplicate, border and switched-off counts are what the weights and push records say (recomputed here without
    the data)."""
    from mlmi_zoo.architectures.protopnet.evaluation import DEGENERATE_LIMIT
    from mlmi_zoo.architectures.protopnet.prototypes import DUPLICATE_COSINE

    sanity = json.loads((bundled_dir() / name / "results.json").read_text())[
        "elements"]["visual_recognizability"]["details"]["sanity"]
    assert sanity["degenerate_share"] <= DEGENERATE_LIMIT, sanity
    model = mlmi_zoo.load(name)
    on = model.prototype_mask > 0  # switched-off prototypes take no part in any decision and are counted apart
    assert sanity.get("switched_off", 0) == int((~on).sum())
    unit = torch.nn.functional.normalize(model.prototype_layer.prototypes.detach().flatten(1), dim=1)
    near = ((torch.tril(unit @ unit.T, diagonal=-1) >= DUPLICATE_COSINE) & on[:, None] & on[None, :]).any(1)
    assert int(near.sum()) == sanity["cosine_099"]
    records = [r for r in model.prototype_sources or [] if r is not None and on[r["prototype"]]]
    assert len(records) == sanity["prototypes"], "every enabled shipped prototype is a pushed training patch"
    border = sum(any(v in (0, s - 1) for v, s in zip(r["location"], r["latent_shape"])) for r in records)
    assert border == sanity["on_border"]
    sources = [(r["index"], *r["location"]) for r in records]
    assert len(sources) - len(set(sources)) == sanity["same_source"]


def test_a_cropped_demo_sample_keeps_only_the_square_around_its_finding() -> None:
    from mlmi_zoo.model_cards.release import _crop_sample

    image = torch.rand(1, 100, 120) + 0.5
    mask = torch.zeros(1, 100, 120, dtype=torch.bool)
    mask[0, 70:74, 100:104] = True  # a finding near the lower-right corner
    sample = {"image": image, "mask": mask, "spacing": torch.tensor([0.5, 0.5]), "label": torch.tensor(1)}
    out = _crop_sample(sample, 10.0)  # 10 mm = 20 px
    kept = out["image"][0] != 0
    rows, cols = torch.nonzero(kept, as_tuple=True)
    assert int(kept.sum()) == 20 * 20 and rows.min() == 61 and cols.min() == 91  # centre (71, 101)
    assert torch.equal(out["image"][0][kept], image[0][kept]) and torch.equal(out["mask"], mask)
    assert out["label"] is sample["label"]
    edge = _crop_sample({"image": image, "mask": torch.zeros_like(mask)}, 200.0)  # larger than the image: all kept
    assert torch.equal(edge["image"], image)


def test_evaluating_a_folder_of_weights_placed_by_hand_ships_its_recipe(tmp_path, monkeypatch) -> None:
    from mlmi_zoo.model_cards import release as rel

    entry = rel.RELEASES[0]
    (tmp_path / entry.name).mkdir()
    monkeypatch.setattr("mlmi_zoo.evaluation.evaluate", lambda *a, **k: {"task": {"auroc": {"estimate": 0.5}}})
    monkeypatch.setattr("mlmi_zoo.model_cards.card.write_card", lambda *a, **k: None)
    monkeypatch.setattr(rel, "_store_samples", lambda *a, **k: None)
    rel.evaluate_and_card(entry, tmp_path)
    assert (tmp_path / entry.name / "recipe.yaml").read_bytes() == (rel.RECIPES / entry.recipe).read_bytes()


def test_the_demo_draws_the_annotated_finding_with_its_size() -> None:
    from mlmi_zoo.model_cards.demo import _truth_png

    image = torch.zeros(1, 32, 32)
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    assert _truth_png({"image": image, "mask": mask}, {}) is None  # a normal case: nothing to outline
    mask[0, 10:16, 12:18] = True
    png = _truth_png({"image": image, "mask": mask}, {"true diameter_mm": 13.2, "true radius_mm": float("nan")})
    assert png is not None and png[:8] == b"\x89PNG\r\n\x1a\n"


CROPPED = [r for r in __import__("mlmi_zoo.model_cards.release", fromlist=["RELEASES"]).RELEASES
           if r.sample_crop_mm is not None and r.name in BUNDLED]


@pytest.mark.parametrize("release", CROPPED, ids=lambda r: r.name)
def test_samples_of_licence_restricted_data_hold_only_their_crop(release) -> None:
    """mini-MIAS may be shared only as a few sample crops: every stored image, a bag's film included, holds
    original pixels only inside the release's square (the rest is 0)."""
    for tensors, meta in load_samples(bundled_dir() / release.name):
        image, spacing = tensors["image"], tensors["spacing"]
        rows, cols = torch.nonzero(image.reshape(-1, *image.shape[-2:]).abs().sum(0) > 0, as_tuple=True)
        assert len(rows), meta
        for extent, s in ((rows.max() - rows.min() + 1, spacing[0]), (cols.max() - cols.min() + 1, spacing[1])):
            assert int(extent) <= round(release.sample_crop_mm / float(s)), meta


def test_the_demo_draws_the_predicted_radius_of_a_bag_model() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mlmi_zoo.model_cards.demo import _draw_predicted_circle

    name = "abmil_features.mias"
    if name not in BUNDLED:
        pytest.skip(f"{name} is not bundled")
    model = mlmi_zoo.load(name)
    (tensors, meta), *_ = [s for s in load_samples(bundled_dir() / name) if bool(s[0]["mask"].any())]
    exp = explain_sample(model, tensors)
    fig, ax = plt.subplots()
    _draw_predicted_circle(ax, model, exp, tensors, int(meta["tile_px_on_image"]))
    radius_mm = float(exp.measurements["radius_mm"].value[0])
    (circle,) = ax.patches
    assert circle.get_radius() == pytest.approx(radius_mm / float(tensors["spacing"][0]))
    assert f"{radius_mm:.1f} mm" in ax.get_title() and ax.collections  # the annotation's outline drawn beside it
    plt.close(fig)
