"""A user's first session with mlmi-zoo: list, load, explain, measure, save.

Loads the bundled prototype network for lung nodules, explains a (random) CT patch at the model's
own pixel spacing, reads the nodule diameter in mm and the prototypes behind the decision, and
saves the model as a Hub-style folder that loads back to the same logits.

Run: ``python examples/user_script.py`` (offline; the weights ship with the package).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import mlmi_zoo
from mlmi_zoo.architectures.protopnet import ProtoPNet


def main() -> None:
    print("ProtoPNet architectures:", ", ".join(mlmi_zoo.list_models("protopnet_*")))
    print("bundled weights:", ", ".join(mlmi_zoo.list_models(pretrained=True)))

    # Passing the class types the result as a ProtoPNet (and raises if the folder holds another).
    model = mlmi_zoo.load("protopnet_resnet8.lidc_nodule", ProtoPNet)
    spec = model.input_spec
    print(f"{model.architecture}: {spec.modality}, {spec.size} px at {spec.spacing} mm, "
          f"classes {model.label_names}, intensity {spec.intensity.describe()}")

    # Raw CT patches in HU, through the model's own intensity window.
    torch.manual_seed(0)
    hu = torch.empty(2, spec.in_channels, *spec.size).uniform_(-1000.0, 400.0)  # (B, C_in, H, W)
    x = spec.intensity(hu)  # (B, C_in, H, W) in [0, 1]

    exp = model.explain(x, spacing=spec.spacing)  # a PrototypeExplanation
    diameter = exp.measurements["diameter_mm"]
    probs = exp.probabilities()  # (B, C)
    for i in range(exp.batch_size):
        c = int(exp.predicted()[i])
        print(f"case {i}: {exp.label_names[c]} (p = {float(probs[i, c]):.3f}), "
              f"diameter {float(diameter.value[i]):.1f} {diameter.unit}")
        for j in exp.top_prototypes(i, k=3):
            print(f"  prototype #{j} (class {exp.label_names[int(exp.prototype_classes[j])]}): "
                  f"similarity {float(exp.similarities[i, j]):.3f}, "
                  f"contribution {float(exp.contributions[i, c, j]):+.3f}")
    # The decision is an exact sum of prototype contributions (to float rounding).
    print(f"max |bias + sum(contributions) - logits| = {exp.decomposition_error():.2e}")

    with tempfile.TemporaryDirectory() as tmp:
        folder = model.save_pretrained(Path(tmp) / "my_protopnet")
        print("saved:", sorted(p.name for p in folder.iterdir()))
        reloaded = mlmi_zoo.load(f"local-dir:{folder}", ProtoPNet)
        with torch.no_grad():
            same = torch.equal(reloaded(x), model(x))
        print("reloaded model gives the same logits:", same)


if __name__ == "__main__":
    main()
