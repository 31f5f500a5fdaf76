"""Segmenting a large frame block by block gives the particles of the frame segmented whole."""

import numpy as np
import pytest
from skimage.measure import label as connected

from emparticles import blocks
from emparticles.instances import Instances
from emparticles.types import ProbabilityMap


class Threshold:
    """A segmenter whose particles are the 4-connected bright regions (scores: their mean grey)."""

    model_id = "threshold"

    def __init__(self):
        self.windows: list[tuple[int, int]] = []

    def segment(self, pixels, particle_size_px=None):
        self.windows.append(pixels.shape)
        lab = connected(pixels > 100, connectivity=1).astype(np.int32)
        n = int(lab.max())
        sums = np.bincount(lab.ravel(), weights=pixels.ravel().astype(float), minlength=n + 1)[1:]
        area = np.bincount(lab.ravel(), minlength=n + 1)[1:]
        fg = (pixels > 100).astype(np.float32)
        return Instances(lab, (sums / 255 / np.maximum(area, 1)).astype(np.float32)), ProbabilityMap(
            np.stack([1 - fg, fg]), ("background", "particle"), self.model_id)


def disks(shape, centres, radius, value=200):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = np.full(shape, 20, np.uint8)
    for cy, cx in centres:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = value
    return img


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Two label images with the same particles, whatever their numbers."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return (len(np.unique(pairs[0])) == pairs.shape[1]) and (len(np.unique(pairs[1])) == pairs.shape[1])


def test_particles_across_block_edges_come_out_whole_and_once():
    rng = np.random.default_rng(0)
    centres = [(int(y), int(x)) for y, x in zip(rng.integers(10, 190, 40), rng.integers(10, 290, 40))]
    centres += [(64, 64), (64, 150), (128, 100), (127, 128)]  # on block edges and a block corner
    img = disks((200, 300), centres, 7)
    whole, _ = Threshold().segment(img)
    model = Threshold()
    done = blocks.segment_in_blocks(model, img, block_px=64, halo_px=16)
    assert done.cut_particles == 0
    assert done.instances.count == whole.count == int(done.instances.labels.max())
    assert same_partition(done.instances.labels, whole.labels)
    # every window is a block with at most 16 px of context on each side
    assert max(max(s) for s in model.windows) <= 64 + 2 * 16
    # each particle keeps its own score
    by_pixel = {}
    for lab_a, lab_b in zip(done.instances.labels.ravel(), whole.labels.ravel()):
        if lab_a:
            by_pixel[lab_a] = lab_b
    for a, b in by_pixel.items():
        assert done.instances.scores[a - 1] == pytest.approx(whole.scores[b - 1])


def test_a_particle_wider_than_the_halo_is_reported_cut():
    img = disks((120, 120), [(60, 60)], 40)
    done = blocks.segment_in_blocks(Threshold(), img, block_px=48, halo_px=8)
    assert done.cut_particles >= 1
    assert done.instances.count >= 1


def test_writes_into_a_given_array_and_handles_an_empty_frame():
    out = np.full((90, 70), 7, np.int32)
    done = blocks.segment_in_blocks(Threshold(), np.zeros((90, 70), np.uint8), block_px=32, halo_px=4, out=out)
    assert done.instances.count == 0 and done.instances.labels is out and not out.any()


def test_large_fields_go_through_blocks_in_analyze(monkeypatch, tmp_path):
    from emparticles import pipeline
    from emparticles.types import Micrograph

    rng = np.random.default_rng(1)
    centres = [(int(y), int(x)) for y, x in zip(rng.integers(10, 150, 30), rng.integers(10, 250, 30))]
    mg = Micrograph(disks((160, 260), centres, 6), pixel_size_nm=2.0)
    whole_inst, whole_full = pipeline.segment_micrograph(mg, Threshold())
    monkeypatch.setattr(pipeline, "BLOCKS_ABOVE_PX", 100 * 100)
    monkeypatch.setattr(blocks, "BLOCK_PX", 64)
    seen = []
    real = pipeline.segment_in_blocks
    monkeypatch.setattr(pipeline, "segment_in_blocks",
                        lambda *a, **k: seen.append(1) or real(*a, block_px=64, halo_px=16, **k))
    inst, full = pipeline.segment_micrograph(mg, Threshold())
    assert seen and inst.count == whole_inst.count
    assert same_partition(full, whole_full)
    assert np.shares_memory(inst.labels, full)


def test_a_network_searches_its_scale_once_for_all_blocks():
    from tests.test_deep import _ScoredAtScale

    seg = _ScoredAtScale(2.0, {"start": [1.0], "up": [2.0], "max_pixels": 2_000})
    img = np.random.default_rng(0).random((100, 150)).astype(np.float32)
    done = blocks.segment_in_blocks(seg, img, block_px=64, halo_px=8)
    searched, per_block = seg.calls[:2], seg.calls[2:]
    assert [c[0] for c in searched] == [1.0, 2.0]  # the search, on a crop of the frame
    assert [c[0] for c in per_block] == [2.0] * 6  # then 2 x 3 blocks at the chosen scale
    assert per_block[0][1] == (72, 72)  # 64 + the 8-px halo inside the frame
    assert done.instances.labels.shape == (100, 150)


def test_a_trained_network_segments_in_blocks(tmp_path):
    import torch

    from emparticles.models.cnn import save_model_folder
    from emparticles.models.networks import build_network
    from emparticles.models.registry import load_model

    torch.manual_seed(0)
    folder = save_model_folder(build_network("compact-unet").eval(), tmp_path / "m",
                               {"arch": "compact-unet", "classes": 3, "name": "tiny"})
    seg = load_model(str(folder), "cpu")
    img = disks((130, 170), [(30, 30), (64, 64), (100, 140)], 9)
    done = blocks.segment_in_blocks(seg, img, block_px=64, halo_px=16)
    lab = done.instances.labels
    assert lab.shape == img.shape and done.instances.count == int(lab.max()) == len(done.instances.scores)
