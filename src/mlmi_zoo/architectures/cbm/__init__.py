"""Concept bottleneck models (Koh et al., ICML 2020): one package.

The model (:mod:`.model`), typed concepts with units (:mod:`.concepts`), test-time interventions
(:mod:`.interventions`), the training stages and loss terms (:mod:`.training`, registered with the
trainer on import) and the family's evaluation section (:mod:`.evaluation`, loaded by
:mod:`mlmi_zoo.evaluation` only).
"""
from mlmi_zoo.architectures.cbm import training as training  # registers the training stages
from mlmi_zoo.architectures.cbm.model import CBM, NODULE_CONCEPTS, CBMConfig, ConceptExplanation, MLPConceptExplanation

__all__ = ["CBMConfig", "CBM", "ConceptExplanation", "MLPConceptExplanation", "NODULE_CONCEPTS"]
