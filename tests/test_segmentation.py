"""Classical model, instances and matching on images whose particles are known."""

import numpy as np
import pytest

from emparticles.errors import InputError
from emparticles.evaluate import matching
from emparticles.instances import distance_watershed
from emparticles.models import available_models, load_model
from emparticles.models.classical import ClassicalSegmenter
from emparticles.types import relabel_consecutive

from .conftest import GRID_CENTRES, disks_image


@pytest.mark.parametrize("dark", [True, False])
def test_classical_finds_every_disk_either_polarity(dark):
    img, truth = disks_image(GRID_CENTRES, radius=10, shape=(128, 176), dark=dark)
    instances, prob = ClassicalSegmenter().segment(img)
    m = matching(truth, instances.labels, 0.5)
    assert m.n_pred == 12 and m.tp == 12
    assert m.mean_matched_iou > 0.85
    assert prob.probabilities.shape == (2, 128, 176)
    assert np.allclose(prob.probabilities.sum(0), 1.0)
    assert instances.scores.shape == (12,) and (instances.scores > 0.5).all()


def test_two_touching_disks_are_split():
    fg = np.zeros((60, 90), bool)
    yy, xx = np.mgrid[:60, :90]
    fg |= (yy - 30) ** 2 + (xx - 30) ** 2 <= 14**2
    fg |= (yy - 30) ** 2 + (xx - 56) ** 2 <= 14**2
    labels = distance_watershed(fg)
    assert labels.max() == 2
    assert (labels[30, 30], labels[30, 56]) == (1, 2)


def test_small_pieces_are_dropped():
    fg = np.zeros((30, 30), bool)
    fg[5:7, 5:7] = True  # 4 px
    fg[15:25, 15:25] = True
    assert distance_watershed(fg, min_size_px=9).max() == 1


def test_registry_lists_names_and_rejects_unknown():
    assert "classical" in available_models()
    with pytest.raises(InputError, match="classical"):
        load_model("no-such-model")


def test_matching_perfect_and_partial():
    _, truth = disks_image(GRID_CENTRES, radius=10, shape=(128, 176))
    assert matching(truth, truth).f1 == 1.0
    assert matching(truth, truth).panoptic_quality == 1.0
    pred = truth.copy()
    pred[pred == 3] = 0
    m = matching(truth, pred)
    assert (m.tp, m.fn, m.fp) == (11, 1, 0)
    assert m.recall == pytest.approx(11 / 12)


def test_relabel_consecutive_in_raster_order():
    lab = np.array([[0, 9, 9], [5, 0, 2]])
    assert relabel_consecutive(lab).tolist() == [[0, 1, 1], [2, 0, 3]]


def test_fill_holes_and_inner_boundaries_match_the_library_functions():
    from scipy import ndimage as ndi
    from skimage.segmentation import find_boundaries

    from emparticles.instances import fill_holes
    from emparticles.io.writers import inner_boundaries

    m = np.zeros((12, 14), bool)
    m[1:7, 1:7] = True
    m[3:5, 3:5] = False  # a hole: filled
    m[8:12, 0:5] = True
    m[9:11, 0:2] = False  # open to the image border: not a hole
    m[2:6, 9:13] = True
    m[3, 10] = False  # a one-pixel hole
    filled = fill_holes(m)
    np.testing.assert_array_equal(filled, ndi.binary_fill_holes(m))
    assert filled[3, 3] and filled[3, 10] and not filled[9, 0]
    assert fill_holes(np.ones((3, 3), bool)).all() and not fill_holes(np.zeros((3, 3), bool)).any()
    rng = np.random.default_rng(0)
    noisy = rng.random((40, 50)) > 0.45
    np.testing.assert_array_equal(fill_holes(noisy), ndi.binary_fill_holes(noisy))
    lab, _ = ndi.label(filled)
    lab[1:7, 4:7][lab[1:7, 4:7] == 1] = 9  # two touching particles
    np.testing.assert_array_equal(inner_boundaries(lab), find_boundaries(lab, mode="inner"))
    assert inner_boundaries(lab)[3, 3] and inner_boundaries(lab)[3, 4]  # both sides of the seam


