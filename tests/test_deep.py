"""Targets, networks, tiled inference, border-aware instances, model folders and evaluation."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage as ndi
from typer.testing import CliRunner

from emparticles.cli import app
from emparticles.evaluate import evaluate_dataset, voc_ap50
from emparticles.inference import predict_tiled, taper_window, tile_layout
from emparticles.instances import (
    Instances,
    fill_particle_holes,
    instances_from_borders,
    instances_with,
    trim_outlines,
)
from emparticles.models import load_model
from emparticles.models.cnn import CNNSegmenter, load_network, save_model_folder
from emparticles.models.networks import (
    ARCHITECTURES,
    build_network,
    fold_batchnorm,
    prepare_for_inference,
)
from emparticles.train.targets import BORDER, PARTICLE, class_weights, three_class_target
from emparticles.types import THREE_CLASS, ProbabilityMap

from .conftest import GRID_CENTRES, disks_image, write_disk_set


def test_border_class_marks_outlines_and_seams():
    lab = np.zeros((12, 20), int)
    lab[2:10, 2:9] = 1
    lab[2:10, 9:16] = 2  # touching at columns 8|9
    t = three_class_target(lab, border_width=1)
    assert t[5, 8] == BORDER and t[5, 9] == BORDER  # the seam
    assert t[5, 5] == PARTICLE and t[5, 12] == PARTICLE
    assert t[2, 5] == BORDER and t[0, 0] == 0
    assert (three_class_target(lab, 2) == BORDER).sum() > (t == BORDER).sum()
    w = class_weights([t])
    assert w.mean() == pytest.approx(1.0) and w[BORDER] > w[PARTICLE]
    assert w[0] == pytest.approx(w[PARTICLE])  # background weighs as much as particle
    counts = np.bincount(t.ravel(), minlength=3)
    ratio = np.sqrt(counts[:2].mean() / counts[BORDER])
    assert w[BORDER] / w[PARTICLE] == pytest.approx(ratio)
    wt = class_weights([t], scheme="tempered")
    assert wt == pytest.approx(np.sqrt(counts.sum() / counts) / np.sqrt(counts.sum() / counts).mean())
    with pytest.raises(ValueError, match="tempered"):
        class_weights([t], scheme="inverse")


@pytest.mark.parametrize("arch", ["compact-unet", "strided-unet", "strided-unet-slim", "strided-unet-lite",
                                  "unet-resnet18"])
def test_network_contract(arch, tmp_path):
    torch.manual_seed(0)
    net = build_network(arch)
    x = torch.randn(2, 1, 64, 96)
    y = net(x)
    assert y.shape == (2, 3, 64, 96)
    y.mean().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    net.eval()
    folder = save_model_folder(net, tmp_path / "m", {"arch": arch, "classes": 3, "name": "t"})
    again, config, thresholds = load_network(folder)
    with torch.no_grad():
        assert torch.allclose(net(x), again(x), atol=1e-4)  # channels_last changes summation order
    assert config["arch"] == arch and "seed_threshold" in thresholds
    # batch norm folded into the convolutions for inference: same function, no BatchNorm2d after a conv
    for module in net.modules():  # trained statistics, so that folding has something to fold
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    with torch.no_grad():
        expected = net(x)
        fast = prepare_for_inference(net)  # + decoder concatenations split into two convolutions
        assert torch.allclose(fast(x), expected, atol=1e-4)
    if arch != "unet-resnet18":  # its ResNet blocks keep conv and norm as attributes, not in a Sequential
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
        assert not any(isinstance(m, torch.nn.Sequential) and isinstance(m[0], torch.nn.Conv2d)
                       and m[0].in_channels > 2 * m[0].out_channels for m in fast.modules())
    with pytest.raises(ValueError, match="eval"):
        fold_batchnorm(build_network(arch))


def test_unknown_architecture_lists_valid_ones():
    with pytest.raises(KeyError, match="compact-unet"):
        build_network("resnet9000")
    assert {"unet-resnet18", "unet-resnet34", "deeplabv3-resnet50", "compact-unet"} <= set(ARCHITECTURES)


class PixelWise(torch.nn.Module):
    """No spatial context: tiling must not change anything."""

    multiple = 8

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 1)

    def forward(self, x):
        return self.conv(x)


class PixelWiseNumpy:
    """:class:`PixelWise`'s function as a network of numpy arrays (as an ONNX Runtime graph)."""

    multiple = 8
    takes_numpy = True

    def __init__(self, torch_net: PixelWise):
        self.w = torch_net.conv.weight.detach().numpy()[:, 0, 0, 0]
        self.b = torch_net.conv.bias.detach().numpy()

    def probabilities(self, x):
        from emparticles.inference import probabilities_of_logits

        return probabilities_of_logits(self.w[None, :, None, None] * x + self.b[None, :, None, None])


@pytest.mark.parametrize("shape", [(37, 53), (130, 170)])
def test_tiling_of_a_numpy_network_equals_the_torch_road(shape):
    torch.manual_seed(0)
    net = PixelWise().eval()
    numpy_net = PixelWiseNumpy(net)
    img = np.random.default_rng(0).random(shape).astype(np.float32)
    for kwargs in ({"tile": 512, "overlap": 16}, {"tile": 64, "overlap": 16, "batch_size": 3},
                   {"tile": 64, "overlap": 16, "flips": True}, {"tile": 64, "overlap": 16, "pad": 0}):
        expected = predict_tiled(net, img, **kwargs)
        got = predict_tiled(numpy_net, img, **kwargs)
        assert got.shape == (3, *shape) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_output_probabilities_softmax_of_classes_and_sigmoid_of_distance():
    from emparticles.inference import output_probabilities

    logits = torch.randn(2, 4, 9, 11)
    p = output_probabilities(logits)
    torch.testing.assert_close(p[:, :3], torch.softmax(logits[:, :3], dim=1))
    torch.testing.assert_close(p[:, 3], torch.sigmoid(logits[:, 3]))
    torch.testing.assert_close(p[:, :3].sum(1), torch.ones(2, 9, 11))
    torch.testing.assert_close(output_probabilities(logits[:, :3]), torch.softmax(logits[:, :3], dim=1))
    # a channels-last network output gives the same
    torch.testing.assert_close(output_probabilities(logits.contiguous(memory_format=torch.channels_last)), p)


@pytest.mark.parametrize("shape", [(37, 53), (130, 170), (300, 90)])
def test_tiling_is_seamless(shape):
    torch.manual_seed(0)
    net = PixelWise().eval()
    img = np.random.default_rng(0).random(shape).astype(np.float32)
    whole = predict_tiled(net, img, tile=512, overlap=16)
    tiled = predict_tiled(net, img, tile=64, overlap=16, batch_size=3)
    assert tiled.shape == (3, *shape)
    np.testing.assert_allclose(tiled, whole, atol=1e-5)
    np.testing.assert_allclose(tiled.sum(0), 1.0, atol=1e-5)
    flipped = predict_tiled(net, img, tile=64, overlap=16, flips=True)
    np.testing.assert_allclose(flipped, whole, atol=1e-5)
    # without a mirrored margin too: tiles that end at the image's border, corners included
    np.testing.assert_allclose(predict_tiled(net, img, tile=64, overlap=16, batch_size=3, pad=0), whole, atol=1e-5)
    assert taper_window(64, 16).min() > 0
    win = taper_window((40, 96), 16)
    assert win.shape == (40, 96) and win.min() > 0
    np.testing.assert_allclose(win, win[::-1, ::-1])  # ramps on all four sides


