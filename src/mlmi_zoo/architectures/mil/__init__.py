"""Attention MIL (Ilse et al., ICML 2018) and additive MIL (Javed et al., NeurIPS 2022): one package.

The models (:mod:`.model`), attention pooling and the bag-level area head (:mod:`.heads`), the
explanations (:mod:`.explanations`), the training stages and loss terms (:mod:`.training`,
registered with the trainer on import) and the families' evaluation section (:mod:`.evaluation`,
loaded by :mod:`mlmi_zoo.evaluation` only).
"""
from mlmi_zoo.architectures.mil import training as training  # registers the training stages
from mlmi_zoo.architectures.mil.explanations import AdditiveMILExplanation, MILExplanation
from mlmi_zoo.architectures.mil.model import ABMIL, AdditiveMIL, BagOutputs, MILConfig

__all__ = ["MILConfig", "ABMIL", "AdditiveMIL", "BagOutputs", "MILExplanation", "AdditiveMILExplanation"]
