"""Training settings out of the model config (config_version 2), and what still reads the old form.

Before config_version 2 each family's model config also held its training settings (loss
coefficients, push and start choices, the CBM training mode, MIL loss weights). They now live in a
frozen dataclass per family, filled from the recipe's ``training:`` section. Old config.json files
(version 1) and old recipes (``model.config.<training field>``) still load; a model config refuses a
training field with a message that says where it belongs; a config.json newer than this release
reads is refused.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

import mlmi_zoo
from mlmi_zoo._config import OverrideError, to_jsonable
from mlmi_zoo.base import CONFIG_VERSION, migrate_config
from mlmi_zoo.families import family_of
from mlmi_zoo.registry import bundled_dir, get_entry
from mlmi_zoo.training.recipe import (
    apply_recipe_overrides,
    load_recipe,
    recipe_to_yaml,
    training_settings,
)

BUNDLED = mlmi_zoo.list_models(pretrained=True)
RECIPES = sorted((Path(mlmi_zoo.__file__).parent / "training" / "recipes").glob("*.yaml"))
# Every field that some family's config held in version 1.
ALL_TRAINING_FIELDS_V1 = {f for name in mlmi_zoo.list_models()
                          for f in get_entry(name).model_class.config_class.TRAINING_FIELDS_V1}


def _shipped(name: str) -> dict:
    return json.loads((bundled_dir() / name / "config.json").read_text())


def _comparable(settings, model=None):
    """MIL's ``train_max_instances="auto"`` resolved for ``model`` (version 1 stored the number)."""
    if model is not None and hasattr(settings, "max_instances"):
        return dataclasses.replace(settings, train_max_instances=settings.max_instances(model.encoder is not None))
    return settings


def test_the_bundled_models_and_recipes_are_found() -> None:
    assert len(BUNDLED) >= 10 and len(RECIPES) >= 10
    assert {"mode", "joint_lambda", "fa_coef", "clst_coef", "prototype_init", "train_max_instances",
            "attention_bag_weight"} <= ALL_TRAINING_FIELDS_V1
    # the bundled families that have training settings at all
    families = {get_entry(_shipped(n)["architecture"]).model_class.family for n in BUNDLED}
    assert {"protopnet", "cbm", "abmil", "additive_mil"} <= families


# -- (a) the bundled models load, and version 1 loses exactly its training fields ----------------------
@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_model_loads_and_its_config_has_no_training_fields(name: str) -> None:
    doc = _shipped(name)
    version = int(doc.get("config_version", 1))
    config_class = get_entry(doc["architecture"]).model_class.config_class
    fields = set(config_class.TRAINING_FIELDS_V1)
    present = fields & set(doc["config"])
    config, moved = migrate_config(config_class, doc["config"], version)
    if version == 1:
        assert set(moved) == present
        assert moved == {k: doc["config"][k] for k in present}  # the values, unchanged
        # nothing else touched, apart from the family's own regrouping (ProtoPNet's count head)
        assert config == config_class.migrate_v1({k: v for k, v in doc["config"].items() if k not in present})
    else:
        assert moved == {} and not present
    assert not fields & set(config)

    model = mlmi_zoo.load(name)
    assert model.architecture == doc["architecture"]
    saved = to_jsonable(model.config)
    assert not fields & set(saved) and not ALL_TRAINING_FIELDS_V1 & set(saved)
    assert all(not hasattr(model.config, k) for k in fields)
    for key, value in config.items():  # the architecture is read as shipped (sections: the keys it gives)
        if isinstance(value, dict):
            assert {k: saved[key][k] for k in value} == value, key
        else:
            assert saved[key] == value, key

    # what version 1 stored is how the recipe now trains it (no default drifted in the move)
    if moved:
        settings_class = family_of(model).training.settings_class
        from_config = settings_class(**moved)
        from_recipe = training_settings(load_recipe(bundled_dir() / name / "recipe.yaml"))
        assert _comparable(from_config, model) == _comparable(from_recipe, model)