class _Sizes(torch.nn.Module):
    """A pixel-wise network that records the size of every input it sees."""

    multiple = 32

    def __init__(self):
        super().__init__()
        self.seen = []
        self.conv = torch.nn.Conv2d(1, 3, 1)

    def forward(self, x):
        self.seen.append(tuple(x.shape[-2:]))
        return self.conv(x)


def test_mirror_margin_is_the_pad_given_and_results_stay_the_images_size():
    img = np.random.default_rng(1).random((70, 100)).astype(np.float32)
    net = _Sizes().eval()
    assert predict_tiled(net, img, tile=512, overlap=64).shape == (3, 70, 100)
    assert net.seen[-1] == (160, 192)  # 32 px each side (overlap // 2), then up to a multiple of 32
    out = predict_tiled(net, img, tile=512, overlap=64, pad=0)
    assert net.seen[-1] == (96, 128)  # only up to the stride: 30 % less work
    assert out.shape == (3, 70, 100)
    # a pixel-wise network gives the same result whatever the margin
    np.testing.assert_allclose(out, predict_tiled(net, img, tile=512, overlap=64), atol=1e-6)


def test_model_folder_pad_reaches_tiled_inference(tmp_path):
    from emparticles.models.cnn import CNNSegmenter, save_model_folder
    from emparticles.models.networks import build_network

    net = build_network("strided-unet", 3)
    config = {"name": "t", "arch": "strided-unet", "classes": 3, "tile": 512, "overlap": 64, "pad": 0}
    save_model_folder(net, tmp_path / "m", config)
    seg = CNNSegmenter(tmp_path / "m", device="cpu", onnx=False)
    seen = []
    inner = seg.net
    seg.net = lambda x: (seen.append(tuple(x.shape[-2:])), inner(x))[1]
    seg.net.multiple = 32  # type: ignore[attr-defined]
    seg.predict(np.random.default_rng(0).random((70, 100)).astype(np.float32))
    assert seen == [(96, 128)]


