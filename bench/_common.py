"""Plumbing shared by the benchmark scripts: timing, machine description, rows, memory workers.

Every benchmark times its baseline and its candidate in the same process, interleaved (baseline,
candidate, candidate, baseline, ...) after a warm-up, and reports medians, so that load from other
jobs on a shared machine hits both alike. Peak memory is measured in a fresh subprocess (a
``--worker`` invocation of the same script): on CPU the growth of the peak resident set size over
the resident set size right after the imports (see :class:`MemoryProbe`); on CUDA
``torch.cuda.max_memory_allocated`` over the memory allocated before the workload.
"""
from __future__ import annotations

import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = [
    "Timing",
    "time_fn",
    "compare",
    "sync",
    "machine",
    "emit",
    "ratio_row",
    "missing_row",
    "guarded",
    "MemoryProbe",
    "run_worker",
    "worker_result",
    "add_common_args",
    "check_device",
    "setup",
]

BENCH_DIR = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    """Medians over the repeats (after the warm-up).

    Attributes:
        wall_s: median wall-clock seconds (``time.perf_counter``; CUDA synchronised).
        cpu_s: median CPU seconds of this process, all threads (``time.process_time``).
        walls: every repeat's wall-clock seconds.
    """

    wall_s: float
    cpu_s: float
    walls: tuple[float, ...]


def sync(device: str | torch.device) -> None:
    """Wait for queued CUDA work, so that a timer measures the work and not its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _once(fn: Callable[[], Any], device: str | torch.device) -> tuple[float, float]:
    sync(device)
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - w0, time.process_time() - c0


def _timing(samples: list[tuple[float, float]]) -> Timing:
    walls = tuple(w for w, _ in samples)
    return Timing(statistics.median(walls), statistics.median(c for _, c in samples), walls)


def time_fn(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1, device: str | torch.device = "cpu") -> Timing:
    """Median wall and CPU time of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    return _timing([_once(fn, device) for _ in range(repeats)])


def compare(baseline: Callable[[], Any], candidate: Callable[[], Any], repeats: int = 5, warmup: int = 1,
            device: str | torch.device = "cpu") -> tuple[Timing, Timing]:
    """Time two functions interleaved (B, C, B, C, ...) after warming both up.

    Interleaving makes slow drifts of the machine's load hit both functions alike; the order is
    alternated each repeat so neither always runs right after the other's allocations.

    Returns:
        ``(baseline timing, candidate timing)``.
    """
    for _ in range(warmup):
        baseline()
        candidate()
    b, c = [], []
    for k in range(repeats):
        if k % 2 == 0:
            b.append(_once(baseline, device))
            c.append(_once(candidate, device))
        else:
            c.append(_once(candidate, device))
            b.append(_once(baseline, device))
    return _timing(b), _timing(c)


# ------------------------------------------------------------------------------------------------
# machine and rows
# ------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Where a number was measured: CPU model, cores, torch, device, threads, load average now."""
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(dev) if dev.type == "cpu" else f"{dev} ({name})",
        "python": platform.python_version(),
        "loadavg": [round(v, 2) for v in os.getloadavg()],
    }


def emit(row: dict[str, Any]) -> None:
    """Print one result row as a JSON line (what ``run_all.py`` collects)."""
    print(json.dumps(row), flush=True)


def ratio_row(name: str, baseline: Timing, candidate: Timing, target: float, goal: str, device: str,
              unit: str = "candidate/baseline wall time", invert: bool = False, **extra: Any) -> dict[str, Any]:
    """A row whose value is the ratio of two wall-time medians (``cpu_value``: the same from CPU time).

    Args:
        name: row name.
        baseline, candidate: the two timings.
        target: the threshold.
        goal: ``"<="`` or ``">="``: how ``value`` must compare with ``target``.
        device: where it ran.
        unit: what ``value`` is.
        invert: report baseline/candidate (a speed-up) instead of candidate/baseline.
        extra: further fields for the row.
    """
    value = baseline.wall_s / candidate.wall_s if invert else candidate.wall_s / baseline.wall_s
    cpu_value = baseline.cpu_s / candidate.cpu_s if invert else candidate.cpu_s / baseline.cpu_s
    met = value <= target if goal == "<=" else value >= target
    return {
        "name": name, "value": round(value, 4), "target": target, "goal": goal, "met": bool(met), "unit": unit,
        "cpu_value": round(cpu_value, 4),
        "baseline_s": round(baseline.wall_s, 5), "candidate_s": round(candidate.wall_s, 5),
        "baseline_cpu_s": round(baseline.cpu_s, 5), "candidate_cpu_s": round(candidate.cpu_s, 5),
        "repeats": len(candidate.walls), **extra, "machine": machine(device),
    }


def missing_row(name: str, target: float, goal: str, note: str, device: str = "cpu", **extra: Any) -> dict[str, Any]:
    """A row that could not be measured: ``met`` is False and ``note`` says why (never a made-up value)."""
    return {"name": name, "value": None, "target": target, "goal": goal, "met": False, "note": note, **extra,
            "machine": machine(device)}


