"""What a ProtoPNet explanation holds: similarities, contributions and maps, and its HTML report.

The decision of a prototype network (Chen et al., NeurIPS 2019) is an exact sum of prototype
similarity x last-layer weight; the explanation carries each term with the similarity map that
shows where the prototype matched.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mlmi_zoo.explanations import Explanation, html_table, image_to_png, png_data_uri

__all__ = ["PrototypeExplanation"]


@dataclass(frozen=True, kw_only=True)
class PrototypeExplanation(Explanation):
    """Why a ProtoPNet decided: similarity to each prototype times its last-layer weight.

    ``logits == bias + contributions.sum(-1)`` exactly (to float rounding); the bias is zero.

    Attributes:
        similarities: (B, P) each prototype's pooled similarity in the image: the best location's,
            or the mean of the ``pool_top_k`` best (before the switch-off mask).
        similarity_maps: (B, P, *latent) similarity at every latent location.
        localization: (B, P, *spatial) similarity maps upsampled (bi/trilinear) to the input size.
        contributions: (B, C, P) last-layer weight x similarity x enabled.
        bias: (C,) zeros — ProtoPNet's last layer has no bias; kept so every family decomposes alike.
        prototype_ids: (P,) prototype numbers.
        prototype_classes: (P,) class each prototype belongs to.
        enabled: (P,) False for switched-off prototypes.
        prototype_sources: each prototype's push record (see ``push_prototypes``), or None before
            push.
        measurement_map: (B, 1, *spatial) lesion fraction the physical head counted at each pixel
            (with ``count_head``), or None.
    """

    family = "protopnet"
    decomposable = True

    similarities: torch.Tensor  # (B, P)
    similarity_maps: torch.Tensor  # (B, P, *latent)
    localization: torch.Tensor  # (B, P, *spatial)
    contributions: torch.Tensor  # (B, C, P)
    bias: torch.Tensor  # (C,)
    prototype_ids: torch.Tensor  # (P,)
    prototype_classes: torch.Tensor  # (P,)
    enabled: torch.Tensor  # (P,) bool
    prototype_sources: list[dict[str, Any] | None] | None = None
    measurement_map: torch.Tensor | None = None  # (B, 1, *spatial)

    def logits_from_contributions(self) -> torch.Tensor:
        """(B, C) bias + sum of prototype contributions."""
        return self.bias + self.contributions.sum(-1)

    def top_prototypes(self, i: int, k: int = 5, target: int | None = None) -> list[int]:
        """Prototype ids with the largest |contribution| to ``target`` (default: predicted class) for case ``i``."""
        c = int(self.predicted()[i]) if target is None else target
        order = self.contributions[i, c].abs().argsort(descending=True)
        return [int(p) for p in order[:k]]

    def html_sections(self, i: int, k: int = 5) -> list[tuple[str, str]]:
        """Input, decision, the top prototype's localisation and the top-``k`` prototypes."""
        sections = super().html_sections(i)
        c = int(self.predicted()[i])
        names = self.label_names or tuple(str(n) for n in range(self.logits.shape[1]))
        top = self.top_prototypes(i, k)
        if self.inputs is not None and top:
            j = top[0]
            uri = png_data_uri(image_to_png(self.inputs[i], self.localization[i, j]))
            sections.append((f"Where prototype #{j} ({names[int(self.prototype_classes[j])]}) looks",
                             f'<img src="{uri}" width="256">'))
        rows = []
        gallery = []
        for j in top:
            rec = self.prototype_sources[j] if self.prototype_sources else None
            source = "not pushed" if rec is None else f"case {rec['index']}, cell {rec['location']}, box {rec['box_px']} px"
            rows.append((j, names[int(self.prototype_classes[j])], f"{float(self.similarities[i, j]):.3f}",
                         f"{float(self.contributions[i, c, j]):+.3f}", "yes" if bool(self.enabled[j]) else "off", source))
            path = None if rec is None else rec.get("render_path")
            if path and Path(path).is_file():
                uri = png_data_uri(Path(path).read_bytes())
                gallery.append(f'<div class="card"><img src="{uri}" height="140"><br>prototype #{j}: '
                               f'{html.escape(source)}</div>')
        table = html_table(("prototype", "class", "similarity", f"contribution to {names[c]}", "enabled", "source"), rows)
        if gallery:
            table += '<div class="gallery">' + "".join(gallery) + "</div>"
        sections.append((f"Top {len(top)} prototypes for {names[c]}", table))
        if self.inputs is not None and self.measurement_map is not None and self.measurements:
            uri = png_data_uri(image_to_png(self.inputs[i], self.measurement_map[i, 0]))
            sizes = ", ".join(f"{m.name} {float(m.value[i]):.2f} {m.unit}" for m in self.measurements.values())
            sections.append(("What the measurement counted",
                             f'<img src="{uri}" width="256"><p>lesion fraction per tile; {html.escape(sizes)}</p>'))
        return sections


