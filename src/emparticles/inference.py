"""Tiled prediction with mirror padding and tapered blending, for images of any size.

Importing this module, and running a network that takes numpy arrays (an ONNX Runtime graph,
:class:`~emparticles.models.onnx.OnnxNetwork`), needs no torch: importing torch takes 4 s of a
one-image ``analyze`` on two cores, and the shipped networks run without it on a CPU."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def device_name(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a usable GPU is present, else ``cpu``; the name of a device
    given. Decides without importing torch where no GPU driver is present (a Linux machine
    without NVIDIA's devices). An unknown device, or ``cuda`` on a machine without a usable GPU,
    raises :class:`~emparticles.errors.InputError` with one clear line."""
    from .errors import InputError
    from .models.registry import check_device_name

    device = str(device)
    check_device_name(device)
    if device == "cpu" or (device == "auto" and not _gpu_driver_possible()):
        return "cpu"
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise InputError(None, "--device cuda: no usable GPU on this machine (or torch was built without CUDA)",
                         "use --device cpu, or auto")
    return device


def _gpu_driver_possible() -> bool:
    """False where CUDA cannot be: Linux with no NVIDIA device nodes or driver (WSL's GPU is
    /dev/dxg); True elsewhere, where torch is asked."""
    if not sys.platform.startswith("linux"):
        return True
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg", "/proc/driver/nvidia"))


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """:func:`device_name` as a ``torch.device``."""
    import torch

    if isinstance(device, torch.device):
        return device
    return torch.device(device_name(device))


