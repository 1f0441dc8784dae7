"""Metric kernels against hand-computed cases, and the figures writing real PNGs."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from mlmi_zoo.evaluation import (
    activation_precision,
    agreement,
    bland_altman,
    bootstrap_ci,
    concept_metrics,
    decomposition_error,
    deletion_curve,
    expected_calibration_error,
    explanation_size,
    faithfulness_gap,
    insertion_curve,
    instance_auroc,
    instance_deletion_curve,
    inter_reader_agreement,
    mae,
    model_reader_agreement,
    pointing_game,
    prototype_purity,
    reliability_bins,
    rmse,
    task_metrics,
    unique_prototypes,
)
from mlmi_zoo.explanations import Explanation


# -- task metrics ---------------------------------------------------------------------------------
def test_task_metrics_known_auroc_and_rates() -> None:
    # positives 0.35, 0.8; negatives 0.1, 0.4 -> 3 of 4 pairs ordered -> AUROC 0.75
    out = task_metrics(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]), n_boot=50)
    assert out["auroc"].estimate == pytest.approx(0.75)
    # threshold 0.5: predictions 0, 0, 0, 1 -> sensitivity 1/2, specificity 2/2
    assert out["sensitivity"].estimate == pytest.approx(0.5)
    assert out["specificity"].estimate == pytest.approx(1.0)
    assert out["balanced_accuracy"].estimate == pytest.approx(0.75)
    # Brier: mean of 0.01, 0.16, 0.4225, 0.04
    assert out["brier"].estimate == pytest.approx((0.01 + 0.16 + 0.4225 + 0.04) / 4)
    # a lower operating point flips the 0.35 case to positive
    low = task_metrics(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]), operating_point=0.3, n_boot=10)
    assert low["sensitivity"].estimate == pytest.approx(1.0)
    assert low["specificity"].estimate == pytest.approx(0.5)


def test_task_metrics_multiclass_and_refusals() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]])
    labels = torch.tensor([0, 1, 2, 1])
    out = task_metrics(probs, labels, n_boot=20)
    # class-wise one-vs-rest AUROC: class 0 = 1, class 1 = 1, class 2 = 1 -> macro 1
    assert out["auroc"].estimate == pytest.approx(1.0)
    # arg-max predictions 0, 1, 2, 0 -> recalls 1, 1/2, 1
    assert out["sensitivity"].estimate == pytest.approx((1 + 0.5 + 1) / 3)
    assert out["balanced_accuracy"].estimate == pytest.approx((1 + 0.5 + 1) / 3)
    expected_brier = ((0.09 + 0.04 + 0.01) + (0.01 + 0.04 + 0.01) + (0.04 + 0.04 + 0.16) + (0.25 + 0.36 + 0.01)) / 4
    assert out["brier"].estimate == pytest.approx(expected_brier)
    # arg-max 0, 1, 2, 0: per-class TN / (TN + FP) = 2/3, 2/2, 3/3
    assert out["specificity"].estimate == pytest.approx((2 / 3 + 1 + 1) / 3)
    with pytest.raises(ValueError, match="sum to 1"):
        task_metrics(torch.randn(4, 3) * 5, labels, n_boot=5)
    with pytest.raises(ValueError, match="labels must lie"):
        task_metrics(probs, torch.tensor([0, 1, 3, 1]), n_boot=5)


@pytest.mark.parametrize("n_classes", [2, 4])
def test_task_auroc_equals_scikit_learn_on_random_data(n_classes: int) -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(n_classes)
    logits = rng.normal(size=(300, n_classes))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, n_classes, 300)
    expected = roc_auc_score(labels, probs[:, 1]) if n_classes == 2 else roc_auc_score(labels, probs, multi_class="ovr")
    assert task_metrics(probs, labels, n_boot=5)["auroc"].estimate == expected


def test_concept_auroc_is_the_mean_over_the_levels_present() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(5)
    scores = rng.random((300, 4))  # four levels; level 3 never occurs in the ground truth
    levels = rng.integers(0, 3, 300).astype(float)
    levels[::7] = np.nan  # missing ground truth is left out
    keep = ~np.isnan(levels)
    per_level = [roc_auc_score(levels[keep] == lv, scores[keep, lv]) for lv in range(3)]
    assert concept_metrics(scores, levels, "categorical")["auroc"] == pytest.approx(np.mean(per_level), abs=1e-15)


def test_reliability_bins_match_scikit_learn_calibration_curve() -> None:
    from sklearn.calibration import calibration_curve

    rng = np.random.default_rng(4)
    probs, labels = rng.random(500), rng.integers(0, 2, 500)
    stats = reliability_bins(probs, labels, n_bins=10)
    confidence, correct = np.maximum(probs, 1 - probs), (probs >= 0.5) == labels
    accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=10)
    used = stats["count"] > 0
    assert stats["count"].sum() == 500 and used.sum() == 5  # top-label confidence lies in [0.5, 1]
    np.testing.assert_allclose(stats["accuracy"][used], accuracy, rtol=1e-12)
    np.testing.assert_allclose(stats["confidence"][used], mean_confidence, rtol=1e-12)
    # right-closed bins: a confidence of exactly 0.75 with 4 bins joins (0.5, 0.75], not (0.75, 1]
    assert reliability_bins(np.array([0.75]), np.array([1]), n_bins=4)["count"].tolist() == [0, 0, 1, 0]


def test_ece_perfectly_calibrated_and_overconfident() -> None:
    # 10 cases at P(pos) = 0.8 with 8 positives; 5 cases at P(pos) = 0.4 (confidence 0.6) with 3 negatives
    probs = np.r_[np.full(10, 0.8), np.full(5, 0.4)]
    labels = np.r_[np.ones(8), np.zeros(2), np.zeros(3), np.ones(2)].astype(int)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)
    assert task_metrics(probs, labels, n_boot=20)["ece"].estimate == pytest.approx(0.0, abs=1e-12)
    # confidence 0.9 everywhere, accuracy 0.5 -> ECE 0.4
    overconfident = np.tile([[0.9, 0.1]], (4, 1))
    assert expected_calibration_error(overconfident, np.array([0, 0, 1, 1])) == pytest.approx(0.4)


# -- bootstrap ------------------------------------------------------------------------------------
def test_bootstrap_ci_contains_estimate_and_is_deterministic() -> None:
    values = np.random.default_rng(1).normal(2.0, 1.0, 200)
    ci = bootstrap_ci(np.mean, values, n=300, seed=3)
    assert ci.low < ci.estimate < ci.high
    assert ci.estimate == pytest.approx(values.mean())
    assert ci.n == 300
    assert bootstrap_ci(np.mean, values, n=300, seed=3) == ci
    assert bootstrap_ci(np.mean, values, n=300, seed=4) != ci
    # standard error of the mean ~ 1/sqrt(200): the 95% interval is about +-0.14 wide
    assert 0.1 < ci.high - ci.low < 0.4


def test_bootstrap_resamples_whole_groups() -> None:
    values = np.array([0.0, 0.0, 0.0, 1.0])
    groups = np.array(["p1", "p1", "p1", "p2"])
    seen: list[tuple[int, float]] = []

    def record(v: np.ndarray) -> float:
        seen.append((len(v), float(v.mean())))
        return float(v.mean())

    bootstrap_ci(record, values, n=200, seed=0, groups=groups)
    resamples = seen[1:]  # the first call is the point estimate
    # two patients drawn with replacement: (p1,p1) -> 6 cases mean 0; (p1,p2) -> 4 cases mean 1/4; (p2,p2) -> 2 cases mean 1
    assert {(n, round(m, 6)) for n, m in resamples} <= {(6, 0.0), (4, 0.25), (2, 1.0)}
    assert len({n for n, _ in resamples}) == 3
    seen.clear()
    bootstrap_ci(record, values, n=200, seed=0)
    assert {n for n, _ in seen} == {4}
    assert any(round(m, 6) in (0.5, 0.75) for _, m in seen)  # case-level mixes that groups cannot


def test_bootstrap_skips_undefined_resamples() -> None:
    labels = np.array([0, 0, 0, 0, 0, 1])
    probs = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.9])
    ci = task_metrics(probs, labels, n_boot=60)["auroc"]
    # P(no positive in a resample of 6) = (5/6)^6 ~ 0.33: about 40 of 60 are used (sd ~ 3.6)
    assert 25 < ci.n < 55
    assert ci.estimate == pytest.approx(1.0)


def test_bootstrap_over_groups_draws_whole_groups_and_counts_groups() -> None:
    # 12 patients with 1..4 images each; the statistic sees the patient id of every drawn image
    sizes = np.array([1, 2, 3, 4] * 3)
    patient = np.repeat(np.arange(12), sizes)
    draws: list[np.ndarray] = []

    def distinct_patients(ids: np.ndarray) -> float:
        draws.append(ids)
        return float(np.unique(ids).size)

    ci = bootstrap_ci(distinct_patients, patient, n=300, seed=5, groups=patient)
    assert ci.estimate == 12.0 and ci.n == 300
    for ids in draws[1:]:
        drawn, images = np.unique(ids, return_counts=True)
        copies = images / sizes[drawn]
        assert np.all(copies == np.round(copies))  # a drawn patient comes with all of its images
        assert copies.sum() == 12  # 12 patients drawn with replacement, not 30 images
    # about 1 - 1/e of the patients appear in a resample (7.6 of 12); never more than 12
    assert 6.0 <= ci.low < ci.high <= 10.0
    draws.clear()
    bootstrap_ci(distinct_patients, patient, n=50, seed=5)
    assert all(ids.size == patient.size for ids in draws)
    assert any(np.any(np.bincount(ids, minlength=12) % sizes != 0) for ids in draws[1:])  # cases split patients


def test_bootstrap_is_reproducible_by_seed_and_refuses_no_resamples() -> None:
    values = np.random.default_rng(2).normal(size=60)
    groups = np.arange(60) // 3
    first = bootstrap_ci(np.mean, values, n=200, seed=11, groups=groups)
    assert bootstrap_ci(np.mean, values, n=200, seed=11, groups=groups) == first
    assert bootstrap_ci(np.mean, values, n=200, seed=12, groups=groups) != first
    # a single patient: every resample is the data itself
    one = bootstrap_ci(np.mean, values, n=20, groups=np.zeros(60))
    assert one.low == one.high == one.estimate and one.n == 20
    with pytest.raises(ValueError, match="must be >= 1"):
        bootstrap_ci(np.mean, values, n=0)


def test_bootstrap_pairs_two_models_on_the_same_draw() -> None:
    # the same scores passed twice: every resample sees identical rows, so the difference is exactly 0
    rng = np.random.default_rng(3)
    y, a = rng.integers(0, 2, 80), rng.random(80)
    diff = bootstrap_ci(lambda s, t, yy: float(np.mean((s - yy) ** 2) - np.mean((t - yy) ** 2)), a, a.copy(), y,
                        n=100, groups=np.arange(80) // 4)
    assert diff.low == diff.high == 0.0


# -- localization ---------------------------------------------------------------------------------
def test_activation_precision_map_inside_mask_is_one() -> None:
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    mask[:, :, 2:6, 2:6] = True  # 16 pixels > ceil(0.05 * 64) = 4
    maps = torch.rand(2, 8, 8) * mask[:, 0]
    assert torch.equal(activation_precision(maps, mask), torch.ones(2, dtype=torch.float64))
    # empty masks are NaN, not 0
    assert torch.isnan(activation_precision(maps, torch.zeros(2, 8, 8, dtype=torch.bool))).all()


def test_activation_precision_ties_take_lower_index_first() -> None:
    flat = torch.zeros(1, 10, 10)
    top_row = torch.zeros(1, 10, 10, dtype=torch.bool)
    top_row[:, 0] = True
    # a constant map: the top 5 pixels are flat indices 0..4, all in the first row
    assert activation_precision(flat, top_row, q=0.05).item() == 1.0
    assert activation_precision(flat, ~top_row, q=0.05).item() == 0.0


def test_activation_precision_random_map_on_ten_percent_mask() -> None:
    gen = torch.Generator().manual_seed(0)
    b, n = 20, 100 * 100
    masks = torch.zeros(b, n, dtype=torch.bool)
    for i in range(b):
        masks[i, torch.randperm(n, generator=gen)[: n // 10]] = True
    maps = torch.rand(b, n, generator=gen)
    precision = activation_precision(maps.reshape(b, 100, 100), masks.reshape(b, 100, 100), q=0.05)
    # 500 draws per map, 20 maps: standard error ~ 0.003
    assert precision.mean().item() == pytest.approx(0.1, abs=0.02)


def test_pointing_game_with_tolerance() -> None:
    maps = torch.zeros(1, 8, 8)
    maps[0, 2, 3] = 1.0
    inside = torch.zeros(1, 8, 8, dtype=torch.bool)
    inside[0, 1:4, 2:5] = True
    near = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    near[0, 0, 2, 5] = True  # two columns away
    assert pointing_game(maps, inside).tolist() == [1.0]
    assert pointing_game(maps, near).tolist() == [0.0]
    assert pointing_game(maps, near, tolerance_px=1).tolist() == [0.0]
    assert pointing_game(maps, near, tolerance_px=2).tolist() == [1.0]
    volume = torch.zeros(1, 4, 4, 4)
    volume[0, 1, 2, 3] = 1.0
    assert pointing_game(volume, volume > 0).tolist() == [1.0]


def test_instance_auroc_ignores_padding() -> None:
    scores = torch.tensor([[0.9, 0.2, 0.99], [0.8, 0.3, 0.99]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    out = instance_auroc(scores, labels, mask)
    assert out == {"auroc": 1.0, "ap": 1.0, "n_instances": 4, "n_positive": 2}
    # with the padding counted, two negatives outrank every positive: 4 of 8 pairs ordered
    assert instance_auroc(scores, labels)["auroc"] == pytest.approx(0.5)
    assert math.isnan(instance_auroc(scores, torch.zeros(2, 3), mask)["auroc"])


# -- physical attribution -------------------------------------------------------------------------
def test_bland_altman_hand_computed() -> None:
    pred = torch.tensor([12.0, 14.0, 16.0, float("nan")])
    ref = torch.tensor([10.0, 10.0, 10.0, 10.0])
    ba = bland_altman(pred, ref)
    # differences 2, 4, 6: bias 4, sd 2 (ddof 1), limits 4 -+ 3.92
    assert (ba.bias, ba.sd, ba.n) == (pytest.approx(4.0), pytest.approx(2.0), 3)
    assert ba.lower == pytest.approx(0.08) and ba.upper == pytest.approx(7.92)
    half = 4.302653 * 2.0 / math.sqrt(3)  # t(0.975, 2 dof) * sd / sqrt(n)
    assert ba.bias_ci == pytest.approx((4.0 - half, 4.0 + half), abs=1e-5)
    assert ba.upper_ci[0] < ba.upper < ba.upper_ci[1]
    assert mae(pred, ref) == pytest.approx(4.0)
    assert rmse(pred, ref) == pytest.approx(math.sqrt((4 + 16 + 36) / 3))


# -- transparency ---------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class _AdditiveExplanation(Explanation):
    decomposable = True
    contributions: torch.Tensor  # (B, C, K)
    bias: torch.Tensor  # (C,)

    def logits_from_contributions(self) -> torch.Tensor:
        return self.contributions.sum(-1) + self.bias


def test_decomposition_error() -> None:
    contributions = torch.arange(12.0).reshape(2, 2, 3)
    bias = torch.tensor([0.5, -0.5])
    logits = contributions.sum(-1) + bias
    exact = _AdditiveExplanation(logits=logits, contributions=contributions, bias=bias)
    assert decomposition_error(exact) == 0.0
    off = logits.clone()
    off[1, 0] += 1e-3
    shifted = _AdditiveExplanation(logits=off, contributions=contributions, bias=bias)
    assert decomposition_error(shifted) == pytest.approx(1e-3, abs=1e-6)  # float32 round-off at 12.5
    assert math.isnan(decomposition_error(Explanation(logits=logits)))


def test_explanation_size_hand_case() -> None:
    contributions = torch.zeros(2, 2, 5)
    contributions[0, 1] = torch.tensor([5.0, -2.0, 3.0, 0.0, 2.0])  # positives 5, 3, 2: 90% of 10 needs 3
    contributions[0, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])
    contributions[1, 0] = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0])
    contributions[1, 1] = torch.tensor([-1.0, -1.0, 0.0, 0.0, 0.0])
    out = explanation_size(contributions, torch.tensor([1, 0]))
    assert out["per_case_nonzero"] == [4, 1]
    assert out["per_case_terms_needed"] == [3, 1]
    assert (out["nonzero_mean"], out["terms_needed_mean"], out["num_terms"]) == (2.5, 2.0, 5)
    # the default class is the one with the largest summed contribution: the same here
    assert explanation_size(contributions)["per_case_terms_needed"] == [3, 1]
    assert explanation_size(contributions[:, 1], fraction=0.5)["per_case_terms_needed"] == [1, 0]


# -- faithfulness ---------------------------------------------------------------------------------
class _Linear(torch.nn.Module):
    """Class-1 logit = sum(w * x), class-0 logit = 0."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = (x[:, 0] * self.w).flatten(1).sum(1)
        return torch.stack([torch.zeros_like(score), score], 1)


