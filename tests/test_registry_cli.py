"""Registry rules and the command line."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import mlmi_zoo
from mlmi_zoo.architectures.baseline.model import BaselineClassifier
from mlmi_zoo.cli import main
from mlmi_zoo.registry import UnknownModelError


def test_duplicate_registration_raises() -> None:
    with pytest.raises(ValueError, match="already registered"):

        @mlmi_zoo.register_model("baseline_resnet8")
        def again(**kw) -> BaselineClassifier:  # pragma: no cover - never called
            raise AssertionError


def test_unknown_name_lists_alternatives() -> None:
    with pytest.raises(UnknownModelError, match="baseline_resnet8"):
        mlmi_zoo.create_model("baseline_resnet9")


def test_override_type_and_key_are_checked() -> None:
    from mlmi_zoo._config import OverrideError

    with pytest.raises(OverrideError, match="feature_strid"):
        mlmi_zoo.create_model("baseline_resnet8", feature_strid=8)
    with pytest.raises(OverrideError, match="feature_stride"):
        mlmi_zoo.create_model("baseline_resnet8", feature_stride="eight")


def test_list_filters() -> None:
    assert mlmi_zoo.list_models("baseline_*") == ["baseline_resnet18", "baseline_resnet8", "baseline_tf_efficientnet_lite0"]
    assert all("." in n for n in mlmi_zoo.list_models(pretrained=True))


def test_cli_list_and_info(capsys) -> None:
    assert main(["list", "baseline_*"]) == 0
    assert capsys.readouterr().out.split() == ["baseline_resnet18", "baseline_resnet8", "baseline_tf_efficientnet_lite0"]
    assert main(["info", "baseline_resnet8"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["input_spec"]["in_channels"] == 1 and info["num_parameters"] > 0


def test_cli_bad_arguments_exit_2_with_one_line() -> None:
    for argv in (["info", "nope_model"], ["frobnicate"], ["list", "--bogus"]):
        proc = subprocess.run([sys.executable, "-m", "mlmi_zoo.cli", *argv], capture_output=True, text=True)
        assert proc.returncode == 2, argv
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_every_command_has_help() -> None:
    proc = subprocess.run([sys.executable, "-m", "mlmi_zoo.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for command in ("list", "info", "demo", "train", "finetune", "evaluate", "card", "publish", "phantom"):
        assert command in proc.stdout
