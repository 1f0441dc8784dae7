"""Dump, or compare with a dump, every tensor of every bundled model's explanation of its bundled samples.

A change that must not change behaviour (a refactor, a dependency upgrade) is checked by dumping
before and comparing after::

    python tools/reference_explanations.py dump before.npz      # on the old commit
    python tools/reference_explanations.py compare before.npz   # on the new one: max abs diff, NaN patterns
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np
import torch

import mlmi_zoo
from mlmi_zoo.model_cards.demo import explain_sample, load_samples
from mlmi_zoo.registry import bundled_dir


def explanation_arrays() -> dict[str, np.ndarray]:
    """``"model/sample/field[.key]"`` -> float64 array, for every tensor and measurement of every explanation."""
    out: dict[str, np.ndarray] = {}
    for name in mlmi_zoo.list_models(pretrained=True):
        model = mlmi_zoo.load(name).eval()
        for tensors, meta in load_samples(bundled_dir() / name):
            with torch.no_grad():
                exp = explain_sample(model, tensors)
            key = f"{name}/{meta['name']}"
            for f in dataclasses.fields(exp):
                value = getattr(exp, f.name)
                if isinstance(value, torch.Tensor):
                    out[f"{key}/{f.name}"] = value.detach().double().numpy()
                elif isinstance(value, dict):
                    for k, m in value.items():
                        v = getattr(m, "value", m)
                        if isinstance(v, (torch.Tensor, float, int)):
                            out[f"{key}/{f.name}.{k}"] = np.asarray(torch.as_tensor(v).double())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("dump", "compare"))
    p.add_argument("path", help="the .npz reference file")
    args = p.parse_args(argv)
    now = explanation_arrays()
    if args.action == "dump":
        np.savez(args.path, **now)
        print(f"{len(now)} arrays written to {args.path}")
        return 0
    ref = np.load(args.path)
    if set(ref.files) != set(now):
        print(f"different arrays: {sorted(set(ref.files) ^ set(now))[:10]}")
        return 1
    worst = max((float(np.nanmax(np.abs(ref[k] - now[k]))) if ref[k].size else 0.0, k) for k in now)
    nans = all(np.array_equal(np.isnan(ref[k]), np.isnan(now[k])) for k in now)
    print(f"{len(now)} arrays; max abs diff {worst[0]:.3g} ({worst[1]}); NaN patterns equal: {nans}")
    return 0 if worst[0] <= 1e-6 and nans else 1


if __name__ == "__main__":
    sys.exit(main())
