"""The package and a user's script type-check: pyright in basic mode reports no error.

A user's editor resolves ``mlmi_zoo`` from the README's editable install (src layout, ``py.typed``),
and ``load(uri, ProtoPNet)`` / ``explain`` return precise types; this test keeps it so.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _pyright(*paths: str) -> dict:
    exe = shutil.which("pyright")
    if exe is None:
        pytest.fail("pyright is not installed; it is part of the test extra: pip install -e '.[test]'")
    # -p names the configuration: without it pyright may take a pyrightconfig.json of a folder above.
    run = subprocess.run([exe, "--outputjson", "-p", str(REPO / "pyproject.toml"), "--pythonpath", sys.executable,
                          *paths], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    try:
        return json.loads(run.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"pyright did not report JSON (exit {run.returncode}): {run.stdout[-2000:]} {run.stderr[-2000:]}")


def test_package_and_user_script_type_check() -> None:
    report = _pyright()  # [tool.pyright] in pyproject.toml: src/ and examples/, basic mode
    errors = [d for d in report["generalDiagnostics"] if d["severity"] == "error"]
    listing = "\n".join(f"{Path(d['file']).relative_to(REPO)}:{d['range']['start']['line'] + 1}: {d['message']}"
                        for d in errors[:40])
    assert not errors, f"pyright reports {len(errors)} error(s):\n{listing}"
    checked = report["summary"]["filesAnalyzed"]
    assert checked >= 60, f"pyright analysed only {checked} files; is the include list in pyproject.toml right?"
