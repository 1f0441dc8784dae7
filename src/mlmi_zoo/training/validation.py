"""The validation pass after every epoch and special stage, and the classification metrics it reports.

:func:`validate` runs the family adapter's loss of a stage over the validation split in eval mode,
gathers the logits from every process (:func:`~mlmi_zoo.training.distributed.gather_rows`), and
returns ``val_``-prefixed metrics: those of :func:`classification_metrics` on the cases with a label
(label -1 marks a case that supervises something else, e.g. a lesion map) plus ``val_stage_loss``,
the stage's own loss (cross-entropy plus the family's terms) over every case.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from mlmi_zoo.architectures.blocks.stages import FamilyTraining
from mlmi_zoo.base import InterpretableModel
from mlmi_zoo.training._device import to_device
from mlmi_zoo.training.distributed import Dist, all_reduce_sum, gather_rows

__all__ = ["classification_metrics", "validate"]


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Loss, accuracy, balanced accuracy and AUROC (one-vs-rest macro for > 2 classes; NaN if undefined).

    Args:
        logits: (N, C).
        labels: (N,) class indices.
    """
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    if labels.numel() == 0:
        return {"loss": math.nan, "accuracy": math.nan, "balanced_accuracy": math.nan, "auroc": math.nan}
    logits = logits.double()
    probs = logits.softmax(-1).numpy()  # (N, C)
    y = labels.numpy()
    pred = probs.argmax(-1)
    present = np.unique(y)
    if len(present) < 2:
        auroc = math.nan  # AUROC needs both classes; logged, never selected
    elif probs.shape[1] == 2:
        auroc = float(roc_auc_score(y, probs[:, 1]))
    else:  # one-vs-rest macro over the classes present (a small val split may miss a class)
        auroc = float(np.mean([roc_auc_score(y == c, probs[:, c]) for c in present]))
    return {
        "loss": float(nn.functional.cross_entropy(logits, labels)),
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "auroc": auroc,
    }


@torch.no_grad()
def validate(model: InterpretableModel, adapter: FamilyTraining, loader: DataLoader, stage: str, *,
             device: torch.device, amp: bool, group: Dist) -> dict[str, float]:
    """Metrics of ``model`` on ``loader`` (every process's share), prefixed ``val_``.

    Args:
        stage: the gradient stage whose loss gives ``val_stage_loss``.
        amp: autocast to bfloat16, as in training.
        group: the process group; the metrics are those of the whole split.
    """
    was_training = model.training
    model.eval()
    logits, labels, stage_loss, n = [], [], 0.0, 0
    for batch in loader:
        batch = to_device(batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = adapter.loss(model, batch, stage)
        logits.append(out.logits.float())
        labels.append(batch["label"])
        stage_loss += float(out.loss) * out.logits.shape[0]
        n += out.logits.shape[0]
    model.train(was_training)
    all_logits = torch.cat(logits) if logits else torch.zeros(0, model.num_classes, device=device)  # (N, C)
    all_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)  # (N,)
    all_logits, all_labels = gather_rows(all_logits, group), gather_rows(all_labels, group)
    totals = all_reduce_sum({"stage_loss": stage_loss, "n": float(n)}, group, device)
    graded = all_labels >= 0  # a case without a label (-1) may train a map only (IDRiDMacula's segmentation photographs)
    metrics = classification_metrics(all_logits[graded].cpu(), all_labels[graded].cpu())
    metrics["stage_loss"] = totals["stage_loss"] / max(totals["n"], 1)
    return {f"val_{k}": v for k, v in metrics.items()}

