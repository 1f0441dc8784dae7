"""Loading models from bundled folders, local directories and the Hugging Face Hub; publishing.

URIs:
  - ``family_backbone.tag``      a bundled model folder ``model_cards/<name>/``
  - ``hf-hub:ORG/REPO[@REV]``    through ``huggingface_hub.snapshot_download`` (so the local
                                 cache works with ``HF_HUB_OFFLINE=1``)
  - ``local-dir:PATH``           a folder written by ``save_pretrained``
  - ``PATH`` or ``ORG/REPO``     an existing folder; otherwise a Hub repository id, as
                                 huggingface_hub's ``ModelHubMixin.from_pretrained`` reads it

Whatever the source, the weights' sha256 recorded in ``config.json`` (and in the card's front
matter, when there is a card) is checked before the file is deserialised.

:func:`push_to_hub` follows ``ModelHubMixin.push_to_hub``: the model is saved with
``save_pretrained``, given a minimal card that states it has not been evaluated, and uploaded in one
commit; :func:`publish` uploads a released folder (card, results, figures) after ``card --check``.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, overload

from mlmi_zoo._config import ConfigError, apply_overrides
from mlmi_zoo._weights import PICKLE_SUFFIXES, WeightsError, load_weights
from mlmi_zoo.base import CONFIG_FILE, CONFIG_VERSION, WEIGHTS_FILE, InterpretableModel

M = TypeVar("M", bound=InterpretableModel[Any])
from mlmi_zoo.registry import bundled_dir, get_entry, list_models, read_config

if TYPE_CHECKING:  # huggingface_hub is imported where the Hub is used
    from huggingface_hub import CommitInfo, HfApi

log = logging.getLogger(__name__)

__all__ = ["load", "resolve", "publish", "push_to_hub", "card_sha256"]

HUB_PATTERNS = ["config.json", "model.safetensors", "README.md", "results.json", "recipe.yaml", "figures/*"]


def resolve(uri: str, cache_dir: str | os.PathLike[str] | None = None, *, revision: str | None = None,
            force_download: bool = False, token: str | bool | None = None, local_files_only: bool = False) -> Path:
    """Return the local folder that ``uri`` names, downloading a Hub repository into the cache.

    Args:
        uri: see the module docstring. A bare ``ORG/REPO`` is a Hub repository only when no folder
            of that name exists (``ModelHubMixin.from_pretrained`` reads it the same way).
        cache_dir: Hugging Face cache folder (default: the HF default).
        revision: branch, tag or commit of a Hub repository (also ``hf-hub:ORG/REPO@REV``).
        force_download: download the files again even when they are cached.
        token: Hub token (default: the one saved by ``hf auth login``).
        local_files_only: read the cache only (as ``HF_HUB_OFFLINE=1`` does).

    Returns:
        the folder holding ``config.json`` and the weights.

    Raises:
        ValueError: for a malformed URI, a ``revision`` that contradicts ``hf-hub:ORG/REPO@REV``, or
            a ``revision`` for a model that is not on the Hub.
        FileNotFoundError: for an unknown bundled name or ``local-dir:`` folder, or a bare name that
            is neither a folder nor a Hub repository that could be fetched.
        WeightsError: for a pickle checkpoint.
    """
    hub = {"cache_dir": cache_dir, "force_download": force_download, "token": token,
           "local_files_only": local_files_only}
    if uri.startswith("hf-hub:"):
        repo, _, in_uri = uri[len("hf-hub:"):].partition("@")
        if repo.count("/") != 1:
            raise ValueError(f"expected hf-hub:ORG/REPO[@REVISION], got {uri!r}")
        if in_uri and revision is not None and in_uri != revision:
            raise ValueError(f"revision={revision!r} contradicts the revision in uri={uri!r}; give one of them")
        return _snapshot(repo, in_uri or revision, **hub)
    folder = _local_folder(uri)
    if folder is not None:
        if revision is not None:
            raise ValueError(f"revision={revision!r} names a version of a Hub repository, but {uri!r} is a local or "
                             "bundled model; drop revision or name the repository (ORG/REPO or hf-hub:ORG/REPO)")
        return folder
    path = Path(uri).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise WeightsError(f"refusing {path}: pickle checkpoints are never loaded; use a safetensors model folder")
    if _is_repo_id(uri):
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

        try:
            return _snapshot(uri, revision, **hub)
        except (RepositoryNotFoundError, LocalEntryNotFoundError) as err:
            raise FileNotFoundError(f"{uri!r} is no local folder ({path.resolve()} does not exist), and as a Hub "
                                    f"repository it could not be fetched: {err}") from err
    raise ValueError(
        f"cannot resolve {uri!r}: expected a bundled name 'family_backbone.tag', 'ORG/REPO' or "
        "'hf-hub:ORG/REPO[@REV]', 'local-dir:PATH' or an existing directory"
    )


def _local_folder(uri: str) -> Path | None:
    """The folder of a bundled name, a ``local-dir:`` URI or an existing directory; None for anything else.

    Raises:
        FileNotFoundError: for a ``local-dir:`` URI that is no folder, or an unknown bundled name.
    """
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
                "Use ORG/REPO, hf-hub:ORG/REPO or local-dir:PATH for other models"
            )
        return folder
    path = Path(uri).expanduser()
    return path if path.is_dir() else None


def _is_repo_id(name: str) -> bool:
    """Whether ``name`` is a valid ``ORG/REPO`` for the Hub (huggingface_hub's own validation)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _snapshot(repo_id: str, revision: str | None, *, cache_dir: str | os.PathLike[str] | None, force_download: bool,
              token: str | bool | None, local_files_only: bool) -> Path:
    """The cached snapshot of a Hub repository's model files (downloaded when needed and allowed)."""
    from huggingface_hub import snapshot_download

    cache = None if cache_dir is None else os.fspath(cache_dir)  # huggingface_hub takes str or Path
    return Path(snapshot_download(repo_id=repo_id, revision=revision or None, cache_dir=cache,
                                  allow_patterns=HUB_PATTERNS, force_download=force_download, token=token,
                                  local_files_only=local_files_only))


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
         revision: str | None = None, force_download: bool = False, token: str | bool | None = None,
         local_files_only: bool = False, **overrides: Any) -> InterpretableModel[Any]: ...
