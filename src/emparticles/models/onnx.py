"""CPU execution of a model folder's network with ONNX Runtime, in fp32 or int8.

**fp32, graph only** (:func:`write_graph`; every shipped U-Net-family model has one). The folder's
``network.onnx`` holds the network's operations and no weights of its own: each weight is read
from ``weights.safetensors`` at its byte offset there (ONNX external data; a safetensors file
stores raw little-endian tensors after a JSON header), so the graph adds 30 KB to a folder and
cannot disagree with its weights. ONNX Runtime folds the batch norms and picks its own memory
layout. Measured with ``emps-sem-slim-unet-v6`` on two CPU cores: a 960x1280 frame's network
pass (two tiles of 1024x704) 0.36-0.44 s against 0.49-0.54 s in PyTorch (batch norm folded,
decoder concatenations split, channels_last), outputs equal to 7e-6.

**int8** (``emparticles quantise``): gives a model folder a ``network.onnx`` exported from its
``weights.safetensors`` and quantised to int8 (per-channel weights, activations calibrated on
training images); the weights stay the source of truth, and the ONNX graph is a protobuf,
loaded without unpickling anything. Measured on two CPU cores with the ``strided-unet`` of
2.0 M parameters on a 1024x1312 input: 0.42-0.46 s in PyTorch (folded batch norm, channels_last),
0.38-0.39 s in ONNX Runtime fp32 (outputs equal to 3e-6), 0.26-0.27 s in int8. End to end the
gain is smaller: on the 58 EMPS validation images, emps-strided-unet-v1 (no longer shipped) in int8 (three
calibrations) took 2.0-2.3 times the classical model's time per image against 2.3-2.4 in fp32,
and F1 at IoU 0.5 was 0.874-0.885 against 0.881: quantisation moves near-ties of the scale
search (10-12 of 58 images changed scale). The shipped models therefore stay fp32; quantising
is for users who trade that noise for throughput.

``config["onnx"]`` records the file, its precision, the SHA-256 of the safetensors file it was
exported from and the network's stride; a folder whose weights changed since (retrained,
edited), or a machine without ONNX Runtime, runs the PyTorch weights. The fp32 graphs end in the
probabilities (``"output": "probabilities"``), so that a CPU run needs no torch at all; int8
graphs end in the logits, whose softmax is then computed in numpy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

ONNX_FILE = "network.onnx"


def weights_digest(folder: Path) -> str:
    """SHA-256 (hex) of a model folder's ``weights.safetensors``."""
    return hashlib.sha256((Path(folder) / "weights.safetensors").read_bytes()).hexdigest()


