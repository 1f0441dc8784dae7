"""Typed, frozen explanation objects returned by ``model.explain``.

Every family returns a subclass of :class:`Explanation`. Each tensor field documents its shape.
Decomposable explanations implement :meth:`Explanation.logits_from_contributions`, so that
transparency — the decision is an exact sum of named terms — is checked, not claimed.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from mlmi_zoo._weights import write_text_atomic
from mlmi_zoo.specs import Measurement

__all__ = ["Explanation", "Measurement", "png_data_uri", "image_to_png", "html_table"]


@dataclass(frozen=True, kw_only=True)
class Explanation:
    """Base explanation: what every family returns.

    Attributes:
        logits: (B, C) the model's output, identical to ``model(x)``.
        label_names: the C class names.
        measurements: physical quantities, name -> :class:`Measurement` with a (B,) value.
        inputs: (B, C_in, *spatial) the network input that was explained, kept for rendering;
            ``None`` for feature-bag models.
    """

    family: ClassVar[str] = "base"
    decomposable: ClassVar[bool] = False

    logits: torch.Tensor  # (B, C)
    label_names: tuple[str, ...] = ()
    measurements: dict[str, Measurement] = field(default_factory=dict)
    inputs: torch.Tensor | None = None  # (B, C_in, *spatial)

    @property
    def batch_size(self) -> int:
        return int(self.logits.shape[0])

    def probabilities(self) -> torch.Tensor:
        """(B, C) softmax of the logits."""
        return self.logits.softmax(-1)

    def predicted(self) -> torch.Tensor:
        """(B,) index of the predicted class."""
        return self.logits.argmax(-1)

    def logits_from_contributions(self) -> torch.Tensor:
        """(B, C) the logits rebuilt as bias + sum of contributions.

        Raises:
            NotImplementedError: for explanations that are not exact decompositions.
        """
        raise NotImplementedError(f"{type(self).__name__} is not an exact decomposition of the logits")

    def decomposition_error(self) -> float:
        """max |sum(contributions) + bias - logits| over the batch, or NaN if not decomposable."""
        if not self.decomposable:
            return math.nan
        rebuilt = self.logits_from_contributions().detach().double()  # (B, C)
        logits = self.logits.detach().double()  # (B, C)
        if rebuilt.shape != logits.shape:
            raise ValueError(
                f"logits_from_contributions() returned shape {tuple(rebuilt.shape)}, expected the logits' "
                f"shape {tuple(logits.shape)}; fix the explanation class"
            )
        return float((rebuilt - logits).abs().max())

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict of every field (tensors become nested lists)."""

        def convert(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return v.detach().cpu().tolist()
            if isinstance(v, Measurement):
                return v.to_dict()
            if dataclasses.is_dataclass(v) and not isinstance(v, type):
                return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
            if isinstance(v, dict):
                return {str(k): convert(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [convert(x) for x in v]
            if isinstance(v, float) and not math.isfinite(v):
                return str(v)
            return v

        out = {f.name: convert(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out["family"] = self.family
        return out

    # -- rendering --------------------------------------------------------------------------------
    def html_sections(self, i: int) -> list[tuple[str, str]]:
        """(title, HTML) sections describing case ``i``; families add their own."""
        probs = self.probabilities()[i]
        names = self.label_names or tuple(str(c) for c in range(probs.numel()))
        rows = [(n, f"{float(self.logits[i, c]):+.3f}", f"{float(probs[c]):.3f}") for c, n in enumerate(names)]
        sections = [("Decision", html_table(("class", "logit", "probability"), rows))]
        if self.inputs is not None and self.inputs.ndim >= 4:
            sections.insert(0, ("Input", f'<img src="{png_data_uri(image_to_png(self.inputs[i]))}" width="256">'))
        if self.measurements:
            rows = [(m.name, f"{_item(m.value, i):.3f}", m.unit) for m in self.measurements.values()]
            sections.append(("Measurements", html_table(("quantity", "value", "unit"), rows)))
        return sections

    def save_html(self, path: str | Path, index: int | None = None, title: str | None = None) -> Path:
        """Write a self-contained HTML page (images embedded) explaining case ``index`` (all if None)."""
        cases = range(self.batch_size) if index is None else [index]
        body = []
        for i in cases:
            body.append(f"<h2>Case {i}</h2>")
            for heading, content in self.html_sections(i):
                body.append(f"<h3>{html.escape(heading)}</h3>\n{content}")
        page = render_page(title or f"{type(self).__name__}", "\n".join(body))
        path = Path(path)
        write_text_atomic(path, page)
        return path


def _item(value: Any, i: int) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.reshape(-1)[i]) if value.numel() > 1 else float(value)
    return float(value)


PAGE_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
    "th{background:#f2f2f2}img{image-rendering:pixelated;margin:2px;border:1px solid #ddd}"
    ".gallery{display:flex;flex-wrap:wrap;gap:8px}.card{border:1px solid #ddd;padding:6px;font-size:90%}"
)


def render_page(title: str, body: str) -> str:
    """Wrap ``body`` in a minimal, self-contained HTML page."""
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{PAGE_STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n{body}\n"
        "<p><small>Research use only — not a medical device.</small></p></body></html>\n"
    )


def html_table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    """A small HTML table with escaped cells."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _to_display(image: torch.Tensor) -> Any:
    """(C, *spatial) -> (H, W) or (H, W, 3) numpy in [0, 1]; 3D volumes show their middle slice."""
    img = image.detach().float().cpu()
    if img.ndim == 4:  # (C, D, H, W): middle slice
        img = img[:, img.shape[1] // 2]
    img = img[0] if img.shape[0] == 1 else img[:3].permute(1, 2, 0)
    lo, hi = float(img.min()), float(img.max())
    return ((img - lo) / (hi - lo + 1e-8)).numpy()


def image_to_png(image: torch.Tensor, overlay: torch.Tensor | None = None, size: float = 2.5) -> bytes:
    """Render ``image`` (C, *spatial) — with an optional heat-map ``overlay`` (*spatial) — to PNG bytes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(size, size), dpi=80)
    disp = _to_display(image)
    ax.imshow(disp, cmap="gray" if disp.ndim == 2 else None, interpolation="nearest")
    if overlay is not None:
        ov = overlay.detach().float().cpu()
        if ov.ndim == 3:
            ov = ov[ov.shape[0] // 2]
        ax.imshow(ov.numpy(), cmap="jet", alpha=0.4, interpolation="bilinear")
    ax.axis("off")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", pad_inches=0.02)
    plt.close(fig)
    return buf.getvalue()


def png_data_uri(png: bytes) -> str:
    """Embed PNG bytes in a ``data:`` URI so pages stay self-contained."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
