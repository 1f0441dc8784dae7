"""Attention pooling of concept maps and the fine-annotation cost on the attention: the concept
logit stays the exact mean of its map, level logits are centred without changing a probability,
the cost counts attention off the lesion only, and it trains the attention head."""
from __future__ import annotations

import pytest
import torch

from mlmi_zoo.architectures.blocks.stages import training_for
from mlmi_zoo.architectures.cbm.config import CBMTrainingSettings
from mlmi_zoo.architectures.cbm.model import CBM, CBMConfig
from mlmi_zoo.architectures.cbm.training import CBMTraining, attention_off_lesion

from test_cbm import SPACING, ToyNodules, batch_of, make_model, set_stats


def _with_masks(batch: dict) -> dict:
    """The toy disks' masks: the bright pixels."""
    return dict(batch, mask=batch["image"] > 0.5)


def test_attention_pooled_logits_are_the_mean_of_the_maps_and_decompose_exactly():
    model = make_model(pooling="attention")
    set_stats(model)
    x = torch.rand(3, 1, 32, 32)
    exp = model.explain(x, spacing=SPACING)
    assert torch.allclose(exp.logits, model(x), atol=1e-6)
    assert exp.decomposition_error() < 1e-5
    with torch.no_grad():
        maps, attention = model.concept_maps_and_attention(x)
        feats = model.backbone(x)
    assert attention is not None and attention.shape == (3, 1, *maps.shape[2:])
    assert torch.allclose(attention.sum((2, 3)), torch.ones(3, 1), atol=1e-6)
    assert torch.allclose(exp.concept_logits, maps.mean((2, 3)), atol=1e-6)
    # the pooled logit is sum_p a_p m_k(p) of the 1x1-conv outputs (for level units up to a shift)
    a = attention.flatten(2)  # (B, 1, L)
    raw = model.concept_head(feats).flatten(2)  # (B, K, L)
    weighted = (raw * a).sum(-1)  # (B, K)
    assert torch.allclose(exp.concept_logits[:, 0], weighted[:, 0], atol=1e-5)  # spiculation: attention-pooled
    # continuous concepts (diameter_mm, mean_hu) stay mean-pooled
    assert torch.allclose(exp.concept_logits[:, 4:], raw[:, 4:].mean(-1), atol=1e-5)
    assert exp.attention is not None and exp.attention.shape == (3, 1, 32, 32)


def test_level_logits_are_centred_without_changing_probabilities():
    model = make_model(pooling="attention")
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        maps, attention = model.concept_maps_and_attention(x)
        uncentred = (model.concept_head(model.backbone(x)) * attention).sum((2, 3))  # (B, K)
    levels = slice(1, 4)  # texture's three levels
    logits = maps.mean((2, 3))
    assert torch.allclose(maps[:, levels].sum(1), torch.zeros_like(maps[:, 0]), atol=1e-5)  # centred at every cell
    assert torch.allclose(logits[:, levels].softmax(-1), uncentred[:, levels].softmax(-1), atol=1e-6)
    assert (logits[:, levels].max(-1).values >= 0).all()  # the most probable level never has a negative logit


def test_mean_pooling_is_unchanged_and_has_no_attention():
    model = make_model()
    assert model.attention_head is None
    assert not any(k.startswith("attention_head") for k in model.state_dict())
    x = torch.rand(2, 1, 32, 32)
    maps, attention = model.concept_maps_and_attention(x)
    assert attention is None
    assert torch.equal(maps, model.concept_head(model.backbone(x)))
    assert model.explain(x, spacing=SPACING).attention is None


