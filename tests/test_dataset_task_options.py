"""Data options the initialisation comparison needs: IDRiD referable DR and PneumoniaMNIST upsampled.

IDRiD grading (Porwal et al., Data 3(3):25, 2018) with ``task="referable"`` labels a photograph 1
when its ICDR grade is >= 2; PneumoniaMNIST (Yang et al., Scientific Data 2023) with ``upsample_to``
returns bilinearly enlarged images. Both read the real files under the data root.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest
import torch

from mlmi_zoo.training.data_spec import DataSpec, build_dataset
from mlmi_zoo.training.datasets._location import DATA_ENV_VAR
from mlmi_zoo.training.datasets.idrid import REFERABLE_MIN_GRADE, IDRiDGrading
from mlmi_zoo.training.datasets.medmnist import MedMNIST

DATA = Path(os.environ.get(DATA_ENV_VAR) or Path(__file__).resolve().parents[1].parent / "shared" / "data")
PNEUMONIA = DATA / "pneumoniamnist.npz"
pytestmark = pytest.mark.data


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One temporary cache folder for the module, through ``$MLMI_ZOO_CACHE``."""
    folder = tmp_path_factory.mktemp("task_options_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLMI_ZOO_CACHE", str(folder))
        yield folder


@pytest.mark.skipif(not (DATA / "idrid").is_dir(), reason=f"the IDRiD folder is absent under {DATA}")
def test_idrid_referable_labels_are_grade_two_or_more_on_the_same_split() -> None:
    grade = IDRiDGrading(DATA, split="val", size=32, prepare=False)
    referable = IDRiDGrading(DATA, split="val", size=32, task="referable", prepare=False)
    assert referable.image_ids == grade.image_ids  # the split does not depend on the task
    assert len(referable.label_names) == 2 and len(grade.label_names) == 5
    grades = [c.grade for c in grade.cases]
    assert {0, 1} & set(grades) and {2, 3, 4} & set(grades)  # both sides of the threshold are present
    # through __getitem__, on one photograph of each side of the threshold
    below = grades.index(next(g for g in grades if g < REFERABLE_MIN_GRADE))
    above = grades.index(next(g for g in grades if g >= REFERABLE_MIN_GRADE))
    for i in (below, above):
        assert int(grade[i]["label"]) == grades[i]
        assert int(referable[i]["label"]) == int(grades[i] >= REFERABLE_MIN_GRADE)
        assert referable[i]["patient_id"] == grade[i]["patient_id"]


@pytest.mark.skipif(not (DATA / "idrid").is_dir(), reason=f"the IDRiD folder is absent under {DATA}")
def test_idrid_unknown_task_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"task must be one of \('grade', 'referable', 'dme'\), got 'rdr'"):
        IDRiDGrading(DATA, split="val", size=32, task="rdr", prepare=False)


@pytest.mark.skipif(not PNEUMONIA.is_file(), reason=f"{PNEUMONIA} is absent")
def test_medmnist_upsample_to_enlarges_without_leaving_the_range() -> None:
    stored = MedMNIST(PNEUMONIA, split="val")
    spec = DataSpec(kind="medmnist", params={"path": str(PNEUMONIA), "upsample_to": 64}, val_size=16)
    enlarged = build_dataset(spec, "val")
    for i in range(len(enlarged)):
        small, big = stored[i]["image"], enlarged[i]["image"]
        assert small.shape == (1, 28, 28) and big.shape == (1, 64, 64)
        assert int(enlarged[i]["label"]) == int(stored[i]["label"])
        # bilinear interpolation is a convex combination of stored pixels
        assert big.min() >= small.min() and big.max() <= small.max()
        assert abs(float(big.mean()) - float(small.mean())) < 0.01
        # an area average back to 28 px comes close to the stored image
        back = torch.nn.functional.interpolate(big[None], size=(28, 28), mode="area")[0]
        assert float((back - small).abs().mean()) < 0.03


@pytest.mark.skipif(not PNEUMONIA.is_file(), reason=f"{PNEUMONIA} is absent")
def test_medmnist_upsample_to_below_the_stored_size_is_refused() -> None:
    with pytest.raises(ValueError, match=r"upsample_to=16: expected an image side >= 28"):
        MedMNIST(PNEUMONIA, split="val", upsample_to=16)
    assert MedMNIST(PNEUMONIA, split="val", upsample_to=28)[0]["image"].shape == (1, 28, 28)
