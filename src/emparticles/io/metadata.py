"""Pixel size from vendors' metadata, with where it came from.

Each reader returns a :class:`PixelSize` or ``None``; it never invents a value. Sources, in the
order :func:`tiff_pixel_size` tries them:

- Zeiss SmartSEM ``CZ_SEM`` tag (34118): the SI pixel size in the tag's unnamed tuple (index 3,
  given for a 1024-pixel-wide frame, so scaled by 1024/width), checked against the text keys
  ``ap_image_pixel_size`` / ``ap_pixel_size`` whose units may be pm, nm, µm or μm.
- FEI/Thermo ``FEI_HELIOS``/``FEI_SFEG`` tags (34682/34680): ``[Scan] PixelWidth`` in metres, else
  ``[IRBeam]`` or ``[EBeam]`` HFW / ``[Image] ResolutionX`` (navigation-camera files).
- JEOL SightX TEM TIFF: magnification in the XML ImageDescription with the resolution tags.
- TIFFs saved by DigitalMicrograph (private tags 65009/65010 with units in 65003/65004).
- TIFFs saved by ImageJ/Fiji (``unit=`` in the description, resolution tags in pixels per unit).
- JEOL (``$CM_FULL_SIZE``, ``$$SM_MICRON_BAR``/``$$SM_MICRON_MARKER``) and Hitachi
  (``PixelSize=`` in nm) sidecar ``.txt`` files next to the image.
- Plain TIFF resolution tags, only when they describe a microscope-scale pixel (< 50 µm) rather
  than a print or screen resolution.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from ..units import unit_to_nm

# A resolution tag that gives a pixel larger than this is a print/screen DPI, not a calibration.
_MAX_MEANINGFUL_NM = 50_000.0


@dataclass(frozen=True)
class PixelSize:
    """A calibration: nanometres per pixel along x and y, and its provenance."""

    x_nm: float
    y_nm: float
    source: str
    details: dict = field(default_factory=dict)

    @property
    def nm(self) -> float:
        """The pixel size used for measurements (mean of x and y)."""
        return 0.5 * (self.x_nm + self.y_nm)

    @property
    def is_square(self) -> bool:
        return abs(self.x_nm - self.y_nm) <= 0.01 * max(self.x_nm, self.y_nm)


def _valid(value) -> bool:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(v) and v > 0


def _make(x_nm, y_nm, source, **details) -> PixelSize | None:
    if not (_valid(x_nm) and _valid(y_nm)):
        return None
    return PixelSize(float(x_nm), float(y_nm), source, details)


# ----------------------------------------------------------------------------------- Zeiss
def _zeiss_value_nm(entry) -> float | None:
    """('Image Pixel Size', 2.615, 'µm') -> 2615.0; strings like '2.615 µm' too."""
    if isinstance(entry, (tuple, list)) and len(entry) >= 3:
        value, unit = entry[1], entry[2]
    elif isinstance(entry, str):
        m = re.search(r"([-+0-9.eE]+)\s*([A-Za-zµμ]+)", entry)
        if not m:
            return None
        value, unit = m.group(1), m.group(2)
    else:
        return None
    try:
        nm = float(value) * unit_to_nm(str(unit))
    except (KeyError, ValueError, TypeError):
        return None
    return nm if _valid(nm) else None


def zeiss_pixel_size(cz_sem, width: int) -> PixelSize | None:
    """Pixel size from a parsed ``CZ_SEM`` tag (a dict from tifffile, or raw text/bytes)."""
    if isinstance(cz_sem, (bytes, bytearray)):
        cz_sem = cz_sem.decode("latin-1", "replace")
    if isinstance(cz_sem, str):
        # Unparsed tag: look for "Image Pixel Size = 2.615 µm" style lines.
        for key in ("Image Pixel Size", "Pixel Size"):
            m = re.search(key + r"\s*=\s*([-+0-9.eE]+)\s*([A-Za-zµμ]+)", cz_sem)
            if m:
                nm = _zeiss_value_nm(("", m.group(1), m.group(2)))
                if nm:
                    if key == "Pixel Size":
                        nm = nm * 1024.0 / width
                    return _make(nm, nm, "tiff:CZ_SEM", key=key)
        return None
    if not isinstance(cz_sem, dict):
        return None
    image_nm = _zeiss_value_nm(cz_sem.get("ap_image_pixel_size"))
    display_nm = _zeiss_value_nm(cz_sem.get("ap_pixel_size"))
    tuple_nm = None
    raw = cz_sem.get("")
    if isinstance(raw, (tuple, list)) and len(raw) > 3 and _valid(raw[3]) and width > 0:
        # SI metres for a 1024-wide frame; more digits than the text keys carry.
        tuple_nm = float(raw[3]) * 1e9 * 1024.0 / width
    if tuple_nm is not None:
        reference = image_nm or (display_nm * 1024.0 / width if display_nm else None)
        if reference is None or abs(tuple_nm - reference) <= 0.01 * reference:
            return _make(tuple_nm, tuple_nm, "tiff:CZ_SEM", key="[''][3]*1024/width")
    if image_nm:
        return _make(image_nm, image_nm, "tiff:CZ_SEM", key="ap_image_pixel_size")
    if display_nm and width > 0:
        nm = display_nm * 1024.0 / width
        return _make(nm, nm, "tiff:CZ_SEM", key="ap_pixel_size*1024/width")
    return None


# ------------------------------------------------------------------------------------- FEI
def fei_pixel_size(fei: dict) -> PixelSize | None:
    """Pixel size from a parsed FEI/Thermo metadata dict (INI sections)."""
    if not isinstance(fei, dict):
        return None
    for section in ("Scan", "EScan", "IScan"):
        sec = fei.get(section)
        if isinstance(sec, dict) and _valid(sec.get("PixelWidth")):
            px = float(sec["PixelWidth"]) * 1e9
            py = float(sec["PixelHeight"]) * 1e9 if _valid(sec.get("PixelHeight")) else px
            return _make(px, py, "tiff:FEI", key=f"[{section}] PixelWidth")
    image = fei.get("Image") if isinstance(fei.get("Image"), dict) else {}
    for section in ("IRBeam", "EBeam", "Beam"):
        sec = fei.get(section)
        if not isinstance(sec, dict):
            continue
        if _valid(sec.get("HFW")) and _valid(image.get("ResolutionX")):
            px = float(sec["HFW"]) * 1e9 / float(image["ResolutionX"])
            py = px
            if _valid(sec.get("VFW")) and _valid(image.get("ResolutionY")):
                py = float(sec["VFW"]) * 1e9 / float(image["ResolutionY"])
            return _make(px, py, "tiff:FEI", key=f"[{section}] HFW/ResolutionX")
    return None


# ---------------------------------------------------------------------------- JEOL SightX
def jeol_sightx_pixel_size(description: str, x_resolution, resolution_unit: int) -> PixelSize | None:
    """JEOL SightX TEM TIFF: resolution tags scaled by the imaging magnification."""
    try:
        root = ET.fromstring(description.strip(" \r\n\t\x00\x01"))
    except ET.ParseError:
        return None
    mode = root.findtext(".//ImageFormingSystem/ModeString")
    eos = root.findtext(".//Eos/EosMode")
    mag = root.findtext(".//ImageFormingSystem/SelectorValue")
    if mode != "MAG" or (eos is not None and eos != "eosTEM") or not _valid(mag):
        return None
    num, den = x_resolution
    if not (_valid(num) and _valid(den)):
        return None
    metres_per_unit = 0.0254 if resolution_unit == 2 else 0.01
    nm = (den / num) * metres_per_unit / float(mag) * 1e9
    return _make(nm, nm, "tiff:JEOL-SightX", magnification=float(mag))


# ------------------------------------------------------------------- DigitalMicrograph TIFF
def dm_tiff_pixel_size(tags: dict) -> PixelSize | None:
    """TIFF written by DigitalMicrograph: scales in tags 65009/65010, units in 65003/65004."""
    sy, sx = tags.get(65009), tags.get(65010)
    uy, ux = tags.get(65003), tags.get(65004)
    if not (_valid(sx) or _valid(sy)):
        return None
    try:
        fx = unit_to_nm(str(ux if ux is not None else uy))
        fy = unit_to_nm(str(uy if uy is not None else ux))
    except KeyError:
        return None
    x = float(sx if _valid(sx) else sy) * fx
    y = float(sy if _valid(sy) else sx) * fy
    return _make(x, y, "tiff:DigitalMicrograph")


# ---------------------------------------------------------------------------------- ImageJ
_IMAGEJ_UNITS = {"micron": "um", "microns": "um", "um": "um", "µm": "um", "μm": "um", "nm": "nm",
                 "nanometer": "nm", "pm": "pm", "mm": "mm", "a": "a", "å": "a", "angstrom": "a"}


def imagej_pixel_size(imagej_metadata: dict, x_resolution, y_resolution) -> PixelSize | None:
    """ImageJ/Fiji TIFF: ``unit=`` in the description, resolution tags are pixels per unit."""
    if not isinstance(imagej_metadata, dict):
        return None
    unit = str(imagej_metadata.get("unit", "")).strip().lower()
    if unit.startswith("\\u00b5"):
        unit = "µ" + unit[6:]
    unit = _IMAGEJ_UNITS.get(unit)
    if unit is None:
        return None
    (xn, xd), (yn, yd) = x_resolution, y_resolution
    if not (_valid(xn) and _valid(xd)):
        return None
    x = xd / xn * unit_to_nm(unit)
    y = yd / yn * unit_to_nm(unit) if _valid(yn) and _valid(yd) else x
    return _make(x, y, "tiff:ImageJ")


# ------------------------------------------------------------------------- resolution tags
def resolution_tag_pixel_size(x_resolution, y_resolution, resolution_unit: int) -> PixelSize | None:
    """Plain TIFF resolution tags, kept only if they describe a microscope-scale pixel."""
    if resolution_unit not in (2, 3):  # inch, centimetre; 1 = no absolute unit
        return None
    (xn, xd), (yn, yd) = x_resolution, y_resolution
    if not all(_valid(v) for v in (xn, xd, yn, yd)):
        return None
    nm_per_unit = 2.54e7 if resolution_unit == 2 else 1e7
    x, y = xd / xn * nm_per_unit, yd / yn * nm_per_unit
    if max(x, y) > _MAX_MEANINGFUL_NM:
        return None
    return _make(x, y, "tiff:resolution")


# --------------------------------------------------------------------------------- sidecars
def sidecar_paths(image_path: Path) -> list[Path]:
    """Candidate sidecar files: ``name.txt`` and ``name.tif.txt`` next to the image."""
    return [image_path.with_suffix(".txt"), image_path.with_name(image_path.name + ".txt")]


def parse_sidecar(text: str, width: int | None = None) -> PixelSize | None:
    """Pixel size from a Hitachi (``PixelSize=`` nm) or JEOL (``$$SM_MICRON_BAR``) text file."""
    hitachi = re.search(r"^\s*PixelSize\s*=\s*([-+0-9.eE]+)", text, re.MULTILINE)
    if hitachi and _valid(hitachi.group(1)):
        nm = float(hitachi.group(1))
        return _make(nm, nm, "sidecar:Hitachi", key="PixelSize")
    bar = re.search(r"^\s*\$+(?:SM|CM)_MICRON_BAR\s+([0-9.]+)", text, re.MULTILINE)
    marker = re.search(r"^\s*\$+(?:SM|CM)_MICRON_MARKER\s+([0-9.]+)\s*([A-Za-zµμ]+)", text, re.MULTILINE)
    if bar and marker and _valid(bar.group(1)):
        try:
            length_nm = float(marker.group(1)) * unit_to_nm(marker.group(2))
        except KeyError:
            return None
        nm = length_nm / float(bar.group(1))
        # The bar length refers to the frame in $CM_FULL_SIZE; rescale if the saved image differs.
        full = re.search(r"^\s*\$+CM_FULL_SIZE\s+([0-9]+)\s+([0-9]+)", text, re.MULTILINE)
        if full and width and int(full.group(1)) > 0 and int(full.group(1)) != width:
            nm *= int(full.group(1)) / width
        return _make(nm, nm, "sidecar:JEOL", key="SM_MICRON_MARKER/SM_MICRON_BAR")
    return None


def sidecar_pixel_size(image_path: Path, width: int | None = None) -> PixelSize | None:
    """Look for a JEOL/Hitachi sidecar next to ``image_path`` and read its pixel size."""
    for candidate in sidecar_paths(image_path):
        if candidate.is_file() and candidate != image_path:
            try:
                text = candidate.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            found = parse_sidecar(text, width)
            if found is not None:
                return PixelSize(found.x_nm, found.y_nm, found.source, {**found.details, "file": candidate.name})
    return None


# -------------------------------------------------------------------------- whole TIFF file
def tiff_pixel_size(tif) -> PixelSize | None:
    """Try every TIFF-borne calibration of an open ``tifffile.TiffFile``, vendor tags first."""
    page = tif.pages[0]
    tags = {tag.code: tag.value for tag in page.tags.values()}
    width = int(page.shape[-1] if page.samplesperpixel == 1 else page.shape[-2])
    found = None
    if 34118 in tags:
        found = zeiss_pixel_size(tags[34118], width)
    if found is None and (34682 in tags or 34680 in tags):
        found = fei_pixel_size(tags.get(34682) or tags.get(34680))
    xres, yres = tags.get(282, (0, 0)), tags.get(283, (0, 0))
    resunit = int(tags.get(296, 1))
    if found is None and tags.get(271) == "JEOL Ltd." and isinstance(tags.get(270), str):
        found = jeol_sightx_pixel_size(tags[270], xres, resunit)
    if found is None and (65009 in tags or 65010 in tags):
        found = dm_tiff_pixel_size(tags)
    if found is None and tif.is_imagej:
        found = imagej_pixel_size(tif.imagej_metadata or {}, xres, yres)
    if found is None and not tif.is_imagej and 34118 not in tags:
        found = resolution_tag_pixel_size(xres, yres, resunit)
    return found
