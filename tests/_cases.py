"""One table of tiny configurations, one per family, that drives the cross-cutting tests.

A newly registered family fails the contract test until it adds a row here — so every model is
tested the day it is registered.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Case:
    overrides: dict[str, Any]
    make_input: Callable[[int], tuple[torch.Tensor, ...]]  # batch size -> positional inputs
    explain_kwargs: dict[str, Any] = field(default_factory=dict)


def _image(*shape: int) -> Callable[[int], tuple[torch.Tensor, ...]]:
    return lambda b: (torch.rand(b, *shape),)


def _bag(n: int, d: int) -> Callable[[int], tuple[torch.Tensor, ...]]:
    return lambda b: (torch.randn(b, n, d),)


_MIL_SMALL = {"hidden": 8, "attention_hidden": 8, "classifier_hidden": 4,
              # the area head is not part of the logits; families test it on their own
              "quantities": ()}

# Keyed by family, or by architecture name where one family takes different inputs.
CASES: dict[str, Case] = {
    "baseline": Case({"img_size": (32, 32), "feature_stride": 8}, _image(1, 32, 32)),
    "baseline_tf_efficientnet_lite0": Case({"img_size": (32, 32), "feature_stride": 32}, _image(1, 32, 32)),
    "protopnet": Case({"img_size": (32, 32), "prototypes_per_class": 2, "prototype_dim": 16}, _image(1, 32, 32)),
    "cbm": Case({"img_size": (32, 32), "spacing": (0.7, 0.7)}, _image(1, 32, 32), {"spacing": (0.7, 0.7)}),
    "measurement": Case({"img_size": (64, 64), "spacing": (0.05, 0.05), "hidden": 4}, _image(3, 64, 64),
                        {"spacing": (0.05, 0.05)}),
    "bag_baseline": Case({"in_features": 16, "hidden": 8, "classifier_hidden": 4}, _bag(5, 16)),
    "abmil_features": Case({"in_features": 16, "in_channels": 16, **_MIL_SMALL}, _bag(5, 16)),
    "additive_mil_features": Case({"in_features": 16, "in_channels": 16, **_MIL_SMALL}, _bag(5, 16)),
    "abmil_resnet8": Case({"tile_size": 16, **_MIL_SMALL}, lambda b: (torch.rand(b, 3, 3, 16, 16),)),
    "additive_mil_resnet8": Case({"tile_size": 16, **_MIL_SMALL}, lambda b: (torch.rand(b, 3, 3, 16, 16),)),
}


def case_for(name: str, family: str) -> Case:
    """The tiny case of architecture ``name`` (or of its family)."""
    for key in (name, family):
        if key in CASES:
            return CASES[key]
    raise AssertionError(f"{name!r} (family {family!r}) has no row in tests/_cases.py CASES; add a tiny configuration")
