"""ProtoPNet and the concept bottleneck against the same timm backbone alone, on matched work.

    python bench/bench_image_peers.py [--device cuda] [--repeats 5] [--batch 8] [--size 224]

The peer is what a user would otherwise run: timm's ``tf_efficientnet_lite0`` cut at the same
stride (``features_only=True``, the same stages; what the zoo's ``create_backbone`` wraps), in eval
mode, on the same batch. The candidates are the zoo's models on that backbone (built from their
config classes; random weights: speed does not depend on them). Rows, each "candidate / backbone
alone" wall time, what is matched in ``matched``:

* ``protopnet_forward_vs_timm_backbone`` — ProtoPNet's logits: the backbone, the add-on, prototype
  distances, the last layer (target <= 1.3: the head is small next to the backbone);
* ``protopnet_explain_vs_timm_backbone`` — everything a report needs (similarity maps upsampled to
  the input, contributions) (target <= 1.6);
* ``cbm_forward_vs_timm_backbone`` / ``cbm_explain_vs_timm_backbone`` — the same for the concept
  bottleneck (concept maps, attention, the label head) (targets <= 1.3 / <= 1.6);
* ``protopnet_push_per_image_vs_timm_backbone`` — the prototype push (projection onto the nearest
  training patch of each prototype) per image, against the backbone's forward of the same images
  (target <= 1.5: push is one forward pass plus a running minimum).
"""
from __future__ import annotations

import argparse
from typing import Any

import torch

from _common import add_common_args, compare, guarded, ratio_row, setup

BACKBONE = "tf_efficientnet_lite0"
STRIDE = 16


def _models(size: int, device: str) -> tuple[torch.nn.Module, Any, Any]:
    import timm

    from mlmi_zoo.architectures.cbm.model import CBM
    from mlmi_zoo.architectures.protopnet import ProtoPNet
    from mlmi_zoo.registry import build_config

    overrides = {"img_size": (size, size), "in_channels": 3, "feature_stride": STRIDE}
    protopnet = ProtoPNet(build_config(ProtoPNet.config_class, BACKBONE, overrides)).eval().to(device)
    cbm = CBM(build_config(CBM.config_class, BACKBONE, overrides)).eval().to(device)
    # the stages timm runs up to stride 16 (out_indices 3: reductions 2, 4, 8, 16)
    alone = timm.create_model(BACKBONE, features_only=True, out_indices=(3,), pretrained=False).eval().to(device)
    return alone, protopnet, cbm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--batch", type=int, default=8, help="images per batch (default: 8)")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels (default: 224)")
    args = parser.parse_args()
    device = setup(args)
    alone, protopnet, cbm = _models(args.size, device)
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)
    matched = f"{BACKBONE} cut at stride {STRIDE}, batch {args.batch} of {args.size}x{args.size}x3, eval, no autograd"

    def row(name: str, candidate: Any, target: float) -> dict[str, Any]:
        with torch.no_grad():
            base, cand = compare(lambda: alone(x), candidate, repeats=args.repeats, device=device)
        return ratio_row(name, base, cand, target, "<=", device, unit="candidate / timm backbone alone", matched=matched)

    guarded("protopnet_forward_vs_timm_backbone", 1.3, "<=", device,
            lambda: row("protopnet_forward_vs_timm_backbone", lambda: protopnet(x), 1.3))
    guarded("protopnet_explain_vs_timm_backbone", 1.6, "<=", device,
            lambda: row("protopnet_explain_vs_timm_backbone", lambda: protopnet.explain(x), 1.6))
    guarded("cbm_forward_vs_timm_backbone", 1.3, "<=", device, lambda: row("cbm_forward_vs_timm_backbone", lambda: cbm(x), 1.3))
    guarded("cbm_explain_vs_timm_backbone", 1.6, "<=", device,
            lambda: row("cbm_explain_vs_timm_backbone", lambda: cbm.explain(x), 1.6))

    def push() -> None:
        from mlmi_zoo.architectures.protopnet.push import prototype_topk_patches

        batches = [{"image": x.cpu(), "label": torch.zeros(args.batch, dtype=torch.long),
                    "index": torch.arange(args.batch)}]
        prototype_topk_patches(protopnet, iter(batches), k=1)

    guarded("protopnet_push_per_image_vs_timm_backbone", 1.5, "<=", device,
            lambda: row("protopnet_push_per_image_vs_timm_backbone", push, 1.5))


if __name__ == "__main__":
    main()
