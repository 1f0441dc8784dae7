"""Explaining one IDRiD fundus photograph with each bundled IDRiD model, on a CPU; JSON lines.

    python bench/bench_idrid.py [--repeats 5] [--threads 0]

Data: IDRiD (Porwal et al., Data 3(3):25, 2018; CC BY 4.0), the first official grading test photograph,
read from ``$MLMI_ZOO_DATA/idrid`` at the models' 640-px long side (its resized copy cached first, outside
the timing). Rows:

- ``idrid_explain_<model>``: the median wall time of ``model.explain`` on the one photograph (a
  ``(1, 3, 425, 640)`` batch, intensity transform included); target < 2 s, the case study's bound for
  one full photograph on a CPU. The value is absolute seconds;
- ``idrid_explain_<model>_vs_forward``: the same time as a ratio to the plain black-box baseline's
  forward pass on the same input, timed interleaved in the same process (what the explanation costs on
  top of the decision on this machine); target <= 10.
- the MIL models (bag = photograph, instance = field-of-view tile) take the photograph at 1072 px: their
  time covers cutting it into 64-px tiles, encoding every tile with the frozen ImageNet encoder (nothing
  cached) and ``model.explain`` of the bag; the ratio is against the same baseline forward at 640 px.
- the tile ProtoPNets take the photograph at 1072 px (``(1, 3, 712, 1072)``), every 64-px tile of it
  encoded inside ``model.explain``; the ratio is against the same baseline forward at 640 px.
"""
from __future__ import annotations

import argparse

import torch

from _common import add_common_args, compare, guarded, machine, ratio_row, setup

MODELS = ("baseline_tf_efficientnet_lite0.idrid_rdr", "baseline_tf_efficientnet_lite0.idrid_dme",
          "measurement_tf_efficientnet_lite0.idrid_dme", "cbm_tf_efficientnet_lite0.idrid_rdr")
BAG_MODELS = ("abmil_features.idrid_rdr", "additive_mil_features.idrid_rdr")
FULL_MODELS = ("protopnet_tf_efficientnet_lite0.idrid_rdr", "protopnet_tf_efficientnet_lite0.idrid_grade")
TARGET_S = 2.0
RATIO_TARGET = 10.0  # an explanation within 10x the plain decision


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_common_args(p)
    args = p.parse_args()
    device = setup(args)
    import mlmi_zoo
    from mlmi_zoo.training.datasets.feature_cache import TileEncoder
    from mlmi_zoo.training.datasets.idrid import IDRiDGrading
    from mlmi_zoo.training.datasets.idrid_bags import IDRiDBagSettings, photograph_bag

    image = IDRiDGrading(split="test", size=640, prepare=False)[0]["image"][None].to(device)
    full = IDRiDGrading(split="test", size=1072, prepare=False)[0]
    settings = IDRiDBagSettings(size=1072, tile_px=64)
    encoder = TileEncoder(settings, in_chans=3)  # tiles are encoded on the CPU, as a user's photograph would be
    reference = mlmi_zoo.load(MODELS[0]).eval().to(device)

    def forward() -> None:
        with torch.no_grad():
            reference(reference.input_spec.intensity(image))

    bundled = set(mlmi_zoo.list_models(pretrained=True))
    for name in MODELS + BAG_MODELS + tuple(m for m in FULL_MODELS if m in bundled):
        def run(name: str = name) -> list[dict[str, object]]:
            model = mlmi_zoo.load(name).eval().to(device)

            def explain() -> None:
                if name in BAG_MODELS:  # photograph -> tiles -> features -> the bag's explanation
                    bag = photograph_bag(full["image"], full["fov"], settings, encoder)
                    model.explain(bag["feats"].to(device), coords=bag["coords"].to(device))
                elif name in FULL_MODELS:
                    model.explain(model.input_spec.intensity(full["image"][None].to(device)))
                else:
                    model.explain(model.input_spec.intensity(image))

            base, cand = compare(forward, explain, repeats=args.repeats, device=device)
            absolute = {"name": f"idrid_explain_{name}", "value": round(cand.wall_s, 4), "target": TARGET_S,
                        "goal": "<=", "met": cand.wall_s <= TARGET_S, "unit": f"s per photograph ({1072 if name in BAG_MODELS + FULL_MODELS else 640} px)",
                        "cpu_s": round(cand.cpu_s, 4), "repeats": args.repeats, "machine": machine(device)}
            ratio = ratio_row(f"idrid_explain_{name}_vs_forward", base, cand, RATIO_TARGET, "<=", device,
                              unit=f"explain / {MODELS[0]} forward wall time")
            return [absolute, ratio]

        guarded({f"idrid_explain_{name}": (TARGET_S, "<="),
                 f"idrid_explain_{name}_vs_forward": (RATIO_TARGET, "<=")}, None, None, device, run)


if __name__ == "__main__":
    main()
