"""Wall times of the mini-MIAS MIL case study: tile-feature extraction, then each training; JSON lines.

    python bench/bench_mias.py [--images 322] [--train] [--explain 10] [--threads 0]

Data: mini-MIAS (Suckling et al., "The Mammographic Image Analysis Society Digital Mammogram
Database", Excerpta Medica ICS 1069, 1994), read from ``$MLMI_ZOO_DATA/mias``; MIL as in Ilse et al.
(ICML 2018) and Javed et al. (NeurIPS 2022).

Rows (no baseline: these are absolute wall times, not ratios):

- ``mias_feature_extraction``: building the bags of the first ``--images`` images with a cold
  feature cache (a temporary ``$MLMI_ZOO_CACHE``; the resampled films are cached there too and are
  built first, outside the timing), with the settings of ``abmil_mias.yaml``: seconds, tiles, and
  milliseconds per tile.
- ``mias_train_<recipe>`` (``--train``): the zoo's trainer on ``abmil_mias.yaml`` and
  ``additive_mil_mias.yaml`` with the features already cached (the data set is built, then every
  epoch runs): seconds.
- ``mias_explain_film`` (``--explain N``): the bundled ``abmil_features.mias`` explaining ``N`` test films
  one at a time from the raw film file with a cold cache: reading and resampling the film, finding the
  breast, cutting and encoding its tiles, the MIL forward with attention and the size head. Seconds for
  the first film (which also builds the encoder) and the median and maximum of the others.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from _common import add_common_args, emit, machine, setup

RECIPES = Path(__file__).resolve().parents[1] / "src" / "mlmi_zoo" / "training" / "recipes"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_common_args(p)
    p.add_argument("--images", type=int, default=322, help="images to encode (default: all 322)")
    p.add_argument("--train", action="store_true", help="also time both trainings (features cached first)")
    p.add_argument("--explain", type=int, default=10, help="test films explained one by one, cold (0: none)")
    args = p.parse_args()
    device = setup(args)
    from mlmi_zoo.training.datasets.mias import MIAS
    from mlmi_zoo.training.datasets.mias_bags import MiasBags
    from mlmi_zoo.training.recipe import load_recipe
    from mlmi_zoo.training.trainer import train

    recipe = load_recipe(RECIPES / "abmil_mias.yaml", [])
    params = dict(recipe.data.params)
    root = params.pop("root", None)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["MLMI_ZOO_CACHE"] = cache
        films = MIAS(root, split="all", spacing_mm=params.get("spacing_mm", 0.8))
        names = [r.name for r in films.records[: args.images]]
        films.records = films.records[: args.images]
        films.build_cache()  # the resampled films: not part of the feature extraction
        start = time.perf_counter()
        bags = MiasBags(root, split="all", images=names, **params)
        seconds = time.perf_counter() - start
        tiles = sum(int(b["feats"].shape[0]) for b in bags.bags)
        emit({"name": "mias_feature_extraction", "seconds": round(seconds, 2), "images": len(names), "tiles": tiles,
              "ms_per_tile": round(1000 * seconds / max(tiles, 1), 2), "settings": params, "machine": machine(device)})
        if args.train:
            MiasBags(root, split="all", **params)  # every image cached before the trainings are timed
            for name in ("abmil_mias.yaml", "additive_mil_mias.yaml"):
                with tempfile.TemporaryDirectory() as run:
                    start = time.perf_counter()
                    train(load_recipe(RECIPES / name, []), Path(run) / "run", quiet=True)
                    emit({"name": f"mias_train_{name.removesuffix('.yaml')}", "seconds": round(time.perf_counter() - start, 2),
                          "machine": machine(device)})
    if args.explain:
        explain_films(root, params, args.explain, device)


def explain_films(root: object, params: dict, n: int, device: object) -> None:
    """Time the bundled MIL model on ``n`` test films, each from its raw file with a cold cache."""
    import statistics

    import mlmi_zoo
    from mlmi_zoo.training.datasets.mias import MIAS
    from mlmi_zoo.training.datasets.mias_bags import MiasBags

    model = mlmi_zoo.load("abmil_features.mias")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["MLMI_ZOO_CACHE"] = cache
        names = [r.name for r in MIAS(root, split="test", spacing_mm=params["spacing_mm"]).records[:n]]
        seconds = []
        for name in names:
            start = time.perf_counter()
            bag = MiasBags(root, split="test", images=[name], **params).bags[0]  # read, resample, breast, tiles, encode
            exp = model.explain(bag["feats"][None], coords=bag["coords"][None])
            float(exp.measurements["radius_mm"].value[0])
            seconds.append(time.perf_counter() - start)
    rest = seconds[1:] or seconds
    emit({"name": "mias_explain_film", "films": len(seconds), "first_s": round(seconds[0], 3),
          "median_s": round(statistics.median(rest), 3), "max_s": round(max(rest), 3), "machine": machine(device)})


if __name__ == "__main__":
    main()
