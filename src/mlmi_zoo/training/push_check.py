"""How much validation AUROC a fine-tuned prototype model lost in its push onto the user's images.

ProtoPNet's push (Chen et al., "This Looks Like That", NeurIPS 2019) replaces each prototype by the
nearest latent patch of a training image; on a user's small data set it may cost accuracy that the
last-layer fit does not recover, and the trainer cannot select weights from before the push (an
unpushed prototype model is not interpretable). :func:`push_check` reads the cost from a run's
``metrics.jsonl``; :func:`~mlmi_zoo.training.finetune.finetune` records it in ``config.json``
(``finetune.push_check``) and logs a warning above :data:`PUSH_DROP_WARNING`.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

__all__ = ["PUSH_DROP_WARNING", "push_check"]

log = logging.getLogger(__name__)


PUSH_DROP_WARNING = 0.1  # validation AUROC lost between the best epoch before push and the delivered weights


def push_check(metrics: str | Path) -> dict[str, Any] | None:
    """How much validation AUROC a prototype model lost in its push, from a run's ``metrics.jsonl``.

    ``before``: the best validation AUROC of the scored epochs before the push (with
    ``validate="where_used"``, the last epoch of each earlier stage); ``after``: the best of
    the push and the stages after it (the weights the trainer delivers come from there: an unpushed
    prototype model is not interpretable, so selection cannot go back before the push). ``dropped``
    when ``before - after`` exceeds :data:`PUSH_DROP_WARNING`.

    Returns:
        the check (values None where the validation split gave no AUROC, e.g. one class only), or None
        for a run without a push.
    """
    lines = [json.loads(x) for x in Path(metrics).read_text(encoding="utf-8").splitlines() if x.strip()]
    units = [x for x in lines if x.get("type") in ("epoch", "special_stage")]
    at = next((i for i, x in enumerate(units) if x.get("stage") == "push"), None)
    if at is None:
        return None
    def best(part: list[dict[str, Any]]) -> float | None:
        values = [x["val_auroc"] for x in part if isinstance(x.get("val_auroc"), (int, float))
                  and math.isfinite(x["val_auroc"])]
        return max(values) if values else None

    before, after = best(units[:at]), best(units[at:])
    drop = None if before is None or after is None else before - after
    return {"val_auroc_before_push": before, "val_auroc_after_push": after, "drop": drop,
            "dropped": bool(drop is not None and drop > PUSH_DROP_WARNING)}


def _record_push_check(final: Path, check: dict[str, Any] | None) -> None:
    """Add the push check to ``final/config.json`` (``finetune.push_check``) and warn when the push cost accuracy."""
    from mlmi_zoo._weights import write_json_atomic

    if check is None:
        return
    path = final / "config.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc.setdefault("finetune", {})["push_check"] = check
    write_json_atomic(path, doc)
    if check["dropped"]:
        log.warning("the push onto your training images lowered the validation AUROC from %.3f to %.3f and the "
                    "last-layer fit did not recover it; the delivered model is the pushed one. Try another --seed, "
                    "more --steps, or compare with the baseline before using it", check["val_auroc_before_push"],
                    check["val_auroc_after_push"])
