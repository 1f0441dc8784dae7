"""Where the user keeps real data files: an explicit argument, else ``$MLMI_ZOO_DATA``, else an error.

The data belong to the user, so the library assumes no folder of its own: a loader is told where its
file is (an argument such as ``path_or_dir=`` or ``lidc_path=``), or reads the folder from the
environment variable ``MLMI_ZOO_DATA``. Nothing is guessed and nothing is downloaded. Recipes name
files relative to that folder (MedMNIST by ``flag``, LIDC-IDRI by its fixed file name), so a recipe
runs unchanged on any machine once ``MLMI_ZOO_DATA`` is set.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DATA_ENV_VAR", "DataNotFoundError", "data_file", "data_root"]

DATA_ENV_VAR = "MLMI_ZOO_DATA"


class DataNotFoundError(FileNotFoundError):
    """A data file is not where the user's argument or ``$MLMI_ZOO_DATA`` says, or no place was given."""


def _how_to_set(file: str, argument: str) -> str:
    return (f"pass {argument}=/path/to/data (the folder that holds {file}) or "
            f"`export {DATA_ENV_VAR}=/path/to/data`")


def data_root(explicit: str | os.PathLike[str] | None, *, file: str, argument: str, hint: str = "") -> Path:
    """The folder the user keeps data in: ``explicit``, else ``$MLMI_ZOO_DATA``.

    Args:
        explicit: a folder the caller was given, or ``None``.
        file: the file the caller looks for (named in the error).
        argument: the caller's parameter that takes the folder (named in the error).
        hint: where to obtain the file, appended to the error.

    Raises:
        DataNotFoundError: neither ``explicit`` nor ``$MLMI_ZOO_DATA`` is given.
    """
    if explicit is not None:
        return Path(explicit)
    if os.environ.get(DATA_ENV_VAR):
        return Path(os.environ[DATA_ENV_VAR])
    raise DataNotFoundError(f"no data folder given to look for {file} in: {_how_to_set(file, argument)}"
                            + (f". {hint}" if hint else ""))


def data_file(file: str, explicit: str | os.PathLike[str] | None, *, argument: str, hint: str = "") -> Path:
    """The data file ``file``: ``explicit`` when it names a file, else ``file`` in :func:`data_root`.

    Args:
        file: the file name, e.g. ``"pneumoniamnist.npz"``.
        explicit: the file itself (any name; a path with an extension counts as a file), a folder
            holding ``file``, or ``None`` for ``$MLMI_ZOO_DATA``.
        argument: the caller's parameter that takes the file or folder (named in the error).
        hint: where to obtain the file, appended to the error.

    Raises:
        DataNotFoundError: no folder given, or the file is not there; the message names the path looked
            at and how to point the library at the right folder.
    """
    given = Path(explicit) if explicit is not None else None
    if given is not None and (given.is_file() or (given.suffix and not given.is_dir())):
        path = given
    else:
        path = data_root(explicit, file=file, argument=argument, hint=hint) / file
    if path.is_file():
        return path
    origin = f"{argument}={str(explicit)!r}" if explicit is not None else f"${DATA_ENV_VAR}={os.environ[DATA_ENV_VAR]!r}"
    raise DataNotFoundError(f"{file} not found: looked for {str(path)!r} (from {origin}); {_how_to_set(file, argument)}"
                            + (f". {hint}" if hint else ""))
