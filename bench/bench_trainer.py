"""Trainer overhead: images/s of the shared trainer vs a bare PyTorch loop, same process.

Same model (baseline_resnet8), same pre-generated in-memory data, same batch size, optimiser and
number of steps. The bare loop slices pre-stacked tensors; the trainer goes through its
DataLoader/collate, stage freezing, running metrics, progress accounting and per-epoch validation
and checkpoints. Throughput of the trainer = training images / wall time of its training loops
(``train_images_per_s`` in metrics.jsonl); rounds alternate (bare, trainer, bare, ...) and the
medians count, so that load from other jobs on a shared machine hits both alike. One CPU thread by
default (see bench/README.md).

    python bench/bench_trainer.py [--n 1024] [--size 32] [--batch 32] [--epochs 2] [--rounds 3]
                                  [--threads 1] [--device cpu|cuda]

Prints one JSON line: {"name": "trainer_vs_bare_loop", "value": ratio, "target": 0.8, "met": bool, ...}.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

import mlmi_zoo
from mlmi_zoo.training._device import channels_last, prefers_channels_last
from mlmi_zoo.training.data_spec import DataSpec
from mlmi_zoo.training.recipe import ModelSection, OptimSection, Recipe, StageSection
from mlmi_zoo.training.trainer import Trainer


class InMemory(Dataset):
    """Pre-generated sample dicts (no rendering cost in the measurement)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels  # (N, 1, H, W), (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": self.labels[i], "index": i}


def bare_loop(images: torch.Tensor, labels: torch.Tensor, config: dict, batch: int, epochs: int, seed: int,
              device: str) -> float:
    """Images/s of the plainest loop: fixed permutation per epoch, forward, CE, backward, AdamW."""
    torch.manual_seed(seed)
    model = mlmi_zoo.create_model("baseline_resnet8", **config).train().to(device)
    if prefers_channels_last(model):  # the layout the trainer would choose: the two loops do the same arithmetic
        channels_last(model)
    images, labels = images.to(device), labels.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    n = len(labels)
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, n, batch):
            idx = order[i:i + batch]
            logits = model(images[idx])
            loss = torch.nn.functional.cross_entropy(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return n * epochs / (time.perf_counter() - start)


def trainer_run(data: dict[str, Dataset], config: dict, batch: int, epochs: int, seed: int,
                device: str) -> tuple[float, float]:
    """(training-loop images/s, end-to-end images/s) of the shared trainer."""
    recipe = Recipe(
        model=ModelSection("baseline_resnet8", config),
        data=DataSpec("nodule_phantom", {}, train_size=len(data["train"]), val_size=len(data["val"])),  # unused
        optim=OptimSection("adamw", lr=1e-3, weight_decay=1e-4, batch_size=batch, schedule="constant"),
        stages=(StageSection("joint", epochs),),
        seed=seed, device=device,
    )
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        Trainer(recipe, Path(tmp) / "run", quiet=True, datasets=data).fit()
        total = time.perf_counter() - start
        lines = [json.loads(s) for s in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    loop_time = sum(rec["train_time_s"] for rec in lines if rec["type"] == "epoch")
    images = len(data["train"]) * epochs
    return images / loop_time, images / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.n, 1, args.size, args.size, generator=g)  # (N, 1, H, W)
    labels = (images.mean((1, 2, 3)) > 0.5).long()  # (N,)
    val = InMemory(images[:64], labels[:64])
    data = {"train": InMemory(images, labels), "val": val}
    config = {"img_size": [args.size, args.size]}

    bare, loop, total = [], [], []
    for r in range(args.rounds):
        bare.append(bare_loop(images, labels, config, args.batch, args.epochs, r, args.device))
        a, b = trainer_run(data, config, args.batch, args.epochs, r, args.device)
        loop.append(a)
        total.append(b)
    med = statistics.median
    ratio = med(loop) / med(bare)
    print(json.dumps({"name": "trainer_vs_bare_loop", "value": round(ratio, 3), "target": 0.8, "met": ratio >= 0.8,
                      "trainer_images_per_s": round(med(loop), 1), "bare_images_per_s": round(med(bare), 1),
                      "end_to_end_ratio": round(med(total) / med(bare), 3), "threads": torch.get_num_threads(),
                      "device": args.device,
                      "n": args.n, "size": args.size, "batch": args.batch, "epochs": args.epochs}))


if __name__ == "__main__":
    main()
