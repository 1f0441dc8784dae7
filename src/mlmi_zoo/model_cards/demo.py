"""``mlmi-zoo demo``: explain bundled sample cases with every bundled model, offline, in one HTML page.

Each bundled model folder may hold ``samples/*.safetensors``: a few cases saved at release time
(phantom cases, and real images whose licence allows redistribution), with raw intensities, spacing
and, for bags, features and coordinates. The demo loads each model, explains its samples and writes
``index.html`` with the image, the localisation overlay, the top prototypes / concept table /
attention heat-map (each family renders its own sections), the measurements with units, and a link
to each model's card.
"""
from __future__ import annotations

import html
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from mlmi_zoo.cli import _Parser
from mlmi_zoo.explanations import png_data_uri, render_page

log = logging.getLogger(__name__)

__all__ = ["run_demo", "load_samples", "save_samples", "main"]


def save_samples(folder: str | Path, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Store one sample case (raw tensors + JSON metadata) under ``folder/samples/name.safetensors``.

    An 8-bit image (every value a multiple of 1/255 in [0, 1], as a photograph's) is stored as the
    bytes of a lossless PNG and restored exactly by :func:`load_samples`: a 640-px RGB photograph takes
    about 0.4 MB instead of 3.3 MB as float32 (0.8 MB as raw bytes). safetensors holds tensors only, and
    a PNG is the standard lossless image compression, hence the encoded bytes in a uint8 tensor.
    """
    from mlmi_zoo._weights import save_weights

    tensors, meta = dict(tensors), dict(meta)
    image = tensors.get("image")
    if image is not None and image.is_floating_point():
        levels = (image.double() * 255).round()
        # kept only where the bytes give back exactly the same float32 tensor
        if bool(((levels >= 0) & (levels <= 255)).all()) and torch.equal(levels.to(torch.uint8).float() / 255.0, image):
            tensors["image"] = levels.to(torch.uint8)
            meta["image_scale"] = "1/255"
            if image.ndim == 3 and image.shape[0] in (1, 3):
                tensors["image"] = _png_bytes(tensors["image"])
                meta["image_encoding"] = f"png {list(image.shape)}"
    path = Path(folder) / "samples" / f"{name}.safetensors"
    save_weights(tensors, path, metadata={"meta": json.dumps(meta, sort_keys=True)})
    return path


def load_samples(folder: str | Path) -> list[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """Read every sample case bundled with a model folder."""
    from safetensors import safe_open

    from mlmi_zoo._weights import check_weights_file

    out = []
    for path in sorted((Path(folder) / "samples").glob("*.safetensors")):
        check_weights_file(path, expected_sha256=None)
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        encoding = meta.pop("image_encoding", None)
        if encoding is not None:  # PNG bytes written by save_samples
            tensors["image"] = _png_image(tensors["image"], encoding)
        if meta.pop("image_scale", None) == "1/255":  # stored as uint8 by save_samples
            tensors["image"] = tensors["image"].float() / 255.0
        meta.setdefault("name", path.stem)
        out.append((tensors, meta))
    return out


def _png_bytes(image: torch.Tensor) -> torch.Tensor:
    """(C, H, W) uint8, C = 1 or 3 -> the bytes of a lossless PNG as a 1-D uint8 tensor."""
    import io

    import numpy as np
    from PIL import Image

    array = image.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, format="PNG", optimize=True)
    return torch.from_numpy(np.frombuffer(buf.getvalue(), dtype=np.uint8).copy())


def _png_image(data: torch.Tensor, encoding: str) -> torch.Tensor:
    """The (C, H, W) uint8 image of :func:`_png_bytes`; ``encoding`` is ``"png [C, H, W]"``."""
    import io

    import numpy as np
    from PIL import Image

    kind, _, shape_text = encoding.partition(" ")
    if kind != "png":
        raise ValueError(f"unknown sample image encoding {encoding!r}")
    array = np.asarray(Image.open(io.BytesIO(data.numpy().tobytes())))
    image = torch.from_numpy(array.copy()).reshape(array.shape[0], array.shape[1], -1).permute(2, 0, 1).contiguous()
    if list(image.shape) != json.loads(shape_text):
        raise ValueError(f"the sample's PNG holds a {list(image.shape)} image, its record says {shape_text}")
    return image


def explain_sample(model: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Run ``model.explain`` on one stored sample (adds the batch axis, applies the intensity transform)."""
    if "feats" in tensors:
        feats = tensors["feats"].float().unsqueeze(0)  # (1, N, D)
        coords = tensors["coords"].unsqueeze(0) if "coords" in tensors else None
        return model.explain(feats, coords=coords)
    x = model.input_spec.intensity(tensors["image"].float().unsqueeze(0))  # (1, C, *spatial)
    kwargs = {"spacing": tensors["spacing"].double().tolist()} if "spacing" in tensors and model.config.spacing else {}
    return model.explain(x, **kwargs)


def _tile_map_png(model: Any, exp: Any, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    """A bag's instance scores painted over its photograph, one square per tile (PNG bytes)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from mlmi_zoo.architectures.mil.explanations import percentile_normalise
    from mlmi_zoo.families import family_of

    kind = "contributions" if family_of(model).instance_scores == "contributions" else "attention"
    scores = exp.instance_scores(0, kind).detach().double().cpu().numpy()
    image = tensors["image"].float().permute(1, 2, 0).numpy()
    image = image[..., 0] if image.shape[-1] == 1 else image  # a grey film
    t = int(meta.get("tile_px_on_image", 1))
    canvas = np.full(image.shape[:2], np.nan)
    for (r, c), v in zip(tensors["coords"].tolist(), scores):
        canvas[r * t:(r + 1) * t, c * t:(c + 1) * t] = v
    # the normalisation of the card's heat maps; tiles near zero are left clear so the photograph shows
    canvas = percentile_normalise(canvas, signed=kind == "contributions")
    canvas[np.abs(canvas) < 0.2] = np.nan
    fig, ax = plt.subplots(figsize=(6, 6 * image.shape[0] / image.shape[1]))
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
    shown = ax.imshow(canvas, alpha=0.6, cmap="coolwarm" if kind == "contributions" else "magma",
                      vmin=-1.0 if kind == "contributions" else 0.0, vmax=1.0)
    fig.colorbar(shown, ax=ax, fraction=0.03, label=f"normalised {kind} (|value| < 0.2 not drawn)")
    _draw_predicted_circle(ax, model, exp, tensors, t)
    ax.set_axis_off()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", pad_inches=0.02)
    plt.close(fig)
    return buf.getvalue()


def _draw_predicted_circle(ax: Any, model: Any, exp: Any, tensors: dict[str, torch.Tensor], tile_px: int) -> None:
    """For a bag model that states a lesion's radius (``config.equivalent_radii``) on a photograph whose pixel
    size is known: the predicted circle (dashed cyan) at the area-weighted centre of the tiles its area came
    from, beside the annotated finding's outline (green), with both sizes in the title."""
    from matplotlib.patches import Circle

    radii = getattr(model.config, "equivalent_radii", ())
    spacing, mask = tensors.get("spacing"), tensors.get("mask")
    if not radii or spacing is None:
        return
    radius_name, area_name = radii[0]
    radius_mm = float(exp.measurements[radius_name].value[0])
    valid = exp.mask[0]
    weights = exp.instance_measurements[area_name][0][valid].double()
    centres = (tensors["coords"].double()[valid] + 0.5) * tile_px  # (n, 2) row, col of each tile centre
    label = radius_name.removesuffix("_mm").replace("_", " ")
    title = f"predicted {label}: {radius_mm:.1f} mm"
    if float(weights.sum()) > 0:
        row, col = (weights[:, None] * centres).sum(0) / weights.sum()
        ax.add_patch(Circle((float(col), float(row)), radius_mm / float(spacing[0]), fill=False, color="cyan",
                            linewidth=1.5, linestyle="--"))
    if mask is not None and bool(mask.any()):
        ax.contour(mask.reshape(-1, *mask.shape[-2:]).any(0).float().numpy(), levels=[0.5], colors="lime",
                   linewidths=1.2)
        title += " (dashed cyan); the annotation in green"
    ax.set_title(title, fontsize=9)


def _truth_png(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes | None:
    """The sample's annotated finding (its ``mask``: a radiologist's circle, a specialist's outline) drawn as
    an outline over the image, with the annotated size in its unit (PNG bytes); None without a finding."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mask, image = tensors.get("mask"), tensors.get("image")
    if mask is None or image is None or image.ndim != 3 or not bool(mask.any()):
        return None
    picture = image.float()
    picture = picture[0] if picture.shape[0] == 1 else picture.permute(1, 2, 0)
    outline = mask.reshape(-1, *mask.shape[-2:]).any(0).float().numpy()
    fig, ax = plt.subplots(figsize=(4.5, 4.5 * picture.shape[0] / picture.shape[1]))
    ax.imshow(picture.numpy(), cmap="gray" if picture.ndim == 2 else None)
    ax.contour(outline, levels=[0.5], colors="lime", linewidths=1.2)
    sizes = []
    for key, value in meta.items():  # "true diameter_mm": 13.2 -> "diameter 13.2 mm"
        if key.startswith("true ") and isinstance(value, (int, float)) and value == value:
            name, _, unit = key[len("true "):].rpartition("_")
            sizes.append(f"{name or unit} {value:g}{' ' + unit if name else ''}")
    ax.set_title("annotated finding" + (f" ({', '.join(sizes)})" if sizes else ""), fontsize=9)
    ax.set_axis_off()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", pad_inches=0.02)
    plt.close(fig)
    return buf.getvalue()


def run_demo(out_dir: str | Path, names: Sequence[str] | None = None) -> Path:
    """Explain the bundled samples of each bundled model and write ``out_dir/index.html``."""
    import mlmi_zoo
    from mlmi_zoo.registry import bundled_dir

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(names) if names else mlmi_zoo.list_models(pretrained=True)
    if not names:
        raise FileNotFoundError(f"no bundled models found in {bundled_dir()}")
    start = time.perf_counter()
    parts, toc = [], []
    for name in names:
        folder = bundled_dir() / name
        model = mlmi_zoo.load(name)
        samples = load_samples(folder)
        card = (folder / "README.md").resolve()
        anchor = name.replace(".", "-")
        toc.append(f'<li><a href="#{anchor}">{html.escape(name)}</a> — {len(samples)} case(s)</li>')
        parts.append(f'<h2 id="{anchor}">{html.escape(name)}</h2>'
                     f'<p>{html.escape(type(model).__name__)} · <a href="{card.as_uri()}">model card</a></p>')
        gallery = folder / "figures" / "prototype_gallery.png"
        if gallery.is_file():  # every prototype as the real training patch it was pushed onto
            parts.append("<h4>Prototypes: the training patches they are (after push)</h4>"
                         f'<img src="{png_data_uri(gallery.read_bytes())}" style="max-width:100%">')
        if not samples:
            parts.append("<p>No sample cases are bundled with this model.</p>")
        for tensors, meta in samples:
            exp = explain_sample(model, tensors)
            truth = ", ".join(f"{k}: {v}" for k, v in meta.items() if k not in ("name",))
            parts.append(f"<h3>{html.escape(meta['name'])}</h3><p><small>{html.escape(truth)}</small></p>")
            truth = _truth_png(tensors, meta)
            if truth is not None:  # where the reader (radiologist, retina specialist) marked the finding
                parts.append("<h4>The annotation (green outline)</h4>"
                             f'<img src="{png_data_uri(truth)}" style="max-width:100%">')
            for title, content in exp.html_sections(0):
                parts.append(f"<h4>{html.escape(title)}</h4>\n{content}")
            if "feats" in tensors and "image" in tensors and "coords" in tensors:  # the bag's tiles on its photograph
                parts.append("<h4>Tile map on the photograph</h4>"
                             f'<img src="{png_data_uri(_tile_map_png(model, exp, tensors, meta))}" style="max-width:100%">')
        log.info("explained %s (%d cases)", name, len(samples))
    elapsed = time.perf_counter() - start
    body = (f"<p>{len(names)} bundled model(s), explained offline in {elapsed:.1f} s.</p><ul>{''.join(toc)}</ul>"
            + "\n".join(parts))
    path = out_dir / "index.html"
    path.write_text(render_page("mlmi-zoo demo", body), encoding="utf-8")
    return path


def main(argv: Sequence[str]) -> int:
    """``mlmi-zoo demo [--out DIR] [--models NAME ...]``."""
    p = _Parser(prog="mlmi-zoo demo", description="Explain bundled sample cases with the bundled models (offline).")
    p.add_argument("--out", type=Path, default=Path("mlmi_zoo_demo"), help="output folder (default: ./mlmi_zoo_demo)")
    p.add_argument("--models", nargs="*", help="bundled model names (default: all)")
    args = p.parse_args(list(argv[1:]) if argv and argv[0] == "demo" else list(argv))
    path = run_demo(args.out, args.models)
    print(f"open {path.resolve().as_uri()}")
    return 0
