"""Wall time of the whole IDRiD case study trained from scratch, model by model, on this machine; JSON lines.

    python bench/bench_idrid_pipeline.py [--out bench/idrid_pipeline.jsonl] [--only NAME ...] [--list]

Data: IDRiD (Porwal et al., Data 3(3):25, 2018; CC BY 4.0), read from ``$MLMI_ZOO_DATA/idrid``.

Every IDRiD model of the release (``mlmi_zoo.model_cards.release.RELEASES`` whose recipe reads ``idrid`` or
``idrid_bags`` data) is trained with its recipe by the zoo's trainer, one after another, each into a
temporary run folder that is deleted afterwards. One row per model is appended to ``--out`` as soon as
it finishes: ``{"name": "idrid_train_<model>", "seconds", "recipe", "load_before", "machine"}``
(``load_before``: the 1-minute load average when it started, so a row measured beside other work can be
told apart). A model that already has a row in ``--out`` is skipped: the script can be stopped and run
again, and the total is the sum of the rows, each measured with the machine to itself. The first model
that reads the photographs (or their tile features) also pays for caching them when the cache folder
(``$MLMI_ZOO_CACHE``) is empty; point it at an empty folder to time the pipeline from nothing.

Target: the rows add up to at most 3 h on 2 CPU cores (the IDRiD case study's bound for every model).
The script prints the sum so far after each model.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from _common import emit, machine

TARGET_S = 3 * 3600.0


def idrid_releases() -> list[tuple[str, Path]]:
    """``(model name, recipe path)`` of every IDRiD model of the release, in release order."""
    from mlmi_zoo.model_cards.release import RECIPES, RELEASES
    from mlmi_zoo.training.recipe import load_recipe

    out = []
    for release in RELEASES:
        path = RECIPES / release.recipe
        if load_recipe(path, []).data.kind in ("idrid", "idrid_bags"):
            out.append((release.name, path))
    return out


def done_rows(path: Path) -> dict[str, dict]:
    """The rows already in ``path`` by name (none when it does not exist)."""
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["name"]: r for r in rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "idrid_pipeline.jsonl",
                   help="JSON lines, appended to (default: bench/idrid_pipeline.jsonl)")
    p.add_argument("--only", nargs="*", help="train only these models (bundled names)")
    p.add_argument("--list", action="store_true", help="list the models and recipes, train nothing")
    args = p.parse_args()
    models = idrid_releases()
    if args.only:
        unknown = sorted(set(args.only) - {name for name, _ in models})
        if unknown:
            p.error(f"--only {' '.join(unknown)}: not an IDRiD model of the release ({', '.join(n for n, _ in models)})")
        models = [(n, r) for n, r in models if n in args.only]
    if args.list:
        for name, recipe in models:
            print(f"{name}\t{recipe.name}")
        return
    from mlmi_zoo.training.recipe import load_recipe
    from mlmi_zoo.training.trainer import train

    done = done_rows(args.out)
    total = sum(r["seconds"] for r in done.values() if r["name"].startswith("idrid_train_"))
    for name, recipe in models:
        key = f"idrid_train_{name}"
        if key in done:
            continue
        load = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as run:
            start = time.perf_counter()
            train(load_recipe(recipe, []), Path(run) / "run", quiet=True)
            seconds = time.perf_counter() - start
        row = {"name": key, "seconds": round(seconds, 1), "recipe": recipe.name, "load_before": round(load, 2),
               "machine": machine("cpu")}
        with args.out.open("a") as f:  # one whole line per finished model: a stopped run loses only its current model
            f.write(json.dumps(row) + "\n")
        emit(row)
        total += seconds
        print(f"[idrid pipeline] {name}: {seconds / 60:.1f} min; sum so far {total / 3600:.2f} h "
              f"(target {TARGET_S / 3600:.0f} h)", flush=True)


if __name__ == "__main__":
    main()
