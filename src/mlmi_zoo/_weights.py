"""Safe weights I/O: safetensors only, checksums checked before deserialising, atomic writes."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".tar")


class WeightsError(ValueError):
    """A weights file is refused: wrong format, wrong checksum, or unreadable."""


class MissingWeightsError(WeightsError, FileNotFoundError):
    """The weights file a model folder names does not exist (also a ``FileNotFoundError``)."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)`` (its return value is ignored) and move the result onto ``path`` atomically.

    A crash at any point leaves the previous ``path`` intact: the new content is written to a
    temporary file in the same directory, flushed to disk, then renamed over the target.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_weights(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> str:
    """Save tensors to a safetensors file atomically and return its sha256.

    Tensors are detached, moved to CPU and made contiguous; shared storage is cloned, because
    safetensors refuses aliasing tensors.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise WeightsError(f"weights are saved as .safetensors only, got {path.name!r}")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata or {}))
    return sha256_file(path)


def check_weights_file(path: str | os.PathLike, expected_sha256: str | None) -> Path:
    """Refuse a weights file before it is deserialised.

    Refused: a pickle-format checkpoint (``.bin``, ``.pt``, ``.pth``, ...), a file that is not
    safetensors, a file whose sha256 differs from ``expected_sha256``, and a truncated file.

    Raises:
        WeightsError: saying which file and why.
        MissingWeightsError: when the file does not exist (a ``WeightsError`` and a ``FileNotFoundError``).
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise WeightsError(
            f"refusing {path}: pickle checkpoints ({', '.join(PICKLE_SUFFIXES)}) can execute code when loaded; "
            "convert the weights to .safetensors with a trusted tool"
        )
    if path.suffix != ".safetensors":
        raise WeightsError(f"refusing {path}: expected a .safetensors file")
    if not path.is_file():
        raise MissingWeightsError(f"weights file not found: {path}; the model folder is incomplete")
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual != expected_sha256.lower():
            raise WeightsError(
                f"refusing {path}: sha256 {actual} differs from the recorded {expected_sha256}; "
                "the file is corrupt or was modified — download it again"
            )
    _check_safetensors_header(path)
    return path


def _check_safetensors_header(path: Path) -> None:
    """Validate the safetensors header and that the file is as long as the header says."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"refusing {path}: {size} bytes is too short for a safetensors file")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise WeightsError(f"refusing {path}: not a safetensors file (header length {n} for a file of {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise WeightsError(f"refusing {path}: safetensors header is not valid JSON") from err
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise WeightsError(
            f"refusing {path}: file has {size} bytes but its header describes {8 + n + end}; the file is truncated or padded"
        )


def load_weights(path: str | os.PathLike, expected_sha256: str | None) -> dict[str, torch.Tensor]:
    """Check (see :func:`check_weights_file`) and then load a safetensors file to CPU tensors."""
    from safetensors.torch import load_file

    return load_file(str(check_weights_file(path, expected_sha256)), device="cpu")


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """The hex sha256 of named tensors: name, dtype, shape and bytes of each, in name order.

    Identifies tensors that are not stored in a file of their own (a frozen pretrained backbone left
    out of a model's weights file and rebuilt from its source on load).
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
