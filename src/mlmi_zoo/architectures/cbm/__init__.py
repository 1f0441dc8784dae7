"""Concept bottleneck models (Koh et al., ICML 2020): one package.

The model (:mod:`.model`), its explanation (:mod:`.explanations`), typed concepts with units
(:mod:`.concepts`, values a person gives in :mod:`.concept_values`), test-time interventions
(:mod:`.interventions`), the training stages and loss terms (:mod:`.training`, registered with the
trainer on import) and the family's evaluation section (:mod:`.evaluation`, loaded by
:mod:`mlmi_zoo.evaluation` only).
"""
import torch

from mlmi_zoo.architectures.cbm import training as training  # registers the training stages
from mlmi_zoo.architectures.cbm.config import NODULE_CONCEPTS, CBMConfig, CBMTrainingSettings
from mlmi_zoo.architectures.cbm.explanations import ConceptExplanation, MLPConceptExplanation
from mlmi_zoo.architectures.cbm.model import CBM
from mlmi_zoo.families import Family, register_family


def _concept_maps(exp: ConceptExplanation) -> torch.Tensor:
    """(B, K, *spatial): each concept's map, on the input's pixels."""
    return exp.concept_maps


FAMILY = register_family(Family(
    name="cbm", model_class=CBM, training=training.CBMTraining(), inputs="images",
    evaluation="mlmi_zoo.architectures.cbm.evaluation:_cbm",
    title="concept-bottleneck model",
    method="Concept Bottleneck Model (Koh et al., ICML 2020) with typed concepts in physical units",
    bibtex=("""@inproceedings{koh2020concept,
  title     = {Concept Bottleneck Models},
  author    = {Koh, Pang Wei and Nguyen, Thao and Tang, Yew Siang and Mussmann, Stephen and Pierson, Emma and Kim, Been and Liang, Percy},
  booktitle = {International Conference on Machine Learning},
  year      = {2020}
}""",),
    evidence_maps=_concept_maps,
    concepts=True,
))

__all__ = ["CBMConfig", "CBMTrainingSettings", "CBM", "ConceptExplanation", "MLPConceptExplanation", "NODULE_CONCEPTS"]
