"""The distance output: its target, its seeds, weights carried over from a 3-class model, and a
trained folder used end to end."""

import json

import numpy as np
import pytest
import torch

from emparticles.instances import instances_from_borders, instances_with
from emparticles.models.cnn import CNNSegmenter
from emparticles.models.networks import build_network
from emparticles.train.loop import distance_loss, load_matching_weights, segmentation_loss
from emparticles.train.targets import (
    FOREGROUND_ONLY,
    PARTICLE,
    distance_target,
    three_class_target,
)
from emparticles.types import THREE_CLASS, WITH_DISTANCE, ProbabilityMap, network_channels

from .conftest import write_disk_set


def test_distance_target_peaks_at_one_in_each_particle_and_is_zero_outside():
    labels = np.zeros((40, 70), np.int32)
    labels[5:26, 5:26] = 1  # 21 x 21 square
    labels[5:26, 26:47] = 2  # touching it on the right
    labels[30:37, 55:62] = 3  # a small one: 7 x 7
    target = three_class_target(labels, border_width=2)
    dist = distance_target(target)
    assert dist.dtype == np.float32 and dist.min() == 0.0 and dist.max() == 1.0
    assert (dist[target != PARTICLE] == 0).all()  # background and the border band
    for lab in (1, 2, 3):
        assert dist[labels == lab].max() == pytest.approx(1.0)  # each particle, whatever its size
    # the square's body is rows/cols 7..23 (2-px border band): its centre is the single maximum
    body = target[5:26, 5:26] == PARTICLE
    assert np.argwhere(dist[5:26, 5:26] == 1.0).tolist() == [[10, 10]] and body[10, 10]
    # it dips between the touching squares: along row 15 it falls to 0 at the seam and rises again
    row = dist[15, 5:47]
    assert row[20] == 0 and row[21] == 0 and row[10] == 1.0 and row[31] == 1.0


def test_distance_target_of_agglomerate_masks_is_empty():
    target = three_class_target(np.full((10, 10), -1, np.int32))
    assert (target == FOREGROUND_ONLY).all() and not distance_target(target).any()


def _two_overlapping_disks(h=48, w=80):
    yy, xx = np.mgrid[:h, :w]
    d1 = np.hypot(yy - 24, xx - 26)
    d2 = np.hypot(yy - 24, xx - 54)
    union = (d1 < 16) | (d2 < 16)
    rel = np.where(d1 < 16, 1 - d1 / 16, 0) + 0
    rel = np.maximum(rel, np.where(d2 < 16, 1 - d2 / 16, 0))
    particle = union.astype(np.float32)
    zero = np.zeros_like(particle)
    return np.stack([1 - particle, particle, zero, rel.astype(np.float32)]), union


def test_distance_seeds_part_touching_particles_where_no_border_was_drawn():
    probs, union = _two_overlapping_disks()
    prob = ProbabilityMap(probs, WITH_DISTANCE, "t")
    merged = instances_from_borders(prob)  # border seeds: one body, one particle
    parted = instances_from_borders(prob, seeds="distance", seed_distance=0.5)
    assert merged.count == 1
    assert parted.count == 2
    assert ((parted.labels > 0) == union).all()  # the whole foreground is kept
    assert parted.labels[24, 20] != parted.labels[24, 60]
    # the cut runs through the neck, midway between the centres (x = 40)
    row = parted.labels[24]
    assert row[39] == parted.labels[24, 20] and row[41] == parted.labels[24, 60]
    # the same through a thresholds.json
    assert instances_with(prob, {"seeds": "distance"}).count == 2


def test_distance_seeds_need_a_distance_channel_and_a_known_mode():
    probs, _ = _two_overlapping_disks()
    three = ProbabilityMap(probs[:3], THREE_CLASS, "t")
    with pytest.raises(KeyError, match="distance"):
        instances_from_borders(three, seeds="distance")
    with pytest.raises(ValueError, match="unknown seeds"):
        instances_from_borders(three, seeds="flow")


def test_channel_names_by_output_count():
    assert network_channels(3) == THREE_CLASS and network_channels(4) == WITH_DISTANCE
    with pytest.raises(ValueError):
        network_channels(5)


def test_three_class_weights_start_a_network_with_a_distance_output():
    torch.manual_seed(0)
    three = build_network("strided-unet-lite", 3)
    four = build_network("strided-unet-lite", 4)
    before = four.head.weight.detach().clone()
    filled = load_matching_weights(four, three.state_dict())
    assert sorted(filled) == ["head.bias", "head.weight"]
    assert torch.equal(four.head.weight[:3], three.head.weight)
    assert torch.equal(four.head.weight[3], before[3])  # the new output keeps its random start
    assert torch.equal(four.stem[0].weight, three.stem[0].weight)
    with pytest.raises(ValueError, match="does not fit"):
        load_matching_weights(three, four.state_dict())