def test_region_labels_equal_scipys():
    from scipy import ndimage as ndi

    from emparticles.instances import label_regions

    rng = np.random.default_rng(3)
    masks = [np.zeros((0, 5), bool), np.zeros((4, 4), bool), np.ones((3, 7), bool), np.eye(6, dtype=bool),
             rng.random((1, 40)) < 0.5, rng.random((40, 1)) < 0.5]
    masks += [ndi.binary_opening(rng.random((rng.integers(2, 120), rng.integers(2, 120))) < p)
              for p in (0.3, 0.5, 0.7, 0.9) for _ in range(5)]
    masks.append((rng.random((50, 60)) * 255).astype(np.uint8) > 128)
    for mask in masks:
        expected, n = ndi.label(mask)
        labels, m = label_regions(mask)
        assert m == n and labels.dtype == np.int32
        np.testing.assert_array_equal(labels, expected)
    labels, m = label_regions(np.array([[0, 3, 0], [0, 7, 0], [2, 0, 0]], np.uint8))  # not bool: nonzero is inside
    assert m == 2 and labels.tolist() == [[0, 1, 0], [0, 1, 0], [2, 0, 0]]


def test_seeded_watershed_matches_scikit_image():
    """Values on the quantisation grid (with ties): the bucket queue floods in exactly the order
    of scikit-image's heap, so the labels are the same."""
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    from emparticles._watershed import seeded_watershed

    rng = np.random.default_rng(3)
    for trial in range(5):
        image = rng.permutation(48 * 48).reshape(48, 48).astype(np.float32) / (48 * 48 - 1)
        image = ndi.gaussian_filter(image, 2)  # basins
        levels = 64  # coarse: many ties
        lo, hi = image.min(), image.max()
        image = (lo + np.rint((image - lo) / (hi - lo) * (levels - 1)) * (hi - lo) / (levels - 1)).astype(np.float32)
        mask = rng.random((48, 48)) > 0.1
        markers = np.zeros((48, 48), np.int32)
        for i, (y, x) in enumerate(rng.integers(0, 16, (6, 2)) * 3):
            markers[y, x] = i + 1
        markers[~mask] = 0
        ours = seeded_watershed(image, markers, mask, levels=levels)
        theirs = watershed(image.astype(np.float64), markers, mask=mask)
        assert np.array_equal(ours, theirs), trial


def test_seeded_watershed_splits_a_plateau_between_its_seeds():
    from emparticles._watershed import seeded_watershed

    image = np.zeros((5, 11), np.float32)
    markers = np.zeros((5, 11), np.int32)
    markers[2, 0], markers[2, 10] = 1, 2
    mask = np.ones((5, 11), bool)
    mask[:, 5] = False  # a gap: the halves cannot flood across
    labels = seeded_watershed(image, markers, mask)
    assert (labels[:, :5] == 1).all() and (labels[:, 6:] == 2).all() and (labels[:, 5] == 0).all()
    assert not seeded_watershed(image, np.zeros_like(markers), mask).any()
    # a marker outside the mask floods nothing
    markers[2, 5] = 3
    assert not (seeded_watershed(image, markers, mask) == 3).any()


def test_relabel_raster_equals_relabel_consecutive():
    from emparticles._watershed import relabel_raster

    rng = np.random.default_rng(0)
    labels = rng.choice([0, 0, 3, 7, 12, 40], size=(30, 40))
    assert np.array_equal(relabel_raster(labels), relabel_consecutive(labels))
    assert relabel_raster(np.zeros((0, 3), np.int32)).shape == (0, 3)


