"""Loading models from bundled folders, local directories and the Hugging Face Hub; publishing.

URIs:
  - ``family_backbone.tag``      a bundled model folder ``model_cards/<name>/``
  - ``hf-hub:ORG/REPO[@REV]``    through ``huggingface_hub.snapshot_download`` (so the local
                                 cache works with ``HF_HUB_OFFLINE=1``)
  - ``local-dir:PATH``           a folder written by ``save_pretrained``

Whatever the source, the weights' sha256 recorded in ``config.json`` (and in the card's front
matter, when there is a card) is checked before the file is deserialised.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, TypeVar, overload

from mlmi_zoo._config import ConfigError, apply_overrides
from mlmi_zoo._weights import PICKLE_SUFFIXES, WeightsError, load_weights
from mlmi_zoo.base import CONFIG_FILE, CONFIG_VERSION, WEIGHTS_FILE, InterpretableModel

M = TypeVar("M", bound=InterpretableModel[Any])
from mlmi_zoo.registry import bundled_dir, get_entry, list_models, read_config

log = logging.getLogger(__name__)

__all__ = ["load", "resolve", "publish", "card_sha256"]

HUB_PATTERNS = ["config.json", "model.safetensors", "README.md", "results.json", "recipe.yaml", "figures/*"]


def resolve(uri: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the local folder that ``uri`` names (downloading nothing when offline)."""
    if uri.startswith("hf-hub:"):
        from huggingface_hub import snapshot_download

        repo, _, revision = uri[len("hf-hub:"):].partition("@")
        if repo.count("/") != 1:
            raise ValueError(f"expected hf-hub:ORG/REPO[@REVISION], got {uri!r}")
        cache = None if cache_dir is None else os.fspath(cache_dir)  # huggingface_hub takes str or Path
        return Path(snapshot_download(repo_id=repo, revision=revision or None, cache_dir=cache, allow_patterns=HUB_PATTERNS))
    if uri.startswith("local-dir:"):
        path = Path(uri[len("local-dir:"):]).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{uri}: {path} is not a directory")
        return path
    if "." in uri and "/" not in uri and os.sep not in uri:
        folder = bundled_dir() / uri
        if not folder.is_dir():
            raise FileNotFoundError(
                f"no bundled weights named {uri!r}; available: {list_models(pretrained=True)}. "
                "Use hf-hub:ORG/REPO or local-dir:PATH for other models"
            )
        return folder
    path = Path(uri).expanduser()
    if path.is_dir():
        return path
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise WeightsError(f"refusing {path}: pickle checkpoints are never loaded; use a safetensors model folder")
    raise ValueError(
        f"cannot resolve {uri!r}: expected a bundled name 'family_backbone.tag', 'hf-hub:ORG/REPO[@REV]', "
        "'local-dir:PATH' or an existing directory"
    )


def card_sha256(folder: Path) -> str | None:
    """The weights sha256 stated in the card's front matter (``mlmi_zoo.weights_sha256``), if any."""
    card = folder / "README.md"
    if not card.is_file():
        return None
    from huggingface_hub import ModelCard

    # A Path to an existing file: ModelCard.load reads it and never asks the Hub. A model-index the Hub
    # cannot parse is logged and skipped: it has no bearing on the weights, which `card --check` vets.
    block = ModelCard.load(card, ignore_metadata_errors=True).data.get("mlmi_zoo", {})
    return block.get("weights_sha256")


@overload
def load(uri: str, model_class: None = None, *, strict: bool = True, cache_dir: str | os.PathLike[str] | None = None,
         **overrides: Any) -> InterpretableModel[Any]: ...
@overload
def load(uri: str, model_class: type[M], *, strict: bool = True, cache_dir: str | os.PathLike[str] | None = None,
         **overrides: Any) -> M: ...
