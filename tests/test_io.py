"""Reading images and their calibration, including every bad input a user can hand us."""

import numpy as np
import pytest
import tifffile
from PIL import Image

from emparticles.errors import InputError
from emparticles.io import read_labels, read_micrograph, write_label_png, write_label_tiff
from emparticles.io.metadata import parse_sidecar, zeiss_pixel_size

from .conftest import VENDOR, need

VENDOR_PIXEL_SIZES = [  # file, nm per pixel (RosettaSciIO's values), source
    ("test_tiff_Zeiss_SEM_512pix.tif", 11.649976, "tiff:CZ_SEM"),
    ("test_tiff_Zeiss_SEM_1k.tif", 2614.514, "tiff:CZ_SEM"),
    ("ZEISS_SEM_multipage.tif", 12.326225, "tiff:CZ_SEM"),
    ("FEI-Helios-Ebeam-8bits.tif", 3372.4, "tiff:FEI"),
    ("FEI-Helios-Ebeam-16bits.tif", 3372.4, "tiff:FEI"),
    ("FEI-Helios-navcam.tif", 263974.3, "tiff:FEI"),
    ("JEOL-SightX-TEM-mag-dummy.tif", 1.8207885, "tiff:JEOL-SightX"),
    ("test_STEM_image.dm3", 0.24853802, "dm:calibration"),
    ("test_dm_image_um_unit.dm3", 168.67469, "dm:calibration"),
    ("test_loading_image_saved_with_DM.tif", 168.67469, "tiff:DigitalMicrograph"),
    ("test_loading_image_saved_with_imageJ.tif", 168.67471, "tiff:ImageJ"),
]


@pytest.mark.parametrize("name, nm, source", VENDOR_PIXEL_SIZES)
def test_vendor_pixel_sizes(name, nm, source):
    mg = read_micrograph(need(VENDOR / name))
    assert mg.pixel_size_nm == pytest.approx(nm, rel=1e-4)
    assert mg.pixel_size_source == source
    assert mg.pixels.ndim == 2


@pytest.mark.parametrize("name", ["FEI-Helios-navcam-with-no-IRBeam.tif", "FEI-Helios-navcam-with-no-IRBeam-bad-floats.tif",
                                  "test_loading_image_saved_with_imageJ_no_scale.tif"])
def test_no_calibration_is_never_invented(name):
    mg = read_micrograph(need(VENDOR / name))
    assert mg.pixel_size_nm is None and mg.pixel_size_source == ""


def test_user_pixel_size_wins_and_the_file_value_is_kept():
    mg = read_micrograph(need(VENDOR / "test_tiff_Zeiss_SEM_1k.tif"), pixel_size_nm=5.0)
    assert mg.pixel_size_nm == 5.0 and mg.pixel_size_source == "user"
    assert mg.metadata["file_pixel_size_nm"] == pytest.approx(2614.514)


def test_multipage_reads_first_page_with_a_note():
    mg = read_micrograph(need(VENDOR / "ZEISS_SEM_multipage.tif"))
    assert mg.shape == (1536, 2048)
    assert any("multi-page" in n for n in mg.notes)


def test_zeiss_text_keys_in_every_unit_spelling():
    for unit, factor in [("pm", 1e-3), ("nm", 1.0), ("µm", 1e3), ("μm", 1e3), ("um", 1e3)]:
        ps = zeiss_pixel_size({"ap_image_pixel_size": ("Image Pixel Size", 2.5, unit)}, 1024)
        assert ps.nm == pytest.approx(2.5 * factor)
    # older files only carry the display value, which refers to a 1024-wide frame
    ps = zeiss_pixel_size({"ap_pixel_size": ("Pixel Size", 10.0, "nm")}, 2048)
    assert ps.nm == pytest.approx(5.0)
    assert zeiss_pixel_size("AP_X\r\nImage Pixel Size = 4.2 nm\r\n", 1024).nm == pytest.approx(4.2)


def test_sidecars(tmp_path):
    img = tmp_path / "hitachi.tif"
    tifffile.imwrite(img, np.zeros((64, 64), np.uint8) + 100)
    (tmp_path / "hitachi.txt").write_text("[SemImageFile]\nInstructName=S-4800\nDataSize=1280x960\nPixelSize=7.9375\n")
    mg = read_micrograph(img)
    assert mg.pixel_size_nm == pytest.approx(7.9375) and mg.pixel_size_source == "sidecar:Hitachi"
    jeol = "$CM_FORMAT JEOL/SEM\n$CM_FULL_SIZE 1280 960\n$$SM_MICRON_BAR 160\n$$SM_MICRON_MARKER 1um\n"
    assert parse_sidecar(jeol, 1280).nm == pytest.approx(6.25)
    assert parse_sidecar(jeol, 640).nm == pytest.approx(12.5)  # image saved at half size
    assert parse_sidecar("nothing useful", 100) is None


