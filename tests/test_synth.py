"""Synthetic SEM images, the paste augmentation, and annotation import/export round trips."""

import json

import numpy as np
import pytest
import tifffile

from emparticles.io.datasets import read_annotations, write_synth_set
from emparticles.io.infobar import detect_infobar
from emparticles.io.writers import read_labels
from emparticles.synth import (
    SynthSettings,
    _absorb_slivers,
    cut_agglomerates,
    paste_agglomerates,
    render_sem,
    shape_outline,
    synth_sem,
)
from emparticles.types import relabel_consecutive

SMALL = SynthSettings(width=256, height=192, median_diameter_px=(14, 24))


@pytest.mark.parametrize("shape", ["round", "ellipse", "faceted", "rod", "bipyramid"])
def test_outline_area_matches_diameter(shape):
    pts = shape_outline(np.random.default_rng(1), shape, 40.0)
    area = 0.5 * abs(np.dot(pts[:, 0], np.roll(pts[:, 1], 1)) - np.dot(pts[:, 1], np.roll(pts[:, 0], 1)))
    assert area == pytest.approx(np.pi * 20.0**2, rel=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_bipyramid_is_an_elongated_rhombus(seed):
    pts = shape_outline(np.random.default_rng(seed), "bipyramid", 60.0)
    d = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    i, j = np.unravel_index(np.argmax(d), d.shape)
    axis = (pts[j] - pts[i]) / d[i, j]
    across = pts @ np.array([-axis[1], axis[0]])
    length, width = d[i, j], np.ptp(across)
    area = np.pi * 30.0**2
    # a rhombus fills half the rectangle of its diagonals (an ellipse 0.79); truncated, rounded
    # tips and uneven vertices a little more; elongated 1.2-2.2 along its long diagonal
    assert 0.5 < area / (length * width) < 0.7
    assert 1.05 < length / width < 2.5


def test_slivers_are_absorbed_and_new_labels_map_to_old():
    lab = np.zeros((40, 40), np.int32)
    lab[5:20, 5:20] = 7
    lab[25:35, 5:30] = 3
    lab[20:22, 5:7] = 9  # 4 px sliver touching particle 7: handed to it
    new, old = _absorb_slivers(lab, min_px=12)
    assert int(new.max()) == 2
    assert old.tolist() == [0, 7, 3]  # raster order: 7's box comes first
    assert (new[20:22, 5:7] == 1).all()
    assert np.array_equal(old[new], np.where(lab == 9, 7, lab))


def test_particles_lying_under_others_are_darker():
    lab = np.zeros((60, 120), np.int32)
    lab[10:50, 10:50] = 1
    lab[10:50, 70:110] = 2
    covered_none = np.zeros(3, np.float32)
    covered_first = np.array([0, 2, 0], np.float32)
    a = render_sem(np.random.default_rng(4), lab, covered_none, None, 0.3)
    b = render_sem(np.random.default_rng(4), lab, covered_first, None, 0.3)
    inner1, inner2 = (slice(20, 40), slice(20, 40)), (slice(20, 40), slice(80, 100))
    # the same draws, so only particle 1's level changes: by the full 30 % (covered twice)
    assert np.allclose(b[inner2], a[inner2])
    assert b[inner1].mean() < a[inner1].mean() - 0.1


def test_flat_facets_are_planes_meeting_in_ridges():
    from emparticles.synth import particle_heights

    lab = np.zeros((80, 80), np.int32)
    lab[10:70, 10:70] = 1
    roof = particle_heights(lab, np.array([False, True]), roof_slope=0.5)
    dome = particle_heights(lab)
    # a square roof: the top facet rises by 0.5 px per px towards the apex (the centre), a plane
    assert np.allclose(np.diff(roof[10:40, 40]), 0.5)
    assert roof[40, 40] == pytest.approx(0.5 * 29)  # 29 px from the nearest side
    # along the diagonal ridge it rises by the same 0.5 per step of one row and one column
    assert np.allclose(np.diff(roof[np.arange(10, 40), np.arange(10, 40)]), 0.5)
    # the dome rises steeply at the rim and flattens at the top, to its inradius
    steps = np.diff(dome[10:40, 40])
    assert steps[0] > 3 * steps[-1] and dome[40, 40] == pytest.approx(29)
    assert roof[lab == 0].max() == dome[lab == 0].max() == 0


def test_unknown_shape_is_refused():
    with pytest.raises(ValueError, match="valid: round"):
        shape_outline(np.random.default_rng(0), "cube", 10)


def test_synth_is_reproducible_and_masks_are_consistent():
    a = synth_sem(np.random.default_rng(5), SMALL)
    b = synth_sem(np.random.default_rng(5), SMALL)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    lab = a.labels
    assert lab.dtype == np.int32 and a.image.dtype == np.uint8 and lab.shape == a.image.shape == (192, 256)
    n = int(lab.max())
    assert n >= 5
    assert np.array_equal(relabel_consecutive(lab), lab)  # 1..N in raster order
    sizes = np.bincount(lab.ravel())[1:]
    assert sizes.min() >= SMALL.min_visible_px
    # each particle is one connected piece
    from scipy import ndimage as ndi

    for i, sl in enumerate(ndi.find_objects(lab), start=1):
        assert ndi.label(lab[sl] == i)[1] == 1
    # particles are brighter than the substrate on average (SEM contrast), and touch each other
    assert a.image[lab > 0].mean() > a.image[(lab == 0)[: lab.shape[0]]].mean()
    touching = (lab[:, :-1] != lab[:, 1:]) & (lab[:, :-1] > 0) & (lab[:, 1:] > 0)
    assert touching.any()


def test_info_bar_has_no_particles_and_is_detected():
    s = synth_sem(np.random.default_rng(2), SynthSettings(width=512, height=384, info_bar_probability=1.0))
    assert s.info_bar_rows == round(0.1 * 384)
    assert not (s.labels[-s.info_bar_rows:] > 0).any()
    assert detect_infobar(s.image) == s.info_bar_rows


@pytest.mark.parametrize("light", [False, True])
def test_both_info_bar_styles_are_detected(light):
    from emparticles.synth import draw_info_bar

    rng = np.random.default_rng(6)
    img = (np.clip(rng.normal(110, 30, (384, 512)), 0, 255)).astype(np.uint8)
    out = draw_info_bar(rng, img, 38, 5.0, light=light)
    assert np.array_equal(out[:-38], img[:-38])  # only the bar's rows are drawn on
    band = out[-38:]
    assert (np.median(band) > 200) == light and (np.median(band) < 30) == (not light)
    assert detect_infobar(out) == 38


def test_cut_and_paste_agglomerates():
    lab = np.zeros((80, 80), np.int32)
    lab[10:20, 10:20] = 1
    lab[10:20, 20:30] = 2  # touching pair: one agglomerate of two particles
    lab[50:60, 50:60] = 3
    lab[0:5, 70:80] = 4  # cut by the border: left out
    img = np.where(lab > 0, 0.2, 0.8).astype(np.float32)
    pieces = cut_agglomerates(img, lab)
    assert sorted(int(p.labels.max()) for p in pieces) == [1, 2]
    assert all(p.background_level == pytest.approx(0.8) for p in pieces)
    bg = np.full((200, 200), 0.5, np.float32)
    out, labels = paste_agglomerates(np.random.default_rng(0), bg, pieces, count=6, gap_px=3)
    n = int(labels.max())
    assert n >= 6  # at least one of each piece kind fits many times over
    sizes = np.bincount(labels.ravel())[1:]
    assert set(sizes.tolist()) == {100}
    # particles keep their contrast to the new background: 0.2 - 0.8 + 0.5 inside, except the median band
    from scipy import ndimage as ndi

    core = ndi.binary_erosion(labels > 0, iterations=3)
    assert np.allclose(out[core], -0.1)
    # pasted agglomerates never touch each other: every 8-connected group is one source piece
    groups, k = ndi.label(labels > 0, structure=np.ones((3, 3)))
    per_group = [len(np.unique(labels[groups == g])) for g in range(1, k + 1)]
    assert sorted(set(per_group)) <= [1, 2] and sum(per_group) == n
    for g, count in zip(range(1, k + 1), per_group):
        assert (groups == g).sum() == 100 * count


def test_paste_median_band_equals_whole_image_filter():
    """The 5x5 median is computed on the band pixels alone; it must equal a whole-image filter
    there, also where pieces lie near each other and at the image's edges, and leave every other
    pixel as placed."""
    from scipy import ndimage as ndi

    from emparticles.synth import place_agglomerates

    rng = np.random.default_rng(3)
    lab = np.zeros((60, 60), np.int32)
    lab[5:15, 5:12], lab[5:15, 12:20], lab[30:50, 25:45] = 1, 2, 3
    img = rng.random((60, 60)).astype(np.float32)
    pieces = cut_agglomerates(img, lab)
    bg = rng.random((120, 100)).astype(np.float32)
    at_edge = []
    for seed in range(6):
        out, labels = paste_agglomerates(np.random.default_rng(seed), bg, pieces, count=12, gap_px=3)
        raw, raw_labels = place_agglomerates(np.random.default_rng(seed), bg, pieces, count=12, gap_px=3)
        assert np.array_equal(labels > 0, raw_labels > 0)
        fg = labels > 0
        band = ndi.binary_dilation(fg, iterations=2) & ~ndi.binary_erosion(fg, iterations=2)
        assert band.any()
        at_edge.append(band[:2].any() or band[-2:].any() or band[:, :2].any() or band[:, -2:].any())
        assert np.array_equal(raw[~band], out[~band])
        assert np.array_equal(ndi.median_filter(raw, size=5)[band], out[band])
    assert any(at_edge)  # the mirrored edge was exercised


def test_write_synth_set_resumes_and_calibrates(tmp_path):
    rec = write_synth_set(tmp_path, 2, seed=1, settings=SMALL)
    assert set(rec) == {"synth_0001_00000", "synth_0001_00001"}
    img_path = tmp_path / "images" / "synth_0001_00000.tif"
    before = img_path.stat().st_mtime_ns
    rec = write_synth_set(tmp_path, 3, seed=1, settings=SMALL)
    assert len(rec) == 3 and img_path.stat().st_mtime_ns == before  # kept, not redrawn
    from emparticles.io import read_micrograph

    mg = read_micrograph(img_path)
    assert mg.pixel_size_nm == pytest.approx(rec["synth_0001_00000"]["pixel_size_nm"], rel=1e-5)
    labels, _ = read_labels(tmp_path / "masks" / "synth_0001_00000.png")
    assert labels.max() == rec["synth_0001_00000"]["particles"]
    again = synth_sem(np.random.default_rng([1, 0]), SMALL)
    assert np.array_equal(labels, again.labels) and np.array_equal(tifffile.imread(img_path), again.image)


def test_coco_labelme_and_via_import(tmp_path):
    # two squares overlapping: the smaller one is painted last and stays whole
    coco = {"images": [{"id": 7, "file_name": "a.png", "height": 40, "width": 50}],
            "annotations": [
                {"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0,
                 "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]]},
                {"id": 2, "image_id": 7, "category_id": 1, "iscrowd": 0,
                 "segmentation": [[25, 5, 35, 5, 35, 15, 25, 15]]}],
            "categories": [{"id": 1, "name": "particle"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    lab = read_annotations(tmp_path / "coco.json")["a.png"]
    assert lab.shape == (40, 50) and lab.max() == 2
    small = lab[10, 30]
    assert (lab == small).sum() == 100  # the 10x10 square, whole
    assert (lab == 3 - small).sum() == 400 - 25  # the 20x20 square less the overlap
    labelme = {"imageHeight": 40, "imageWidth": 50, "imagePath": "b.png",
               "shapes": [{"shape_type": "rectangle", "points": [[0, 0], [10, 10]]},
                          {"shape_type": "polygon", "points": [[20, 20], [30, 20], [30, 30], [20, 30]]}]}
    (tmp_path / "b.json").write_text(json.dumps(labelme))
    lab = read_annotations(tmp_path / "b.json")["b.png"]
    assert np.bincount(lab.ravel())[1:].tolist() == [100, 100]
    from PIL import Image

    Image.fromarray(np.zeros((40, 50), np.uint8)).save(tmp_path / "c.png")
    via = {"c.png123": {"filename": "c.png", "regions": [
        {"shape_attributes": {"name": "polygon", "all_points_x": [5, 15, 15, 5], "all_points_y": [5, 5, 15, 15]}},
        {"shape_attributes": {"name": "rect", "x": 20, "y": 20, "width": 10, "height": 5}}]}}
    (tmp_path / "via.json").write_text(json.dumps(via))
    lab = read_annotations(tmp_path / "via.json")["c.png"]
    assert np.bincount(lab.ravel())[1:].tolist() == [100, 50]


def test_bad_annotation_file_is_named(tmp_path):
    from emparticles.errors import InputError

    (tmp_path / "x.json").write_text('{"hello": 1}')
    with pytest.raises(InputError, match="x.json.*COCO 1.0"):
        read_annotations(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("not json")
    with pytest.raises(InputError, match="y.json"):
        read_annotations(tmp_path / "y.json")


def test_coarse_substrate_noise_matches_the_spatial_gaussian_filter():
    """The Fourier-filtered coarse texture is the periodic Gaussian filter of the same white
    noise (up to the spatial kernel's 4-sigma truncation) and draws the same random numbers."""
    from scipy import ndimage as ndi

    from emparticles.synth import _smooth_noise

    for sigma in (15.0, 60.0):
        rng = np.random.default_rng(3)
        fast = _smooth_noise(rng, (300, 256), sigma)
        after = rng.random()
        rng = np.random.default_rng(3)
        slow = ndi.gaussian_filter(rng.standard_normal((300, 256)).astype(np.float32), sigma, mode="wrap")
        assert rng.random() == after
        assert np.abs(fast - slow / slow.std()).max() < 2e-3
        assert fast.dtype == np.float32 and abs(float(fast.std()) - 1.0) < 1e-5
