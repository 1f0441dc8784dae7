"""Bundled model folders (one per published model: card, config, weights, figures) and card tooling."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # loaded lazily by __getattr__ below
    from mlmi_zoo.model_cards.card import check_card, render_card, write_card

__all__ = ["check_card", "render_card", "write_card"]


def __getattr__(name: str) -> Any:
    # The card tooling pulls in evaluation and Jinja2; load it only when a card is written or checked.
    if name in __all__:
        from mlmi_zoo.model_cards import card

        return getattr(card, name)
    raise AttributeError(f"module 'mlmi_zoo.model_cards' has no attribute {name!r}")
