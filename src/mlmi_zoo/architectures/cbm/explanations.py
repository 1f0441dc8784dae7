"""What a concept bottleneck model's ``explain`` returns: :class:`ConceptExplanation` and its HTML report.

The explanation of a Concept Bottleneck Model (Koh, Nguyen, Tang, Mussmann, Pierson, Kim and Liang,
ICML 2020; :mod:`.model`): the concepts in their units, the bottleneck vector the label head saw,
each concept's spatial map, and, with a linear label head, the label as an exact sum of
``weight x concept`` terms. :class:`MLPConceptExplanation` is the same record for an MLP label head,
which has no such decomposition.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mlmi_zoo.explanations import Explanation, html_table, image_to_png, png_data_uri
from mlmi_zoo.specs import ConceptSpec, Measurement

__all__ = ["ConceptExplanation", "MLPConceptExplanation"]


@dataclass(frozen=True, kw_only=True)
class ConceptExplanation(Explanation):
    """What a concept bottleneck model decided, from which concepts, and where it saw them.

    ``contributions.sum(-1) + bias == logits`` exactly (linear head).

    Attributes:
        concepts: name -> (B,) probability (binary), (B, L) level probabilities (ordinal /
            categorical), or :class:`Measurement` with a (B,) value in the concept's unit
            (continuous; lengths are left out when no spacing is known).
        concept_vector: (B, K) what the label head saw: probabilities, level probabilities,
            standardised pixel-domain values.
        concept_logits: (B, K) pooled raw concept-head outputs (the mean of each latent map).
        concept_maps: (B, K, *spatial) latent concept maps (with attention pooling, the
            attention-weighted terms ``N a_p m_k(p)`` of the non-continuous units) upsampled to
            the input size.
        concept_names: the K bottleneck unit names (``"texture=solid"``).
        concept_specs: the concepts (Kc of them).
        contributions: (B, C, K) weight x concept_vector per class and unit.
        bias: (C,) label-head bias.
        intervened: (B, Kc) which concepts were fixed by an intervention.
        attention: (B, 1, *spatial) the shared spatial attention (sums to 1 over the latent grid)
            upsampled to the input size, or ``None`` with mean pooling.
    """

    family = "cbm"
    decomposable = True

    concepts: dict[str, Any]
    concept_vector: torch.Tensor  # (B, K)
    concept_logits: torch.Tensor  # (B, K)
    concept_maps: torch.Tensor  # (B, K, *spatial)
    concept_names: tuple[str, ...]
    concept_specs: tuple[ConceptSpec, ...]
    contributions: torch.Tensor | None  # (B, C, K); None for the mlp head
    bias: torch.Tensor | None  # (C,); None for the mlp head
    intervened: torch.Tensor  # (B, Kc) bool
    attention: torch.Tensor | None = None  # (B, 1, *spatial); None with mean pooling

    def logits_from_contributions(self) -> torch.Tensor:
        """(B, C) bias + sum of concept contributions."""
        assert self.contributions is not None and self.bias is not None  # a linear head sets both (MLP: the subclass)
        return self.contributions.sum(-1) + self.bias

    def concept_contributions(self, i: int, c: int) -> dict[str, float]:
        """Concept name -> its contribution (summed over its units) to class ``c`` of case ``i``.

        Raises:
            TypeError: for an MLP head's explanation, which has no contributions.
        """
        if self.contributions is None:
            raise TypeError(f"{type(self).__name__} has no concept contributions (an MLP head); use head='linear'")
        out, start = {}, 0
        for s in self.concept_specs:
            out[s.name] = float(self.contributions[i, c, start:start + s.width].sum())
            start += s.width
        return out

    def _value_text(self, spec: ConceptSpec, i: int) -> str:
        v = self.concepts.get(spec.name)
        if v is None:
            return "n/a (no spacing given)"
        if isinstance(v, Measurement):
            return f"{float(v.value[i]):.3g} {v.unit}"
        if spec.kind == "binary":
            return f"p = {float(v[i]):.3f}"
        level = int(v[i].argmax())
        assert spec.levels is not None  # ConceptSpec requires levels for ordinal and categorical concepts
        return f"{spec.levels[level]} (p = {float(v[i, level]):.3f})"

    def html_sections(self, i: int) -> list[tuple[str, str]]:
        sections = super().html_sections(i)
        c = int(self.logits[i].argmax())
        contrib = self.concept_contributions(i, c) if self.decomposable else {}
        rows = []
        for j, s in enumerate(self.concept_specs):
            rows.append((s.name + (" (set)" if bool(self.intervened[i, j]) else ""), self._value_text(s, i),
                         f"{contrib[s.name]:+.3f}" if contrib else "n/a (mlp head)"))
        label = self.label_names[c] if self.label_names else str(c)
        sections.append((f"Concepts (contribution to '{label}')",
                         html_table(("concept", "value", f"contribution to {label}"), rows)))
        if self.inputs is not None and self.inputs.ndim >= 4:
            if self.decomposable:
                assert self.contributions is not None  # a decomposable (linear-head) explanation carries them
                units = self.contributions[i, c].abs().argsort(descending=True)[:3].tolist()
            else:
                units = list(range(min(3, len(self.concept_names))))
            imgs = []
            for u in units:
                uri = png_data_uri(image_to_png(self.inputs[i], self.concept_maps[i, u]))
                imgs.append(f'<div class="card"><img src="{uri}" width="192"><br>{self.concept_names[u]}</div>')
            if self.attention is not None:
                uri = png_data_uri(image_to_png(self.inputs[i], self.attention[i, 0]))
                imgs.append(f'<div class="card"><img src="{uri}" width="192"><br>attention (where concepts are read)</div>')
            sections.append(("Concept maps", '<div class="gallery">' + "".join(imgs) + "</div>"))
        return sections


@dataclass(frozen=True, kw_only=True)
class MLPConceptExplanation(ConceptExplanation):
    """Explanation of a CBM with an MLP label head: concepts and maps, but no exact decomposition
    (``contributions`` and ``bias`` are None)."""

    decomposable = False

    def logits_from_contributions(self) -> torch.Tensor:
        raise NotImplementedError("an MLP concept->label head is not an exact sum of concept contributions; "
                                  "use head='linear' for a decomposable model")
