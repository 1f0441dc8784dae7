"""Cost of an explanation: ``model.explain`` vs ``model.forward`` of the same model; one JSON line per row.

    python bench/bench_explain.py [--device cuda] [--repeats 5]

Rows ``explain_overhead_<model>``, value = explain time / forward time (eval mode, no autograd),
target <= 1.5:

- ``protopnet_resnet8`` and ``cbm_resnet8`` on a batch of 64 images of 64x64 (one channel);
- ``additive_mil_features`` and ``abmil_features`` on one bag of 10,000 instances with D = 512.

``explain`` returns everything a report needs (maps upsampled to the input size, contributions,
measurements with units); ``forward`` returns logits only.
"""
from __future__ import annotations

import argparse
from typing import Any

import torch

from _common import add_common_args, setup, compare, guarded, ratio_row

IMAGE_MODELS = ("protopnet_resnet8", "cbm_resnet8")
BAG_MODELS = ("additive_mil_features", "abmil_features")


def bench_model(name: str, batch: int, bag_size: int, dim: int, repeats: int, device: str) -> dict[str, Any]:
    from mlmi_zoo import create_model

    if name in BAG_MODELS:
        model = create_model(name, in_features=dim).eval().to(device)
        x = torch.randn(1, bag_size, dim, device=device)  # (B, N, D)
        shape = {"bag_size": bag_size, "feature_dim": dim}
    else:
        model = create_model(name, in_channels=1, img_size=(64, 64)).eval().to(device)
        x = torch.rand(batch, 1, 64, 64, device=device)  # (B, 1, H, W)
        shape = {"batch": batch, "input": [64, 64]}
    with torch.no_grad():
        tf, te = compare(lambda: model(x), lambda: model.explain(x), repeats=repeats, device=device)
    return ratio_row(f"explain_overhead_{name}", tf, te, 1.5, "<=", device, unit="explain/forward time", **shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--batch", type=int, default=64, help="images per batch (default: 64)")
    parser.add_argument("--bag-size", type=int, default=10_000, help="instances per bag (default: 10000)")
    parser.add_argument("--dim", type=int, default=512, help="feature width D (default: 512)")
    args = parser.parse_args()
    device = setup(args)
    for name in IMAGE_MODELS + BAG_MODELS:
        guarded(f"explain_overhead_{name}", 1.5, "<=", device,
                lambda name=name: bench_model(name, args.batch, args.bag_size, args.dim, args.repeats, device))


if __name__ == "__main__":
    main()
