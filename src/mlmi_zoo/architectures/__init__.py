"""Model families. Importing this package registers every architecture."""
from mlmi_zoo.architectures.backbones import create_backbone
from mlmi_zoo.architectures.heads import PhysicalHead
from mlmi_zoo.architectures import baseline  # noqa: F401  (registers baseline_*)
from mlmi_zoo.architectures import protopnet  # noqa: F401  (registers protopnet_* and its training)
from mlmi_zoo.architectures import cbm, cbm_training  # noqa: F401  (registers cbm_* and its training)
from mlmi_zoo.architectures import mil, mil_training  # noqa: F401  (registers abmil_*, additive_mil_* and their training)

__all__ = ["create_backbone", "PhysicalHead"]
