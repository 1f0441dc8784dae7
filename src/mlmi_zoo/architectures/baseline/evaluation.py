"""The black-box baseline section of an evaluation.

A black box has no explanation, so every element is "not applicable" with that reason, except
physical attribution when the baseline has a physical head (then measured like any other model's
quantities); faithfulness is not applicable either.
"""
from __future__ import annotations

from typing import Any

from mlmi_zoo.evaluation._collect import _Collected
from mlmi_zoo.evaluation._common import _Context
from mlmi_zoo.evaluation._elements import _measure_fn, _not_applicable, _physical_block
from mlmi_zoo.evaluation.results import ELEMENTS

BLACK_BOX = "not applicable: a black box has no explanation to measure"


def _baseline(model: Any, col: _Collected, ctx: _Context) -> dict[str, Any]:
    out = {name: _not_applicable(BLACK_BOX, "A black box states a decision without evidence.") for name in ELEMENTS}
    block, lim = _physical_block(
        col, model, ctx.dataset, ctx.limits, ctx.figures, _measure_fn(model),
        "Agreement in units on these data does not show agreement on other scanners or spacings.",
        "the baseline has no physical head (config.quantities is empty)")
    if block["applicable"]:
        out["physical_attribution"] = block
        ctx.limitations += lim
    else:
        out["physical_attribution"]["reason"] = f"{BLACK_BOX}; {block['reason'].removeprefix('not applicable: ')}"
    ctx.faithfulness = _not_applicable(BLACK_BOX)
    return out
