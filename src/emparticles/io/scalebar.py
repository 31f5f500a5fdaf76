"""Reading the scale bar burned into a micrograph: its length in pixels and its label.

Figure crops, PNG/JPEG exports and many instrument files carry no calibration but the bar. The
reading is:

1. **Where**: the info bar's rows when the image has one, else strips along the bottom and the
   top edge (overlaid bars, in a corner or mid-way).
2. **The bar**: connected components of the region's extreme grey levels (light bars on dark and
   dark on light) that are long and flat: a solid bar (its pixels fill its box) or a line with
   end ticks (one row runs nearly its full width). Its length is its horizontal extent, edge to
   edge, as a person reads a bar against a ruler: ``bar_px``. A bar joined to its label or with
   ragged JPEG edges is the band of its full rows.
3. **The label**: text near the bar, read by RapidOCR (PP-OCR models that ship inside its PyPI
   package; nothing is downloaded) and parsed as a number and a length unit (nm, um, µm, μm, mm,
   Å, A, pm; "1µm", "0.5 um", "200nm", "5 Å"). A label inside a longer data line
   ("x50 200µm WD:28.0mm 8kV") is the length by the bar, never one after a field's name; a
   label cut into "10" and "nm" by the detector is read as one; a line that reads as no label
   is read again at twice the size. A bar broken by its label ("—— 2 µm ——") is one bar, end
   to end.
4. **Confidence**: ``high`` only when exactly one bar has a readable label next to it, the bar is
   not cut by the image's border, the OCR is sure of the text and the value is a round one (two
   significant digits at most); ``low`` when a bar was found
   but something is off (the reason says what); empty when no bar was found. Only a ``high``
   reading may calibrate an image.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

#: Length units of scale-bar labels, in nm
UNITS_NM = {"pm": 1e-3, "a": 0.1, "å": 0.1, "nm": 1.0, "um": 1e3, "µm": 1e3, "μm": 1e3, "mm": 1e6}
#: A label is a number and a unit and nothing else ("WD 4.0mm" in a data bar is no label)
_LABEL = re.compile(r"^\W*(\d+(?:[.,]\d+)?)\s*(pm|nm|[uµμ]m|mm|å|a)\W*$", re.IGNORECASE)
#: A bar shorter than this times the width of its label's text box is taken for a streak in the
#: image (JEOL draws a 32-px bar beside a 92-px "100nm": 0.35; a figure's 25-px bar under an
#: 82-px "20 nm": 0.30; figures with a 36-px bar under a 148-px "20 nm" and a 33-px one under a
#: 135-px "500nm": 0.24)
MIN_BAR_TO_LABEL = 0.2
#: Grey levels (shares of a region's contrast from its light or dark end) at which a bar is
#: looked for when none with a label was found at 0.15
LOOSER_LEVELS = (0.4, 0.6)
#: OCR scores below this make a reading ``low``
MIN_TEXT_SCORE = 0.8


@dataclass(frozen=True)
class ScaleBarReading:
    """What was read off a scale bar. ``box``/``label_box``: (x0, y0, x1, y1) in image pixels,
    inclusive-exclusive."""

    confidence: str = ""  # "high", "low" or "" (no bar found)
    reason: str = "no scale bar found"
    value_nm: float | None = None
    text: str = ""
    bar_px: float | None = None
    box: tuple[int, int, int, int] | None = None
    label_box: tuple[int, int, int, int] | None = None

    @property
    def pixel_size_nm(self) -> float | None:
        """nm per pixel when the reading is ``high``, else None."""
        if self.confidence != "high" or not self.value_nm or not self.bar_px:
            return None
        return self.value_nm / self.bar_px


def parse_label(text: str) -> tuple[float, str] | None:
    """(value in nm, the matched text) of a scale-bar label, or None: "100 nm" -> 100,
    "1µm" -> 1000, "0,5 um" -> 500, "5 Å" -> 0.5."""
    t = text.replace("μ", "µ").replace("Â", "Å").strip()
    t = re.sub(r"µ+", "µ", t)  # a µ read twice ("2 µμm")
    t = re.sub(r"(?<=[\d\s])nn$", "nm", t)  # the m of nm read as n ("50 nn")
    t = re.sub(r"^T(?=\s*[uµ]m$)", "1", t)  # a serif 1 read as T ("Tum" is "1um"; no other label starts so)
    # OCR reads a 1 as l, I or |, and a 0 as O or o, in the number: "lum" is "1um", "5Onm" "50nm"
    number = re.match(r"^\W*([0-9lI|Oo.,]*[0-9lI|][0-9lI|Oo.,]*)\s*(?=[a-zA-Zµå])", t)
    if number and any(c.isdigit() or c in "lI|" for c in number.group(1)):
        fixed = number.group(1).translate(str.maketrans("lI|Oo", "11100"))
        t = t[: number.start(1)] + fixed + t[number.end(1):]
    m = _LABEL.match(t)
    if not m:
        return None
    value = float(m.group(1).replace(",", "."))
    unit = m.group(2).lower().replace("μ", "µ")
    unit = "um" if unit in ("µm", "um") else unit
    factor = {"pm": 1e-3, "a": 0.1, "å": 0.1, "nm": 1.0, "um": 1e3, "mm": 1e6}[unit]
    return (value * factor, m.group(0).strip()) if value > 0 else None


#: A length in a data bar that is no scale bar's label: working distance, field width, ...
_FIELD_BEFORE = re.compile(r"(WD|HFW|VFW|FOV|FW|DW|HV|EHT|Mag|Spot|Det|Z)\W*$", re.IGNORECASE)
_TOKEN = re.compile(r"(?<![\w.,])(\d+(?:[.,]\d+)?)\s*(pm|nm|[uµμ]m|mm|å)(?!\w)", re.IGNORECASE)


def label_tokens(text: str) -> list[tuple[float, str, float, float]]:
    """Labels inside a longer text line, as a data bar writes them ("x50 200µm WD:28.0mm 8kV"):
    (value in nm, the label, where it starts and ends as shares of the line's characters). A
    length preceded by a field's name ("WD:28.0mm", "HFW 5.97 µm") is no label."""
    t = text.replace("μ", "µ")
    out = []
    for m in _TOKEN.finditer(t):
        if _FIELD_BEFORE.search(t[: m.start()]):
            continue
        parsed = parse_label(m.group(0))
        if parsed is not None:
            n = max(1, len(t))
            out.append((parsed[0], parsed[1], m.start() / n, m.end() / n))
    return out


@dataclass(frozen=True)
class _Bar:
    x0: int
    y0: int
    x1: int  # exclusive
    y1: int
    length: float
    touches_border: bool


def _bar_length(comp: np.ndarray) -> float | None:
    """Length of one bar-like component (bool, its bounding box), or None when it is no bar.

    A solid bar (it fills its box): its extent, edge to edge (JEOL's 100 nm bar of 32 px is
    32 px). A line with end ticks or end dots (one band of rows runs its full width, both ends
    rise above it): the distance between the ticks' centres, as Zeiss and FEI draw them (Zeiss's
    200 um bar at 2614.5 nm/px spans 76.5 px between its ticks, 78 px edge to edge). Ticks may
    rise on one side only ("|___|", as many journal figures draw them) when they are short
    against the bar; a taller such shape is taken for the corner of a table cell. A double arrow
    (its heads' tips on the line) is read tip to tip."""
    bh, bw = comp.shape
    if comp.mean() >= 0.9:  # solid: a clean rectangle, not a table cell with text in it
        clean = comp.mean() >= 0.97 and ndi.binary_fill_holes(comp).sum() == comp.sum()
        return float(bw) if bw >= 2 * bh and clean else None
    if bw < 1.4 * bh:  # wider than tall, unlike an "H"
        return None
    full = np.nonzero(comp.sum(axis=1) >= 0.9 * bw)[0]
    if full.size == 0 or full[-1] - full[0] + 1 != full.size or full.size > max(3, bh // 3):
        return None  # no line, or a box outline (full rows at its top and its bottom)
    if (full[0] == 0 or full[-1] == bh - 1) and bh > 0.2 * bw:
        return None  # ticks rise on one side only, and tall: the corner of a table cell, not a bar
    line = np.zeros(bh, bool)
    line[full] = True
    rising = comp[~line].sum(axis=0) > 0  # columns with pixels off the line: ticks, dots, text
    ends = max(2, bw // 12)
    if not rising[:ends].any() or not rising[-ends:].any():
        return None
    if _longest_run(~rising) < 0.5 * bw:  # a line with ticks is bare between them, unlike a V of
        return None                         # dark background between particles cut by an info bar
    tips = [np.nonzero(comp[:, c])[0] for c in (0, bw - 1)]
    if all(t.size and t[0] >= full[0] - 1 and t[-1] <= full[-1] + 1 for t in tips):
        return float(bw)  # a double arrow: its heads' tips lie on the line; read tip to tip
    left = np.nonzero(rising[:ends])[0]
    right = np.nonzero(rising[-ends:])[0] + bw - ends
    left, right = left[left <= left[0] + 8], right[right >= right[-1] - 8]  # the end ticks only
    return float(right.mean() - left.mean())


def _longest_run(flags: np.ndarray) -> int:
    """Length of the longest run of True in a 1-D bool array."""
    best = run = 0
    for f in flags:
        run = run + 1 if f else 0
        best = max(best, run)
    return best


def _solid_band(comp: np.ndarray) -> tuple[int, int, int, int] | None:
    """(row0, row1, col0, col1), exclusive ends, of a solid bar inside a component that is more
    than the bar: a bar with anti-aliased or ragged edge rows (JPEG figures), or a bar with its
    label standing on it, joined into one component (a white "1.0 µm" on its white bar). The bar
    is the one band of rows filled at least 90% across; beyond two blurred rows on each side,
    one side holds a few specks at most and the other the same, or text (several pieces, or one
    glyph touching the bar by a thin stroke; thin upright pieces at both ends would be ticks).
    None when the component is no such bar."""
    rows = comp.mean(axis=1)
    core = np.nonzero(rows >= 0.9)[0]
    if core.size == 0 or core[-1] - core[0] + 1 != core.size:
        return None
    r0, r1 = int(core[0]), int(core[-1]) + 1
    band = comp[r0:r1]
    cols = np.nonzero(band.any(axis=0))[0]
    c0, c1 = int(cols[0]), int(cols[-1]) + 1
    if c1 - c0 < 2 * (r1 - r0) or band[:, c0:c1].mean() < 0.97:
        return None
    # anti-aliased rows next to the bar belong to its edge (spread along it; a row with a few
    # pixels at one end is a tick, as on each half of FEI's split bar)
    def spread(r: int) -> bool:
        used = np.nonzero(comp[r])[0] if 0 <= r < comp.shape[0] else np.zeros(0, int)
        return used.size > 0 and used[-1] - used[0] + 1 >= 0.25 * (c1 - c0)

    top, bottom = r0, r1  # up to two blurred rows on each side (a JPEG's bar edge spans two)
    while top > max(0, r0 - 2) and spread(top - 1):
        top -= 1
    while bottom < min(comp.shape[0], r1 + 2) and spread(bottom):
        bottom += 1
    above, below = comp[:top], comp[bottom:]
    edge = max(2, (c1 - c0) // 20)
    speck = max(3, 0.02 * band.sum())

    def clear(part: np.ndarray) -> bool:
        return part.sum() <= speck

    def text_over_middle(part: np.ndarray) -> bool:
        used = np.nonzero(part.any(axis=0))[0]
        if used.size == 0 or part.mean() >= 0.6:
            return False
        # glyphs are several pieces once the bar is taken away, a thin stroke, or one glyph that
        # touches the bar by a thin stroke (the descender of a µ); one wide blob sitting on the bar
        # is the rest of a bright particle cut flat by an info bar's edge, not a label
        pieces, n = ndi.label(part, structure=np.ones((3, 3)))
        width = used[-1] - used[0] + 1
        if n < 2 and width > 2 * (r1 - r0):
            edge_row = part[-1] if part is above else part[0]  # the row that touches the bar
            if edge_row.sum() > max(4, 0.2 * width):
                return False
        # a label may reach past an end of its bar ("1.0 µm" over a bar as wide as its text); thin
        # upright pieces at both ends are ticks, and the shape a line with end ticks
        def tick_at(lo: int, hi: int) -> bool:
            for sl in ndi.find_objects(pieces):
                pw, ph = sl[1].stop - sl[1].start, sl[0].stop - sl[0].start
                if sl[1].start < hi and sl[1].stop > lo and pw <= max(3, (c1 - c0) // 20) and ph >= 2 * pw:
                    return True
            return False

        return not (tick_at(c0, c0 + edge) and tick_at(c1 - edge, c1))

    def tail_of(part: np.ndarray, glyphs: np.ndarray) -> bool:
        """``part`` holds only the ends of glyphs that cross the bar from the other side (the
        descender of a "µ" standing on its bar): a few pixels under the glyphs' feet."""
        used = np.nonzero(part.any(axis=0))[0]
        feet = glyphs[-1] if glyphs is above else glyphs[0]
        feet = ndi.binary_dilation(feet, iterations=2) if feet.any() else feet
        if used.size == 0 or used.size > max(4, 0.1 * (c1 - c0)) or part.sum() > 3 * used.size:
            return False  # more than the tip of a stroke
        return bool(feet[used].all())

    if (clear(above) and (clear(below) or text_over_middle(below))) or (clear(below) and text_over_middle(above)):
        return r0, r1, c0, c1
    if above.size and tail_of(below, above) and text_over_middle(above):
        return r0, r1, c0, c1
    return None


def find_bars(region: np.ndarray, offset: tuple[int, int], image_shape: tuple[int, int],
              level: float = 0.15) -> list[_Bar]:
    """Bar-like components of both polarities in a uint8 region (see the module's docstring):
    pixels within ``level`` of the region's contrast from its light or its dark end. A bar broken
    by its label (FEI: dot, line, label, line, dot) is joined into one; a bar joined to its
    label, or with ragged edges, is found by :func:`_solid_band`."""
    region_h, region_w = region.shape
    lo, hi = np.percentile(region, (1, 99))
    if hi - lo < 40:
        return []
    # a component running into a side of the region that lies inside the image is cut by the region
    inner_sides = (offset[1] > 0, offset[1] + region_w < image_shape[1], offset[0] > 0,
                   offset[0] + region_h < image_shape[0])
    small = max(30, 0.06 * image_shape[0])  # the tallest bar; a bar with its label may be taller
    bars = []
    for mask in (region >= hi - level * (hi - lo), region <= lo + level * (hi - lo)):
        labels, _n = ndi.label(mask, structure=np.ones((3, 3)))
        found = []
        for k, sl in enumerate(ndi.find_objects(labels), start=1):
            if sl is None:
                continue
            bh, bw = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
            if bw > 0.7 * image_shape[1] or bw < 10 or bh > 0.25 * image_shape[0]:
                continue
            if ((inner_sides[0] and sl[1].start == 0) or (inner_sides[1] and sl[1].stop == region_w)
                    or (inner_sides[2] and sl[0].start == 0) or (inner_sides[3] and sl[0].stop == region_h)):
                continue
            comp = labels[sl] == k
            length = _bar_length(comp) if bh <= small else None
            if length is not None:
                found.append(("solid" if comp.mean() >= 0.9 else "bar", sl, length))
                continue
            half = _half_bar(comp) if bh <= small else None
            if half is not None:
                found.append(("half", sl, half))
                continue
            band = _solid_band(comp)
            if band is not None:
                r0, r1, c0, c1 = band
                y, x = sl[0].start, sl[1].start
                found.append(("solid", (slice(y + r0, y + r1), slice(x + c0, x + c1)), float(c1 - c0)))
        found += _joined_halves([f for f in found if f[0] == "half"])
        found += _tick_rulers(labels, inner_sides, region_w, region_h)
        for kind, sl, length in found:
            if kind == "half" or length < max(12, 0.015 * image_shape[1]):
                continue
            if sl[0].stop - sl[0].start == 1 and length < 2 * max(12, 0.015 * image_shape[1]):
                continue  # a short one-pixel line is as likely the edge of a box as a bar
            if kind == "solid":
                if not _stands_out(region, sl, hi - lo):
                    continue
                length = _edge_to_edge(region, sl, length)
            y0, x0 = sl[0].start + offset[0], sl[1].start + offset[1]
            y1, x1 = sl[0].stop + offset[0], sl[1].stop + offset[1]
            # a bar is measured along its rows: the left or right border may cut it short; one
            # drawn against the bottom or top border loses only some of its thickness
            touches = x0 == 0 or x1 >= image_shape[1]
            bars.append(_Bar(x0, y0, x1, y1, float(length), touches))
    return bars


#: Divisions of a Hitachi ruler: 11 ticks, the label giving the length of all ten
RULER_DIVISIONS = 10


def _tick_rulers(labels: np.ndarray, inner_sides: tuple[bool, bool, bool, bool], region_w: int,
                 region_h: int) -> list[tuple[str, tuple[slice, slice], float]]:
    """Hitachi's scale (S-4800, SU8000, SU8020 ...): a row of 11 evenly spaced ticks, the label
    under its right end giving the length of the whole ruler, first tick to last ("1.00um" over
    ten divisions of 15.7 px). Ticks are small upright components on overlapping rows (the middle
    and end ticks may be taller); a row of them whose gaps are whole multiples of one spacing (a
    tick hidden by a particle leaves a double gap) and which spans exactly ten spacings is a
    ruler, measured between its end ticks' centres. Where the taller end ticks are joined to
    something else (the strip's edge line, a particle over it), the ruler's ends are found from
    the eight short ticks or from the taller middle tick, five spacings either side, when there
    is ink at both. Rows of glyphs ("1111") are too few or too uneven to pass."""
    ticks = []
    for k, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        bh, bw = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
        if bw > 4 or not 3 <= bh <= 24 or bh < 2 * bw:
            continue
        if (inner_sides[2] and sl[0].start == 0) or (inner_sides[3] and sl[0].stop == region_h):
            continue
        xs = np.nonzero(labels[sl] == k)[1]
        ticks.append((sl[0].start, sl[0].stop, sl[1].start + float(xs.mean()) + 0.5, sl))
    ticks.sort(key=lambda t: t[2])
    rulers = []
    used: set[int] = set()
    for i, (y0, y1, _x, _sl) in enumerate(ticks):
        if i in used:
            continue
        row = [j for j, t in enumerate(ticks) if j not in used
               and min(t[1], y1) - max(t[0], y0) >= 0.5 * min(t[1] - t[0], y1 - y0)]
        if len(row) < 6:
            continue
        xs = np.array([ticks[j][2] for j in row])
        gaps = np.diff(xs)
        spacing = float(np.median(gaps))
        if spacing < 4:
            continue
        steps = gaps / spacing
        if np.any(np.abs(steps - np.round(steps)) > 0.15) or np.any(np.round(steps) < 1):
            continue
        divisions = round(float(xs[-1] - xs[0]) / spacing)
        ry0 = min(ticks[j][0] for j in row)
        ry1 = max(ticks[j][1] for j in row)
        step = float(xs[-1] - xs[0]) / divisions

        def inked(x: float, rows: slice = slice(ry0, ry1)) -> bool:
            """Ink near column ``x`` on the ticks' rows (an end tick, whatever it is joined to)."""
            c = round(x - 0.5)
            return 0 <= c < region_w and bool((labels[rows, max(0, c - 1):c + 2] > 0).any())

        if divisions == RULER_DIVISIONS and len(row) >= RULER_DIVISIONS - 2:
            first, last = float(xs[0]), float(xs[-1])
        elif divisions == RULER_DIVISIONS - 2 and list(np.round(steps).astype(int)) == [1, 1, 1, 2, 1, 1, 1]:
            # the taller end and middle ticks joined to the strip's edge line (SU8010): the eight
            # short ones, and ink where the end ticks stand, one spacing further out
            first, last = float(xs[0]) - step, float(xs[-1]) + step
            if not (inked(first) and inked(last)):
                continue
        else:
            # an end tick joined to something else (a particle over the strip's edge): the taller
            # middle tick is the ruler's centre, and its ends lie five spacings either side
            heights = np.array([ticks[j][1] - ticks[j][0] for j in row])
            ends = []
            for j, height in zip(row, heights):
                centre = ticks[j][2]
                a, b = centre - RULER_DIVISIONS / 2 * step, centre + RULER_DIVISIONS / 2 * step
                if (height >= np.median(heights) + 2 and len(row) >= 7 and xs[0] >= a - 0.3 * step
                        and xs[-1] <= b + 0.3 * step and inked(a) and inked(b)):
                    ends.append((a, b))
            if len(ends) != 1:
                continue
            first, last = ends[0]
        rx0 = max(0, round(first - 0.5) - 1)
        rx1 = min(region_w, round(last - 0.5) + 2)
        used.update(row)
        if (inner_sides[0] and rx0 == 0) or (inner_sides[1] and rx1 == region_w):
            continue
        rulers.append(("ruler", (slice(ry0, ry1), slice(rx0, rx1)), last - first))
    return rulers


def _edge_to_edge(region: np.ndarray, sl: tuple[slice, slice], length: float) -> float:
    """A solid bar's length from edge to edge at half its contrast, to a fraction of a pixel.

    A bar's end pixels are anti-aliased or blurred (a JPEG figure's 100-px bar runs 25, 107, 203,
    240 ... 222, 153, 60 from its dark surround): counting the pixels past the strict grey level
    reads it 98 px, where a person reading it against a ruler, at the middle of each edge, reads
    100.2. The profile along the bar's rows is interpolated at the level halfway between the bar
    and what lies just past its ends; ``length`` is kept when an end is not a clean edge (the
    level is not crossed within 4 px, or something else lies just past the end)."""
    y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
    w = region.shape[1]
    if x0 < 4 or x1 > w - 4:
        return length
    profile = np.median(region[y0:y1].astype(np.float32), axis=0)
    ink = float(np.median(profile[x0:x1]))
    past = np.concatenate([profile[x0 - 4:x0 - 2], profile[x1 + 2:x1 + 4]])
    paper = float(np.median(past))
    if abs(ink - paper) < 40 or np.ptp(past) > 0.25 * abs(ink - paper):
        return length
    # 0 at the surround's level, 1 at the bar's; within noise of either (15% of the contrast) it
    # is that level, so that a crisp edge is read at the pixel boundary exactly
    q = (profile - paper) / (ink - paper)
    q = np.where(q < 0.15, 0.0, np.where(q > 0.85, 1.0, q))
    inside = q > 0.5

    def crossing(start: int, step: int) -> float | None:
        """Pixel boundary where the profile crosses half the contrast, walking out from ``start``."""
        x = start
        if not inside[x]:
            return None
        for _ in range(4):
            nxt = x + step
            if not 0 <= nxt < w:
                return None
            if not inside[nxt]:
                t = (q[x] - 0.5) / (q[x] - q[nxt])  # 0..1 from x's centre to nxt's
                return x + 0.5 + step * float(t)
            x = nxt
        return None

    left, right = crossing(x0, -1), crossing(x1 - 1, 1)
    if left is None or right is None:
        return length
    refined = right - left
    return refined if abs(refined - length) <= 3 else length


def _stands_out(region: np.ndarray, sl: tuple[slice, slice], contrast: float) -> bool:
    """A drawn bar differs sharply from what is around it (a 3-px ring outside its box); a
    bright patch of a particle fades into the particle."""
    y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
    outer = region[max(0, y0 - 3):y1 + 3, max(0, x0 - 3):x1 + 3].astype(np.float32)
    inner = region[y0:y1, x0:x1].astype(np.float32)
    ring = (outer.sum() - inner.sum()) / max(1, outer.size - inner.size)
    return abs(float(np.median(inner)) - ring) >= 0.35 * contrast


def _half_bar(comp: np.ndarray) -> tuple[str, float] | None:
    """("left", x of its tick centre) or ("right", ...) for one half of a bar broken by its label:
    a line that rises at one end only; None otherwise."""
    bh, bw = comp.shape
    if bw < 3 * bh:
        return None
    full = np.nonzero(comp.sum(axis=1) >= 0.85 * bw)[0]
    if full.size == 0 or full[-1] - full[0] + 1 != full.size or full.size > max(3, bh // 3):
        return None
    if full[0] == 0 or full[-1] == bh - 1:
        return None
    line = np.zeros(bh, bool)
    line[full] = True
    rising = np.nonzero(comp[~line].sum(axis=0) > 0)[0]
    if rising.size == 0:
        return None
    if rising.max() < bw // 4:
        return "left", float(rising[rising <= rising[0] + 8].mean())
    if rising.min() > bw - bw // 4:
        return "right", float(rising[rising >= rising[-1] - 8].mean())
    return None


def _joined_halves(halves: list) -> list:
    """Left and right halves on the same rows, the left one first, joined into bars."""
    joined = []
    for _, la, (side_a, xa) in halves:
        for _, lb, (side_b, xb) in halves:
            if side_a != "left" or side_b != "right" or lb[1].start <= la[1].stop:
                continue
            if abs(la[0].start - lb[0].start) > 2 or abs(la[0].stop - lb[0].stop) > 2:
                continue
            gap = lb[1].start - la[1].stop
            if gap > 1.5 * max(la[1].stop - la[1].start, lb[1].stop - lb[1].start):
                continue
            sl = (slice(min(la[0].start, lb[0].start), max(la[0].stop, lb[0].stop)), slice(la[1].start, lb[1].stop))
            joined.append(("bar", sl, (lb[1].start + xb) - (la[1].start + xa)))
    return joined


_OCR = None
_OCR_LOCK = threading.Lock()


def ocr_engine():
    """The RapidOCR engine of this process (models from the rapidocr package), made once."""
    global _OCR
    with _OCR_LOCK:
        if _OCR is None:
            try:
                from rapidocr import RapidOCR
            except ImportError:
                from ..errors import InputError

                raise InputError(None, "reading scale bars needs the rapidocr package",
                                 'pip install "emparticles" again (it is a dependency), or give --pixel-size') from None
            # The detector's default enlarges an image until its short side is 736 px: a 64 x 400
            # crop of an info bar became 736 x 4600 and took 3.4 s; at its own size (long side at
            # most 640) it reads the same labels.
            import rapidocr

            models = Path(rapidocr.__file__).parent / "models"
            # the newest detector and recogniser in the wheel (PP-OCRv6 in rapidocr 3.10)
            det = max(models.glob("*det*.onnx"), default=None, key=lambda f: f.name)
            rec = max(models.glob("*rec*.onnx"), default=None, key=lambda f: f.name)
            if det is None or rec is None:  # never let it fetch models at run time
                from ..errors import InputError

                raise InputError(models, "the OCR models that ship with rapidocr are missing",
                                 "reinstall rapidocr (pip install --force-reinstall rapidocr), or give --pixel-size")
            _OCR = RapidOCR(params={"Global.log_level": "critical", "Global.use_cls": False,
                                    "Det.model_path": str(det), "Rec.model_path": str(rec),
                                    "Det.limit_type": "max", "Det.limit_side_len": 640,
                                    "EngineConfig.onnxruntime.intra_op_num_threads": 1})
        return _OCR


def _prepared(crop: np.ndarray) -> tuple[np.ndarray, float, int]:
    """(RGB image for RapidOCR, enlargement factor, padding) of a uint8 crop."""
    import cv2

    # small text (FEI's 8-px label inside its bar, a 29-row data bar) is missed by the detector:
    # a crop under 48 rows is enlarged to 64, up to 4x (larger ones read best as they are)
    factor = float(np.clip(64.0 / crop.shape[0], 1.0, 4.0)) if crop.shape[0] < 48 else 1.0
    if factor > 1.0:
        crop = cv2.resize(crop, None, fx=factor, fy=factor, interpolation=cv2.INTER_CUBIC)
    pad = 8  # text touching the crop's edge is read poorly
    padded = np.pad(crop, pad, mode="edge")
    return np.ascontiguousarray(np.stack([padded] * 3, axis=-1)), factor, pad


def text_boxes(crop: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Boxes (x0, y0, x1, y1) in the crop of the text lines RapidOCR's detector finds (no
    recognition: that is the costly step, done only where needed by :func:`recognise`)."""
    if crop.size == 0 or min(crop.shape) < 8:
        return []
    rgb, factor, pad = _prepared(crop)
    result = ocr_engine()(rgb, use_det=True, use_cls=False, use_rec=False)
    if result is None or result.boxes is None:
        return []
    boxes = []
    for quad in result.boxes:
        q = (np.asarray(quad) - pad) / factor
        boxes.append((max(0, int(q[:, 0].min())), max(0, int(q[:, 1].min())),
                      min(crop.shape[1], int(np.ceil(q[:, 0].max()))), min(crop.shape[0], int(np.ceil(q[:, 1].max())))))
    return boxes


def recognise(crop: np.ndarray, box: tuple[int, int, int, int], enlarge: float = 1.0) -> tuple[str, float]:
    """(text, score) of one detected text line of a crop, optionally enlarged first."""
    import cv2

    x0, y0, x1, y1 = box
    m = 2
    mx = max(m, int(0.4 * (y1 - y0)))  # the detector's box can clip a narrow first or last glyph ("1 um")
    line = crop[max(0, y0 - m):y1 + m, max(0, x0 - mx):x1 + mx]
    if line.size == 0:
        return "", 0.0
    if enlarge != 1.0:
        line = cv2.resize(line, None, fx=enlarge, fy=enlarge, interpolation=cv2.INTER_CUBIC)
    rgb, _, _ = _prepared(line)
    result = ocr_engine()(rgb, use_det=False, use_cls=False, use_rec=True)
    if result is None or not result.txts:
        return "", 0.0
    return str(result.txts[0]), float(result.scores[0])


def _regions(shape: tuple[int, int], infobar_rows: int) -> list[list[tuple[int, int, int, int]]]:
    """(y0, y1, x0, x1) of the places a scale bar is looked for, in turns: the info bar first when
    there is one, then the bottom and top strips of the field above it (a figure's bar drawn over
    the field of a frame whose data strip holds none)."""
    h, w = shape
    field_h = h - infobar_rows
    ch = max(24, int(0.22 * field_h))
    # bottom and top strips: bars stand in a corner or mid-way
    strips = [(max(0, field_h - ch), field_h, 0, w), (0, min(ch, field_h), 0, w)]
    return [[(field_h, h, 0, w)], strips] if infobar_rows > 0 else [strips]


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    a = np.asarray(pixels, np.float32)
    lo, hi = float(a.min()), float(a.max())
    return np.zeros(a.shape, np.uint8) if hi <= lo else ((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _beside(box: tuple[int, int, int, int], bar: _Bar) -> bool:
    """Where a bar's label stands: on the bar's rows to its left or right (JEOL: "100nm" 140 px to
    the right), or just above or below it (within 2.5 text heights) over or near its span."""
    text_h = max(1, box[3] - box[1])
    rows_overlap = min(box[3], bar.y1) - max(box[1], bar.y0) > 0
    if rows_overlap:
        return box[0] - bar.x1 <= 3 * (bar.x1 - bar.x0) + 150 and bar.x0 - box[2] <= 2 * (bar.x1 - bar.x0) + 100
    vertical_gap = max(box[1] - bar.y1, bar.y0 - box[3])
    centre = (box[0] + box[2]) / 2
    near_span = bar.x0 - (box[2] - box[0]) <= centre <= bar.x1 + (box[2] - box[0])
    return vertical_gap <= 2.5 * text_h and near_span


def _text_width(text: str, box: tuple[int, int, int, int]) -> float:
    """Width (px) of the label's own characters in a text box that may hold more ("Mag 100k  100 nm")."""
    label = parse_label(text)
    share = len(label[1].strip()) / max(1, len(text.strip())) if label else 1.0
    return (box[2] - box[0]) * min(1.0, share)


def _between(other: tuple[int, int, int, int], box: tuple[int, int, int, int], bar: _Bar) -> bool:
    """Another text line stands between a bar and a text box above or below it (a data bar's
    "HFW" between a cell's border and its "592 nm"): that box is not the bar's label."""
    if other == box or min(other[2], box[2]) - max(other[0], box[0]) <= 0:
        return False
    if box[1] >= bar.y1:  # below the bar
        return other[1] >= bar.y1 - 1 and other[3] <= box[1] + 1
    if box[3] <= bar.y0:  # above it
        return other[3] <= bar.y0 + 1 and other[1] >= box[3] - 1
    return False


_NUMBER_ONLY = re.compile(r"^\W*\d+(?:[.,]\d+)?\W*$")
_UNIT_ONLY = re.compile(r"^\W*(pm|nm|[uµμ]m|mm|å)\W*$", re.IGNORECASE)


def _with_neighbour(piece: tuple, boxes: list, origin: tuple[int, int], number_first: bool):
    """(local box, box) of a text piece joined with the next box on its line, to its right when
    the piece is a number and to its left when it is a unit, with less than a glyph's height
    between them; None when there is no such box."""
    _, box = piece
    height = box[3] - box[1]
    best = None
    for _, other in boxes:
        if other == box:
            continue
        shared = min(other[3], box[3]) - max(other[1], box[1])
        if shared < 0.5 * min(height, other[3] - other[1]):
            continue
        apart = other[0] - box[2] if number_first else box[0] - other[2]
        if -0.5 * height <= apart <= height and (best is None or apart < best[0]):
            best = (apart, other)
    if best is None:
        return None
    other = best[1]
    g = (min(box[0], other[0]), min(box[1], other[1]), max(box[2], other[2]), max(box[3], other[3]))
    return (g[0] - origin[0], g[1] - origin[1], g[2] - origin[0], g[3] - origin[1]), g


def _token_by_bar(text: str, box: tuple[int, int, int, int], bar: _Bar):
    """((value in nm, label), its estimated box, label) of the label inside a longer text line
    that stands over or next to the bar, the nearest one when there are several; None when none
    does. Where a token lies in the box is estimated from its share of the line's characters."""
    width = box[2] - box[0]
    best = None
    for value, label, start, end in label_tokens(text):
        tx0, tx1 = box[0] + start * width, box[0] + end * width
        apart = max(0.0, tx0 - bar.x1, bar.x0 - tx1)
        if apart > max(tx1 - tx0, 0.5 * (bar.x1 - bar.x0)):
            continue
        if best is None or apart < best[0]:
            best = (apart, (value, label), (int(tx0), box[1], int(np.ceil(tx1)), box[3]), label)
    return best[1:] if best else None


def _label_in(crop: np.ndarray, local: tuple[int, int, int, int], box: tuple[int, int, int, int], bar: _Bar,
              text: str, score: float):
    """((value in nm, label), text, score, box) of the label in a text line already read as
    ``text``, or None. The recogniser is unsteady on a label's last glyphs ("50 nmr", "0.5 µ"):
    a line that holds no label is read again at twice the size, where the same lines mostly come
    out whole ("50 nm", "0.5 µm"). A label inside a longer line ("x50 200µm WD:28.0mm 8kV") is
    the one by the bar, and its box is its share of the line."""
    enlarged = False
    if parse_label(text) is None and not label_tokens(text):
        again = recognise(crop, local, enlarge=2.0)
        if parse_label(again[0]) is not None or label_tokens(again[0]):
            (text, score), enlarged = again, True
    parsed = parse_label(text)
    if parsed is not None and score < MIN_TEXT_SCORE and not enlarged:
        # an unsure read: read again at twice the size; two reads of the same value are as sure
        # as the surer of them
        again = recognise(crop, local, enlarge=2.0)
        if (parse_label(again[0]) or (None,))[0] == parsed[0]:
            score = max(score, again[1])
    if parsed is not None and score < MIN_TEXT_SCORE:
        # a label between the halves of its bar ("—— 5 µm ——", FEI) is read with the halves'
        # dashes, which cost the line its certainty: read again with the bar painted out
        again = _read_without_bar(crop, local, box, bar)
        if again is not None and (parse_label(again[0]) or (None,))[0] == parsed[0]:
            score = max(score, again[1])
    if parsed is not None:
        return parsed, text, score, box
    token = _token_by_bar(text, box, bar)
    if token is None:
        return None
    parsed, token_box, label = token
    return parsed, label, score, token_box


def _read_without_bar(crop: np.ndarray, local: tuple[int, int, int, int], box: tuple[int, int, int, int],
                      bar: _Bar) -> tuple[str, float] | None:
    """(text, score) of a text line read again with the bar's rows painted over with the line's
    background, beside the glyphs (the columns with ink off the bar's rows); None when the bar
    does not cross the line."""
    dy, dx = box[1] - local[1], box[0] - local[0]  # image = local + offset
    x0, y0, x1, y1 = local
    by0, by1 = bar.y0 - dy - 1, bar.y1 - dy + 1
    if by1 <= y0 or by0 >= y1:
        return None
    line = crop[y0:y1, x0:x1].astype(np.float32)
    paper = float(np.median(line))
    ink_is_light = float(np.median(crop[max(0, by0 + 1):by1 - 1, max(0, bar.x0 - dx):bar.x1 - dx])) > paper
    ink = (line > paper + 40) if ink_is_light else (line < paper - 40)
    off_bar = np.ones(line.shape[0], bool)
    off_bar[max(0, by0 - y0):max(0, by1 - y0)] = False
    cols = np.nonzero(ink[off_bar].any(axis=0))[0]
    if cols.size == 0:
        return None
    g0, g1 = x0 + int(cols[0]) - 2, x0 + int(cols[-1]) + 3
    painted = crop.copy()
    h = max(1, y1 - y0)
    for a, b in ((0, g0), (g1, crop.shape[1])):  # the bar's rows left and right of the glyphs
        painted[max(0, by0):max(0, by1), max(0, a):max(0, b)] = np.uint8(paper)
    return recognise(painted, (max(0, g0 - h // 4), y0, min(crop.shape[1], g1 + h // 4), y1))


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Share of box ``b`` covered by box ``a``."""
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return w * h / max(1, (b[2] - b[0]) * (b[3] - b[1]))


def _split_bar(img: np.ndarray, bar: _Bar, box: tuple[int, int, int, int], bars: list[_Bar]) -> _Bar:
    """A label standing on its bar's line at one end of it may be the middle of a bar broken by
    its label ("|—— 2 µm ——|", as FEI and many figures draw it): when another bar-like line on the
    same rows starts right past the label's other side, or its grey runs on there
    (:func:`_continued`), the bar runs from the outer end of one half to the outer end of the
    other. Else (a bar then its label on one line, "—— 200 nm", as often) the bar is kept as it is."""
    height = box[3] - box[1]
    middle = (bar.y0 + bar.y1) / 2
    centre = (box[0] + box[2]) / 2
    if not box[1] + 0.25 * height <= middle <= box[3] - 0.25 * height or bar.x0 <= centre <= bar.x1:
        return bar  # the bar is not at mid-height of the label (it is under or over it), or the label is over the bar
    right = centre > bar.x1  # the label stands right of this half
    if (box[0] - bar.x1 if right else bar.x0 - box[2]) > height:
        return bar  # apart from the bar, as JEOL writes it
    for other in bars:
        if other is bar or abs((other.y0 + other.y1) / 2 - middle) > max(2, bar.y1 - bar.y0):
            continue
        if right and other.x0 > centre and other.x0 - box[2] <= height:
            x0, x1 = bar.x0, other.x1
        elif not right and other.x1 < centre and box[0] - other.x1 <= height:
            x0, x1 = other.x0, bar.x1
        else:
            continue
        return _Bar(x0, min(bar.y0, other.y0), x1, max(bar.y1, other.y1), float(x1 - x0),
                    bar.touches_border or other.touches_border)
    return _continued(img, bar, box, right)


def _continued(img: np.ndarray, bar: _Bar, box: tuple[int, int, int, int], right: bool) -> _Bar:
    """The bar with its other half when, on its rows past the label, pixels of the bar's grey
    level (nearer to it than to the rows just off the bar) run on for at least a third of its
    length, starting within a text height of the label: a half too faint or too ragged to be
    found as a bar of its own (FEI's thin grey line in its data strip)."""
    w = img.shape[1]
    rows = img[bar.y0:bar.y1].astype(np.float32)
    ink = float(np.median(rows[:, bar.x0:bar.x1]))
    off = np.concatenate([img[max(0, bar.y0 - 3):bar.y0, bar.x0:bar.x1].ravel(),
                          img[bar.y1:bar.y1 + 3, bar.x0:bar.x1].ravel()]).astype(np.float32)
    if off.size == 0:
        return bar
    paper = float(np.median(off))
    if abs(ink - paper) < 20:
        return bar
    like = (np.abs(rows - ink) < np.abs(rows - paper)).mean(axis=0) >= 0.5  # per column
    height = box[3] - box[1]
    step = 1 if right else -1
    near = box[2] if right else box[0]  # the label's far edge from this half
    for start in range(near - step * (height // 2), near + step * height, step):
        if not 0 <= start < w or not like[start]:
            continue
        end = start  # the run of bar-like columns from here (the label's last glyph breaks runs up)
        while 0 <= end + step < w and like[end + step]:
            end += step
        if abs(end - start) + 1 >= (bar.x1 - bar.x0) / 3:
            x0, x1 = (bar.x0, end + 1) if right else (end, bar.x1)
            return _Bar(x0, bar.y0, x1, bar.y1, float(x1 - x0), bar.touches_border or x0 == 0 or x1 >= w)
    return bar


def _bar_label(img: np.ndarray, region: tuple[int, int, int, int], bar: _Bar, margin_y: int):
    """(value in nm, label, OCR score, label box, distance to the bar) of the label read next to
    a bar within ``margin_y`` rows of it, (None, "", 0.0, None, inf) when none is read, or None
    when the bar is a stroke of a word rather than a bar."""
    y0, y1, x0, x1 = region
    bw, bh = bar.x1 - bar.x0, bar.y1 - bar.y0
    cy0, cy1 = max(y0, bar.y0 - margin_y), min(y1, bar.y1 + margin_y)
    cx0, cx1 = max(x0, bar.x0 - bw // 2 - 40), min(x1, bar.x1 + max(bw, 100) + 250)
    crop = img[cy0:cy1, cx0:cx1]
    boxes = [(b, (b[0] + cx0, b[1] + cy0, b[2] + cx0, b[3] + cy0)) for b in text_boxes(crop)]
    on_bar = [(local, box) for local, box in boxes if _overlap(box, (bar.x0, bar.y0, bar.x1, bar.y1)) > 0.5]
    boxes = [b for b in boxes if b not in on_bar]  # the detector takes a bar for text too
    merged_label = None
    for local, box in on_bar:
        if box[2] - box[0] <= 1.3 * bw and box[3] - box[1] <= 2.5 * bh:
            continue  # the bar alone, taken for text: nothing to read (saves 80 ms)
        text, score = recognise(crop, local)
        middle = (bar.y0 + bar.y1) / 2
        inside_glyphs = box[1] + 0.2 * (box[3] - box[1]) <= middle <= box[3] - 0.2 * (box[3] - box[1])
        # the glyphs' width, the bar's own span left out: a box may hold a bar and its label side
        # by side ("|____| 1 µm" in a figure's white panel), which no stroke of a word does
        glyph = (box[2] - box[0] - bw) / max(1, len(text.strip()))
        ends = text.strip()[:1] + text.strip()[-1:]
        inline = parse_label(text) is not None and any(c in "-—–_" for c in ends)
        if inside_glyphs and sum(c.isalnum() for c in text) >= 2 and bar.length <= 2.2 * glyph and not inline:
            # the "bar" is a stroke of a word ("mm" of "4.0mm" in a bold font): no longer than two
            # glyphs; a bar read as a dash beside its label ("—500nm") is the label's own bar
            return None
        found = _label_in(crop, local, box, bar, text, score)
        if found is not None and bar.length >= MIN_BAR_TO_LABEL * _text_width(found[1], found[3]):
            merged_label = (found[0], found[2], found[3])  # the label and its bar in one text box

    def gap(box) -> float:
        return float(np.hypot(max(0, box[0] - bar.x1, bar.x0 - box[2]), max(0, box[1] - bar.y1, bar.y0 - box[3])))

    labels = [(0.0, *merged_label)] if merged_label else []
    near = [] if merged_label else [b for b in boxes if _beside(b[1], bar)
                                     and not any(_between(o[1], b[1], bar) for o in boxes)]
    for local, box in sorted(near, key=lambda b: gap(b[1]))[:3]:  # the nearest lines, nearest first
        text, score = recognise(crop, local)
        if _NUMBER_ONLY.match(text) or _UNIT_ONLY.match(text):
            # the detector may cut "10 nm" into "10" and "nm": the piece and its neighbour on the
            # line, read as one
            joined = _with_neighbour((local, box), boxes, (cx0, cy0), number_first=bool(_NUMBER_ONLY.match(text)))
            if joined is not None:
                again = recognise(crop, joined[0])
                if parse_label(again[0]) is not None:
                    (local, box), (text, score) = joined, again
        found = _label_in(crop, local, box, bar, text, score)
        if found is not None:
            parsed, text, score, box = found
            # a streak much shorter than the text near it is no bar
            if bar.length >= MIN_BAR_TO_LABEL * _text_width(text, box):
                labels.append((gap(box), parsed, score, box))
            break
    if not labels:
        return None, "", 0.0, None, np.inf
    distance, (value, text), score, box = min(labels, key=lambda t: t[0])
    return value, text, score, box, distance


def read_scale_bar(pixels: np.ndarray, infobar_rows: int = 0) -> ScaleBarReading:
    """Find and read the scale bar of a (H, W) micrograph; see the module's docstring."""
    img = _to_uint8(pixels)
    readings: list[tuple] = []
    for regions in _regions(img.shape, infobar_rows):
        if any(r[1] is not None for r in readings):
            break  # a label was read in the info bar: the field is not searched
        readings += _readings_in(img, regions)
    return _verdict(img, readings)


def _readings_in(img: np.ndarray, regions: list[tuple[int, int, int, int]]) -> list[tuple]:
    """(bar, value in nm or None, label, OCR score, label box, distance) of every bar found in
    ``regions`` of the uint8 image."""
    h, w = img.shape
    readings: list[tuple] = []
    # a thin anti-aliased line (Zeiss's ticked bar in its white panel, FEI's in its black strip)
    # is grey, not at the region's extremes: looked for at looser levels, each only when no bar
    # with a label was found in any of the regions at the stricter one (Zeiss's 17-px "200 nm"
    # bar of a 512-px frame is drawn 60% of the way from its black text to its white panel)
    for level in (0.15, *LOOSER_LEVELS):
        found = [r for y0, y1, x0, x1 in regions
                 for r in _bars_read(img, (y0, y1, x0, x1), find_bars(img[y0:y1, x0:x1], (y0, x0), (h, w), level=level))]
        # a bar found only at a looser level is a guess: it counts when its label reads as a
        # bar's label could (a Hitachi ruler's ticks joined into a "bar" under a "100nm" read
        # as "100mm" does not, and leaves the field to be searched)
        if level == 0.15 or any(r[1] is not None and r[1] < MAX_BAR_NM and significant_digits(r[2]) <= 2 for r in found):
            readings = found
        if any(r[1] is not None for r in readings):
            break
    else:
        local = _local_contrast_readings(img, regions)
        if local:
            readings = local
    return readings


def _label_over_or_under(box: tuple[int, int, int, int], bar: _Bar) -> bool:
    """The label stands over or under the bar, its centre within the bar's span widened by half
    the label's width (as figures set it), not on the bar's rows or off to one side."""
    if bar.y0 <= (box[1] + box[3]) / 2 <= bar.y1:  # a text box may reach a row or two into the bar
        return False
    half = (box[2] - box[0]) / 2
    return bar.x0 - half <= (box[0] + box[2]) / 2 <= bar.x1 + half


def _clean_ends(img: np.ndarray, bar: _Bar) -> bool:
    """In the image itself, both ends of the bar are ends: just past each (2-4 px), on the bar's
    rows, the grey is nearer the bar's surroundings than the bar. A stretch of a longer bright
    band, or of a bar that runs on into a bright particle, is not."""
    _h, w = img.shape
    if bar.x0 < 4 or bar.x1 > w - 4:
        return False
    rows = img[bar.y0:bar.y1].astype(np.float32)
    ink = float(np.median(rows[:, bar.x0:bar.x1]))
    off = np.concatenate([img[max(0, bar.y0 - 4):max(0, bar.y0 - 2), bar.x0:bar.x1].ravel(),
                          img[bar.y1 + 2:bar.y1 + 4, bar.x0:bar.x1].ravel()]).astype(np.float32)
    if off.size == 0:
        return False
    contrast = abs(ink - float(np.median(off)))
    ends = (rows[:, bar.x0 - 4:bar.x0 - 1], rows[:, bar.x1 + 1:bar.x1 + 4])
    return contrast >= 20 and all(abs(float(np.median(e)) - ink) >= 0.5 * contrast for e in ends)


def _local_contrast_readings(img: np.ndarray, regions: list[tuple[int, int, int, int]]) -> list[tuple]:
    """Readings of bars that stand out from their surroundings only, not from the whole region: a
    white bar on a light grey TEM film (250 on 205) under dark particles. Each region's thin
    bright (then dark) structures are kept by a top-hat 15 px tall, which takes away the
    background and anything thicker than a bar, and bars are looked for there. Only a bar with a
    plausible label counts; of the two polarities, the first whose labelled bar stays clear of the
    image border (the dark rim under a bright bar at the border is the other polarity's echo)."""
    h, w = img.shape
    found: list[list[tuple]] = []
    for tophat in (ndi.white_tophat, ndi.black_tophat):
        readings = []
        for y0, y1, x0, x1 in regions:
            kept = tophat(img[y0:y1, x0:x1], size=(15, 1))
            readings += _bars_read(img, (y0, y1, x0, x1), find_bars(kept, (y0, x0), (h, w), level=0.4))
        labelled = [r for r in readings if r[1] is not None and r[1] < MAX_BAR_NM and significant_digits(r[2]) <= 2
                    and _label_over_or_under(r[4], r[0]) and _clean_ends(img, r[0])]
        if labelled:
            found.append(labelled)
    clear = [f for f in found if not any(r[0].touches_border for r in f)]
    return (clear or found or [[]])[0]


def _bars_read(img: np.ndarray, region: tuple[int, int, int, int], bars: list[_Bar]) -> list[tuple]:
    """:func:`_bar_label` of each bar of a region, bars that are strokes of words left out."""
    y0, y1, x0, x1 = region
    h = img.shape[0]
    readings = []
    for bar in bars:
        bh = bar.y1 - bar.y0
        # a figure's label can be large and stand well apart from its bar: when none is found
        # near it, a taller crop is read (only then: the text detector's boxes, and with them
        # what the recogniser reads, change with the crop)
        for margin_y in dict.fromkeys((max(40, 4 * bh), max(40, 4 * bh, int(0.2 * h)))):
            found = _bar_label(img, (y0, y1, x0, x1), bar, margin_y)
            if found is None or found[0] is not None:
                break
        if found is not None:  # None: the "bar" is a stroke of a word
            readings.append((bar, *found))
    return readings


def _verdict(img: np.ndarray, readings: list[tuple]) -> ScaleBarReading:
    """The reading of an image from the readings of its bars (see the module's docstring)."""
    # One label belongs to one bar: of the bars that claim the same label, the longest keeps it
    # (a short streak on a particle, or glyph feet under the label, would otherwise make two "bars").
    def same_label(a, b) -> bool:
        return max(_overlap(a[4], b[4]), _overlap(b[4], a[4])) > 0.5

    bars = [r[0] for r in readings]
    # one label read two ways from two crops ("2.0 µm" and "20 µm"): neither can be trusted
    misread = next(((a[2], b[2]) for a in readings for b in readings if a[1] is not None and b[1] is not None
                    and a[1] != b[1] and same_label(a, b)), None)
    readings = [r for r in readings if r[1] is None
                or not any(o[1] is not None and o is not r and same_label(o, r)
                           and (-o[0].length, o[0].x0, o[0].y0) < (-r[0].length, r[0].x0, r[0].y0) for o in readings)]
    labelled = [r for r in readings if r[1] is not None]
    if not readings:
        return ScaleBarReading()
    if not labelled:
        bar = readings[0][0]
        return ScaleBarReading("low", "a bar was found but no length label next to it could be read",
                               bar_px=bar.length, box=(bar.x0, bar.y0, bar.x1, bar.y1))
    bar, value, text, score, box, _ = labelled[0]
    bar = _split_bar(img, bar, box, bars)
    reading = {"value_nm": value, "text": text, "bar_px": bar.length, "box": (bar.x0, bar.y0, bar.x1, bar.y1), "label_box": box}
    # two bars that give the same pixel size (a figure's own bar beside the instrument's, both
    # "1 µm", 31.6 and 32.2 px) agree; bars that do not are a conflict
    scales = sorted(r[1] / r[0].length for r in labelled)
    distinct = [a for a, b in zip(scales, scales[1:] + [np.inf]) if b > 1.03 * a]
    if len(distinct) > 1:
        return ScaleBarReading("low", f"{len(distinct)} scale bars with labels were found", **reading)
    if bar.touches_border:
        return ScaleBarReading("low", "the bar touches the image border and may be cut", **reading)
    if (bar.y0 == 0 or bar.y1 >= img.shape[0]) and bar.length < 0.5 * _text_width(text, box):
        # against the top or bottom border only some of a bar's thickness is lost, unless what
        # is left is a piece of another shape (the top edge of an outlined box): short against
        # its label, it is not trusted
        return ScaleBarReading("low", "the bar touches the image's top or bottom border and is short for its label: "
                                      "it may be cut", **reading)
    if misread:
        return ScaleBarReading("low", f"the label was read two ways ('{misread[0]}', '{misread[1]}')", **reading)
    if score < MIN_TEXT_SCORE:
        return ScaleBarReading("low", f"the label was read with little certainty ({score:.2f})", **reading)
    if value >= MAX_BAR_NM:
        return ScaleBarReading("low", f"the label reads '{text}', longer than an electron microscope's field of "
                                      "view: it may be misread (nm read as mm)", **reading)
    if significant_digits(text) > 2:
        return ScaleBarReading("low", f"the label reads '{text}', an unusual value for a scale bar (two significant "
                                      "digits at most, as in 100 nm, 2.5 µm or 35 nm): it may be misread", **reading)
    return ScaleBarReading("high", "", **reading)


#: The longest scale bar an electron micrograph can carry: at the lowest magnifications (5-20x)
#: an SEM frame spans a few millimetres to about 2 cm, and its bar reads 1-5 mm. A longer reading
#: is a misread, mostly "100 nm" read as "100 mm".
MAX_BAR_NM = 1e7


def significant_digits(label: str) -> int:
    """Significant digits of a label's number: "100 nm" 1, "2.5 µm" 2, "35 nm" 2, "108 nm" 3.
    Scale bars are drawn at round values; three or more digits mostly mean a misread ("100"
    read as "108") or a field of a data bar that is no bar's label ("HFW 592 nm")."""
    number = re.match(r"\W*(\d+(?:[.,]\d+)?)", label)
    if not number:
        return 0
    digits = number.group(1).replace(",", "").replace(".", "").strip("0")
    return len(digits)
