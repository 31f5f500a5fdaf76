"""Reading micrographs: TIFF (8/16-bit, palette, multi-page), PNG, JPEG, BMP, Gatan dm3/dm4."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..types import Micrograph
from .metadata import PixelSize, sidecar_pixel_size, tiff_pixel_size

TIFF_SUFFIXES = {".tif", ".tiff"}
PILLOW_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
DM_SUFFIXES = {".dm3", ".dm4"}
IMAGE_SUFFIXES = TIFF_SUFFIXES | PILLOW_SUFFIXES | DM_SUFFIXES

#: Smallest image side that can hold a measurable particle.
MIN_SIDE_PX = 16


def read_micrograph(path: str | Path, pixel_size_nm: float | None = None) -> Micrograph:
    """Read one micrograph and its calibration.

    Parameters
    ----------
    path : image file (TIFF, PNG, JPEG, BMP, dm3, dm4).
    pixel_size_nm : a user-given pixel size that overrides the file's metadata.

    Returns
    -------
    Micrograph with (H, W) pixels in their original dtype (uint8, uint16 or float32); colour
    images that carry the same grey in every channel become one channel.

    Raises
    ------
    InputError : the file is missing, empty, truncated, not an image, or unusable.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found", "check the path")
    if path.is_dir():
        raise InputError(path, "is a folder, not an image", "pass the folder to 'analyze', which reads the images in it")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputError(path, f"cannot be read ({exc.strerror})", "check the file's permissions") from None
    if size == 0:
        raise InputError(path, "is empty (0 bytes)", "copy the file again from the microscope PC")
    suffix = path.suffix.lower()
    notes: list[str] = []
    metadata: dict = {}
    calib: PixelSize | None = None
    try:
        if suffix in TIFF_SUFFIXES:
            pixels, calib, metadata = _read_tiff(path, notes)
        elif suffix in DM_SUFFIXES:
            pixels, calib, metadata = _read_dm(path, notes)
        else:
            pixels = _read_pillow(path, notes)
    except InputError:
        raise
    except PermissionError:
        raise InputError(path, "cannot be read (permission denied)", "check the file's permissions") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure means the same to the user
        kind = suffix.lstrip(".").upper() or "image"
        raise InputError(
            path,
            f"is not a readable {kind} file (truncated, corrupt or another format: {type(exc).__name__}: {exc})",
            "re-export the image from the microscope software as TIFF, PNG or dm3/dm4",
        ) from None

    pixels = _to_grey(path, pixels, notes)
    pixels = _normalise_dtype(path, pixels, notes)
    if min(pixels.shape) < MIN_SIDE_PX:
        raise InputError(
            path,
            f"is only {pixels.shape[1]}x{pixels.shape[0]} pixels, too small to hold measurable particles",
            f"use an image at least {MIN_SIDE_PX}x{MIN_SIDE_PX} pixels",
        )

    if calib is None and suffix not in DM_SUFFIXES:
        calib = sidecar_pixel_size(path, pixels.shape[1])
    if calib is not None and calib.x_nm != calib.y_nm:
        differ = abs(calib.x_nm - calib.y_nm) / max(calib.x_nm, calib.y_nm)
        notes.append(
            f"pixels are not square ({calib.x_nm:.8g} nm wide x {calib.y_nm:.8g} nm high, {100 * differ:.2g}% apart); "
            "lengths use their mean" + ("" if calib.is_square else ": areas and Feret angles are distorted, resample "
                                        "the image to square pixels for exact shapes")
        )
    if calib is not None:
        metadata["pixel_size_x_nm"] = calib.x_nm
        metadata["pixel_size_y_nm"] = calib.y_nm
        metadata["pixel_size_details"] = calib.details
    if pixel_size_nm is not None:
        if calib is not None:
            metadata["file_pixel_size_nm"] = calib.nm
            metadata["file_pixel_size_source"] = calib.source
        return Micrograph(pixels, float(pixel_size_nm), "user", path, notes=tuple(notes), metadata=metadata)
    if calib is None:
        return Micrograph(pixels, None, "", path, notes=tuple(notes), metadata=metadata)
    return Micrograph(pixels, calib.nm, calib.source, path, notes=tuple(notes), metadata=metadata)


def _read_tiff(path: Path, notes: list[str]):
    import tifffile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with tifffile.TiffFile(path) as tif:
            if len(tif.pages) == 0:
                raise InputError(path, "TIFF holds no image", "re-export the image")
            n_pages = len(tif.pages)
            if n_pages > 1:
                notes.append(f"multi-page TIFF ({n_pages} pages): only the first page is analysed")
            page = tif.pages[0]
            pixels = page.asarray()
            if page.photometric == tifffile.PHOTOMETRIC.PALETTE and page.colormap is not None:
                pixels = _apply_palette(pixels, page.colormap, notes)
            calib = tiff_pixel_size(tif)
            metadata = {"format": "TIFF", "pages": n_pages}
            fei = page.tags.get(34682) or page.tags.get(34680)
            if fei is not None:
                from .infobar import fei_infobar_rows

                rows = fei_infobar_rows(fei.value, int(pixels.shape[0]))
                if rows:
                    metadata["infobar_rows_from_metadata"] = rows
                    metadata["infobar_metadata_source"] = "tiff:FEI [Image] ResolutionY"
            cz = page.tags.get(34118)
            if cz is not None and isinstance(cz.value, dict):
                mag = cz.value.get("ap_mag")
                if isinstance(mag, tuple) and len(mag) >= 2:
                    metadata["magnification"] = str(mag[1])
    return pixels, calib, metadata


