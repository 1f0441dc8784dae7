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


CASES: dict[str, Case] = {
    "baseline": Case({"img_size": (32, 32), "feature_stride": 8}, _image(1, 32, 32)),
}


def case_for(family: str) -> Case:
    if family not in CASES:
        raise AssertionError(f"family {family!r} has no row in tests/_cases.py CASES; add a tiny configuration")
    return CASES[family]
