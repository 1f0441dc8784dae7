"""Controls and verdicts of the evidence rules (DESIGN.md): hand-computed cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlmi_zoo.evaluation.controls import (
    bag_constant_scores,
    brightness_map,
    centre_prior,
    instance_auroc_per_bag,
    top_instance_hit,
    random_maps,
    uniform_attention,
    uniform_map,
)
from mlmi_zoo.evaluation.localization import (
    activation_precision,
    instance_auroc,
    pointing_game,
)
from mlmi_zoo.evaluation.verdicts import (
    DEMONSTRATED,
    NOT_DEMONSTRATED,
    DifferenceCI,
    paired_difference_ci,
    verdict,
)

# ----------------------------------------------------------------------------- localization controls


def test_centre_prior_is_the_mean_training_mask():
    a = np.zeros((5, 5))
    a[2, 2] = a[2, 3] = 1
    b = np.zeros((5, 5))
    b[2, 2] = 1
    prior = centre_prior(np.stack([a, b])[:, None], (3, 5, 5), sigma_px=0)  # (N, 1, H, W) masks accepted
    expected = np.zeros((5, 5))
    expected[2, 2], expected[2, 3] = 1.0, 0.5
    assert prior.shape == (3, 5, 5) and prior.dtype == torch.float32
    for case in prior:
        np.testing.assert_array_equal(case.numpy(), expected)


def test_centre_prior_smoothing_by_hand():
    # 1D masks: a spike at 4 and an empty mask -> mean 0.5 at 4; scipy's Gaussian truncates at 4 sigma.
    masks = np.zeros((2, 9))
    masks[0, 4] = 1
    prior = centre_prior(masks, (1, 9), sigma_px=1.0)[0].double().numpy()
    weights = np.exp(-0.5 * np.arange(-4, 5) ** 2)
    weights /= weights.sum()
    np.testing.assert_allclose(prior, 0.5 * weights, rtol=1e-6)
    assert prior.argmax() == 4


def test_centre_prior_refuses_other_resolution():
    with pytest.raises(ValueError, match="spatial"):
        centre_prior(np.zeros((2, 8, 8)), (1, 16, 16), sigma_px=1.0)


def test_uniform_and_brightness_maps():
    assert torch.equal(uniform_map((2, 3, 4)), torch.ones(2, 3, 4))
    x = torch.zeros(1, 3, 4, 4)
    x[0, :, 1, 2] = torch.tensor([0.9, 0.6, 0.3])  # one bright (yellow-ish) pixel
    bright = brightness_map(x)
    assert bright.shape == (1, 4, 4) and bright[0, 1, 2] == pytest.approx(0.6)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 1, 2] = True
    assert pointing_game(bright, mask).item() == 1.0  # an image-processing map can win the pointing game


def test_random_maps_are_seeded_per_case():
    maps = random_maps((4, 8, 8), seed=3)
    assert maps.shape == (4, 8, 8) and maps.dtype == torch.float32
    assert torch.equal(maps, random_maps((4, 8, 8), seed=3))
    assert not torch.equal(maps, random_maps((4, 8, 8), seed=4))
    assert not torch.equal(maps[0], maps[1])  # one map per case
    # a batch starting at case 2 gets cases 2 and 3 of the whole split
    assert torch.equal(random_maps((2, 8, 8), seed=3, first_case=2), maps[2:])


def test_controls_go_through_the_metrics():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[:, 3:5, 3:5] = True
    prior = centre_prior(masks, (2, 8, 8), sigma_px=1.0)
    assert activation_precision(prior, masks, q=4 / 64).tolist() == [1.0, 1.0]


# ----------------------------------------------------------------------------- MIL controls


def test_bag_constant_and_uniform_attention():
    mask = torch.tensor([[True, True, False], [True, True, True]])
    scores = bag_constant_scores(torch.tensor([0.9, 0.2]), mask)
    assert torch.equal(scores, torch.tensor([[0.9, 0.9, 0.0], [0.2, 0.2, 0.2]]))
    attn = uniform_attention(mask)
    torch.testing.assert_close(attn, torch.tensor([[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]]))
    with pytest.raises(ValueError, match="valid instance"):
        uniform_attention(torch.tensor([[False, False]]))


def test_pooled_auroc_rewards_bag_constant_scores_per_bag_does_not():
    labels = np.array([[1, 0], [0, 0], [0, 0]], dtype=float)  # one positive bag, two negative bags
    constant = bag_constant_scores(torch.tensor([0.9, 0.1, 0.2]), torch.ones(3, 2, dtype=torch.bool))
    # pooled: the positive (0.9) ties its bag mate (0.5) and beats the 4 negatives of negative bags: 4.5 / 5
    assert instance_auroc(constant, labels)["auroc"] == pytest.approx(0.9)
    per_bag = instance_auroc_per_bag(constant, labels)
    assert per_bag.per_bag[0] == 0.5 and np.isnan(per_bag.per_bag[1:]).all()
    assert per_bag.mean == 0.5 and per_bag.n_bags == 1


def test_per_bag_auroc_skips_padding_and_unlabelled():
    scores = np.array([[0.1, 0.8, 0.3, 5.0], [0.7, 0.2, 0.1, 0.0]])
    labels = np.array([[0, 1, 0, 0], [1, np.nan, 0, 0]])
    mask = np.array([[True, True, True, False], [True, True, True, True]])
    result = instance_auroc_per_bag(scores, labels, mask)
    # bag 0 without its padding (score 5.0, label 0): 1.0; bag 1 without the unlabelled: 0.7 > 0.1, 0.0
    np.testing.assert_array_equal(result.per_bag, [1.0, 1.0])
    assert instance_auroc_per_bag(scores, labels).per_bag[0] == pytest.approx(2 / 3)  # padding counted


# ----------------------------------------------------------------------------- paired bootstrap


def test_identical_values_give_exactly_zero():
    rng = np.random.default_rng(0)
    values = rng.random(30)
    groups = np.repeat(np.arange(10), 3)
    d = paired_difference_ci(values, values.copy(), groups, n_boot=200)
    assert (d.estimate, d.low, d.high) == (0.0, 0.0, 0.0)
    assert (d.n_cases, d.n_patients) == (30, 10)


def test_pairing_removes_between_patient_variance():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(12), 2)
    control = rng.normal(0, 10, size=24)  # patients differ a lot
    d = paired_difference_ci(control + 0.1, control, groups, n_boot=200)
    assert d.estimate == pytest.approx(0.1) and d.high - d.low < 1e-9


def test_bootstrap_resamples_patients():
    # 5 patients: four with one case, one (id 4) with six cases
    ids = np.array([0, 1, 2, 3, 4, 4, 4, 4, 4, 4], dtype=float)
    absent = np.full(10, -1.0)
    distinct = paired_difference_ci(ids, absent, ids, n_boot=400, statistic=lambda v: float(len(np.unique(v))))
    # difference = distinct patients drawn - 1; all 5 are rarely drawn together (5!/5^5 ~ 4%)
    assert distinct.estimate == 4 and distinct.high == 4 and distinct.low < 4
    assert distinct.n_patients == 5 and distinct.n_cases == 10
    # patient 4 is missing from a draw with probability (4/5)^5 ~ 33% when patients are drawn, but
    # only (4/10)^10 ~ 1e-4 if cases were drawn: the lower bound tells the two apart
    has_4 = paired_difference_ci(ids, absent, ids, n_boot=400, statistic=lambda v: float((v == 4).any()))
    assert (has_4.estimate, has_4.low, has_4.high) == (1.0, 0.0, 1.0)


def test_paired_difference_drops_undefined_cases_and_reproduces():
    rng = np.random.default_rng(2)
    model = rng.random(40)
    control = rng.random(40)
    model[0] = np.nan  # e.g. an empty mask
    groups = np.repeat(np.arange(20), 2)
    d = paired_difference_ci(model, control, groups, n_boot=300, seed=5)
    assert d.n_cases == 39 and d.n_patients == 20
    assert d.estimate == pytest.approx(np.mean(model[1:]) - np.mean(control[1:]))
    assert d == paired_difference_ci(model, control, groups, n_boot=300, seed=5)
    assert d != paired_difference_ci(model, control, groups, n_boot=300, seed=6)
    with pytest.raises(ValueError, match="one length"):
        paired_difference_ci(model, control[:-1], groups)


# ----------------------------------------------------------------------------- verdict


def _diff(estimate: float, low: float, high: float = 1.0) -> DifferenceCI:
    return DifferenceCI(estimate, low, high, n_cases=50, n_patients=40)


def test_verdict_picks_the_strongest_control():
    v = verdict({"uniform": _diff(0.4, 0.3), "centre prior": _diff(0.05, 0.01), "random": _diff(0.3, 0.2)},
                metric="activation precision")
    assert v.control == "centre prior" and v.difference.estimate == 0.05
    assert v.status == DEMONSTRATED and v.demonstrated
    assert v.sentence == ("demonstrated: activation precision minus the strongest control (centre prior) is "
                          "+0.050 (95% CI +0.010 to +1.000; 50 cases, 40 patients)")


@pytest.mark.parametrize(("low", "status"), [(-1e-9, NOT_DEMONSTRATED), (0.0, NOT_DEMONSTRATED),
                                             (1e-9, DEMONSTRATED), (math.nan, NOT_DEMONSTRATED)])
def test_verdict_needs_a_lower_bound_above_zero(low: float, status: str):
    v = verdict({"brightness": _diff(0.1, low), "uniform": _diff(0.5, 0.4)})
    assert v.control == "brightness" and v.status == status


def test_verdict_needs_every_control_beaten_and_names_the_unbeaten_one():
    # a noisier control that scores less but is not beaten (lower bound below zero) blocks the verdict
    v = verdict({"random": _diff(0.3, -0.1), "centre prior": _diff(0.1, 0.05)})
    assert v.control == "random" and not v.demonstrated
    assert v.sentence.startswith("not demonstrated on this data: the metric minus the unbeaten control (random)")
    # every control beaten: the strongest (smallest estimate) is named
    v = verdict({"random": _diff(0.3, 0.1), "centre prior": _diff(0.1, 0.05)})
    assert v.control == "centre prior" and v.demonstrated
    v = verdict({"centre prior": _diff(0.1, 0.05), "untrained": _diff(math.nan, math.nan, math.nan)})
    assert v.control == "untrained" and not v.demonstrated
    with pytest.raises(ValueError, match="at least one control"):
        verdict({})


def test_verdict_from_data():
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(15), 2)
    centre = rng.random(30)
    uniform = centre - 0.2
    model = centre + 0.05
    diffs = {name: paired_difference_ci(model, c, groups, n_boot=200) for name, c in
             {"centre prior": centre, "uniform": uniform}.items()}
    v = verdict(diffs)
    assert v.control == "centre prior" and v.demonstrated and v.difference.low == pytest.approx(0.05)
    assert verdict({"centre prior": paired_difference_ci(centre, centre, groups, n_boot=200)}).status == NOT_DEMONSTRATED


def test_top_instance_hit_breaks_ties_at_the_positive_share() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.0], [0.2, 0.2, 0.2, 0.2], [0.3, 0.8, 0.1, 0.0], [1.0, 0.0, 0.0, 0.0],
                           [0.5, 0.4, 0.0, 0.0]])
    labels = torch.tensor([[1.0, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, float("nan"), 0, 0]])
    mask = torch.tensor([[True] * 4, [True] * 4, [True] * 4, [True] * 4, [True, True, False, False]])
    hit = top_instance_hit(scores, labels, mask)
    # a hit; a tie over all four (one positive): 1/4; a miss; no positive: undefined; an unlabelled tile: undefined
    assert hit[:3].tolist() == [1.0, 0.25, 0.0] and np.isnan(hit[3]) and np.isnan(hit[4])
    # padding never wins: bag 2 with its top tile masked out hits nothing else
    masked = top_instance_hit(scores[2:3], labels[2:3], torch.tensor([[True, False, True, True]]))
    assert masked.tolist() == [1.0]
    with pytest.raises(ValueError, match="share a shape"):
        top_instance_hit(scores, labels[:, :2])
