"""Concept bottleneck models: exact decomposition, typed concepts with units, masking of missing
labels, training modes, interventions and their curve, persistence, 3D."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from mlmi_zoo.architectures.blocks.stages import training_for
from mlmi_zoo.architectures.cbm.config import CBMTrainingSettings
from mlmi_zoo.architectures.cbm.explanations import ConceptExplanation, MLPConceptExplanation
from mlmi_zoo.architectures.cbm.model import CBM, CBMConfig
from mlmi_zoo.architectures.cbm.training import CBMTraining, fit_concept_statistics, randomly_intervene
from mlmi_zoo.architectures.cbm.concepts import ConceptCodec
from mlmi_zoo.architectures.cbm.interventions import (
    FixedOrderPolicy,
    RandomPolicy,
    UncertaintyPolicy,
    intervention_curve,
)
from mlmi_zoo.registry import create_model
from mlmi_zoo.specs import ConceptSpec, Measurement

CONCEPTS = (
    ConceptSpec("spiculation", "binary"),
    ConceptSpec("texture", "categorical", levels=("solid", "part-solid", "ground-glass")),
    ConceptSpec("diameter_mm", "continuous", unit="mm"),
    ConceptSpec("mean_hu", "continuous", unit="HU"),
)
SPACING = (0.5, 0.5)


def make_model(**overrides) -> CBM:
    torch.manual_seed(0)
    kw = dict(concepts=CONCEPTS, img_size=(32, 32))
    kw.update(overrides)
    return create_model("cbm_resnet8", **kw).eval()


class ToyNodules(Dataset):
    """Bright disks; concepts drawn at random (spiculation sometimes missing), label = spiculation."""

    def __init__(self, n: int = 12, seed: int = 0, missing: tuple[int, ...] = (3,)) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 1, 32, 32, generator=g) * 0.2
        self.radius = torch.randint(2, 10, (n,), generator=g).float()
        yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        for i in range(n):
            self.images[i, 0][((yy - 16) ** 2 + (xx - 16) ** 2) <= self.radius[i] ** 2] += 0.7
        self.spic = torch.tensor([i % 2 for i in range(n)], dtype=torch.float32)
        self.labels = self.spic.long()
        self.spic[list(missing)] = math.nan
        self.texture = torch.randint(0, 3, (n,), generator=g).float()
        self.hu = torch.rand(n, generator=g) * 100 - 50

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {
            "image": self.images[i],
            "spacing": torch.tensor(SPACING),
            "label": self.labels[i],
            "concepts": {"spiculation": self.spic[i], "texture": self.texture[i]},
            "measurements": {"diameter_mm": 2 * self.radius[i] * SPACING[0], "mean_hu": self.hu[i]},
            "index": i,
        }


def batch_of(ds: Dataset, n: int | None = None) -> dict:
    return next(iter(DataLoader(ds, batch_size=n or len(ds))))


def set_stats(model: CBM) -> None:
    """Non-trivial training-split statistics, as if fitted."""
    model.codec.binary_prior.fill_(0.25)
    model.codec.level_prior.copy_(torch.tensor([0.5, 0.3, 0.2]))
    model.codec.loc.copy_(torch.tensor([12.0, -20.0]))  # diameter in pixels, HU
    model.codec.scale.copy_(torch.tensor([4.0, 50.0]))


# -- transparency -----------------------------------------------------------------------------------
def test_linear_head_decomposition_is_exact_and_logits_match_forward():
    model = make_model()
    x = torch.rand(3, 1, 32, 32)
    exp = model.explain(x, spacing=SPACING)
    assert isinstance(exp, ConceptExplanation) and exp.decomposable
    assert exp.contributions.shape == (3, 2, model.codec.width)
    assert exp.concept_maps.shape == (3, model.codec.width, 32, 32)
    assert exp.concept_names == ("spiculation", "texture=solid", "texture=part-solid", "texture=ground-glass",
                                 "diameter_mm", "mean_hu")
    assert torch.allclose(exp.logits, model(x), atol=1e-6)
    assert (exp.logits_from_contributions() - exp.logits).abs().max() < 1e-5
    assert exp.decomposition_error() < 1e-5
    # The 1x1 concept conv commutes with global pooling: pooled logit == mean of the latent map.
    with torch.no_grad():
        pooled_feats = model.backbone(x).mean((2, 3), keepdim=True)
        from_pooled = model.concept_head(pooled_feats).flatten(1)
    assert torch.allclose(exp.concept_logits, from_pooled, atol=1e-5)
    assert exp.concepts["texture"].shape == (3, 3)
    assert torch.allclose(exp.concepts["texture"].sum(-1), torch.ones(3))
    assert exp.measurements["diameter_mm"].unit == "mm" and exp.measurements["mean_hu"].unit == "HU"


def test_mlp_head_is_documented_as_not_decomposable():
    model = make_model(head="mlp")
    exp = model.explain(torch.rand(2, 1, 32, 32), spacing=SPACING)
    assert isinstance(exp, MLPConceptExplanation) and not exp.decomposable
    assert exp.contributions is None and math.isnan(exp.decomposition_error())
    with pytest.raises(NotImplementedError, match="not an exact sum"):
        exp.logits_from_contributions()


# -- concept losses ----------------------------------------------------------------------------------
def test_missing_concept_labels_do_not_change_the_loss():
    codec = ConceptCodec(CONCEPTS)
    targets = torch.tensor([[1.0, 2.0, 0.5, -1.0], [math.nan, math.nan, math.nan, math.nan], [0.0, 0.0, 1.0, 0.3]])
    raw = torch.randn(3, codec.width, requires_grad=True)
    loss, parts = codec.loss(raw, targets)
    changed = raw.detach().clone()
    changed[1] += torch.randn(codec.width) * 100  # case 1 has no label at all
    assert codec.loss(changed, targets)[0] == loss
    loss.backward()
    assert torch.all(raw.grad[1] == 0)
    # a concept with no label in the whole batch contributes exactly 0
    only_first = targets.clone()
    only_first[:, 1:] = math.nan
    _, parts = codec.loss(raw.detach(), only_first)
    assert parts["texture"] == 0 and parts["diameter_mm"] == 0 and parts["mean_hu"] == 0


def test_binary_loss_uses_training_split_pos_weight():
    codec = ConceptCodec((ConceptSpec("a", "binary"),))
    codec.fit(torch.tensor([[1.0], [0.0], [0.0], [0.0], [math.nan]]), None)
    assert float(codec.binary_prior[0]) == pytest.approx(0.25)
    raw = torch.tensor([[0.3], [-0.2]])
    loss, _ = codec.loss(raw, torch.tensor([[1.0], [0.0]]))
    # pos_weight = (1 - p) / p = 3
    expected = (3 * -math.log(torch.sigmoid(torch.tensor(0.3)).item()) - math.log(1 - torch.sigmoid(torch.tensor(-0.2)).item())) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_prepare_fits_normalisation_and_level_priors_on_the_training_split():
    ds = ToyNodules(n=8)
    model = make_model()
    fit_concept_statistics(model, ds)
    pixels = 2 * ds.radius  # diameter_mm / spacing
    assert float(model.codec.loc[0]) == pytest.approx(float(pixels.mean()), rel=1e-5)
    assert float(model.codec.scale[0]) == pytest.approx(float(pixels.std()), rel=1e-5)
    assert float(model.codec.loc[1]) == pytest.approx(float(ds.hu.mean()), rel=1e-4, abs=1e-4)
    counts = torch.bincount(ds.texture.long(), minlength=3).float() + 1
    assert torch.allclose(model.codec.level_prior, counts / counts.sum())
    spic = ds.spic[torch.isfinite(ds.spic)]
    assert float(model.codec.binary_prior[0]) == pytest.approx(float(spic.mean()))


# -- interventions ----------------------------------------------------------------------------------
def test_intervening_with_all_true_concepts_equals_the_label_head_on_true_concepts():
    model = make_model()  # interventions do not depend on how the model was trained
    set_stats(model)
    x = torch.rand(2, 1, 32, 32)
    values = torch.tensor([[1.0, 2.0, 7.0, 30.0], [0.0, 0.0, 3.0, -20.0]])  # spic, texture idx, mm, HU
    exp = model.intervene_vector(x, values, torch.ones(2, 4, dtype=torch.bool), spacing=SPACING)
    by_hand = torch.tensor([
        [1.0, 0.0, 0.0, 1.0, (7.0 / 0.5 - 12.0) / 4.0, (30.0 + 20.0) / 50.0],
        [0.0, 1.0, 0.0, 0.0, (3.0 / 0.5 - 12.0) / 4.0, 0.0],
    ])
    assert torch.allclose(exp.concept_vector, by_hand, atol=1e-6)
    assert torch.allclose(exp.logits, model.label_head(by_hand), atol=1e-6)
    assert exp.decomposition_error() < 1e-5
    assert exp.intervened.all()
    # the concepts report the values that were set, in their units
    assert torch.allclose(exp.concepts["diameter_mm"].value, torch.tensor([7.0, 3.0]), atol=1e-5)
    # the training adapter's independent label head sees exactly these vectors
    ds = ToyNodules(n=4, missing=())
    batch = batch_of(ds)
    truth = CBMTraining(CBMTrainingSettings(mode="independent")).concept_targets(model, batch, torch.device("cpu"))
    assert torch.allclose(model.codec.target_bottleneck(truth)[:, :4],
                          torch.cat([batch["concepts"]["spiculation"][:, None],
                                     torch.nn.functional.one_hot(batch["concepts"]["texture"].long(), 3)], 1))


def test_continuous_interventions_accept_any_compatible_unit():
    model = make_model()
    set_stats(model)
    x = torch.rand(2, 1, 32, 32)
    ref = model.intervene(x, {"diameter_mm": 14}, spacing=SPACING).logits
    for value in ("1.4 cm", "14 mm", Measurement("d", 1.4, "cm")):
        assert torch.equal(model.intervene(x, {"diameter_mm": value}, spacing=SPACING).logits, ref)
    assert torch.equal(model.intervene(x, {"mean_hu": "-600 HU"}, spacing=SPACING).logits,
                       model.intervene(x, {"mean_hu": -600}, spacing=SPACING).logits)
    with pytest.raises(ValueError, match="cannot express"):
        model.intervene(x, {"diameter_mm": "3 kg"}, spacing=SPACING)
    # 14 mm is twice as many pixels at half the spacing: the decision sees a different size
    other = model.intervene(x, {"diameter_mm": "14 mm"}, spacing=(0.25, 0.25)).logits
    assert not torch.allclose(other, ref)


def test_categorical_interventions_by_name_or_index():
    model = make_model()
    x = torch.rand(2, 1, 32, 32)
    by_name = model.intervene(x, {"texture": "part-solid", "spiculation": True}, spacing=SPACING)
    by_index = model.intervene(x, {"texture": 1, "spiculation": 1}, spacing=SPACING)
    assert torch.equal(by_name.logits, by_index.logits)
    assert torch.equal(by_name.concepts["texture"], torch.tensor([[0.0, 1.0, 0.0]] * 2))
    assert by_name.intervened[:, [0, 1]].all() and not by_name.intervened[:, 2:].any()
    with pytest.raises(ValueError, match="levels"):
        model.intervene(x, {"texture": "cavitated"})
    with pytest.raises(ValueError, match="index"):
        model.intervene(x, {"texture": 3})
    with pytest.raises(ValueError, match="unknown concept"):
        model.intervene(x, {"lobulation": 1})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.intervene(x, {"spiculation": 2})


def test_length_concepts_follow_the_spacing_and_intensities_do_not():
    model = make_model()
    set_stats(model)
    x = torch.rand(2, 1, 32, 32)
    a = model.explain(x, spacing=(0.4, 0.4))
    b = model.explain(x, spacing=(0.8, 0.8))
    assert torch.allclose(b.measurements["diameter_mm"].value, 2 * a.measurements["diameter_mm"].value, rtol=1e-5)
    assert torch.equal(b.measurements["mean_hu"].value, a.measurements["mean_hu"].value)
    assert torch.equal(a.logits, b.logits)
    # without any spacing, lengths cannot be reported but the decision is unaffected
    c = model.explain(x)
    assert "diameter_mm" not in c.measurements and "mean_hu" in c.measurements
    assert torch.equal(c.logits, a.logits)
    with pytest.raises(ValueError, match="spacing"):
        model.intervene(x, {"diameter_mm": "14 mm"})


# -- training modes ---------------------------------------------------------------------------------
def _grads(params) -> list[bool]:
    return [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params]


def test_training_stages_train_the_right_parameters():
    ds = ToyNodules(n=6)
    batch = batch_of(ds)
    noisy = dict(batch, image=torch.rand_like(batch["image"]))

    independent = make_model().train()
    adapter = training_for(independent, {"mode": "independent"})
    assert isinstance(adapter, CBMTraining) and adapter.settings == CBMTrainingSettings(mode="independent")
    out = adapter.loss(independent, batch, "label_head")
    # independent: the label head never sees predicted concepts — the image does not matter
    assert float(adapter.loss(independent, noisy, "label_head").loss.detach()) == float(out.loss.detach())
    out.loss.backward()
    assert all(p.grad is None for p in independent.backbone.parameters())
    assert all(_grads(independent.label_head.parameters()))
    assert {id(p) for p in adapter.trainable_parameters(independent, "label_head")} == \
           {id(p) for p in independent.label_head.parameters()}
    with pytest.raises(ValueError, match="mode='joint'"):
        adapter.loss(independent, batch, "joint")

    # validation (eval mode) scores the deployed model: its logits are those of the predicted concepts, while
    # the stage loss stays the true-concept objective
    independent.eval()
    val = adapter.loss(independent, batch, "label_head")
    with torch.no_grad():
        deployed = independent(batch["image"])
        on_truth = independent.predict_label(independent.codec.target_bottleneck(
            adapter.concept_targets(independent, batch, torch.device("cpu"))))
    torch.testing.assert_close(val.logits, deployed)
    assert not torch.allclose(val.logits, on_truth)
    torch.testing.assert_close(val.loss, torch.nn.functional.cross_entropy(on_truth, batch["label"]))

    sequential = make_model().train()
    adapter = training_for(sequential, {"mode": "sequential"})
    out = adapter.loss(sequential, batch, "label_head")
    assert float(adapter.loss(sequential, noisy, "label_head").loss.detach()) != float(out.loss.detach())  # predicted concepts
    out.loss.backward()
    assert all(p.grad is None for p in sequential.backbone.parameters())
    assert all(p.grad is None for p in sequential.concept_head.parameters())
    assert all(_grads(sequential.label_head.parameters()))

    concepts_stage = make_model().train()
    adapter = training_for(concepts_stage, {"mode": "sequential"})
    assert adapter.settings == CBMTrainingSettings()  # sequential is the default
    out = adapter.loss(concepts_stage, batch, "concepts")
    out.loss.backward()
    assert all(p.grad is None for p in concepts_stage.label_head.parameters())
    assert any(_grads(concepts_stage.backbone.parameters()))
    trainable = {id(p) for p in adapter.trainable_parameters(concepts_stage, "concepts")}
    assert trainable.isdisjoint({id(p) for p in concepts_stage.label_head.parameters()})

    joint = make_model().train()
    adapter = training_for(joint, {"mode": "joint", "joint_lambda": 0.5})
    out = adapter.loss(joint, batch, "joint")
    x = joint.input_spec.intensity(batch["image"])
    raw = joint.concept_logits(x)
    lc, _ = joint.codec.loss(raw, adapter.concept_targets(joint, batch, x.device))
    ce = torch.nn.functional.cross_entropy(joint.predict_label(joint.codec.bottleneck(raw)), batch["label"])
    assert float(out.loss.detach()) == pytest.approx(float((ce + 0.5 * lc).detach()), rel=1e-5)  # Koh: L_y + lambda L_c
    # with lambda = 0 the label loss alone still trains the image network through the bottleneck
    joint0 = make_model().train()
    CBMTraining(CBMTrainingSettings(mode="joint", joint_lambda=0.0)).loss(joint0, batch, "joint").loss.backward()
    assert any(_grads(joint0.backbone.parameters())) and all(_grads(joint0.label_head.parameters()))


def test_a_calibrated_bottleneck_reads_the_balanced_losses_optimum_as_the_training_rate():
    # The class-balanced loss of a binary concept with training rate p is minimised by the constant logit
    # logit(p) + log(pos_weight), and the level-weighted cross-entropy by equal level logits: the calibrated
    # bottleneck turns both back into the training split's rates; the uncalibrated one reads 0.5 and 1/3.
    calibrated, plain = make_model(calibrated_concepts=True), make_model()
    for model in (calibrated, plain):
        set_stats(model)  # spiculation rate 0.25 (pos_weight 3); texture levels 0.5 / 0.3 / 0.2
    raw = torch.zeros(1, calibrated.codec.width)
    raw[0, 0] = math.log(0.25 / 0.75) + math.log(3.0)
    texture = calibrated.codec.slices[calibrated.codec.index("texture")]
    torch.testing.assert_close(calibrated.codec.bottleneck(raw)[0, 0], torch.tensor(0.25))
    torch.testing.assert_close(calibrated.codec.bottleneck(raw)[0, texture], torch.tensor([0.5, 0.3, 0.2]))
    torch.testing.assert_close(plain.codec.bottleneck(raw)[0, 0], torch.tensor(0.5))
    torch.testing.assert_close(plain.codec.bottleneck(raw)[0, texture], torch.full((3,), 1 / 3))
    # continuous concepts are untouched, and the order of cases (so every concept AUROC) is kept
    many = torch.randn(50, calibrated.codec.width)
    diameter = calibrated.codec.slices[calibrated.codec.index("diameter_mm")].start
    torch.testing.assert_close(calibrated.codec.bottleneck(many)[:, diameter], many[:, diameter])
    assert torch.equal(calibrated.codec.bottleneck(many)[:, 0].argsort(), many[:, 0].argsort())
    # without class balance there is no shift to remove
    unbalanced, unbalanced_plain = make_model(calibrated_concepts=True, balance_concepts=False), make_model(balance_concepts=False)
    for model in (unbalanced, unbalanced_plain):
        set_stats(model)
    torch.testing.assert_close(unbalanced.codec.bottleneck(many), unbalanced_plain.codec.bottleneck(many))


def test_a_calibrated_bottleneck_is_saved_as_one_and_its_decision_reads_the_calibrated_vector(tmp_path: Path):
    model = make_model(calibrated_concepts=True)
    set_stats(model)
    x = torch.rand(2, 1, 32, 32)
    model.save_pretrained(tmp_path / "cbm")
    loaded = CBM.from_pretrained(str(tmp_path / "cbm")).eval()
    assert loaded.config.calibrated_concepts is True
    assert torch.equal(loaded(x), model(x))
    vector = model.codec.bottleneck(model.concept_logits(model.input_spec.intensity(x)))
    torch.testing.assert_close(model(x), model.predict_label(vector))
    assert not torch.allclose(vector, make_model().codec.bottleneck(model.concept_logits(model.input_spec.intensity(x))))


def test_random_interventions_replace_annotated_concepts_at_the_rate_and_only_while_training():
    ds = ToyNodules(n=12)
    batch = batch_of(ds)
    model = make_model().train()
    set_stats(model)
    adapter = training_for(model, {"mode": "sequential", "intervention_rate": 0.5})
    internal = adapter.concept_targets(model, batch, torch.device("cpu"))  # (B, Kc); spiculation of case 3 missing
    predicted = torch.full((12, model.codec.width), 0.123)
    truth = model.codec.target_bottleneck(internal)
    torch.manual_seed(0)
    mixed = randomly_intervene(model, predicted, internal, 1.0)
    known_units = model.codec.unit_mask(torch.isfinite(internal))
    torch.testing.assert_close(mixed[known_units], truth[known_units])  # rate 1: every annotated concept is true
    assert bool((mixed[~known_units] == 0.123).all())  # a concept with no annotation is never imputed
    torch.testing.assert_close(randomly_intervene(model, predicted, internal, 0.0), predicted)
    # at rate 0.5, about half of the annotated concepts, and each concept's units together (a level concept's one-hot)
    many = torch.cat([internal] * 200)
    torch.manual_seed(1)
    replaced = randomly_intervene(model, torch.full((2400, model.codec.width), 0.123), many, 0.5) != 0.123
    known = torch.isfinite(many)
    share = replaced[:, [sl.start for sl in model.codec.slices]][known].float().mean()
    assert 0.45 < float(share) < 0.55
    texture = model.codec.slices[model.codec.index("texture")]
    assert bool((replaced[:, texture].all(1) | ~replaced[:, texture].any(1)).all())

    # the sequential label head trains on the mixture; validation (eval mode) reads predictions only
    torch.manual_seed(2)
    with_rate = adapter.loss(model, batch, "label_head").loss
    torch.manual_seed(2)
    without = training_for(model, {"mode": "sequential"}).loss(model, batch, "label_head").loss
    assert float(with_rate.detach()) != float(without.detach())
    model.eval()
    torch.testing.assert_close(adapter.loss(model, batch, "label_head").logits, model(batch["image"]))
    # joint: gradients still reach the image network through the concepts that were not replaced
    joint = make_model().train()
    set_stats(joint)
    training_for(joint, {"mode": "joint", "intervention_rate": 0.25}).loss(joint, batch, "joint").loss.backward()
    assert any(_grads(joint.backbone.parameters()))
    with pytest.raises(ValueError, match="independent"):
        CBMTrainingSettings(mode="independent", intervention_rate=0.25)
    with pytest.raises(ValueError, match="probability"):
        CBMTrainingSettings(mode="sequential", intervention_rate=1.5)


# -- intervention curve ----------------------------------------------------------------------------
def oracle_model() -> CBM:
    """Label = spiculation; the image network predicts 'not spiculated' for every case."""
    model = make_model()  # as if trained independently: the curve reads the model only
    with torch.no_grad():
        model.concept_head.weight.zero_()
        model.concept_head.bias.zero_()
        model.concept_head.bias[0] = -8.0
        model.label_head.weight.zero_()
        model.label_head.bias.zero_()
        model.label_head.weight[1, 0] = 10.0
        model.label_head.bias[1] = -5.0
    return model


def test_intervention_curve_reaches_the_oracle_with_all_concepts_corrected():
    ds = ToyNodules(n=12, missing=())
    model = oracle_model()
    kc = model.num_concepts
    for policy in (RandomPolicy(seed=1), UncertaintyPolicy(), FixedOrderPolicy.fit(model, ToyNodules(n=8, seed=1, missing=()))):
        curve = intervention_curve(model, ds, policy, repeats=3)
        assert curve["num_corrected"] == list(range(kc + 1)) and len(curve["values"]) == kc + 1
        assert curve["values"][0] == pytest.approx(0.5)  # everything predicted benign
        assert curve["values"][-1] == pytest.approx(1.0) == curve["all_corrected"]
    fixed = FixedOrderPolicy.fit(model, ToyNodules(n=8, seed=1, missing=()))
    assert fixed.concept_order[0] == "spiculation"
    assert intervention_curve(model, ds, fixed)["values"][1] == pytest.approx(1.0)
    # a random order averages over repeats: after one correction, spiculation was chosen 1/Kc of the time
    curve = intervention_curve(model, ds, RandomPolicy(seed=0), repeats=20)
    assert 0.5 < curve["values"][1] < 1.0 and curve["repeats"] == 20
    auroc = intervention_curve(model, DataLoader(ds, batch_size=5), fixed, metric="auroc")
    assert auroc["values"][-1] == pytest.approx(1.0)


def test_missing_ground_truth_is_skipped_not_imputed():
    ds = ToyNodules(n=12, missing=(3,))  # case 3 is spiculated (label 1) but unlabelled
    model = oracle_model()
    curve = intervention_curve(model, ds, UncertaintyPolicy())
    assert curve["all_corrected"] == pytest.approx(11 / 12)  # case 3 keeps its (wrong) prediction


# -- persistence and 3D ------------------------------------------------------------------------------
def test_save_load_round_trip_keeps_normalisation_and_logits(tmp_path: Path):
    import json

    model = make_model()  # trained jointly or not, the saved model is the architecture and weights only
    set_stats(model)
    x = torch.rand(2, 1, 32, 32)
    model.save_pretrained(tmp_path / "cbm")
    saved = json.loads((tmp_path / "cbm" / "config.json").read_text())
    assert saved["config_version"] == 2 and not set(CBMConfig.TRAINING_FIELDS_V1) & set(saved["config"])
    loaded = CBM.from_pretrained(str(tmp_path / "cbm")).eval()
    assert loaded.config == model.config
    for name in ("binary_prior", "level_prior", "loc", "scale"):
        assert torch.equal(getattr(loaded.codec, name), getattr(model.codec, name))
    assert torch.equal(loaded(x), model(x))
    a, b = model.explain(x, spacing=SPACING), loaded.explain(x, spacing=SPACING)
    assert torch.equal(a.measurements["diameter_mm"].value, b.measurements["diameter_mm"].value)


def test_3d_input_runs_with_exact_decomposition():
    torch.manual_seed(0)
    model = create_model("cbm_resnet8", concepts=CONCEPTS, spatial_dims=3, img_size=(16, 16, 16)).eval()
    x = torch.rand(2, 1, 16, 16, 16)
    exp = model.explain(x, spacing=(1.0, 0.5, 0.5))
    assert exp.logits.shape == (2, 2) and exp.concept_maps.shape == (2, model.codec.width, 16, 16, 16)
    assert exp.decomposition_error() < 1e-5
    batch = {"image": x, "label": torch.tensor([0, 1]), "spacing": torch.tensor([[1.0, 0.5, 0.5]] * 2),
             "concepts": {"spiculation": torch.tensor([1.0, math.nan]), "texture": torch.tensor([0.0, 2.0])},
             "measurements": {"diameter_mm": torch.tensor([5.0, 8.0]), "mean_hu": torch.tensor([10.0, -400.0])}}
    assert torch.isfinite(CBMTraining().loss(model, batch, "concepts").loss)


def test_html_report_names_concepts_units_and_contributions(tmp_path: Path):
    model = make_model()
    exp = model.intervene(torch.rand(1, 1, 32, 32), {"spiculation": 1}, spacing=SPACING)
    page = exp.save_html(tmp_path / "r.html").read_text()
    assert "spiculation (set)" in page and "mm" in page and "contribution to" in page and "data:image/png" in page


def test_config_refuses_quantities_and_duplicate_concepts():
    from mlmi_zoo.specs import QuantitySpec

    with pytest.raises(ValueError, match="continuous concepts"):
        CBMConfig(concepts=CONCEPTS, quantities=(QuantitySpec("diameter_mm", "mm"),))
    with pytest.raises(ValueError, match="unique"):
        CBMConfig(concepts=CONCEPTS + (ConceptSpec("spiculation", "binary"),))


def test_training_settings_are_checked_and_are_not_model_config():
    from mlmi_zoo._config import OverrideError

    with pytest.raises(ValueError, match="mode must be"):
        CBMTrainingSettings(mode="alternating")
    with pytest.raises(ValueError, match="joint_lambda must be >= 0"):
        CBMTrainingSettings(joint_lambda=-0.1)
    with pytest.raises(ValueError, match="fa_coef must be >= 0"):
        CBMTrainingSettings(fa_coef=-1.0)
    model = make_model()
    with pytest.raises(OverrideError, match="joint_lambda"):
        training_for(model, {"joint_lambda": "a lot"})
    with pytest.raises(OverrideError, match="unknown key"):
        training_for(model, {"clst_coef": 0.8})
    for key, value in (("mode", "joint"), ("joint_lambda", 0.5), ("fa_coef", 0.1)):
        with pytest.raises(OverrideError, match="is a training setting"):
            make_model(**{key: value})
    with pytest.raises(TypeError, match="CBMTrainingSettings"):
        CBMTraining(object())
    assert training_for(model, None).settings == CBMTrainingSettings()


# -- phantom training --------------------------------------------------------------------------------
@pytest.mark.slow
def test_cbm_learns_binary_concepts_on_nodule_phantoms():
    from sklearn.metrics import roc_auc_score

    from mlmi_zoo.training.datasets import phantoms

    torch.manual_seed(0)
    train_set = phantoms.NodulePhantom(384, size=48, seed=0)
    train = [train_set[i] for i in range(len(train_set))]  # rendered once
    test = phantoms.NodulePhantom(128, size=48, seed=1)
    # a window wide enough to tell calcium (300-900 HU) from soft tissue; stride 16 for capacity
    model = create_model("cbm_resnet8", img_size=(48, 48), feature_stride=16,
                         intensity={"kind": "window", "low": -1350.0, "high": 1000.0, "unit": "HU"})
    adapter = training_for(model, {"mode": "sequential"})
    adapter.prepare(model, train)
    opt = torch.optim.Adam(adapter.trainable_parameters(model, "concepts"), lr=3e-3)
    model.train()
    for _ in range(7):
        for batch in DataLoader(train, batch_size=32, shuffle=True):
            opt.zero_grad()
            adapter.loss(model, batch, "concepts").loss.backward()
            opt.step()
    model.eval()
    batch = batch_of(test)
    exp = model.explain(adapter.inputs(model, batch), spacing=batch["spacing"])
    aurocs = {name: roc_auc_score(batch["concepts"][name].numpy(), exp.concepts[name].numpy())
              for name in ("spiculation", "calcification", "margin_sharp")}
    # At this budget (384 cases, 7 epochs of resnet8 on a CPU) calcification generalises
    # (AUROC ~0.95); spiculation is fitted on the training split but not yet on new cases.
    assert aurocs["calcification"] > 0.8, f"concept AUROCs {aurocs}"
