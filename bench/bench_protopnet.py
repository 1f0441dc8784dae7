"""ProtoPNet speed and memory against what it replaces; prints one JSON line per row.

    python bench/bench_protopnet.py [--device cuda] [--repeats 5]

Rows:

- ``protopnet_forward_2d_64`` / ``protopnet_forward_3d_32``: ``protopnet_resnet8`` forward vs the
  black-box ``baseline_resnet8`` with the same backbone, ``feature_stride`` and ``in_channels``,
  batch 64, eval mode, no autograd; value = time ratio, target <= 1.15.
- ``protopnet_push_time``: ``push_prototypes`` over N training images vs one plain inference pass
  (intensity transform + ``model(x)``) over the same in-memory batches; target <= 1.3.
- ``protopnet_push_memory_flat``: peak memory of push over 4N images / over N images, each in a fresh
  subprocess whose batches are generated on the fly (so data do not grow with N); target <= 1.1.
- ``protopnet_last_layer_speedup``: the last-layer stage as the trainer would run it by gradient
  descent (``ProtoPNetTraining.loss(..., "last_layer")``, backbone re-run every batch, for E epochs)
  vs ``fit_last_layer`` (one pass to cache similarities, then E epochs on the cache), E =
  ``ProtoPNetTraining.last_layer_epochs``; value = speed-up, target >= 10.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Iterator

import torch

from _common import (MemoryProbe, add_common_args, compare, guarded, machine, ratio_row, run_worker, setup,
                     time_fn, worker_result)


def _batch(i: int, batch: int, size: tuple[int, ...], device: str) -> dict[str, Any]:
    """Batch ``i`` of a deterministic synthetic training set: images in [0, 1], both classes present."""
    g = torch.Generator().manual_seed(1000 + i)
    image = torch.rand(batch, 1, *size, generator=g)  # (B, 1, *spatial)
    label = torch.arange(batch) % 2  # (B,)
    return {"image": image.to(device), "label": label.to(device), "index": torch.arange(i * batch, (i + 1) * batch)}


class _StreamedImages:
    """N images produced batch by batch on iteration, so the data never sit in memory at once."""

    def __init__(self, n: int, batch: int, size: tuple[int, ...], device: str) -> None:
        if n % batch:
            raise ValueError(f"n ({n}) must be a multiple of the batch size ({batch})")
        self.n, self.batch, self.size, self.device = n, batch, size, device

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(self.n // self.batch):
            yield _batch(i, self.batch, self.size, self.device)


def _models(dims: int, size: tuple[int, ...], device: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    from mlmi_zoo import create_model

    proto = create_model("protopnet_resnet8", spatial_dims=dims, img_size=size, in_channels=1)
    base = create_model("baseline_resnet8", spatial_dims=dims, img_size=size, in_channels=1,
                        feature_stride=proto.config.feature_stride)
    if base.backbone.stride != proto.backbone.stride or base.backbone.out_channels != proto.backbone.out_channels:
        raise ValueError("baseline and ProtoPNet backbones differ; the comparison would not be like for like")
    return base.eval().to(device), proto.eval().to(device)


def bench_forward(dims: int, side: int, batch: int, repeats: int, device: str) -> dict[str, Any]:
    size = (side,) * dims
    base, proto = _models(dims, size, device)
    x = torch.rand(batch, 1, *size, device=device)  # (B, 1, *spatial)
    with torch.no_grad():
        tb, tc = compare(lambda: base(x), lambda: proto(x), repeats=repeats, device=device)
    return ratio_row(f"protopnet_forward_{dims}d_{side}", tb, tc, 1.15, "<=", device,
                     unit="protopnet/baseline forward time", batch=batch, input=list(size),
                     feature_stride=proto.config.feature_stride, num_prototypes=proto.num_prototypes)


def bench_push_time(n: int, batch: int, repeats: int, device: str) -> dict[str, Any]:
    from mlmi_zoo.architectures.protopnet.push import push_prototypes

    size = (64, 64)
    _, model = _models(2, size, device)
    batches = list(_StreamedImages(n, batch, size, device))

    def inference() -> None:
        with torch.no_grad():
            for b in batches:
                model(model.input_spec.intensity(b["image"]))

    tb, tc = compare(inference, lambda: push_prototypes(model, batches, device), repeats=repeats, device=device)
    return ratio_row("protopnet_push_time", tb, tc, 1.3, "<=", device, unit="push/inference time over N images",
                     n_images=n, batch=batch, input=list(size))


def bench_push_memory(n: int, batch: int, device: str) -> dict[str, Any]:
    common = ["--batch", str(batch), "--device", device, "--threads", str(torch.get_num_threads())]
    small = run_worker("bench_protopnet.py", ["push", "--n", str(n), *common])
    large = run_worker("bench_protopnet.py", ["push", "--n", str(4 * n), *common])
    ratio = large["peak_bytes"] / max(small["peak_bytes"], 1)
    return {"name": "protopnet_push_memory_flat", "value": round(ratio, 4), "target": 1.1, "goal": "<=",
            "met": ratio <= 1.1, "unit": "peak memory push(4N)/push(N)", "n_images": [n, 4 * n], "batch": batch,
            "peak_mb": [round(small["peak_bytes"] / 2**20, 1), round(large["peak_bytes"] / 2**20, 1)],
            "push_s": [round(small["seconds"], 3), round(large["seconds"], 3)],
            "memory_measure": small["memory_measure"], "machine": machine(device)}


def bench_last_layer(n: int, batch: int, repeats: int, device: str) -> dict[str, Any]:
    from mlmi_zoo.architectures.protopnet.last_layer import fit_last_layer
    from mlmi_zoo.architectures.protopnet.training import ProtoPNetTraining
    from mlmi_zoo.architectures.blocks.stages import training_for

    _, model = _models(2, (64, 64), device)
    batches = list(_StreamedImages(n, batch, (64, 64), device))
    training = training_for(model)
    epochs, lr = ProtoPNetTraining.last_layer_epochs, ProtoPNetTraining.last_layer_lr
    trainable = training.trainable_parameters(model, "last_layer")

    def gradient_stage(n_epochs: int = epochs) -> None:
        # What the trainer does for a gradient stage: freeze the rest, eval mode, re-run the network.
        flags = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        optimiser = torch.optim.Adam(trainable, lr=lr)
        try:
            for _ in range(n_epochs):
                for b in batches:
                    optimiser.zero_grad(set_to_none=True)
                    training.loss(model, b, "last_layer").loss.backward()
                    optimiser.step()
        finally:
            for p, flag in zip(model.parameters(), flags):
                p.requires_grad_(flag)

    def cached(n_epochs: int = epochs) -> None:
        fit_last_layer(model, batches, epochs=n_epochs, lr=lr, batch_size=batch, device=device)

    # A one-epoch warm-up of each: the full stages take long, and one pass warms every kernel.
    gradient_stage(1)
    cached(1)
    tb, tc = compare(gradient_stage, cached, repeats=repeats, warmup=0, device=device)
    return ratio_row("protopnet_last_layer_speedup", tb, tc, 10.0, ">=", device, invert=True,
                     unit="x faster: gradient stage re-running the backbone / fit on cached similarities",
                     n_images=n, batch=batch, epochs=epochs)


def _worker(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["push"])
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    setup(a)
    from mlmi_zoo import create_model
    from mlmi_zoo.architectures.protopnet.push import push_prototypes

    probe = MemoryProbe(a.device)
    model = create_model("protopnet_resnet8", spatial_dims=2, img_size=(64, 64), in_channels=1).eval().to(a.device)
    t = time_fn(lambda: push_prototypes(model, _StreamedImages(a.n, a.batch, (64, 64), a.device), a.device),
                repeats=1, warmup=0, device=a.device)
    worker_result({"peak_bytes": probe.peak_bytes(), "seconds": t.wall_s, **probe.describe()})


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--batch", type=int, default=64, help="forward batch size (default: 64)")
    parser.add_argument("--push-n", type=int, default=256, help="N images for push (memory also at 4N; default 256)")
    parser.add_argument("--ll-n", type=int, default=64, help="images for the last-layer stage (default 64)")
    parser.add_argument("--ll-repeats", type=int, default=3, help="repeats of the (slow) last-layer comparison")
    args = parser.parse_args()
    device = setup(args)
    for dims, side in ((2, 64), (3, 32)):
        guarded(f"protopnet_forward_{dims}d_{side}", 1.15, "<=", device,
                lambda dims=dims, side=side: bench_forward(dims, side, args.batch, args.repeats, device))
    guarded("protopnet_push_time", 1.3, "<=", device, lambda: bench_push_time(args.push_n, 64, args.repeats, device))
    guarded("protopnet_push_memory_flat", 1.1, "<=", device, lambda: bench_push_memory(args.push_n, 64, device))
    guarded("protopnet_last_layer_speedup", 10.0, ">=", device,
            lambda: bench_last_layer(args.ll_n, 32, args.ll_repeats, device))


if __name__ == "__main__":
    main()