def test_deletion_and_insertion_on_linear_model() -> None:
    w = torch.tensor([[4.0, 3.0], [2.0, 1.0]])
    model, x = _Linear(w), torch.ones(1, 1, 2, 2)
    deletion = deletion_curve(model, x, w[None], steps=4, score="logit", class_index=1)
    assert deletion.fractions.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert deletion.scores.tolist() == [10.0, 6.0, 3.0, 1.0, 0.0]
    assert deletion.auc == pytest.approx(0.25 * (5 + 6 + 3 + 1 + 0))
    insertion = insertion_curve(model, x, w[None], steps=4, score="logit")  # predicted class is 1
    assert insertion.scores.tolist() == [0.0, 4.0, 7.0, 9.0, 10.0]
    # the baseline replaces removed pixels: baseline 1 leaves a ones image unchanged
    assert deletion_curve(model, x, w[None], steps=4, baseline=1.0, score="logit").scores.tolist() == [10.0] * 5


def test_faithfulness_gap_is_positive_for_true_attribution() -> None:
    w = torch.rand(8, 8) + 0.1
    model, x = _Linear(w), torch.ones(3, 1, 8, 8)
    maps = w.expand(3, 8, 8)
    # removing the largest terms first gives the lowest possible curve
    assert faithfulness_gap(model, x, maps, steps=16, score="logit") > 0.5
    assert faithfulness_gap(model, x, -maps, steps=16, score="logit") < 0
    random = deletion_curve(model, x, maps, order="random", seed=5, score="logit")
    assert torch.equal(random.scores, deletion_curve(model, x, maps, order="random", seed=5, score="logit").scores)