@overload
def load(uri: str, model_class: type[M], *, strict: bool = True, cache_dir: str | os.PathLike[str] | None = None,
         revision: str | None = None, force_download: bool = False, token: str | bool | None = None,
         local_files_only: bool = False, **overrides: Any) -> M: ...
def load(uri: str, model_class: type[M] | None = None, *, strict: bool = True,
         cache_dir: str | os.PathLike[str] | None = None, revision: str | None = None, force_download: bool = False,
         token: str | bool | None = None, local_files_only: bool = False,
         **overrides: Any) -> InterpretableModel[Any] | M:
    """Load a zoo model (see the module docstring for ``uri``).

    Args:
        uri: where the model lives.
        model_class: the class the caller expects (e.g. ``ProtoPNet``): the return value is then
            typed as that class (with its config and explanation types), and any other class raises
            ``TypeError``.
        strict: refuse missing/unexpected tensors.
        cache_dir: Hugging Face cache folder for Hub repositories (default: the HF default).
        revision: branch, tag or commit of a Hub repository (``ORG/REPO`` or ``hf-hub:ORG/REPO``).
        force_download: download a Hub repository's files again even when they are cached.
        token: Hub token (default: the one saved by ``hf auth login``).
        local_files_only: read a Hub repository from the cache only.
        overrides: config fields to change for fine-tuning (e.g. ``label_names``); tensors whose
            shape changes are re-initialised and listed in ``model.load_report.skipped``.

    Returns:
        the model in eval mode; ``base_weights`` and ``base_model`` restored from config.json.

    Raises:
        WeightsError: when config.json records no valid sha256 or a weights file outside the folder,
            when the weights file is not safetensors, when its sha256 differs from the value in
            config.json or in the card, or when its tensors do not fit the config
            (``MissingWeightsError``, also a ``FileNotFoundError``, when it does not exist).
        ConfigError: when config.json is not a JSON object, lacks a section or a required field, has
            an unknown ``config_version`` or a ``base_model`` that is not a string.
        ValueError, FileNotFoundError: when ``uri`` names no model (see :func:`resolve`).
    """
    folder = resolve(uri, cache_dir=cache_dir, revision=revision, force_download=force_download, token=token,
                     local_files_only=local_files_only)
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
    base_model = doc.get("base_model")  # the zoo parent of a fine-tuned model, kept on re-saving
    if base_model is not None and not isinstance(base_model, str):
        raise ConfigError(f"{where}: 'base_model' must name the parent model (a zoo name or URI); got {base_model!r}")
    model.base_model = base_model
    if doc.get("weights_from_base") is not None:  # a frozen pretrained backbone left out of the file
        state = {**model.restore_base_tensors(doc["weights_from_base"], str(where)), **state}
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


