"""mlmi-zoo: inherently interpretable models for medical imaging."""
from mlmi_zoo._version import __version__
