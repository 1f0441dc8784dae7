"""Bundled model folders (one per published model: card, config, weights, figures) and card tooling."""
from mlmi_zoo.model_cards.card import check_card, render_card, write_card

__all__ = ["check_card", "render_card", "write_card"]