def test_instance_deletion_curve_skips_padding() -> None:
    feats = torch.tensor([[5.0, 3.0, 1.0, 100.0], [2.0, 1.0, 100.0, 100.0]])[..., None]  # (B, N, 1)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])

    def bag_logits(f: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        total = (f[..., 0] * m).sum(1)
        return torch.stack([torch.zeros_like(total), total], 1)

    curve = instance_deletion_curve(bag_logits, feats, mask, feats[..., 0], steps=3, score="logit", min_keep=0)
    # bag 1 loses 0, 1, 2, 3 instances; bag 2 (2 instances) loses round(2 s / 3) = 0, 1, 1, 2
    assert curve.per_case.tolist() == [[9.0, 4.0, 1.0, 0.0], [3.0, 1.0, 1.0, 0.0]]
    kept = instance_deletion_curve(bag_logits, feats, mask, feats[..., 0], steps=3, score="logit")
    assert kept.per_case.tolist() == [[9.0, 4.0, 1.0, 1.0], [3.0, 1.0, 1.0, 1.0]]


# -- concepts, readers, prototypes ----------------------------------------------------------------
def test_concept_metrics_by_kind() -> None:
    binary = concept_metrics([0.9, 0.2, 0.6, 0.4, 0.7], [1, 0, 0, 1, float("nan")], "binary")
    # AUROC: 3 of 4 positive-negative pairs ordered; F1 at 0.5: TP 1, FP 1, FN 1 -> 0.5
    assert binary == {"auroc": 0.75, "f1": 0.5, "accuracy": 0.5, "n": 4}
    continuous = concept_metrics([1.0, 2.0, 3.0], [2.0, 2.0, float("nan")], "continuous")
    assert continuous["mae"] == pytest.approx(0.5) and continuous["rmse"] == pytest.approx(math.sqrt(0.5))
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.6, 0.3]])
    ordinal = concept_metrics(probs, [0, 1, 2], "ordinal")
    assert ordinal["accuracy"] == pytest.approx(2 / 3)
    assert ordinal["kappa"] == pytest.approx(2 / 3)  # same table as test_weighted_kappa_hand_computed
    with pytest.raises(ValueError, match="kind must be"):
        concept_metrics([0.1], [0.0], "nominal")


