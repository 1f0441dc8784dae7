"""The black-box baseline every card compares against: one package.

The model (:mod:`.model`; it trains with the default stages of
:class:`~mlmi_zoo.architectures.blocks.stages.FamilyTraining`) and its evaluation section
(:mod:`.evaluation`, loaded by :mod:`mlmi_zoo.evaluation` only).
"""
from mlmi_zoo.architectures.baseline.model import BaselineClassifier, BaselineConfig, BaselineExplanation

__all__ = ["BaselineConfig", "BaselineClassifier", "BaselineExplanation"]
