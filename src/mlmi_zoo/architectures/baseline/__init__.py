"""The black-box baseline every card compares against: one package.

The model (:mod:`.model`; it trains with the default stages of
:class:`~mlmi_zoo.architectures.blocks.stages.FamilyTraining`) and its evaluation section
(:mod:`.evaluation`, loaded by :mod:`mlmi_zoo.evaluation` only).
"""
from mlmi_zoo.architectures.baseline.model import BaselineClassifier, BaselineConfig, BaselineExplanation
from mlmi_zoo.architectures.baseline.model import BaselineTraining
from mlmi_zoo.families import Family, register_family

FAMILY = register_family(Family(
    name="baseline", model_class=BaselineClassifier, training=BaselineTraining(), inputs="images",
    evaluation="mlmi_zoo.architectures.baseline.evaluation:_baseline",
    title="black-box baseline", method="backbone + global average pooling + linear layer",
    interpretable=False,
))

__all__ = ["BaselineConfig", "BaselineClassifier", "BaselineExplanation"]