def test_weighted_kappa_hand_computed() -> None:
    # quadratic weights (i-j)^2/4 on 1..3; observed disagreement 1/12, expected 1/4 -> 1 - 1/3
    assert agreement([1, 2, 3], [1, 2, 2]) == pytest.approx(2 / 3)
    assert agreement([1, 5, 3], [1, 5, 3]) == pytest.approx(1.0)
    # the scale spans every integer between the extremes: 1 vs 2 costs less on 1..5 than on {1, 2, 5}
    full_scale = agreement([1, 2, 5, 5], [2, 1, 5, 5], labels=range(1, 6))
    assert agreement([1, 2, 5, 5], [2, 1, 5, 5]) == pytest.approx(full_scale)
    assert agreement([1, 2, 5, 5], [2, 1, 5, 5], labels=[1, 2, 5]) < full_scale


def test_inter_reader_agreement_pairs_within_nodules() -> None:
    ratings = {"n1": [1.0, 2.0, 3.0], "n2": [2.0, 2.0], "n3": [4.0, float("nan")]}
    pairs = [(1, 2), (1, 3), (2, 1), (2, 3), (3, 1), (3, 2), (2, 2), (2, 2)]
    expected = agreement([a for a, _ in pairs], [b for _, b in pairs])
    assert inter_reader_agreement(ratings) == pytest.approx(expected)
    assert inter_reader_agreement({"n1": [3.0, 2.0, 1.0], "n2": [2.0, 2.0]}) == pytest.approx(expected)
    assert inter_reader_agreement({"a": [1, 1], "b": [3, 3, 3]}) == pytest.approx(1.0)
    assert model_reader_agreement({"a": 1.0, "b": 3.0}, {"a": [1, 1], "b": [3, 3, 3]}) == pytest.approx(1.0)


