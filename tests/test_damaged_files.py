"""Damaged image files in a user's data: fine-tuning refuses them before its first epoch, naming every row
and column that holds one, and a data set that meets one while reading says which row it is."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlmi_zoo.training.datasets.folder_csv import FolderCSVDataset
from mlmi_zoo.training.finetune import FinetuneDataError, plan_finetune

XRAY = "protopnet_resnet8.pneumoniamnist"


def write_xrays(root: Path, per_class: int = 6) -> Path:
    """``root/<class>/*.png``, 28x28 8-bit greyscale class folders."""
    rng = np.random.default_rng(0)
    for name in ("normal", "pneumonia"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (28, 28)).astype(np.uint8)).save(root / name / f"{name}{i}.png")
    return root


def damage(root: Path) -> tuple[Path, Path]:
    """One file that is no image at all and one PNG cut short; returns both."""
    text = root / "normal" / "normal1.png"
    text.write_bytes(b"not an image")
    cut = root / "pneumonia" / "pneumonia4.png"
    cut.write_bytes(cut.read_bytes()[:60])
    return text, cut


def test_damaged_files_are_refused_before_training_naming_each_row(tmp_path):
    data = write_xrays(tmp_path / "xrays")
    text, cut = damage(data)
    with pytest.raises(FinetuneDataError) as err:
        plan_finetune(XRAY, data, out_dir=tmp_path / "run")
    message = str(err.value)
    assert "2 file(s) cannot be read" in message and str(text) in message and str(cut) in message
    for path in (text, cut):  # the row of the folder's listing, the column and the file
        assert re.search(rf"row \d+ of image_folder.csv, column 'image': {re.escape(str(path))} cannot be read", message)
    assert not (tmp_path / "run").exists()  # a refused run leaves no folder behind

    # the CLI says it in one message, without a traceback
    result = subprocess.run([sys.executable, "-m", "mlmi_zoo.cli", "finetune", XRAY, "--data", str(data), "--out",
                             str(tmp_path / "cli_run")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "cannot be read" in result.stderr and "Traceback" not in result.stderr


def test_a_damaged_file_met_while_reading_names_its_row_and_column(tmp_path):
    data = write_xrays(tmp_path / "xrays", per_class=2)
    (data / "cases.csv").write_text("image,label\nnormal/normal0.png,normal\nnormal/normal1.png,normal\n"
                                    "pneumonia/pneumonia0.png,pneumonia\n")
    dataset = FolderCSVDataset(data / "cases.csv")
    assert dataset.unreadable() == []
    damage_target = data / "normal" / "normal1.png"
    damage_target.write_bytes(b"not an image")
    assert len(dataset.unreadable()) == 1 and "row 3 of cases.csv, column 'image'" in dataset.unreadable()[0]
    assert tuple(dataset[0]["image"].shape) == (1, 28, 28)  # the others still read
    with pytest.raises(ValueError, match=r"cases.csv row 3: column 'image': .*normal1.png cannot be read"):
        dataset[1]
