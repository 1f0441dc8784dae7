"""Dihedral averaging at inference: CBM concepts and the ProtoPNet count head become exactly
invariant (maps: equivariant) to flips and quarter turns of the image plane."""
from __future__ import annotations

import pytest
import torch

import mlmi_zoo
from mlmi_zoo.architectures.blocks.heads import dihedral_views
from mlmi_zoo.specs import QuantitySpec

DIAMETER = QuantitySpec("diameter_mm", "mm", 0.0, 40.0)


def _turn(t: torch.Tensor) -> torch.Tensor:
    """One quarter turn then a flip of the image plane."""
    return torch.rot90(t, 1, (-2, -1)).flip(-1)


def test_views_are_the_eight_distinct_symmetries_and_back_undoes_each() -> None:
    x = torch.arange(2 * 5 * 5, dtype=torch.float32).reshape(1, 2, 5, 5)
    spacing = torch.tensor([[0.5, 0.8]])
    seen = []
    for i, (view, view_spacing, back) in enumerate(dihedral_views(x, spacing)):
        if i == 0:
            assert torch.equal(view, x)
        torch.testing.assert_close(back(view), x)
        # a quarter turn swaps the two in-plane spacings
        swapped = not torch.equal(view_spacing, spacing)
        assert swapped == (abs(float(view[0, 0, 0, 1] - view[0, 0, 0, 0])) == 5.0)  # x's rows step by 5
        seen.append(tuple(view.flatten().tolist()))
    assert len(set(seen)) == 8
    assert all(s is None for _, s, _ in dihedral_views(x, None))


def test_cbm_dihedral_views_give_invariant_concepts_equivariant_maps_and_an_exact_decomposition() -> None:
    torch.manual_seed(0)
    model = mlmi_zoo.create_model("cbm_resnet8", img_size=(64, 64), spacing=(0.5, 0.5), resample=True,
                                  pooling="attention", feature_stride=16, dihedral_views=True).eval()
    x, spacing = torch.rand(2, 1, 64, 64), torch.tensor([[0.5, 0.7], [1.0, 1.0]])
    exp = model.explain(x, spacing=spacing)
    turned = model.explain(_turn(x), spacing=spacing[:, [1, 0]])
    torch.testing.assert_close(turned.concept_logits, exp.concept_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(turned.concept_maps, _turn(exp.concept_maps), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(exp.logits, exp.contributions.sum(-1) + exp.bias, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x), model.explain(x).logits, atol=1e-5, rtol=1e-5)  # forward is averaged too
    # training runs one view: the same weights without the option give the training-mode outputs
    plain = mlmi_zoo.create_model("cbm_resnet8", img_size=(64, 64), spacing=(0.5, 0.5), resample=True,
                                  pooling="attention", feature_stride=16)
    plain.load_state_dict(model.state_dict())
    model.train(), plain.train()
    torch.manual_seed(1)
    a = model.concept_logits(x, spacing)
    torch.manual_seed(1)
    torch.testing.assert_close(a, plain.concept_logits(x, spacing))
    with pytest.raises(ValueError, match="square"):
        mlmi_zoo.create_model("cbm_resnet8", img_size=(64, 48), dihedral_views=True)


@pytest.mark.parametrize("context", ["given", "canonical", "own"])
def test_protopnet_dihedral_count_is_invariant_and_leaves_the_decision_alone(context: str) -> None:
    torch.manual_seed(0)
    kwargs = dict(img_size=(64, 64), spacing=(0.75, 0.75), quantities=(DIAMETER,), feature_stride=16,
                  prototypes_per_class=2, prototype_dim=8)
    count = {"resample": True, "context": context}
    model = mlmi_zoo.create_model("protopnet_resnet8", count_head={**count, "dihedral_views": True}, **kwargs).eval()
    kwargs["count_head"] = count
    x, spacing = torch.rand(2, 1, 64, 64), torch.tensor([[0.5, 0.6], [1.0, 1.0]])
    exp = model.explain(x, spacing=spacing)
    turned = model.explain(_turn(x), spacing=spacing[:, [1, 0]])
    torch.testing.assert_close(turned.measurements["diameter_mm"].value, exp.measurements["diameter_mm"].value,
                               atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(turned.measurement_map, _turn(exp.measurement_map), atol=1e-5, rtol=1e-5)
    plain = mlmi_zoo.create_model("protopnet_resnet8", **kwargs).eval()
    plain.load_state_dict(model.state_dict())
    single = plain.explain(x, spacing=spacing)
    torch.testing.assert_close(single.logits, exp.logits)  # the decision does not change
    assert not torch.allclose(single.measurements["diameter_mm"].value, exp.measurements["diameter_mm"].value)
    # the averaged map is what is counted
    parts = model.forward_parts(x, spacing)
    torch.testing.assert_close(parts.quantities, model.physical.standardised(parts.lesion_fraction))
    with pytest.raises(ValueError, match="count_head.dihedral_views"):
        mlmi_zoo.create_model("protopnet_resnet8", img_size=(62, 62), spacing=(0.75, 0.75), quantities=(DIAMETER,),
                              count_head={"dihedral_views": True})
