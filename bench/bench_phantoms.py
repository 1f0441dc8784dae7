"""Benchmarks of the digital phantoms; prints one JSON line per benchmark.

    python bench/bench_phantoms.py            # speed: 2D nodule cases/s, 10k-instance feature bag
    python bench/bench_phantoms.py --bayes    # oracle-concept Bayes accuracy of the nodule label rule

The nodule target (>= 1,000 2D 64x64 cases per second on 2 cores) is measured the way training
reads the phantom: a ``DataLoader`` with one worker process per core (``--workers``, default 2),
batches of 64 collated, wall-clock cases per second over the second of two passes (the first starts
the persistent workers). One core's rate, in CPU time of this process, is printed alongside: it is
the figure that other jobs on a shared machine distort least. The tile-bag speed is CPU time of this
(single-threaded) process. All values are medians of several repeats after a warm-up.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.data import DataLoader, default_collate

from mlmi_zoo.training.datasets.phantoms import NodulePhantom
from mlmi_zoo.training.datasets.tilebag import TileBagPhantom


def _timed(fn, repeats: int) -> tuple[float, float]:
    """Median CPU seconds and median wall seconds of ``fn()`` over ``repeats`` runs (after a warm-up)."""
    fn()
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def bench_nodule(n: int = 1000, repeats: int = 5, workers: int = 2, pipeline_cases: int = 4096) -> dict:
    """2D 64x64 nodule cases per second: through a ``workers``-process loader (the target) and on one core."""
    ds = NodulePhantom(n, spatial_dims=2, size=64, seed=0)

    def run() -> None:
        for i in range(n):
            ds[i]

    cpu, wall = _timed(run, repeats)
    one_core = n / cpu
    row = {"name": "phantom_nodule_2d_64", "target": 1000, "goal": ">=",
           "one_core_cpu_value": round(one_core, 1), "one_core_wall_value": round(n / wall, 1), "workers": workers}
    if workers == 0:
        row.update(value=round(one_core, 1), met=one_core >= 1000, unit="cases/s (CPU time, one core)")
        return row
    big = NodulePhantom(pipeline_cases, spatial_dims=2, size=64, seed=0)
    loader = DataLoader(big, batch_size=64, num_workers=workers, persistent_workers=True,
                        worker_init_fn=_worker_init, prefetch_factor=4)
    walls = []
    for _ in range(1 + max(1, repeats // 2)):  # the first pass starts the workers and is not counted
        w0 = time.perf_counter()
        for _batch in loader:
            pass
        walls.append(time.perf_counter() - w0)
    value = pipeline_cases / statistics.median(walls[1:])
    row.update(value=round(value, 1), met=value >= 1000,
               unit=f"cases/s (wall clock, DataLoader with {workers} worker processes, batches of 64)",
               pipeline_cases=pipeline_cases)
    return row


def bench_tilebag(repeats: int = 5) -> dict:
    ds = TileBagPhantom(repeats + 1, bag_size=(10_000, 10_000), features_only=True, feature_dim=512, seed=0)
    k = iter(range(repeats + 1))
    cpu, wall = _timed(lambda: ds[next(k)], repeats)
    return {"name": "tilebag_10k", "value": round(cpu, 3), "target": 2.0, "met": cpu < 2.0,
            "unit": "s per 10k-instance feature bag (CPU time)", "wall_value": round(wall, 3)}


def bayes_accuracy(n: int = 20_000, label_noise: float = 0.1, p_nodule: float = 0.9) -> dict:
    """Accuracy of the label rule applied to the true concepts and measured diameter."""
    out = {}
    for noise in (0.0, label_noise):
        ds = NodulePhantom(n, seed=0, p_nodule=p_nodule, label_noise=noise)
        samples = (ds[i] for i in range(n))
        batch = default_collate([{"c": s["concepts"], "m": s["measurements"], "y": s["label"]} for s in samples])
        pred = ds.oracle_label(batch["c"], batch["m"])
        out[f"noise_{noise:g}"] = {"accuracy": round(float((pred == batch["y"]).float().mean()), 4),
                                   "expected": 1.0 - noise,
                                   "positive_rate": round(float(batch["y"].float().mean()), 4)}
    return {"name": "nodule_oracle_concept_bayes_accuracy", "n": n, "p_nodule": p_nodule, **out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bayes", action="store_true", help="compute the oracle-concept Bayes accuracy")
    parser.add_argument("--n", type=int, default=20_000, help="cases for --bayes")
    parser.add_argument("--workers", type=int, default=2,
                        help="loader worker processes for the nodule rate (one per core; 0 = this process only)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.bayes:
        print(json.dumps(bayes_accuracy(args.n)))
        return
    print(json.dumps(bench_nodule(workers=args.workers)))
    print(json.dumps(bench_tilebag()))


if __name__ == "__main__":
    main()
