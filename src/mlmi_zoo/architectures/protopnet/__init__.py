"""Prototype networks (Chen et al., NeurIPS 2019; IAIA-BL, Barnett et al., 2021): one package.

``config``/``model`` (:mod:`.model`), the prototype layer and push (:mod:`.prototypes`), the
training stages and loss terms (:mod:`.training`, registered with the trainer on import) and the
family's evaluation section (:mod:`.evaluation`, loaded by :mod:`mlmi_zoo.evaluation` only).
"""
import torch

from mlmi_zoo.architectures.protopnet import (
    training as training,  # registers the training stages
)
from mlmi_zoo.architectures.protopnet.config import (
    CountHeadConfig,
    ProtoPNetConfig,
    ProtoPNetTrainingSettings,
)
from mlmi_zoo.architectures.protopnet.model import (
    AddOn,
    ProtoPNet,
    ProtoPNetOutputs,
    PrototypeExplanation,
)
from mlmi_zoo.families import Family, register_family


def _prototype_maps(exp: PrototypeExplanation) -> torch.Tensor:
    """(B, P, *spatial): each prototype's similarity map, on the input's pixels."""
    return exp.localization


FAMILY = register_family(Family(
    name="protopnet", model_class=ProtoPNet, training=training.ProtoPNetTraining(), inputs="images",
    evaluation="mlmi_zoo.architectures.protopnet.evaluation:_protopnet",
    annotated_recognizability="mlmi_zoo.architectures.protopnet.evaluation:annotated_purity",
    title="prototype network",
    method="ProtoPNet (Chen et al., NeurIPS 2019) with the IAIA-BL fine-annotation loss (Barnett et al., 2021)",
    bibtex=("""@inproceedings{chen2019looks,
  title     = {This Looks Like That: Deep Learning for Interpretable Image Recognition},
  author    = {Chen, Chaofan and Li, Oscar and Tao, Daniel and Barnett, Alina and Rudin, Cynthia and Su, Jonathan K.},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2019}
}""", """@article{barnett2021iaiabl,
  title   = {A case-based interpretable deep learning model for classification of mass lesions in digital mammography},
  author  = {Barnett, Alina Jade and Schwartz, Fides Regina and Tao, Chaofan and Chen, Chaofan and Ren, Yinhao and Lo, Joseph Y. and Rudin, Cynthia},
  journal = {Nature Machine Intelligence},
  volume  = {3},
  pages   = {1061--1070},
  year    = {2021}
}"""),
    evidence_maps=_prototype_maps,
))

__all__ = ["ProtoPNetConfig", "CountHeadConfig", "ProtoPNetTrainingSettings", "ProtoPNet", "PrototypeExplanation", "ProtoPNetOutputs", "AddOn"]
