"""Model families, one package each, on shared building blocks (:mod:`.blocks`).

Importing this package registers every architecture and its training stages. It imports nothing
from :mod:`mlmi_zoo.training`, :mod:`mlmi_zoo.evaluation` or :mod:`mlmi_zoo.model_cards`
(``tests/test_layering.py``).
"""
from mlmi_zoo.architectures import bag_baseline, baseline, cbm, measurement, mil, protopnet
from mlmi_zoo.architectures.blocks.backbones import create_backbone
from mlmi_zoo.architectures.blocks.heads import PhysicalHead

__all__ = ["create_backbone", "PhysicalHead", "bag_baseline", "baseline", "cbm", "measurement", "mil", "protopnet"]
