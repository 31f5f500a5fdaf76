"""The published variants in the comparison: MultiResUNet, and local contrast normalisation as a
network's first stage."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from emparticles.cli import app
from emparticles.models.cnn import CNNSegmenter, load_network, save_model_folder
from emparticles.models.networks import (
    LocalContrast,
    MultiResUNet,
    WithLocalContrast,
    build_network,
    prepare_for_inference,
)
from emparticles.train.loop import load_matching_weights

from .conftest import write_disk_set


def test_multiresunet_as_published_has_its_parameter_count():
    # Ibtehaz & Rahman (2020), Table 2: 7,262,619 parameters for 3-channel input and 1 output;
    # here 1 input channel and 3 outputs, so a few hundred fewer at the input and more at the head
    net = MultiResUNet(classes=3)
    n = sum(p.numel() for p in net.parameters())
    assert 7_200_000 < n < 7_300_000
    assert net.multiple == 16
    # the residual paths shrink from 4 units at the top level to 1 at the bottom
    assert [len(p.units) for p in net.paths] == [4, 3, 2, 1]


@pytest.mark.parametrize("arch", ["multiresunet-slim"])
def test_multiresunet_contract(arch, tmp_path):
    torch.manual_seed(0)
    net = build_network(arch, 4)
    x = torch.randn(2, 1, 48, 64)
    y = net(x)
    assert y.shape == (2, 4, 48, 64)
    y.mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    net.eval()
    for module in net.modules():  # trained statistics, so that folding has something to fold
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    folder = save_model_folder(net, tmp_path / "m", {"arch": arch, "classes": 3, "name": "t",
                                                     "channels": ["background", "particle", "boundary", "distance"]})
    again, _, _ = load_network(folder)
    with torch.no_grad():
        expected = net(x)
        assert torch.allclose(again(x), expected, atol=1e-4)
        assert torch.allclose(prepare_for_inference(net)(x), expected, atol=1e-4)


def _texture(shape=(96, 128), seed=0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    from scipy import ndimage as ndi

    t = ndi.gaussian_filter(rng.normal(size=shape), 2.0)
    return torch.from_numpy((t / t.std()).astype(np.float32))[None, None]


def test_local_contrast_removes_offsets_and_linear_shading():
    lc = LocalContrast(16)
    flat = torch.full((1, 1, 70, 90), 3.0)
    assert lc(flat).abs().max() < 1e-5  # a uniform field has no contrast, whatever its level
    texture = _texture()
    shaded = texture + 4.0 + torch.linspace(-3, 3, 128).view(1, 1, 1, 128)  # a charging gradient across the frame
    a, b = lc(texture)[..., 24:-24, 24:-24], lc(shaded)[..., 24:-24, 24:-24]
    # away from the edges, where replicated borders bend the ramp; a gradient of 6 SDs across the
    # frame leaves less than a tenth of an SD
    assert (a - b).abs().max() < 0.1
    assert 0.5 < float(a.std()) < 1.5  # texture of SD 1 stays about unit scale


def test_local_contrast_evens_out_exposure_between_frames():
    lc = LocalContrast(16, floor=0.05)
    texture = _texture(seed=1)
    dim, bright = lc(0.3 * texture), lc(3.0 * texture + 1.0)
    # the raw frames differ tenfold in contrast; after the stage they nearly agree
    assert float((dim - bright).abs().mean()) < 0.05 * float(bright.abs().mean()) + 0.02


def test_model_folder_with_local_contrast_round_trips_and_starts_from_plain_weights(tmp_path):
    torch.manual_seed(0)
    plain = build_network("strided-unet-slim", 3).eval()
    net = build_network("strided-unet-slim", 3, local_contrast_px=12).eval()
    assert isinstance(net, WithLocalContrast) and net.multiple == plain.multiple
    assert load_matching_weights(net, plain.state_dict()) == []  # the same weights under "body."
    x = torch.randn(1, 1, 64, 96)
    with torch.no_grad():
        assert torch.allclose(net(x), plain(net.local_contrast(x)), atol=1e-5)
    folder = save_model_folder(net, tmp_path / "m", {"arch": "strided-unet-slim", "classes": 3, "name": "lc",
                                                     "local_contrast_px": 12})
    again, _, _ = load_network(folder)
    assert isinstance(again, WithLocalContrast) and again.local_contrast.sigma_px == 12
    with torch.no_grad():
        expected = net(x)
        assert torch.allclose(again(x), expected, atol=1e-4)
        assert torch.allclose(prepare_for_inference(again)(x), expected, atol=1e-4)
    seg = CNNSegmenter(folder, device="cpu")
    inst, prob = seg.segment(np.random.default_rng(0).random((80, 100)).astype(np.float32))
    assert inst.labels.shape == (80, 100) and prob.probabilities.shape[1:] == (80, 100)


def test_training_with_local_contrast_records_it_in_the_model_folder(tmp_path):
    from emparticles.train.loop import TrainConfig, train

    write_disk_set(tmp_path, count=6, disks=3, radius=8, margin=10)
    cfg = TrainConfig(epochs=1, steps_per_epoch=2, batch_size=2, crop=64, tile=128, overlap=16, val_fraction=0.3,
                      device="cpu", local_contrast_px=8.0)
    best = train(tmp_path / "img", tmp_path / "mask", tmp_path / "run", cfg, log=lambda m: None, tune=False)
    config = json.loads((best / "config.json").read_text())
    assert config["local_contrast_px"] == 8.0
    assert isinstance(load_network(best)[0], WithLocalContrast)


def test_train_command_keeps_local_contrast_for_the_semantic_networks(tmp_path):
    img_dir, mask_dir = write_disk_set(tmp_path, count=2, disks=1, radius=8, margin=10)
    r = CliRunner().invoke(app, ["train", "--images", str(img_dir), "--masks", str(mask_dir), "-o", str(tmp_path / "run"),
                                 "--arch", "maskrcnn-resnet18-fpn", "--local-contrast", "16"])
    assert r.exit_code != 0 and "--local-contrast" in r.output
    assert not (tmp_path / "run").exists()
