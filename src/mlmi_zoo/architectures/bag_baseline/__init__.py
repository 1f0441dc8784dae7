"""The black-box baseline on bags, against which a MIL model fine-tuned on the same bags is compared.

The model and its training (:mod:`.model`); its evaluation section is the image baseline's (every
element "not applicable": a black box has no explanation to measure).
"""
from mlmi_zoo.architectures.bag_baseline.model import BagBaseline, BagBaselineConfig, BagBaselineTraining
from mlmi_zoo.families import Family, register_family

FAMILY = register_family(Family(
    name="bag_baseline", model_class=BagBaseline, training=BagBaselineTraining(), inputs="bags",
    evaluation="mlmi_zoo.architectures.baseline.evaluation:_baseline",
    title="black-box bag baseline",
    method="instance MLP + mean and max pooling + MLP (the MI-Net pooling of Wang et al., Pattern Recognition 2018)",
    bibtex=("""@article{wang2018revisiting,
  title   = {Revisiting Multiple Instance Neural Networks},
  author  = {Wang, Xinggang and Yan, Yongluan and Tang, Peng and Bai, Xiang and Liu, Wenyu},
  journal = {Pattern Recognition},
  volume  = {74},
  pages   = {15--24},
  year    = {2018}
}""",),
    interpretable=False,
))

__all__ = ["BagBaseline", "BagBaselineConfig"]