@pytest.mark.parametrize("length", [64, 100, 1024, 1056, 1088, 2048, 2080, 5000, 20032])
def test_tile_layout_covers_with_overlap_and_fewest_tiles(length):
    tile, overlap = 1024, 64
    size, starts = tile_layout(length, tile, overlap, 32 if length % 32 == 0 else 1)
    assert size <= tile and starts[0] == 0 and starts[-1] + size == length
    assert all(b - a <= size - overlap for a, b in zip(starts, starts[1:]))  # overlap kept
    fewest = 1 if length <= tile else -(-(length - overlap) // (tile - overlap))
    assert len(starts) == fewest
    assert size * len(starts) < length + len(starts) * (overlap + 32)  # no tile much larger than needed


def test_border_aware_instances_split_touching_particles():
    h, w = 40, 60
    particle = np.zeros((h, w), np.float32)
    border = np.zeros((h, w), np.float32)
    particle[10:30, 10:50] = 1.0
    border[10:30, 29:31] = 1.0  # predicted seam
    particle[10:30, 29:31] = 0.0
    bg = 1 - particle - border
    inst = instances_from_borders(ProbabilityMap(np.stack([bg, particle, border]), THREE_CLASS, "t"))
    assert inst.count == 2
    assert (inst.labels[10:30, 10:50] > 0).all()  # the seam is given back to the particles
    assert inst.labels[20, 15] != inst.labels[20, 45]


def test_border_aware_instances_fill_holes_of_one_particle_only():
    particle = np.zeros((40, 60), np.float32)
    border = np.zeros((40, 60), np.float32)
    particle[5:25, 5:25] = 1.0  # two particles side by side...
    border[5:25, 14:16] = 1.0  # ...split by a predicted seam
    particle[5:25, 14:16] = 0.0
    particle[12:18, 12:18] = border[12:18, 12:18] = 0.0  # a gap between them: stays background
    particle[10:30, 35:55] = 1.0
    particle[18:22, 43:47] = 0.0  # a hole inside one particle: filled
    bg = 1 - particle - border
    inst = instances_from_borders(ProbabilityMap(np.stack([bg, particle, border]), THREE_CLASS, "t"))
    assert inst.count == 3
    assert (inst.labels[12:18, 12:18] == 0).all()
    assert (inst.labels[10:30, 35:55] == inst.labels[20, 45]).all() and inst.labels[20, 45] > 0
    prob = ProbabilityMap(np.stack([bg, particle, border]), THREE_CLASS, "t")
    whole = instances_with(prob, {"fill_holes": "foreground"})  # the gap goes to the particles
    assert whole.count == 3 and (whole.labels[12:18, 12:18] > 0).all()
    with pytest.raises(ValueError, match="hole filling"):
        instances_from_borders(prob, fill="all")


def test_instance_filters_drop_weak_and_tiny_pieces():
    h, w = 60, 80
    particle = np.zeros((h, w), np.float32)
    particle[5:25, 5:25] = 0.95  # 400 px
    particle[30:50, 40:60] = 0.9  # 400 px
    particle[5:9, 60:64] = 0.95  # 16 px fragment: 4% of the median area
    particle[40:50, 5:15] = 0.55  # 100 px, weak (score 0.55)
    prob = ProbabilityMap(np.stack([1 - particle, particle, np.zeros_like(particle)]), THREE_CLASS, "t")
    assert instances_from_borders(prob).count == 4
    by_score = instances_from_borders(prob, min_score=0.6)
    assert by_score.count == 3 and by_score.scores.min() >= 0.9
    by_area = instances_from_borders(prob, min_relative_area=0.1)
    assert sorted(np.bincount(by_area.labels.ravel())[1:].tolist()) == [100, 400, 400]
    both = instances_with(prob, {"min_score": 0.6, "min_relative_area": 0.1})
    assert both.count == 2 and both.scores.tolist() == pytest.approx([0.95, 0.9])


def test_trim_outlines_cuts_to_the_threshold_and_keeps_the_largest_piece():
    labels = np.zeros((30, 40), np.int32)
    labels[2:12, 2:12] = 1  # 100 px particle, score 0.9
    labels[15:25, 5:35] = 2  # 300 px particle, score 0.8
    labels[27:29, 37:39] = 3  # 4 px particle, score 0.6
    foreground = np.zeros((30, 40), np.float32)
    foreground[3:11, 3:11] = 0.9  # particle 1 shrinks by one pixel all round: 64 px
    foreground[15:25, 5:20] = 0.9  # particle 2 cut in two pieces: 150 px kept, 1 column...
    foreground[15:25, 21:35] = 0.9  # ...and 140 px, dropped
    foreground[27:29, 37:39] = 0.5  # particle 3 below the threshold: vanishes
    trimmed = trim_outlines(Instances(labels, np.array([0.9, 0.8, 0.6], np.float32)), foreground, 0.7)
    assert trimmed.count == 2
    assert trimmed.scores.tolist() == pytest.approx([0.9, 0.8])
    assert (trimmed.labels == 1).sum() == 64 and (trimmed.labels[3:11, 3:11] == 1).all()
    assert (trimmed.labels == 2).sum() == 150 and (trimmed.labels[15:25, 5:20] == 2).all()
    untouched = trim_outlines(Instances(labels, np.array([0.9, 0.8, 0.6], np.float32)), np.ones((30, 40)), 0.7)
    np.testing.assert_array_equal(untouched.labels, labels)
    dip = np.ones((30, 40), np.float32)
    dip[5:8, 5:8] = 0.3  # a dip inside particle 1 opens no hole in it
    dip[27:29, 37:39] = 0.3  # particle 3 vanishes
    solid = trim_outlines(Instances(labels, np.array([0.9, 0.8, 0.6], np.float32)), dip, 0.7)
    assert solid.count == 2 and (solid.labels[2:12, 2:12] == 1).all() and (solid.labels == 1).sum() == 100


def test_cnn_segmenter_from_a_folder(tmp_path):
    torch.manual_seed(0)
    folder = save_model_folder(build_network("compact-unet").eval(), tmp_path / "m", {"arch": "compact-unet", "classes": 3, "name": "tiny"})
    seg = load_model(str(folder), "cpu")
    assert isinstance(seg, CNNSegmenter) and seg.model_id == "tiny"
    img, _ = disks_image(GRID_CENTRES, shape=(128, 176))
    inst, prob = seg.segment(img)
    assert prob.probabilities.shape == (3, 128, 176) and inst.labels.shape == (128, 176)
    inst, prob = seg.segment(img, particle_size_px=120.0)  # resampled by 0.5 and back
    assert prob.probabilities.shape == (3, 128, 176) and inst.labels.shape == (128, 176)
    assert inst.count == int(inst.labels.max()) == len(inst.scores)


def test_input_scale_enlarges_before_the_network_and_a_size_hint_allows_for_it(tmp_path, monkeypatch):
    from emparticles.models import cnn

    torch.manual_seed(0)
    folder = save_model_folder(build_network("compact-unet").eval(), tmp_path / "m",
                               {"arch": "compact-unet", "classes": 3, "name": "x2", "input_scale": 2.0})
    seg = load_model(str(folder), "cpu")
    seen = []
    real = cnn.predict_tiled
    monkeypatch.setattr(cnn, "predict_tiled", lambda net, img, **kw: seen.append(img.shape) or real(net, img, **kw))
    img, _ = disks_image(GRID_CENTRES, shape=(128, 176))
    inst, prob = seg.segment(img)
    assert seen == [(256, 352)]  # twice the size at the network ...
    assert inst.labels.shape == (128, 176) and prob.probabilities.shape == (3, 128, 176)  # ... and back
    # a typical diameter of 30 px must reach the network at TARGET_ECD_PX (60 px): x2 in all, so
    # nothing more than the folder's own x2
    assert seg.hinted_scale(128 * 176, 30.0) == pytest.approx(1.0)
    assert seg.hinted_scale(128 * 176, 120.0) == pytest.approx(0.25)
    seen.clear()
    seg.segment(img, particle_size_px=30.0)
    assert seen == [(256, 352)]


def test_selecting_model_keeps_the_most_confident_member(tmp_path):
    from emparticles.errors import InputError
    from emparticles.models.select import SelectingSegmenter
    from emparticles.preprocess import normalise

    torch.manual_seed(0)
    for name in ("a", "b"):
        save_model_folder(build_network("compact-unet").eval(), tmp_path / name, {"arch": "compact-unet", "classes": 3, "name": name})
    (tmp_path / "sel").mkdir()
    (tmp_path / "sel" / "config.json").write_text(json.dumps({"kind": "select", "name": "sel", "members": ["../a", "../b"]}))
    seg = load_model(str(tmp_path / "sel"), "cpu")
    assert isinstance(seg, SelectingSegmenter) and [m.model_id for m in seg.members] == ["a", "b"]
    img, _ = disks_image(GRID_CENTRES, shape=(128, 176))
    norm = normalise(img)
    own = {m.model_id: m.segment_normalised(norm)[0] for m in seg.members}
    inst, prob = seg.segment(img)
    score = {k: float(v.scores.mean()) if v.count else 0.0 for k, v in own.items()}
    winner = max(score, key=score.get)
    assert seg.last_choice == winner and np.array_equal(inst.labels, own[winner].labels)
    assert prob.probabilities.shape == (3, 128, 176)
    (tmp_path / "sel" / "config.json").write_text(json.dumps({"kind": "select", "members": ["../a"]}))
    with pytest.raises(InputError, match="two or more"):
        load_model(str(tmp_path / "sel"), "cpu")


class _ScoredAtScale(CNNSegmenter):
    """A segmenter whose particles score best at one scale (no network): one square particle
    whose score falls with the distance (in octaves) of the scale from ``peak``. Its probability
    maps carry their scale's score, so that scale 1 can be scored on a window of the whole
    image's map."""

    def __init__(self, peak: float, search: dict):
        self.config, self.peak, self.calls = {"scale_search": search}, peak, []
        self.thresholds = {}

    def probabilities_at(self, img, scale):
        from emparticles.models.cnn import _scaled_shape
        from emparticles.types import THREE_CLASS, ProbabilityMap

        self.calls.append((scale, img.shape))
        score = 1.0 - 0.1 * abs(np.log2(scale / self.peak))
        return ProbabilityMap(np.full((3, *_scaled_shape(img.shape, scale)), score, np.float32), THREE_CLASS, "x")

    def instances(self, prob):
        from emparticles.instances import Instances

        lab = np.zeros(prob.probabilities.shape[1:], np.int32)
        lab[2:6, 2:6] = 1
        return Instances(lab, np.array([prob.probabilities[0].max()], np.float32))


@pytest.mark.parametrize("peak, chosen, tried", [
    (2.0, 2.0, [0.7, 1.0, 1.4, 2.0]),  # climbs up while the score improves
    (1.4, 1.4, [0.7, 1.0, 1.4, 2.0]),  # stops after the first scale that scores worse
    (1.0, 1.0, [0.7, 1.0, 1.4]),
    (0.35, 0.5, [0.7, 1.0, 0.5]),  # climbs down when the smaller start scale wins
])
def test_scale_search_climbs_towards_the_best_score(peak, chosen, tried):
    seg = _ScoredAtScale(peak, {"start": [0.7, 1.0], "up": [1.4, 2.0], "down": [0.5], "max_pixels": 10_000})
    best, results = seg.choose_scale(np.zeros((40, 60), np.float32))
    assert best == chosen and [c[0] for c in seg.calls] == tried and set(results) == set(tried)
    # segment() reuses the chosen result and returns labels at the input's size
    seg.calls.clear()
    inst, prob = seg.segment(np.random.default_rng(0).random((40, 60)))
    assert inst.labels.shape == (40, 60) and prob.probabilities.shape == (3, 40, 60)
    assert [c[0] for c in seg.calls] == tried


class _TableScored(_ScoredAtScale):
    """Scores from a table: {scale: mean particle score}."""

    def __init__(self, table: dict, search: dict):
        self.config, self.table, self.calls = {"scale_search": search}, table, []
        self.peak, self.thresholds = 1.0, {}

    def at_scale(self, img, scale):
        inst, prob = super().at_scale(img, scale)
        return type(inst)(inst.labels, np.array([self.table[scale]], np.float32)), prob


@pytest.mark.parametrize("tie, chosen", [(0.0, 0.7), (0.005, 2.0)])
def test_scale_search_climbs_both_ways_from_a_near_tie(tie, chosen):
    # 0.7 beats 1 by 0.0003 only; the best scale is 2 (many small particles seen large enough)
    table = {0.5: 0.81, 0.7: 0.8323, 1.0: 0.8320, 1.4: 0.88, 2.0: 0.93}
    search = {"start": [0.7, 1.0], "up": [1.4, 2.0], "down": [0.5], "tie": tie, "max_pixels": 10_000}
    seg = _TableScored(table, search)
    best, results = seg.choose_scale(np.zeros((40, 60), np.float32))
    assert best == chosen
    # a clear winner at the start still climbs one way only
    seg = _TableScored({**table, 1.0: 0.80}, search)
    assert seg.choose_scale(np.zeros((40, 60), np.float32))[0] == 0.7 and [c[0] for c in seg.calls] == [0.7, 1.0, 0.5]


class _CountedAtScale(_ScoredAtScale):
    """Particles from a table: {scale: list of their scores} (none: an empty list)."""

    def __init__(self, table: dict, search: dict):
        super().__init__(1.0, search)
        self.table = table

    def at_scale(self, img, scale):
        inst, prob = super().at_scale(img, scale)
        scores = np.array(self.table[scale], np.float32)
        lab = np.zeros_like(inst.labels)
        lab.flat[:2 * len(scores):2] = np.arange(1, len(scores) + 1)
        return type(inst)(lab, scores), prob


def test_scale_search_leaves_the_image_as_it_is_when_nothing_is_found():
    search = {"start": [0.7, 1.0], "up": [1.4], "down": [0.5], "tie": 0.005, "max_pixels": 10_000}
    seg = _CountedAtScale({0.5: [], 0.7: [], 1.0: [], 1.4: []}, search)
    assert seg.choose_scale(np.zeros((40, 60), np.float32))[0] == 1.0
    seg = _CountedAtScale({0.5: [], 0.7: [], 1.0: [], 1.4: []}, {**search, "start": [1.0, 0.7]})
    assert seg.choose_scale(np.zeros((40, 60), np.float32))[0] == 1.0


@pytest.mark.parametrize("penalty, table, chosen", [
    # JEOL silica frames with v6 (mean scores as measured). B04-1: F1 0.932 at 0.5, 0.955 at 0.7,
    # 0.920 at 1; without the penalty the search climbed down to 0.5
    (0.0, {0.5: [0.9615], 0.7: [0.9597], 1.0: [0.9483], 1.4: [0.9489]}, 0.5),
    (0.02, {0.5: [0.9615], 0.7: [0.9597], 1.0: [0.9483], 1.4: [0.9489]}, 0.7),
    # B09-1: F1 0.909 at 0.5, 0.927 at 1
    (0.0, {0.5: [0.9749], 0.7: [0.9721], 1.0: [0.9692], 1.4: [0.9682]}, 0.5),
    (0.02, {0.5: [0.9749], 0.7: [0.9721], 1.0: [0.9692], 1.4: [0.9682]}, 1.0),
    # an EMPS figure of one large particle that scale 1 breaks into four weak fragments still shrinks
    (0.02, {0.5: [0.995], 0.7: [0.995], 1.0: [0.93, 0.9, 0.87, 0.86], 1.4: [0.85] * 7}, 0.7),
    # enlarging is not penalised: a slightly better score at 1.4 still wins
    (0.02, {0.5: [0.90], 0.7: [0.94], 1.0: [0.950], 1.4: [0.952]}, 1.4),
])
def test_scale_search_penalises_resampling(penalty, table, chosen):
    search = {"start": [0.7, 1.0], "up": [1.4], "down": [0.5], "tie": 0.005, "max_pixels": 10_000,
              "shrink_penalty": penalty}
    seg = _CountedAtScale(table, search)
    assert seg.choose_scale(np.zeros((40, 60), np.float32))[0] == chosen


class _SizedAtScale(_ScoredAtScale):
    """One square particle of side 10 px at scale 1, scaled with the image (ECD 11.3 px x scale)."""

    def at_scale(self, img, scale):
        inst, prob = super().at_scale(img, scale)
        lab = np.zeros_like(inst.labels)
        side = round(10 * scale)
        lab[1:1 + side, 1:1 + side] = 1
        return type(inst)(lab, inst.scores), prob


@pytest.mark.parametrize("cap, chosen, tried", [
    (None, 2.0, [0.7, 1.0, 1.4, 2.0]),
    (30.0, 2.0, [0.7, 1.0, 1.4, 2.0]),  # 2x: ECD 22.6 px, under the cap
    (20.0, 1.4, [0.7, 1.0, 1.4]),  # 2x would make it 22.6 px: not tried although it scores best
    (12.0, 1.0, [0.7, 1.0]),  # already 11.3 px at 1: 1.4 would give 15.8
])
def test_scale_search_does_not_enlarge_particles_beyond_the_cap(cap, chosen, tried):
    search = {"start": [0.7, 1.0], "up": [1.4, 2.0], "down": [0.5], "max_pixels": 10_000, "max_enlarged_ecd_px": cap}
    seg = _SizedAtScale(2.0, search)
    best, _ = seg.choose_scale(np.zeros((40, 60), np.float32))
    assert best == chosen and [c[0] for c in seg.calls] == tried


class _LoggedPasses(_ScoredAtScale):
    """:class:`_ScoredAtScale` that logs its network passes and instance separations in order."""

    def __init__(self, peak: float, search: dict, log: list):
        super().__init__(peak, search)
        self.log = log

    def probabilities_at(self, img, scale):
        self.log.append(("network", img.shape))
        return super().probabilities_at(img, scale)

    def instances(self, prob):
        self.log.append(("instances", prob.probabilities.shape[1:]))
        return super().instances(prob)


@pytest.mark.parametrize("peak, max_pixels, size_hint, after", [
    # searched on a crop, scale 1 kept: the whole image's separation comes after it
    (1.0, 1_000, None, [("instances", (40, 60))]),
    # ... the crop chose 0.5: one more whole pass at 0.5, then its separation
    (0.5, 1_000, None, [("instances", (20, 30))]),
    # searched on the whole image: called first (passes and separations take turns)
    (1.0, 10_000, None, None),
    # a size hint of 20 px: one pass at 3x (60 px particles), then its separation
    (1.0, 1_000, 20.0, [("instances", (120, 180))]),
])
def test_network_done_is_called_once_where_the_rest_runs_on_one_thread(peak, max_pixels, size_hint, after):
    log: list = []
    seg = _LoggedPasses(peak, {"start": [0.7, 1.0], "down": [0.5], "max_pixels": max_pixels}, log)
    inst, _ = seg.segment(np.random.default_rng(0).random((40, 60)), size_hint,
                          network_done=lambda: log.append(("done", None)))
    assert inst.labels.shape == (40, 60)
    kinds = [k for k, _ in log]
    assert kinds.count("done") == 1 and "network" in kinds
    if after is None:
        assert kinds[0] == "done"
    else:
        assert log[kinds.index("done") + 1:] == after


def test_network_done_is_called_when_the_network_fails():
    class Failing(_ScoredAtScale):
        def probabilities_at(self, img, scale):
            raise RuntimeError("out of memory")

    called = []
    with pytest.raises(RuntimeError):
        Failing(1.0, {"start": [1.0], "max_pixels": 1_000}).segment(np.zeros((40, 60)), network_done=lambda: called.append(1))
    assert called == [1]


def test_median_ecd_of_a_label_image():
    from emparticles.models.cnn import median_ecd_px

    lab = np.zeros((30, 30), np.int32)
    lab[0:4, 0:4], lab[10:20, 10:20], lab[25:30, 0:2] = 1, 2, 3  # areas 16, 100, 10
    assert median_ecd_px(lab) == pytest.approx(np.sqrt(4 * 16 / np.pi))
    assert median_ecd_px(np.zeros((5, 5), np.int32)) == 0.0


def test_scale_search_on_a_crop_of_a_large_image():
    seg = _ScoredAtScale(2.0, {"start": [1.0], "up": [2.0], "max_pixels": 2_000})
    inst, _ = seg.segment(np.random.default_rng(0).random((100, 300)))
    # the whole image at scale 1 first, the search on the crop, then the whole image at its choice
    assert [c[0] for c in seg.calls] == [1.0, 2.0, 2.0]
    h, w = seg.calls[1][1]
    assert h * w <= 2_000 and abs(w / h - 3) < 0.2
    assert seg.calls[0][1] == seg.calls[-1][1] == (100, 300)
    assert inst.labels.shape == (100, 300)


def test_scale_search_of_a_large_image_keeping_scale_1_passes_the_whole_image_once():
    seg = _ScoredAtScale(1.0, {"start": [0.7, 1.0], "up": [1.4], "down": [0.5], "max_pixels": 2_000})
    inst, prob = seg.segment(np.random.default_rng(0).random((100, 300)))
    # scale 1 scored on the crop of the whole image's map: no pass of its own on the crop
    assert [c[0] for c in seg.calls] == [1.0, 0.7, 1.4]
    assert [c[1] for c in seg.calls].count((100, 300)) == 1
    assert inst.labels.shape == (100, 300) and prob.probabilities.shape == (3, 100, 300)


@pytest.mark.parametrize("peak", [1.0, 2.0])
def test_a_large_image_segments_alike_on_one_thread_and_beside_the_search(peak):
    """Two threads: the whole image's instances are separated beside the search on its crop."""
    img = np.random.default_rng(0).random((100, 300))
    search = {"start": [0.7, 1.0], "up": [1.4, 2.0], "down": [0.5], "max_pixels": 2_000}
    done = {}
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            seg = _ScoredAtScale(peak, search)
            inst, prob = seg.segment(img)
            done[n] = (seg.calls, inst.labels, inst.scores, prob.probabilities)
    finally:
        torch.set_num_threads(threads)
    assert done[1][0] == done[2][0] and done[1][0][0] == (1.0, (100, 300))
    for a, b in zip(done[1][1:], done[2][1:]):
        np.testing.assert_array_equal(a, b)


def test_instances_back_to_the_input_size():
    from emparticles.instances import Instances
    from emparticles.models.cnn import _instances_to_shape

    small = np.zeros((6, 8), np.int32)
    small[1:3, 1:3], small[3:6, 4:6], small[5, 7] = 1, 2, 3  # numbered in raster order
    up = _instances_to_shape(Instances(small, np.array([0.9, 0.8, 0.7], np.float32)), (12, 16))
    np.testing.assert_array_equal(up.labels, np.kron(small, np.ones((2, 2), np.int32)))
    assert up.scores.tolist() == pytest.approx([0.9, 0.8, 0.7])
    big = np.kron(small, np.ones((2, 2), np.int32))
    big[10:12, 14:16] = 0
    big[11, 15] = 3  # particle 3 now one pixel of the large image: lost when halved
    down = _instances_to_shape(Instances(big, np.array([0.9, 0.8, 0.7], np.float32)), (6, 8))
    assert down.count == 2 and down.scores.tolist() == pytest.approx([0.9, 0.8])
    assert (down.labels == 2).sum() == 6 and (down.labels == 1).sum() == 4


def test_evaluate_perfect_and_ranked():
    _, truth = disks_image(GRID_CENTRES, shape=(128, 176))
    m = evaluate_dataset([truth], [truth])
    for key in ("f1_iou50", "panoptic_quality_iou50", "f1_iou50_95", "foreground_iou", "foreground_dice",
                "pixel_accuracy", "matched_dice", "coco_ap", "coco_ap50", "coco_ap75", "voc_ap50_11pt", "count_ratio"):
        assert m[key] == pytest.approx(1.0), key
    assert m["d50_rel_error"] == 0 and m["ks_statistic"] == 0
    pred = truth.copy()
    pred[pred == 4] = 0  # one missed particle
    assert voc_ap50([truth], [pred], [np.ones(12)]) < 1.0
    assert evaluate_dataset([truth], [pred])["recall_iou50"] == pytest.approx(11 / 12)


def test_evaluate_command(tmp_path):
    _, truth = disks_image(GRID_CENTRES, shape=(128, 176))
    for d in ("gt", "pred"):
        (tmp_path / d).mkdir()
        Image.fromarray(truth.astype(np.uint16)).save(tmp_path / d / "a.png")
    r = CliRunner().invoke(app, ["evaluate", "--gt", str(tmp_path / "gt"), "--pred", str(tmp_path / "pred"),
                                 "--json", str(tmp_path / "m.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "m.json").read_text())["f1_iou50"] == 1.0


def test_training_runs_resumes_and_tunes(tmp_path):
    from emparticles.train.loop import TrainConfig, train

    write_disk_set(tmp_path, count=8, disks=4, radius=8, margin=10)
    cfg = TrainConfig(epochs=2, steps_per_epoch=2, batch_size=2, crop=64, tile=128, overlap=16, val_fraction=0.3, device="cpu")
    best = train(tmp_path / "img", tmp_path / "mask", tmp_path / "run", cfg, log=lambda m: None)
    assert (best / "weights.safetensors").exists() and (best / "thresholds.json").exists()
    assert len((tmp_path / "run" / "metrics.csv").read_text().strip().splitlines()) == 3
    cfg.epochs = 3
    train(tmp_path / "img", tmp_path / "mask", tmp_path / "run", cfg, resume=True, log=lambda m: None)
    assert len((tmp_path / "run" / "metrics.csv").read_text().strip().splitlines()) == 4
    config = json.loads((best / "config.json").read_text())
    assert config["arch"] == "strided-unet" and "validation_tuned" in config
    assert config["scale_search"]["start"] == [0.7, 1.0]  # the model chooses its resampling
    assert set(config["validation_tuned"]) >= {"f1", "precision", "recall", "count_ratio", "foreground_iou"}


def test_training_with_batch_workers_stops_on_time_and_resumes(tmp_path):
    from emparticles.train.loop import TrainConfig, train

    write_disk_set(tmp_path, count=8, disks=4, radius=8, margin=10)
    cfg = TrainConfig(epochs=2, steps_per_epoch=3, batch_size=2, crop=64, tile=128, overlap=16, val_fraction=0.3,
                      device="cpu", workers=2)
    run, logs = tmp_path / "run", []
    # a budget of 0 s: stops after the first epoch, checkpoint saved, nothing tuned
    best = train(tmp_path / "img", tmp_path / "mask", run, cfg, log=logs.append, tune=False, stop_after_s=0.0)
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 2 and any("stopped after epoch 1" in m for m in logs)
    assert "batch_wait_s" in rows[0].split(",") and any("waiting for batches" in m for m in logs)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 0
    assert (best / "weights.safetensors").exists()
    assert "validation_tuned" not in json.loads((best / "config.json").read_text())
    train(tmp_path / "img", tmp_path / "mask", run, cfg, resume=True, log=lambda m: None)
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 3
    assert "validation_tuned" in json.loads((best / "config.json").read_text())


def test_batch_workers_split_an_epoch_and_draw_different_crops():
    from emparticles.train.data import augmenter
    from emparticles.train.loop import TrainConfig, batches

    rng = np.random.default_rng(0)
    data = [(rng.random((80, 80)).astype(np.float32), (rng.random((80, 80)) > 0.5).astype(np.int32))
            for _ in range(4)]
    cfg = TrainConfig(steps_per_epoch=5, batch_size=3, crop=32, workers=2)
    got = list(batches(rng, augmenter(32, (1.0, 1.0)), cfg, data, [], None, torch.device("cpu"), epoch=0))
    assert len(got) == 5
    assert all(x.shape == (3, 1, 32, 32) and y.shape == (3, 32, 32) and y.dtype == torch.int64 for x, y in got)
    assert len({x.sum().item() for x, _ in got}) == 5  # the workers' random streams differ
    # a worker sends its targets as uint8 (an eighth of int64's bytes); batches() widens them
    from emparticles.train.loop import training_batch

    aug = augmenter(32, (1.0, 1.0))
    aug.set_random_seed(3)
    _, y8 = training_batch(np.random.default_rng(4), aug, cfg, data, [], None, torch.device("cpu"))
    aug.set_random_seed(3)
    cfg.workers = 0
    _, y64 = next(batches(np.random.default_rng(4), aug, cfg, data, [], None, torch.device("cpu"), epoch=0))
    assert y8.dtype == torch.uint8 and y64.dtype == torch.int64 and torch.equal(y8.long(), y64)
    assert set(torch.unique(y64).tolist()) <= {0, 1, 2}


def test_persistent_batch_workers_give_each_epoch_the_batches_of_fresh_workers():
    """Workers kept for a whole run give epoch k the same batches (same per-worker random
    streams) as workers started for epoch k alone, and refuse epochs out of order."""
    from emparticles.train.data import BatchWorkers, epoch_batches

    draw = np.random.Generator.random  # a batch is one number drawn from the worker's stream
    fresh = [[float(b) for b in epoch_batches(draw, 5, None, 7, epoch, 2)] for epoch in (1, 2, 3)]
    pool = BatchWorkers(draw, 5, 7, 1, 2)
    kept = [[float(b) for b in pool.epoch(epoch)] for epoch in (1, 2, 3)]
    assert kept == fresh and len({tuple(e) for e in kept}) == 3
    with pytest.raises(ValueError, match="epoch 2"):
        pool.epoch(2)
    with pytest.raises(ValueError, match="at least one worker"):
        BatchWorkers(draw, 5, 7, 0, 0)


def test_augmenter_crops_as_padding_then_cropping_did():
    """The crop pads small images itself (reflecting, centred): the same crops, from the same
    random draws, as a separate PadIfNeeded before it, which copied every scaled image."""
    import albumentations as A
    import cv2

    from emparticles.train.data import augmenter

    rng = np.random.default_rng(0)
    images = [(rng.random(shape).astype(np.float32), rng.integers(0, 50, shape).astype(np.int32))
              for shape in [(768, 1024), (150, 200), (64, 90), (400, 400)]]
    ours, other = augmenter(96, (0.6, 1.8)), augmenter(96, (0.6, 1.8))  # no transform shared
    before = A.Compose([other.transforms[0], A.PadIfNeeded(96, 96, border_mode=cv2.BORDER_REFLECT_101),
                        A.RandomCrop(96, 96), *other.transforms[2:]])
    ours.set_random_seed(11)
    before.set_random_seed(11)
    for k in range(24):
        img, lab = images[k % 4]
        a, b = ours(image=img, mask=lab), before(image=img, mask=lab)
        assert a["image"].shape == (96, 96)
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])


@pytest.mark.parametrize("focus, least, most", [(0.0, 0.0, 0.25), (0.5, 0.4, 0.75), (1.0, 1.0, 1.0)])
def test_augmenter_focuses_a_share_of_crops_on_annotated_pixels(focus, least, most):
    """On a sparse frame (two particles, 0.02% of the field) random crops seldom hold a particle;
    focused ones always do, also on images smaller than the crop."""
    from emparticles.train.data import augmenter

    img = np.random.default_rng(0).random((960, 1280)).astype(np.float32)
    lab = np.zeros((960, 1280), np.int32)
    lab[100:110, 1000:1012], lab[800:815, 50:60] = 1, 2
    aug = augmenter(160, (1.0, 1.0), focus)
    aug.set_random_seed(3)
    held = np.mean([(aug(image=img, mask=lab)["mask"] > 0).any() for _ in range(100)])
    assert least <= held <= most
    small, small_lab = img[:100, :150], lab[:100, :150].copy()
    small_lab[10:20, 10:20] = 3
    out = augmenter(160, (0.6, 1.0), 1.0)(image=small, mask=small_lab)
    assert out["image"].shape == (160, 160) and (out["mask"] == 3).any()


def test_timed_batches_add_up_the_waits():
    import time

    from emparticles.train.data import TimedBatches

    def slow():
        for k in range(3):
            time.sleep(0.05)
            yield k

    timed = TimedBatches(slow())
    assert list(timed) == [0, 1, 2]
    assert 0.15 <= timed.wait_s < 1.0


def test_metrics_rows_stay_under_the_header_of_a_resumed_file(tmp_path):
    import csv

    from emparticles.train.loop import append_metrics

    path = tmp_path / "metrics.csv"
    path.write_text("epoch,loss,val_f1\r\n1,0.5,0.7\r\n")  # written before a column was added
    append_metrics(path, {"epoch": 2, "loss": 0.4, "batch_wait_s": 3.0, "val_f1": 0.8})
    rows = list(csv.DictReader(path.open(newline="")))
    assert rows == [{"epoch": "1", "loss": "0.5", "val_f1": "0.7"}, {"epoch": "2", "loss": "0.4", "val_f1": "0.8"}]
    fresh = tmp_path / "new.csv"
    append_metrics(fresh, {"epoch": 1, "batch_wait_s": 2.5})
    assert fresh.read_text().splitlines() == ["epoch,batch_wait_s", "1,2.5"]


def test_paste_source_travels_to_workers_as_shared_memory_and_samples_the_same():
    import io
    import pickle
    from multiprocessing.reduction import ForkingPickler

    from emparticles.train.data import PasteSource

    images = [disks_image([(30, 30), (30, 52), (80, 60)], radius=10, shape=(120, 120), seed=k) for k in range(3)]
    source = PasteSource([(img / 255.0, lab) for img, lab in images])
    copy = pickle.loads(pickle.dumps(source))
    assert [len(g) for g in copy.pieces] == [len(g) for g in source.pieces]
    a, b = source.sample(np.random.default_rng(5), 160), copy.sample(np.random.default_rng(5), 160)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[1].max() >= 2
    buf = io.BytesIO()
    ForkingPickler(buf, -1).dump(source)
    pixels = sum(x.image.nbytes + x.labels.nbytes for g in source.pieces for x in g)
    assert buf.tell() < 5_000 < pixels


def test_shared_pairs_give_the_same_arrays_and_batches_and_pickle_as_handles():
    """Training images in shared memory: the same pixels and labels as the arrays they came from,
    the same augmented batches from the same random draws, read-only, and a spawned worker
    receives handles (a few kB) instead of the pixels."""
    import io
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing

    from emparticles.train.data import SharedPairs, augmenter
    from emparticles.train.loop import TrainConfig, batches

    rng = np.random.default_rng(0)
    plain = [(rng.random(shape).astype(np.float32), rng.integers(0, 9, shape).astype(np.int32))
             for shape in [(80, 96), (120, 64), (64, 64)]]
    shared = SharedPairs(plain)
    assert len(shared) == 3 and shared[-1][0].shape == (64, 64)
    for (img, lab), (simg, slab) in zip(plain, shared):
        assert np.array_equal(img, simg) and np.array_equal(lab, slab)
        assert simg.dtype == np.float32 and slab.dtype == np.int32 and not simg.flags.writeable
    with pytest.raises(IndexError):
        shared[3]
    buf = io.BytesIO()
    ForkingPickler(buf, -1).dump(shared)
    assert buf.tell() < 10_000 < sum(i.nbytes + m.nbytes for i, m in plain)
    cfg = TrainConfig(steps_per_epoch=3, batch_size=2, crop=32)
    got = []
    for data in (plain, shared):
        aug = augmenter(32, (0.8, 1.2))
        aug.set_random_seed(7)  # albumentations draws from its own generator
        got.append(list(batches(np.random.default_rng(1), aug, cfg, data, [], None, torch.device("cpu"), epoch=0)))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(*got))
    with pytest.raises(ValueError, match="same shape"):
        SharedPairs([(np.zeros((4, 4), np.float32), np.zeros((4, 5), np.int32))])


def test_weight_average_is_the_mean_of_the_added_weights():
    from emparticles.train.loop import WeightAverage

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    avg, seen = WeightAverage(), []
    for value in (1.0, 2.0, 6.0):
        with torch.no_grad():
            for p in net.parameters():
                p.fill_(value)
        net[1].num_batches_tracked.fill_(int(value))
        seen.append(value)
        avg.add(net)
    assert avg.count == 3
    assert torch.allclose(avg.state["0.weight"], torch.full_like(net[0].weight, 3.0))
    assert int(avg.state["1.num_batches_tracked"]) == 6  # integer counters keep the latest value
    # the average is a copy: later training does not move it
    with torch.no_grad():
        net[0].weight.fill_(100.0)
    assert float(avg.state["0.weight"].max()) == 3.0


def test_training_with_weight_averaging_survives_interruption(tmp_path):
    from emparticles.train.loop import TrainConfig, train

    write_disk_set(tmp_path, count=8, disks=4, radius=8, margin=10)
    cfg = TrainConfig(epochs=2, steps_per_epoch=2, batch_size=2, crop=64, tile=128, overlap=16, val_fraction=0.3,
                      device="cpu", average_epochs=2)
    run = tmp_path / "run"
    # 'interrupted' after epoch 1 of 3: the running average travels in the checkpoint
    train(tmp_path / "img", tmp_path / "mask", run, cfg, log=lambda m: None)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["average_count"] == 2 and not (run / "checkpoint.tmp").exists()
    cfg.epochs = 3
    logs = []
    best = train(tmp_path / "img", tmp_path / "mask", run, cfg, resume=True, log=logs.append)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["average_count"] == 3  # epochs 1-2 from the first run, 3 from the resumed one
    config = json.loads((best / "config.json").read_text())
    assert config["averaged_epochs"] == [1, 3] and "validation_tuned" in config
    assert (run / "best-epoch" / "weights.safetensors").exists()
    assert any(m.startswith("average of epochs 1-3") for m in logs)


def test_fill_particle_holes_fills_only_holes_of_one_particle():
    labels = np.zeros((20, 30), np.int32)
    labels[2:9, 2:9] = 1
    labels[4:7, 4:7] = 0  # hole of particle 1
    labels[10:18, 2:10] = 2  # particles 2 and 3 enclose a gap together
    labels[10:18, 10:18] = 3
    labels[12:16, 6:14] = 0
    labels[0:5, 20:28] = 4
    labels[0:2, 23:25] = 0  # a notch open to the image border
    filled = fill_particle_holes(labels)
    assert (filled[2:9, 2:9] == 1).all()
    assert (filled[12:16, 6:14] == 0).all() and (filled[0:2, 23:25] == 0).all()
    np.testing.assert_array_equal(filled[10:], labels[10:])


def test_a_particle_inside_another_keeps_the_ring_of_background_between_them():
    labels = np.zeros((24, 24), np.uint16)
    labels[2:22, 2:22] = 1
    labels[5:19, 5:19] = 0  # a large hole of particle 1 ...
    labels[8:16, 8:16] = 2  # ... with particle 2 in it
    labels[11:13, 11:13] = 0  # a hole of particle 2
    view = np.pad(labels, 1)[1:-1, 1:-1]  # a view, not a fresh array
    filled = fill_particle_holes(view)
    assert filled.dtype == np.uint16
    assert (filled[11:13, 11:13] == 2).all()  # touches particle 2 only: filled
    assert (filled[5:8, 5:19] == 0).all()  # touches particles 1 and 2: stays background
    assert (labels[11:13, 11:13] == 0).all()  # the input is not changed


class _WideOutlines:
    """A segmenter (no network) that finds every square particle with a one-pixel ring too many,
    where the foreground probability is 0.65."""

    def segment_normalised(self, img):
        truth = (img > 0.5).astype(np.int32)
        fg = np.where(truth > 0, 0.95, 0.0).astype(np.float32)
        ring = ndi.binary_dilation(truth > 0) & (truth == 0)
        fg[ring] = 0.65
        labels = np.where(ring, 1, truth).astype(np.int32)
        prob = ProbabilityMap(np.stack([1 - fg, fg, np.zeros_like(fg)]), THREE_CLASS, "wide")
        return Instances(labels, np.array([0.9], np.float32)), prob


def test_outline_threshold_is_tuned_for_panoptic_quality_and_foreground_iou():
    from emparticles.train.loop import pooled_figures, tune_outline_threshold

    img = np.zeros((30, 30), np.float32)
    img[10:20, 8:22] = 1.0
    truth = (img > 0.5).astype(np.int32)
    val = [(img, truth)]
    assert pooled_figures([(truth, truth)])["panoptic_quality"] == pytest.approx(1.0)
    wide = _WideOutlines().segment_normalised(img)[0].labels
    assert pooled_figures([(truth, wide)])["panoptic_quality"] == pytest.approx(140 / 188)  # 10x14 in 12x16 less its 4 corners
    assert tune_outline_threshold(_WideOutlines(), val) == 0.7  # 0.5 and 0.6 keep the 0.65 ring
    assert tune_outline_threshold(_WideOutlines(), val, values=(0.5, 0.6)) is None


def test_extra_set_share_of_crops():
    from emparticles.train.loop import pick_sample

    rng = np.random.default_rng(0)
    data, extra = [("d", 0)], [("e", 0)]
    picks = [pick_sample(rng, data, extra, 0.3)[0] for _ in range(4000)]
    assert picks.count("e") / 4000 == pytest.approx(0.3, abs=0.03)
    assert {pick_sample(rng, data, [], 0.9)[0] for _ in range(50)} == {"d"}


def test_paste_source_uses_training_images_only_and_keeps_masks_exact():
    from emparticles.train.data import PasteSource
    from emparticles.train.loop import pick_sample

    img_a, lab_a = disks_image([(30, 30), (30, 45)], radius=8, shape=(80, 80), seed=1)  # a touching pair
    img_b, lab_b = disks_image([(40, 40)], radius=10, shape=(80, 80), seed=2)
    train = [(img_a / 255.0, lab_a)]
    source = PasteSource(train)
    assert [len(p) for p in source.pieces] == [1] and source.pieces[0][0].labels.max() == 2
    assert not PasteSource([(img_b / 255.0, np.zeros_like(lab_b))])  # nothing to cut
    rng = np.random.default_rng(0)
    img, labels = source.sample(rng, 200)
    assert img.shape == labels.shape == (200, 200) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0
    areas = np.bincount(labels.ravel())[1:]
    assert labels.max() >= 2 and labels.max() % 2 == 0  # whole pairs, never a half
    assert set(areas) <= set(np.bincount(lab_a.ravel())[1:])  # every pasted particle keeps its exact area
    # pick_sample: the share of pasted crops
    picks = [pick_sample(rng, [("d", 0)], [], 0.0, source, 0.25, 96)[0] for _ in range(400)]
    assert sum(not isinstance(p, str) for p in picks) / 400 == pytest.approx(0.25, abs=0.07)


def test_training_pastes_only_training_agglomerates(tmp_path, monkeypatch):
    from emparticles.train import data as data_mod
    from emparticles.train.loop import TrainConfig, train

    write_disk_set(tmp_path, count=8, disks=4, radius=8, margin=10)
    seen = []
    original = data_mod.PasteSource.__init__

    def spy(self, train_data, min_px=30):
        seen.extend(img for img, _ in train_data)
        original(self, train_data, min_px)

    monkeypatch.setattr(data_mod.PasteSource, "__init__", spy)
    cfg = TrainConfig(epochs=1, steps_per_epoch=2, batch_size=2, crop=64, tile=128, overlap=16, val_fraction=0.3,
                      device="cpu", paste_fraction=0.5)
    train(tmp_path / "img", tmp_path / "mask", tmp_path / "run", cfg, log=lambda m: None)
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["validation"] and len(seen) == len(split["train"])
    from emparticles.train.data import load_pair

    val_images = [load_pair(tmp_path / "img" / f"{n}.png", tmp_path / "mask" / f"{n}.png")[0] for n in split["validation"]]
    assert not any(np.array_equal(v, s) for v in val_images for s in seen)


def test_tuning_prefers_the_right_count_over_f1():
    from emparticles.train.loop import COUNT_RANGE, tuning_key

    assert COUNT_RANGE[0] < 1 < COUNT_RANGE[1]
    in_range = tuning_key(80, 100, 100, COUNT_RANGE)  # F1 0.80, count ratio 1.00
    too_few = tuning_key(85, 100, 88, COUNT_RANGE)  # F1 0.90 but 12% of particles missing
    assert in_range == (0.0, pytest.approx(0.8)) and too_few[1] == pytest.approx(170 / 188)
    assert in_range > too_few
    assert tuning_key(85, 100, 97, COUNT_RANGE) > in_range  # inside the range F1 decides
    assert tuning_key(50, 100, 90, COUNT_RANGE) > tuning_key(60, 100, 80, COUNT_RANGE)  # outside, the nearer count wins
    assert tuning_key(85, 100, 88, None) > tuning_key(80, 100, 100, None)  # no range: F1 alone


def test_scale_search_does_not_enlarge_huge_images(monkeypatch):
    seg = _ScoredAtScale(2.0, {"start": [0.7, 1.0], "up": [1.4, 2.0], "down": [0.5], "max_pixels": 1_000})
    monkeypatch.setattr(seg, "MAX_UPSCALED_PIXELS", 60 * 80 * 1.5)  # 1.4x of 60x80 is 1.96x the pixels
    best, _ = seg.choose_scale(np.zeros((60, 80), np.float32))
    assert best == 1.0 and [c[0] for c in seg.calls] == [0.7, 1.0]


def test_scale_search_enlarges_only_small_images():
    search = {"start": [0.7, 1.0], "up": [1.4, 2.0], "down": [0.5], "max_pixels": 100_000, "max_upscaled_pixels": 2_000}
    small = _ScoredAtScale(2.0, search)
    assert small.choose_scale(np.zeros((20, 25), np.float32))[0] == 2.0  # 2x of 500 px = 2000 px
    large = _ScoredAtScale(2.0, search)
    assert large.choose_scale(np.zeros((40, 60), np.float32))[0] == 1.0
    assert [c[0] for c in large.calls] == [0.7, 1.0]


@pytest.mark.parametrize("option, value", [("--paste-fraction", "1.5"), ("--focus-fraction", "-0.1")])
def test_train_command_rejects_a_share_outside_0_1(tmp_path, option, value):
    img_dir, mask_dir = write_disk_set(tmp_path, count=2, disks=1, radius=8, margin=10)
    r = CliRunner().invoke(app, ["train", "--images", str(img_dir), "--masks", str(mask_dir), "-o", str(tmp_path / "run"),
                                 option, value])
    assert r.exit_code != 0 and "between 0 and 1" in r.output
    assert not (tmp_path / "run").exists()


def test_train_command_passes_the_focus_share_to_training(tmp_path, monkeypatch):
    import emparticles.train.loop as loop

    seen = {}

    def fake_train(images, masks, out, cfg, **kw):
        seen["focus"] = cfg.focus_fraction
        return out / "best"

    monkeypatch.setattr(loop, "train", fake_train)
    img_dir, mask_dir = write_disk_set(tmp_path, count=2, disks=1, radius=8, margin=10)
    r = CliRunner().invoke(app, ["train", "--images", str(img_dir), "--masks", str(mask_dir), "-o", str(tmp_path / "run"),
                                 "--focus-fraction", "0.33"])
    assert r.exit_code == 0, r.output
    assert seen["focus"] == pytest.approx(0.33)


def test_train_command_rejects_negative_workers(tmp_path):
    from typer.testing import CliRunner

    from emparticles.cli import app

    write_disk_set(tmp_path, count=2, disks=2, radius=6, margin=8)
    result = CliRunner().invoke(app, ["train", "--images", str(tmp_path / "img"), "--masks", str(tmp_path / "mask"),
                                      "-o", str(tmp_path / "run"), "--workers", "-1"])
    assert result.exit_code != 0 and "--workers" in result.output
    assert not (tmp_path / "run").exists()


def test_train_command_rejects_averaging_more_epochs_than_it_runs(tmp_path):
    img_dir, mask_dir = write_disk_set(tmp_path, count=2, disks=1, radius=8, margin=10)
    r = CliRunner().invoke(app, ["train", "--images", str(img_dir), "--masks", str(mask_dir), "-o", str(tmp_path / "run"),
                                 "--epochs", "3", "--average-epochs", "4"])
    assert r.exit_code != 0 and "--average-epochs 4" in r.output and "(3)" in r.output
    assert not (tmp_path / "run").exists()


def test_balanced_tuning_weighs_every_set_the_same():
    from emparticles.train.loop import COUNT_RANGE, balanced_key, tuning_key

    # dense frames: 900 true particles, found well either way; crops: 100, whose small
    # particles a setting drops (count 0.7) to gain 10 matches on the dense frames
    keeps_small = {"dense": (800, 900, 900), "crops": (85, 100, 100)}
    drops_small = {"dense": (810, 900, 900), "crops": (65, 100, 70)}
    pooled = lambda c: tuning_key(*(sum(v[i] for v in c.values()) for i in range(3)), COUNT_RANGE)  # noqa: E731
    assert pooled(drops_small) > pooled(keeps_small)  # pooled, the dense frames decide
    assert balanced_key(drops_small, COUNT_RANGE) < balanced_key(keeps_small, COUNT_RANGE)
    assert balanced_key(keeps_small)[1] == pytest.approx((2 * 800 / 1800 + 2 * 85 / 200) / 2)