def _apply_palette(index: np.ndarray, colormap: np.ndarray, notes: list[str]) -> np.ndarray:
    """Palette (indexed) image -> grey values; a grey palette keeps its 8/16-bit range."""
    cmap = np.asarray(colormap)
    if cmap.ndim == 2 and cmap.shape[0] == 3:
        if np.array_equal(cmap[0], cmap[1]) and np.array_equal(cmap[0], cmap[2]):
            grey = cmap[0]
        else:
            notes.append("colour palette converted to grey (luminance)")
            grey = 0.299 * cmap[0] + 0.587 * cmap[1] + 0.114 * cmap[2]
        if grey.max() > 255:
            grey = np.round(grey / 257.0)
        return grey.astype(np.uint8)[index]
    return index


def _read_dm(path: Path, notes: list[str]):
    from rsciio.digitalmicrograph import file_reader

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        signals = file_reader(str(path))
    images = [s for s in signals if np.asarray(s["data"]).ndim == 2]
    if not images:
        raise InputError(path, "holds no 2-D image (a spectrum or a stack?)", "export a single image")
    if len(signals) > 1:
        notes.append(f"file holds {len(signals)} datasets: the first 2-D image is analysed")
    sig = images[0]
    calib = None
    axes = {a.get("name"): a for a in sig.get("axes", [])}
    ax_x, ax_y = axes.get("x"), axes.get("y")
    if ax_x is not None and ax_y is not None:
        from ..units import unit_to_nm

        try:
            fx = unit_to_nm(str(ax_x.get("units")))
            fy = unit_to_nm(str(ax_y.get("units")))
            x, y = float(ax_x["scale"]) * fx, float(ax_y["scale"]) * fy
            if x > 0 and y > 0 and not (x == fx and y == fy and str(ax_x.get("units")) in ("", "px")):
                calib = PixelSize(x, y, "dm:calibration")
        except (KeyError, TypeError, ValueError):
            units = ax_x.get("units")
            if units not in (None, "", "<undefined>"):
                notes.append(f"calibration in '{units}' is not a length (diffraction?): pixel size unknown")
    return np.asarray(sig["data"]), calib, {"format": path.suffix.lstrip(".").lower()}


#: Largest image accepted, in pixels (20,000 x 20,000: a stitched montage). Pillow's own guard
#: against decompression bombs stops at 89 MP with a raw warning, below what microscopes write.
MAX_IMAGE_PIXELS = 400_000_000


def _read_pillow(path: Path, notes: list[str]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, MAX_IMAGE_PIXELS)
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise InputError(path, f"is {im.width} x {im.height} pixels, above the {MAX_IMAGE_PIXELS / 1e6:.0f} MP "
                                       "emparticles accepts", "crop or bin the image (e.g. 2x2 in Fiji) first")
            im.load()
            if im.mode == "P":
                im = im.convert("RGB")
            if im.mode in ("I;16", "I;16B", "I;16L"):
                return np.asarray(im).astype(np.uint16)
            if im.mode == "I":
                return np.asarray(im)
            if im.mode == "F":
                return np.asarray(im, dtype=np.float32)
            if im.mode in ("1", "L"):
                return np.asarray(im.convert("L"))
            if im.mode in ("LA",):
                return np.asarray(im)[..., 0]
            return np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        raise InputError(
            path,
            "is not an image file (its content is not PNG/JPEG/BMP)",
            "check that the file really is an image; re-export it if needed",
        ) from None


def _to_grey(path: Path, pixels: np.ndarray, notes: list[str]) -> np.ndarray:
    pixels = np.asarray(pixels)
    pixels = np.squeeze(pixels) if pixels.ndim > 2 and 1 in pixels.shape[:-1] else pixels
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        rgb = pixels[..., :3]
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            return np.ascontiguousarray(rgb[..., 0])
        notes.append("colour image converted to grey (luminance 0.299R+0.587G+0.114B)")
        grey = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
        return np.round(grey).astype(rgb.dtype) if rgb.dtype.kind in "ui" else grey.astype(np.float32)
    if pixels.ndim == 3:
        notes.append(f"{pixels.shape[0]}-frame stack: only the first frame is analysed")
        pixels = pixels[0]
    if pixels.ndim != 2:
        raise InputError(path, f"has {pixels.ndim} dimensions {pixels.shape}; expected a 2-D image", "export a single 2-D image")
    return pixels


def _normalise_dtype(path: Path, pixels: np.ndarray, notes: list[str]) -> np.ndarray:
    """Keep uint8/uint16; other integers to uint16 if they fit, else float32; floats checked."""
    kind, dtype = pixels.dtype.kind, pixels.dtype
    if dtype == np.bool_:
        return pixels.astype(np.uint8) * 255
    if dtype in (np.uint8, np.uint16):
        return pixels
    if kind in "ui":
        lo, hi = int(pixels.min()), int(pixels.max())
        if lo >= 0 and hi <= 65535:
            return pixels.astype(np.uint16)
        notes.append(f"{dtype} pixel values ({lo}..{hi}) kept as 32-bit float")
        return pixels.astype(np.float32)
    if kind == "f":
        finite = np.isfinite(pixels)
        if not finite.all():
            bad = int((~finite).sum())
            raise InputError(
                path,
                f"32-bit float image has {bad} NaN/infinite pixels",
                "replace them (e.g. Process > Math > Remove NaNs in Fiji) or export as 16-bit TIFF",
            )
        notes.append("floating-point image: grey values are normalised for segmentation")
        return pixels.astype(np.float32)
    raise InputError(path, f"pixel type {dtype} is not supported", "export as 8- or 16-bit greyscale TIFF")
