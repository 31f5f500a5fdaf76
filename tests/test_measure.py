"""Measurements on shapes with known answers, and against ImageJ 1.53t's own results."""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from emparticles.measure import PARTICLE_COLUMNS, measure_labels

DATA = Path(__file__).parent / "data"
CORNER = 2 - math.sqrt(2)


def one(labels, **kw):
    df = measure_labels(np.asarray(labels), **kw)
    assert len(df) == 1
    return df.iloc[0]


def test_single_pixel_matches_imagej_definitions():
    lab = np.zeros((5, 5), int)
    lab[2, 2] = 1
    p = one(lab)
    assert p.area_px == 1
    assert p.perimeter_px == pytest.approx(4 - 2 * CORNER)  # ImageJ's documented value
    assert p.feret_max_px == pytest.approx(math.sqrt(2))
    assert p.feret_min_px == pytest.approx(1.0)
    assert p.circularity == 1.0  # capped
    assert p.centroid_x_px == 2.5 and p.centroid_y_px == 2.5


@pytest.mark.parametrize("w, h", [(2, 2), (10, 5), (3, 17)])
def test_rectangles(w, h):
    lab = np.zeros((30, 30), int)
    lab[4 : 4 + h, 6 : 6 + w] = 7
    p = one(lab)
    assert p.label == 7
    assert p.area_px == w * h
    assert p.perimeter_px == pytest.approx(2 * (w + h) - 4 * CORNER)
    assert p.feret_max_px == pytest.approx(math.hypot(w, h))
    assert p.feret_min_px == pytest.approx(min(w, h))
    assert p.solidity == pytest.approx(1.0)
    assert p.convex_area_px == pytest.approx(w * h)
    # ImageJ's ellipse has the rectangle's second moments and its area: axes 2w/sqrt(pi), 2h/sqrt(pi).
    assert p.major_px == pytest.approx(2 * max(w, h) / math.sqrt(math.pi), rel=1e-6)
    assert p.minor_px == pytest.approx(2 * min(w, h) / math.sqrt(math.pi), rel=1e-6)
    assert p.aspect_ratio == pytest.approx(max(w, h) / min(w, h), rel=1e-6)
    assert p.bbox_x0_px == 6 and p.bbox_x1_px == 6 + w - 1 and p.bbox_y0_px == 4 and p.bbox_y1_px == 4 + h - 1
    assert p.centroid_x_px == pytest.approx(6 + w / 2) and p.centroid_y_px == pytest.approx(4 + h / 2)


def test_feret_angle_of_a_diagonal_bar():
    lab = np.zeros((40, 40), int)
    for i in range(20):  # thick line rising to the right (y down): 45 degrees
        lab[30 - i, 5 + i : 8 + i] = 1
    p = one(lab)
    assert p.feret_angle_deg == pytest.approx(45, abs=3)
    assert p.ellipse_angle_deg == pytest.approx(45, abs=3)


def test_disk_is_round_and_solid():
    yy, xx = np.mgrid[:101, :101]
    lab = ((yy - 50) ** 2 + (xx - 50) ** 2 <= 40**2).astype(int)
    p = one(lab)
    assert p.ecd_px == pytest.approx(80, rel=0.01)
    assert p.feret_max_px == pytest.approx(81, rel=0.01)
    assert p.feret_min_px == pytest.approx(81, rel=0.01)
    # ImageJ conventions: the traced perimeter and the pixel-corner hull run slightly outside a
    # digital disk, so circularity ~0.90 and solidity ~0.98 rather than 1.
    assert 0.88 < p.circularity < 0.92 and 0.97 < p.solidity < 0.99 and p.roundness > 0.99


def test_holes_are_not_area_but_do_not_change_the_outline():
    lab = np.zeros((20, 20), int)
    lab[2:12, 2:12] = 1
    solid = one(lab)
    lab[5:8, 5:8] = 0
    holed = one(lab)
    assert holed.area_px == 100 - 9
    assert holed.perimeter_px == solid.perimeter_px
    assert holed.feret_max_px == solid.feret_max_px


def test_edge_contact_physical_units_and_grey():
    lab = np.zeros((10, 12), int)
    lab[0:3, 4:6] = 1  # touches the top
    lab[5:8, 5:8] = 4  # inside; ids need not be consecutive
    grey = np.arange(120, dtype=np.uint16).reshape(10, 12)
    df = measure_labels(lab, grey, pixel_size_nm=2.0, image_name="x")
    assert list(df.label) == [1, 4]
    assert list(df.touches_edge) == [True, False]
    assert df.mean_grey.iloc[1] == pytest.approx(grey[5:8, 5:8].mean())
    assert df.area_nm2.iloc[1] == pytest.approx(9 * 4.0)
    assert df.feret_max_nm.iloc[1] == pytest.approx(2.0 * df.feret_max_px.iloc[1])
    assert set(df.columns) == {c for c in PARTICLE_COLUMNS if not c.startswith("uep_")}
    assert (df.image == "x").all()


def test_empty_and_bad_label_images():
    assert len(measure_labels(np.zeros((8, 8), int))) == 0
    with pytest.raises(ValueError, match="2-D"):
        measure_labels(np.zeros((2, 8, 8), int))
    with pytest.raises(ValueError, match="integers"):
        measure_labels(np.zeros((8, 8), float))
    with pytest.raises(ValueError, match="negative"):
        measure_labels(-np.ones((8, 8), int))


