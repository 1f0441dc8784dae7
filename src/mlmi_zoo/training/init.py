"""A run's starting weights: ``model.init`` (random or pretrained backbone) and the provenance a model carries.

The families build their backbones with random initialisation (``create_backbone(...)`` in their
``__init__``); :func:`apply_init` starts them from pretrained weights after the model is built.
For every :class:`~mlmi_zoo.architectures.blocks.backbones.Backbone` in the model it builds
``create_backbone(config.backbone, config.in_channels, ..., init=init)`` cut at the same stride,
copies its tensors (names and shapes checked, nothing skipped), and rebuilds the model with the
weights' normalisation appended to the config's intensity transform (the config is frozen, and
``input_spec`` is derived from it). The model records the weights as ``base_weights``
(:meth:`WeightsProvenance.to_dict`), which ``save_pretrained`` writes to ``config.json``.

Only the backbone changes: the rest of the model keeps the random initialisation of the run's
seed, and building the pretrained copy draws from a forked RNG, so the run's random stream (data
order, dropout, data-dependent starts) is the one a ``random`` run of the same seed sees.
"""
from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import torch

from mlmi_zoo.architectures.blocks.backbones import Backbone, create_backbone
from mlmi_zoo.architectures.blocks.pretrained import WeightsProvenance, resolve_init
from mlmi_zoo.base import InterpretableModel, replace_config

__all__ = ["apply_init"]

M = TypeVar("M", bound=InterpretableModel[Any])


def apply_init(model: M, init: str, load_weights: bool = True) -> M:
    """The model with its backbone(s) started from ``init``, its intensity transform normalised as they expect.

    Args:
        model: a freshly built model (random initialisation).
        init: ``"random"`` (returns ``model`` itself, untouched) or a pretrained form of
            :func:`~mlmi_zoo.architectures.blocks.pretrained.resolve_init`.
        load_weights: copy the pretrained tensors; ``False`` only sets the config and provenance
            (a resumed run, whose checkpoint holds the weights).

    Returns:
        a new model of the same class (the rebuilt config) with ``base_weights`` set.

    Raises:
        ValueError: a model without a timm backbone, an ``init`` the backbone cannot take, a
            pretrained network that does not match the model's backbone, or a config whose
            intensity already states another normalisation.
        MissingExtraError: ``imagenet`` for an EfficientNet-Lite without the ``pretrained`` extra.
        WeightsError: a weights file with a wrong checksum, format or tensor names.
    """
    if init == "random":
        return model
    config = model.config
    backbones = [(name, module) for name, module in model.named_modules() if isinstance(module, Backbone)]
    if not backbones:
        raise ValueError(f"model.init={init!r}: {model.architecture} has no image backbone to initialise "
                         "(feature-bag models take precomputed features); use model.init=random")
    spatial_dims = 3 if config.spatial_dims == 3 else 2  # 0: bags of raw tiles, through a 2D encoder
    provenance: WeightsProvenance | None = None
    with torch.random.fork_rng(devices=[]):  # timm initialises the copy randomly before loading into it
        for where, module in backbones:
            if load_weights:
                pretrained = create_backbone(config.backbone, config.in_channels, spatial_dims, module.cut_stride, init=init,
                                             tile=module.tile)
                _copy_backbone(pretrained, module, where, init)
                provenance = pretrained.provenance
            else:
                provenance = resolve_init(init, config.backbone, config.in_channels).loaded_provenance()
        assert provenance is not None  # a pretrained init always has one
        intensity = _normalised(config.intensity, provenance, init)
        rebuilt = type(model)(replace_config(config, intensity=intensity))
    rebuilt.load_state_dict(model.state_dict())  # strict: the config change touches no tensor
    rebuilt.import_metadata(model.export_metadata())
    rebuilt.train(model.training)
    for _, module in rebuilt.named_modules():
        if isinstance(module, Backbone):
            module.provenance = provenance
    rebuilt.base_weights = provenance.to_dict()
    return rebuilt


def _copy_backbone(pretrained: Backbone, own: Backbone, where: str, init: str) -> None:
    """Copy every tensor of ``pretrained`` into ``own``; refuse any name or shape that does not match."""
    source, target = pretrained.state_dict(), own.state_dict()
    missing = [k for k in target if k not in source]
    unexpected = [k for k in source if k not in target]
    shapes = [f"{k}: {tuple(source[k].shape)} vs {tuple(target[k].shape)}" for k in target
              if k in source and source[k].shape != target[k].shape]
    if missing or unexpected or shapes or (pretrained.out_channels, pretrained.stride) != (own.out_channels, own.stride):
        raise ValueError(
            f"model.init={init!r}: the pretrained backbone does not match the model's {where!r} "
            f"(out_channels/stride {pretrained.out_channels}/{pretrained.stride} vs {own.out_channels}/{own.stride}; "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}, shapes {shapes[:3]}); the family builds this "
            "backbone otherwise than create_backbone(config.backbone, config.in_channels, ...): initialise it "
            "randomly (model.init=random)"
        )
    own.load_state_dict(source, strict=True)


def _normalised(intensity: Any, provenance: WeightsProvenance, init: str) -> Any:
    """The config's intensity transform followed by the weights' normalisation."""
    stated = (intensity.mean, intensity.std)
    if stated != (None, None) and stated != (provenance.mean, provenance.std):
        raise ValueError(
            f"model.config.intensity states mean {intensity.mean} / std {intensity.std}, but the weights of "
            f"model.init={init!r} expect mean {provenance.mean} / std {provenance.std}; leave intensity.mean/std unset"
        )
    return dataclasses.replace(intensity, mean=provenance.mean, std=provenance.std)
