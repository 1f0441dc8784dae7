"""The evidence rules: comparisons with controls, verdicts, and what the evaluation and the card make of them."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import mlmi_zoo
from mlmi_zoo.evaluation.controls import StatisticsControl, image_statistics
from mlmi_zoo.evaluation.evidence import NOT_ASSESSED, compare, compare_auroc, exact_check
from mlmi_zoo.evaluation.verdicts import DEMONSTRATED, NOT_DEMONSTRATED


def _groups(n: int, per_patient: int = 2) -> np.ndarray:
    return np.repeat(np.arange(n // per_patient), per_patient).astype(str)


def test_a_model_that_beats_every_control_is_demonstrated() -> None:
    rng = np.random.default_rng(0)
    model = rng.uniform(0.6, 0.9, 80)
    block = compare("m", model, {"weak": model - 0.3, "weaker": model - 0.5}, _groups(80), n_boot=200)
    assert block["verdict"]["status"] == DEMONSTRATED
    assert block["verdict"]["control"] == "weak"  # the strongest control is named
    assert block["controls"]["weak"]["difference"]["low"] > 0
    assert block["n_patients"] == 40 and block["n_cases"] == 80


def test_one_control_the_model_does_not_beat_makes_it_not_demonstrated() -> None:
    rng = np.random.default_rng(1)
    model = rng.uniform(0.4, 0.9, 60)
    block = compare("m", model, {"weak": model - 0.3, "as good": model + rng.normal(0, 0.05, 60)}, None, n_boot=200)
    assert block["verdict"]["status"] == NOT_DEMONSTRATED
    assert block["verdict"]["control"] == "as good"


def test_lower_is_better_flips_the_difference() -> None:
    errors = np.full(30, 1.0)
    block = compare("error", errors, {"worse": errors + 2.0}, None, higher_is_better=False, n_boot=100)
    assert block["controls"]["worse"]["difference"]["estimate"] == pytest.approx(2.0)
    assert block["verdict"]["status"] == DEMONSTRATED
    block = compare("error", errors, {"better": errors - 0.5}, None, higher_is_better=False, n_boot=100)
    assert block["verdict"]["status"] == NOT_DEMONSTRATED


def test_undefined_cases_are_dropped_from_both_sides() -> None:
    model = np.array([0.9, np.nan, 0.8, 0.7])
    control = np.array([0.1, 0.2, np.nan, 0.1])
    block = compare("m", model, {"c": control}, None, n_boot=50)
    assert block["controls"]["c"]["difference"]["n_cases"] == 2  # cases 0 and 3 only
    assert block["controls"]["c"]["difference"]["estimate"] == pytest.approx(((0.9 - 0.1) + (0.7 - 0.1)) / 2)


def test_auroc_comparison_is_paired_on_the_same_cases() -> None:
    rng = np.random.default_rng(2)
    y = np.tile([0, 1], 50)
    good = y + rng.normal(0, 0.3, 100)
    block = compare_auroc("AUROC", good, {"chance": rng.normal(0, 1, 100), "itself": good}, y, _groups(100), n_boot=200)
    assert block["controls"]["itself"]["difference"]["estimate"] == 0.0
    assert block["controls"]["itself"]["difference"]["high"] == 0.0  # identical scores differ by 0 in every resample
    assert block["verdict"]["status"] == NOT_DEMONSTRATED and block["verdict"]["control"] == "itself"
    assert block["controls"]["chance"]["difference"]["low"] > 0


def test_exact_check_passes_only_within_tolerance() -> None:
    assert exact_check("x", 1e-7, 1e-5, 10, "done")["verdict"]["status"] == DEMONSTRATED
    assert exact_check("x", 1e-3, 1e-5, 10, "done")["verdict"]["status"] == NOT_DEMONSTRATED
    assert exact_check("x", float("nan"), 1e-5, 0, "done")["verdict"]["status"] == NOT_DEMONSTRATED


def test_image_statistics_control_learns_a_brightness_rule_and_nothing_from_noise() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, 1, 16, 16, generator=g)
    y = (torch.arange(200) % 2).numpy()
    x[y == 1] += 0.3  # a label that image statistics can read
    features = image_statistics(x)
    assert features.shape == (200, 11)
    control = StatisticsControl("classification").fit(features[:100], y[:100])
    accuracy = (control.predict(features[100:]).argmax(1) == y[100:]).mean()
    assert accuracy > 0.95
    with pytest.raises(ValueError, match="2 classes"):
        StatisticsControl("classification").fit(features, np.zeros(200))


@pytest.fixture(scope="module")
def phantom_doc() -> dict:
    from mlmi_zoo.evaluation.evaluate import evaluate

    return evaluate("protopnet_resnet8.nodule_phantom", None, split="test", max_cases=32, n_boot=100)


def test_every_element_of_a_bundled_model_gets_a_verdict(phantom_doc) -> None:
    verdicts = phantom_doc["verdicts"]
    assert set(verdicts) == {"localization", "visual_recognizability", "physical_attribution", "transparency",
                             "actionability", "faithfulness"}
    allowed = {DEMONSTRATED, NOT_DEMONSTRATED, NOT_ASSESSED, "not applicable"}
    assert all(v["status"] in allowed for v in verdicts.values())
    loc = phantom_doc["elements"]["localization"]["evidence"]
    assert set(loc["controls"]) == {"centre_prior", "uniform", "random", "brightness", "untrained_copy"}
    # the verdict follows the numbers: demonstrated exactly when every control's lower bound is above 0
    beaten = all(c["difference"]["low"] > 0 for c in loc["controls"].values())
    assert (verdicts["localization"]["status"] == DEMONSTRATED) == beaten
    # the exact in-model switch-off test ran on every prototype
    transparency = phantom_doc["elements"]["transparency"]["evidence"]
    assert transparency["n_cases"] >= 2 * 20 and transparency["max_error"] <= 1e-5
    # the prototype sanity counts are in the card's numbers
    metrics = phantom_doc["elements"]["visual_recognizability"]["metrics"]
    assert {"prototypes_on_border", "prototypes_duplicates", "prototypes_degenerate_share"} <= set(metrics)
    assert json.dumps(phantom_doc, allow_nan=False)  # strict JSON


def test_the_switch_off_test_fails_a_model_whose_switch_does_not_do_what_the_explanation_says(monkeypatch) -> None:
    from mlmi_zoo.architectures.protopnet.evaluation import _switch_off_all
    from mlmi_zoo.evaluation._collect import _Collected
    from mlmi_zoo.evaluation._common import EvaluationLimits

    model = mlmi_zoo.load("protopnet_resnet8.nodule_phantom").eval()
    col = _Collected()
    col.keep_x = [torch.rand(4, 1, 64, 64)]

    class Ctx:
        limits = EvaluationLimits()
        seed = 0

    assert _switch_off_all(model, col, Ctx())["verdict"]["status"] == DEMONSTRATED
    monkeypatch.setattr(type(model), "disable_prototypes", lambda self, ids: None)  # a switch that does nothing
    assert _switch_off_all(model, col, Ctx())["verdict"]["status"] == NOT_DEMONSTRATED


def test_the_card_shows_the_verdicts(tmp_path, phantom_doc) -> None:
    import shutil

    from mlmi_zoo.model_cards.card import render_card
    from mlmi_zoo.registry import bundled_dir

    folder = tmp_path / "m"
    shutil.copytree(bundled_dir() / "protopnet_resnet8.nodule_phantom", folder)
    text = render_card(folder, phantom_doc)
    assert "## Evidence: each element against the controls that could fake it" in text
    for verdict in phantom_doc["verdicts"].values():
        assert f"**{verdict['status']}**" in text
    assert "Controls of activation precision (top 5%)" in text


def test_off_centre_cases_move_the_lesion_and_keep_it_whole() -> None:
    from mlmi_zoo.evaluation.controls import OffCentre

    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[0, 28:36, 28:36] = True
    cases = [{"image": torch.rand(1, 64, 64), "mask": mask, "label": 1}] * 50
    shifted = OffCentre(cases, seed=3)
    centres = []
    for i in range(len(shifted)):
        s = shifted[i]
        assert int(s["mask"].sum()) == 64  # the whole lesion is still inside the crop
        dy, dx = (int(v) for v in s["offset_px"])
        assert bool(s["mask"][0, 28 + dy, 28 + dx]) and abs(dy) <= 16 and abs(dx) <= 16
        centres.append(torch.nonzero(s["mask"][0]).float().mean(0))
    spread = torch.stack(centres).std(0)
    assert (spread > 5).all()  # lesions land far from the centre, in both axes
    again = OffCentre(cases, seed=3)[7]
    assert torch.equal(again["offset_px"], shifted[7]["offset_px"])  # fixed by the seed


def test_lesion_centred_localization_needs_both_placements(phantom_doc) -> None:
    loc = phantom_doc["elements"]["localization"]
    assert "off_centre" in loc and "evidence" in loc["off_centre"]
    both = (loc["evidence"]["verdict"]["status"] == DEMONSTRATED
            and loc["off_centre"]["evidence"]["verdict"]["status"] == DEMONSTRATED)
    assert (phantom_doc["verdicts"]["localization"]["status"] == DEMONSTRATED) == both
    assert "off-centre crops" in phantom_doc["verdicts"]["localization"]["sentence"]


def test_a_model_that_reads_back_its_own_readers_rating_gains_nothing_leave_reader_out() -> None:
    from mlmi_zoo.evaluation.recognizability import agreement, inter_reader_agreement, leave_reader_out_pairs

    rng = np.random.default_rng(0)
    nodules = np.repeat(np.arange(60), 3).astype(str)
    truth = np.repeat(rng.integers(1, 6, 60), 3).astype(float)
    ratings = np.clip(truth + rng.integers(-1, 2, truth.size), 1, 5)  # three noisy readers per nodule
    model = ratings.copy()  # the image encodes its own reader's rating, and the model reads it back
    same_reader = agreement(model, ratings, "quadratic", range(1, 6))
    m_i, r_j, r_i, _ = leave_reader_out_pairs(model, ratings, nodules.tolist())
    lro = agreement(m_i, r_j, "quadratic", range(1, 6))
    inter = inter_reader_agreement({n: ratings[nodules == n].tolist() for n in np.unique(nodules)}, "quadratic", range(1, 6))
    assert same_reader == pytest.approx(1.0)  # scored against its own reader the copy looks perfect
    assert lro == pytest.approx(inter)  # left out, it is exactly one more reader
    assert len(m_i) == 60 * 3 * 2


@pytest.mark.parametrize("kind,train,other,key", [
    ("mias", {"women": [1, 2, 3]}, {"women": [3, 4]}, "woman 3"),
    ("idrid", {"image_ids": ["IDRiD_001", "IDRiD_002"]}, {"image_ids": ["IDRiD_002"]}, "IDRiD_002"),
])
def test_split_overlap_is_checked_for_the_real_photograph_sets(kind, train, other, key) -> None:
    from mlmi_zoo.evaluation._data import check_split_overlap

    source = {"Info.txt": "abc"} if kind == "mias" else {"set": "grading", "md5_of_listing": "abc"}
    trained = {"kind": kind, "source": source, "splits": {"train": train}}
    with pytest.raises(ValueError, match=key):
        check_split_overlap(trained, {"kind": kind, "source": source, "splits": {"test": other}}, "test")
    disjoint = {"women": [9]} if kind == "mias" else {"image_ids": ["IDRiD_099"]}
    assert check_split_overlap(trained, {"kind": kind, "source": source, "splits": {"test": disjoint}}, "test") is None


def test_idrid_photographs_of_different_official_parts_are_different_cases() -> None:
    """IDRiD numbers the photographs of its official train and test parts both from IDRiD_001."""
    from mlmi_zoo.evaluation._data import check_split_overlap

    source = {"set": "grading", "md5_of_listing": "abc"}
    trained = {"kind": "idrid", "source": source,
               "splits": {"train": {"official_part": "train", "image_ids": ["IDRiD_001", "IDRiD_002"]}}}
    test = {"official_part": "test", "image_ids": ["IDRiD_001"]}
    assert check_split_overlap(trained, {"kind": "idrid", "source": source, "splits": {"test": test}}, "test") is None
    val = {"official_part": "train", "image_ids": ["IDRiD_002"]}
    with pytest.raises(ValueError, match="IDRiD_002"):
        check_split_overlap(trained, {"kind": "idrid", "source": source, "splits": {"val": val}}, "val")


def test_protopnet_actionability_control_tells_a_ranked_explanation_from_a_flat_one() -> None:
    """Disabling the case's top prototype must cost more decision margin than disabling a random one."""
    from types import SimpleNamespace

    from mlmi_zoo.architectures.protopnet.evaluation import _disable_top_vs_random
    from mlmi_zoo.evaluation._collect import _Collected

    g = torch.Generator().manual_seed(0)
    n, c, p = 200, 2, 10
    ctx = SimpleNamespace(seed=0, n_boot=200)
    col = _Collected()
    col.n_cases, col.has_groups = n, False
    ranked = torch.rand(n, c, p, generator=g) * 0.1
    winner = torch.randint(c, (n,), generator=g)
    ranked[torch.arange(n), winner, torch.randint(p, (n,), generator=g)] += 3.0  # one prototype decides each case
    logits = ranked.sum(-1)
    top = ranked[torch.arange(n), logits.argmax(-1)].argmax(-1)
    every = torch.ones(p, dtype=torch.bool)
    ranked_block = _disable_top_vs_random(logits, ranked, top, col, ctx, every)
    assert ranked_block["verdict"]["status"] == "demonstrated"
    # the random prototype is drawn among the enabled ones only: with one enabled, it is the top one itself
    only = torch.zeros(p, dtype=torch.bool)
    only[3] = True
    same = _disable_top_vs_random(logits, ranked, torch.full((n,), 3), col, ctx, only)
    assert same["verdict"]["status"] != "demonstrated" and same["verdict"]["difference"]["estimate"] == 0
    assert set(ranked_block["controls"]) == {"random_prototype"}
    flat = torch.zeros(n, c, p)
    flat[torch.arange(n), winner] = 0.3  # every prototype of the winning class contributes the same
    flat_logits = flat.sum(-1)
    flat_top = flat[torch.arange(n), flat_logits.argmax(-1)].argmax(-1)
    flat_block = _disable_top_vs_random(flat_logits, flat, flat_top, col, ctx, every)
    assert flat_block["verdict"]["status"] != "demonstrated"


