"""What a gradient stage trains and how: its parameters, loss, optimiser and learning-rate schedule.

Every gradient stage of a recipe starts afresh (:func:`gradient_stage`): the family adapter's
parameters of the stage minus ``model.freeze`` are trained, with a new optimiser and a new schedule
(linear warm-up over ``optim.warmup_epochs``, then a constant rate or a cosine decay to 0 at the
stage's last step).

The schedule is ``torch.optim.lr_scheduler.LambdaLR`` driven by :class:`Schedule`, the closed form
of the factor at step ``t``. torch's ``LinearLR`` / ``CosineAnnealingLR`` (chained by
``SequentialLR``) describe the same curve but compute it recursively, each step multiplying the
previous rate by a ratio, so their rates drift from the closed form by a few ULPs: in a sweep over
rates, warm-ups and stage lengths 7953 of 19570 step values differed, and 1424 of the 1512 steps
of ``protopnet_nodule_phantom``'s joint stage. The difference mostly vanishes when the update is
rounded to float32 (two short runs trained to the same weights), but the rates are no longer
exactly those earlier runs used and logged. ``LambdaLR`` evaluates the closed form from its step
count, which its ``state_dict`` holds (with :class:`Schedule`'s fields), so a resumed stage
continues with exactly the rates an uninterrupted one uses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from mlmi_zoo.architectures.blocks.stages import FamilyTraining
from mlmi_zoo.base import InterpretableModel
from mlmi_zoo.training.recipe import OptimSection, StageSection

__all__ = ["GradientStage", "gradient_stage", "Schedule", "build_optimizer", "build_schedule", "stage_parameters",
           "train_mode"]


@dataclass
class GradientStage:
    """What one gradient stage trains with."""

    stage: StageSection
    params: list[nn.Parameter]  # the trainable ones (gradient clipping)
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR  # stepped after every optimiser step
    loss: nn.Module  # batch -> (loss, logits, logs); wrapped in DDP under torchrun


def gradient_stage(model: InterpretableModel, adapter: FamilyTraining, stage: StageSection, optim: OptimSection,
                   freeze: tuple[str, ...], steps_per_epoch: int, *, ddp: bool, device: torch.device) -> GradientStage:
    """Freeze for ``stage``, then a fresh optimiser and schedule over what stays trainable.

    Args:
        freeze: ``model.freeze`` prefixes, frozen whatever the stage.
        ddp: wrap the loss in ``DistributedDataParallel`` (a ``torchrun`` group).
    """
    params = stage_parameters(model, adapter, stage.name, freeze)
    optimizer = build_optimizer(params, optim, stage.lr if stage.lr is not None else optim.lr)
    scheduler = build_schedule(optimizer, optim, stage.epochs, steps_per_epoch)
    loss: nn.Module = _StageLoss(model, adapter, stage.name)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        loss = DistributedDataParallel(loss, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=True)
    return GradientStage(stage, params, optimizer, scheduler, loss)


class _StageLoss(nn.Module):
    """``adapter.loss`` as a module, so that DDP sees (and synchronises) the whole forward."""

    def __init__(self, model: InterpretableModel, adapter: FamilyTraining, stage: str) -> None:
        super().__init__()
        self.model, self.adapter, self.stage = model, adapter, stage

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        out = self.adapter.loss(self.model, batch, self.stage)
        return out.loss, out.logits, out.logs


def stage_parameters(model: InterpretableModel, adapter: FamilyTraining, stage: str,
                     freeze: tuple[str, ...]) -> list[nn.Parameter]:
    """Set ``requires_grad`` to the adapter's parameters of ``stage`` minus the ``freeze`` prefixes; return them.

    Raises:
        ValueError: a prefix that matches no parameter, or no parameter left to train.
    """
    chosen = {id(p) for p in adapter.trainable_parameters(model, stage)}
    names = [n for n, _ in model.named_parameters()]
    for prefix in freeze:
        if not any(n == prefix or n.startswith(prefix + ".") for n in names):
            tops = sorted({n.split(".")[0] for n in names})
            raise ValueError(f"model.freeze prefix {prefix!r} matches no parameter; top-level modules: {tops}")
    params = []
    for name, p in model.named_parameters():
        frozen = any(name == f or name.startswith(f + ".") for f in freeze)
        p.requires_grad_(id(p) in chosen and not frozen)
        if p.requires_grad:
            params.append(p)
    if not params:
        raise ValueError(f"stage {stage!r} has no trainable parameter left after freezing {list(freeze)}")
    return params


def train_mode(model: InterpretableModel) -> None:
    """``model.train()``, then eval mode for every sub-module whose parameters are all frozen.

    A frozen backbone keeps its batch-norm running statistics (and its dropout off).
    """
    model.train()
    for module in model.modules():
        own = list(module.parameters())
        if own and not any(p.requires_grad for p in own):
            module.eval()


def build_optimizer(params: list[nn.Parameter], optim: OptimSection, lr: float) -> torch.optim.Optimizer:
    """``AdamW`` or ``SGD`` (with momentum) over ``params`` as ``optim`` says, at rate ``lr``."""
    if optim.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=optim.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=optim.momentum, weight_decay=optim.weight_decay)


def build_schedule(optimizer: torch.optim.Optimizer, optim: OptimSection, epochs: int, steps_per_epoch: int
                   ) -> LambdaLR:
    """The stage's schedule; call its ``step()`` after every optimiser step."""
    total = max(1, epochs * steps_per_epoch)
    warmup = int(round(optim.warmup_epochs * steps_per_epoch))
    return LambdaLR(optimizer, Schedule(optim.schedule, warmup, total))


@dataclass(frozen=True)
class Schedule:
    """Learning-rate factor at optimiser step ``step`` of a stage: linear warm-up, then constant or cosine to 0.

    ``LambdaLR.state_dict`` stores these fields (a callable object's ``__dict__``): the names are
    part of the checkpoint format.
    """

    kind: str  # "constant" | "cosine"
    warmup: int  # warm-up steps; the factor reaches 1 at step warmup - 1
    total: int  # steps of the stage; the cosine reaches 0 there

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