def compute_threads() -> int:
    """The threads this process's compute may use: torch's setting once torch is loaded (one on
    a cluster worker of one thread, :func:`~emparticles.batch.limit_threads`), else the CPUs it
    may run on."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return int(torch.get_num_threads())
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def taper_window(size: int | tuple[int, int], margin: int) -> np.ndarray:
    """(h, w) blending weights (``size`` an int for a square): 1 in the middle, a raised-cosine
    ramp over ``margin`` pixels at each border, never exactly 0 (so that image borders are still
    covered)."""
    h, w = (size, size) if isinstance(size, int) else size

    def ramp(n: int) -> np.ndarray:
        r = np.ones(n, np.float32)
        m = min(margin, n // 2)
        if m > 0:
            t = (np.arange(m, dtype=np.float32) + 0.5) / m
            r[:m] = 0.5 - 0.5 * np.cos(np.pi * t)
            r[-m:] = r[:m][::-1]
        return r

    return np.outer(ramp(h), ramp(w))


def tile_layout(length: int, tile: int, overlap: int, multiple: int = 1) -> tuple[int, list[int]]:
    """(tile size, tile starts) covering ``length`` pixels with the fewest tiles of at most
    ``tile`` pixels that overlap by at least ``overlap``, the tiles made as small as that allows
    (a multiple of ``multiple``, which ``tile`` and ``length`` must be).

    Balanced tiles cost much less than full-size tiles on images just over one tile: 1088 px in
    tiles of 1024 overlapping by 64 takes two tiles of 576 (1152 px of network input) instead of
    two of 1024 (2048 px); measured on a 1088x1238 input, 4.2 MP of tiles became 1.5 MP.
    """
    if length <= tile:
        return length, [0]
    count = -(-(length - overlap) // (tile - overlap))
    size = -(-(length + (count - 1) * overlap) // count)
    size = min(tile, -(-size // multiple) * multiple)
    starts = np.linspace(0, length - size, count).round().astype(int)
    return size, sorted(set(int(s) for s in starts))


def output_probabilities(logits: torch.Tensor, classes: int = 3) -> torch.Tensor:
    """(B, C, H, W) probabilities of a semantic network's logits: softmax over the first
    ``classes`` channels, and a sigmoid of each further one (a distance map)."""
    import torch
    from torch.nn import functional as F

    with torch.inference_mode():
        logits = logits.float()
        if logits.shape[1] <= classes:
            return F.softmax(logits, dim=1)
        # Written into one tensor, a tile at a time: a tile's class channels are contiguous, so
        # the softmax needs no copy of them, and no concatenation follows (measured on two
        # 960x704 tiles of four channels: 18 ms -> 8 ms).
        out = torch.empty_like(logits)
        for b in range(len(logits)):
            out[b, :classes] = F.softmax(logits[b, :classes], dim=0)
        torch.sigmoid(logits[:, classes:], out=out[:, classes:])
        return out


def probabilities_of_logits(logits: np.ndarray, classes: int = 3) -> np.ndarray:
    """:func:`output_probabilities` in numpy, for a graph that gives logits (an int8 one)."""
    logits = np.asarray(logits, np.float32)
    out = np.empty_like(logits)
    c = logits[:, :classes]
    e = np.exp(c - c.max(axis=1, keepdims=True), out=out[:, :classes])
    e /= e.sum(axis=1, keepdims=True)
    rest = out[:, classes:]
    np.negative(logits[:, classes:], out=rest)
    np.exp(rest, out=rest)
    rest += 1
    np.reciprocal(rest, out=rest)
    return out


def predict_tiled(
    net,
    image: np.ndarray,
    tile: int = 1024,
    overlap: int = 64,
    batch_size: int = 2,
    device: str | torch.device = "cpu",
    bf16: bool = False,
    flips: bool = False,
    pad: int | None = None,
) -> np.ndarray:
    """Class probabilities of a normalised (H, W) float32 image: (C, H, W) float32.

    The image is mirror-padded by ``pad`` pixels (default ``overlap // 2``; context for particles at
    the image border) and to a multiple of the network's stride, cut into ``tile``-sized tiles
    overlapping by ``overlap``, and the tiles' softmax outputs are blended with a tapered window. ``flips`` averages over the
    four flips (test-time augmentation). ``net`` is a torch module, or a network that takes and
    gives numpy arrays (``takes_numpy``: an ONNX Runtime graph, run without torch).
    channels_last speeds up CPU inference; bf16 autocast helps only on CPUs with native bf16
    (AMX/AVX512-BF16) and on GPUs.
    """
    multiple = int(getattr(net, "multiple", 32))
    h, w = image.shape
    pad = overlap // 2 if pad is None else int(pad)
    tile = max(multiple, (tile // multiple) * multiple)
    # Pad to the stride only: padding a small image up to a whole tile would cost up to 3x the time.
    ph = h + 2 * pad
    pw = w + 2 * pad
    ph += (-ph) % multiple
    pw += (-pw) % multiple
    mode = "reflect" if min(h, w) > max(ph - h, pw - w) else "symmetric"
    padded = np.pad(np.asarray(image, np.float32), ((pad, ph - h - pad), (pad, pw - w - pad)), mode=mode)
    th, ys = tile_layout(ph, tile, overlap, multiple)
    tw, xs = tile_layout(pw, tile, overlap, multiple)
    coords = [(y, x) for y in ys for x in xs]
    window = taper_window((th, tw), overlap)
    variants = [(False, False)] + ([(True, False), (False, True), (True, True)] if flips else [])
    if getattr(net, "takes_numpy", False):
        return _blend_numpy(net, padded, coords, (th, tw), window, variants, batch_size, (pad, h, w))
    return _blend_torch(net, padded, coords, (th, tw), window, variants, batch_size, (pad, h, w), device, bf16)


def _blend_numpy(net, padded: np.ndarray, coords: list, size: tuple[int, int], window: np.ndarray,
                 variants: list, batch_size: int, crop: tuple[int, int, int]) -> np.ndarray:
    """:func:`predict_tiled`'s tiles through a network of numpy arrays (no torch)."""
    th, tw = size
    pad, h, w = crop
    ph, pw = padded.shape
    acc = weight = None
    for i in range(0, len(coords), batch_size):
        chunk = coords[i : i + batch_size]
        x = np.stack([padded[y : y + th, x0 : x0 + tw] for y, x0 in chunk])[:, None]
        x = (x - np.float32(0.5)) / np.float32(0.25)
        probs = None
        for fy, fx in variants:
            axes = tuple(a for a, f in ((2, fy), (3, fx)) if f)
            xi = np.ascontiguousarray(np.flip(x, axes)) if axes else x
            p = net.probabilities(xi)
            p = np.flip(p, axes) if axes else p
            probs = p if probs is None else probs + p
        if len(variants) > 1:
            probs = probs / np.float32(len(variants))
        if len(coords) == 1:  # one tile over the whole padded image: no blending
            return probs[0, :, pad : pad + h, pad : pad + w]
        if acc is None:
            acc = np.zeros((probs.shape[1], ph, pw), np.float32)
            weight = np.zeros((ph, pw), np.float32)
        for (y, x0), p in zip(chunk, probs):
            p *= window
            acc[:, y : y + th, x0 : x0 + tw] += p
            weight[y : y + th, x0 : x0 + tw] += window
    # divided in place: on a 12k x 12k frame a second (3, H, W) map would be 1.7 GB more
    np.maximum(weight, np.finfo(np.float32).tiny, out=weight)
    acc /= weight
    return acc[:, pad : pad + h, pad : pad + w]


