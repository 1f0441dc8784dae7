"""Cards are generated from results.json and checked against it, the config and the weights."""
from __future__ import annotations

import json
import os

import pytest

import mlmi_zoo
from mlmi_zoo._weights import WeightsError, sha256_file
from mlmi_zoo.evaluation.results import ELEMENTS, SCHEMA_VERSION, element, metric_value, read_results
from mlmi_zoo.model_cards import check_card, write_card
from mlmi_zoo.registry import bundled_dir
from mlmi_zoo.training.datasets.catalog import source_for


def _results_for(folder, **task) -> dict:
    """A schema-valid results document for the weights in ``folder`` (stands in for `evaluate` output)."""
    metrics = {k: {"estimate": v, "low": v - 0.05, "high": min(1.0, v + 0.05)} for k, v in dict(
        auroc=0.91, auprc=0.88, balanced_accuracy=0.83, sensitivity=0.8, specificity=0.86, ece=0.04, brier=0.12, **task).items()}
    elements = {name: element(False, reason="the black-box baseline has no explanation to measure") for name in ELEMENTS}
    elements["transparency"] = element(True, {"decomposition_error_max": 0.0}, does_not_show="anything about correctness")
    return {
        "schema_version": SCHEMA_VERSION,
        "model": {"uri": f"local-dir:{folder}", "architecture": "baseline_resnet8", "family": "baseline",
                  "weights_sha256": sha256_file(folder / "model.safetensors"), "num_parameters": 1234,
                  "label_names": ["benign", "malignant"], "operating_point": 0.5},
        "data": {"kind": "nodule_phantom", "params": {"length": 100, "seed": 3}},
        "split": "test", "n_cases": 100, "command": "mlmi-zoo evaluate local-dir:m --data phantom --out results.json",
        "mlmi_zoo_version": mlmi_zoo.__version__, "seed": 0, "task": metrics, "baseline": None,
        "elements": elements, "faithfulness": None, "figures": {},
    }


@pytest.fixture
def carded(tmp_path):
    model = mlmi_zoo.create_model("baseline_resnet8", img_size=(16, 16), label_names=("benign", "malignant"))
    folder = model.save_pretrained(tmp_path / "baseline_resnet8.test")
    results = tmp_path / "results.json"
    results.write_text(json.dumps(_results_for(folder)))
    write_card(folder, results)
    return folder


def test_generated_card_passes_check_and_parses_on_the_hub(carded) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    assert check_card(carded) == []
    card_data = ModelCard.load(carded / "README.md").data
    assert isinstance(card_data, ModelCardData)
    assert card_data.library_name == "mlmi-zoo"
    stated = {result.metric_type: result.metric_value for result in card_data.eval_results or []}
    assert stated["roc_auc"] == pytest.approx(0.91)
    assert card_data["mlmi_zoo"]["weights_sha256"] == sha256_file(carded / "model.safetensors")
    text = (carded / "README.md").read_text()
    for section in ("Localization", "Visual recognizability", "Physical attribution", "Transparency", "Actionability",
                    "Intended use", "Limitations", "Citation", "research use only".title()[:8]):
        assert section.lower() in text.lower()


@pytest.mark.parametrize("name", mlmi_zoo.list_models(pretrained=True))
def test_card_read_by_the_hub_states_the_auroc_of_results_json_on_its_dataset(name: str) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    folder = bundled_dir() / name
    results = read_results(folder / "results.json")
    source = source_for(results["data"])
    card_data = ModelCard.load(folder / "README.md").data
    assert isinstance(card_data, ModelCardData)
    (auroc,) = [r for r in card_data.eval_results or [] if r.metric_type == "roc_auc"]
    assert auroc.metric_value == pytest.approx(metric_value(results["task"]["auroc"]), abs=1e-6)
    assert (auroc.task_type, auroc.dataset_type, auroc.dataset_name, auroc.dataset_split) == (
        "image-classification", source.hub_id, source.name, results["split"])


def test_card_stating_other_weights_is_refused_by_load(carded) -> None:
    mlmi_zoo.load(f"local-dir:{carded}")
    card = carded / "README.md"
    sha = sha256_file(carded / "model.safetensors")
    # A model-index the Hub cannot parse must not hide the stated sha from the check.
    card.write_text(card.read_text().replace(sha, "f" * 64).replace("  results:\n", "  resultz:\n", 1))
    with pytest.raises(WeightsError, match="the card states sha256 f{64}"):
        mlmi_zoo.load(f"local-dir:{carded}")


def test_tampered_metric_in_body_is_named(carded) -> None:
    card = carded / "README.md"
    text = card.read_text()
    assert "0.91 (0.86–0.96)" in text
    card.write_text(text.replace("0.91 (0.86–0.96)", "0.95 (0.86–0.96)"))
    problems = check_card(carded)
    assert any("0.95" in p and "AUROC" in p for p in problems), problems


def test_tampered_model_index_is_named(carded) -> None:
    card = carded / "README.md"
    card.write_text(card.read_text().replace("value: 0.91\n", "value: 0.97\n", 1))
    assert any("roc_auc is 0.97" in p for p in check_card(carded))


def test_flipped_weights_byte_is_named(carded) -> None:
    weights = carded / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    problems = check_card(carded)
    assert any("sha256" in p and "card" in p for p in problems), problems


def test_placeholder_and_missing_file_fail(carded) -> None:
    card = carded / "README.md"
    card.write_text(card.read_text() + "\nTODO: fill in\n")
    assert any("placeholder" in p for p in check_card(carded))
    os.remove(carded / "results.json")
    assert any("results.json is missing" in p for p in check_card(carded))


def test_results_for_other_weights_are_refused(carded, tmp_path) -> None:
    doc = json.loads((carded / "results.json").read_text())
    doc["model"]["weights_sha256"] = "0" * 64
    other = tmp_path / "other.json"
    other.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="evaluate these weights first"):
        write_card(carded, other)


def test_cli_check_exit_codes(carded) -> None:
    from mlmi_zoo.cli import main

    assert main(["card", "--check", str(carded)]) == 0
    (carded / "README.md").write_text((carded / "README.md").read_text().replace("Brier score", "Brier"))
    assert main(["card", "--check", str(carded)]) == 1


def test_publish_refuses_a_failing_card(carded) -> None:
    (carded / "README.md").write_text("---\nlicense: mit\n---\nhand-written\n")
    with pytest.raises(ValueError, match="card check failed"):
        mlmi_zoo.publish(carded, "org/name", api=object())
