"""``mlmi-zoo evaluate``: the results document of every family validates, decompositions are exact,
figures are real PNGs, overlapping splits are refused, data without spacing say so, and a card
generated from the real output passes ``check_card``."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from mlmi_zoo.evaluation.evaluate import (
    EvaluationLimits,
    check_split_overlap,
    data_spec_to_text,
    evaluate,
    load_data_spec,
)
from mlmi_zoo.evaluation.results import ELEMENTS, validate_results
from mlmi_zoo.registry import create_model
from mlmi_zoo.specs import IntensityTransform, QuantitySpec
from mlmi_zoo.training.data_spec import DataSpec, build_dataset, describe

PNG = b"\x89PNG\r\n\x1a\n"
WINDOW = IntensityTransform(kind="window", low=-1000.0, high=400.0, unit="HU")
NODULES = DataSpec("nodule_phantom", {"size": 32, "seed": 3}, train_size=16, val_size=8, test_size=24)
BAGS = DataSpec("tilebag_phantom", {"features_only": True, "feature_dim": 16, "bag_size": [6, 20], "seed": 1},
                train_size=8, val_size=4, test_size=16)
LIMITS = EvaluationLimits(deletion_cases=8, deletion_steps=3, spacing_cases=4, purity_train_cases=16, val_cases=8,
                          oracle_train_cases=16, intervention_repeats=2, examples=2)


def _save(model, folder: Path, spec: DataSpec) -> str:
    model.save_pretrained(folder, extra={"data": describe(spec)})
    return f"local-dir:{folder}"


def _run(uri: str, spec: DataSpec, out_dir: Path, **kwargs) -> dict:
    return evaluate(uri, spec, out=out_dir / "results.json", n_boot=30, batch_size=16, limits=LIMITS, **kwargs)


@pytest.fixture(scope="module")
def protopnet_run(tmp_path_factory) -> tuple[dict, Path]:
    from mlmi_zoo.architectures.protopnet.push import push_prototypes

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("protopnet")
    model = create_model("protopnet_resnet8", img_size=(32, 32), intensity=WINDOW,
                         quantities=(QuantitySpec("diameter_mm", "mm", 0.0, 100.0),), count_head={}).eval()
    push_prototypes(model, DataLoader(build_dataset(NODULES, "train"), batch_size=8))
    uri = _save(model, root / "model", NODULES)
    return _run(uri, NODULES, root), root


def _assert_valid(doc: dict, out_dir: Path) -> None:
    assert validate_results(doc) == []
    assert json.loads((out_dir / "results.json").read_text()) == doc  # what is returned is what is written
    assert set(doc["elements"]) == set(ELEMENTS)
    for block in doc["elements"].values():
        assert block["does_not_show"] or block["reason"]
    cited = set(doc["figures"].values())
    for block in [*doc["elements"].values(), doc["faithfulness"]]:
        cited.update(block["figures"])
    assert {"figures/roc.png", "figures/reliability.png"} <= cited
    for rel in cited:
        assert not Path(rel).is_absolute()
        assert (out_dir / rel).read_bytes()[:8] == PNG


def test_protopnet_document(protopnet_run) -> None:
    doc, out_dir = protopnet_run
    _assert_valid(doc, out_dir)
    el = doc["elements"]
    assert doc["n_cases"] == 24 and doc["model"]["family"] == "protopnet"
    assert el["transparency"]["metrics"]["decomposition_error_max"] <= 1e-5
    assert el["transparency"]["metrics"]["explanation_terms"] == 10
    # switching a prototype off removes exactly its contribution
    assert el["actionability"]["metrics"]["switch_off_check_max_error"] <= 1e-5
    loc = el["localization"]["metrics"]
    assert 0.0 <= loc["activation_precision_top5pct"] <= 1.0 and loc["cases_with_mask"] == 24
    rec = el["visual_recognizability"]["metrics"]
    assert rec["pushed"] is True and 1 <= rec["unique_prototypes"] <= 10
    assert 0.0 <= rec["lesion_purity_mean"] <= 1.0 and 0.0 <= rec["class_purity_mean"] <= 1.0
    assert "figures/prototype_gallery.png" in el["visual_recognizability"]["figures"]
    phys = el["physical_attribution"]["metrics"]
    assert phys["diameter_mm_mae"] >= 0 and "diameter_mm_spacing_invariance_mean_abs_diff" in phys
    assert el["physical_attribution"]["details"]["spacing_invariance"]["spacings_mm"] == [0.5, 1.0]
    # the count head's map: the share of what it counted that lies on the lesion, and the figure of it
    assert 0.0 <= phys["counted_area_on_lesion_share"] <= 1.0
    assert 0.0 < phys["counted_area_on_lesion_share_ceiling"] <= 1.0
    assert "figures/measurement_maps.png" in el["physical_attribution"]["figures"]
    gap = doc["faithfulness"]["metrics"]
    assert gap["faithfulness_gap"] == pytest.approx(gap["deletion_auc_random"] - gap["deletion_auc_attribution"])
    assert doc["bootstrap"]["n"] == 30 and "30 resamples" in doc["bootstrap"]["description"]
    for key in ("auroc", "balanced_accuracy", "ece"):
        assert set(doc["task"][key]) >= {"estimate", "low", "high"}


def test_card_from_real_output_passes_check(protopnet_run, tmp_path) -> None:
    from mlmi_zoo.model_cards import check_card, write_card

    doc, out_dir = protopnet_run
    model_dir = tmp_path / "protopnet_resnet8.test"
    shutil.copytree(out_dir / "model", model_dir)
    write_card(model_dir, out_dir / "results.json")
    assert check_card(model_dir) == []
    from huggingface_hub import ModelCard

    stated = {r.metric_type: r.metric_value for r in ModelCard.load(model_dir / "README.md").data.eval_results or []}
    assert stated["roc_auc"] == pytest.approx(doc["task"]["auroc"]["estimate"], abs=1e-6)
    assert (model_dir / "figures" / "roc.png").read_bytes()[:8] == PNG


def test_cbm_document(tmp_path) -> None:
    torch.manual_seed(0)
    model = create_model("cbm_resnet8", img_size=(32, 32), intensity=WINDOW).eval()
    doc = _run(_save(model, tmp_path / "model", NODULES), NODULES, tmp_path)
    _assert_valid(doc, tmp_path)
    el = doc["elements"]
    assert el["transparency"]["metrics"]["decomposition_error_max"] <= 1e-5
    act = el["actionability"]
    assert set(act["details"]["curves"]) == {"random", "uncertainty", "fixed"}
    # no label noise: the phantom's label rule on the true concepts is always right
    assert act["metrics"]["oracle_accuracy"] == 1.0 and "label rule" in act["details"]["oracle"]
    assert act["metrics"]["gap_all_corrected_to_oracle"] == pytest.approx(1.0 - act["metrics"]["accuracy_all_concepts_corrected"])
    assert "spiculation_auroc" in el["visual_recognizability"]["metrics"]
    assert "diameter_mm_mae" in el["physical_attribution"]["metrics"]
    assert "figures/intervention_curves.png" in act["figures"]


@pytest.mark.parametrize("family", ["additive_mil", "abmil"])
def test_mil_document(family, tmp_path) -> None:
    torch.manual_seed(0)
    model = create_model(f"{family}_features", in_features=16).eval()
    doc = _run(_save(model, tmp_path / "model", BAGS), BAGS, tmp_path)
    _assert_valid(doc, tmp_path)
    el = doc["elements"]
    loc = el["localization"]
    assert 0.0 <= loc["metrics"]["instance_auroc_pooled"] <= 1.0
    assert 0.0 <= loc["metrics"]["instance_auroc_pooled_bag_constant_control"] <= 1.0  # pooled, beside its control
    if loc["metrics"]["bags_with_both_instance_classes"]:
        controls = loc["evidence"]["controls"]
        # inside a bag, a bag-constant score ties every instance: AUROC exactly 0.5 in every bag
        assert controls["bag_constant"]["score"]["estimate"] == pytest.approx(0.5)
        assert controls["uniform"]["score"]["estimate"] == pytest.approx(0.5)
        assert doc["verdicts"]["localization"]["status"] in ("demonstrated", "not demonstrated on this data")
    assert "tumour_area_mm2_relative_error_positive_bags" in el["physical_attribution"]["metrics"]
    assert doc["faithfulness"]["applicable"] and doc["faithfulness"]["details"]["removed"] == "instances"
    action = el["actionability"]["evidence"]
    assert set(action["controls"]) == {"random_k_tiles"} and action["n_cases"] == doc["n_cases"]
    # the model's value is the mean logit lost when the top tiles go: minus the reported mean change
    assert action["model"]["estimate"] == pytest.approx(-el["actionability"]["metrics"]["mean_logit_change_top_instances_excluded"])
    assert doc["verdicts"]["actionability"]["metric"] == action["metric"]
    if family == "additive_mil":
        assert el["transparency"]["metrics"]["decomposition_error_max"] <= 1e-5
    else:
        assert not el["transparency"]["applicable"] and "not an exact decomposition" in el["transparency"]["reason"]


def test_baseline_and_comparison(tmp_path) -> None:
    torch.manual_seed(0)
    model = create_model("baseline_resnet8", img_size=(32, 32), intensity=WINDOW).eval()
    uri = _save(model, tmp_path / "model", NODULES)
    doc = _run(uri, NODULES, tmp_path, baseline_uri=uri)
    _assert_valid(doc, tmp_path)
    for name in ELEMENTS:
        assert not doc["elements"][name]["applicable"]
        assert "black box" in doc["elements"][name]["reason"]
    # the same model as its own baseline: identical task metrics on identical cases
    assert doc["baseline"]["task"]["auroc"] == doc["task"]["auroc"]


def test_overlapping_split_is_refused(tmp_path) -> None:
    model = create_model("baseline_resnet8", img_size=(32, 32), intensity=WINDOW).eval()
    uri = _save(model, tmp_path / "model", NODULES)
    with pytest.raises(ValueError, match="shares 16 case"):
        evaluate(uri, NODULES, split="train", n_boot=5)
    # a spec whose test range [8, 16) lies inside the training range [0, 16) of the same generator
    shifted = DataSpec("nodule_phantom", {"size": 32, "seed": 3}, train_size=4, val_size=4, test_size=8)
    with pytest.raises(ValueError, match="training split"):
        evaluate(uri, shifted, split="test", n_boot=5)
    # another generator seed is another set of cases; the default test split is disjoint
    other = DataSpec("nodule_phantom", {"size": 32, "seed": 4}, train_size=4, val_size=4, test_size=8)
    assert check_split_overlap(describe(NODULES), describe(other), "test") is None
    assert check_split_overlap(describe(NODULES), describe(NODULES), "test") is None
    assert "not checked" in check_split_overlap(None, describe(NODULES), "test")


def test_lidc_patients_overlap() -> None:
    train = {"kind": "lidc_nodules", "source": {"sha256": "x"},
             "splits": {"train": {"size": 2, "patient_ids": ["LIDC-0001", "LIDC-0002"]}}}
    evaluated = {"kind": "lidc_nodules", "source": {"sha256": "x"},
                 "splits": {"test": {"size": 2, "patient_ids": ["LIDC-0002", "LIDC-0003"]}}}
    with pytest.raises(ValueError, match="LIDC-0002"):
        check_split_overlap(train, evaluated, "test")
    evaluated["splits"]["test"]["patient_ids"] = ["LIDC-0003"]
    assert check_split_overlap(train, evaluated, "test") is None


def test_medmnist_without_spacing_or_masks(shared_data, tmp_path) -> None:
    path = shared_data / "pneumoniamnist.npz"
    if not path.is_file():
        pytest.skip("pneumoniamnist.npz not available")
    spec = DataSpec("medmnist", {"path": str(path)}, train_size=16, val_size=8, test_size=24)
    torch.manual_seed(0)
    model = create_model("protopnet_resnet8", img_size=(28, 28), label_names=("normal", "pneumonia"),
                         quantities=(QuantitySpec("area_mm2", "mm^2", 0.0, 1000.0),)).eval()
    doc = _run(_save(model, tmp_path / "model", spec), spec, tmp_path)
    _assert_valid(doc, tmp_path)
    phys, loc = doc["elements"]["physical_attribution"], doc["elements"]["localization"]
    assert not phys["applicable"] and "no pixel spacing" in phys["reason"] and phys["metrics"] == {}
    assert not loc["applicable"] and "no lesion masks" in loc["reason"]
    # the map's sanity check needs no mask: Adebayo's cascade runs, from the output inwards, but no metric
    # of a block that scores nothing
    cascade = loc["details"]["cascading_randomisation"]
    parts = [name for name, child in model.named_children() if any(True for _ in child.parameters())]
    assert [step["randomised"] for step in cascade] == [list(reversed(parts))[: k + 1] for k in range(len(parts))]
    assert all(-1.0 <= step["spearman_mean"] <= 1.0 for step in cascade) and loc["metrics"] == {}
    from mlmi_zoo.model_cards.card import render_card

    card = render_card(tmp_path / "model", doc)  # the draft card says it under the not-applicable block
    assert f"re-initialising, from the output inwards: `{cascade[0]['randomised'][-1]}`" in card
    rec = doc["elements"]["visual_recognizability"]["metrics"]
    assert "class_purity_mean" in rec and "lesion_purity_mean" not in rec


def test_data_spec_text_round_trip(tmp_path) -> None:
    spec = load_data_spec("nodule_phantom:seed=3,size=32,spacing_range=[0.6, 0.9],train_size=16,val_size=8,test_size=24")
    assert spec.params == {"seed": 3, "size": 32, "spacing_range": [0.6, 0.9]} and spec.test_size == 24
    assert load_data_spec(data_spec_to_text(spec)) == spec
    (tmp_path / "recipe.yaml").write_text("model: {name: x}\ndata:\n  kind: nodule_phantom\n  params: {seed: 3}\n"
                                          "  train_size: 1\n  val_size: 1\n")
    assert load_data_spec(tmp_path / "recipe.yaml").params == {"seed": 3}
    with pytest.raises(ValueError, match="key=value"):
        load_data_spec("nodule_phantom:seed")
    with pytest.raises(FileNotFoundError):
        load_data_spec(tmp_path / "missing.yaml")


def test_cli(tmp_path, capsys) -> None:
    from mlmi_zoo.evaluation.cli import main

    model = create_model("baseline_resnet8", img_size=(32, 32), intensity=WINDOW).eval()
    uri = _save(model, tmp_path / "model", NODULES)
    out = tmp_path / "res" / "results.json"
    assert main(["evaluate", uri, "--data", data_spec_to_text(NODULES), "--out", str(out), "--n-boot", "10",
                 "--max-cases", "12", "--deletion-cases", "5"]) == 0
    doc = json.loads(out.read_text())
    assert validate_results(doc) == [] and doc["n_cases"] == 12
    assert doc["evaluation_limits"]["deletion_cases"] == 5 and "--deletion-cases 5" in doc["command"]
    assert doc["command"].startswith("mlmi-zoo evaluate local-dir:")
    assert (out.parent / doc["figures"]["roc"]).is_file()
    with pytest.raises(SystemExit) as err:
        main(["evaluate", uri, "--out", str(out), "--n-boot", "0"])
    assert err.value.code == 2
    assert "--n-boot must be >= 1" in capsys.readouterr().err