def test_relabelling_that_drops_labels_equals_dropping_first():
    from emparticles._watershed import relabel_raster_lut

    rng = np.random.default_rng(3)
    labels = rng.choice([0, 0, 3, 7, 12, 40], size=(30, 40)).astype(np.int32)
    keep = np.ones(41, bool)
    keep[[7, 40]] = False
    out, lut = relabel_raster_lut(labels, keep=keep)
    expected = relabel_consecutive(np.where(np.isin(labels, [7, 40]), 0, labels))
    assert np.array_equal(out, expected)
    assert lut[7] == lut[40] == 0 and sorted(lut[[3, 12]]) == [1, 2]
    short, _ = relabel_raster_lut(labels, keep=keep[:10])  # labels beyond the flags are kept
    assert np.array_equal(short, relabel_consecutive(np.where(labels == 7, 0, labels)))


def test_label_sums_and_mean_probability_match_bincount():
    from emparticles._watershed import label_sums
    from emparticles.instances import mean_probability

    rng = np.random.default_rng(4)
    labels = rng.integers(0, 9, (37, 53)).astype(np.uint16)
    labels[labels == 5] = 0  # a label absent from the image
    values = rng.random((37, 53)).astype(np.float32)
    sums, counts = label_sums(labels, values)
    assert np.array_equal(sums, np.bincount(labels.ravel(), weights=values.ravel().astype(np.float64)))
    assert np.array_equal(counts, np.bincount(labels.ravel()))
    means = mean_probability(labels, values)
    assert means.dtype == np.float32 and means.shape == (8,) and means[4] == 0
    assert means[0] == pytest.approx(values[labels == 1].mean(), rel=1e-6)
    assert mean_probability(np.zeros((4, 4), np.int32), values[:4, :4]).shape == (0,)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
def test_percentiles_and_normalise_match_numpy(dtype):
    from emparticles.preprocess import normalise, percentiles

    rng = np.random.default_rng(1)
    for shape in [(37, 53), (1, 1), (2, 3)]:
        if np.dtype(dtype).kind == "f":
            a = rng.normal(100, 20, shape).astype(dtype)
        else:
            info = np.iinfo(dtype)
            a = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
        for q in [(0.5, 99.5), (0, 100), (50,)]:
            assert np.allclose(percentiles(a, q), np.percentile(a.astype(np.float64), q), rtol=1e-6, atol=1e-3)
    img = np.array([[0, 10], [20, 255]], np.uint8)
    norm = normalise(img, 0, 100)
    assert norm.dtype == np.float32 and norm.min() == 0 and norm.max() == 1
    assert np.allclose(norm, img / 255)
    assert not normalise(np.full((4, 4), 7, dtype)).any()  # a uniform image maps to zeros


def test_error_kinds_on_a_hand_built_pair():
    from emparticles.evaluate import error_kinds

    truth = np.zeros((60, 80), np.int32)
    truth[5:15, 5:15] = 1  # A  } three touching particles predicted as one: all merged (IoU 1/3)
    truth[5:15, 15:25] = 2  # B }
    truth[5:15, 25:35] = 3  # C }
    truth[30:40, 5:15] = 4  # D: found exactly
    truth[30:40, 30:60] = 5  # E: predicted in thirds: split, three fragments
    truth[50:58, 60:68] = 6  # F: not found at all
    pred = np.zeros_like(truth)
    pred[5:15, 5:35] = 7
    pred[30:40, 5:15] = 3
    pred[30:40, 30:40] = 1
    pred[30:40, 40:50] = 2
    pred[30:40, 50:60] = 4
    pred[2:12, 60:70] = 9  # on background: false
    k = error_kinds(truth, pred)
    assert k == {"true": 6, "pred": 6, "matched": 1, "true_missed": 1, "true_merged": 3, "true_split": 1,
                 "true_other": 0, "pred_false": 1, "pred_merging": 1, "pred_fragment": 3, "pred_other": 0}
    # a shifted outline (IoU 0.43, holding 60% of the particle, nothing else): "other" both ways
    shifted = np.zeros_like(truth)
    shifted[30:40, 9:19] = 1
    k = error_kinds(truth == 4, shifted)
    assert (k["true_other"], k["pred_other"], k["matched"]) == (1, 1, 0)
    # nothing predicted: every particle missed; identical images: everything matched
    assert error_kinds(truth, np.zeros_like(truth))["true_missed"] == 6
    assert error_kinds(truth, truth)["matched"] == 6


