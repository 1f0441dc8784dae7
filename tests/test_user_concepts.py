"""A concept bottleneck fine-tuned on the user's own concept columns (``finetune --concepts``).

Data: 32x32 8-bit PNG "lesions" (a bright square on noise) described by a CSV whose concept
columns the user annotated: ``calcification`` (0/1), ``abnormality`` (codes 0..3, categorical),
``tissue`` (codes 0..2, ordinal) and ``thickness_mm`` (continuous). The base model is the LIDC
bottleneck, whose own concepts (spiculation, lobulation, sphericity, diameter) the user does not have.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlmi_zoo.training.finetune import FinetuneDataError, evaluation_data_spec, finetune, plan_finetune
from mlmi_zoo.training.user_concepts import concepts_from_csv, parse_concept_word

CBM = "cbm_resnet8.lidc_nodule"  # HU window (8-bit PNGs need intensity="refit"), four LIDC concepts
WORDS = ["calcification", "abnormality:categorical", "tissue:ordinal", "thickness_mm"]

pytestmark = pytest.mark.usefixtures("one_thread")


def write_cases(folder: Path, n: int = 24, name: str = "cases.csv", seed: int = 0, blank_every: int = 5,
                extra: dict[int, dict[str, str]] | None = None, spacing: bool = True) -> Path:
    """``n`` images and a CSV ``image,label,calcification,abnormality,tissue,thickness_mm[,spacing_mm]``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = ["image,label,calcification,abnormality,tissue,thickness_mm" + (",spacing_mm" if spacing else "")]
    for i in range(n):
        lesion = i % 2 == 1
        img = rng.integers(0, 90, (32, 32)).astype(np.uint8)
        if lesion:
            img[10:22, 10:22] = 220
        stem = f"{Path(name).stem}{i}"
        Image.fromarray(img).save(folder / f"{stem}.png")
        cells = {"calcification": "" if blank_every and i % blank_every == 0 else str(int(lesion and i % 3 == 0)),
                 "abnormality": str(1 + i % 3 if lesion else 0), "tissue": str(i % 3),
                 "thickness_mm": f"{2.5 + (i % 4) * 0.5:.1f}"}
        cells.update((extra or {}).get(i, {}))
        rows.append(",".join([f"{stem}.png", "lesion" if lesion else "normal", cells["calcification"],
                              cells["abnormality"], cells["tissue"], cells["thickness_mm"]]
                             + (["0.5x0.5"] if spacing else [])))
    (folder / name).write_text("\n".join(rows) + "\n")
    return folder / name


# -- reading the kinds off the columns ---------------------------------------------------------------------------
def test_kinds_are_read_off_the_columns(tmp_path):
    specs = concepts_from_csv(write_cases(tmp_path), ["calcification", "abnormality:categorical", "tissue:ordinal",
                                                      "thickness_mm"])
    got = {s.name: (s.kind, s.unit, s.levels) for s in specs}
    assert got == {"calcification": ("binary", None, None),
                   "abnormality": ("categorical", None, ("0", "1", "2", "3")),
                   "tissue": ("ordinal", None, ("0", "1", "2")),
                   "thickness_mm": ("continuous", "mm", None)}
    assert [s.name for s in specs] == ["calcification", "abnormality", "tissue", "thickness_mm"]  # bottleneck order


def test_a_column_whose_kind_is_not_settled_asks_for_it(tmp_path):
    with pytest.raises(ValueError, match=r"'tissue' holds 3 values \(0, 1, 2\): say its kind, e.g. 'tissue:ordinal'"):
        concepts_from_csv(write_cases(tmp_path), ["tissue"])


def test_bad_cells_are_named_by_row_and_column(tmp_path):
    csv = write_cases(tmp_path, extra={3: {"tissue": "dense"}, 6: {"abnormality": "1.5"}})
    with pytest.raises(ValueError) as err:
        concepts_from_csv(csv, ["tissue:ordinal", "abnormality:categorical", "calcification:binary"])
    text = str(err.value)
    assert "row 5, column 'tissue': 'dense' is not a number" in text  # row 1 is the header
    assert "categorical concept 'abnormality' takes integer codes 0..K-1" in text and "holds 1.5" in text


