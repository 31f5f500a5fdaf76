"""Mask R-CNN: targets, merging of tiled detections, and a model folder that trains and runs."""

import json

import numpy as np
import pytest
import torch

from emparticles.models import load_model
from emparticles.models.maskrcnn import (
    ANCHOR_SIZES,
    MaskRCNNSegmenter,
    build_maskrcnn,
    instance_targets,
    low_contrast,
    merge_detections,
)

from .conftest import disks_image, write_disk_set


def test_instance_targets_from_labels():
    lab = np.zeros((40, 50), np.int32)
    lab[5:15, 10:30] = 1
    lab[20:22, 0:1] = 2  # 2 px: too small, left out
    lab[25:35, 40:50] = 3
    t = instance_targets(lab)
    assert t["boxes"].tolist() == [[10, 5, 30, 15], [40, 25, 50, 35]]
    assert t["labels"].tolist() == [1, 1]
    assert t["masks"].shape == (2, 40, 50) and int(t["masks"][0].sum()) == 200
    empty = instance_targets(np.zeros((8, 8), np.int32))
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 8, 8)


def test_merge_keeps_best_score_and_drops_tile_duplicates():
    square = np.zeros((20, 20), np.float32)
    square[5:15, 5:15] = 0.9
    # the same particle seen by two overlapping tiles at (0, 0) and (0, 10), and a weaker
    # detection mostly inside it
    inner = np.zeros((20, 20), np.float32)
    inner[6:14, 6:12] = 0.8
    other = np.zeros((20, 20), np.float32)
    other[0:4, 0:4] = 0.7
    cut = np.zeros((20, 20), np.float32)
    cut[5:15, 0:5] = 0.9  # the second tile sees the particle cut by its left edge
    dets = [(np.stack([square, inner]), np.array([0.95, 0.6]), (0, 0)),
            (np.stack([cut, other]), np.array([0.9, 0.8]), (0, 10))]
    inst = merge_detections((20, 40), dets, min_px=4)
    assert inst.count == 2
    assert sorted(np.bincount(inst.labels.ravel())[1:].tolist()) == [16, 100]
    # raster order: the small square at (0, 10) comes first, scores follow their particles
    assert inst.labels[0, 10] == 1 and inst.scores.tolist() == pytest.approx([0.8, 0.95])


def test_low_contrast_detections_are_dropped():
    from emparticles.instances import Instances, drop_instances

    rng = np.random.default_rng(0)
    image = 0.3 + 0.02 * rng.standard_normal((80, 120))
    image[10:30, 10:30] = 0.9  # a bright particle
    labels = np.zeros((80, 120), np.int32)
    labels[10:30, 10:30] = 1  # on the particle
    labels[40:70, 40:100] = 2  # a detection on plain background
    labels[12:28, 32:44] = 3  # touches particle 1's ring only on one side, background elsewhere
    image_std = float(np.std(image))
    flags = low_contrast(labels, image, 0.2)
    assert flags.tolist() == [False, False, True, True]
    # the contrast is in units of the image's standard deviation: a tiny threshold keeps all
    assert not low_contrast(labels, image, 0.001 / image_std).any()
    # no background ring (a particle enclosed by others) is never flagged
    packed = np.array([[1, 1, 1], [1, 2, 1], [1, 1, 1]], np.int32)
    assert not low_contrast(packed, np.zeros((3, 3)) + np.eye(3), 5.0, ring_px=1)[2]
    kept = drop_instances(Instances(labels, np.array([0.9, 0.8, 0.7], np.float32)), flags)
    assert kept.labels.max() == 1 and (kept.labels == 1).sum() == 400
    assert kept.scores.tolist() == pytest.approx([0.9])


