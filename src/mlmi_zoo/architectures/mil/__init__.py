"""Attention MIL (Ilse et al., ICML 2018) and additive MIL (Javed et al., NeurIPS 2022): one package.

The models (:mod:`.model`) and their registered names (:mod:`.registration`), attention pooling and
the bag-level area head (:mod:`.heads`), the explanations (:mod:`.explanations`), the training
stages and loss terms (:mod:`.training`, registered with the trainer on import) and the families'
evaluation section (:mod:`.evaluation`, loaded by :mod:`mlmi_zoo.evaluation` only).
"""
from mlmi_zoo.architectures.mil import training as training  # registers the training stages
from mlmi_zoo.architectures.mil.explanations import AdditiveMILExplanation, MILExplanation
from mlmi_zoo.architectures.mil.config import MILConfig, MILTrainingSettings
from mlmi_zoo.architectures.mil import registration as registration  # registers the model names
from mlmi_zoo.architectures.mil.model import ABMIL, AdditiveMIL, BagOutputs
from mlmi_zoo.families import Family, register_family

ABMIL_FAMILY = register_family(Family(
    name="abmil", model_class=ABMIL, training=training.MILTraining(), inputs="bags",
    evaluation="mlmi_zoo.architectures.mil.evaluation:_mil",
    title="gated-attention MIL", method="attention-based deep MIL (Ilse et al., ICML 2018)",
    bibtex=("""@inproceedings{ilse2018attention,
  title     = {Attention-based Deep Multiple Instance Learning},
  author    = {Ilse, Maximilian and Tomczak, Jakub M. and Welling, Max},
  booktitle = {International Conference on Machine Learning},
  year      = {2018}
}""",),
    instance_scores="attention",
))
ADDITIVE_MIL_FAMILY = register_family(Family(
    name="additive_mil", model_class=AdditiveMIL, training=training.AdditiveMILTraining(), inputs="bags",
    evaluation="mlmi_zoo.architectures.mil.evaluation:_mil",
    title="additive MIL", method="Additive MIL (Javed et al., NeurIPS 2022) on attention MIL (Ilse et al., 2018)",
    bibtex=("""@inproceedings{javed2022additive,
  title     = {Additive {MIL}: Intrinsically Interpretable Multiple Instance Learning for Pathology},
  author    = {Javed, Syed Ashar and Juyal, Dinkar and Padigela, Harshith and Taylor-Weiner, Amaro and Yu, Limin and Prakash, Aaditya},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2022}
}""",),
    instance_scores="contributions",
))

__all__ = ["MILConfig", "MILTrainingSettings", "ABMIL", "AdditiveMIL", "BagOutputs", "MILExplanation", "AdditiveMILExplanation"]
