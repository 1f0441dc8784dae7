"""Dihedral training augmentation: image and mask move together, ground truth stays true, choices are reproducible."""
from __future__ import annotations

import pytest
import torch

from mlmi_zoo.training.augment import DihedralAugment, augmented, dihedral
from mlmi_zoo.training.data_spec import DataSpec


def _sample(dims: int = 2) -> dict:
    shape = (5, 7) if dims == 2 else (3, 5, 7)
    image = torch.arange(float(torch.tensor(shape).prod())).reshape(1, *shape)
    return {"image": image, "mask": image > image.mean(), "spacing": torch.tensor([0.5, 0.8] if dims == 2 else [2.0, 0.5, 0.8]),
            "label": torch.tensor(1), "concepts": {"spiculation": torch.tensor(1.0)}, "index": 3}


@pytest.mark.parametrize("dims", [2, 3])
def test_the_eight_symmetries_are_distinct_and_keep_ground_truth(dims: int) -> None:
    s = _sample(dims)
    outs = [dihedral(s, k) for k in range(8)]
    assert torch.equal(outs[0]["image"], s["image"])
    keys = {tuple(o["image"].flatten().tolist()) for o in outs}
    assert len(keys) == 8
    for k, o in enumerate(outs):
        # the mask is the same function of the transformed image: they moved together
        assert torch.equal(o["mask"], o["image"] > s["image"].mean())
        sp = o["spacing"].tolist()
        expect = s["spacing"].tolist()
        if k % 2:
            expect[-2:] = expect[-2:][::-1]
        assert sp == pytest.approx(expect)
        assert o["image"].shape[-2:] == (s["image"].shape[-2:] if k % 2 == 0 else s["image"].shape[-2:][::-1])
        assert o["label"] is s["label"] and o["concepts"] is s["concepts"]
    assert torch.equal(s["image"], _sample(dims)["image"])  # the input was not modified
    with pytest.raises(ValueError, match="0..7"):
        dihedral(s, 8)


def test_choices_depend_only_on_seed_epoch_and_index() -> None:
    data = [_sample() for _ in range(40)]
    a, b = DihedralAugment(data, seed=0, epoch=2), DihedralAugment(data, seed=0, epoch=2)
    assert [a.symmetry(i) for i in range(40)] == [b.symmetry(i) for i in range(40)]
    assert torch.equal(a[5]["image"], b[5]["image"])
    other = DihedralAugment(data, seed=0, epoch=3)
    assert [a.symmetry(i) for i in range(40)] != [other.symmetry(i) for i in range(40)]
    assert len({a.symmetry(i) for i in range(40)}) > 4  # all symmetries are used, not one
    assert augmented(data, None, 0, 0) is data
    rect = DihedralAugment([{**_sample(), "index": i} for i in range(40)], seed=0, epoch=0)
    assert {tuple(rect[i]["image"].shape) for i in range(40)} == {(1, 5, 7)}  # quarter turns skipped off-square
    with pytest.raises(ValueError, match="unknown augmentation"):
        augmented(data, "elastic", 0, 0)


def test_recipes_refuse_unknown_or_bag_augmentation() -> None:
    with pytest.raises(ValueError, match="data.augment must be"):
        DataSpec("nodule_phantom", {"size": 64}, train_size=4, val_size=2, augment="elastic")
    with pytest.raises(ValueError, match="bags of instances"):
        DataSpec("tilebag_phantom", {}, train_size=4, val_size=2, augment="dihedral")
    assert DataSpec("nodule_phantom", {"size": 64}, train_size=4, val_size=2, augment="dihedral").augment == "dihedral"
