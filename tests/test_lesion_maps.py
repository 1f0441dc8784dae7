"""Each finding's map against its masks beside the image-processing control, the centre prior and a uniform map."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlmi_zoo.evaluation.lesion_maps import green_channel_map, lesion_localization, pixel_ap


class Spots:
    """RGB images with bright spots ("exudates") and dark spots ("dots"); one mask per finding; a circular FOV."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.samples = []
        yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        fov = (yy - 15.5) ** 2 + (xx - 15.5) ** 2 <= 15.5 ** 2
        for i in range(n):
            masks = {}
            image = torch.rand(3, 32, 32, generator=g) * 0.6 + 0.2
            for name, sign in (("exudates", 1.0), ("dots", -1.0)):
                y, x = (int(v) for v in torch.randint(8, 22, (2,), generator=g))
                m = torch.zeros(1, 32, 32, dtype=torch.bool)
                m[0, y:y + 3, x:x + 3] = True
                image[1][m[0]] += 0.15 * sign  # weaker than the noise: the green channel alone is imperfect
                masks[name] = m & fov
            self.samples.append({"image": image.clamp(0, 1), "fov": fov, "concept_masks": masks,
                                 "concept_masks_known": {"exudates": torch.tensor(True), "dots": torch.tensor(i != 0)},
                                 "patient_id": f"p{i}"})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]


APPEARANCE = {"exudates": "bright", "dots": "dark"}


def oracle(batch: dict) -> dict[str, torch.Tensor]:
    """A map that is the mask (plus a little noise): the best a model can do."""
    return {n: m[:, 0].float() + 0.01 * torch.rand(m[:, 0].shape) for n, m in batch["concept_masks"].items()}


def test_a_map_on_the_masks_beats_every_control_and_unknown_masks_are_skipped():
    out = lesion_localization(oracle, Spots(8, 1), Spots(16, 2), APPEARANCE, n_boot=100)
    assert set(out) == {"exudates", "dots"}
    assert out["exudates"]["images"] == 8 and out["dots"]["images"] == 7  # case 0's dots mask is not known
    for name, r in out.items():
        aupr = r["pixel_aupr"]
        assert aupr["model"]["estimate"] == pytest.approx(1.0)
        assert set(aupr["controls"]) == {"image processing", "centre prior", "uniform"}
        assert set(r["activation_precision"]["controls"]) == set(r["pointing_game"]["controls"]) == {
            "image processing", "centre prior"}
        assert r["pointing_game"]["model"]["estimate"] == 1.0
        assert r["pooled_aupr"]["model"] == pytest.approx(1.0)
        assert 0 < r["pooled_aupr"]["uniform"] < 0.02  # nine pixels of ~800 in the FOV
        assert 0 < r["pooled_aupr"]["image processing"] < 1
        assert aupr["verdict"]["status"] == "demonstrated"


def test_the_image_processing_control_reads_the_green_channel_the_way_the_finding_looks():
    image = torch.zeros(3, 4, 4)
    image[1, 0, 0] = 1.0
    assert float(green_channel_map(image, "bright")[0, 0]) == 1.0
    assert float(green_channel_map(image, "dark")[0, 0]) == -1.0
    with pytest.raises(ValueError, match="appearance"):
        green_channel_map(image, "grey")
    with pytest.raises(ValueError, match="RGB"):
        green_channel_map(image[:1], "bright")
    assert math.isnan(pixel_ap(np.ones(4), np.zeros(4, dtype=bool)))


def test_a_map_of_another_shape_or_a_finding_without_control_is_refused():
    with pytest.raises(ValueError, match="on the image's pixels"):
        lesion_localization(lambda b: {"exudates": torch.zeros(len(b["image"]), 16, 16)}, Spots(2, 1), Spots(2, 2),
                            APPEARANCE, n_boot=10)
    with pytest.raises(ValueError, match="no image-processing control"):
        lesion_localization(lambda b: {"cysts": torch.zeros(len(b["image"]), 32, 32)}, Spots(2, 1), Spots(2, 2),
                            APPEARANCE, n_boot=10)