def load(uri: str, model_class: type[M] | None = None, *, strict: bool = True,
         cache_dir: str | os.PathLike[str] | None = None, **overrides: Any) -> InterpretableModel[Any] | M:
    """Load a zoo model (see the module docstring for ``uri``).

    Args:
        uri: where the model lives.
        model_class: the class the caller expects (e.g. ``ProtoPNet``): the return value is then
            typed as that class (with its config and explanation types), and any other class raises
            ``TypeError``.
        strict: refuse missing/unexpected tensors.
        cache_dir: Hugging Face cache folder for ``hf-hub:`` URIs (default: the HF default).
        overrides: config fields to change for fine-tuning (e.g. ``label_names``); tensors whose
            shape changes are re-initialised and listed in ``model.load_report.skipped``.

    Raises:
        WeightsError: when config.json records no valid sha256 or a weights file outside the folder,
            when the weights file is not safetensors, when its sha256 differs from the value in
            config.json or in the card, or when its tensors do not fit the config
            (``MissingWeightsError``, also a ``FileNotFoundError``, when it does not exist).
        ConfigError: when config.json is not a JSON object, lacks a section or a required field, or
            has an unknown ``config_version``.
    """
    folder = resolve(uri, cache_dir=cache_dir)
    doc = read_config(folder)
    where = folder / CONFIG_FILE
    weights, expected = _verified_weights(doc, folder)
    stated = card_sha256(folder)
    if stated is not None and stated != expected:
        raise WeightsError(f"refusing {weights}: the card states sha256 {stated} but config.json records {expected}")
    state = load_weights(weights, expected_sha256=expected)  # checks the sha before deserialising

    for key in ("architecture", "config"):
        if key not in doc:
            raise ConfigError(f"{where} lacks {key!r}; was it written by save_pretrained?")
    entry = get_entry(doc["architecture"])
    config = entry.model_class.config_from_dict(doc["config"], version=_config_version(doc, where), where=str(where))
    if overrides:
        config = apply_overrides(config, overrides)
    model = entry.model_class(config)
    model.import_metadata(doc.get("metadata") or {})
    model.base_weights = doc.get("base_weights")  # provenance of the backbone's start, kept on re-saving
    model.load_weights_from(state, strict=strict, allow_resized=bool(overrides))
    model.eval()
    if model_class is not None and not isinstance(model, model_class):
        raise TypeError(f"{uri} holds a {type(model).__name__}, not a {model_class.__name__}")
    return model


def _verified_weights(doc: dict[str, Any], folder: Path) -> tuple[Path, str]:
    """The weights file a config.json names and the sha256 it records, both checked.

    No field switches the checksum off: a missing, null or malformed ``weights_sha256`` is refused,
    as is a ``weights_file`` that would leave the model folder.
    """
    where = folder / CONFIG_FILE
    name = doc.get("weights_file", WEIGHTS_FILE)
    # a file name, not a path: the checksum vouches for this folder's file, not for one elsewhere
    # (its format, safetensors only, is checked by load_weights)
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise WeightsError(f"{where}: 'weights_file' must name a .safetensors file in the model folder, "
                           f"got {name!r}")
    if "weights_sha256" not in doc:
        raise WeightsError(f"{where} lacks 'weights_sha256': weights are never loaded unverified; "
                           "save the model with save_pretrained, which records it")
    sha = doc["weights_sha256"]
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdefABCDEF" for c in sha)):
        raise WeightsError(f"{where}: 'weights_sha256' must be the sha256 of {name} (64 hex digits); got {sha!r}")
    return folder / name, sha.lower()


def _config_version(doc: dict[str, Any], where: Path) -> int:
    """``config_version`` of a config.json: 1 when absent (files written before it was recorded)."""
    version = doc.get("config_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ConfigError(f"{where}: config_version {version!r}; expected an integer from 1 to {CONFIG_VERSION}")
    return version


def publish(model_dir: str | os.PathLike, repo_id: str, tag: str | None = None, private: bool = False,
            check: bool = True, api: Any = None) -> str:
    """Upload a model folder to the Hub: ``card --check`` first, then create, upload, tag.

    Args:
        model_dir: a folder written by ``save_pretrained`` with a generated card.
        repo_id: ``ORG/NAME``.
        tag: version tag such as ``v1.0.0`` (created on the uploaded commit).
        private: create a private repository.
        check: run the card check before uploading (refuse to publish an inconsistent card).
        api: an ``HfApi``-like object (tests pass a local fake).

    Returns:
        the commit id of the upload.
    """
    model_dir = Path(model_dir)
    if check:
        from mlmi_zoo.model_cards import check_card

        problems = check_card(model_dir)
        if problems:
            raise ValueError(f"refusing to publish {model_dir}: card check failed:\n- " + "\n- ".join(problems))
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(folder_path=str(model_dir), repo_id=repo_id, repo_type="model",
                             commit_message=f"mlmi-zoo: publish {model_dir.name}" + (f" {tag}" if tag else ""))
    commit = getattr(info, "oid", None) or str(info)
    if tag:
        api.create_tag(repo_id=repo_id, tag=tag, revision=commit, repo_type="model")
    return commit
