"""Scale bars: labels, bars drawn in known places, real JEOL frames, calibration precedence."""

from __future__ import annotations

import csv

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw, ImageFont

from emparticles.io.scalebar import label_tokens, parse_label, read_scale_bar

from .conftest import SHARED, need

SILICA = SHARED / "sem-silica"


@pytest.mark.parametrize("text, nm", [("100nm", 100), ("1 µm", 1000), ("1μm", 1000), ("0.5 um", 500),
                                      ("200nm", 200), ("5 Å", 0.5), ("0,5 µm", 500), ("2 mm", 2e6), ("500 pm", 0.5),
                                      # what the recogniser makes of some figure fonts
                                      ("Tum", 1000), ("50 nn", 50), ("2 µμm", 2000)])
def test_labels_in_every_spelling(text, nm):
    assert parse_label(text)[0] == pytest.approx(nm)


@pytest.mark.parametrize("text", ["WD 4.0mm", "x30,000", "15.00 kV", "JEOL", "nm", "0 nm"])
def test_things_that_are_not_labels(text):
    assert parse_label(text) is None


def field(w=640, h=480, dark=True, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = rng.normal(90 if dark else 170, 12, (h, w))
    yy, xx = np.mgrid[:h, :w]
    for _ in range(25):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(8, 25)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 150 if dark else 100
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def draw_bar(im: Image.Image, x0: int, y0: int, length: int, label: str, ink: int, ticks: bool = False) -> None:
    d = ImageDraw.Draw(im)
    if ticks:  # |-----| with the line in the middle of the ticks
        d.rectangle([x0, y0 + 5, x0 + length, y0 + 6], fill=ink)
        d.rectangle([x0 - 1, y0, x0 + 1, y0 + 11], fill=ink)
        d.rectangle([x0 + length - 1, y0, x0 + length + 1, y0 + 11], fill=ink)
    else:
        d.rectangle([x0, y0, x0 + length - 1, y0 + 7], fill=ink)
    d.text((x0 + 10, y0 - 35), label, fill=ink, font=ImageFont.load_default(size=26))


@pytest.mark.parametrize("ink, dark", [(255, True), (0, False)])
def test_overlaid_solid_bar_light_on_dark_and_dark_on_light(ink, dark):
    im = field(dark=dark)
    draw_bar(im, 480, 430, 120, "500 nm", ink)
    r = read_scale_bar(np.array(im))
    assert (r.confidence, r.value_nm, r.bar_px) == ("high", 500.0, 120.0)
    assert r.pixel_size_nm == pytest.approx(500 / 120)
    assert r.box == (480, 430, 600, 438)


def test_line_with_end_ticks_is_measured_between_the_ticks():
    im = field(seed=3)
    draw_bar(im, 40, 440, 150, "2 um", 255, ticks=True)  # the test font has no µ
    r = read_scale_bar(np.array(im))
    assert r.confidence == "high" and r.value_nm == 2000.0
    assert r.bar_px == pytest.approx(150.0, abs=0.5)


def test_no_bar_no_confidence_and_no_pixel_size():
    r = read_scale_bar(np.array(field(seed=5)))
    assert r.confidence == "" and r.pixel_size_nm is None and r.reason


def test_unsure_readings_never_calibrate():
    two = field(seed=1)
    draw_bar(two, 470, 430, 120, "500 nm", 255)
    draw_bar(two, 40, 430, 60, "200 nm", 255)
    r = read_scale_bar(np.array(two))
    assert r.confidence == "low" and "2 scale bars" in r.reason and r.pixel_size_nm is None
    cut = field(seed=2)
    draw_bar(cut, 560, 430, 80, "1 um", 255)  # runs off the right border
    r = read_scale_bar(np.array(cut))
    assert r.confidence == "low" and r.pixel_size_nm is None
    unlabelled = field(seed=4)
    ImageDraw.Draw(unlabelled).rectangle([480, 430, 599, 437], fill=255)
    r = read_scale_bar(np.array(unlabelled))
    assert r.confidence == "low" and "no length label" in r.reason and r.pixel_size_nm is None


def test_jeol_frames_read_within_two_percent():
    rows = list(csv.DictReader((need(SILICA) / "images.csv").open()))[::4]  # one frame in four, all bar lengths
    from emparticles.io.infobar import detect_infobar

    for row in rows:
        img = np.array(Image.open(SILICA / "images" / f"{row['image']}.png"))
        r = read_scale_bar(img, detect_infobar(img))
        assert r.confidence == "high", (row["image"], r.reason)
        assert r.pixel_size_nm == pytest.approx(float(row["pixel_size_nm"]), rel=0.02), row["image"]


@pytest.mark.parametrize("inverted", [False, True])
@pytest.mark.parametrize("name", ["test_tiff_Zeiss_SEM_1k.tif", "test_tiff_Zeiss_SEM_512pix.tif"])
def test_zeiss_bars_agree_with_their_tags(name, inverted):
    """Both real Zeiss files' ticked bars, in their white data panels: the 512-px frame's "200 nm"
    bar is 17 px, drawn in grey between black text and a white panel. Inverted, the panel is
    SmartSEM's black data bar with white text."""
    from emparticles.io import read_micrograph
    from emparticles.io.infobar import detect_infobar
    from emparticles.pipeline import locate_infobar

    mg = locate_infobar(read_micrograph(need(SHARED / "vendor-metadata" / name)))
    pixels = mg.pixels.copy()
    if inverted:
        pixels[-mg.infobar_rows:] = 255 - pixels[-mg.infobar_rows:]
        assert detect_infobar(pixels) == mg.infobar_rows
    r = read_scale_bar(pixels, mg.infobar_rows)
    assert r.confidence == "high", r.reason
    assert r.pixel_size_nm == pytest.approx(mg.pixel_size_nm, rel=0.02)


def test_analyze_calibrates_from_the_bar_and_keeps_it_out(tmp_path):
    from typer.testing import CliRunner

    from emparticles.cli import app

    im = field(seed=7)
    draw_bar(im, 480, 430, 120, "500 nm", 255)
    im.save(tmp_path / "fig.png")
    runner = CliRunner()
    res = runner.invoke(app, ["analyze", str(tmp_path / "fig.png"), "-o", str(tmp_path / "a"), "--model", "classical",
                              "--no-report"])
    assert res.exit_code == 0, res.output
    row = pd.read_csv(tmp_path / "a" / "images.csv").iloc[0]
    assert row["pixel_size_source"] == "scale-bar" and row["pixel_size_nm"] == pytest.approx(500 / 120)
    assert row["scale_bar_confidence"] == "high" and row["scale_bar_px"] == 120
    import tifffile

    labels = tifffile.imread(tmp_path / "a" / "labels" / "fig.tif")
    x0, y0, x1, y1 = (int(v) for v in row["scale_bar_box"].split())
    assert (labels[y0:y1, x0:x1] == 0).all()  # the bar is no particle
    before = tifffile.imread(tmp_path / "b" / "labels" / "fig.tif") if (tmp_path / "b").exists() else None
    assert before is None
    # --scale-bar off: no calibration
    res = runner.invoke(app, ["analyze", str(tmp_path / "fig.png"), "-o", str(tmp_path / "b"), "--model", "classical",
                              "--no-report", "--scale-bar", "off", "--keep-figure-text"])
    assert pd.read_csv(tmp_path / "b" / "images.csv").iloc[0]["pixel_size_source"] == "unknown"
    unmasked = tifffile.imread(tmp_path / "b" / "labels" / "fig.tif")
    assert (unmasked[y0:y1, x0:x1] > 0).any()  # without the bar reading, classical takes the bar for a particle
    # ... unless the text over the field is looked for: the bar stands in one line with its label
    res = runner.invoke(app, ["analyze", str(tmp_path / "fig.png"), "-o", str(tmp_path / "t"), "--model", "classical",
                              "--no-report", "--scale-bar", "off"])
    assert (tifffile.imread(tmp_path / "t" / "labels" / "fig.tif")[y0:y1, x0:x1] == 0).all()
    assert "on text drawn over the field" in res.output
    # --pixel-size wins over the bar
    res = runner.invoke(app, ["analyze", str(tmp_path / "fig.png"), "-o", str(tmp_path / "c"), "--model", "classical",
                              "--no-report", "--pixel-size", "2nm"])
    row = pd.read_csv(tmp_path / "c" / "images.csv").iloc[0]
    assert row["pixel_size_source"] == "user" and row["pixel_size_nm"] == 2.0


def test_calibrate_command_lists_every_file(tmp_path):
    from typer.testing import CliRunner

    from emparticles.cli import app

    im = field(seed=8)
    draw_bar(im, 480, 430, 100, "1 um", 255)
    im.save(tmp_path / "bar.png")
    field(seed=9).save(tmp_path / "nobar.png")
    res = CliRunner().invoke(app, ["calibrate", str(tmp_path), "-o", str(tmp_path / "calibration.csv")])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(tmp_path / "calibration.csv").set_index("image")
    for col in ("pixel_size_nm", "pixel_size_source", "scale_bar_value_nm", "scale_bar_px", "scale_bar_confidence",
                "metadata_pixel_size_nm", "agreement"):
        assert col in table.columns
    assert table.loc["bar", "pixel_size_nm"] == pytest.approx(10.0)
    assert table.loc["bar", "pixel_size_source"] == "scale-bar"
    assert table.loc["nobar", "pixel_size_source"] == "unknown"
    assert "no pixel size" in res.output


def test_label_set_close_over_its_bar():
    """A label printed just over its bar (journal figures): the text detector takes both for one
    line of text, and the label is still read."""
    im = field(seed=11, dark=False)
    d = ImageDraw.Draw(im)
    d.text((40, 400), "200nm", fill=0, font=ImageFont.load_default(size=34))
    d.rectangle([40, 436, 142, 445], fill=0)
    r = read_scale_bar(np.array(im))
    assert (r.confidence, r.value_nm, r.bar_px) == ("high", 200.0, 103.0)


def test_label_standing_on_its_bar_is_one_component_and_still_read():
    """A white "1 um" touching its white bar: one connected shape, the bar its full-width rows."""
    im = field(seed=12)
    d = ImageDraw.Draw(im)
    d.text((470, 398), "1 um", fill=255, font=ImageFont.load_default(size=40))
    d.rectangle([440, 436, 599, 445], fill=255)
    d.rectangle([505, 430, 508, 436], fill=255)  # a stroke of the text runs into the bar
    r = read_scale_bar(np.array(im))
    assert (r.confidence, r.value_nm, r.bar_px) == ("high", 1000.0, 160.0)
    assert r.box == (440, 436, 600, 446)


def test_ragged_edge_row_of_a_bar_counts_as_its_edge():
    """JPEG figures: a row along the bar's edge half filled; the bar is measured edge to edge."""
    im = field(seed=13, dark=False)
    d = ImageDraw.Draw(im)
    d.rectangle([300, 440, 394, 450], fill=0)
    d.rectangle([348, 439, 394, 439], fill=0)  # half a row above it
    d.text((310, 400), "200 nm", fill=0, font=ImageFont.load_default(size=28))
    r = read_scale_bar(np.array(im))
    assert (r.confidence, r.value_nm, r.bar_px) == ("high", 200.0, 95.0)


def test_bar_with_ticks_rising_on_one_side_only():
    """|_____| as journal figures draw it: measured between the ticks."""
    im = field(seed=14, dark=False)
    d = ImageDraw.Draw(im)
    d.rectangle([60, 446, 200, 449], fill=0)
    d.rectangle([60, 438, 61, 449], fill=0)
    d.rectangle([199, 438, 200, 449], fill=0)
    d.text((215, 432), "1 um", fill=0, font=ImageFont.load_default(size=24))
    r = read_scale_bar(np.array(im))
    assert r.confidence == "high" and r.value_nm == 1000.0
    assert r.bar_px == pytest.approx(139.0, abs=0.5)


def test_particles_cut_flat_by_an_info_bar_are_no_bars():
    """Bright spheres and the dark gaps between them, cut by a data bar's straight top edge,
    make flat-bottomed shapes; with a data field "592 nm" under them nothing is read."""
    h, w = 480, 640
    img = np.full((h, w), 40, np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for cx in range(30, w, 60):
        img[(yy - 420) ** 2 + (xx - cx) ** 2 <= 28 ** 2] = 220
    img[430:] = 20  # the data bar
    im = Image.fromarray(img)
    d = ImageDraw.Draw(im)
    d.text((250, 436), "HFW", fill=200, font=ImageFont.load_default(size=16))
    d.text((250, 456), "592 nm", fill=200, font=ImageFont.load_default(size=16))
    r = read_scale_bar(np.array(im))
    assert r.confidence != "high" and r.pixel_size_nm is None


def test_a_label_of_unusual_value_is_not_trusted():
    im = field(seed=15)
    draw_bar(im, 480, 430, 120, "108 nm", 255)
    r = read_scale_bar(np.array(im))
    assert r.value_nm == 108.0 and r.confidence == "low" and "unusual value" in r.reason
    assert r.pixel_size_nm is None


@pytest.mark.parametrize("label, confidence", [("100 mm", "low"), ("2 mm", "high")])
def test_a_bar_longer_than_any_em_field_is_not_trusted(label, confidence):
    im = field(seed=15)
    draw_bar(im, 480, 430, 120, label, 255)
    r = read_scale_bar(np.array(im))
    assert r.confidence == confidence
    if confidence == "low":
        assert r.value_nm == 1e8 and "field of view" in r.reason and r.pixel_size_nm is None


def test_bar_in_the_middle_of_the_bottom_edge():
    im = field(seed=16)
    draw_bar(im, 250, 440, 140, "50 nm", 255)
    r = read_scale_bar(np.array(im))
    assert (r.confidence, r.value_nm, r.bar_px) == ("high", 50.0, 140.0)


def test_double_arrow_is_read_tip_to_tip():
    im = field(seed=17, dark=False)
    d = ImageDraw.Draw(im)
    d.rectangle([60, 449, 160, 451], fill=0)  # the shaft, x 60..160
    for k in range(1, 9):  # heads: their tips on the shaft, opening inwards
        d.line([(60 + k, 450 - k), (60 + k, 450 + k)], fill=0)
        d.line([(160 - k, 450 - k), (160 - k, 450 + k)], fill=0)
    d.text((80, 400), "60 nm", fill=0, font=ImageFont.load_default(size=28))
    r = read_scale_bar(np.array(im))
    assert (r.confidence, r.value_nm, r.bar_px) == ("high", 60.0, 101.0)


def test_of_two_bars_under_one_label_the_longest_keeps_it():
    """Glyph feet or a streak right under a label, and the real bar below it: the label is the
    real bar's, and no second bar makes the reading unsure."""
    im = field(seed=18, dark=False)
    d = ImageDraw.Draw(im)
    d.text((40, 396), "200 nm", fill=0, font=ImageFont.load_default(size=30))
    d.rectangle([70, 430, 97, 433], fill=0)  # a 28-px streak under the label
    d.rectangle([30, 444, 150, 451], fill=0)  # the bar, 121 px
    r = read_scale_bar(np.array(im))
    assert (r.confidence, r.value_nm, r.bar_px) == ("high", 200.0, 121.0)



def test_a_label_inside_a_data_line_is_the_one_by_the_bar():
    """A data line holds the bar's label among other lengths; a length after a field's name
    (working distance, field width) is never a label."""
    assert [t[1] for t in label_tokens("x50 200µm WD:28.0mm 8kV")] == ["200µm"]
    assert [t[1] for t in label_tokens("HFW 5.97 µm  mag 20 000x 500 nm")] == ["500 nm"]
    assert label_tokens("WD 4.0mm 15.00 kV") == []


def test_label_cut_by_the_detector_into_number_and_unit():
    """Wide letter spacing: the detector returns "20" and "nm" as two lines; read as one."""
    im = field(seed=19, dark=False)
    d = ImageDraw.Draw(im)
    font = ImageFont.load_default(size=30)
    d.text((40, 398), "20", fill=0, font=font)
    d.text((92, 398), "nm", fill=0, font=font)
    d.rectangle([40, 444, 119, 451], fill=0)
    r = read_scale_bar(np.array(im))
    assert (r.confidence, r.value_nm, r.bar_px) == ("high", 20.0, 80.0)


@pytest.mark.parametrize("ink, dark", [(255, True), (0, False)])
def test_bar_broken_by_its_label_is_read_end_to_end(ink, dark):
    """"——— 2 um ———" (FEI data bars and many figures): the two halves and the label between
    them are one bar, from the outer end of one half to the outer end of the other."""
    im = field(seed=20, dark=dark)
    d = ImageDraw.Draw(im)
    d.rectangle([300, 447, 389, 449], fill=ink)  # left half
    d.text((400, 433), "2 um", fill=ink, font=ImageFont.load_default(size=22))
    d.rectangle([460, 447, 549, 449], fill=ink)  # right half
    r = read_scale_bar(np.array(im))
    assert (r.confidence, r.value_nm, r.bar_px) == ("high", 2000.0, 250.0)
    assert r.box[0] == 300 and r.box[2] == 550


def test_bar_then_label_on_one_line_keeps_its_length():
    """"——— 200 nm" with nothing after the label: the bar is the line alone."""
    im = field(seed=21, dark=False)
    d = ImageDraw.Draw(im)
    d.rectangle([300, 447, 419, 450], fill=0)
    d.text((428, 433), "200 nm", fill=0, font=ImageFont.load_default(size=22))
    r = read_scale_bar(np.array(im))
    assert (r.confidence, r.value_nm, r.bar_px) == ("high", 200.0, 120.0)


def test_bar_over_the_field_of_a_frame_whose_data_strip_has_none():
    """A data strip with no bar in it (only text and ticks): the bar drawn over the field above
    it is read."""
    im = field(seed=22)
    draw_bar(im, 470, 380, 120, "500 nm", 255)
    img = np.array(im)
    img[440:] = 0
    d = ImageDraw.Draw(strip := Image.fromarray(img))
    d.text((20, 448), "x 100k   15 kV", fill=255, font=ImageFont.load_default(size=18))
    r = read_scale_bar(np.array(strip), infobar_rows=40)
    assert (r.confidence, r.value_nm, r.bar_px) == ("high", 500.0, 120.0)


def test_faint_other_half_past_the_label_is_followed_along_its_rows():
    """FEI's thin grey line in its black strip: the half past the label, broken up by the
    label's last glyph, is followed along the bar's rows to its end."""
    from emparticles.io.scalebar import _Bar, _split_bar

    img = np.full((40, 300), 40, np.uint8)
    img[20, 20:120] = 155  # the half found as a bar
    img[20, 160:250] = 155  # the other half, not found as a bar of its own
    img[20, 158:166:2] = 40  # the label's last glyph breaks its first columns
    img[12:29, 125:158] = 200  # the label
    bar = _Bar(20, 20, 120, 21, 100.0, False)
    whole = _split_bar(img, bar, (122, 12, 160, 29), [bar])
    assert (whole.x0, whole.x1, whole.length) == (20, 250, 230.0)
    img[20, 160:250] = 40  # nothing past the label: "—— 200 nm"
    assert _split_bar(img, bar, (122, 12, 160, 29), [bar]) == bar


def test_label_reaching_past_the_bar_touching_it_by_a_thin_stroke():
    """A large white "1.0 um" over a white bar no wider than the text, one glyph touching the bar
    by a thin stroke (the descender of a µ in a serif font): one component, the bar its full rows."""
    im = field(seed=23)
    d = ImageDraw.Draw(im)
    d.text((452, 394), "1.0 um", fill=255, font=ImageFont.load_default(size=40))
    d.rectangle([470, 440, 589, 451], fill=255)
    d.rectangle([540, 428, 541, 440], fill=255)  # the stroke
    r = read_scale_bar(np.array(im))
    assert (r.confidence, r.value_nm, r.bar_px) == ("high", 1000.0, 120.0)


def test_blurred_bar_is_measured_at_half_its_contrast():
    """A JPEG figure's bar has blurred ends: read edge to edge at half its contrast, it is its
    drawn length to a fraction of a pixel, where counting its brightest pixels reads it short."""
    from scipy import ndimage as ndi

    im = field(seed=21)
    d = ImageDraw.Draw(im)
    d.text((230, 400), "200 nm", fill=255, font=ImageFont.load_default(size=28))
    a = np.array(im).astype(np.float32)
    # a bar 100.5 px long drawn at 8x and averaged down: its ends are grey, then blurred
    fine = np.zeros((8 * 10, 8 * 140), np.float32)
    fine[8:72, 8 * 10:8 * 10 + 804] = 1
    cover = fine.reshape(10, 8, 140, 8).mean(axis=(1, 3))
    cover = ndi.gaussian_filter1d(cover, 1.0, axis=1)
    patch = a[438:448, 200:340]
    a[438:448, 200:340] = patch * (1 - cover) + 255 * cover
    r = read_scale_bar(np.clip(a, 0, 255).astype(np.uint8))
    assert r.confidence == "high" and r.value_nm == 200.0
    assert r.bar_px == pytest.approx(100.5, abs=0.3)


def test_glyph_crossing_its_bar_is_no_obstacle():
    """A "µ" standing on its bar, its descender running through the bar and out below it."""
    from emparticles.io.scalebar import _solid_band

    comp = np.zeros((16, 98), bool)
    comp[13] = True                          # the bar, one row
    comp[0:10, 44:46] = True                 # "µ": the left stem ...
    comp[0:10, 51:54] = True                 # ... the right stem
    comp[7:10, 46:54] = True                 # ... the bowl
    comp[10:13, 43:47] = True                # ... and the descender down to the bar
    comp[14:16, 44:46] = True                # ... and through it
    comp[0:10, 57:59] = True                 # "m"
    comp[0:10, 63:65] = True
    comp[0:2, 57:69] = True
    comp[0:10, 67:69] = True
    assert _solid_band(comp) == (13, 14, 0, 98)
    # the same pixels under the bar with no glyph coming down onto it: something else lies there
    apart = comp.copy()
    apart[10:13] = False
    assert _solid_band(apart) is None


def test_faint_bar_on_a_light_film_among_dark_particles():
    """A white bar (250) on a light grey film (205) under dark particles (40): it does not stand
    out from the strip's contrast, only from its surroundings, and is still read; a bright band
    that runs on past the bar's ends is not taken for it."""
    rng = np.random.default_rng(22)
    img = rng.normal(205, 4, (480, 640))
    yy, xx = np.mgrid[:480, :640]
    for cy, cx in ((400, 300), (430, 420), (380, 520), (450, 200), (60, 100), (90, 400)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 30 ** 2] = 40
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    d.text((30, 410), "50 nm", fill=250, font=ImageFont.load_default(size=26))
    d.rectangle([30, 446, 109, 452], fill=250)
    r = read_scale_bar(np.array(im))
    assert (r.confidence, r.value_nm) == ("high", 50.0)
    assert r.bar_px == pytest.approx(80, abs=0.5)
    # the same bar as a stretch of a longer bright band: no clean ends, no reading
    ImageDraw.Draw(im).rectangle([30, 446, 160, 452], fill=250)
    ImageDraw.Draw(im).rectangle([100, 449, 101, 449], fill=205)
    r = read_scale_bar(np.array(im))
    assert r.confidence != "high" or r.bar_px == pytest.approx(131, abs=1)


def hitachi_frame(ticks: int, spacing: float = 15.7, hidden: tuple[int, ...] = (), edge_line: bool = False,
                  first_from_top: bool = False) -> np.ndarray:
    """An SEM frame over a black data strip holding a Hitachi ruler: ``ticks`` white ticks
    ``spacing`` px apart (the middle and end ones taller), "1.00um" under its right end.
    ``edge_line``: a white line along the strip's top, the taller ticks joined to it;
    ``first_from_top``: the first tick runs up to the strip's top (joined to what is above)."""
    im = field(w=640, h=480, seed=23)
    strip = Image.new("L", (640, 40), 0)
    d = ImageDraw.Draw(strip)
    if edge_line:
        d.rectangle([0, 0, 639, 0], fill=255)
    x_first = 420.0
    for k in range(ticks):
        if k in hidden:
            continue
        x = round(x_first + k * spacing)
        tall = k in (0, ticks // 2, ticks - 1)
        top = (0 if edge_line else 2) if tall else 4
        if k == 0 and first_from_top:
            top = 0
        d.rectangle([x, top, x + 1, 9], fill=255)
    d.text((530, 14), "1.00um", fill=255, font=ImageFont.load_default(size=20))
    return np.vstack([np.array(im), np.array(strip)])


def test_hitachi_ruler_is_read_over_its_ten_divisions():
    img = hitachi_frame(11)
    r = read_scale_bar(img, 40)
    assert (r.confidence, r.value_nm) == ("high", 1000.0)
    assert r.bar_px == pytest.approx(157, abs=1)
    # a tick hidden by a particle leaves a double gap: the ruler is still its ten divisions
    r = read_scale_bar(hitachi_frame(11, hidden=(3,)), 40)
    assert r.confidence == "high" and r.bar_px == pytest.approx(157, abs=1)
    # the taller end and middle ticks joined to a line along the strip's top (SU8010): the
    # eight short ticks and the ink where the end ticks stand give the ruler
    r = read_scale_bar(hitachi_frame(11, edge_line=True), 40)
    assert r.confidence == "high" and r.bar_px == pytest.approx(157, abs=1)
    # the first tick joined to what lies above the strip: the taller middle tick is its centre
    r = read_scale_bar(hitachi_frame(11, first_from_top=True), 40)
    assert r.confidence == "high" and r.bar_px == pytest.approx(157, abs=1)
    # seven ticks are no Hitachi ruler: no pixel size from them
    assert read_scale_bar(hitachi_frame(7), 40).pixel_size_nm is None


def test_label_between_bar_halves_is_read_without_the_dashes():
    """FEI's "|—— 5 um ——|": the line read with its halves holds dashes; with the bar's rows
    painted out beside the glyphs, the label alone is read."""
    from emparticles.io.scalebar import _Bar, _read_without_bar

    im = Image.new("L", (200, 44), 0)
    d = ImageDraw.Draw(im)
    d.rectangle([10, 20, 70, 22], fill=230)
    d.rectangle([128, 20, 188, 22], fill=230)
    d.text((78, 8), "5 um", fill=230, font=ImageFont.load_default(size=24))
    crop = np.array(im)
    text, _score = _read_without_bar(crop, (6, 4, 194, 40), (6, 4, 194, 40), _Bar(10, 20, 189, 23, 179.0, False))
    assert not any(c in text for c in "-—–_") and parse_label(text) == (5000.0, text.strip())


def test_bar_against_the_bottom_border_keeps_its_length():
    """A bar drawn against the bottom border loses some thickness, not length: it calibrates. A
    short piece there (the top edge of an outlined box cut by the border) does not."""
    im = field(seed=24)
    d = ImageDraw.Draw(im)
    d.text((470, 430), "200 nm", fill=255, font=ImageFont.load_default(size=26))
    d.rectangle([460, 476, 579, 479], fill=255)  # rows 476-479 of 480
    r = read_scale_bar(np.array(im))
    assert (r.confidence, r.value_nm) == ("high", 200.0) and r.bar_px == pytest.approx(120, abs=0.5)
    cut = field(seed=24)
    d = ImageDraw.Draw(cut)
    d.text((470, 430), "200 nm", fill=255, font=ImageFont.load_default(size=26))
    d.rectangle([500, 476, 529, 479], fill=255)
    assert read_scale_bar(np.array(cut)).confidence != "high"


def test_particles_mostly_on_the_bar_are_left_out_and_those_it_is_drawn_over_stay():
    from emparticles.instances import Instances
    from emparticles.pipeline import drop_scale_bar
    from emparticles.types import Micrograph

    labels = np.zeros((100, 120), np.int32)
    labels[80:86, 60:100] = 1  # the bar, taken for a particle: all of it in the bar's box
    labels[10:90, 5:55] = 2  # a large particle the bar's left end is drawn over: 2% of it in the box
    labels[86:90, 70:80] = 3  # 40 px, half of them in the box grown by 2 px (rows 86-87)
    labels[20:30, 80:90] = 4  # elsewhere
    labels[75:85, 20:30] = 0
    inst = Instances(labels, np.array([0.9, 0.8, 0.7, 0.6], np.float32))
    bar = {"confidence": "high", "box": [50, 80, 100, 86], "label_box": None}
    mg = Micrograph(np.zeros((100, 120), np.uint8), metadata={"scale_bar": bar})
    kept, full = drop_scale_bar(inst, labels.copy(), mg)
    assert kept.count == 2 and kept.scores.tolist() == pytest.approx([0.8, 0.6])
    assert (full == kept.labels).all() and (kept.labels[80:86, 60:100] == 0).all()
    assert (kept.labels[10:75, 5:55] == 1).all()  # the large particle, whole
    low = Micrograph(mg.pixels, metadata={"scale_bar": {**bar, "confidence": "low"}})
    assert drop_scale_bar(inst, labels.copy(), low)[0].count == 4  # a doubtful bar leaves everything


def test_particles_measured_before_the_bar_was_read_are_measured_again_when_some_are_left_out():
    from pathlib import Path
    from types import SimpleNamespace

    from emparticles.instances import Instances
    from emparticles.measure import measure_labels
    from emparticles.pipeline import AnalysisSettings, analyse_micrograph
    from emparticles.types import Micrograph

    labels = np.zeros((100, 120), np.int32)
    labels[80:86, 60:100] = 1  # the bar, taken for a particle
    labels[10:40, 5:35] = 2
    labels[20:30, 80:90] = 3
    inst = Instances(labels, np.array([0.9, 0.8, 0.7], np.float32))
    pixels = np.random.default_rng(0).integers(0, 255, labels.shape).astype(np.uint8)
    measured = measure_labels(labels, pixels, None, image_name="fig", ultimate_points=True)
    model = SimpleNamespace(model_id="m")
    for bar, kept in (({"confidence": "high", "box": [50, 80, 100, 86], "label_box": None}, [1, 2]),
                      (None, [1, 2, 3])):
        mg = Micrograph(pixels, pixel_size_nm=2.0, path=Path("fig.png"), metadata={"scale_bar": bar} if bar else {})
        later = analyse_micrograph(mg, model, AnalysisSettings(), segmented=(inst, labels.copy(), []), measured_px=measured)
        assert later.all_particles["label"].tolist() == kept
        fresh = analyse_micrograph(mg, model, AnalysisSettings(), segmented=(inst, labels.copy(), []))
        pd.testing.assert_frame_equal(later.all_particles, fresh.all_particles, check_exact=True)
        pd.testing.assert_frame_equal(later.agglomerates, fresh.agglomerates, check_exact=True)


class _Recording:
    """A segmenter that finds nothing (or fails) and remembers the size hint it was given."""

    model_id = "recording"

    def __init__(self, fail: bool = False):
        self.fail, self.hints = fail, []

    def segment(self, pixels, particle_size_px=None):
        from emparticles.errors import InputError
        from emparticles.instances import Instances

        self.hints.append(particle_size_px)
        if self.fail:
            raise InputError(None, "cannot segment this field", "nothing to fix")
        return Instances(np.zeros(pixels.shape, np.int32), np.zeros(0, np.float32)), None


def test_the_bar_read_beside_the_segmentation_calibrates_hints_results_and_failures(tmp_path):
    from emparticles.errors import InputError
    from emparticles.pipeline import AnalysisSettings, analyse_path

    im = field(seed=7)
    draw_bar(im, 480, 430, 120, "500 nm", 255)
    im.save(tmp_path / "fig.png")
    result = analyse_path(tmp_path / "fig.png", _Recording(), AnalysisSettings())  # read in a second thread
    assert result.micrograph.pixel_size_source == "scale-bar"
    assert result.summary["pixel_size_nm"] == pytest.approx(500 / 120)
    hinted = _Recording()  # a hint in nm needs the bar read first
    analyse_path(tmp_path / "fig.png", hinted, AnalysisSettings(particle_size="100nm"))
    assert hinted.hints == [pytest.approx(100 / (500 / 120))]
    with pytest.raises(InputError) as err:  # a failed image still records the bar's calibration
        analyse_path(tmp_path / "fig.png", _Recording(fail=True), AnalysisSettings())
    assert err.value.known["pixel_size_source"] == "scale-bar"
    assert err.value.known["pixel_size_nm"] == pytest.approx(500 / 120)


def test_a_process_of_one_thread_reads_the_bar_in_that_thread(tmp_path, monkeypatch):
    import threading

    import torch

    from emparticles import pipeline

    im = field(seed=7)
    draw_bar(im, 480, 430, 120, "500 nm", 255)
    im.save(tmp_path / "fig.png")
    readers = []
    read = pipeline.calibrate_from_scale_bar
    monkeypatch.setattr(pipeline, "calibrate_from_scale_bar",
                        lambda mg, mode: readers.append(threading.get_ident()) or read(mg, mode))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = pipeline.analyse_path(tmp_path / "fig.png", _Recording(), pipeline.AnalysisSettings())
        torch.set_num_threads(2)
        two = pipeline.analyse_path(tmp_path / "fig.png", _Recording(), pipeline.AnalysisSettings())
    finally:
        torch.set_num_threads(threads)
    assert readers[0] == threading.get_ident() and readers[1] != threading.get_ident()
    assert one.summary["pixel_size_nm"] == two.summary["pixel_size_nm"] == pytest.approx(500 / 120)
