"""MIL training: the adapter's subsampling, its loss terms and settings, and learning on tile bags."""
from __future__ import annotations

import pytest
import torch
from _mil import (
    FEATURE_MODELS,
    TILE_AREA_MM2,
    D,
    make,
    padded,
    trainer_for,
)

import mlmi_zoo
from mlmi_zoo._config import OverrideError
from mlmi_zoo.architectures.blocks.stages import training_for
from mlmi_zoo.architectures.mil.config import MILTrainingSettings
from mlmi_zoo.architectures.mil.model import (
    MILConfig,
)
from mlmi_zoo.architectures.mil.training import (
    MILInputs,
    MILTraining,
    gather_instances,
    subsample_instances,
)


# -- training adapter -------------------------------------------------------------------------------
def test_subsampling_keeps_only_valid_instances_and_is_seeded() -> None:
    mask = torch.tensor([[True, False, True, False, True, False, False, False], [True] * 8])
    torch.manual_seed(3)
    idx = subsample_instances(mask, 4)
    torch.manual_seed(3)
    assert torch.equal(idx, subsample_instances(mask, 4))
    assert idx[0, :3].tolist() == [0, 2, 4]  # a bag with fewer valid instances keeps them all
    assert gather_instances(mask, idx).sum(1).tolist() == [3, 4]


@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_training_loss_is_ce_when_areas_are_predicted_exactly(name: str) -> None:
    model = make(name)
    adapter = trainer_for(model)
    assert adapter.family == model.family
    x, mask = padded([torch.randn(n, D) for n in (5, 3)])
    label = torch.tensor([0, 1])
    predicted = model.explain(x, mask).measurements["tumour_area_mm2"].value
    batch = {"feats": x, "mask": mask, "label": label, "measurements": {"tumour_area_mm2": predicted}}
    assert isinstance(adapter.inputs(model, batch), MILInputs)
    out = adapter.loss(model, batch, "joint")
    assert out.logs["tumour_area_mm2_log"] < 1e-10
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(model(x, mask), label))


def test_training_subsamples_and_trains_every_part() -> None:
    model = make("additive_mil_features").train()
    settings = {"train_max_instances": 4, "attention_instance_weight": 1.0}
    x, mask = padded([torch.randn(n, D) for n in (9, 3)])
    batch = {"feats": x, "mask": mask, "label": torch.tensor([1, 0]),
             "measurements": {"tumour_area_mm2": torch.tensor([0.05, float("nan")])},
             "instance_area_mm2": torch.rand(2, 9) * TILE_AREA_MM2, "instance_labels": torch.randint(0, 2, (2, 9))}
    torch.manual_seed(1)
    out = trainer_for(model, **settings).loss(model, batch, "joint")
    torch.manual_seed(1)
    again = trainer_for(model, **settings).loss(model, batch, "joint")
    assert torch.equal(out.loss, again.loss)  # deterministic given torch's RNG
    assert {"ce", "instance_tumour_area_mm2", "attention_instance", "contribution_instance"} <= set(out.logs)
    assert "tumour_area_mm2_log" not in out.logs  # per-instance areas replace the bag-area loss
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_area_head_stage_is_the_physical_loss_on_the_area_head_alone(name: str) -> None:
    model = make(name).train()
    adapter = trainer_for(model)
    x, mask = padded([torch.randn(n, D) for n in (7, 4)])
    batch = {"feats": x, "mask": mask, "label": torch.tensor([1, 0]),
             "instance_area_mm2": torch.rand(2, 7) * TILE_AREA_MM2}
    joint, area = adapter.loss(model, batch, "joint"), adapter.loss(model, batch, "area_head")
    torch.testing.assert_close(area.loss, torch.tensor(area.logs["instance_tumour_area_mm2"]))
    torch.testing.assert_close(joint.loss, area.loss + torch.tensor(joint.logs["ce"]))  # physical_weight 1
    head = {id(p) for p in model.area_head.parameters()}
    assert {id(p) for p in adapter.trainable_parameters(model, "area_head")} == head
    assert len(adapter.trainable_parameters(model, "joint")) == len(list(model.parameters()))
    without = make(name, quantities=())
    with pytest.raises(ValueError, match="has none"):
        trainer_for(without).trainable_parameters(without, "area_head")


