"""Channels-last training: one optimiser step of the zoo's convolutional models, contiguous vs channels-last.

The trainer keeps a model's 4-D and 5-D parameters channels-last when the model holds a depthwise
convolution (:func:`mlmi_zoo.training._device.prefers_channels_last`, :func:`~mlmi_zoo.training._device.channels_last`)
and PyTorch's default (contiguous) layout otherwise. This script measures both layouts, in one
process: the same model (two copies from the same weights), the same batch, the same AdamW step;
the baseline copy contiguous, the candidate converted. Timed interleaved after a warm-up
(:func:`_common.compare`); the row's value is the speed-up, contiguous / channels-last wall time.
The target checks the trainer's choice: where it converts, the speed-up must be >= 1; where it
does not, channels-last must not have been more than 10% faster (<= 1.1). The models and inputs
are those of the fine-tuning benchmark (``bench/bench_transfer.py``) and of the ImageNet-started models:

* ``baseline_resnet8`` and ``protopnet_resnet8`` in 3-D at 64^3 and 28^3 (AdrenalMNIST3D parents);
* the same in 2-D at 64 and 256 px (PneumoniaMNIST parents);
* ``baseline_tf_efficientnet_lite0`` at 256 px RGB (random weights; the timing does not depend on them).

    python bench/bench_memory_format.py [--threads 1] [--repeats 5] [--batch 16] [--device cpu|cuda]

Prints one JSON line per model and input size.
"""
from __future__ import annotations

import argparse
import copy
import logging
from collections.abc import Callable

import torch

from _common import compare, emit, guarded, ratio_row

import mlmi_zoo
from mlmi_zoo.training._device import channels_last, prefers_channels_last

CASES: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    # (row name, model, input shape without the batch)
    ("baseline_resnet8_3d_64", "baseline_resnet8.adrenalmnist3d", (1, 64, 64, 64)),
    ("protopnet_resnet8_3d_64", "protopnet_resnet8.adrenalmnist3d", (1, 64, 64, 64)),
    ("protopnet_resnet8_3d_28", "protopnet_resnet8.adrenalmnist3d", (1, 28, 28, 28)),
    ("protopnet_resnet8_2d_64", "protopnet_resnet8.pneumoniamnist", (1, 64, 64)),
    ("baseline_resnet8_2d_256", "baseline_resnet8.pneumoniamnist", (1, 256, 256)),
    ("protopnet_resnet8_2d_256", "protopnet_resnet8.pneumoniamnist", (1, 256, 256)),
    ("baseline_lite0_2d_256", "baseline_tf_efficientnet_lite0", (3, 256, 256)),
)


def _model(name: str) -> torch.nn.Module:
    if "." in name:
        return mlmi_zoo.load(name)
    return mlmi_zoo.create_model(name, in_channels=3, img_size=[256, 256], label_names=["a", "b"])


def _step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One training step: forward, cross-entropy on the logits, backward, AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        out = model(x)
        logits = out["logits"] if isinstance(out, dict) else getattr(out, "logits", out)
        loss = torch.nn.functional.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def measure(model_name: str, shape: tuple[int, ...], batch: int, repeats: int, device: str) -> dict:
    torch.manual_seed(0)
    base = _model(model_name).train().to(device)
    candidate = channels_last(copy.deepcopy(base))
    x = torch.rand(batch, *shape, device=device)
    y = torch.randint(0, 2, (batch,), device=device)
    before, after = compare(_step_fn(base, x, y), _step_fn(candidate, x, y), repeats=repeats, warmup=1, device=device)
    applied = prefers_channels_last(base)
    return ratio_row("", before, after, target=1.0 if applied else 1.1, goal=">=" if applied else "<=",
                     device=device, invert=True, unit="speed-up: contiguous / channels-last wall time of one training step",
                     model=model_name, input=[batch, *shape], threads=torch.get_num_threads(),
                     trainer_converts=applied)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--only", nargs="+", choices=[c[0] for c in CASES], help="these rows only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name, model_name, shape in CASES:
        if args.only and name not in args.only:
            continue
        row = f"channels_last_{name}"
        guarded(row, None, None, args.device,
                lambda: {**measure(model_name, shape, args.batch, args.repeats, args.device), "name": row})


if __name__ == "__main__":
    main()
