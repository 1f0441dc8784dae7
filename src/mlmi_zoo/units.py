"""Physical units, parsed and converted by pint — never by hand-written factors.

One shared :class:`pint.UnitRegistry` for the whole library, extended with the Hounsfield unit
(``HU``), a dimensionless CT number, and the optic-disc diameter (``DD``) of fundus photographs.
pint is imported on first use so ``import mlmi_zoo`` stays fast.
"""
from __future__ import annotations

import functools
from typing import Any


@functools.lru_cache(maxsize=None)
def ureg() -> Any:
    """Return the library's pint registry (created on first call)."""
    import pint

    reg = pint.UnitRegistry()
    # Hounsfield units: a linear rescaling of attenuation; pint treats them as a named count so that
    # "HU" parses, round-trips, and cannot be silently converted into a length or a volume.
    reg.define("hounsfield_unit = [ct_number] = HU")
    # The optic-disc diameter, the clinical ruler of fundus photographs (no pixel size in mm is known):
    # its own base dimension, so a length in DD can never be silently converted to mm.
    reg.define("optic_disc_diameter = [optic_disc] = DD")
    return reg


def parse_unit(unit: str) -> Any:
    """Parse a unit string (``"mm"``, ``"mm^2"``, ``"mL"``, ``"HU"``) into a pint unit.

    Raises:
        ValueError: if pint does not know the unit; the message names it.
    """
    import pint

    try:
        return ureg().Unit(unit)
    except (pint.errors.UndefinedUnitError, ValueError, AttributeError, TypeError) as err:
        raise ValueError(
            f"unknown unit {unit!r}: expected a unit pint can parse, e.g. 'mm', 'mm^2', 'mL', 'HU'"
        ) from err


def quantity(value: Any, unit: str | None = None) -> Any:
    """Build a pint quantity from ``value`` and ``unit``, or parse ``value`` when it is a string.

    ``quantity("1.4 cm")`` and ``quantity(14, "mm")`` are the same length.
    """
    if isinstance(value, str):
        try:
            q = ureg().Quantity(value)
        except Exception as err:  # pint raises several unrelated types for unparseable text
            raise ValueError(f"cannot parse {value!r} as a physical quantity such as '14 mm'") from err
        return q
    return ureg().Quantity(value, parse_unit(unit) if unit else "")


def convert(value: Any, from_unit: str, to_unit: str) -> Any:
    """Convert a number or array ``value`` from ``from_unit`` to ``to_unit`` with pint.

    Raises:
        ValueError: when the units have different dimensions (e.g. mm to mL).
    """
    import pint

    try:
        return quantity(value, from_unit).to(parse_unit(to_unit)).magnitude
    except pint.errors.DimensionalityError as err:
        raise ValueError(f"cannot convert {from_unit!r} to {to_unit!r}: {err}") from err
