"""ProtoPNet's last-layer stage: a convex fit on similarity vectors computed once.

Chen et al., "This Looks Like That" (NeurIPS 2019), section 2.2: with the prototypes fixed after
push, only the last layer is optimised (cross-entropy + L1 on off-class weights), which is convex
in it; we compute the ``(N, P)`` similarities once and never run the backbone again.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F

from mlmi_zoo.architectures.protopnet.config import ProtoPNetTrainingSettings
from mlmi_zoo.architectures.protopnet.model import ProtoPNet
from mlmi_zoo.architectures.protopnet.prototypes import _device_of, _EvalMode

__all__ = ["cached_similarities", "fit_last_layer", "off_class_l1"]


def off_class_l1(weight: torch.Tensor, prototype_classes: torch.Tensor) -> torch.Tensor:
    """Sum of |w| over last-layer weights (C, P) that link a prototype to another class."""
    classes = torch.arange(weight.shape[0], device=weight.device)
    off = classes[:, None] != prototype_classes[None, :].to(weight.device)  # (C, P)
    return (weight * off).abs().sum()


@torch.no_grad()
def cached_similarities(model: ProtoPNet, loader: Iterable[dict[str, Any]],
                        device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One eval-mode pass: the last layer's inputs (similarities x switch-off mask) and the labels.

    Returns:
        ``(sims (N, P), labels (N,))`` on ``device``.
    """
    device = _device_of(model, device)
    sims, labels = [], []
    with _EvalMode(model):
        for batch in loader:
            x = model.input_spec.intensity(batch["image"].to(device))
            model.validate_input(x)
            sims.append(model.pooled_similarities(model.latent(x)) * model.prototype_mask)  # (B, P)
            labels.append(torch.as_tensor(batch["label"]).reshape(-1).to(device))
    if not sims:
        raise ValueError("the loader yielded no batches; the last layer needs training data")
    return torch.cat(sims), torch.cat(labels)


def fit_last_layer(model: ProtoPNet, loader: Iterable[dict[str, Any]], epochs: int = 20, lr: float = 1e-3,
                   l1: float | None = None, batch_size: int | None = None,
                   device: torch.device | str | None = None) -> dict[str, float]:
    """Fit the last layer on similarity vectors computed once (the backbone runs one pass only).

    Minimises cross-entropy + ``l1`` x L1 of off-class weights — convex in the last layer — with
    Adam over mini-batches of the cached ``(N, P)`` similarities.

    Args:
        model: a (pushed) ProtoPNet.
        loader: training batches.
        epochs: passes over the cache.
        lr: Adam learning rate.
        l1: L1 coefficient (default: :class:`ProtoPNetTrainingSettings`'s ``l1_coef``).
        batch_size: rows per step (default: the loader's batch size, else 64).
        device: where to compute (default: the model's device).

    Returns:
        ``{"loss_before", "loss_after", "cached_cases", "epochs"}`` (full-cache objective values).
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    l1 = ProtoPNetTrainingSettings().l1_coef if l1 is None else float(l1)
    sims, labels = cached_similarities(model, loader, device)  # (N, P), (N,)
    weight = model.last_layer.weight
    classes = model.prototype_classes.to(weight.device)
    batch_size = batch_size or getattr(loader, "batch_size", None) or 64

    def objective(rows: torch.Tensor | slice) -> torch.Tensor:
        return F.cross_entropy(sims[rows] @ weight.T, labels[rows]) + l1 * off_class_l1(weight, classes)

    was_trainable = weight.requires_grad
    weight.requires_grad_(True)
    try:
        with torch.no_grad():
            before = float(objective(slice(None)))
        optimiser = torch.optim.Adam([weight], lr=lr)
        with torch.enable_grad():
            for _ in range(epochs):
                for rows in torch.randperm(sims.shape[0], device=sims.device).split(batch_size):
                    optimiser.zero_grad(set_to_none=True)
                    objective(rows).backward()
                    optimiser.step()
        with torch.no_grad():
            after = float(objective(slice(None)))
    finally:
        weight.grad = None
        weight.requires_grad_(was_trainable)
    return {"loss_before": before, "loss_after": after, "cached_cases": int(sims.shape[0]), "epochs": int(epochs)}