# -- (b) old recipes: the training fields move to recipe.training ------------------------------------
@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_recipe_in_the_old_form_loads_with_its_training_fields_moved(name: str, tmp_path: Path, caplog) -> None:
    path = bundled_dir() / name / "recipe.yaml"
    raw = yaml.safe_load(path.read_text())
    fields = get_entry(raw["model"]["name"]).model_class.config_class.TRAINING_FIELDS_V1
    old = {k: v for k, v in raw["model"].get("config", {}).items() if k in fields}
    with caplog.at_level(logging.INFO, logger="mlmi_zoo.training.recipe"):
        recipe = load_recipe(path)
    given = {**old, **(raw.get("training") or {})}
    assert {k: recipe.training[k] for k in given} == given  # the given values; every default written out besides
    assert not set(fields) & set(recipe.model.config)
    config_class = get_entry(raw["model"]["name"]).model_class.config_class
    regrouped = config_class.migrate_v1({k: v for k, v in raw["model"]["config"].items() if k not in fields})
    assert recipe.model.config == regrouped  # the architecture keys stay, in the current layout
    assert ("from model.config to training" in caplog.text) == bool(old)  # a note says what moved
    settings = training_settings(recipe)
    for key, value in old.items():
        assert getattr(settings, key) == value
    # the recipe recorded in the shipped config.json (also the old form) reads back as the same recipe
    embedded = _shipped(name).get("recipe")
    if embedded is not None:
        (tmp_path / "embedded.yaml").write_text(yaml.safe_dump(embedded))
        assert load_recipe(tmp_path / "embedded.yaml") == recipe
    # and it is written back in the new form
    again = yaml.safe_load(recipe_to_yaml(recipe))
    assert again["training"] == recipe.training and not set(fields) & set(again["model"]["config"])


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_training_recipes_load_in_the_new_form(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    recipe = load_recipe(path)
    fields = get_entry(recipe.model.name).model_class.config_class.TRAINING_FIELDS_V1
    assert not set(fields) & set(raw["model"].get("config", {})), "a shipped recipe still keeps training settings in model.config"
    given = raw.get("training") or {}
    assert {k: recipe.training[k] for k in given} == given
    assert recipe.training == dataclasses.asdict(training_settings(recipe))  # every setting written out, type-checked


# -- (c) an override of a moved key ------------------------------------------------------------------
def test_v1_override_of_a_training_field_under_model_config_is_moved_to_training(caplog) -> None:
    base = load_recipe(bundled_dir() / "protopnet_resnet8.pneumoniamnist" / "recipe.yaml")
    assert base.training["clst_coef"] == 0.8  # the default, written out
    with caplog.at_level(logging.INFO, logger="mlmi_zoo.training.recipe"):
        recipe = apply_recipe_overrides(base, ["model.config.clst_coef=0.5"])
    assert recipe.training == {**base.training, "clst_coef": 0.5}
    assert "clst_coef" not in recipe.model.config
    assert "moved ['clst_coef'] from model.config to training" in caplog.text
    assert training_settings(recipe).clst_coef == 0.5
    # the same as the new spelling
    assert recipe == apply_recipe_overrides(base, ["training.clst_coef=0.5"])
    # a wrong type is named by where it ends up
    with pytest.raises(OverrideError, match=r"training\.clst_coef: expected a number"):
        apply_recipe_overrides(base, ["model.config.clst_coef=strong"])


def test_v1_override_replaces_the_value_of_the_training_section_with_a_warning(caplog) -> None:
    base = load_recipe(bundled_dir() / "protopnet_resnet8.retinamnist" / "recipe.yaml")
    assert base.training["clst_coef"] == 0.1
    with caplog.at_level(logging.WARNING, logger="mlmi_zoo.training.recipe"):
        recipe = apply_recipe_overrides(base, ["model.config.clst_coef=0.5"])
    assert recipe.training["clst_coef"] == 0.5
    assert "model.config.clst_coef replaces training values" in caplog.text and "0.1 -> 0.5" in caplog.text
    # the same value in both places changes nothing
    assert apply_recipe_overrides(base, ["model.config.clst_coef=0.1"]).training == base.training
    assert apply_recipe_overrides(base, ["training.clst_coef=0.5"]).training["clst_coef"] == 0.5


def test_training_section_is_type_checked_against_the_family() -> None:
    base = load_recipe(bundled_dir() / "protopnet_resnet8.pneumoniamnist" / "recipe.yaml")
    with pytest.raises(OverrideError, match=r"unknown key\(s\) \['mode'\] for ProtoPNetTrainingSettings"):
        apply_recipe_overrides(base, ["training.mode=joint"])  # a CBM setting
    with pytest.raises(OverrideError, match="fa_coef and measure_map_coef must be >= 0"):
        apply_recipe_overrides(base, ["training.fa_coef=-1"])
    with pytest.raises(OverrideError, match=r"training\.clst_coef: expected a number"):
        apply_recipe_overrides(base, ["training.clst_coef=strong"])


# -- (d) a model config refuses a training field -------------------------------------------------------
def test_create_model_with_a_training_field_says_it_is_a_training_setting() -> None:
    with pytest.raises(OverrideError, match=r"'clst_coef' is a training setting, not part of the model config: "
                                            r"give it in the recipe's training section \(training\.clst_coef=\.\.\.\)"):
        mlmi_zoo.create_model("protopnet_resnet8", clst_coef=0.1)
    for name, key, value in (("cbm_resnet8", "mode", "joint"), ("abmil_features", "attention_bag_weight", 0.1),
                             ("additive_mil_features", "train_max_instances", 64)):
        with pytest.raises(OverrideError, match=f"'{key}' is a training setting"):
            mlmi_zoo.create_model(name, **{key: value})
    with pytest.raises(OverrideError, match="'clst_coef' is a training setting"):
        mlmi_zoo.load("protopnet_resnet8.pneumoniamnist", clst_coef=0.1)
    with pytest.raises(OverrideError, match=r"unknown key 'clst_coeff'"):  # a plain typo stays a typo
        mlmi_zoo.create_model("protopnet_resnet8", clst_coeff=0.1)


# -- (e) config_version ------------------------------------------------------------------------------
def _small_model():
    torch.manual_seed(0)
    return mlmi_zoo.create_model("protopnet_resnet8", img_size=(16, 16), prototypes_per_class=1, prototype_dim=4).eval()


def test_saved_config_is_version_2_and_round_trips(tmp_path: Path) -> None:
    model = _small_model()
    model.save_pretrained(tmp_path / "m")
    doc = json.loads((tmp_path / "m" / "config.json").read_text())
    assert doc["config_version"] == CONFIG_VERSION == 2
    assert not ALL_TRAINING_FIELDS_V1 & set(doc["config"])
    loaded = mlmi_zoo.load(f"local-dir:{tmp_path / 'm'}").eval()
    assert loaded.config == model.config
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(loaded(x), model(x))
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["config"] == doc["config"]


def test_version_1_config_json_drops_its_training_fields(tmp_path: Path) -> None:
    model = _small_model()
    model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    doc = json.loads(path.read_text())
    del doc["config_version"]  # version 1 had no version field
    doc["config"].update(clst_coef=0.5, prototype_init="data", push_on_lesion=True)
    path.write_text(json.dumps(doc))
    loaded = mlmi_zoo.load(f"local-dir:{tmp_path / 'm'}")
    assert loaded.config == model.config
    # a training field in a version-2 file is an unknown key: version 2 has none
    doc["config_version"] = 2
    path.write_text(json.dumps(doc))
    with pytest.raises(OverrideError, match=r"unknown key\(s\) \['clst_coef', 'prototype_init', 'push_on_lesion'\]"):
        mlmi_zoo.load(f"local-dir:{tmp_path / 'm'}")


def test_newer_config_version_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    model = _small_model()
    model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    doc = json.loads(path.read_text())
    doc["config_version"] = 99
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"config_version 99 is newer than this mlmi-zoo reads \(2\); upgrade mlmi-zoo"):
        mlmi_zoo.load(f"local-dir:{tmp_path / 'm'}")
    with pytest.raises(ValueError, match="config_version 99 is newer"):
        type(model).from_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="config_version 99 is newer"):
        migrate_config(type(model.config), doc["config"], 99)