def test_attention_off_lesion_counts_only_cells_without_lesion():
    fractions = torch.zeros(3, 1, 2, 2)
    fractions[0, 0, 0, 0] = 0.25  # case 0: one cell touches the lesion
    fractions[1, 0, 1, :] = 1.0  # case 1: the bottom row is lesion
    on_lesion = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    uniform = torch.full((2, 2), 0.25)
    attention = torch.stack([on_lesion, uniform, uniform])[:, None]
    # case 0 pays nothing, case 1 pays the top row's 0.5, case 2 has no lesion and is left out
    assert float(attention_off_lesion(attention, fractions)) == pytest.approx(0.25)
    assert float(attention_off_lesion(attention[2:], fractions[2:])) == 0.0
    with pytest.raises(ValueError, match="same"):
        attention_off_lesion(attention, fractions[:, :, :1])


def test_fine_annotation_cost_trains_the_attention_head_in_the_concept_stage():
    batch = _with_masks(batch_of(ToyNodules(n=6)))
    model = make_model(pooling="attention").train()
    adapter = training_for(model, {"fa_coef": 2.0, "mode": "sequential"})
    trainable = {id(p) for p in adapter.trainable_parameters(model, "concepts")}
    assert {id(p) for p in model.attention_head.parameters()} <= trainable
    out = adapter.loss(model, batch, "concepts")
    assert 0.0 < out.logs["fine_annotation"] <= 1.0
    # the loss is the concept loss plus fa_coef times the cost
    without = CBMTraining(CBMTrainingSettings(mode="sequential")).loss(
        make_model(pooling="attention").train(), batch, "concepts")  # the same weights (make_model seeds)
    assert "fine_annotation" not in without.logs
    assert float(out.loss.detach()) == pytest.approx(without.logs["concepts"] + 2.0 * out.logs["fine_annotation"], rel=1e-5)
    out.loss.backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.attention_head.parameters())
    # a few steps on the cost alone move the attention onto the lesion
    optim = torch.optim.SGD(model.attention_head.parameters(), lr=5.0)
    first = out.logs["fine_annotation"]
    for _ in range(20):
        optim.zero_grad()
        x = model.input_spec.intensity(batch["image"])
        _, attention = model.concept_maps_and_attention(x)
        fractions = model.backbone.cell_fraction(batch["mask"], attention.shape[2:])
        cost = attention_off_lesion(attention, fractions)
        cost.backward()
        optim.step()
    assert float(cost.detach()) < 0.5 * first


def test_config_refuses_unknown_pooling_and_fine_annotation_without_attention():
    with pytest.raises(ValueError, match="pooling"):
        CBMConfig(pooling="median")  # type: ignore[arg-type]
    # the fine-annotation cost is a training setting, checked against the model it is to train
    with pytest.raises(ValueError, match="needs model.config.pooling='attention'"):
        training_for(make_model(), {"fa_coef": 1.0})
    with pytest.raises(ValueError, match="needs model.config.pooling='attention'"):
        CBMTraining(CBMTrainingSettings(fa_coef=1.0)).check(make_model())
    training_for(make_model(pooling="attention"), {"fa_coef": 1.0})  # accepted with attention pooling
    training_for(make_model(), {"fa_coef": 0.0})  # and off without it
    with pytest.raises(ValueError, match="fa_coef must be >= 0"):
        CBMTrainingSettings(fa_coef=-1.0)
    with pytest.raises(ValueError, match="fa_coef must be >= 0"):
        training_for(make_model(pooling="attention"), {"fa_coef": -1.0})


def test_attention_model_round_trips_through_save_and_load(tmp_path):
    import json

    model = make_model(pooling="attention")
    set_stats(model)
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "fa_coef" not in saved["config"]  # a training setting: not saved with the weights
    loaded = CBM.from_pretrained(str(tmp_path / "m")).eval()
    assert loaded.config.pooling == "attention" and loaded.config == model.config
    assert training_for(loaded, {"fa_coef": 0.5}).settings.fa_coef == 0.5  # the loaded model trains with the cost
    x = torch.rand(2, 1, 32, 32)
    assert torch.allclose(loaded(x), model(x), atol=1e-6)