def _blend_torch(net, padded: np.ndarray, coords: list, size: tuple[int, int], window: np.ndarray,
                 variants: list, batch_size: int, crop: tuple[int, int, int], device, bf16: bool) -> np.ndarray:
    """:func:`predict_tiled`'s tiles through a torch module."""
    import torch

    th, tw = size
    pad, h, w = crop
    ph, pw = padded.shape
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    window = torch.from_numpy(window).to(dev)
    acc = None
    # One tile over the whole padded image (most figures) needs no blending: its probabilities
    # are the result, and the two (C, H, W) passes of accumulating and dividing are saved.
    weight = None if len(coords) == 1 else torch.zeros((ph, pw), dtype=torch.float32, device=dev)
    src = torch.from_numpy(padded).to(dev)
    use_bf16 = bf16 and dev.type == "cpu"
    with torch.inference_mode():
        for i in range(0, len(coords), batch_size):
            chunk = coords[i : i + batch_size]
            x = torch.stack([src[y : y + th, x0 : x0 + tw] for y, x0 in chunk])[:, None]
            x = ((x - 0.5) / 0.25).contiguous(memory_format=torch.channels_last)
            probs = 0
            for fy, fx in variants:
                xi = x
                dims = [d for d, f in ((2, fy), (3, fx)) if f]
                if dims:
                    xi = torch.flip(xi, dims)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                    logits = net(xi)
                p = output_probabilities(logits)
                if dims:
                    p = torch.flip(p, dims)
                probs = probs + p
            if len(variants) > 1:
                probs = probs / len(variants)
            if weight is None:
                return probs[0, :, pad : pad + h, pad : pad + w].cpu().numpy()
            if acc is None:
                acc = torch.zeros((probs.shape[1], ph, pw), dtype=torch.float32, device=dev)
            for (y, x0), p in zip(chunk, probs):
                acc[:, y : y + th, x0 : x0 + tw].addcmul_(p, window)  # no (C, th, tw) temporary
                weight[y : y + th, x0 : x0 + tw] += window
        # The window's product in a tile's corner is ~1e-8 (where no margin hides it, as with
        # pad=0): only an uncovered pixel (weight 0) may be clamped. Divided in place: on a
        # 12k x 12k frame a second (3, H, W) map would be 1.7 GB more.
        out = acc.div_(weight.clamp_min_(torch.finfo(torch.float32).tiny))[:, pad : pad + h, pad : pad + w]
        return out.cpu().numpy()
