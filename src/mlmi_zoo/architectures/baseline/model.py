"""Black-box baseline: backbone -> global average pool -> linear layer.

Every card states the accuracy cost of interpretability against this model trained on the same data
with the same backbone and recipe budget. It explains nothing beyond its logits (and measurements
when it has a physical head): that is the point of comparison.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from einops import reduce
from torch import nn

from mlmi_zoo.architectures.blocks.backbones import create_backbone
from mlmi_zoo.architectures.blocks.heads import PhysicalHead
from mlmi_zoo.base import InterpretableModel, ModelConfig
from mlmi_zoo.explanations import Explanation
from mlmi_zoo.registry import register_backbones
from mlmi_zoo.architectures.blocks.stages import FamilyTraining, LossOutput, fit_physical_head

__all__ = ["BaselineConfig", "BaselineClassifier", "BaselineExplanation", "resolve_spacing"]


@dataclass(frozen=True)
class BaselineConfig(ModelConfig):
    """Black-box classifier configuration.

    Attributes:
        feature_stride: cut the backbone so the latent grid keeps this stride (same as the
            interpretable model it is compared with).
        dropout: dropout before the linear layer.
    """

    feature_stride: int = 8
    dropout: float = 0.0


@dataclass(frozen=True, kw_only=True)
class BaselineExplanation(Explanation):
    """Logits and measurements only: a black box has no faithful decomposition."""

    family = "baseline"


def resolve_spacing(model: InterpretableModel[Any], spacing: Any, x: torch.Tensor) -> torch.Tensor | None:
    """Check ``x``; (B, dims) spacing for measurements: the given one, else the model's canonical
    spacing (see :meth:`~mlmi_zoo.base.InterpretableModel.measurement_spacing`)."""
    return model.measurement_spacing(x, spacing)


class BaselineClassifier(InterpretableModel[BaselineConfig]):
    """Backbone + global average pool + linear layer (+ optional physical head)."""

    family = "baseline"
    config_class = BaselineConfig

    def __init__(self, config: BaselineConfig) -> None:
        super().__init__(config)
        self.backbone = create_backbone(config.backbone, config.in_channels, config.spatial_dims, config.feature_stride)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(self.backbone.out_channels, config.num_classes)
        self.physical = PhysicalHead(self.backbone.out_channels, config.quantities) if config.quantities else None

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) -> (B, F) globally averaged backbone features."""
        self.validate_input(x)
        return reduce(self.backbone(x), "b f ... -> b f", "mean")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.pooled_features(x)))  # (B, C)

    def forward_with_quantities(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, C) and standardised physical-head outputs (B, Q) from one backbone pass."""
        pooled = self.pooled_features(x)
        quantities = self.physical(pooled) if self.physical is not None else None
        return self.classifier(self.dropout(pooled)), quantities

    @torch.no_grad()
    def explain(self, x: torch.Tensor, spacing: Any = None) -> BaselineExplanation:
        """Logits and, with a physical head, measurements at ``spacing`` (default: canonical)."""
        logits, quantities = self.forward_with_quantities(x)
        measurements = {}
        s = resolve_spacing(self, spacing, x)
        if self.physical is not None and quantities is not None and s is not None:
            measurements = self.physical.measure(quantities, s)
        return BaselineExplanation(logits=logits, label_names=self.label_names, measurements=measurements, inputs=x)


class BaselineTraining(FamilyTraining):
    """Cross-entropy, plus the physical-head loss when the model has one."""

    family = "baseline"
    stage_names = ("joint",)

    def prepare(self, model: BaselineClassifier, train_set: Any) -> None:
        if model.physical is not None:
            fit_physical_head(model.physical, train_set)

    def loss(self, model: BaselineClassifier, batch: dict[str, Any], stage: str) -> LossOutput:
        x = self.inputs(model, batch)
        logits, quantities = model.forward_with_quantities(x)
        ce = nn.functional.cross_entropy(logits, batch["label"])
        logs = {"ce": ce.item()}
        loss = ce
        if model.physical is not None and quantities is not None:
            phys = model.physical.loss(quantities, batch["measurements"], batch["spacing"].to(quantities.dtype))
            loss = loss + phys
            logs["physical"] = phys.item()
        return LossOutput(loss, logits.detach(), logs)


register_backbones(BaselineClassifier, ("resnet8", "resnet18", "tf_efficientnet_lite0"),
                   "Black-box baseline on a {backbone} backbone.")