def test_distance_loss_ignores_agglomerate_pixels_and_is_small_for_the_right_answer():
    labels = np.zeros((32, 32), np.int32)
    labels[4:28, 4:28] = 1
    target = torch.from_numpy(three_class_target(labels).astype(np.int64))[None]
    wanted = torch.from_numpy(distance_target(target[0].numpy()))[None]
    good = torch.logit(wanted.clamp(1e-4, 1 - 1e-4))
    assert distance_loss(good, target) < distance_loss(torch.zeros_like(good), target)
    # a map of unknown classes gives no distance loss at all
    unknown = torch.full((1, 32, 32), FOREGROUND_ONLY, dtype=torch.int64)
    assert float(distance_loss(torch.randn(1, 32, 32), unknown)) == 0.0
    # the class part of a 4-output loss is the 3-class loss
    logits = torch.randn(1, 4, 32, 32)
    weights = torch.ones(3)
    total = segmentation_loss(logits, target, weights, distance_weight=0.0)
    assert torch.isclose(total, segmentation_loss(logits[:, :3], target, weights))


def test_training_with_a_distance_head_gives_a_folder_that_segments_with_it(tmp_path):
    from emparticles.train.loop import TrainConfig, train

    write_disk_set(tmp_path, count=8, disks=4, radius=8, margin=10)
    cfg = TrainConfig(arch="strided-unet-lite", epochs=1, steps_per_epoch=2, batch_size=2, crop=64, tile=128,
                      overlap=16, val_fraction=0.3, device="cpu", distance_head=True)
    best = train(tmp_path / "img", tmp_path / "mask", tmp_path / "run", cfg, log=lambda m: None)
    config = json.loads((best / "config.json").read_text())
    assert config["channels"] == list(WITH_DISTANCE)
    thresholds = json.loads((best / "thresholds.json").read_text())
    assert thresholds["seeds"] in ("borders", "distance")  # chosen on the validation images
    seg = CNNSegmenter(best, device="cpu", onnx=False)
    img = np.random.default_rng(0).random((64, 96)).astype(np.float32)
    inst, prob = seg.segment(img)
    assert prob.channels == WITH_DISTANCE and prob.probabilities.shape == (4, 64, 96)
    assert 0 <= prob.channel("distance").min() and prob.channel("distance").max() <= 1
    classes = prob.probabilities[:3].sum(axis=0)
    assert np.allclose(classes, 1, atol=1e-5)
    assert inst.labels.shape == (64, 96)
    # and it continues from a 3-class folder
    cfg2 = TrainConfig(arch="strided-unet-lite", epochs=1, steps_per_epoch=1, batch_size=2, crop=64, tile=128,
                       overlap=16, val_fraction=0.3, device="cpu")
    three = train(tmp_path / "img", tmp_path / "mask", tmp_path / "run3", cfg2, log=lambda m: None, tune=False)
    cfg.init_from = str(three)
    messages = []
    train(tmp_path / "img", tmp_path / "mask", tmp_path / "run4", cfg, log=messages.append, tune=False)
    assert any("distance output" in m for m in messages)


def test_seeds_of_both_maps_part_where_either_does():
    probs, _ = _two_overlapping_disks()
    # a predicted border across the left disk: the distance map does not see it, the borders do
    probs[2, 8:40, 24:27] = 1.0
    probs[1, 8:40, 24:27] = 0.0
    prob = ProbabilityMap(probs, WITH_DISTANCE, "t")
    assert instances_from_borders(prob, seeds="distance").count == 2
    assert instances_from_borders(prob, seeds="both", seed_distance=0.3).count == 3


def test_train_command_takes_the_distance_head_and_refuses_it_for_mask_rcnn(tmp_path):
    from typer.testing import CliRunner

    from emparticles.cli import app

    write_disk_set(tmp_path, count=6, disks=3, radius=8, margin=10)
    res = CliRunner().invoke(app, ["train", "--images", str(tmp_path / "img"), "--masks", str(tmp_path / "mask"),
                                   "-o", str(tmp_path / "mr"), "--arch", "maskrcnn-resnet18-fpn", "--distance-head"])
    assert res.exit_code != 0 and "--distance-head" in res.output
    res = CliRunner().invoke(app, ["train", "--images", str(tmp_path / "img"), "--masks", str(tmp_path / "mask"),
                                   "-o", str(tmp_path / "run"), "--arch", "strided-unet-lite", "--epochs", "1",
                                   "--steps-per-epoch", "1", "--batch-size", "2", "--distance-head"])
    assert res.exit_code == 0, res.output
    config = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    assert config["channels"][-1] == "distance"
