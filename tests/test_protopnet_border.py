"""ProtoPNet options for lesion images: push onto lesion cells only, and padding that hides the crop border."""
from __future__ import annotations

import pytest
import torch

import mlmi_zoo
from mlmi_zoo.architectures.protopnet.push import push_prototypes


def _batches(n: int = 8, size: int = 32):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 1, size, size, generator=g)
    masks = torch.zeros(n, 1, size, size, dtype=torch.bool)
    for i in range(n):  # a 6x6 lesion at a different place in each image
        r, c = (3 * i) % 20 + 2, (5 * i) % 20 + 2
        masks[i, 0, r:r + 6, c:c + 6] = True
    labels = torch.arange(n) % 2
    return [{"image": images[:4], "mask": masks[:4], "label": labels[:4], "index": torch.arange(4)},
            {"image": images[4:], "mask": masks[4:], "label": labels[4:], "index": torch.arange(4, 8)}], masks


def _window_fractions(masks: torch.Tensor, latent: tuple[int, int], stride: int) -> torch.Tensor:
    """(N, L) share of the stride-wide window centred on pixel stride*i of each cell that is lesion."""
    n, _, h, w = masks.shape
    out = torch.zeros(n, latent[0], latent[1])
    half = stride // 2
    for i in range(latent[0]):
        for j in range(latent[1]):
            rows = [r for r in range(stride * i - half, stride * i + half) if 0 <= r < h]
            cols = [c for c in range(stride * j - half, stride * j + half) if 0 <= c < w]
            out[:, i, j] = masks[:, 0][:, rows][:, :, cols].float().sum((1, 2)) / stride**2
    return out.flatten(1)


def test_every_pushed_prototype_lies_on_a_lesion_cell() -> None:
    """Pushed cells' receptive-field windows are mostly lesion (or, where no cell's is, touch it)."""
    model = mlmi_zoo.create_model("protopnet_resnet8", img_size=(32, 32), prototypes_per_class=3, prototype_dim=16).eval()
    loader, masks = _batches()
    records = push_prototypes(model, loader, on_lesion=True)
    latent = tuple(records[0]["latent_shape"])
    fractions = _window_fractions(masks, latent, model.backbone.stride)  # (N, L)
    for rec in records:
        flat = rec["location"][0] * latent[1] + rec["location"][1] if isinstance(rec["location"], (list, tuple)) else rec["location"]
        f = fractions[rec["index"]]
        ok = f[flat] >= 0.5 if (f >= 0.5).any() else f[flat] > 0
        assert ok, f"prototype {rec['prototype']} was pushed off the lesion (window fraction {float(f[flat]):.2f})"
    assert any(fractions[r["index"], r["location"][0] * latent[1] + r["location"][1]] >= 0.5 for r in records)


def test_foreground_push_stays_inside_the_foreground_and_off_the_border() -> None:
    """A fundus-like disc of tissue in a black surround: no prototype lands outside it or on the grid edge."""
    model = mlmi_zoo.create_model("protopnet_resnet8", img_size=(64, 64), prototypes_per_class=3, prototype_dim=16,
                                  feature_stride=4).eval()
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    disc = (yy - 31.5) ** 2 + (xx - 40) ** 2 < 24 ** 2  # off-centre, so the right border cells touch it
    images = torch.rand(8, 1, 64, 64, generator=g) * disc
    batch = {"image": images, "fov": disc.expand(8, 64, 64), "label": torch.arange(8) % 2, "index": torch.arange(8)}
    free = push_prototypes(model, [batch])
    records = push_prototypes(model, [batch], foreground="fov")
    latent = tuple(records[0]["latent_shape"])
    fraction = model.backbone.cell_fraction(disc[None, None].float(), latent)[0, 0]  # (h, w)
    for rec in records:
        i, j = rec["location"]
        assert 0 < i < latent[0] - 1 and 0 < j < latent[1] - 1, rec["location"]
        assert fraction[i, j] >= 0.5, (rec["location"], float(fraction[i, j]))
    # without the option the same prototypes may go anywhere: the option is what keeps them inside
    assert any(fraction[tuple(r["location"])] < 0.5 or 0 in r["location"] or latent[0] - 1 in r["location"]
               or latent[1] - 1 in r["location"] for r in free)


def test_foreground_push_names_a_missing_key() -> None:
    model = mlmi_zoo.create_model("protopnet_resnet8", img_size=(32, 32), prototypes_per_class=1, prototype_dim=16).eval()
    loader, _ = _batches()
    with pytest.raises(ValueError, match="'fov'"):
        push_prototypes(model, loader, foreground="fov")


def test_on_lesion_push_needs_masks() -> None:
    model = mlmi_zoo.create_model("protopnet_resnet8", img_size=(32, 32), prototypes_per_class=1, prototype_dim=16).eval()
    loader, _ = _batches()
    for batch in loader:
        del batch["mask"]
    with pytest.raises(ValueError, match="lesion masks"):
        push_prototypes(model, loader, on_lesion=True)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_reflect_padding_leaves_no_border_in_the_latent(spatial_dims: int) -> None:
    size = (32,) * spatial_dims
    flat = torch.full((1, 1, *size), 0.3)

    def border_signal(mode: str) -> float:
        model = mlmi_zoo.create_model("protopnet_resnet8", spatial_dims=spatial_dims, img_size=size,
                                      padding_mode=mode).eval()
        with torch.no_grad():
            z = model.latent(flat)  # (1, D, *latent)
        return float((z - z.mean(dim=tuple(range(2, z.ndim)), keepdim=True)).abs().max())

    assert border_signal("reflect") < 1e-5  # a uniform image gives a uniform latent grid
    assert border_signal("zeros") > 1e-4  # zero padding marks the crop border


def test_push_builds_no_autograd_graph() -> None:
    """Memory stays flat in N only if no batch's activations are kept alive through a graph."""
    model = mlmi_zoo.create_model("protopnet_resnet8", img_size=(32, 32), prototypes_per_class=1, prototype_dim=16).eval()
    modes: list[bool] = []
    model.backbone.register_forward_hook(lambda module, args, out: modes.append(torch.is_grad_enabled()))
    loader, _ = _batches()
    with torch.enable_grad():
        push_prototypes(model, loader, on_lesion=True)
    assert modes and not any(modes)