def test_agrees_with_imagej_particle_for_particle():
    """376 shapes (ellipses, rotated rectangles, polygons, holed disks, rough blobs, 1-1000 px)
    measured by ImageJ 1.53t Analyze Particles (tests/data/imagej_shapes_results.csv)."""
    labels = np.array(Image.open(DATA / "imagej_shapes_labels.png")).astype(np.int32)
    y, x = np.mgrid[0 : labels.shape[0], 0 : labels.shape[1]]
    grey = ((3 * x + 7 * y + (x * y) % 11) % 256).astype(np.uint8)  # the image ImageJ measured
    ij = pd.read_csv(DATA / "imagej_shapes_results.csv")
    ours = measure_labels(labels, grey)
    assert len(ours) == len(ij) == 376
    # ImageJ lists particles in raster order of their first pixel, as our labels are numbered.
    assert np.array_equal(ours.area_px.to_numpy(), ij.Area.to_numpy())
    pairs = [("perimeter_px", "Perim."), ("feret_max_px", "Feret"), ("feret_min_px", "MinFeret"),
             ("circularity", "Circ."), ("solidity", "Solidity"), ("major_px", "Major"), ("minor_px", "Minor"),
             ("aspect_ratio", "AR"), ("roundness", "Round"), ("centroid_x_px", "X"), ("centroid_y_px", "Y"),
             ("mean_grey", "Mean")]
    for col, ij_col in pairs:
        np.testing.assert_allclose(ours[col], ij[ij_col], rtol=1e-7, err_msg=col)
    for col, ij_col in [("feret_angle_deg", "FeretAngle"), ("ellipse_angle_deg", "Angle")]:
        d = np.abs(ours[col].to_numpy() - ij[ij_col].to_numpy()) % 180
        assert np.minimum(d, 180 - d).max() < 1e-6, col
    np.testing.assert_array_equal(ours.bbox_x0_px, ij.BX)
    np.testing.assert_array_equal(ours.bbox_x1_px - ours.bbox_x0_px + 1, ij.Width)


def test_ultimate_eroded_points_sit_at_particle_centres():
    lab = np.zeros((40, 60), int)
    lab[5:16, 5:16] = 1  # 11x11 square: centre pixel (10, 10)
    lab[20:35, 30:45] = 2
    lab[20:35, 45:58] = 3  # touching neighbour: each erodes on its own
    df = measure_labels(lab, ultimate_points=True)
    assert (df.uep_x_px[0], df.uep_y_px[0]) == (10.5, 10.5)
    assert df.uep_x_px[1] == pytest.approx(37.5, abs=1) and df.uep_x_px[2] == pytest.approx(51.5, abs=1)
    assert "uep_x_px" not in measure_labels(lab).columns
    # The ranks are exact squared Euclidean distances (as scipy's), the touching seam counted as
    # outside.
    from scipy import ndimage as ndi

    from emparticles.measure import ultimate_eroded_distance

    d = ultimate_eroded_distance(lab)
    assert d.dtype == np.int32
    assert d[10, 10] == 37 and d[0, 0] == 0  # 6 px to the background: 6 ** 2 + 1
    split = lab.copy()
    split[20:35, 44] = 0  # the seam pixels of particle 2 (its right neighbour is particle 3)
    ref = np.where(lab > 0, np.rint(ndi.distance_transform_edt(split > 0) ** 2) + 1, 0)
    np.testing.assert_array_equal(d, ref)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.int16])
def test_grey_values_of_any_type_measure_as_float64_ones(dtype):
    rng = np.random.default_rng(3)
    lab = np.zeros((30, 40), np.int32)
    lab[3:12, 4:20] = 1
    lab[15:28, 22:37] = 2
    grey = rng.integers(0, 250, lab.shape).astype(dtype)
    got = measure_labels(lab, grey)
    ref = measure_labels(lab, grey.astype(np.float64))
    np.testing.assert_array_equal(got["mean_grey"], ref["mean_grey"])
    assert got["mean_grey"][0] == pytest.approx(grey[3:12, 4:20].astype(float).mean())


@pytest.mark.parametrize("pixel_size_nm", [None, 2.5])
@pytest.mark.parametrize("ultimate_points", [False, True])
def test_units_added_later_give_the_table_measured_with_them(pixel_size_nm, ultimate_points):
    from emparticles.measure import with_physical_units

    lab = np.zeros((60, 80), np.int32)
    lab[5:20, 5:30] = 1
    lab[30:55, 40:52] = 7  # ids need not be consecutive
    lab[20:24, 70:80] = 3  # at the edge
    grey = np.random.default_rng(0).integers(0, 255, lab.shape).astype(np.uint8)
    for labels in (lab, np.zeros_like(lab)):
        later = with_physical_units(measure_labels(labels, grey, None, "a", ultimate_points), pixel_size_nm)
        pd.testing.assert_frame_equal(later, measure_labels(labels, grey, pixel_size_nm, "a", ultimate_points),
                                      check_exact=True)
    assert later.empty
    if pixel_size_nm:
        table = with_physical_units(measure_labels(lab, grey, None, "a", ultimate_points), pixel_size_nm)
        assert table["ecd_nm"].tolist() == pytest.approx((table["ecd_px"] * 2.5).tolist())
        assert table["area_nm2"].tolist() == [375 * 6.25, 40 * 6.25, 300 * 6.25]
