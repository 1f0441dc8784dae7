"""Import cost: ``import mlmi_zoo`` vs ``import torch, timm``, each in fresh interpreters; one JSON line.

    python bench/bench_import.py [--repeats 5]

Each statement runs in its own new ``python`` process (a warm-up of each first, so both read files
from a warm page cache), alternating, ``--repeats`` times each. The value is the ratio of the median
time spent inside the import statement (``time.perf_counter`` around it in the child); the children's
whole wall time, interpreter start-up included, is reported alongside. Target <= 1.3. The row also
reports whether MONAI (slow to import, needed only for 3D backbones) was imported by
``import mlmi_zoo``; ``met`` needs it not to be.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from _common import add_common_args, guarded, machine, setup

PROBE = ("import json, sys, time\n"
         "t0 = time.perf_counter()\n"
         "{statement}\n"
         "t = time.perf_counter() - t0\n"
         "print(json.dumps({{'import_s': t, 'monai_imported': 'monai' in sys.modules, "
         "'timm_imported': 'timm' in sys.modules, 'torch_imported': 'torch' in sys.modules}}))")

CANDIDATE = "import mlmi_zoo"
BASELINE = "import torch, timm"


def _child(statement: str) -> dict[str, Any]:
    w0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE.format(statement=statement)], capture_output=True, text=True)
    wall = time.perf_counter() - w0
    if proc.returncode != 0:
        raise RuntimeError(f"`{statement}` failed in a fresh interpreter: {proc.stderr.strip().splitlines()[-1:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_s": wall}


def bench_import(repeats: int, device: str) -> dict[str, Any]:
    _child(BASELINE), _child(CANDIDATE)
    base, cand = [], []
    for k in range(repeats):
        order = [(BASELINE, base), (CANDIDATE, cand)]
        for statement, out in order if k % 2 == 0 else order[::-1]:
            out.append(_child(statement))
    b = statistics.median(r["import_s"] for r in base)
    c = statistics.median(r["import_s"] for r in cand)
    ratio = c / b
    monai = any(r["monai_imported"] for r in cand)
    row = {"name": "import_time", "value": round(ratio, 4), "target": 1.3, "goal": "<=",
           "met": ratio <= 1.3 and not monai, "unit": "import mlmi_zoo / import torch, timm (in-process import time)",
           "baseline_s": round(b, 4), "candidate_s": round(c, 4),
           "baseline_process_s": round(statistics.median(r["process_s"] for r in base), 4),
           "candidate_process_s": round(statistics.median(r["process_s"] for r in cand), 4),
           "monai_imported": monai, "timm_imported": any(r["timm_imported"] for r in cand),
           "repeats": repeats, "machine": machine(device)}
    if monai:
        row["note"] = "import mlmi_zoo imported MONAI; it should be imported only when a 3D backbone is built"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    args = parser.parse_args()
    device = setup(args)  # imports do not touch the device; recorded for the machine field
    guarded("import_time", 1.3, "<=", device, lambda: bench_import(args.repeats, device))


if __name__ == "__main__":
    main()