def _reader_case_collection(readers: np.ndarray, model_levels: np.ndarray, patients: list[str]):
    from mlmi_zoo.evaluation._collect import _Collected
    from mlmi_zoo.specs import ConceptSpec

    spec = ConceptSpec("spiculation", "ordinal", levels=tuple(str(k) for k in range(1, 6)))
    col = _Collected()
    col.concept_pred["spiculation"] = [torch.nn.functional.one_hot(torch.as_tensor(model_levels), 5).double()]
    col.reader_concepts["spiculation"] = [torch.as_tensor(readers, dtype=torch.float64)]
    col.n_cases = len(readers)
    col.add_groups(patients)
    return type("Model", (), {"concept_specs": (spec,)})(), col


def test_model_reader_agreement_pairs_the_model_with_each_reader_as_readers_are_paired() -> None:
    from mlmi_zoo.architectures.cbm.evaluation import _reader_agreement
    from mlmi_zoo.evaluation.recognizability import inter_reader_agreement, model_reader_agreement

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 5, 90)
    readers = np.full((90, 8), np.nan)
    readers[:, :3] = np.clip(truth[:, None] + rng.integers(-1, 2, (90, 3)), 0, 4)
    readers[:30, 1:] = np.nan  # one reader only: counted in model-reader agreement, in no pair
    patients = [f"p{i // 2}" for i in range(90)]

    # A model that agrees with every reader exactly when they all agree: kappas 1, margin 0.
    same = np.repeat(truth[:, None], 8, 1).astype(float)
    same[:, 3:] = np.nan
    model, col = _reader_case_collection(same, truth, patients)
    details: dict = {}
    m = _reader_agreement(model, col, details)
    assert m["spiculation_model_reader_kappa"] == pytest.approx(1.0)
    assert m["spiculation_inter_reader_kappa"] == pytest.approx(1.0)
    assert m["spiculation_model_minus_inter_reader_kappa"]["estimate"] == pytest.approx(0.0)

    # Noisy readers: the two kappas are the library's own, on the same cases; a constant model loses clearly.
    model, col = _reader_case_collection(readers, truth, patients)
    details = {}
    m = _reader_agreement(model, col, details)
    by = {str(i): readers[i][np.isfinite(readers[i])].tolist() for i in range(90)}
    assert m["spiculation_inter_reader_kappa"] == pytest.approx(inter_reader_agreement(by, "quadratic", range(5)))
    assert m["spiculation_model_reader_kappa"] == pytest.approx(
        model_reader_agreement({str(i): float(v) for i, v in enumerate(truth)}, by, "quadratic", range(5)))
    record = details["spiculation"]["reader_agreement"]
    assert record["readings"] == 30 + 60 * 3 and record["model_minus_inter_reader"]["patients"] == 30  # cases 30..89
    model, col = _reader_case_collection(readers, np.full(90, 2), patients)
    m = _reader_agreement(model, col, {})
    assert m["spiculation_model_minus_inter_reader_kappa"]["high"] < 0


def test_left_out_a_model_that_reads_back_the_other_reader_is_exactly_one_more_reader() -> None:
    from mlmi_zoo.architectures.cbm.evaluation import _pairs_leaving_out
    from mlmi_zoo.evaluation.recognizability import agreement

    rng = np.random.default_rng(1)
    readers = np.full((50, 8), np.nan)
    readers[:, :2] = rng.integers(0, 5, (50, 2))  # two readers per nodule
    own = np.full((50, 8), np.nan)
    own[:, 0], own[:, 1] = readers[:, 1], readers[:, 0]  # drawn without reader q, the model sees the other reader
    m, rq, rp, case, _ = _pairs_leaving_out(own, readers)
    assert len(m) == 100 and np.array_equal(m, rp)  # the model's pairs are exactly the readers' pairs
    assert agreement(m, rq, "quadratic", range(5)) == pytest.approx(agreement(rp, rq, "quadratic", range(5)))
    assert sorted(set(case.tolist())) == list(range(50))