@pytest.mark.parametrize("words, message", [
    (["size"], "has no column 'size'"),
    (["tissue:fuzzy"], "kind 'fuzzy' is not one of"),
    (["tissue:continuous"], "needs its unit in the column name"),
    (["tissue:ordinal", "tissue:categorical"], "given more than once"),
    (["abnormality:binary"], "binary concept 'abnormality' takes 0, 1 or a probability"),
    ([], "no concepts given"),
])
def test_words_that_cannot_work_are_refused(tmp_path, words, message):
    with pytest.raises(ValueError, match=message):
        concepts_from_csv(write_cases(tmp_path), words)


def test_parse_concept_word():
    assert parse_concept_word(" tissue : ordinal ") == ("tissue", "ordinal")
    assert parse_concept_word("calcification") == ("calcification", None)
    with pytest.raises(ValueError, match="no column name"):
        parse_concept_word(":binary")


# -- fine-tuning --------------------------------------------------------------------------------------------------
def test_the_plan_replaces_the_bottleneck_and_records_it(tmp_path):
    plan = plan_finetune(CBM, write_cases(tmp_path), out_dir=tmp_path / "run", intensity="refit", concepts=WORDS)
    config = plan.recipe.model.config
    assert [c["name"] for c in config["concepts"]] == ["calcification", "abnormality", "tissue", "thickness_mm"]
    assert config["area_maps"] == []
    change = next(c for c in plan.record["changes"] if c["key"] == "model.config.concepts")
    assert change["from"] == ["spiculation", "lobulation", "sphericity", "diameter_mm"]
    assert change["to"][0] == "calcification (binary)"
    spec = plan.recipe.data.params
    assert spec["concept_columns"] == ["calcification", "abnormality", "tissue"]
    assert spec["measurement_columns"] == ["thickness_mm"]


def test_another_training_mode_brings_its_own_stages(tmp_path):
    data = write_cases(tmp_path)
    default = plan_finetune(CBM, data, out_dir=tmp_path / "a", intensity="refit", concepts=WORDS)
    # the fine-tuning default: the label head on the predicted concepts with random corrections (the base
    # model trained it on true concepts, independent), recorded as a default of fine-tuning
    assert default.recipe.training["mode"] == "sequential" and default.recipe.training["intervention_rate"] == 0.25
    assert default.record["schedule"]["training"] == {"mode": "sequential", "intervention_rate": 0.25}
    # and its bottleneck holds calibrated probabilities (a model.config default of fine-tuning, recorded)
    assert default.recipe.model.config["calibrated_concepts"] is True
    assert default.record["schedule"]["config"] == {"calibrated_concepts": True}
    scores = plan_finetune(CBM, data, out_dir=tmp_path / "f", intensity="refit", concepts=WORDS,
                           overrides=["model.config.calibrated_concepts=false"])
    assert scores.recipe.model.config["calibrated_concepts"] is False
    assert scores.record["schedule"]["config"] == {"calibrated_concepts": False}
    assert [s.name for s in default.recipe.stages] == ["concepts", "label_head"]
    assert not any(c["key"] == "stages" for c in default.record["changes"])
    # the base model's own mode, asked for by name: the default rate gives way (independent takes none)
    independent = plan_finetune(CBM, data, out_dir=tmp_path / "d", intensity="refit", concepts=WORDS,
                                overrides=["training.mode=independent"])
    assert independent.recipe.training["mode"] == "independent"
    assert independent.recipe.training["intervention_rate"] == 0.0
    with pytest.raises(ValueError, match="already trains it on true concepts"):
        plan_finetune(CBM, data, out_dir=tmp_path / "e", intensity="refit", concepts=WORDS,
                      overrides=["training.mode=independent", "training.intervention_rate=0.5"])
    joint = plan_finetune(CBM, data, out_dir=tmp_path / "b", intensity="refit", concepts=WORDS,
                          overrides=["training.mode=joint"])
    # the whole step budget goes to the one joint stage, at the base model's peak rate
    assert [s.name for s in joint.recipe.stages] == ["joint"] and joint.recipe.stages[0].lr == joint.recipe.optim.lr
    steps = joint.record["schedule"]["steps_per_epoch"]
    assert joint.recipe.stages[0].epochs == max(1, round(1000 / steps))
    change = next(c for c in joint.record["changes"] if c["key"] == "stages")
    assert change["from"] == ["concepts", "label_head"] and change["to"] == ["joint"]
    assert joint.recipe.training["intervention_rate"] == 0.25  # random corrections in the joint stage too
    plain = plan_finetune(CBM, data, out_dir=tmp_path / "c", intensity="refit", concepts=WORDS,
                          overrides=["training.intervention_rate=0"])
    assert [s.name for s in plain.recipe.stages] == ["concepts", "label_head"]
    assert plain.recipe.training == {**default.recipe.training, "intervention_rate": 0.0}  # Koh et al.'s sequential


