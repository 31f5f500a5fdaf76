"""Info-bar detection on synthetic SEM frames with known bars and on real vendor files."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from emparticles.io import read_micrograph
from emparticles.io.infobar import detect_infobar
from emparticles.pipeline import locate_infobar

from .conftest import EMPS, VENDOR, need


def sem_frame(h=384, w=512, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.normal(110, 18, (h, w))
    yy, xx = np.mgrid[:h, :w]
    for cy, cx, r in rng.uniform((0, 0, 6), (h, w, 30), (40, 3)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += 70
    return np.clip(img, 0, 255).astype(np.uint8)


def zeiss_like(frame, bar=60):
    """White band under a 1-px black line, black text and a scale bar (Zeiss SmartSEM layout)."""
    _h, w = frame.shape
    band = Image.new("L", (w, bar), 255)
    d = ImageDraw.Draw(band)
    d.text((10, 15), "200 nm      EHT = 5.00 kV    Mag = 50.00 K X", fill=0)
    d.line((10, 40, 90, 40), fill=0, width=2)
    band = np.array(band)
    band[0] = 0
    return np.vstack([frame, band])


def fei_like(frame, bar=40):
    """Black band with white boxes and labels (FEI/Thermo xT layout)."""
    _h, w = frame.shape
    band = Image.new("L", (w, bar), 0)
    d = ImageDraw.Draw(band)
    for x0 in range(0, w - 60, 64):
        d.rectangle((x0, 0, x0 + 62, bar - 1), outline=255)
        d.text((x0 + 6, 5), "HV", fill=255)
        d.text((x0 + 6, 20), "5.00 kV", fill=255)
    return np.vstack([frame, np.array(band)])


@pytest.mark.parametrize("bar", [30, 60, 90])
def test_zeiss_like_bar_rows(bar):
    assert detect_infobar(zeiss_like(sem_frame(), bar)) == bar


@pytest.mark.parametrize("bar", [25, 40])
def test_fei_like_bar_rows(bar):
    assert detect_infobar(fei_like(sem_frame(), bar)) == bar


def test_16_bit_images():
    img = zeiss_like(sem_frame(), 50).astype(np.uint16) * 257
    assert detect_infobar(img) == 50


def test_no_bar_no_rows():
    assert detect_infobar(sem_frame()) == 0
    assert detect_infobar(np.full((200, 200), 128, np.uint8)) == 0


@pytest.mark.parametrize("name, rows", [("test_tiff_Zeiss_SEM_1k.tif", 77), ("test_tiff_Zeiss_SEM_512pix.tif", 34),
                                        ("ZEISS_SEM_multipage.tif", 0)])
def test_real_zeiss_files(name, rows):
    mg = locate_infobar(read_micrograph(need(VENDOR / name)))
    assert mg.infobar_rows == rows


def test_fei_bar_comes_from_the_metadata():
    mg = locate_infobar(read_micrograph(need(VENDOR / "FEI-Helios-Ebeam-8bits.tif")))
    assert mg.infobar_rows == 471 - 442 and "FEI" in mg.infobar_source


def test_overrides():
    mg = read_micrograph(need(VENDOR / "test_tiff_Zeiss_SEM_1k.tif"))
    assert locate_infobar(mg, crop_bottom=10).infobar_rows == 10
    assert locate_infobar(mg, detect=False).infobar_rows == 0


def test_never_cuts_annotated_particles_in_emps():
    """EMPS figure crops: where a bar (or caption band) is found, no hand-drawn particle lies in it."""
    need(EMPS)
    ids = [line.strip() for line in (EMPS / "train.txt").read_text().split()][::3]
    for i in ids:
        img = np.array(Image.open(EMPS / "images" / f"{i}.png"))
        rows = detect_infobar(img)
        if rows:
            truth = np.array(Image.open(EMPS / "segmaps" / f"{i}.png"))
            assert not truth[-rows:].any(), i


def test_black_bar_under_dark_substrate_is_found():
    """A black Zeiss-style bar under a dark SEM frame has no sharp full-width edge; the bar's
    uniform background still gives it away."""
    rng = np.random.default_rng(3)
    frame = np.clip(rng.normal(40, 12, (400, 512)), 0, 255).astype(np.uint8)
    band = Image.new("L", (512, 44), 8)
    d = ImageDraw.Draw(band)
    d.text((10, 12), "100 nm    EHT = 2.00 kV    WD = 3.1 mm", fill=255)
    d.rectangle((10, 30, 110, 33), fill=255)
    img = np.vstack([frame, np.array(band)])
    assert detect_infobar(img) == 44
    # the same dark frame without a bar has none
    assert detect_infobar(frame) == 0


def smartsem_black_bar(seed: int, particles: int, h: int = 768, w: int = 1024, bar: int = 56) -> np.ndarray:
    """A Zeiss SmartSEM-like frame: bright particles on a substrate clipped to black, and under it
    a black data bar of ``bar`` rows with white text and a white scale bar."""
    rng = np.random.default_rng(seed)
    img = rng.normal(0, 3, (h, w))
    yy, xx = np.mgrid[:h, :w]
    for _ in range(particles):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(10, 45)
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        img = np.where(d <= r, rng.uniform(90, 200) + 40 * (1 - d / r), img)
    img = np.clip(img + rng.normal(0, 6, (h, w)), 0, 255)
    img[h - bar:] = 0
    for x0 in range(30, w - 120, 140):
        img[h - bar + 14:h - bar + 30, x0:x0 + 90] = np.where(rng.random((16, 90)) < 0.35, 255, 0)
    img[h - bar + 40:h - bar + 46, 40:160] = 255
    return img.astype(np.uint8)


@pytest.mark.parametrize("particles", [20, 40, 150])
def test_black_smartsem_bar_under_a_black_substrate(particles):
    for seed in range(2):
        img = smartsem_black_bar(seed, particles)
        assert detect_infobar(img) == 56
        assert detect_infobar(img[:712]) == 0  # the frame alone has no bar
