"""bench/run_all.py refuses a selection it does not run before it writes anything."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

RUN_ALL = Path(__file__).resolve().parents[1] / "bench" / "run_all.py"


def test_an_unknown_only_name_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    out, readme = tmp_path / "results.json", tmp_path / "README.md"
    readme.write_text("kept\n")
    proc = subprocess.run([sys.executable, str(RUN_ALL), "--only", "bench_nothing", "--out", str(out),
                           "--readme", str(readme)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "bench_nothing" in proc.stderr and "bench_protopnet" in proc.stderr
    assert not out.exists() and readme.read_text() == "kept\n"
