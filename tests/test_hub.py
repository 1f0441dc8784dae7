"""Hub I/O without the network: an offline cache, and uploads against a local fake of HfApi."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import mlmi_zoo


def _cache_layout(cache: Path, repo_id: str, folder: Path, tag: str) -> str:
    """Place ``folder`` in a Hugging Face cache as the snapshot of ``tag`` (the layout the Hub client writes)."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo_id}@{tag}".encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / tag).write_text(commit)
    return commit


class FakeHfApi:
    """The three HfApi calls `publish` makes, writing into a local cache layout instead of the Hub."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.calls: list[str] = []
        self.uploaded: dict[str, Path] = {}

    def create_repo(self, repo_id: str, private: bool = False, exist_ok: bool = False, repo_type: str = "model"):
        self.calls.append("create_repo")
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, folder_path: str, repo_id: str, repo_type: str = "model", commit_message: str = ""):
        self.calls.append("upload_folder")
        commit = _cache_layout(self.cache, repo_id, Path(folder_path), "main")
        self.uploaded[commit] = Path(folder_path)
        return SimpleNamespace(oid=commit)

    def create_tag(self, repo_id: str, tag: str, revision: str, repo_type: str = "model"):
        self.calls.append("create_tag")
        refs = self.cache / f"models--{repo_id.replace('/', '--')}" / "refs"
        (refs / tag).write_text(revision)


@pytest.fixture
def model_dir(tmp_path):
    model = mlmi_zoo.create_model("baseline_resnet8", img_size=(16, 16)).eval()
    return model, model.save_pretrained(tmp_path / "model")


def test_load_from_offline_cache_gives_identical_logits(model_dir, tmp_path) -> None:
    model, folder = model_dir
    cache = tmp_path / "hf-cache"
    _cache_layout(cache, "org/name", folder, "v1")
    loaded = mlmi_zoo.load("hf-hub:org/name@v1", cache_dir=cache)
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(loaded(x), model(x))


def test_offline_cache_with_tampered_weights_is_refused(model_dir, tmp_path) -> None:
    _, folder = model_dir
    cache = tmp_path / "hf-cache"
    _cache_layout(cache, "org/name", folder, "v1")
    snap = next((cache / "models--org--name" / "snapshots").iterdir())
    weights = snap / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0x10
    weights.write_bytes(bytes(data))
    with pytest.raises(mlmi_zoo.WeightsError):
        mlmi_zoo.load("hf-hub:org/name@v1", cache_dir=cache)


def test_publish_against_fake_then_load_tag_offline(model_dir, tmp_path) -> None:
    model, folder = model_dir
    cache = tmp_path / "hf-cache"
    api = FakeHfApi(cache)
    commit = mlmi_zoo.publish(folder, "org/name", tag="v1.0.0", api=api, check=False)
    assert api.calls == ["create_repo", "upload_folder", "create_tag"]
    assert commit in api.uploaded
    loaded = mlmi_zoo.load("hf-hub:org/name@v1.0.0", cache_dir=cache)
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(loaded(x), model(x))


def test_unknown_uri_forms_are_explained() -> None:
    with pytest.raises(ValueError, match="hf-hub:ORG/REPO"):
        mlmi_zoo.load("hf-hub:no-slash")
    with pytest.raises(FileNotFoundError, match="no bundled weights"):
        mlmi_zoo.load("baseline_resnet8.does_not_exist")
    with pytest.raises(FileNotFoundError):
        mlmi_zoo.load("local-dir:/nonexistent/folder")