def guarded(names: str | dict[str, tuple[float, str]], target: float | None, goal: str | None, device: str,
            fn: Callable[[], dict[str, Any] | list[dict[str, Any]]]) -> None:
    """Run one benchmark and emit its row(s); on failure emit ``met: false`` rows naming the error.

    The traceback goes to stderr, so a failing benchmark is visible and the other rows still run.

    Args:
        names: the row name, or ``{name: (target, goal)}`` when ``fn`` makes several rows.
        target, goal: of the single row (ignored with a dict).
        device: where it runs.
        fn: makes the row(s).
    """
    try:
        rows = fn()
    except Exception as err:  # a benchmark of code that is still being written may fail; report it
        traceback.print_exc()
        expected = names if isinstance(names, dict) else {names: (target, goal)}
        for name, (t, g) in expected.items():
            emit(missing_row(name, t, g, f"not run: {type(err).__name__}: {err}", device))
        return
    for row in rows if isinstance(rows, list) else [rows]:
        emit(row)


# ------------------------------------------------------------------------------------------------
# peak memory in a fresh subprocess
# ------------------------------------------------------------------------------------------------
def _maxrss_bytes() -> int:
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _proc_status_bytes(field: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process from /proc/self/status (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where not supported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class MemoryProbe:
    """Peak memory a workload adds; create it after the imports, call :meth:`peak_bytes` after the work.

    CPU: the growth of the peak resident set size over the resident set size after the imports,
    counting everything the workload allocates at its peak (tensors, allocator caches, buffers).
    On Linux the peak is ``VmHWM`` of /proc/self/status, reset to the current RSS at creation
    (``clear_refs``). ``ru_maxrss`` is not used there: Linux carries it over from the parent
    through fork and exec, so a worker started by a large benchmark process would inherit the
    parent's peak. Elsewhere ``ru_maxrss`` growth after the imports is the fallback (then in a
    fresh process only). CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated at
    creation.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated - allocated before the workload"
        elif _proc_status_bytes("VmHWM") is not None:
            reset = _reset_peak_rss()
            self.base = _proc_status_bytes("VmRSS") if reset else _proc_status_bytes("VmHWM")
            self.method = ("VmHWM growth over VmRSS after imports (peak reset via clear_refs)" if reset
                           else "VmHWM growth after imports, fresh subprocess")
            self._status = True
        else:
            self.base = _maxrss_bytes()
            self.method = "ru_maxrss growth after imports, fresh subprocess"
            self._status = False

    def peak_bytes(self) -> int:
        """Peak bytes added since creation."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated(self.device) - self.base)
        peak = _proc_status_bytes("VmHWM") if self._status else _maxrss_bytes()
        return int(peak - self.base)

    def describe(self) -> dict[str, Any]:
        """What was measured, for the row."""
        out: dict[str, Any] = {"memory_measure": self.method}
        if self.device.type != "cuda":
            out["rss_after_imports_mb"] = round(self.base / 2**20, 1)
        return out


def worker_result(result: dict[str, Any]) -> None:
    """Print a worker's result as the last JSON line on stdout (read by :func:`run_worker`)."""
    print(json.dumps({"worker_result": result}), flush=True)


def run_worker(script: str, args: list[str], timeout: float = 1800) -> dict[str, Any]:
    """Run ``python bench/SCRIPT --worker ARGS`` in a fresh process and return its result dict.

    Raises:
        RuntimeError: when the worker fails or prints no result (its stderr tail is included).
    """
    cmd = [sys.executable, str(BENCH_DIR / script), "--worker", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith('{"worker_result"'):
            return json.loads(line)["worker_result"]
    tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
    raise RuntimeError(f"worker {' '.join(cmd[1:])} exited {proc.returncode} without a result: {tail}")


def add_common_args(parser: Any) -> None:
    """``--device``, ``--repeats`` and ``--threads``, the same in every benchmark script."""
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats after the warm-up (default: 5)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default: 1, reproducible on a shared machine; 0 = torch's default)")


def setup(args: Any) -> str:
    """Apply ``--threads`` and check ``--device``; returns the device.

    Raises:
        SystemExit: when CUDA is requested but not available.
    """
    if getattr(args, "threads", 0) and args.threads > 0:
        torch.set_num_threads(args.threads)
    return check_device(args.device)


def check_device(device: str) -> str:
    """Refuse ``cuda`` when no CUDA device is present, with what to do instead."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device} requested but torch.cuda.is_available() is False; use --device cpu")
    return device


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of ``path`` (none when it does not exist), as a resumable benchmark wrote them.

    Raises:
        ValueError: a line that is not JSON, named by its number.
    """
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number} is not a JSON line ({err})") from err
    return rows


def write_between(readme: Path, start_marker: str, end_marker: str, text: str) -> None:
    """Replace the text between ``start_marker`` and ``end_marker`` in ``readme`` with ``text`` (a table a
    benchmark generates into its section of a README).

    Raises:
        ValueError: ``readme`` lacks the markers.
    """
    doc = readme.read_text(encoding="utf-8")
    start, end = doc.find(start_marker), doc.find(end_marker)
    if start < 0 or end < start:
        raise ValueError(f"{readme} has no {start_marker!r} ... {end_marker!r} block to write the table into")
    readme.write_text(doc[: start + len(start_marker)] + "\n" + text + "\n" + doc[end:], encoding="utf-8")
