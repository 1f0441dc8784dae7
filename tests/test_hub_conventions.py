"""huggingface_hub's conventions: ``model.push_to_hub(repo_id)`` and ``Model.from_pretrained("ORG/REPO", revision=...)``.

No network: uploads go to a local fake of ``HfApi`` that writes the Hugging Face cache layout, and
downloads read that cache with ``HF_HUB_OFFLINE=1`` (set in conftest).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import CommitInfo, ModelCard

import mlmi_zoo
from mlmi_zoo.base import InterpretableModel


def _cache_layout(cache: Path, repo_id: str, folder: Path, ref: str) -> str:
    """Place ``folder`` in a Hugging Face cache as the snapshot that ``ref`` points to (the Hub client's layout)."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo_id}@{ref}".encode()).hexdigest()
    shutil.copytree(folder, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / ref).write_text(commit)
    return commit


class FakeHfApi:
    """The HfApi calls ``push_to_hub`` makes, with their keyword signatures, writing into a local cache."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.calls: list[tuple[str, dict]] = []
        self.files: dict[str, dict[str, bytes]] = {}  # commit -> uploaded file name -> content

    def create_repo(self, repo_id: str, *, token=None, private=None, repo_type=None, exist_ok=False, **_):
        self.calls.append(("create_repo", {"repo_id": repo_id, "private": private, "exist_ok": exist_ok}))
        from huggingface_hub import RepoUrl

        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id: str, folder_path, commit_message=None, repo_type=None, revision=None,
                      create_pr=None, allow_patterns=None, ignore_patterns=None, **_):
        from huggingface_hub.utils import filter_repo_objects

        folder = Path(folder_path)
        names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        kept = list(filter_repo_objects(names, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        self.calls.append(("upload_folder", {"repo_id": repo_id, "revision": revision, "create_pr": create_pr,
                                             "commit_message": commit_message}))
        commit = _cache_layout(self.cache, repo_id, folder, revision or "main")
        self.files[commit] = {name: (folder / name).read_bytes() for name in kept}
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{commit}", commit_message=commit_message,
                          commit_description="", oid=commit)

    def create_tag(self, repo_id: str, *, tag: str, revision=None, repo_type=None, **_):
        self.calls.append(("create_tag", {"repo_id": repo_id, "tag": tag, "revision": revision}))
        (self.cache / f"models--{repo_id.replace('/', '--')}" / "refs" / tag).write_text(revision)


@pytest.fixture
def model() -> InterpretableModel:
    return mlmi_zoo.create_model("baseline_resnet8", img_size=(16, 16)).eval()


def _front_matter(text: str) -> dict:
    return ModelCard(text).data.to_dict()


def test_push_to_hub_uploads_weights_config_and_card_with_base_model(model, tmp_path) -> None:
    # A fine-tuned model as the trainer writes it (config.json names its parent), loaded back.
    folder = model.save_pretrained(tmp_path / "finetuned", extra={"base_model": "hf-hub:org/parent@v1"})
    finetuned = mlmi_zoo.load(str(folder))
    assert finetuned.base_model == "hf-hub:org/parent@v1"

    api = FakeHfApi(tmp_path / "hf-cache")
    info = finetuned.push_to_hub("org/child", tag="v1.0.0", api=api)

    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder", "create_tag"]
    assert isinstance(info, str) and info == f"https://huggingface.co/org/child/commit/{info.oid}"
    assert api.calls[2][1] == {"repo_id": "org/child", "tag": "v1.0.0", "revision": info.oid}
    files = api.files[info.oid]
    assert sorted(files) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads(files["config.json"])
    assert config["base_model"] == "hf-hub:org/parent@v1"
    assert config["weights_sha256"] == hashlib.sha256(files["model.safetensors"]).hexdigest()

    card = files["README.md"].decode()
    meta = _front_matter(card)
    assert meta["base_model"] == "org/parent"
    assert meta["library_name"] == "mlmi-zoo"
    assert meta["mlmi_zoo"]["weights_sha256"] == config["weights_sha256"]
    assert "has not been evaluated" in card
    assert "results.json" not in card and "AUROC" not in card and "model-index" not in meta

    # What was pushed loads back, by its tag, from the (offline) cache, with the same logits.
    loaded = type(model).from_pretrained("org/child", revision="v1.0.0", cache_dir=tmp_path / "hf-cache")
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(loaded(x), model(x))
    assert loaded.base_model == "hf-hub:org/parent@v1"


def test_push_to_hub_without_parent_has_no_base_model_and_passes_options(model, tmp_path) -> None:
    api = FakeHfApi(tmp_path / "hf-cache")
    info = model.push_to_hub("org/scratch", api=api, branch="dev", commit_message="first",
                             ignore_patterns=["README.md"], private=True)
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]  # no tag asked for
    assert api.calls[0][1]["private"] is True
    assert api.calls[1][1] == {"repo_id": "org/scratch", "revision": "dev", "create_pr": None,
                               "commit_message": "first"}
    assert sorted(api.files[info.oid]) == ["config.json", "model.safetensors"]
    card = (tmp_path / "hf-cache" / "models--org--scratch" / "snapshots" / info.oid / "README.md").read_text()
    assert "base_model" not in _front_matter(card)
    assert "fine-tuned from" not in card


def test_push_to_hub_refuses_contradictory_arguments(model, tmp_path) -> None:
    api = FakeHfApi(tmp_path / "hf-cache")
    with pytest.raises(ValueError, match="token"):
        model.push_to_hub("org/name", api=api, token="hf_x")
    with pytest.raises(ValueError, match="create_pr"):
        model.push_to_hub("org/name", api=api, tag="v1", create_pr=True)
    assert api.calls == []


def test_from_pretrained_bare_repo_id_reads_the_revision_from_the_cache(model, tmp_path) -> None:
    cache = tmp_path / "hf-cache"
    _cache_layout(cache, "org/name", model.save_pretrained(tmp_path / "v1"), "v1")
    other = mlmi_zoo.create_model("baseline_resnet8", img_size=(16, 16)).eval()  # different random weights
    _cache_layout(cache, "org/name", other.save_pretrained(tmp_path / "main"), "main")

    x = torch.rand(2, 1, 16, 16)
    at_v1 = type(model).from_pretrained("org/name", revision="v1", cache_dir=cache, local_files_only=True)
    assert torch.equal(at_v1(x), model(x))
    at_main = InterpretableModel.from_pretrained("org/name", cache_dir=cache)
    assert torch.equal(at_main(x), other(x)) and not torch.equal(at_main(x), model(x))
    # the hf-hub: form reads the same snapshot
    assert torch.equal(mlmi_zoo.load("hf-hub:org/name@v1", cache_dir=cache)(x), model(x))


def test_from_pretrained_refuses_a_tampered_cached_file(model, tmp_path) -> None:
    cache = tmp_path / "hf-cache"
    commit = _cache_layout(cache, "org/name", model.save_pretrained(tmp_path / "model"), "v1")
    weights = cache / "models--org--name" / "snapshots" / commit / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor's data: the file still parses, only the checksum differs
    weights.write_bytes(bytes(data))
    with pytest.raises(mlmi_zoo.WeightsError, match="sha256"):
        type(model).from_pretrained("org/name", revision="v1", cache_dir=cache)


def test_bare_name_that_is_a_local_folder_loads_the_folder(model, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    model.save_pretrained(tmp_path / "org" / "name")  # "org/name" is both a relative folder and a repo id
    loaded = type(model).from_pretrained("org/name", cache_dir=tmp_path / "empty-cache")
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match="revision"):
        type(model).from_pretrained("org/name", revision="v1")


def test_bare_name_neither_folder_nor_cached_repo_is_explained(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no local folder"):
        InterpretableModel.from_pretrained("org/missing", cache_dir=tmp_path / "empty-cache")
    with pytest.raises(ValueError, match="contradicts"):
        mlmi_zoo.load("hf-hub:org/name@v1", revision="v2", cache_dir=tmp_path / "empty-cache")
