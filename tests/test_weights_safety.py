"""Weights are safetensors only; checksums are checked before deserialising; writes are atomic."""
from __future__ import annotations

import pickle

import pytest
import torch

import mlmi_zoo
from mlmi_zoo import WeightsError
from mlmi_zoo._weights import atomic_write, check_weights_file, load_weights, save_weights, sha256_file


@pytest.fixture
def saved(tmp_path):
    model = mlmi_zoo.create_model("baseline_resnet8", img_size=(16, 16))
    return model, model.save_pretrained(tmp_path / "model")


def test_flipped_byte_is_refused_before_deserialising(saved, monkeypatch) -> None:
    _, folder = saved
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))

    def must_not_run(*a, **k):
        raise AssertionError("deserialised a file whose checksum did not match")

    monkeypatch.setattr("safetensors.torch.load_file", must_not_run)
    with pytest.raises(WeightsError, match=r"model\.safetensors.*sha256"):
        mlmi_zoo.load(f"local-dir:{folder}")


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt"])
def test_pickle_checkpoints_are_refused(tmp_path, suffix: str) -> None:
    path = tmp_path / f"weights{suffix}"
    with open(path, "wb") as f:
        pickle.dump({"w": [1.0]}, f)
    with pytest.raises(WeightsError, match="pickle"):
        check_weights_file(path, expected_sha256=None)
    with pytest.raises(WeightsError, match="pickle"):
        mlmi_zoo.load(str(path))


def test_pickle_renamed_to_safetensors_is_refused(tmp_path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"w": torch.zeros(3)}))
    with pytest.raises(WeightsError, match="not a safetensors|too short|header"):
        load_weights(path, expected_sha256=None)


def test_truncated_file_is_refused(tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    save_weights({"w": torch.arange(1000.0)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(WeightsError, match="truncated"):
        load_weights(path, expected_sha256=None)
    with pytest.raises(WeightsError, match="sha256"):
        load_weights(path, expected_sha256="0" * 64)


def test_config_sha_is_the_file_sha(saved) -> None:
    import json

    _, folder = saved
    doc = json.loads((folder / "config.json").read_text())
    assert doc["weights_sha256"] == sha256_file(folder / "model.safetensors")


def test_crash_mid_save_keeps_previous_file(tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    save_weights({"w": torch.ones(4)}, path)
    before = path.read_bytes()

    def crash(tmp):
        tmp.write_bytes(b"partial")
        raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        atomic_write(path, crash)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    assert torch.equal(load_weights(path, None)["w"], torch.ones(4))


def test_head_resize_is_reported(saved) -> None:
    model, folder = saved
    loaded = mlmi_zoo.load(f"local-dir:{folder}", label_names=("a", "b", "c"))
    assert loaded.num_classes == 3
    assert set(loaded.load_report.skipped) == {"classifier.weight", "classifier.bias"}
    torch.testing.assert_close(loaded.backbone.body[0].weight, model.backbone.body[0].weight)


def test_resized_head_without_overrides_is_refused(saved, tmp_path) -> None:
    _, folder = saved
    other = mlmi_zoo.create_model("baseline_resnet8", img_size=(16, 16), label_names=("a", "b", "c"))
    state = {k: v for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="do not fit"):
        mlmi_zoo.create_model("baseline_resnet8", img_size=(16, 16)).load_weights_from(state)