@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_attention_instance_loss_is_bce_of_raw_scores_on_valid_instances(name: str) -> None:
    x, mask = padded([torch.randn(n, D) for n in (5, 3)])
    labels = torch.tensor([[1, 0, 0, 1, 0], [0, 0, 0, 0, 0]])  # padding labels are ignored
    batch = {"feats": x, "mask": mask, "label": torch.tensor([1, 0]), "instance_labels": labels}
    model = make(name)  # one model, trained with or without the instance loss
    base = trainer_for(model, physical_weight=0.0).loss(model, batch, "joint")
    out = trainer_for(model, physical_weight=0.0, attention_instance_weight=0.5).loss(model, batch, "joint")
    exp = model.explain(x, mask)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = bce(exp.attention_scores[mask], labels[mask].float())
    if exp.contributions is not None:  # additive MIL: also psi(h_n) of the positive class, = c_n / attn_n
        expected = expected + bce((exp.contributions[..., 1] / exp.attention)[mask], labels[mask].float())
    torch.testing.assert_close(out.logs["attention_instance"] + out.logs.get("contribution_instance", 0.0), float(expected))
    torch.testing.assert_close(out.loss, base.loss + 0.5 * expected)
    assert "attention_instance" not in base.logs
    with pytest.raises(ValueError, match="attention_instance_weight"):
        MILTrainingSettings(attention_instance_weight=-1.0)
    with pytest.raises(ValueError, match="attention_instance_weight"):  # the settings' own check
        training_for(model, {"attention_instance_weight": -1.0})


def test_training_settings_are_checked_and_not_part_of_the_model_config() -> None:
    for bad in ({"physical_weight": -0.5}, {"attention_bag_weight": -1.0}, {"train_max_instances": 0}):
        with pytest.raises(ValueError, match="must be"):
            MILTrainingSettings(**bad)
    with pytest.raises(OverrideError, match="train_max_instances"):
        training_for(make("abmil_features"), {"train_max_instances": "all"})
    for key in MILConfig.TRAINING_FIELDS_V1:
        with pytest.raises(OverrideError, match="is a training setting"):
            make("abmil_features", **{key: 1})
    # "auto": 4096 cached feature vectors, or 64 raw tiles that the model encodes itself (the default)
    auto = MILTrainingSettings()
    assert auto.train_max_instances == "auto"
    assert auto.max_instances(encodes_tiles=False) == 4096 and auto.max_instances(encodes_tiles=True) == 64
    assert MILTrainingSettings(train_max_instances=None).max_instances(True) is None
    assert MILTrainingSettings(train_max_instances=7).max_instances(False) == 7
    assert training_for(make("abmil_features")).settings == auto


def test_auto_training_subsample_caps_cached_feature_bags_at_4096() -> None:
    model = make("abmil_features", quantities=()).train()
    x, mask = torch.randn(1, 4100, D), torch.ones(1, 4100, dtype=torch.bool)
    batch = {"feats": x, "mask": mask, "label": torch.tensor([1])}
    seen = []
    forward_bag = model.forward_bag
    model.forward_bag = lambda x, mask=None, **kw: (seen.append(x.shape[1]), forward_bag(x, mask, **kw))[1]
    trainer_for(model, train_max_instances="auto").loss(model, batch, "joint")
    trainer_for(model).loss(model, batch, "joint")  # None: every instance
    assert seen == [4096, 4100]


