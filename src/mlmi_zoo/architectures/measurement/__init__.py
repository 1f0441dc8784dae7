"""Measurement bottlenecks: lesion map and landmark -> a distance in clinical units -> a fixed grading rule.

The model and its explanation (:mod:`.model`), its configuration and training settings
(:mod:`.config`), the training stage (:mod:`.training`) and the family's evaluation section
(:mod:`.evaluation`, loaded by :mod:`mlmi_zoo.evaluation` only).
"""
import torch

from mlmi_zoo.architectures.measurement.config import DME_LABELS, MeasurementConfig, MeasurementTrainingSettings
from mlmi_zoo.architectures.measurement.model import MeasurementBottleneck, MeasurementExplanation
from mlmi_zoo.architectures.measurement.training import MeasurementTraining
from mlmi_zoo.families import Family, register_family


def _lesion_maps(exp: MeasurementExplanation) -> torch.Tensor:
    """(B, 2, H, W): both terms read the one lesion map (the second inside the radius)."""
    return exp.lesion_map.expand(-1, 2, *exp.lesion_map.shape[2:])


FAMILY = register_family(Family(
    name="measurement", model_class=MeasurementBottleneck, training=MeasurementTraining(), inputs="images",
    evaluation="mlmi_zoo.architectures.measurement.evaluation:_measurement",
    title="measurement bottleneck",
    method=("lesion map and landmark, a distance in clinical units, and the grade's published definition as the "
            "decision (a concept bottleneck with measurements, after Koh et al., ICML 2020; the macular-edema "
            "definition of ETDRS 1985 as used by IDRiD)"),
    bibtex=("""@inproceedings{koh2020concept,
  title     = {Concept Bottleneck Models},
  author    = {Koh, Pang Wei and Nguyen, Thao and Tang, Yew Siang and Mussmann, Stephen and Pierson, Emma and Kim, Been and Liang, Percy},
  booktitle = {International Conference on Machine Learning},
  year      = {2020}
}""", """@article{etdrs1985photocoagulation,
  title   = {Photocoagulation for diabetic macular edema. {Early Treatment Diabetic Retinopathy Study} report number 1},
  author  = {{Early Treatment Diabetic Retinopathy Study Research Group}},
  journal = {Archives of Ophthalmology},
  volume  = {103},
  number  = {12},
  pages   = {1796--1806},
  year    = {1985}
}"""),
    evidence_maps=_lesion_maps,
))

__all__ = ["DME_LABELS", "MeasurementConfig", "MeasurementTrainingSettings", "MeasurementBottleneck",
           "MeasurementExplanation"]
