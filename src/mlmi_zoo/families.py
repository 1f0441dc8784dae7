"""One record per model family: what the rest of the zoo needs to know about it.

Each family package under :mod:`mlmi_zoo.architectures` registers one :class:`Family` when it is
imported. Training (:func:`mlmi_zoo.architectures.blocks.stages.training_for`), evaluation
(:func:`mlmi_zoo.evaluation.evaluate`), model cards and the contract tests consult the record
instead of comparing family names, so adding a family means adding a package, not editing a
chain of ``if family == ...`` branches elsewhere.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Generic, Literal, TypeVar

import torch

if TYPE_CHECKING:  # the training-stage interface lives one layer up, in architectures.blocks
    from mlmi_zoo.architectures.blocks.stages import FamilyTraining
    from mlmi_zoo.base import InterpretableModel
    from mlmi_zoo.explanations import Explanation

__all__ = ["Family", "register_family", "family_of", "families"]

ExplanationT = TypeVar("ExplanationT", bound="Explanation")


@dataclass(frozen=True)
class Family(Generic[ExplanationT]):
    """What the trainer, the evaluation and the cards need to know about one model family.

    Generic over the family's explanation type, which ``evidence_maps`` reads.

    Attributes:
        name: the family's name, the prefix of its registered architectures (``protopnet``).
        model_class: the :class:`~mlmi_zoo.base.InterpretableModel` subclass it builds.
        training: its training stages and loss terms.
        inputs: ``"images"`` (one image per case) or ``"bags"`` (a padded bag of instances).
        evaluation: ``"module:function"`` of the family's evaluation section, imported only by
            :mod:`mlmi_zoo.evaluation` (so the model code never imports the evaluation layer).
        title: what the card calls the model ("prototype network").
        method: one line naming the method and its paper.
        bibtex: the method's references.
        interpretable: False for the black-box baseline.
        evidence_maps: images only; the ``(B, T, *spatial)`` map of each of the ``T`` contributions
            of a decomposable explanation (a prototype's similarity map, a concept's map), from which
            the evaluation localizes the top contribution; None when the family has none.
        instance_scores: bags only; what ranks instances: ``"attention"`` (pre-softmax scores) or
            ``"contributions"`` (each instance's exact contribution to a class).
        concepts: the explanation carries named concept predictions to score against the data.
        annotated_recognizability: images only; ``"module:function"`` of the family's visual
            recognizability scored on an annotated set (``evaluate(localization_data=...)``), when the
            evaluated split has no masks of its own: ``f(model, block, data, ctx) -> block`` extends
            the family's block. ``None``: the block stays as the section computed it.
    """

    name: str
    model_class: type[InterpretableModel[Any]]
    training: FamilyTraining
    inputs: Literal["images", "bags"]
    evaluation: str
    title: str
    method: str
    bibtex: tuple[str, ...] = ()
    interpretable: bool = True
    evidence_maps: Callable[[ExplanationT], torch.Tensor] | None = None
    instance_scores: Literal["attention", "contributions"] | None = None
    concepts: bool = False
    annotated_recognizability: str | None = None

    @property
    def decomposes(self) -> bool:
        """Whether the logits are an exact sum of named contributions (an exact decomposition)."""
        return self.evidence_maps is not None or self.instance_scores == "contributions"

    def evaluation_section(self) -> Callable[..., dict[str, Any]]:
        """The family's evaluation section (imported on first use)."""
        module, _, function = self.evaluation.partition(":")
        return getattr(importlib.import_module(module), function)

    def annotated_recognizability_section(self) -> Callable[..., dict[str, Any]] | None:
        """The family's recognizability on an annotated set (imported on first use), or None."""
        if self.annotated_recognizability is None:
            return None
        module, _, function = self.annotated_recognizability.partition(":")
        return getattr(importlib.import_module(module), function)


_FAMILIES: dict[str, Family[Any]] = {}


def register_family(family: Family[ExplanationT]) -> Family[ExplanationT]:
    """Register ``family`` (a second record under one name raises)."""
    if family.name in _FAMILIES:
        raise ValueError(f"family {family.name!r} is already registered")
    if family.model_class.family != family.name:
        raise ValueError(f"{family.model_class.__name__}.family is {family.model_class.family!r}, not {family.name!r}")
    _FAMILIES[family.name] = family
    return family


def families() -> dict[str, Family[Any]]:
    """Every registered family, by name."""
    importlib.import_module("mlmi_zoo.architectures")  # the family packages register on import
    return dict(_FAMILIES)


def family_of(model_or_name: InterpretableModel[Any] | str) -> Family[Any]:
    """The record of a model's family (or of a family name)."""
    name = model_or_name if isinstance(model_or_name, str) else model_or_name.family
    known = families()
    if name not in known:
        raise ValueError(f"no family {name!r} is registered; known: {sorted(known)}")
    return known[name]