def test_a_size_concept_needs_the_spacing(tmp_path):
    with pytest.raises(FinetuneDataError, match=r"\['thickness_mm'\] are sizes in physical units .* 'spacing_mm'"):
        plan_finetune(CBM, write_cases(tmp_path, spacing=False), out_dir=tmp_path / "run", intensity="refit",
                      concepts=WORDS)
    plan_finetune(CBM, tmp_path / "cases.csv", out_dir=tmp_path / "run", intensity="refit", concepts=WORDS[:3])


def test_without_concepts_the_base_models_columns_are_asked_for_with_the_way_out(tmp_path):
    with pytest.raises(FinetuneDataError, match=r"needs a column 'spiculation'.*--concepts COL\[:KIND\]"):
        plan_finetune(CBM, write_cases(tmp_path), out_dir=tmp_path / "run", intensity="refit")


def test_concepts_need_a_bottleneck_and_a_csv(tmp_path):
    with pytest.raises(ValueError, match="replaces a concept bottleneck; protopnet_resnet8.pneumoniamnist"):
        plan_finetune("protopnet_resnet8.pneumoniamnist", write_cases(tmp_path), out_dir=tmp_path / "run",
                      concepts=["calcification"])
    folders = tmp_path / "folders"
    for label in ("a", "b"):
        (folders / label).mkdir(parents=True)
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(folders / label / "x.png")
    with pytest.raises(ValueError, match="folder of class sub-folders"):
        plan_finetune(CBM, folders, out_dir=tmp_path / "run2", concepts=["calcification"])
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()


def test_a_bottleneck_on_the_users_concepts_trains_and_evaluates(tmp_path):
    import mlmi_zoo
    from mlmi_zoo.evaluation.evaluate import EvaluationLimits, evaluate

    final = finetune(CBM, write_cases(tmp_path / "train", n=32), out_dir=tmp_path / "run", intensity="refit",
                     concepts=WORDS, steps=2, quiet=True)
    model = mlmi_zoo.load(f"local-dir:{final}")
    assert [c.name for c in model.config.concepts] == ["calcification", "abnormality", "tissue", "thickness_mm"]
    config = json.loads((final / "config.json").read_text())
    assert any(c["key"] == "model.config.concepts" for c in config["finetune"]["changes"])
    # the user's own test CSV, with the same concept columns: the interventions are measured on them
    test = write_cases(tmp_path / "test", n=12, name="test.csv", seed=3, blank_every=0)
    uri = f"local-dir:{final}"
    limits = EvaluationLimits(deletion_cases=4, spacing_cases=4, control_train_cases=16, examples=1, val_cases=8,
                              oracle_train_cases=16, intervention_repeats=2)
    doc = evaluate(uri, evaluation_data_spec(uri, test), split="test", n_boot=20, out=tmp_path / "results.json",
                   limits=limits)
    action = doc["elements"]["actionability"]
    assert action["metrics"]["accuracy_all_concepts_corrected"] is not None
    # the fixed intervention order is fitted on the validation cases carved from the user's training CSV
    assert action["details"]["fixed_order"] is not None
    assert not any("fixed intervention order was not fitted" in x for x in doc.get("limitations", []))
