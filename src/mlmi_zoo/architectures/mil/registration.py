"""The registered names of the MIL families: ``{abmil,additive_mil}_{features,resnet8}``.

Attention MIL (Ilse, Tomczak and Welling, ICML 2018; :class:`~.model.ABMIL`) and additive MIL
(Javed et al., NeurIPS 2022; :class:`~.model.AdditiveMIL`) are each registered twice: on bags of
cached features (``_features``) and on bags of raw RGB tiles that the model encodes with its own
ResNet-8 (``_resnet8``: the encoder is part of the name, and the instance width defaults to the
encoder's own width, so there is no projection).
"""
from __future__ import annotations

from typing import Any

from mlmi_zoo.architectures.blocks.backbones import RESNET_LAYOUTS
from mlmi_zoo.architectures.mil.config import FEATURES, MILConfig
from mlmi_zoo.architectures.mil.model import ABMIL, AdditiveMIL, _MILModel
from mlmi_zoo.base import replace_config
from mlmi_zoo.registry import build_config, register_model

__all__: list[str] = []


def _factory(model_class: type[_MILModel], backbone: str):
    def build(**overrides: Any) -> _MILModel:
        if backbone == FEATURES:
            return model_class(build_config(MILConfig, backbone, overrides))
        if "backbone" in overrides or "instance_encoder" in overrides:
            raise ValueError("the encoder is part of the model name; pick the registered name with that backbone instead")
        # Raw RGB tiles; the instance width defaults to the encoder's own width (no projection).
        base = MILConfig(backbone=backbone, instance_encoder=backbone, in_channels=3,
                         in_features=RESNET_LAYOUTS[backbone][1][-1])
        return model_class(replace_config(base, **overrides))

    what = "cached feature bags" if backbone == FEATURES else f"raw tiles encoded by a {backbone}"
    build.__doc__ = f"{'Additive' if model_class is AdditiveMIL else 'Attention'} MIL on {what}."
    build.__annotations__["return"] = model_class
    return build


for _cls in (ABMIL, AdditiveMIL):
    for _bb in (FEATURES, "resnet8"):
        register_model(f"{_cls.family}_{_bb}")(_factory(_cls, _bb))