def _bright_and_dark_disks():
    """A mid-grey field with 3 bright disks (particles in SEM) and 3 dark ones (pits), labelled
    1-6 left to right, and one bright disk inside a ring of particles (no background around it)."""
    from skimage.draw import disk

    img = np.full((80, 200), 120.0)
    labels = np.zeros((80, 200), np.int32)
    for i, cx in enumerate((20, 50, 80, 110, 140, 170), start=1):
        rr, cc = disk((25, cx), 8, shape=img.shape)
        labels[rr, cc] = i
        img[rr, cc] = 200.0 if i <= 3 else 40.0
    labels[50:80, 0:60] = 7  # a block of particle, and in it a darker particle with no background ring
    img[50:80, 0:60] = 180.0
    labels[58:72, 20:34] = 8
    img[58:72, 20:34] = 100.0
    return img.astype(np.uint8), labels


def test_contrast_to_surroundings_signs_and_rings():
    from emparticles.instances import contrast_to_surroundings

    img, labels = _bright_and_dark_disks()
    c = contrast_to_surroundings(labels, img)
    assert np.isnan(c[0]) and np.isnan(c[8])  # no ring of background around particle 8
    assert c[1:4] == pytest.approx([80.0] * 3) and c[4:7] == pytest.approx([-80.0] * 3)


@pytest.mark.parametrize("particles, left_out", [("any", []), ("bright", [4, 5, 6]), ("dark", [1, 2, 3, 7])])
def test_wrong_contrast_leaves_out_pits_for_sem_and_bright_objects_for_tem(particles, left_out):
    from emparticles.instances import Instances, wrong_contrast
    from emparticles.pipeline import drop_wrong_contrast
    from emparticles.types import Micrograph

    img, labels = _bright_and_dark_disks()
    flags = wrong_contrast(labels, img, particles)
    assert np.flatnonzero(flags).tolist() == left_out
    # in the pipeline: rows below the field (an info bar) stay 0, the rest renumbered with their scores
    full = np.zeros((90, 200), np.int32)
    full[:80] = labels
    scores = np.linspace(0.5, 0.9, 8).astype(np.float32)
    mg = Micrograph(np.vstack([img, np.zeros((10, 200), np.uint8)]), infobar_rows=10)
    inst, out, n = drop_wrong_contrast(Instances(full[:80], scores), full, mg, particles)
    assert n == len(left_out) and inst.count == 8 - n and out.shape == (90, 200)
    assert set(inst.scores.tolist()) == {float(scores[i - 1]) for i in range(1, 9) if i not in left_out}
    assert not out[80:].any() and np.array_equal(out[:80] > 0, np.isin(labels, [i for i in range(1, 9) if i not in left_out]))
    with pytest.raises(ValueError, match="bright"):
        wrong_contrast(labels, img, "brighter")


def test_particles_setting_changes_the_fingerprint_only_when_used():
    import json
    from dataclasses import asdict

    from emparticles import __version__
    from emparticles.pipeline import AnalysisSettings

    plain = AnalysisSettings(model="m")
    assert AnalysisSettings(model="m", particles="bright").fingerprint() != plain.fingerprint()
    # a run made before the setting existed is still reused: its fingerprint had no such key
    before = {k: v for k, v in asdict(plain).items() if k != "particles"}
    import hashlib

    blob = json.dumps({**before, "version": __version__}, sort_keys=True, default=str)
    assert plain.fingerprint() == hashlib.sha256(blob.encode()).hexdigest()[:16]
