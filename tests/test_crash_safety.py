"""SIGKILL during fine-tuning or while a result is written: nothing looks finished, and --resume picks up.

A killed process must never leave a folder that looks like a finished model (``final/`` with its
config and weights) or a results/card file that is half written: every such file goes to a
temporary path first and is renamed when complete (``mlmi_zoo._weights.atomic_write``). These tests
kill real processes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_finetune_cli import BASELINE_XRAY, _env, write_xrays

from mlmi_zoo.training.trainer import KILL_AT_STEP_ENV

pytestmark = pytest.mark.usefixtures("one_thread")


def _finetune(data: Path, out: Path, *extra: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "mlmi_zoo.cli", "finetune", BASELINE_XRAY, "--data", str(data), "--out", str(out),
               "epochs=2", "batch_size=4", "--val-fraction", "0.25", *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_sigkill_during_finetune_leaves_no_finished_model_and_resume_completes(tmp_path) -> None:
    data = write_xrays(tmp_path / "xrays")
    out = tmp_path / "run"
    killed = _finetune(data, out, env={**_env(), KILL_AT_STEP_ENV: "5"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "final").exists(), "a killed fine-tuning left a folder that looks like a finished model"
    assert any((out / "checkpoints").iterdir()), "the killed run kept no checkpoint to resume from"
    resumed = _finetune(data, out, "--resume", env=_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / "final" / "config.json").is_file() and (out / "final" / "model.safetensors").is_file()


def test_sigkill_while_a_results_file_is_written_leaves_the_old_file_whole(tmp_path) -> None:
    target = tmp_path / "results.json"
    target.write_text(json.dumps({"finished": True}))
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from mlmi_zoo._weights import atomic_write

        def half_then_die(p: Path) -> None:
            p.write_text('{{"finished": fal')  # half of the new document
            os.kill(os.getpid(), signal.SIGKILL)

        atomic_write(Path({str(target)!r}), half_then_die)
    """)
    result = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL
    assert json.loads(target.read_text()) == {"finished": True}  # the reader never sees the half-written file
