"""The measurement-bottleneck configuration: the architecture (saved with the weights) and the training settings.

See :mod:`.model` for the method and its references.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from mlmi_zoo.base import ModelConfig

__all__ = ["MeasurementConfig", "MeasurementTrainingSettings", "DME_LABELS"]

# The macular-edema risk of IDRiD (Porwal et al., Data 2018), after the ETDRS definition of clinically
# significant macular edema: the three grades the decision rule returns, in order.
DME_LABELS = ("0 no apparent hard exudates", "1 hard exudates outside 1 DD of the macula centre",
              "2 hard exudates within 1 DD of the macula centre")


@dataclass(frozen=True)
class MeasurementConfig(ModelConfig):
    """Measurement bottleneck configuration.

    The three labels are, in order: no lesion; lesion, none within ``radius`` of the landmark;
    lesion within ``radius`` of the landmark (the IDRiD macular-edema risk with hard exudates and the
    fovea by default). ``spacing`` is the canonical size of one input pixel in the unit of
    ``radius`` (for fundus photographs: optic-disc diameters, ``DD``), used when ``explain`` is given
    none.

    Attributes:
        feature_stride: the backbone is cut at this stride; the lesion map and the landmark map
            live on its latent grid.
        hidden: channels of the 3x3 convolution of each head.
        radius: the rule's radius in ``unit`` (1 DD in the DME definition).
        threshold: a latent cell is lesion where the lesion map's probability is at least this.
        unit: the unit of ``spacing`` and ``radius`` (a pint unit of :mod:`mlmi_zoo.units`).
        lesion: what the lesion map marks (for explanations and cards).
        landmark: what the landmark map finds.
    """

    label_names: tuple[str, ...] = DME_LABELS
    in_channels: int = 3
    backbone: str = "tf_efficientnet_lite0"
    feature_stride: int = 16
    hidden: int = 64
    radius: float = 1.0
    threshold: float = 0.5
    unit: str = "DD"
    lesion: str = "hard exudates"
    landmark: str = "fovea"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_classes != 3:
            raise ValueError(f"a measurement bottleneck decides between 3 labels (no lesion, lesion beyond the "
                             f"radius, lesion within it), got {len(self.label_names)}: {self.label_names!r}")
        if self.spatial_dims != 2:
            raise ValueError(f"a measurement bottleneck measures distances in the image plane: spatial_dims must "
                             f"be 2, got {self.spatial_dims}")
        if not (math.isfinite(self.radius) and self.radius > 0):
            raise ValueError(f"radius must be a positive distance in {self.unit}, got {self.radius}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be a probability strictly between 0 and 1, got {self.threshold}")
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1 channel, got {self.hidden}")


@dataclass(frozen=True)
class MeasurementTrainingSettings:
    """How a measurement bottleneck is trained (the recipe's ``training:`` section).

    Attributes:
        pos_weight: weight of lesion cells in the lesion map's cross-entropy (lesion cells are rare).
        landmark_coef: weight of the landmark map's cross-entropy (cases with a landmark position).
        label_coef: weight of the weak supervision from graded cases (cases with a label and a
            landmark position): the strongest lesion evidence anywhere must agree with "lesion
            present" (grade >= 1), the strongest within the radius of the *true* landmark with grade 2.
            It trains the map through the fixed rule; the rule itself has nothing to learn.
    """

    pos_weight: float = 3.0
    landmark_coef: float = 1.0
    label_coef: float = 1.0

    def __post_init__(self) -> None:
        for name in ("pos_weight", "landmark_coef", "label_coef"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.pos_weight == 0:
            raise ValueError("pos_weight must be > 0: lesion cells would not count in the lesion map's loss")
