"""The README's fine-tune commands, verbatim, on real mammogram crops: do they run, how long, how good?

The commands between the README's ``finetune-example`` markers are read from the README (as
``tests/test_finetune_cli.py`` reads them) and run one after another, unchanged, in a work folder
that holds the files they name, exported from mini-MIAS (Suckling et al. 1994):

* ``cases.csv`` / ``test.csv``: 64-px crops at 0.8 mm centred on the radiologists' circles (with
  the jitter of ``bench_transfer.export_mias``), ``label`` benign or malignant (the row's
  severity), ``diameter_mm`` twice the circle's radius, ``spacing_mm`` ``0.8x0.8``; crops of the
  module's train women in ``cases.csv``, of its test women in ``test.csv``
  (:func:`mlmi_zoo.training.datasets.mias.split_of_woman`);
* ``xrays/<class>/``: the ``mias_patch`` training crops of ``bench/bench_transfer.py`` (lesion vs
  normal tissue at 0.4 mm).

Everything goes under the user cache directory, never the repository. Prints one JSON line per
command (exit status, wall seconds) and one with the test AUROC that ``my_model/results.json``
holds; ``--out`` appends them to a JSON-lines file.

    python bench/bench_readme_finetune.py --data-root /work/shared/data [--out bench/readme_finetune.jsonl]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from _common import BENCH_DIR, machine

from _transfer_data import SEED, _crop, _save_png, export_mias

REPO = BENCH_DIR.parent


def readme_commands(readme: Path = REPO / "README.md") -> list[list[str]]:
    """The commands between the README's finetune-example markers, continuation lines joined."""
    text = readme.read_text(encoding="utf-8")
    block = text.split("<!-- finetune-example:start -->", 1)[1].split("<!-- finetune-example:end -->", 1)[0]
    body = block.split("```bash", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    return [shlex.split(line) for line in body.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def export_severity_crops(root: Path, folder: Path, size: int = 64, spacing_mm: float = 0.8, jitters: int = 4,
                          jitter_mm: float = 4.0) -> dict[str, int]:
    """Write ``folder/cases.csv`` (train women) and ``folder/test.csv`` (test women): benign vs malignant crops.

    Returns:
        the number of crops per CSV.
    """
    from mlmi_zoo.training.datasets.mias import MIAS

    rng = np.random.default_rng(SEED)
    counts = {}
    for split, name in (("train", "cases"), ("test", "test")):
        data = MIAS(root, split=split, spacing_mm=spacing_mm)
        rows = ["image,label,diameter_mm,spacing_mm,patient"]
        for i, record in enumerate(data.records):
            if not record.has_centre:
                continue
            image = data[i]["image"][0].numpy()
            circled = [a for a in record.abnormalities if a.centre_mm is not None and a.radius_mm is not None]
            for abnormality, (row_mm, col_mm, radius_mm) in zip(circled, record.circles_mm(), strict=True):
                if abnormality.severity not in ("B", "M"):
                    continue
                reach = min(radius_mm, jitter_mm) / spacing_mm
                for j in range(jitters):
                    angle, dist = rng.uniform(0, 2 * math.pi), reach * math.sqrt(rng.uniform()) * (j > 0)
                    crop = _crop(image, row_mm / spacing_mm - 0.5 + dist * math.sin(angle),
                                 col_mm / spacing_mm - 0.5 + dist * math.cos(angle), size)
                    if crop is None:
                        continue
                    file = _save_png(folder / name / f"{len(rows):05d}.png", crop)
                    label = "malignant" if abnormality.severity == "M" else "benign"
                    rows.append(f"{name}/{file},{label},{2 * radius_mm:.1f},{spacing_mm}x{spacing_mm},{record.name}")
        (folder / f"{name}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
        counts[name] = len(rows) - 1
    return counts


def export_xrays(root: Path, folder: Path) -> dict[str, int]:
    """``folder/xrays/<class>/*.png``: the ``mias_patch`` training crops (lesion vs normal tissue)."""
    train, _ = export_mias(root, 600, 200)
    counts: dict[str, int] = {}
    for i, case in enumerate(train):
        _save_png(folder / "xrays" / case.label / f"{i:05d}.png", case.image)
        counts[case.label] = counts.get(case.label, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--data-root", help="folder holding mias/ (default: $MLMI_ZOO_DATA)")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: <mlmi_zoo cache>/bench_readme_finetune")
    parser.add_argument("--out", type=Path, default=None, help="append the rows to this JSON-lines file")
    args = parser.parse_args(argv)
    from mlmi_zoo.architectures.blocks.pretrained import cache_dir
    from mlmi_zoo.training.datasets._location import data_root

    root = data_root(args.data_root, file="mias/", argument="--data-root")
    work = args.work_dir or cache_dir() / "bench_readme_finetune"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    exported = {"csv_crops": export_severity_crops(root, work), "xrays": export_xrays(root, work)}
    rows = [{"name": "readme_finetune_data", **exported}]
    executable = shutil.which("mlmi-zoo")
    for command in readme_commands():
        if command[0] == "mlmi-zoo":
            argv_run = [executable, *command[1:]] if executable else [sys.executable, "-m", "mlmi_zoo.cli", *command[1:]]
        else:
            argv_run = [sys.executable, *command[1:]]
        start = time.perf_counter()
        with open(work / "commands.log", "a", encoding="utf-8") as log:
            log.write(f"$ {shlex.join(command)}\n")
            log.flush()
            status = subprocess.run(argv_run, cwd=work, stdout=log, stderr=subprocess.STDOUT, env=os.environ).returncode
        rows.append({"name": "readme_command", "command": shlex.join(command), "exit": status,
                     "wall_s": round(time.perf_counter() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
        if status != 0:
            break
    results = work / "my_model" / "results.json"
    if results.is_file():
        doc = json.loads(results.read_text(encoding="utf-8"))
        rows.append({"name": "readme_finetune_test_auroc", "value": doc["task"]["auroc"], "n_cases": doc["n_cases"],
                     "physical": (doc["elements"]["physical_attribution"].get("metrics") or {})})
    for row in rows:
        row.update(machine=machine(), measured_utc=time.strftime("%Y-%m-%d %H:%M", time.gmtime()))
    print(json.dumps(rows[-1]), flush=True)
    if args.out is not None:
        with args.out.open("a", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
    return 0 if all(r.get("exit", 0) == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