def push_to_hub(model: InterpretableModel[Any], repo_id: str, *, commit_message: str | None = None,
                private: bool | None = None, token: str | None = None, branch: str | None = None,
                create_pr: bool | None = None, allow_patterns: list[str] | str | None = None,
                ignore_patterns: list[str] | str | None = None, tag: str | None = None,
                api: HfApi | None = None) -> CommitInfo:
    """Save ``model`` into a temporary folder and upload it to the Hub in one commit.

    The arguments are those of huggingface_hub's ``ModelHubMixin.push_to_hub``, plus ``tag`` and
    ``api``. The folder holds ``config.json``, ``model.safetensors`` and, since it has no card, a
    minimal ``README.md`` written from config.json alone: it states that the model has not been
    evaluated and carries ``base_model`` in its front matter when the model is fine-tuned from a
    zoo parent. A released folder (a checked card, ``results.json``, figures) is uploaded with
    :func:`publish` instead.

    Args:
        model: the model to upload.
        repo_id: ``ORG/NAME`` (a bare ``NAME`` goes to the token's user, as the Hub decides).
        commit_message: message of the commit (default: ``mlmi-zoo: push <architecture>``).
        private: create the repository private (None: the owner's default).
        token: Hub token for a new ``HfApi`` (default: the one saved by ``hf auth login``).
        branch: branch to commit to (default: ``main``).
        create_pr: open a pull request with the commit instead of committing to ``branch``.
        allow_patterns: upload only the files matching one of these patterns.
        ignore_patterns: skip the files matching one of these patterns.
        tag: a tag (e.g. ``v1.0.0``) to create on the uploaded commit.
        api: an ``HfApi`` to use instead of a new one (it holds its own token).

    Returns:
        huggingface_hub's ``CommitInfo``: a ``str`` holding the commit URL, with ``oid`` the commit id
        (and ``pr_url`` for a pull request).

    Raises:
        ValueError: for ``token`` together with ``api``, or ``tag`` together with ``create_pr``.
    """
    if api is not None and token is not None:
        raise ValueError("token is used to create an HfApi and api is one already; pass token=None, or give "
                         "HfApi(token=...) as api")
    if tag and create_pr:
        raise ValueError(f"tag={tag!r} with create_pr=True: a pull request's commit is not the repository's to tag; "
                         "tag the commit once the pull request is merged")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    repo_id = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model").repo_id
    # ignore_cleanup_errors: a file still open elsewhere (Windows) must not turn a finished upload into an error
    with tempfile.TemporaryDirectory(prefix="mlmi-zoo-push-", ignore_cleanup_errors=True) as tmp:
        folder = model.save_pretrained(Path(tmp) / repo_id.replace("/", "--"))
        if not (folder / "README.md").exists():
            _write_unevaluated_card(folder, repo_id)
        info = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=folder,
                                 commit_message=commit_message or f"mlmi-zoo: push {model.architecture}",
                                 revision=branch, create_pr=create_pr, allow_patterns=allow_patterns,
                                 ignore_patterns=ignore_patterns)
    assert not isinstance(info, Future)  # run_as_future is not set, so the upload has finished
    if tag:
        api.create_tag(repo_id, tag=tag, revision=info.oid, repo_type="model")
    return info