def test_prototype_purity_and_unique_sources() -> None:
    on_lesion = torch.tensor([[True, True, False, False], [True, True, True, True]])
    purity = prototype_purity(on_lesion)
    assert purity["per_prototype"] == [0.5, 1.0] and purity["purity_mean"] == 0.75
    by_class = prototype_purity(torch.tensor([[0, 0, 1], [1, 1, 1]]), torch.tensor([0, 1]))
    assert by_class["per_prototype"] == pytest.approx([2 / 3, 1.0])
    assert unique_prototypes([(0, (1, 2)), (0, (1, 2)), (3, (1, 2))]) == 2
    assert unique_prototypes([{"index": 0, "location": [1, 2], "similarity": 0.3},
                              {"index": 0, "location": [1, 2], "similarity": 0.9}]) == 1
    assert unique_prototypes(torch.tensor([[0, 1, 2], [0, 1, 2], [0, 2, 2]])) == 2


# -- figures --------------------------------------------------------------------------------------
def test_figures_write_png_files(tmp_path) -> None:
    from mlmi_zoo.evaluation import figures

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 40)
    probs = np.clip(labels * 0.4 + rng.random(40) * 0.6, 0, 1)
    w = torch.tensor([[4.0, 3.0], [2.0, 1.0]])
    curve = deletion_curve(_Linear(w), torch.ones(1, 1, 2, 2), w[None], steps=4, score="logit")
    image, mask = torch.rand(1, 16, 16), torch.zeros(16, 16, dtype=torch.bool)
    mask[4:9, 5:10] = True
    paths = [
        figures.plot_roc(probs, labels, tmp_path / "roc.png"),
        figures.plot_reliability(probs, labels, tmp_path / "rel.png"),
        figures.plot_bland_altman(rng.random(20) * 10, rng.random(20) * 10, tmp_path / "ba.png", "mm"),
        figures.plot_intervention_curves({"random": ([0, 1, 2], [0.7, 0.8, 0.9])}, 0.95, tmp_path / "iv.png"),
        figures.plot_deletion({"attribution": curve}, tmp_path / "del.png"),
        figures.plot_prototype_gallery([(image, (2, 3, 8, 9), "p0"), (image, mask, "p1")], tmp_path / "gal.png"),
        figures.plot_examples([image, image], [mask.float(), None], ["a", "b"], tmp_path / "ex.png"),
        figures.plot_heatmap(rng.random((3, 4)), tmp_path / "sub" / "hm.png", "weights"),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_example_figures_of_restricted_images_show_only_a_crop_around_the_map_maximum(tmp_path) -> None:
    from mlmi_zoo.evaluation.figures import _crop_window, plot_examples
    from mlmi_zoo.training.datasets.catalog import source_for

    heat = np.zeros((200, 100))
    heat[190, 5] = 1.0  # the maximum sits in a corner: the window stays inside the image
    rows, cols = _crop_window((200, 100), heat, 0.25)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (150, 200, 0, 25)
    assert _crop_window((200, 100), None, 0.5) == (slice(50, 150), slice(25, 75))  # no map: the centre
    path = plot_examples([torch.rand(1, 64, 64)], [torch.rand(64, 64)], ["a"], tmp_path / "crop.png", crop=0.25)
    assert path.is_file()
    with pytest.raises(ValueError, match="fraction"):
        plot_examples([torch.rand(1, 8, 8)], [None], ["a"], tmp_path / "bad.png", crop=1.5)
    # the licence decides: mini-MIAS figures show crops, every other bundled source whole images
    assert not source_for({"kind": "mias"}).whole_images_shareable and not source_for({"kind": "mias_bags"}).whole_images_shareable
    assert source_for({"kind": "lidc_nodules"}).whole_images_shareable and source_for({"kind": "idrid"}).whole_images_shareable


def test_a_cropped_prototype_gallery_moves_its_boxes_with_the_crop(tmp_path) -> None:
    from mlmi_zoo.evaluation.figures import _crop_panel, plot_prototype_gallery

    image = torch.rand(1, 100, 100)
    boxes = [np.array([40, 60, 48, 68]), np.array([30, 50, 58, 78]), None]
    cropped, moved, title = _crop_panel(image, boxes, "#0", 0.5)  # a 50-px window centred on (44, 64): rows 19:69, columns 39:89
    assert cropped.shape == (1, 50, 50) and title.endswith("(crop)")
    assert moved[0].tolist() == [21, 21, 29, 29] and moved[1].tolist() == [11, 11, 39, 39] and moved[2] is None
    assert np.array_equal(cropped, image.numpy()[:, 19:69, 39:89])
    assert plot_prototype_gallery([(image, boxes, "#0")], tmp_path / "g.png", crop=0.5).is_file()
    with pytest.raises(ValueError, match="2D boxes"):
        _crop_panel(image, torch.zeros(100, 100, dtype=torch.bool), "#0", 0.5)
