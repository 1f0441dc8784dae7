"""Black-box baseline on bags: instance MLP -> masked mean and max pooling -> MLP classifier.

The bag counterpart of :mod:`mlmi_zoo.architectures.baseline`: an attention-MIL model fine-tuned on a
user's bags is compared with this model fine-tuned by the same command on the same bags, so the
comparison measures what the attention costs, not what the instance features cost. It pools the
embedded instances by their mean and their maximum (the MI-Net pooling operators of Wang, Yan, Tang,
Bai and Liu, "Revisiting multiple instance neural networks", Pattern Recognition 2018) and explains
nothing beyond its logits: no instance weight, no contribution.

Padding never changes a result: the mean is taken over valid instances, and padded positions are
excluded from the maximum.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mlmi_zoo.architectures.baseline.model import BaselineExplanation
from mlmi_zoo.architectures.blocks.stages import FamilyTraining, LossOutput
from mlmi_zoo.architectures.mil.config import FEATURES
from mlmi_zoo.architectures.mil.heads import check_bag_mask
from mlmi_zoo.architectures.mil.training import feature_bag_inputs
from mlmi_zoo.base import InterpretableModel, ModelConfig
from mlmi_zoo.registry import build_config, register_model
from mlmi_zoo.specs import InputSpec

__all__ = ["BagBaselineConfig", "BagBaseline", "BagBaselineTraining"]


@dataclass(frozen=True)
class BagBaselineConfig(ModelConfig):
    """Black-box bag classifier configuration (cached feature bags ``(B, N, D)``).

    ``spatial_dims`` is 0 and ``in_channels`` mirrors ``in_features``, as for the MIL models, so
    the base input check validates ``(B, N, D)`` bags.

    Attributes:
        in_features: instance feature width D.
        hidden: width of the instance embedding (as the MIL models' ``hidden``).
        classifier_hidden: hidden width of the classifier on the pooled ``[mean, max]`` embedding;
            0 makes it linear.
        dropout: on the instance embedding, during training only.
    """

    backbone: str = FEATURES
    in_channels: int = 512
    spatial_dims: int = 0
    img_size: tuple[int, ...] = ()
    modality: str = "unknown"
    in_features: int = 512
    hidden: int = 128
    classifier_hidden: int = 64
    dropout: float = 0.25

    def __post_init__(self) -> None:
        if self.backbone != FEATURES:
            raise ValueError(f"the bag baseline reads cached features: backbone must be {FEATURES!r}, got {self.backbone!r}")
        object.__setattr__(self, "in_channels", self.in_features)
        super().__post_init__()
        if self.spatial_dims != 0:
            raise ValueError(f"the bag baseline takes bags: spatial_dims must be 0, got {self.spatial_dims}")
        if self.quantities:
            raise ValueError("the bag baseline has no physical head: quantities must be empty")
        if self.in_features < 1 or self.hidden < 1:
            raise ValueError(f"in_features and hidden must be positive, got {self.in_features}, {self.hidden}")
        if self.classifier_hidden < 0:
            raise ValueError(f"classifier_hidden must be >= 0 (0 = linear), got {self.classifier_hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class BagBaseline(InterpretableModel[BagBaselineConfig]):
    """Instance MLP, masked mean and max pooling, MLP classifier (see the module docstring)."""

    family = "bag_baseline"
    config_class = BagBaselineConfig

    def __init__(self, config: BagBaselineConfig) -> None:
        super().__init__(config)
        self.embed = nn.Sequential(nn.Linear(config.in_features, config.hidden), nn.ReLU(), nn.Dropout(config.dropout))
        width = 2 * config.hidden  # [mean, max]
        self.classifier: nn.Module = (
            nn.Linear(width, config.num_classes) if config.classifier_hidden == 0 else
            nn.Sequential(nn.Linear(width, config.classifier_hidden), nn.ReLU(),
                          nn.Linear(config.classifier_hidden, config.num_classes)))

    @property
    def input_spec(self) -> InputSpec:
        c = self.config
        return InputSpec(in_channels=c.in_channels, spatial_dims=0, size=(), spacing=None, intensity=c.intensity,
                         modality=c.modality, value_range=None)

    def validate_input(self, x: torch.Tensor, spacing: Any = None) -> None:
        """Check a bag batch's layout and dtype: (B, N, D) features."""
        self.input_spec.check_layout(x, name="feats")
        self._check_dtype(x)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, C) of a padded batch of bags.

        Args:
            feats: (B, N, D) cached features.
            mask: (B, N) bool, True at valid instances; ``None`` = all valid.

        Raises:
            InputSpecError: for a bag or mask that does not fit, or a valid instance holding NaN or Inf.
        """
        self.validate_input(feats)
        mask = check_bag_mask(mask, feats.shape[0], feats.shape[1], feats.device)
        feats = self.input_spec.check_values(feats, valid=mask, name="feats")
        h = self.embed(feats)  # (B, N, H)
        valid = mask[..., None]  # (B, N, 1)
        mean = (h * valid).sum(1) / valid.sum(1)  # (B, H)
        top = h.masked_fill(~valid, float("-inf")).amax(1)  # (B, H); every bag has a valid instance
        return self.classifier(torch.cat([mean, top], -1))

    @torch.no_grad()
    def explain(self, feats: torch.Tensor, mask: torch.Tensor | None = None, coords: torch.Tensor | None = None,
                microns_per_pixel: Any = None) -> BaselineExplanation:
        """Logits only: a black box has no faithful decomposition. ``coords`` and ``microns_per_pixel``, which a
        MIL model's explanation reads, are accepted so that callers of bag models need no branch, and unused."""
        return BaselineExplanation(logits=self(feats, mask), label_names=self.label_names)


class BagBaselineTraining(FamilyTraining):
    """Cross-entropy on padded bags (``batch["feats"]``, ``batch["mask"]``)."""

    family = "bag_baseline"

    def inputs(self, model: InterpretableModel, batch: Any) -> Any:
        """(feats, mask) of a collated bag batch, read as the MIL models read cached features."""
        return feature_bag_inputs(model, batch)

    def loss(self, model: InterpretableModel, batch: dict[str, Any], stage: str) -> LossOutput:
        x, mask = self.inputs(model, batch)
        logits = model(x, mask)
        ce = nn.functional.cross_entropy(logits, batch["label"].to(logits.device))
        return LossOutput(ce, logits.detach(), {"ce": float(ce.detach())})


@register_model(f"bag_baseline_{FEATURES}")
def bag_baseline_features(**overrides: Any) -> BagBaseline:
    """Black-box baseline on cached feature bags (mean and max pooling)."""
    return BagBaseline(build_config(BagBaselineConfig, FEATURES, overrides))