def _write_unevaluated_card(folder: Path, repo_id: str) -> Path:
    """Write a card for a model folder that has no results: model details from config.json, no numbers.

    Args:
        folder: a folder written by ``save_pretrained``.
        repo_id: the repository the folder goes to (for the loading example).

    Returns:
        the card's path (``folder/README.md``).
    """
    from huggingface_hub import ModelCard, ModelCardData

    from mlmi_zoo.families import family_of

    doc = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    entry = get_entry(doc["architecture"])
    config = entry.model_class.config_from_dict(doc["config"], version=doc.get("config_version", CONFIG_VERSION))
    record = family_of(entry.model_class.family)
    parent = doc.get("base_model")
    hub_parent = _hub_base_model(parent) if parent else None
    if parent and hub_parent is None:
        log.warning("the card names no base_model: the parent %s is a local folder, which means nothing on the Hub; "
                    "push the parent first and fine-tune from its ORG/REPO to record it", parent)
    data = ModelCardData(
        library_name="mlmi-zoo",
        tags=["mlmi-zoo", "medical-imaging", entry.model_class.family.replace("_", "-"),
              "interpretable" if record.interpretable else "black-box-baseline", "not-evaluated"],
        pipeline_tag="image-classification" if config.spatial_dims else None,
        base_model=hub_parent,
        mlmi_zoo={"version": doc.get("mlmi_zoo_version"), "architecture": doc["architecture"],
                  "weights_sha256": doc["weights_sha256"]},
    )
    size = " × ".join(str(n) for n in config.img_size)
    rows = [
        ("architecture", f"`{doc['architecture']}` ({record.title})"),
        ("method", record.method),
        ("input", f"{config.in_channels} channel(s), {config.spatial_dims}D, {size}" if config.spatial_dims
         else f"bags of {config.in_channels}-dimensional instance features"),
        ("canonical spacing", " × ".join(f"{v:g}" for v in config.spacing) + " mm" if config.spacing else "none"),
        ("intensity transform", config.intensity.describe()),
        ("modality", config.modality),
        ("classes", ", ".join(config.label_names)),
        ("physical outputs", ", ".join(f"{q.name} [{q.unit}]" for q in config.quantities) or "none"),
        ("weights", f"`{WEIGHTS_FILE}`, sha256 `{doc['weights_sha256']}`"),
        ("mlmi-zoo version", str(doc.get("mlmi_zoo_version"))),
    ]
    if parent:
        rows.append(("fine-tuned from", f"`{parent}`" if hub_parent else "a model in a local folder (not on the Hub)"))
    if doc.get("base_weights"):
        rows.append(("backbone started from", f"`{doc['base_weights'].get('name')}`"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    body = f"""
# {doc['architecture']}

{record.title[:1].upper() + record.title[1:]} from mlmi-zoo, uploaded with `push_to_hub`.

> **Not evaluated.** This model has not been evaluated: this card states what `config.json` records
> and nothing about how well the model classifies or explains. `mlmi-zoo evaluate` measures both and
> `mlmi-zoo card` writes the card from the results.

> **Research use only — not a medical device.** It must not be used for diagnosis, triage or
> treatment decisions.

## Model details

| field | value |
|---|---|
{table}

## Use

```python
import mlmi_zoo

model = mlmi_zoo.load("hf-hub:{repo_id}")   # the weights' sha256 is checked before they are read
```
"""
    path = folder / "README.md"
    ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").save(path)
    return path


def _hub_base_model(parent: str) -> str | None:
    """The parent as the Hub's ``base_model`` names it: ``ORG/REPO`` for a Hub repository, the zoo name for
    a bundled model, None for a local folder (a path on the uploader's disk names nothing on the Hub)."""
    if parent.startswith("hf-hub:"):
        return parent[len("hf-hub:"):].partition("@")[0]
    if parent.startswith("local-dir:") or Path(parent).expanduser().is_dir():
        return None
    return parent if _is_repo_id(parent) or (bundled_dir() / parent).is_dir() else None