# -- learning on the tile-bag phantom ----------------------------------------------------------------
@pytest.mark.slow
def test_additive_mil_learns_tile_bags_and_localises_tumour(record_property) -> None:
    from sklearn.metrics import roc_auc_score
    from torch.utils.data import DataLoader, Subset

    from mlmi_zoo.training.datasets.collate import collate_bags
    from mlmi_zoo.training.datasets.tilebag import TileBagPhantom

    # One data set split by bag index: the stand-in feature space (its tumour direction) depends on
    # the seed, so train and test bags must share it. Signal 4 makes tumour tiles separable enough
    # that a brief CPU run reaches the bag AUROC a frozen pathology encoder would give.
    bags = TileBagPhantom(240, features_only=True, feature_dim=64, seed=1, feature_signal=4.0)
    train, test = Subset(bags, range(160)), Subset(bags, range(160, 240))
    model = mlmi_zoo.create_model("additive_mil_features", in_features=64, hidden=32, attention_hidden=32,
                                  classifier_hidden=16, label_names=bags.label_names, tile_size=32,
                                  microns_per_pixel=0.5, dropout=0.1)
    adapter = training_for(model, {"train_max_instances": 128})
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    loader = DataLoader(train, batch_size=8, shuffle=True, collate_fn=collate_bags,
                        generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(8):
        for batch in loader:
            out = adapter.loss(model, batch, "joint")
            optimiser.zero_grad()
            out.loss.backward()
            optimiser.step()
    model.eval()
    b = collate_bags([test[i] for i in range(len(test))])
    exp = model.explain(b["feats"], b["mask"], coords=b["coords"])
    bag_auroc = roc_auc_score(b["label"].numpy(), exp.probabilities()[:, 1].numpy())
    m = b["mask"]
    instance_auroc = roc_auc_score(b["instance_labels"][m].numpy(), exp.contributions[..., 1][m].numpy())
    area_mae = float((exp.measurements["tumour_area_mm2"].value - b["measurements"]["tumour_area_mm2"]).abs().mean())
    record_property("bag_auroc", bag_auroc)
    record_property("instance_auroc_contributions", instance_auroc)
    record_property("tumour_area_mae_mm2", area_mae)
    assert bag_auroc > 0.9
    assert instance_auroc > 0.75  # contributions point at tumour tiles
    assert exp.decomposition_error() <= 1e-5
    assert exp.heatmap(0, "contributions").ndim == 2


def test_bag_label_instance_loss_follows_the_mil_assumption() -> None:
    from mlmi_zoo.architectures.mil.training import bag_label_instance_loss

    scores = torch.tensor([[0.0, 2.0, -1.0], [1.0, 3.0, 50.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    # bag 0 negative: all three instances against 0; bag 1 positive: its top valid score (3, not padding) against 1
    expected = bce(scores[0], torch.zeros(3)) + bce(torch.tensor([3.0]), torch.ones(1))
    torch.testing.assert_close(bag_label_instance_loss(scores, mask, torch.tensor([0, 1])), expected)
    torch.testing.assert_close(bag_label_instance_loss(scores, mask, torch.tensor([1, 1])),
                               bce(torch.tensor([2.0, 3.0]), torch.ones(2)))
    with pytest.raises(ValueError, match="0 \\(negative\\) or 1"):
        bag_label_instance_loss(scores, mask, torch.tensor([0, 2]))
    three = make("abmil_features", label_names=("a", "b", "c"))  # the model itself is fine
    with pytest.raises(ValueError, match="two classes"):
        training_for(three, {"attention_bag_weight": 1.0})
    with pytest.raises(ValueError, match="two classes"):
        MILTraining(MILTrainingSettings(attention_bag_weight=1.0)).check(three)
    training_for(three, {"attention_bag_weight": 0.0})  # off: any number of classes


@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_bag_label_instance_loss_is_added_with_its_weight(name: str) -> None:
    torch.manual_seed(0)
    batch = {"feats": torch.randn(2, 6, D), "mask": torch.ones(2, 6, dtype=torch.bool), "label": torch.tensor([0, 1])}
    losses = []
    for weight in (0.0, 2.0):
        torch.manual_seed(1)  # the same initial weights for both
        model = make(name, dropout=0.0, quantities=()).train()
        out = trainer_for(model, attention_bag_weight=weight).loss(model, batch, "joint")
        losses.append(float(out.loss.detach()))
        assert ("attention_bag" in out.logs) == (weight > 0)
    assert losses[1] == pytest.approx(losses[0] + 2.0 * out.logs["attention_bag"], rel=1e-5)
