"""Reading micrographs and their calibration; writing results."""

from .images import IMAGE_SUFFIXES, read_micrograph
from .infobar import detect_infobar
from .metadata import PixelSize
from .writers import (
    read_labels,
    write_csv,
    write_json,
    write_label_png,
    write_label_tiff,
    write_overlay,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "PixelSize",
    "detect_infobar",
    "read_labels",
    "read_micrograph",
    "write_csv",
    "write_json",
    "write_label_png",
    "write_label_tiff",
    "write_overlay",
]
