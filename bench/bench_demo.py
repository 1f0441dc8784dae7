"""Cold ``mlmi-zoo demo``: the whole command in a fresh process, bundled models only; one JSON line.

    python bench/bench_demo.py

Runs ``mlmi-zoo demo --out TMPDIR`` (the console script, else ``python -m mlmi_zoo.cli``) once
in a new process — cold: nothing imported, models loaded from their bundled folders — and reports
its wall time; target < 60 s. Without bundled models there is nothing to demonstrate: the row says
so (``met: false``) instead of timing an error.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import add_common_args, guarded, machine, missing_row, setup

TARGET_S = 60.0


def _bundled_models() -> list[str]:
    # Asked in a child process too, so this process stays as cold as the demo's.
    code = "import json, mlmi_zoo; print(json.dumps(mlmi_zoo.list_models(pretrained=True)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_demo(device: str, timeout: float) -> dict[str, Any]:
    models = _bundled_models()
    if not models:
        return missing_row("demo_cold", TARGET_S, "<", "no bundled models", device, unit="s")
    exe = shutil.which("mlmi-zoo")
    command = [exe] if exe else [sys.executable, "-m", "mlmi_zoo.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        w0 = time.perf_counter()
        proc = subprocess.run([*command, "demo", "--out", tmp], capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - w0
        page = Path(tmp) / "index.html"
        written = page.is_file() and page.stat().st_size > 0
    row = {"name": "demo_cold", "value": round(wall, 3), "target": TARGET_S, "goal": "<",
           "met": proc.returncode == 0 and written and wall < TARGET_S, "unit": "s, fresh process",
           "candidate_s": round(wall, 3), "bundled_models": models, "machine": machine(device)}
    if proc.returncode != 0 or not written:
        row["note"] = f"demo failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--timeout", type=float, default=600, help="give up after this many seconds")
    args = parser.parse_args()
    # The demo picks its own device; --device is accepted for a uniform command line and recorded.
    device = setup(args)
    guarded("demo_cold", TARGET_S, "<", device, lambda: bench_demo(device, args.timeout))


if __name__ == "__main__":
    main()
