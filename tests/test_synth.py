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
    cut_agglomerates,
    paste_agglomerates,
    shape_outline,
    synth_sem,
)
from emparticles.types import relabel_consecutive

SMALL = SynthSettings(width=256, height=192, median_diameter_px=(14, 24))


@pytest.mark.parametrize("shape", ["round", "ellipse", "faceted", "rod"])
def test_outline_area_matches_diameter(shape):
    pts = shape_outline(np.random.default_rng(1), shape, 40.0)
    area = 0.5 * abs(np.dot(pts[:, 0], np.roll(pts[:, 1], 1)) - np.dot(pts[:, 1], np.roll(pts[:, 0], 1)))
    assert area == pytest.approx(np.pi * 20.0**2, rel=1e-9)


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
    """The 5x5 median is computed per pasted piece; the band must equal a whole-image filter,
    also where pieces lie near each other and at the image's edges."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(3)
    lab = np.zeros((60, 60), np.int32)
    lab[5:15, 5:12], lab[5:15, 12:20], lab[30:50, 25:45] = 1, 2, 3
    img = rng.random((60, 60)).astype(np.float32)
    pieces = cut_agglomerates(img, lab)
    bg = rng.random((120, 100)).astype(np.float32)
    for seed in range(6):
        out, labels = paste_agglomerates(np.random.default_rng(seed), bg, pieces, count=12, gap_px=3)
        # the reference: paste again with no band, then filter the whole image once
        fg = labels > 0
        band = ndi.binary_dilation(fg, iterations=2) & ~ndi.binary_erosion(fg, iterations=2)
        assert band.any()
        # the same paste without the filter: outside the band the image is unchanged
        raw = _paste_without_filter(np.random.default_rng(seed), bg, pieces)
        assert np.array_equal(raw[~band], out[~band])
        assert np.array_equal(ndi.median_filter(raw, size=5)[band], out[band])


def _paste_without_filter(rng, bg, pieces):
    from scipy import ndimage as ndi

    original = ndi.median_filter
    try:
        ndi.median_filter = lambda a, size: a  # the filter becomes the identity
        out, _ = paste_agglomerates(rng, bg, pieces, count=12, gap_px=3)
    finally:
        ndi.median_filter = original
    return out


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
