"""Attention-MIL on long bags of cached features: memory, scaling, and MONAI's MILModel; JSON lines.

    python bench/bench_mil.py [--device cuda] [--repeats 5]

For each family (``additive_mil_features``, ``abmil_features``), D = 512, one bag of N instances,
N = 1k, 10k, 100k, each N in a fresh subprocess (train mode, cross-entropy, forward + backward):

- ``mil_peak_memory_100k_<family>``: peak memory of one forward + backward at N = 100k, input
  features included (created after the memory baseline); GB = 1e9 bytes; target <= 1.5.
- ``mil_time_scaling_<family>``: time(100k) / time(10k) of forward + backward; target <= 11
  (10 would be linear).
- ``mil_forward_vs_monai_att_<family>``: our ``model(feats)`` vs MONAI's
  ``MILModel(mil_mode="att")`` head on the same (B, N, D) features, eval mode, no autograd. MONAI's
  model is built with ``backbone=nn.Identity()`` and only its head, ``calc_head(feats)``, is timed:
  its ``forward`` would first reshape the bag into images for its CNN backbone. Value = our time /
  MONAI's time, target <= 1.0.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
import torch.nn.functional as F

from _common import (MemoryProbe, add_common_args, compare, guarded, machine, ratio_row, run_worker, setup,
                     time_fn, worker_result)

FAMILIES = ("additive_mil_features", "abmil_features")
SIZES = (1_000, 10_000, 100_000)
GB = 1e9


def _worker(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["fwdbwd"])
    p.add_argument("--model", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    setup(a)
    from mlmi_zoo import create_model

    probe = MemoryProbe(a.device)
    model = create_model(a.model, in_features=a.dim).train().to(a.device)
    feats = torch.randn(1, a.n, a.dim, device=a.device)  # (B, N, D)
    label = torch.ones(1, dtype=torch.long, device=a.device)  # (B,)

    def step() -> None:
        F.cross_entropy(model(feats), label).backward()
        model.zero_grad(set_to_none=True)

    step()  # the first step sets the peak; it is also the warm-up
    peak = probe.peak_bytes()
    t = time_fn(step, repeats=a.repeats, warmup=0, device=a.device)
    worker_result({"peak_bytes": peak, "wall_s": t.wall_s, "cpu_s": t.cpu_s, **probe.describe()})


def bench_scaling(name: str, dim: int, repeats: int, device: str) -> list[dict[str, Any]]:
    runs = {n: run_worker("bench_mil.py", ["fwdbwd", "--model", name, "--n", str(n), "--dim", str(dim),
                                           "--repeats", str(repeats), "--device", device,
                                           "--threads", str(torch.get_num_threads())]) for n in SIZES}
    family = name.removesuffix("_features")
    peak = runs[100_000]["peak_bytes"] / GB
    detail = {"feature_dim": dim, "bag_sizes": list(SIZES),
              "peak_gb": [round(runs[n]["peak_bytes"] / GB, 3) for n in SIZES],
              "fwd_bwd_s": [round(runs[n]["wall_s"], 4) for n in SIZES],
              "fwd_bwd_cpu_s": [round(runs[n]["cpu_s"], 4) for n in SIZES],
              "memory_measure": runs[100_000]["memory_measure"]}
    scaling = runs[100_000]["wall_s"] / runs[10_000]["wall_s"]
    return [
        {"name": f"mil_peak_memory_100k_{family}", "value": round(peak, 4), "target": 1.5, "goal": "<=",
         "met": peak <= 1.5, "unit": "GB peak, forward+backward, N=100k", **detail, "machine": machine(device)},
        {"name": f"mil_time_scaling_{family}", "value": round(scaling, 4), "target": 11.0, "goal": "<=",
         "met": scaling <= 11.0, "unit": "time(100k)/time(10k), forward+backward",
         "cpu_value": round(runs[100_000]["cpu_s"] / runs[10_000]["cpu_s"], 4),
         "baseline_s": round(runs[10_000]["wall_s"], 5), "candidate_s": round(runs[100_000]["wall_s"], 5),
         **detail, "machine": machine(device)},
    ]


def bench_vs_monai(name: str, batch: int, bag_size: int, dim: int, repeats: int, device: str) -> dict[str, Any]:
    from monai.networks.nets import MILModel
    from torch import nn

    from mlmi_zoo import create_model

    ours = create_model(name, in_features=dim).eval().to(device)
    theirs = MILModel(num_classes=ours.num_classes, mil_mode="att", pretrained=False, backbone=nn.Identity(),
                      backbone_num_features=dim).eval().to(device)
    feats = torch.randn(batch, bag_size, dim, device=device)  # (B, N, D)
    with torch.no_grad():
        tm, to = compare(lambda: theirs.calc_head(feats), lambda: ours(feats), repeats=repeats, device=device)
    return ratio_row(f"mil_forward_vs_monai_att_{name.removesuffix('_features')}", tm, to, 1.0, "<=", device,
                     unit="our forward / MONAI MILModel(att) head time", batch=batch, bag_size=bag_size,
                     feature_dim=dim, ours_params=sum(p.numel() for p in ours.parameters()),
                     monai_head_params=sum(p.numel() for k, p in theirs.named_parameters() if not k.startswith("net.")))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--dim", type=int, default=512, help="feature width D (default: 512)")
    parser.add_argument("--monai-batch", type=int, default=1, help="bags per batch for the MONAI comparison")
    parser.add_argument("--monai-bag", type=int, default=10_000, help="instances per bag for the MONAI comparison")
    args = parser.parse_args()
    device = setup(args)
    for name in FAMILIES:
        family = name.removesuffix("_features")
        rows = {f"mil_peak_memory_100k_{family}": (1.5, "<="), f"mil_time_scaling_{family}": (11.0, "<=")}
        guarded(rows, None, None, device, lambda name=name: bench_scaling(name, args.dim, args.repeats, device))
        guarded(f"mil_forward_vs_monai_att_{family}", 1.0, "<=", device, lambda name=name: bench_vs_monai(
            name, args.monai_batch, args.monai_bag, args.dim, args.repeats, device))


if __name__ == "__main__":
    main()