def export_onnx(net: torch.nn.Module, folder: Path, calibration: Iterable[np.ndarray] | None = None,
                opset: int = 17) -> dict:
    """Write ``folder/network.onnx`` from ``net`` (in eval mode, batch norm folded or not) and
    return the entry for ``config["onnx"]``.

    Inputs are (B, 1, H, W) float32 with dynamic batch, height and width (multiples of the
    network's stride). With ``calibration`` (normalised (H, W) float32 images, already scaled as
    the network sees them: ``(x - 0.5) / 0.25``) the graph is quantised to int8 (per-channel
    weights, activations calibrated on those images); needs the ``onnx`` package.
    """
    import torch

    folder = Path(folder)
    path = folder / ONNX_FILE
    fp32 = folder / "network-fp32.onnx" if calibration is not None else path
    net = net.eval().to("cpu", memory_format=torch.contiguous_format)
    example = torch.zeros(1, 1, 64, 64)
    dims = {0: "batch", 2: "height", 3: "width"}
    torch.onnx.export(net, (example,), str(fp32), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": dims, "logits": dims}, opset_version=opset, dynamo=False)
    precision = "fp32"
    if calibration is not None:
        _quantise(fp32, path, calibration)
        fp32.unlink()
        precision = "int8"
    return {"file": ONNX_FILE, "precision": precision, "weights_sha256": weights_digest(folder),
            "multiple": int(getattr(net, "multiple", 32))}


def write_graph(folder: Path, opset: int = 17) -> dict:
    """Write ``folder/network.onnx``: the network of a model folder as an fp32 ONNX graph whose
    weights are references into the folder's ``weights.safetensors`` (no copy), and return the
    entry for ``config["onnx"]``. Needs the ``onnx`` package (``pip install
    'emparticles[onnx]'``); running the graph needs only ONNX Runtime.

    The export keeps the batch norms as they were trained (ONNX Runtime folds them when it loads
    the graph), so that every weight of the graph is a tensor of the safetensors file, byte for
    byte; a constant the exporter made itself (none in the U-Net family) stays inside the graph.
    """
    import io
    import json
    import struct
    import warnings

    import onnx
    import torch
    from onnx import numpy_helper

    from .cnn import load_network, network_outputs

    folder = Path(folder)
    net, config, _ = load_network(folder, "cpu")
    net = net.eval().to(memory_format=torch.contiguous_format)
    dims = {0: "batch", 2: "height", 3: "width"}
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter announces its deprecation
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 1, 64, 64),), buffer, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": dims, "logits": dims}, opset_version=opset, dynamo=False,
                          do_constant_folding=False, training=torch.onnx.TrainingMode.EVAL)
    graph = onnx.load_from_string(buffer.getvalue())
    _add_probabilities(graph, network_outputs(config), classes=3)
    raw = (folder / "weights.safetensors").read_bytes()
    header_length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + header_length])
    start = 8 + header_length
    for tensor in graph.graph.initializer:
        entry = header.get(tensor.name)
        if not entry or entry.get("dtype") != "F32":
            continue
        a, b = entry["data_offsets"]
        value = numpy_helper.to_array(tensor)
        stored = np.frombuffer(raw[start + a:start + b], "<f4")
        if stored.size != value.size or not np.array_equal(stored.reshape(value.shape), value):
            continue  # not the stored tensor (changed by the export): keep the graph's own copy
        tensor.ClearField("raw_data")
        tensor.ClearField("float_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, text in (("location", "weights.safetensors"), ("offset", str(start + a)), ("length", str(b - a))):
            item = tensor.external_data.add()
            item.key, item.value = key, text
    from ..io.writers import _write

    _write(folder / ONNX_FILE, lambda p: p.write_bytes(graph.SerializeToString()))
    return {"file": ONNX_FILE, "precision": "fp32", "weights": "weights.safetensors",
            "weights_sha256": weights_digest(folder), "output": "probabilities",
            "multiple": int(getattr(net, "multiple", 32))}


def _add_probabilities(graph, channels: int, classes: int) -> None:
    """Make a graph's output the probabilities instead of the logits: the softmax over the first
    ``classes`` channels, then the sigmoid of each further one (a distance map), as
    :func:`~emparticles.inference.output_probabilities` computes them. In the graph ONNX Runtime
    computes them on its threads (a 960x1344 frame's four maps: 25 ms, numpy 35 ms), and no torch
    is needed to use the network."""
    from onnx import TensorProto, helper, numpy_helper

    g = graph.graph
    logits = g.output[0].name
    const = [numpy_helper.from_array(np.array(v, np.int64), name) for name, v in
             (("p_zero", [0]), ("p_classes", [classes]), ("p_end", [np.iinfo(np.int64).max]), ("p_axis", [1]))]
    g.initializer.extend(const)
    # The softmax spelt out: ONNX Runtime's Softmax over the channel axis of an NCHW map
    # transposes it twice (155 ms for a 960x1344 frame's four maps, against 25 ms this way).
    nodes = [helper.make_node("Slice", [logits, "p_zero", "p_classes", "p_axis"], ["p_class_logits"]),
             helper.make_node("ReduceMax", ["p_class_logits"], ["p_max"], axes=[1], keepdims=1),
             helper.make_node("Sub", ["p_class_logits", "p_max"], ["p_shifted"]),
             helper.make_node("Exp", ["p_shifted"], ["p_exp"]),
             helper.make_node("ReduceSum", ["p_exp", "p_axis"], ["p_sum"], keepdims=1),
             helper.make_node("Div", ["p_exp", "p_sum"], ["p_classes_out" if channels > classes else "probabilities"])]
    if channels > classes:
        nodes += [helper.make_node("Slice", [logits, "p_classes", "p_end", "p_axis"], ["p_maps"]),
                  helper.make_node("Sigmoid", ["p_maps"], ["p_maps_out"]),
                  helper.make_node("Concat", ["p_classes_out", "p_maps_out"], ["probabilities"], axis=1)]
    g.node.extend(nodes)
    out = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", channels, "height", "width"])
    del g.output[:]
    g.output.append(out)


def add_graph_to_folder(folder: Path) -> dict | None:
    """:func:`write_graph` and its entry in the folder's ``config.json``; None (nothing written)
    without the ``onnx`` package or for a network the exporter cannot trace (the folder then
    runs in PyTorch, as before)."""
    import json

    folder = Path(folder)
    try:
        import onnx  # noqa: F401
    except ImportError:
        return None
    raw = json.loads((folder / "config.json").read_text())
    if raw.get("kind") in ("maskrcnn", "select"):
        return None
    try:
        entry = write_graph(folder)
    except Exception:  # noqa: BLE001 - an architecture the exporter cannot trace runs in PyTorch
        (folder / ONNX_FILE).unlink(missing_ok=True)
        return None
    raw["onnx"] = entry
    from ..io.writers import _write

    _write(folder / "config.json", lambda p: p.write_text(json.dumps(raw, indent=2) + "\n"))
    return entry


def calibration_crops(images: Iterable[np.ndarray], count: int = 32, size: int = 384, seed: int = 0) -> list[np.ndarray]:
    """``count`` random crops of at most ``size`` px (sides multiples of 32) of normalised (H, W)
    images in [0, 1], scaled as the network sees them (``(x - 0.5) / 0.25``), float32; the images
    are taken in a random order, each once before any twice."""
    rng = np.random.default_rng(seed)
    images = [np.asarray(im, np.float32) for im in images if min(np.shape(im)) >= 32]
    if not images:
        raise ValueError("no calibration image of at least 32x32 pixels")
    order = rng.permutation(len(images))
    crops = []
    for i in range(count):
        img = images[order[i % len(images)]]
        h, w = img.shape
        ch, cw = min(h, size) // 32 * 32, min(w, size) // 32 * 32
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crops.append(((img[y:y + ch, x:x + cw] - 0.5) / 0.25).astype(np.float32))
    return crops


def quantise_model_folder(folder: Path, images: Iterable[np.ndarray], count: int = 32, seed: int = 0) -> dict:
    """Give a model folder an int8 ``network.onnx`` calibrated on crops of ``images``
    (normalised (H, W) training images, info bars left out) and record it in its config.json.
    Returns the config entry. Check the model's accuracy afterwards (``emparticles evaluate``):
    CPU inference of the folder uses the int8 graph from then on; delete ``network.onnx`` to
    go back to the fp32 weights."""
    import json

    from .cnn import load_network

    folder = Path(folder)
    net, _, _ = load_network(folder, "cpu")
    entry = export_onnx(net, folder, calibration_crops(images, count, seed=seed))
    raw = json.loads((folder / "config.json").read_text())
    raw["onnx"] = entry
    (folder / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    return entry


def _quantise(src: Path, dest: Path, calibration: Iterable[np.ndarray]) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.images = iter(calibration)

        def get_next(self):
            img = next(self.images, None)
            return None if img is None else {"image": np.asarray(img, np.float32)[None, None]}

    prepared = src.with_name("network-prepared.onnx")
    quant_pre_process(str(src), str(prepared))
    try:
        quantize_static(str(prepared), str(dest), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        prepared.unlink(missing_ok=True)


class OnnxNetwork:
    """A network run by ONNX Runtime on (B, 1, H, W) float32 numpy arrays, giving (B, C, H, W)
    probabilities (:meth:`probabilities`); no torch is needed. ``gives_probabilities``: the graph
    computes them (:func:`write_graph`'s graphs), else it gives logits (an int8 graph) and they
    are computed in numpy."""

    takes_numpy = True  # for :func:`~emparticles.inference.predict_tiled`

    def __init__(self, path: Path, multiple: int, threads: int | None = None, gives_probabilities: bool = False):
        import onnxruntime as ort

        from ..inference import compute_threads

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or compute_threads())
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # Worker threads that spin while they wait take the cores from the work beside and after a
        # run (the scale bar's OCR in another thread, the instance separation that follows: 0.55 s
        # per EMPS image instead of 0.49 s when left spinning after a run). Not spinning at all
        # costs the network pass nothing measurable here (960x1280: 0.435 s either way, 8 runs
        # each, interleaved) and saves 0.17 s of CPU time per 1280x960 `analyze`.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.multiple = multiple
        self.path = Path(path)
        self.gives_probabilities = gives_probabilities

    def run(self, x: np.ndarray) -> np.ndarray:
        """The graph's output for a (B, 1, H, W) input."""
        return self.session.run(None, {"image": np.ascontiguousarray(x, np.float32)})[0]

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """(B, C, H, W) probabilities of a (B, 1, H, W) input, as
        :func:`~emparticles.inference.output_probabilities` gives them for the torch network."""
        out = self.run(x)
        if self.gives_probabilities:
            return out
        from ..inference import probabilities_of_logits

        return probabilities_of_logits(out)


def onnx_network(folder: Path, config: dict, multiple: int | None = None) -> OnnxNetwork | None:
    """The folder's ONNX network if it has one exported from its current weights and ONNX
    Runtime is installed, else None (the caller runs the PyTorch network). ``multiple``: the
    network's stride, if the graph's entry does not record it (None: then None is returned, and
    the caller builds the torch network to learn it)."""
    entry = config.get("onnx") or {}
    path = Path(folder) / entry.get("file", ONNX_FILE)
    multiple = entry.get("multiple", multiple)
    if not entry or multiple is None or not path.is_file() or entry.get("weights_sha256") != weights_digest(folder):
        return None
    try:
        return OnnxNetwork(path, int(multiple), gives_probabilities=entry.get("output") == "probabilities")
    except ImportError:
        return None
    except Exception as exc:  # noqa: BLE001 (onnxruntime raises its own types for unreadable graphs)
        from ..errors import InputError

        raise InputError(path, f"cannot be loaded by ONNX Runtime ({exc})",
                         "delete it to run the folder's PyTorch weights, or export it again") from None