def test_version_1_count_head_fields_are_grouped_in_count_head() -> None:
    from mlmi_zoo.architectures.protopnet import CountHeadConfig, ProtoPNetConfig

    v1 = {"physical_head": "count", "measure_tile": 8, "measure_resample": True, "measure_context": "own",
          "measure_dihedral_views": True, "measure_detach": False, "fa_coef": 0.5, "feature_stride": 16}
    config, moved = migrate_config(ProtoPNetConfig, v1, 1)
    assert moved == {"fa_coef": 0.5}
    assert config == {"feature_stride": 16, "count_head": {"tile": 8, "resample": True, "context": "own",
                                                           "dihedral_views": True, "detach": False}}
    assert ProtoPNetConfig.migrate_v1({"physical_head": "regress"}) == {"count_head": None}
    # an override in the old spelling updates the count head it lands in
    assert ProtoPNetConfig.migrate_v1({"count_head": {"tile": 4, "resample": True}, "measure_tile": 8}) == \
        {"count_head": {"tile": 8, "resample": True}}
    built = mlmi_zoo.create_model("protopnet_resnet8", spacing=(0.7, 0.7), count_head={"tile": 4, "resample": True},
                                  quantities=({"name": "diameter_mm", "unit": "mm", "low": 0.0, "high": 40.0},))
    assert built.config.count_head == CountHeadConfig(tile=4, resample=True)
    with pytest.raises(OverrideError, match="unknown key 'model.config.measure_tile'|measure_tile"):
        mlmi_zoo.create_model("protopnet_resnet8", measure_tile=8)
