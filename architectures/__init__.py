"""Model families. Importing this package registers every architecture."""
from mlmi_zoo.architectures.backbones import create_backbone
from mlmi_zoo.architectures.heads import PhysicalHead
from mlmi_zoo.architectures import baseline  # noqa: F401  (registers baseline_*)

__all__ = ["create_backbone", "PhysicalHead"]