def test_architecture_settings():
    net = build_maskrcnn("maskrcnn-resnet18-fpn")
    assert net.backbone.body.conv1.in_channels == 1
    assert net.rpn.anchor_generator.sizes == tuple((s,) for s in ANCHOR_SIZES)
    assert net.roi_heads.detections_per_img == 3000 and net.roi_heads.nms_thresh == 0.3
    assert net.rpn._post_nms_top_n["testing"] == 3000 and net.rpn.nms_thresh == 0.2
    assert net.roi_heads.box_roi_pool.canonical_level == 3
    x = torch.zeros(1, 1, 64, 64)
    feats = net.roi_heads.mask_predictor(torch.zeros(2, 128, 14, 14))
    assert feats.shape == (2, 2, 56, 56)  # the finer mask head
    with pytest.raises(KeyError, match="maskrcnn-resnet18-fpn"):
        build_maskrcnn("maskrcnn-vgg")
    net.eval()
    with torch.no_grad():
        out = net([x[0]])[0]
    assert out["masks"].shape[-2:] == (64, 64)  # never resized


def test_train_save_load_and_segment(tmp_path):
    from emparticles.train.maskrcnn import MaskRCNNConfig, train_maskrcnn

    write_disk_set(tmp_path, count=6, disks=3, radius=9, margin=12)
    torch.manual_seed(0)
    cfg = MaskRCNNConfig(epochs=2, heads_epochs=1, lr_drop_epoch=1, steps_per_epoch=1, batch_size=1, crop=64,
                         tile=64, overlap=16, val_fraction=0.3, device="cpu", extra_images=str(tmp_path / "img"),
                         extra_masks=str(tmp_path / "mask"), extra_fraction=0.5, paste_fraction=0.5)
    said = []
    best = train_maskrcnn(tmp_path / "img", tmp_path / "mask", tmp_path / "run", cfg, log=said.append)
    assert any("6 extra training images" in m for m in said) and any("paste augmentation" in m for m in said)
    rows = (tmp_path / "run" / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and "heads_only" in rows[0]
    config = json.loads((best / "config.json").read_text())
    assert config["kind"] == "maskrcnn" and config["train_config"]["momentum"] == 0.9
    seg = load_model(str(best), "cpu")
    assert isinstance(seg, MaskRCNNSegmenter)
    img, _ = disks_image([(30, 30), (60, 70)], radius=9, shape=(100, 130), seed=1)
    inst, prob = seg.segment(img)
    assert inst.labels.shape == (100, 130) and prob.probabilities.shape == (2, 100, 130)
    assert inst.scores.shape == (inst.count,)
    cfg.epochs = 3
    train_maskrcnn(tmp_path / "img", tmp_path / "mask", tmp_path / "run", cfg, resume=True, log=lambda m: None)
    assert len((tmp_path / "run" / "metrics.csv").read_text().strip().splitlines()) == 4


def test_batches_draw_from_extra_and_pasted_sources():
    """Mask R-CNN crops come from the extra (e.g. synthetic SEM) set, pasted agglomerates or the
    training images in the shares asked for: told by their number of particles and size."""
    from emparticles.train.data import PasteSource
    from emparticles.train.maskrcnn import _batch

    def identity(image, mask):
        return {"image": image, "mask": mask}

    two = disks_image([(30, 30), (60, 70)], radius=9, shape=(96, 96), seed=1)
    five = disks_image([(20, 20), (20, 70), (50, 45), (80, 20), (80, 70)], radius=8, shape=(96, 96), seed=2)
    train, extra = [(two[0] / 255.0, two[1])], [(five[0] / 255.0, five[1])]
    rng = np.random.default_rng(0)
    _, targets = _batch(rng, identity, train, 4, extra, extra_fraction=1.0)
    assert [len(t["boxes"]) for t in targets] == [5, 5, 5, 5]
    _, targets = _batch(rng, identity, train, 4, extra, extra_fraction=0.0)
    assert [len(t["boxes"]) for t in targets] == [2, 2, 2, 2]
    images, targets = _batch(rng, identity, train, 2, extra, 0.0, PasteSource(train), paste_fraction=1.0, paste_size=160)
    assert [tuple(im.shape) for im in images] == [(1, 160, 160), (1, 160, 160)]
    assert all(len(t["boxes"]) >= 1 for t in targets)
