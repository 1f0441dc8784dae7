"""A concept bottleneck on the user's own concepts: typed concepts read off the columns of their CSV.

A concept-bottleneck model (Koh, Nguyen, Tang, Mussmann, Pierson, Kim and Liang, "Concept
Bottleneck Models", ICML 2020) predicts the label from concepts a clinician names. A user
fine-tuning a zoo bottleneck on their data rarely annotates the base model's concepts (LIDC's
spiculation ratings, IDRiD's lesion areas); they annotate their own. ``mlmi-zoo finetune
cbm_... --concepts calcification,mass,tissue:ordinal`` replaces the bottleneck with the columns it
names (the concept and label heads start afresh; the backbone keeps the base model's weights).

Each word is ``NAME`` or ``NAME:KIND``, ``NAME`` a column of the CSV, ``KIND`` one of ``binary``,
``ordinal``, ``categorical``, ``continuous``. Without a kind it is read off the column:

* a name with a unit suffix (``thickness_mm``, ``area_mm2``: :func:`~mlmi_zoo.training.datasets.folder_csv.unit_from_column`)
  is a continuous concept in that unit;
* values 0 and 1 only (blank = unknown) make a binary concept;
* anything else must say its kind: integer codes ``0 .. K-1`` are the levels of an ordinal
  (lowest first) or categorical concept, named by their codes (``"0"``, ``"1"``, ...).

Every problem is reported with its row and column, all at once, like the CSV loader does.
"""
from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from mlmi_zoo.specs import ConceptKind, ConceptSpec

__all__ = ["concepts_from_csv", "parse_concept_word", "CONCEPT_KINDS"]

CONCEPT_KINDS: tuple[str, ...] = ("binary", "ordinal", "categorical", "continuous")


def parse_concept_word(word: str) -> tuple[str, str | None]:
    """``"tissue:ordinal"`` -> ``("tissue", "ordinal")``; ``"calcification"`` -> ``("calcification", None)``.

    Raises:
        ValueError: an empty name or an unknown kind.
    """
    name, _, kind = word.strip().partition(":")
    name, kind = name.strip(), kind.strip()
    if not name:
        raise ValueError(f"concept {word!r} has no column name; write NAME or NAME:KIND")
    if kind and kind not in CONCEPT_KINDS:
        raise ValueError(f"concept {word!r}: kind {kind!r} is not one of {', '.join(CONCEPT_KINDS)}")
    return name, kind or None


def _number(text: str) -> float | None:
    """The cell as a number, None when blank; NaN when it is not a number."""
    text = text.strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        return math.nan


def concepts_from_csv(csv_path: str | Path, words: Sequence[str]) -> tuple[ConceptSpec, ...]:
    """The typed concepts that the CSV's columns ``words`` hold (see the module docstring).

    Args:
        csv_path: the user's CSV (every row is read: training and validation cases).
        words: ``NAME`` or ``NAME:KIND``, one per concept, in bottleneck order.

    Returns:
        one :class:`~mlmi_zoo.specs.ConceptSpec` per word, in the order given.

    Raises:
        ValueError: no words, a name given twice, a column the CSV lacks, a cell that is not a
            number (its row and column), values the kind cannot take (binary: 0/1; levels: integer
            codes from 0), a column with no value at all, or a kind the values do not settle.
    """
    from mlmi_zoo.training.datasets.user_files import has_unit_suffix, unit_from_column

    if not words:
        raise ValueError("no concepts given; name at least one column of the CSV (NAME or NAME:KIND)")
    parsed = [parse_concept_word(w) for w in words]
    names = [n for n, _ in parsed]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"concepts {twice} are given more than once")
    path = Path(csv_path)
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    header = [h.strip() for h in rows[0]] if rows else []
    missing = [n for n in names if n not in header]
    if missing:
        raise ValueError(f"{path.name} has no column {missing[0]!r}" + (f" (nor {missing[1:]})" if missing[1:] else "")
                         + f" for the concepts; its columns are {header}")
    problems: list[str] = []
    specs: list[ConceptSpec] = []
    for name, kind in parsed:
        col = header.index(name)
        values: list[float] = []
        for row_number, row in enumerate(rows[1:], start=2):
            if not any(cell.strip() for cell in row):
                continue  # a blank line
            value = _number(row[col]) if col < len(row) else None
            if value is None:
                continue
            if math.isnan(value):
                problems.append(f"row {row_number}, column {name!r}: {row[col].strip()!r} is not a number "
                                "(concept columns hold numbers; blank = unknown)")
                continue
            values.append(value)
        if not values:
            problems.append(f"column {name!r} holds no value in any row; a concept needs annotated cases")
            continue
        distinct = sorted(set(values))
        if kind is None:
            if has_unit_suffix(name):
                kind = "continuous"
            elif set(distinct) <= {0.0, 1.0}:
                kind = "binary"
            else:
                shown = ", ".join(f"{v:g}" for v in distinct[:6]) + (", ..." if len(distinct) > 6 else "")
                problems.append(f"column {name!r} holds {len(distinct)} values ({shown}): say its kind, e.g. "
                                f"'{name}:ordinal' or '{name}:categorical' (integer codes 0..K-1) or "
                                f"'{name}:continuous' with a unit suffix in the name ({name}_mm)")
                continue
        if kind == "continuous":
            if not has_unit_suffix(name):
                problems.append(f"continuous concept {name!r} needs its unit in the column name, e.g. {name}_mm, "
                                f"{name}_mm2 or {name}_hu")
                continue
            specs.append(ConceptSpec(name, "continuous", unit=unit_from_column(name)))
        elif kind == "binary":
            bad = [v for v in distinct if not 0.0 <= v <= 1.0]
            if bad:
                problems.append(f"binary concept {name!r} takes 0, 1 or a probability; the column holds {bad[0]:g}")
                continue
            specs.append(ConceptSpec(name, "binary"))
        else:
            bad = [v for v in distinct if v != int(v) or v < 0]
            if bad:
                problems.append(f"{kind} concept {name!r} takes integer codes 0..K-1 (its levels, "
                                f"{'lowest first' if kind == 'ordinal' else 'in any order'}); the column holds {bad[0]:g}")
                continue
            count = int(distinct[-1]) + 1
            if count < 2:
                problems.append(f"{kind} concept {name!r} needs at least two levels; the column holds only code 0")
                continue
            specs.append(ConceptSpec(name, cast(ConceptKind, kind), levels=tuple(str(i) for i in range(count))))
    if problems:
        raise ValueError(f"cannot read the concepts of {path}:\n" + "\n".join(f"  - {p}" for p in problems))
    return tuple(specs)
