"""mlmi-zoo: inherently interpretable models for medical imaging.

>>> import mlmi_zoo
>>> mlmi_zoo.list_models()                      # registered architectures (offline)
>>> model = mlmi_zoo.load("protopnet_resnet8.lidc_nodule")
>>> exp = model.explain(x, spacing=(0.7, 0.7))  # a typed, frozen explanation
"""
from mlmi_zoo._config import ConfigError
from mlmi_zoo._version import __version__
from mlmi_zoo._weights import WeightsError
from mlmi_zoo.base import InterpretableModel, LoadReport, ModelConfig
from mlmi_zoo.explanations import Explanation
from mlmi_zoo.hub import load, publish
from mlmi_zoo.registry import create_model, list_models, register_model
from mlmi_zoo.specs import (
    ConceptSpec,
    ConceptValueError,
    InputSpec,
    InputSpecError,
    IntensityTransform,
    Measurement,
    QuantitySpec,
)

__all__ = [
    "__version__",
    "ConceptSpec",
    "ConceptValueError",
    "ConfigError",
    "Explanation",
    "InputSpec",
    "InputSpecError",
    "IntensityTransform",
    "InterpretableModel",
    "LoadReport",
    "Measurement",
    "ModelConfig",
    "QuantitySpec",
    "WeightsError",
    "create_model",
    "list_models",
    "load",
    "publish",
    "register_model",
]
