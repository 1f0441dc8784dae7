"""Prototype networks (Chen et al., NeurIPS 2019; IAIA-BL, Barnett et al., 2021): one package.

``config``/``model`` (:mod:`.model`), the prototype layer and push (:mod:`.prototypes`), the
training stages and loss terms (:mod:`.training`, registered with the trainer on import) and the
family's evaluation section (:mod:`.evaluation`, loaded by :mod:`mlmi_zoo.evaluation` only).
"""
from mlmi_zoo.architectures.protopnet import training as training  # registers the training stages
from mlmi_zoo.architectures.protopnet.model import AddOn, ProtoPNet, ProtoPNetConfig, ProtoPNetOutputs, PrototypeExplanation

__all__ = ["ProtoPNetConfig", "ProtoPNet", "PrototypeExplanation", "ProtoPNetOutputs", "AddOn"]
