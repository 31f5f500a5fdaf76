"""ONNX Runtime execution of model folders: export round trip, int8 quantisation, fallbacks."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from emparticles.cli import app
from emparticles.errors import InputError
from emparticles.inference import output_probabilities
from emparticles.models import load_model
from emparticles.models.cnn import CNNSegmenter, save_model_folder
from emparticles.models.networks import build_network, prepare_for_inference
from emparticles.models.onnx import (
    ONNX_FILE,
    OnnxNetwork,
    add_graph_to_folder,
    calibration_crops,
    export_onnx,
    quantise_model_folder,
)
from emparticles.preprocess import normalise

from .conftest import GRID_CENTRES, disks_image

pytest.importorskip("onnxruntime")


def _folder(tmp_path, name="m"):
    torch.manual_seed(0)
    net = build_network("strided-unet").eval()
    return save_model_folder(net, tmp_path / name, {"arch": "strided-unet", "classes": 3, "name": name}), net


def test_fp32_export_computes_the_same_function(tmp_path):
    folder, net = _folder(tmp_path)
    entry = export_onnx(net, folder)
    assert entry["precision"] == "fp32" and (folder / ONNX_FILE).is_file()
    onnx_net = OnnxNetwork(folder / ONNX_FILE, multiple=32)  # a graph of logits
    x = torch.randn(2, 1, 96, 160)  # batch, height and width differ from the export's example
    with torch.inference_mode():
        expected = prepare_for_inference(net)(x.contiguous(memory_format=torch.channels_last))
    got = onnx_net.run(x.numpy())
    assert got.shape == (2, 3, 96, 160)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=1e-4)
    # their probabilities, in numpy, as the torch network's are computed
    np.testing.assert_allclose(onnx_net.probabilities(x.numpy()), output_probabilities(expected).numpy(), atol=1e-5)


def test_graph_reads_its_weights_from_the_safetensors_file(tmp_path):
    folder, net = _folder(tmp_path)
    net.head.bias.data.add_(0.3)  # batch norms and biases as trained, not the exporter's defaults
    save_model_folder(net, folder, json.loads((folder / "config.json").read_text()))
    torch_model = CNNSegmenter(folder, "cpu")
    assert not isinstance(torch_model.net, OnnxNetwork)
    entry = add_graph_to_folder(folder)
    assert entry["precision"] == "fp32" and entry["weights"] == "weights.safetensors"
    assert json.loads((folder / "config.json").read_text())["onnx"] == entry
    weights = (folder / "weights.safetensors").stat().st_size
    assert (folder / ONNX_FILE).stat().st_size < 0.05 * weights  # the graph holds no copy of the weights
    onnx_model = CNNSegmenter(folder, "cpu")
    assert isinstance(onnx_model.net, OnnxNetwork)
    img, _ = disks_image(GRID_CENTRES, shape=(128, 176))
    expected, got = torch_model.predict(img).probabilities, onnx_model.predict(img).probabilities
    assert np.abs(got - expected).max() < 1e-4
    # new weights in the same file: the graph's offsets no longer describe them, PyTorch runs
    with torch.no_grad():
        net.head.bias.add_(1.0)
    raw = json.loads((folder / "config.json").read_text())
    save_model_folder(net, folder, raw)
    (folder / "config.json").write_text(json.dumps(raw))  # the old entry kept by hand
    assert not isinstance(CNNSegmenter(folder, "cpu").net, OnnxNetwork)


def test_shipped_networks_run_their_graphs_and_agree_with_pytorch():
    model = load_model(None, "cpu")
    assert isinstance(model.net, OnnxNetwork) and model.net.gives_probabilities
    img, _ = disks_image(GRID_CENTRES, shape=(128, 176))
    reference = CNNSegmenter(model.folder, "cpu", onnx=False)
    assert np.abs(model.predict(img).probabilities - reference.predict(img).probabilities).max() < 1e-4


def test_calibration_crops_are_network_sized_and_scaled():
    images = [np.full((500, 700), 0.75, np.float32), np.zeros((40, 50), np.float32), np.zeros((20, 200), np.float32)]
    crops = calibration_crops(images, count=5, size=384)
    assert len(crops) == 5
    assert {c.shape for c in crops} == {(384, 384), (32, 32)}  # the 20-px-high image is skipped
    assert all(c.dtype == np.float32 for c in crops)
    assert sorted({float(c.flat[0]) for c in crops}) == [-2.0, 1.0]  # (x - 0.5) / 0.25
    with pytest.raises(ValueError):
        calibration_crops([np.zeros((10, 10), np.float32)])


def test_quantised_folder_runs_int8_and_stays_close_to_fp32(tmp_path):
    folder, _ = _folder(tmp_path)
    img, _ = disks_image(GRID_CENTRES, shape=(128, 176))
    fp32 = CNNSegmenter(folder, "cpu")
    assert not isinstance(fp32.net, OnnxNetwork)  # no graph yet: PyTorch
    field = normalise(img)
    entry = quantise_model_folder(folder, [field, field[::-1]], count=4)
    assert entry["precision"] == "int8"
    assert json.loads((folder / "config.json").read_text())["onnx"] == entry
    int8 = load_model(str(folder), "cpu")
    assert isinstance(int8.net, OnnxNetwork)
    p32, p8 = fp32.predict(img).probabilities, int8.predict(img).probabilities
    assert p8.shape == (3, 128, 176) and np.allclose(p8.sum(0), 1, atol=1e-4)
    assert float(np.abs(p8 - p32).mean()) < 0.05
    assert not isinstance(CNNSegmenter(folder, "cpu", onnx=False).net, OnnxNetwork)


def test_graph_of_older_weights_is_ignored(tmp_path):
    folder, net = _folder(tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    raw["onnx"] = export_onnx(net, folder)
    (folder / "config.json").write_text(json.dumps(raw))
    assert isinstance(CNNSegmenter(folder, "cpu").net, OnnxNetwork)
    with torch.no_grad():
        net.head.bias.add_(1.0)
    save_model_folder(net, folder, raw)  # retrained weights: the graph's entry is left out
    assert "onnx" not in json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(raw))  # weights replaced by hand, the old entry kept
    assert not isinstance(CNNSegmenter(folder, "cpu").net, OnnxNetwork)


def test_unreadable_graph_names_the_file(tmp_path):
    folder, net = _folder(tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    raw["onnx"] = export_onnx(net, folder)
    (folder / "config.json").write_text(json.dumps(raw))
    (folder / ONNX_FILE).write_bytes(b"not a graph")
    with pytest.raises(InputError) as err:
        CNNSegmenter(folder, "cpu")
    assert ONNX_FILE in str(err.value) and "delete it" in str(err.value)


def test_quantise_command(tmp_path):
    folder, _ = _folder(tmp_path)
    img, _ = disks_image(GRID_CENTRES, shape=(128, 176))
    from PIL import Image

    Image.fromarray((img * 255).astype(np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"nope")
    r = CliRunner().invoke(app, ["quantise", str(folder), str(tmp_path / "a.png"), str(tmp_path / "broken.png"),
                                 "--count", "2"])
    assert r.exit_code == 0, r.output
    assert "broken.png" in r.output and "1 image(s)" in r.output
    assert json.loads((folder / "config.json").read_text())["onnx"]["precision"] == "int8"
    r = CliRunner().invoke(app, ["quantise", str(tmp_path), str(tmp_path / "a.png")])
    assert r.exit_code != 0 and "not a model folder" in r.output


def test_the_default_model_analyses_an_image_without_torch(tmp_path):
    """On a CPU the shipped graph runs without torch, whose import took 4 s of a one-image run."""
    import subprocess
    import sys

    from PIL import Image

    img, _ = disks_image(GRID_CENTRES, shape=(128, 176))
    Image.fromarray((img * 255).astype(np.uint8)).save(tmp_path / "a.png")
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from emparticles.models import load_model\n"
        "from emparticles.pipeline import AnalysisSettings, analyse_path\n"
        "model = load_model(None, 'cpu')\n"
        f"result = analyse_path(Path({str(tmp_path / 'a.png')!r}), model, AnalysisSettings(pixel_size_nm=2.0))\n"
        "print(result.summary['particles_measured'], type(model.net).__name__, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1:] == ["OnnxNetwork", "False"] and int(out[0]) > 0
