"""Text drawn over the field taken for particles: panel letters, scale-bar labels, notes.

Figure crops from papers carry "(a)", "200 nm" or "PTFE" over the field, and a network trained
on particles finds some of their glyphs: in the EMPS figures, a panel letter's ring or a digit
of a label became one to nine particles an image. RapidOCR's detector and recogniser (the
PP-OCR models inside the rapidocr wheel, the engine that reads scale bars,
:mod:`emparticles.io.scalebar`) find the lines of text; a particle lying mostly inside one is
left out when the line reads as text.

The rules, measured on the EMPS figures of the grouped split and the JEOL silica and
agglomerate frames (``benchmarks/all_sets.py MODEL+keep-text MODEL``; *Text over the field left
out* in ``docs/model-comparison.md``):

- a box taller than a fifth of the field is no line of text: on fields of spheres the detector
  sometimes boxes the whole field, and reads a glyph in it with a score up to 0.55;
- the line must read with a recognition score of :data:`MIN_TEXT_SCORE` or more and hold a
  Latin letter, a digit or a "μ" that no particle is read as (:data:`PARTICLE_LIKE`): drawn
  rings in a row, as hollow spheres or nanorings would be, are read as "0000" with a score of
  0.81-0.87 and a lone ring as "O"; rods as "11" (0.97), "1" (0.996), "Ⅲ" or "一一"; triangles
  and discs as "▲" and "●"; textures as CJK glyphs ("大", "福"), with low scores;
- the line must stand within :data:`EDGE_BAND` of the field's short side from one of its edges,
  where a figure's letters, labels and notes are: of the 113 EMPS validation and test figures
  only one line that passed the rules above stood further in (an "8" read on particles in the
  middle of a field);
- a particle is on the text when :data:`MIN_SHARE_ON_TEXT` of its pixels or more lie in the
  line's box grown by :data:`BOX_MARGIN_PX` (a glyph's ring is drawn a little outside it).

What the rules cannot tell from text: particles shaped like letters standing in a row along
the field's edge (drawn V- and C-shaped ones were read as "VVVVV" 0.97 and "CCCCC" 1.0). For
such samples, ``--keep-figure-text``.

The detector runs once on the field shrunk to :data:`DETECT_SIDE_PX` on its long side, and only
the lines that hold a particle are read, at full size. On 24 EMPS figures on two cores the
detector takes 0.22 s an image at 640 px (as for scale-bar labels), 0.075 s at 400 and 0.048 s
at 320, reading a line 0.04 s; at 320 px it keeps three quarters of the gain in F1 it has at 640
(the grouped network on the EMPS test figures: +0.006 against +0.007; validation +0.006 against
+0.009).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import numpy as np

#: A detected box taller than this share of the field's height is not a line of text
MAX_LINE_HEIGHT = 0.2
#: Recognition score a line must reach to count as text
MIN_TEXT_SCORE = 0.6
#: Share of a particle's pixels inside a line's box that puts it on the text
MIN_SHARE_ON_TEXT = 0.5
#: Pixels by which a line's box is grown on every side
BOX_MARGIN_PX = 2
#: What rings and rods are read as (after NFKC: "Ⅲ" is "III"): a line with no letter or digit
#: but these is not text
PARTICLE_LIKE = frozenset("0oO1Il|i")
#: Letters and digits that make a line text (with "μ" of µm)
TEXT_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\u03bc") - PARTICLE_LIKE
#: A line further from every edge of the field than this share of its short side is not text
EDGE_BAND = 0.15
#: Long side (px) of the field as the text detector sees it (panel letters and labels of a
#: 512-px figure are 25-60 px tall, 15-40 px at this size)
DETECT_SIDE_PX = 320


@dataclass(frozen=True)
class TextLine:
    """A line of text read over the field: its box (x0, y0, x1, y1) in field pixels, the text
    and the recogniser's score (0-1)."""

    box: tuple[int, int, int, int]
    text: str
    score: float


def text_lines_over(field: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Boxes (x0, y0, x1, y1) of the lines the text detector finds over ``field`` (the (H, W)
    grey image): the part of :func:`particles_on_text` that needs no particles, so that it can
    run while the field is segmented."""
    from .io.scalebar import _to_uint8, text_boxes

    return _detected_lines(_to_uint8(field), text_boxes)


def particles_on_text(field: np.ndarray, labels: np.ndarray,
                      detected: list[tuple[int, int, int, int]] | None = None) -> tuple[np.ndarray, list[TextLine]]:
    """Which particles of ``labels`` (H, W; 1..N) lie on text drawn over ``field`` (the (H, W)
    grey image): (N + 1,) bool flags (index 0 False) and the lines of text that hold them.
    ``detected``: the field's :func:`text_lines_over`, when they were found already."""
    from .io.scalebar import _to_uint8, recognise, text_boxes

    n = int(labels.max(initial=0))
    flags = np.zeros(n + 1, bool)
    if n == 0:
        return flags, []
    img = _to_uint8(field)
    h, w = img.shape
    area = np.bincount(labels.ravel(), minlength=n + 1)
    lines = []
    m = BOX_MARGIN_PX
    for box in (detected if detected is not None else _detected_lines(img, text_boxes)):
        x0, y0, x1, y1 = box
        if y1 - y0 > MAX_LINE_HEIGHT * h or min(x0, y0, w - x1, h - y1) > EDGE_BAND * min(h, w):
            continue
        inside = np.bincount(labels[max(0, y0 - m):y1 + m, max(0, x0 - m):x1 + m].ravel(), minlength=n + 1)
        on = (area > 0) & (inside >= MIN_SHARE_ON_TEXT * area)
        on[0] = False
        if not on.any():
            continue
        text, score = recognise(img, box)
        if score < MIN_TEXT_SCORE or not reads_as_text(text):
            continue
        flags |= on
        lines.append(TextLine(box, text.strip(), score))
    return flags, lines


def reads_as_text(text: str) -> bool:
    """Whether a recognised line holds one of :data:`TEXT_CHARACTERS` (compatibility forms
    folded first: a row of rings may come back as "ｏｏｏ", rods as "Ⅲ", and µ is μ)."""
    return any(c in TEXT_CHARACTERS for c in unicodedata.normalize("NFKC", text))


def _detected_lines(img: np.ndarray, text_boxes) -> list[tuple[int, int, int, int]]:
    """Boxes (x0, y0, x1, y1) in ``img`` of the lines the detector finds on it shrunk to
    :data:`DETECT_SIDE_PX` (not enlarged)."""
    import cv2

    f = min(1.0, DETECT_SIDE_PX / max(img.shape))
    if f == 1.0:
        return list(text_boxes(img))
    small = cv2.resize(img, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
    h, w = img.shape
    return [(int(x0 / f), int(y0 / f), min(w, int(np.ceil(x1 / f))), min(h, int(np.ceil(y1 / f))))
            for x0, y0, x1, y1 in text_boxes(small)]
