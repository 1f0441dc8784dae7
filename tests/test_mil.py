"""Attention MIL and additive MIL: masking, exact decomposition, area attribution, heat maps."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _mil import (
    FEATURE_MODELS,
    TILE_AREA_MM2,
    TINY,
    D,
    make,
    padded,
)

import mlmi_zoo
from mlmi_zoo import InputSpecError, QuantitySpec
from mlmi_zoo.architectures.mil.model import (
    AttentionPool,
    MILConfig,
    challenge_mask,
    check_bag_mask,
    masked_softmax,
    percentile_normalise,
)
from mlmi_zoo.architectures.mil.config import without_area_head


# -- masking and invariances ------------------------------------------------------------------------
@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_padded_batch_equals_bags_one_by_one(name: str) -> None:
    model = make(name)
    bags = [torch.randn(n, D) for n in (5, 1, 9)]
    x, mask = padded(bags)
    batch = model.explain(x, mask)
    for i, bag in enumerate(bags):
        alone = model.explain(bag[None])
        n = len(bag)
        torch.testing.assert_close(batch.logits[i], alone.logits[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(batch.attention[i, :n], alone.attention[0], rtol=0, atol=1e-6)
        area = batch.measurements["tumour_area_mm2"].value
        torch.testing.assert_close(area[i], alone.measurements["tumour_area_mm2"].value[0], rtol=0, atol=1e-6)
        if batch.contributions is not None:
            torch.testing.assert_close(batch.contributions[i, :n], alone.contributions[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_permutation_invariance(name: str) -> None:
    model = make(name)
    x = torch.randn(2, 11, D)
    perm = torch.randperm(11)
    a, b = model.explain(x), model.explain(x[:, perm])
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(b.attention, a.attention[:, perm], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_attention_sums_to_one_over_valid_instances_and_is_zero_at_padding(name: str) -> None:
    x, mask = padded([torch.randn(n, D) for n in (3, 8)])
    exp = make(name).explain(x, mask)
    assert exp.attention.shape == exp.attention_scores.shape == (2, 8)
    torch.testing.assert_close(exp.attention.sum(1), torch.ones(2))
    assert torch.equal(exp.attention[~mask], torch.zeros(int((~mask).sum())))
    assert (exp.attention[mask] > 0).all()
    # the weights are the softmax of the raw scores over the valid instances
    torch.testing.assert_close(exp.attention[0, :3], exp.attention_scores[0, :3].softmax(0))


@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_chunked_instance_pass_equals_one_chunk(name: str) -> None:
    model = make(name, instance_chunk=3)
    whole = make(name, instance_chunk=1000)
    whole.load_state_dict(model.state_dict())
    x, mask = padded([torch.randn(n, D) for n in (10, 4)])
    a, b = model.explain(x, mask), whole.explain(x, mask)
    for field in ("logits", "attention", "attention_scores"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=0, atol=1e-6)
    torch.testing.assert_close(a.measurements["tumour_area_mm2"].value, b.measurements["tumour_area_mm2"].value)
    if a.contributions is not None:
        torch.testing.assert_close(a.contributions, b.contributions, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_bag_offset_moves_raw_scores_but_not_attention_or_logits(name: str) -> None:
    model = make(name)
    x, mask = padded([torch.randn(n, D) for n in (6, 3)])
    before = model.explain(x, mask)
    with torch.no_grad():
        model.score_offset.bias += 5.0
    after = model.explain(x, mask)
    torch.testing.assert_close(after.attention_scores[mask], before.attention_scores[mask] + 5.0)
    torch.testing.assert_close(after.attention, before.attention)
    torch.testing.assert_close(after.logits, before.logits)
    plain = make(name, bag_context=False)
    assert plain.score_offset is None and plain.area_head.prior is None
    with pytest.raises(ValueError, match="bag prior"):
        model.area_head(torch.randn(1, 2, 8))
    with pytest.raises(ValueError, match="no bag prior"):
        plain.area_head.bag_prior(torch.randn(1, 2, 1), torch.ones(1, 2, dtype=torch.bool))


def test_masked_softmax_hand_computed() -> None:
    scores = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    e = [math.exp(v) for v in (1.0, 2.0, 3.0)]
    expected = torch.tensor([[v / sum(e) for v in e] + [0.0]])
    torch.testing.assert_close(masked_softmax(scores, mask), expected)


def test_challenge_mask_drops_only_top_scored_instances_and_keeps_one() -> None:
    scores = torch.tensor([[5.0, 1.0, 4.0, 3.0, 2.0, 9.0], [0.0, 2.0, 1.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True] * 5 + [False], [True, True, True, False, False, False]])
    g = torch.Generator().manual_seed(0)
    dropped = torch.zeros_like(mask, dtype=torch.long)
    for _ in range(2000):
        kept = challenge_mask(scores, mask, k=2, p=0.5, generator=g)
        assert not (kept & ~mask).any() and kept.any(1).all()
        dropped += (mask & ~kept).long()
    # bag 0: only its two highest valid scores (5, 4; 9 is padding) are ever dropped, each about half the time
    assert dropped[0].tolist()[1::2] == [0, 0, 0] and dropped[0, 4] == 0
    assert 850 < dropped[0, 0] < 1150 and 850 < dropped[0, 2] < 1150
    # bag 1 has 3 valid instances: at most 2 candidates (scores 2 and 1), the lowest always stays
    assert dropped[1, 0] == 0 and dropped[1, 1] > 0 and dropped[1, 2] > 0 and dropped[1, 3:].sum() == 0
    # p = 0 drops nothing; a single-instance bag keeps its instance
    assert torch.equal(challenge_mask(scores, mask, k=3, p=0.0), mask)
    one = torch.tensor([[True, False]])
    assert torch.equal(challenge_mask(torch.zeros(1, 2), one, k=5, p=0.99), one)


@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_top_instance_masking_acts_in_training_only(name: str) -> None:
    with pytest.raises(ValueError, match="top_instance_masking"):
        make(name, top_instance_masking=1.0)
    with pytest.raises(ValueError, match="top_instance_k"):
        make(name, top_instance_k=0)
    model = make(name, top_instance_masking=0.9, top_instance_k=3, dropout=0.0)
    plain = make(name, dropout=0.0)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 12, D)
    torch.testing.assert_close(model.forward_bag(x).attention, plain.forward_bag(x).attention)  # eval: no masking
    model.train()
    torch.manual_seed(1)
    out = model.forward_bag(x)
    masked = (out.attention == 0) & out.mask
    assert masked.any() and (masked.sum(1) <= 3).all()
    top3 = out.attention_scores.argsort(-1, descending=True)[:, :3]
    assert all(set(masked[i].nonzero().flatten().tolist()) <= set(top3[i].tolist()) for i in range(2))
    torch.testing.assert_close(out.attention.sum(1), torch.ones(2))


def test_single_instance_bag() -> None:
    model = make("additive_mil_features")
    x = torch.randn(1, 1, D)
    exp = model.explain(x)
    assert exp.attention.tolist() == [[1.0]]
    h = model.embed(x)
    torch.testing.assert_close(exp.logits, model.classifier(h)[:, 0] + model.bias)


@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_empty_bag_and_all_false_mask_are_refused(name: str) -> None:
    model = make(name)
    with pytest.raises(ValueError, match="N=0"):
        model(torch.randn(2, 0, D))
    mask = torch.tensor([[True, False], [False, False]])
    with pytest.raises(ValueError, match=r"bag\(s\) \[1\] have no valid instance"):
        model(torch.randn(2, 2, D), mask)
    with pytest.raises(ValueError, match="no valid instance"):
        model.explain(torch.randn(2, 2, D), mask)


def test_bad_inputs_are_refused_with_clear_errors() -> None:
    model = make("abmil_features")
    with pytest.raises(InputSpecError, match=f"expected {D} features per instance, got 7"):
        model(torch.randn(1, 4, 7))
    with pytest.raises(ValueError, match="bool mask"):
        model(torch.randn(1, 4, D), torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"shape \(B, N\)"):
        check_bag_mask(torch.ones(1, 3, dtype=torch.bool), 1, 4, torch.device("cpu"))
    for bad in (math.nan, math.inf, -math.inf):  # one bad value among many is found
        x = torch.randn(2, 50, D)
        x[1, 37, 5] = bad
        with pytest.raises(InputSpecError, match="NaN or Inf"):
            model(x)
    with pytest.raises(ValueError, match="instance_encoder"):
        MILConfig(backbone="resnet8")
    with pytest.raises(ValueError, match="must be an area"):
        MILConfig(quantities=(QuantitySpec("diameter_mm", "mm"),))


# -- attention pooling ------------------------------------------------------------------------------
def test_plain_attention_is_ilse_eq8_and_gated_differs() -> None:
    h = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.bool)
    plain = AttentionPool(8, 4, gated=False)
    w = plain(h, mask)
    by_hand = torch.tanh(h @ plain.project.weight.T + plain.project.bias) @ plain.score.weight.T + plain.score.bias
    torch.testing.assert_close(w.scores[:, 0], by_hand[..., 0])
    gated = AttentionPool(8, 4, gated=True)
    v, u = (h @ gated.project.weight.T + gated.project.bias).chunk(2, -1)
    by_hand = (torch.tanh(v) * torch.sigmoid(u)) @ gated.score.weight.T + gated.score.bias
    torch.testing.assert_close(gated(h, mask).scores[:, 0], by_hand[..., 0])
    for g in (False, True):  # both variants run end to end
        assert make("abmil_features", gated=g)(torch.randn(2, 4, D)).shape == (2, 2)


@pytest.mark.parametrize("gated", [True, False])
def test_attention_in_place_without_autograd_equals_the_recorded_scores(gated: bool) -> None:
    # Without autograd the activations overwrite the projection in place: the same numbers, bit for bit.
    pool = AttentionPool(8, 4, gated=gated)
    h = torch.randn(2, 6, 8)
    recorded = pool.scores(h.requires_grad_())
    assert recorded.requires_grad
    with torch.no_grad():
        inference = pool.scores(h)
    assert torch.equal(recorded.detach(), inference)
    frozen = AttentionPool(8, 4, gated=gated).requires_grad_(False)  # grad mode on, nothing to record
    frozen.load_state_dict(pool.state_dict())
    assert torch.equal(frozen.scores(h.detach()), inference)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_no_mask_gives_exactly_the_all_true_mask_result(name: str, gated: bool) -> None:
    # An absent mask skips the masking; the result is that of an all-True mask, bit for bit, in
    # inference and with autograd, over several chunks.
    model = make(name, gated=gated, instance_chunk=5)
    x = torch.randn(2, 12, D)
    ones = torch.ones(2, 12, dtype=torch.bool)
    fields = ("logits", "attention", "attention_scores", "contributions", "area_logits", "instance_logits")
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            unmasked, all_true = model.forward_bag(x), model.forward_bag(x, ones)
        assert unmasked.logits.requires_grad == grad and torch.equal(unmasked.mask, ones)
        for field in fields:
            a, b = getattr(unmasked, field), getattr(all_true, field)
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), field


@pytest.mark.parametrize("gated", [True, False])
def test_abmil_logits_are_ilse_eqs_8_9_by_hand(gated: bool) -> None:
    # The whole chunked pass (embedding, attention, masked softmax, pooling, classifier) against
    # the formulas computed at once in float64 from the weights.
    model = make("abmil_features", gated=gated, instance_chunk=4, quantities=(), bag_context=False, classifier_hidden=0)
    x, mask = padded([torch.randn(n, D) for n in (9, 3)])
    with torch.no_grad():
        logits = model(x, mask).double()
        w = {k: v.double() for k, v in model.state_dict().items()}
        h = torch.relu(x.double() @ w["embed.0.weight"].T + w["embed.0.bias"])
        projected = h @ w["attention.project.weight"].T + w["attention.project.bias"]
        v, u = projected.chunk(2, -1) if gated else (projected, None)
        a = torch.tanh(v) * torch.sigmoid(u) if u is not None else torch.tanh(v)
        scores = (a @ w["attention.score.weight"].T + w["attention.score.bias"])[..., 0]
        attn = scores.masked_fill(~mask, -math.inf).softmax(-1)
        by_hand = (attn[..., None] * h).sum(1) @ w["classifier.weight"].T + w["classifier.bias"]
    torch.testing.assert_close(logits, by_hand, rtol=0, atol=1e-6)


def test_attention_branches_each_sum_to_one() -> None:
    pool = AttentionPool(8, 4, gated=True, branches=3)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    w = pool(torch.randn(2, 3, 8), mask)
    assert w.weights.shape == (2, 3, 3)
    torch.testing.assert_close(w.weights.sum(-1), torch.ones(2, 3))
    assert (w.weights[0, :, 2] == 0).all()


# -- transparency -----------------------------------------------------------------------------------
def test_additive_decomposition_is_exact_and_is_psi_of_weighted_instances() -> None:
    model = make("additive_mil_features", label_names=("a", "b", "c"))
    x, mask = padded([torch.randn(n, D) for n in (4, 13, 2)])
    exp = model.explain(x, mask)
    assert exp.decomposable and exp.contributions.shape == (3, 13, 3) and exp.bias.shape == (3,)
    assert exp.decomposition_error() <= 1e-5
    torch.testing.assert_close(exp.contributions.sum(1) + exp.bias, model(x, mask), rtol=0, atol=1e-5)
    assert torch.equal(exp.contributions[~mask], torch.zeros(int((~mask).sum()), 3))
    # Javed et al.: the classifier applied to each attention-weighted instance, psi(attn_n * h_n)
    with torch.no_grad():
        literal = model.classifier(exp.attention[..., None] * model.embed(x))
    torch.testing.assert_close(exp.contributions[mask], literal[mask], rtol=1e-5, atol=1e-7)


def test_abmil_has_attention_but_no_contributions() -> None:
    exp = make("abmil_features").explain(torch.randn(1, 4, D), coords=torch.tensor([[[0, 0], [0, 1], [1, 0], [1, 1]]]))
    assert not exp.decomposable and exp.contributions is None and math.isnan(exp.decomposition_error())
    assert exp.heatmap(0, "attention").shape == (2, 2)
    with pytest.raises(ValueError, match="no per-instance contributions"):
        exp.heatmap(0, "contributions")


# -- physical attribution ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_instance_areas_are_non_negative_and_sum_to_the_bag_area(name: str) -> None:
    model = make(name)
    x, mask = padded([torch.randn(n, D) for n in (6, 2)])
    exp = model.explain(x, mask)
    per_tile = exp.instance_measurements["tumour_area_mm2"]
    bag = exp.measurements["tumour_area_mm2"]
    assert bag.unit == "mm^2" and per_tile.shape == (2, 6)
    assert (per_tile >= 0).all() and (per_tile <= TILE_AREA_MM2 * (1 + 1e-6)).all()
    assert torch.equal(per_tile[~mask], torch.zeros(int((~mask).sum())))
    torch.testing.assert_close(per_tile.sum(1), bag.value)
    with torch.no_grad():  # fraction x tile area, the tile area from 256 px at 0.5 µm (converted by pint)
        own = model.area_head.fraction(x)  # (B, N, 1) each tile's own evidence: a linear score of its features
        beta, gamma = model.area_head.bag_prior(own, mask)  # (B, 1) each
        logits = model.area_head.calibrate(own - beta[:, None]) + gamma[:, None]  # (B, N, 1)
        fraction = torch.sigmoid(logits)[..., 0]
        torch.testing.assert_close(model.area_head(x, mask), logits)
    torch.testing.assert_close(per_tile[mask], (fraction * TILE_AREA_MM2)[mask])
    torch.testing.assert_close(bag.to("um^2").value, bag.value * 1e6)
    # the same tiles imaged at twice the pixel size cover four times the area
    doubled = model.explain(x, mask, microns_per_pixel=torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(doubled.measurements["tumour_area_mm2"].value, 4 * bag.value)


@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_equivalent_radius_is_the_disc_of_the_bag_area(name: str) -> None:
    model = make(name, equivalent_radii=(("radius_mm", "tumour_area_mm2"),))
    x, mask = padded([torch.randn(n, D) for n in (6, 2)])
    exp = model.explain(x, mask)
    area, radius = exp.measurements["tumour_area_mm2"], exp.measurements["radius_mm"]
    assert radius.unit == "mm" and "radius_mm" not in exp.instance_measurements
    torch.testing.assert_close(math.pi * radius.value ** 2, area.value)
    # in mm whatever the area's unit, and twice the pixel size doubles it
    in_um2 = make(name, quantities=(QuantitySpec("tumour_area_um2", "um^2"),),
                  equivalent_radii=(("radius_mm", "tumour_area_um2"),))
    in_um2.load_state_dict(model.state_dict())
    torch.testing.assert_close(in_um2.explain(x, mask).measurements["radius_mm"].value, radius.value)
    doubled = model.explain(x, mask, microns_per_pixel=torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(doubled.measurements["radius_mm"].value, 2 * radius.value)
    with pytest.raises(ValueError, match="not one of the area quantities"):
        MILConfig(equivalent_radii=(("radius_mm", "lesion_area_mm2"),))
    with pytest.raises(ValueError, match="already an area quantity"):
        MILConfig(equivalent_radii=(("tumour_area_mm2", "tumour_area_mm2"),))
    # the overrides that drop the area head drop the radii read from it, and give a valid config
    drop = without_area_head(model.config.equivalent_radii)
    assert drop == "model.config.quantities=[] model.config.equivalent_radii=[]"
    assert without_area_head(()) == "model.config.quantities=[]"
    assert MILConfig(quantities=(), equivalent_radii=()).equivalent_radii == ()


@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_bag_normalise_centres_the_features_of_each_bag(name: str) -> None:
    model = make(name, bag_normalise=True)
    bags = [torch.randn(n, D) for n in (6, 3)]
    x, mask = padded(bags)
    before = model.explain(x, mask)
    # a slide-wide shift of every feature changes neither the attention, its raw scores nor the logits
    shifted = model.explain(x + 3.0 * torch.randn(2, 1, D), mask)
    torch.testing.assert_close(shifted.attention, before.attention, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shifted.attention_scores[mask], before.attention_scores[mask], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(shifted.logits, before.logits, atol=1e-4, rtol=1e-4)
    # the same as a model without normalisation fed the explicitly centred bags one by one
    plain = make(name)
    plain.load_state_dict(model.state_dict())
    for i, bag in enumerate(bags):
        alone = plain.explain((bag - bag.mean(0))[None])
        torch.testing.assert_close(alone.logits[0], before.logits[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone.attention[0], before.attention[i, : len(bag)], atol=1e-6, rtol=1e-5)


def test_area_head_bag_statistics_hand_computed() -> None:
    head = make("additive_mil_features").area_head
    levels = head.QUANTILE_LEVELS
    own = torch.tensor([[4.0, 0.0, 2.0, 1.0, 3.0, 99.0], [5.0, -1.0, 99.0, 99.0, 99.0, 99.0]])[..., None]  # (B, N, 1)
    mask = torch.tensor([[True] * 5 + [False], [True, True] + [False] * 4])
    stats = head.bag_statistics(own, mask)  # (B, 1 + K + 1)
    assert stats.shape == (2, len(levels) + 2)
    # bag 0: scores 0..4, mean 2, order statistic round(q * 4); bag 1: scores -1, 5, mean 2, order statistic round(q)
    expected0 = [2.0] + [float(round(q * 4)) - 2.0 for q in levels] + [math.log(5)]
    expected1 = [2.0] + [(-1.0 if round(q) == 0 else 5.0) - 2.0 for q in levels] + [math.log(2)]
    torch.testing.assert_close(stats, torch.tensor([expected0, expected1]))
    # a slide-wide shift of every score moves only the mean column
    shifted = head.bag_statistics(own + 3.0, mask)
    torch.testing.assert_close(shifted[:, 1:], stats[:, 1:])
    torch.testing.assert_close(shifted[:, 0], stats[:, 0] + 3.0)
    # without bag context the head is the per-tile sigmoid of the own score and has no calibration
    plain = make("additive_mil_features", bag_context=False).area_head
    z = torch.randn(2, 6, 1)
    assert torch.equal(plain.calibrate(z), z) and torch.equal(plain.with_prior(z, None), z)


def test_area_head_gain_changes_the_stored_parameters_not_the_function() -> None:
    torch.manual_seed(3)
    low = mlmi_zoo.create_model("additive_mil_features", **TINY, area_head_gain=1.0).eval()
    high = mlmi_zoo.create_model("additive_mil_features", **TINY, area_head_gain=8.0).eval()
    state = {k: v / 8.0 if k.startswith("area_head.") else v for k, v in low.state_dict().items()}
    high.load_state_dict(state)
    x, mask = padded([torch.randn(n, D) for n in (5, 3)])
    torch.testing.assert_close(high.forward_bag(x, mask).area_logits, low.forward_bag(x, mask).area_logits)
    with pytest.raises(ValueError, match="area_head_gain must be positive"):
        MILConfig(area_head_gain=0.0)


@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_area_head_scores_the_features_not_the_dropped_out_embedding(name: str) -> None:
    model = make(name, dropout=0.5).train()
    x, mask = padded([torch.randn(n, D) for n in (7, 4)])
    torch.manual_seed(1)
    train_logits = model.forward_bag(x, mask).area_logits
    model.eval()
    torch.testing.assert_close(model.forward_bag(x, mask).area_logits, train_logits)


# -- raw tiles --------------------------------------------------------------------------------------
def test_raw_tile_model_encodes_in_chunks_with_identical_results() -> None:
    model = mlmi_zoo.create_model("additive_mil_resnet8", tile_size=16, encoder_chunk=2).eval()
    tiles = torch.rand(2, 5, 3, 16, 16)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    chunked = model.explain(tiles, mask)
    one_chunk = mlmi_zoo.create_model("additive_mil_resnet8", tile_size=16, encoder_chunk=1000).eval()
    one_chunk.load_state_dict(model.state_dict())
    whole = one_chunk.explain(tiles, mask)
    torch.testing.assert_close(chunked.logits, whole.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(chunked.contributions, whole.contributions, rtol=0, atol=1e-6)
    alone = model.explain(tiles[1:, :3])
    torch.testing.assert_close(chunked.logits[1], alone.logits[0], rtol=0, atol=1e-6)
    assert chunked.decomposition_error() <= 1e-5
    with pytest.raises(InputSpecError, match="16x16 tiles"):
        model(torch.rand(1, 2, 3, 32, 32))


# -- persistence ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_save_load_round_trip_gives_identical_logits(name: str, tmp_path: Path) -> None:
    model = make(name, label_names=("benign", "tumour", "other"), gated=False)
    x, mask = padded([torch.randn(n, D) for n in (3, 5)])
    model.save_pretrained(tmp_path / "m")
    loaded = mlmi_zoo.load(f"local-dir:{tmp_path / 'm'}").eval()
    assert type(loaded) is type(model) and loaded.config == model.config
    assert torch.equal(loaded(x, mask), model(x, mask))


# -- heat maps and reports --------------------------------------------------------------------------
def test_heatmap_shape_and_percentile_normalisation() -> None:
    model = make("additive_mil_features")
    rows, cols = torch.meshgrid(torch.arange(10), torch.arange(12), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()], -1)[None]  # (1, 120, 2) grid positions
    keep = torch.arange(120) % 7 != 3  # tissue holes stay empty in the map
    x = torch.randn(1, 120, D)
    exp = model.explain(x[:, keep], coords=coords[:, keep])
    hm = exp.heatmap(0, "attention")
    assert hm.shape == (10, 12) and hm.dtype == np.float32
    assert np.isnan(hm[~keep.reshape(10, 12).numpy()]).all()
    att = exp.attention[0].double().numpy()
    p1, p99 = np.percentile(att, [1, 99])
    expected = np.clip((att - p1) / (p99 - p1), 0, 1)
    np.testing.assert_allclose(hm[keep.reshape(10, 12).numpy()], expected, rtol=1e-5, atol=1e-6)
    assert hm[np.isfinite(hm)].min() == 0.0 and hm[np.isfinite(hm)].max() == 1.0
    signed = exp.heatmap(0, "contributions", class_index=1)
    finite = signed[np.isfinite(signed)]
    assert finite.min() >= -1 and finite.max() <= 1
    c = exp.contributions[0, :, 1].numpy()
    assert (np.sign(finite) == np.sign(c)).all()  # zero stays zero, signs stay readable
    # pixel coordinates of 256-px tiles give the same map as grid coordinates
    pixel = model.explain(x[:, keep], coords=coords[:, keep] * 256 + 1024)
    np.testing.assert_array_equal(pixel.heatmap(0, "attention"), hm)


def test_percentile_normalise_maps_percentiles_to_unit_range() -> None:
    v = np.arange(101, dtype=np.float64)  # 1st percentile = 1, 99th = 99
    out = percentile_normalise(v, signed=False)
    np.testing.assert_allclose(out[[0, 1, 50, 99, 100]], [0.0, 0.0, 49 / 98, 1.0, 1.0])
    np.testing.assert_allclose(percentile_normalise(np.array([-2.0, 0.0, 1.0, np.nan]), signed=True, high=100)[:3], [-1.0, 0.0, 0.5])


def test_html_report_has_heat_maps_and_top_instances(tmp_path: Path) -> None:
    exp = make("additive_mil_features").explain(torch.randn(1, 6, D), coords=torch.tensor([[[0, i] for i in range(6)]]))
    page = exp.save_html(tmp_path / "r.html").read_text()
    assert "Top instances" in page and page.count("data:image/png") == 2 and "tumour_area_mm2" in page