def test_formats_and_grey_conversion(tmp_path):
    grey = (np.arange(64 * 80) % 251).reshape(64, 80).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "a.png")
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "rgb_grey.png")
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "q.jpg", quality=100)
    colour = np.stack([grey, grey // 2, 255 - grey], -1)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    tifffile.imwrite(tmp_path / "b16.tif", grey.astype(np.uint16) * 257)
    ramp = (255 - np.arange(256, dtype=np.uint16)) * 257  # inverted grey palette, 16-bit entries
    tifffile.imwrite(tmp_path / "palette.tif", 255 - grey, photometric="palette", colormap=np.stack([ramp] * 3))
    assert np.array_equal(read_micrograph(tmp_path / "a.png").pixels, grey)
    assert np.array_equal(read_micrograph(tmp_path / "rgb_grey.png").pixels, grey)
    assert read_micrograph(tmp_path / "q.jpg").pixels.ndim == 2
    c = read_micrograph(tmp_path / "colour.png")
    assert c.pixels.ndim == 2 and any("colour" in n for n in c.notes)
    b = read_micrograph(tmp_path / "b16.tif")
    assert b.pixels.dtype == np.uint16 and b.pixels.max() == 250 * 257
    assert np.array_equal(read_micrograph(tmp_path / "palette.tif").pixels, grey)


def test_float_images_are_read_but_not_nan(tmp_path):
    a = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    tifffile.imwrite(tmp_path / "f.tif", a)
    assert read_micrograph(tmp_path / "f.tif").pixels.dtype == np.float32
    a[3, 3] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", a)
    with pytest.raises(InputError, match="NaN") as err:
        read_micrograph(tmp_path / "nan.tif")
    assert "nan.tif" in str(err.value)


def _bad_files(tmp_path):
    (tmp_path / "empty.tif").write_bytes(b"")
    tifffile.imwrite(tmp_path / "full.tif", np.zeros((256, 256), np.uint8))
    data = (tmp_path / "full.tif").read_bytes()
    (tmp_path / "truncated.tif").write_bytes(data[: len(data) // 3])
    (tmp_path / "text.tif").write_text("this is not an image\n")
    (tmp_path / "text.png").write_text("neither is this\n")
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(tmp_path / "tiny.png")
    return {"empty.tif": "empty", "truncated.tif": "not a readable", "text.tif": "not a readable",
            "text.png": "not an image", "tiny.png": "too small", "missing.tif": "not found"}


def test_bad_inputs_name_the_file_and_the_fix(tmp_path):
    for name, phrase in _bad_files(tmp_path).items():
        with pytest.raises(InputError) as err:
            read_micrograph(tmp_path / name)
        message = str(err.value)
        assert name in message and phrase in message and "Fix:" in message, message


def test_label_files_round_trip(tmp_path):
    labels = np.zeros((40, 50), np.int32)
    labels[5:10, 5:15] = 1
    labels[20:30, 30:45] = 300
    write_label_png(labels, tmp_path / "l.png")
    back, ps = read_labels(tmp_path / "l.png")
    assert np.array_equal(back, labels) and ps is None
    write_label_tiff(labels, tmp_path / "l.tif", 2.5)
    back, ps = read_labels(tmp_path / "l.tif")
    assert np.array_equal(back, labels) and ps == pytest.approx(2.5)
    with tifffile.TiffFile(tmp_path / "l.tif") as tif:  # what Fiji reads
        assert tif.imagej_metadata["unit"] == "nm"


def test_overlay_ids_stamped_as_pillow_draws_them():
    from PIL import ImageDraw

    from emparticles.io.writers import _stamp_digits

    ids = np.array([1, 23, 456, 7890, 10])
    x0, y0 = np.array([5, 40, 100, 150, -4]), np.array([3, 20, 35, -3, 50])  # the last two cut by the edges
    index = np.zeros((60, 180), np.uint8)
    assert _stamp_digits(index, ids, x0, y0, 9)
    drawn = Image.new("P", (180, 60), 0)
    draw = ImageDraw.Draw(drawn)
    for i, x, y in zip(ids, x0, y0):
        draw.text((int(x), int(y)), str(i), fill=9)
    expected = np.asarray(drawn)
    assert (expected == 9).sum() > 100
    np.testing.assert_array_equal(index, expected)


def test_overlay_colours_outlines_ids_and_info_bar(tmp_path):
    from emparticles.io.writers import inner_boundaries, write_overlay
    from emparticles.preprocess import normalise

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (60, 80)).astype(np.uint8)
    labels = np.zeros((60, 80), np.int32)
    labels[5:25, 5:25], labels[30:45, 40:70] = 1, 2
    write_overlay(pixels, labels, tmp_path / "o.png", measured={1}, infobar_rows=10, draw_ids=False)
    rgb = np.asarray(Image.open(tmp_path / "o.png").convert("RGB")).astype(int)
    edges = inner_boundaries(labels)
    assert (rgb[edges & (labels == 1)] == (0, 255, 255)).all()  # measured: cyan
    assert (rgb[edges & (labels == 2)] == (255, 140, 0)).all()  # excluded: orange
    grey = normalise(pixels) * 255
    field = ~edges
    field[-10:] = False
    assert (rgb[field][:, 0] == rgb[field][:, 1]).all() and (rgb[field][:, 1] == rgb[field][:, 2]).all()
    assert np.abs(rgb[field][:, 0] - grey[field]).max() <= 255 / 220 / 2 + 0.5  # 221 grey levels
    bar = rgb[-10:]
    assert (bar[..., 0] >= 0.4 * 255 - 1).all() and (bar[..., 0] >= bar[..., 1]).all()
    assert np.abs(bar[..., 1] - grey[-10:]).max() <= 255 / 31 / 2 + 0.5
    # ids are drawn in yellow over the particles
    write_overlay(pixels, labels, tmp_path / "ids.png", measured={1, 2})
    rgb = np.asarray(Image.open(tmp_path / "ids.png").convert("RGB"))
    assert ((rgb == (255, 255, 0)).all(axis=2) & (labels > 0)).sum() > 5


def _tables_of_every_kind() -> dict:
    import pandas as pd

    rng = np.random.default_rng(0)
    n = 40
    x = rng.standard_normal(n) * 10.0 ** rng.integers(-8, 18, n)
    x[:6] = [np.nan, np.inf, -0.0, 282.0, 1e16, 1e-5]
    mixed = pd.Series([None, 1.5, "t", np.nan, 3, True, "a,b", ""] * 5, dtype=object)
    return {
        "numbers and text": pd.DataFrame({
            "image": ["plain", "with,comma", 'with "quotes"', "two\nlines", "µm ε", ""] * 6 + ["x"] * 4,
            "x_nm": x, "label": np.arange(n), "touches_edge": rng.random(n) > 0.5,
            "rows": pd.array([1, None] * 20, dtype="Int64"), "note": mixed,
            "image_path": pd.Series(["a", None] * 20, dtype="str")}),
        "no rows": pd.DataFrame({"a": pd.Series(dtype=float), "b": pd.Series(dtype=object)}),
        "one empty field": pd.DataFrame({"a": [None]}),
        # kinds the csv module is not trusted with: pandas writes them
        "float32": pd.DataFrame({"a": np.array([0.1, 2.5], np.float32)}),
        "dates": pd.DataFrame({"when": pd.to_datetime(["2026-01-02", "2026-03-04"])}),
        "numpy scalars in objects": pd.DataFrame({"a": pd.Series([np.float64(0.1), np.int64(3)], dtype=object)}),
    }


@pytest.mark.parametrize("name", list(_tables_of_every_kind()))
def test_csv_files_are_what_pandas_writes(tmp_path, name):
    from emparticles.io.writers import csv_columns, write_csv

    df = _tables_of_every_kind()[name]
    write_csv(df, tmp_path / "ours.csv")
    df.to_csv(tmp_path / "pandas.csv", index=False)
    assert (tmp_path / "ours.csv").read_bytes() == (tmp_path / "pandas.csv").read_bytes()
    direct = csv_columns(df) is not None
    assert direct == (name in ("numbers and text", "no rows", "one empty field"))


def test_a_runs_tables_are_written_directly_as_pandas_writes_them(tmp_path, monkeypatch):
    from emparticles import pipeline
    from emparticles.io.writers import csv_columns, write_csv
    from emparticles.models import load_model
    from emparticles.synth import SynthSettings, synth_sem

    s = synth_sem(np.random.default_rng(1), SynthSettings(width=320, height=240))
    Image.fromarray(s.image).save(tmp_path / "frame.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    written = []

    def both(df, path):
        written.append((path.name, csv_columns(df) is not None))
        df.to_csv(path.with_suffix(".pandas"), index=False)
        return write_csv(df, path)

    monkeypatch.setattr(pipeline, "write_csv", both)
    settings = pipeline.AnalysisSettings(pixel_size_nm=2.0)
    run = pipeline.AnalyzeRun(tmp_path / "out", settings)
    model = load_model("classical", "cpu")
    run.save_image("frame", pipeline.analyse_path(tmp_path / "frame.png", model, settings))
    try:
        pipeline.analyse_path(tmp_path / "broken.png", model, settings)
    except Exception as exc:  # noqa: BLE001 - a failed image's row has empty fields
        run.save_failure("broken", tmp_path / "broken.png", str(exc))
    run.combine()
    assert sorted(written) == [(n, True) for n in ("agglomerates.csv", "all_particles.csv", "images.csv", "particles.csv")]
    for name, _ in written:
        ours = tmp_path / "out" / name
        assert ours.read_bytes() == ours.with_suffix(".pandas").read_bytes(), name
