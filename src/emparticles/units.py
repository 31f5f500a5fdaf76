"""Parsing of lengths such as ``"2.5nm"`` or ``"0.3 µm"`` into nanometres."""

from __future__ import annotations

import math
import re

from .errors import InputError

#: nanometres per unit; keys are lower-case spellings seen in files and on command lines.
NM_PER_UNIT: dict[str, float] = {
    "fm": 1e-6,
    "pm": 1e-3,
    "a": 0.1,
    "å": 0.1,
    "angstrom": 0.1,
    "nm": 1.0,
    "nanometer": 1.0,
    "nanometre": 1.0,
    "um": 1e3,
    "µm": 1e3,  # micro sign U+00B5
    "μm": 1e3,  # Greek mu U+03BC
    "micron": 1e3,
    "micrometer": 1e3,
    "micrometre": 1e3,
    "mm": 1e6,
    "cm": 1e7,
    "m": 1e9,
}

_LENGTH = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-zµμÅå]*)\s*(?:/\s*px)?\s*$")


def unit_to_nm(unit: str) -> float:
    """Nanometres in one ``unit`` (``"nm"``, ``"µm"``, ``"pm"``...); raises ``KeyError``."""
    return NM_PER_UNIT[unit.strip().lower().replace("\u00b5", "µ")]


def parse_length_nm(text: str, what: str = "--pixel-size") -> float:
    """Parse a positive length with its unit into nanometres.

    ``"2.5nm"``, ``"25 A"``, ``"0.3um"``, ``"0.3µm"``, ``"300pm"`` are accepted; a bare number is
    refused, because silently guessing the unit of a pixel size is how results go wrong by 1000x.
    """
    stripped = str(text).strip()
    if stripped.startswith("-"):
        raise InputError(None, f"{what} '{text}' is negative", "give a positive length, e.g. 2.5nm")
    match = _LENGTH.match(stripped)
    if not match:
        raise InputError(
            None,
            f"{what} '{text}' is not a length",
            "write a number followed by a unit, e.g. 2.5nm, 25A, 0.3um or 300pm",
        )
    value, unit = float(match.group(1)), match.group(2)
    if value == 0:
        raise InputError(None, f"{what} '{text}' is zero", "give the pixel size of the image, e.g. 2.5nm")
    if not unit:
        raise InputError(
            None,
            f"{what} '{text}' has no unit",
            f"add one: {text}nm, {text}um, {text}pm or {text}A",
        )
    try:
        nm = value * unit_to_nm(unit)
    except KeyError:
        raise InputError(
            None,
            f"{what} '{text}': unknown unit '{unit}'",
            "use one of pm, A, nm, um (µm) or mm",
        ) from None
    if not (nm > 0 and math.isfinite(nm)):
        raise InputError(None, f"{what} '{text}' must be greater than zero", "give a positive length")
    if nm < MIN_PIXEL_NM or nm > MAX_PIXEL_NM:
        raise InputError(None, f"{what} '{text}' is {nm:g} nm, outside what an electron micrograph's pixel can be "
                               f"({MIN_PIXEL_NM:g} nm to {MAX_PIXEL_NM / 1e6:g} mm)", "check the unit (pm, A, nm, um, mm)")
    return nm


#: Plausible pixel sizes of electron micrographs, from atomic-resolution STEM to navigation
#: camera views (an FEI navcam frame is 264 um per pixel)
MIN_PIXEL_NM, MAX_PIXEL_NM = 1e-3, 1e7


def parse_area_px(text: str, pixel_size_nm: float | None, what: str = "--min-area") -> float:
    """Parse a minimum area: a bare number is pixels, ``"100nm2"``/``"0.01um2"`` is physical.

    Returns pixels. A physical area needs a known pixel size.
    """
    s = str(text).strip().replace("^2", "2").replace("²", "2")
    try:
        value = float(s)
    except ValueError:
        value = None
    if value is not None:
        if value < 0:
            raise InputError(None, f"{what} '{text}' is negative", "give 0 or a positive number of pixels")
        return value
    match = re.match(r"^([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-zµμ]+)2$", s)
    if not match:
        raise InputError(None, f"{what} '{text}' is not an area", "write pixels (20) or an area (100nm2, 0.01um2)")
    try:
        nm2 = float(match.group(1)) * unit_to_nm(match.group(2)) ** 2
    except KeyError:
        raise InputError(None, f"{what} '{text}': unknown unit '{match.group(2)}'", "use nm2 or um2") from None
    if pixel_size_nm is None:
        raise InputError(
            None,
            f"{what} '{text}' is a physical area but the pixel size is unknown",
            "give --pixel-size, or the minimum area in pixels",
        )
    return nm2 / pixel_size_nm**2
