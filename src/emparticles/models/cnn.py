"""Trained networks as model folders, and the segmenter that runs them.

A model folder holds ``config.json`` (architecture, classes, preprocessing, tiling),
``weights.safetensors``, ``thresholds.json`` (post-processing tuned on validation images) and
``MODEL_CARD.md``; the post-processing settings travel with the weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InputError
from ..inference import compute_threads, device_name, predict_tiled
from ..instances import DEFAULT_THRESHOLDS, Instances, instances_with, trim_outlines
from ..preprocess import normalise, normalise_between
from ..types import THREE_CLASS, ProbabilityMap, network_channels

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_THRESHOLDS", "CNNSegmenter", "load_network", "save_model_folder"]


def save_model_folder(net: torch.nn.Module, folder: Path, config: dict, thresholds: dict | None = None,
                      card: str = "") -> Path:
    """Write a model folder (weights as safetensors, never pickles). A config's ``onnx`` entry
    is left out: its graph describes the weights it came with, not these
    (:func:`~emparticles.models.onnx.add_graph_to_folder` writes one for them)."""
    from safetensors.torch import save_file

    from ..io.writers import _write

    config = {k: v for k, v in config.items() if k != "onnx"}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    # each file atomically and with the umask's mode (safetensors alone leaves its file 0o600)
    _write(folder / "weights.safetensors", lambda p: save_file(state, str(p)))
    _write(folder / "config.json", lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    _write(folder / "thresholds.json", lambda p: p.write_text(json.dumps(thresholds or DEFAULT_THRESHOLDS, indent=2) + "\n"))
    if card:
        _write(folder / "MODEL_CARD.md", lambda p: p.write_text(card))
    return folder


def network_outputs(config: dict) -> int:
    """Output maps of a model folder's network: one per name in ``channels`` (the three classes,
    and a distance map in folders trained with one)."""
    return len(config.get("channels") or THREE_CLASS)


def read_model_folder(folder: Path) -> tuple[dict, dict]:
    """A model folder's (config, thresholds), after checking that it is one."""
    folder = Path(folder)
    for name in ("config.json", "weights.safetensors"):
        if not (folder / name).is_file():
            raise InputError(folder, f"is not a model folder (no {name})", "pass a folder written by 'emparticles train'")
    try:
        config = json.loads((folder / "config.json").read_text())
    except ValueError as exc:
        raise InputError(folder, f"model folder cannot be loaded ({exc})", "re-export it with this version of emparticles") from None
    thresholds = dict(DEFAULT_THRESHOLDS)
    if (folder / "thresholds.json").is_file():
        thresholds.update(json.loads((folder / "thresholds.json").read_text()))
    return config, thresholds


def load_network(folder: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict, dict]:
    """Build the folder's architecture and load its weights: (net in eval mode, config, thresholds)."""
    import torch
    from safetensors.torch import load_file

    from ..inference import pick_device
    from .networks import build_network

    folder = Path(folder)
    config, thresholds = read_model_folder(folder)
    try:
        net = build_network(config["arch"], network_outputs(config), float(config.get("local_contrast_px", 0.0)))
        net.load_state_dict(load_file(str(folder / "weights.safetensors")))
    except (KeyError, ValueError, RuntimeError) as exc:
        raise InputError(folder, f"model folder cannot be loaded ({exc})", "re-export it with this version of emparticles") from None
    net.eval().to(memory_format=torch.channels_last)
    return net.to(pick_device(device)), config, thresholds


#: Images over this many pixels are searched on a centred crop of that size (``scale_search``'s
#: ``max_pixels`` overrides it)
SEARCH_CROP_PIXELS = 400_000


class CNNSegmenter:
    """A trained 3-class network with tiled inference and border-aware instance separation."""

    def __init__(self, folder: str | Path, device: str = "auto", flips: bool = False, onnx: bool = True):
        """``onnx``: on CPU, run the folder's ``network.onnx`` with ONNX Runtime when it has one
        exported from its current weights (:mod:`emparticles.models.onnx`); else PyTorch."""
        self.folder = Path(folder)
        self.device = device_name(device)
        self.config, self.thresholds = read_model_folder(self.folder)
        self.net = None
        if onnx and self.device == "cpu":  # the graph, without building the torch network
            from .onnx import onnx_network

            self.net = onnx_network(self.folder, self.config)
        if self.net is None:
            from .networks import prepare_for_inference

            net, self.config, self.thresholds = load_network(self.folder, self.device)
            self.net = prepare_for_inference(net)
            if onnx and self.device == "cpu":  # a graph whose entry does not record the stride
                self.net = onnx_network(self.folder, self.config, int(getattr(net, "multiple", 32))) or self.net
        # a model by its name; a folder of `train` by its path (the name it writes is only the
        # architecture, "strided-unet-slim-3class", the same for every run)
        name = self.config.get("name", "")
        generic = not name or name == f"{self.config.get('arch')}-3class"
        self.model_id = str(self.folder) if generic else name
        self.flips = flips

    #: Median particle diameter (px) the network handles best: with a ``--particle-size`` hint the
    #: image is resampled to bring it there (measured on EMPS validation images: the scale that
    #: gave the best F1 put the median particle at 28-148 px, 57 px weighted by particle count).
    TARGET_ECD_PX = 60.0

    #: Enlarging stops where the resampled image would exceed this many pixels (memory and time of
    #: very large images; shrinking is always allowed).
    MAX_UPSCALED_PIXELS = 16_000_000

    def _allowed_scale(self, pixels: int, limit: int | None = None):
        limit = min(limit or self.MAX_UPSCALED_PIXELS, self.MAX_UPSCALED_PIXELS)
        return lambda scale: scale <= 1.0 or scale * scale * pixels <= limit

    def predict(self, pixels: np.ndarray, scale: float = 1.0) -> ProbabilityMap:
        """Probabilities at the input's size; ``scale`` resamples the image first (e.g. 2.0 to
        enlarge small particles into the range the network was trained on)."""
        probs = self._probabilities(normalise(pixels), scale)
        if probs.shape[1:] != pixels.shape:
            full = np.empty((len(probs), *pixels.shape), np.float32)
            for c, p in enumerate(probs):
                full[c] = _resize(p, pixels.shape)
            probs = full
        return ProbabilityMap(probs, network_channels(len(probs)), self.model_id)

    def _probabilities(self, img: np.ndarray, scale: float) -> np.ndarray:
        """(C, h, w) float32 probabilities of a normalised image resampled by ``scale``."""
        scale = scale * self.input_scale
        if scale != 1.0:
            img = _resize(img, scale)
        probs = predict_tiled(self.net, img, tile=int(self.config.get("tile", 1024)),
                              overlap=int(self.config.get("overlap", 64)), pad=self.config.get("pad"), device=self.device,
                              bf16=bool(self.config.get("bf16", False)), flips=self.flips)
        return probs.astype(np.float32, copy=False)

    def instances(self, prob: ProbabilityMap) -> Instances:
        return instances_with(prob, self.thresholds)

    def probabilities_at(self, img: np.ndarray, scale: float) -> ProbabilityMap:
        """The probabilities of a normalised (H, W) image resampled by ``scale``, at that size."""
        probs = self._probabilities(img, scale)
        return ProbabilityMap(probs, network_channels(len(probs)), self.model_id)

    def at_scale(self, img: np.ndarray, scale: float) -> tuple[Instances, ProbabilityMap]:
        """Instances and probabilities of a normalised (H, W) image segmented after resampling by
        ``scale``, both at the resampled size (the post-processing thresholds, in pixels, apply
        where the network worked)."""
        prob = self.probabilities_at(img, scale)
        return self.instances(prob), prob

    def choose_scale(self, img: np.ndarray, limits: tuple[float, float] | None = None,
                     whole_at_1: ProbabilityMap | None = None
                     ) -> tuple[float, dict[float, tuple[Instances, ProbabilityMap]]]:
        """Pick the resampling of a normalised image at which the network is most confident.

        Each tried scale is scored by the mean score of its particles (their mean foreground
        probability), less ``shrink_penalty`` x -ln(scale) below scale 1: a network that sees
        particles too small merges them, one that sees them too large breaks them into fragments
        along texture, and both give weak, uncertain particles.
        The search (``config["scale_search"]``) tries the ``start`` scales, then climbs ``up`` (if
        the largest start scale won) or ``down`` while the score improves; with
        ``max_enlarged_ecd_px`` it does not enlarge particles beyond that median diameter. On EMPS validation
        images this lifted F1 at IoU 0.5 from 0.725 (scale 1 only) to 0.867 (best single-scale
        oracle per image: 0.893). Images over ``max_pixels`` choose on a centred crop of that size.
        Returns the chosen scale and the results of the tried scales (on the crop if one was used).
        ``limits``: ``img`` holds raw grey values, normalised between these after cropping.
        ``whole_at_1``: the probabilities of the whole (normalised) image at scale 1, already
        computed; scale 1 is then scored on their crop instead of a pass of its own.
        """
        search = self.config.get("scale_search") or {}
        max_pixels = int(search.get("max_pixels", SEARCH_CROP_PIXELS))
        h, w = img.shape
        # Enlarging multiplies the work by the scale squared: the search enlarges only images that
        # stay under max_upscaled_pixels (an EMPS figure of 0.35 MP up to 2x; a 1280x960 SEM frame
        # not at all, which keeps its analysis near one pass); --particle-size may go further.
        allowed = self._allowed_scale(h * w, int(search.get("max_upscaled_pixels", 2_000_000)))
        tried: dict[float, tuple[Instances, ProbabilityMap]] = {}
        if h * w > max_pixels:
            ch = min(h, int(round((max_pixels * h / w) ** 0.5)))
            cw = min(w, max_pixels // max(ch, 1))
            y0, x0 = (h - ch) // 2, (w - cw) // 2
            img = img[y0:y0 + ch, x0:x0 + cw]
            if whole_at_1 is not None:
                window = ProbabilityMap(whole_at_1.probabilities[:, y0:y0 + ch, x0:x0 + cw], whole_at_1.channels,
                                        whole_at_1.model_id)
                tried[1.0] = self.instances(window), window
        if limits is not None:
            img = normalise_between(img, *limits)

        # Shrinking must earn its keep: it throws pixels away, so a shrunk scale's score loses
        # shrink_penalty per unit of -ln(scale) and wins over the image as it is only by a clear
        # margin (measured with v6 on JEOL silica frame B04-1: spheres of 70-140 px scored 0.962 at
        # 0.5 against 0.948 at 1 and were shrunk to half; F1 0.932 at 0.5, 0.955 at 0.7, 0.920 at
        # 1). Enlarging is not
        # penalised: it loses nothing, and small EMPS particles measured at scale 1 instead of
        # 1.4-2 came out larger (a symmetric penalty took the EMPS test D50 error from +6.4% to
        # +12.6%).
        penalty = float(search.get("shrink_penalty", 0.0))

        def score(scale: float) -> float:
            if scale not in tried:
                tried[scale] = self.at_scale(img, scale)
            sc = tried[scale][0].scores
            return (float(sc.mean()) if sc.size else 0.0) + penalty * min(0.0, float(np.log(scale)))

        def rank(scale: float) -> tuple[float, float]:
            # equal scores (nothing found at any scale, most often) leave the image as it is
            return score(scale), -abs(np.log(scale))

        # Enlarging stops where the particles found at the current scale would come out larger
        # than max_enlarged_ecd_px (median equivalent diameter, px): their outlines are already
        # resolved, and enlarging only costs time (measured on EMPS validation images with v5:
        # a cap of 120 px took the median search from 0.50 s to 0.23 s at the same F1).
        cap = search.get("max_enlarged_ecd_px")

        def worth_enlarging(scale: float, step: float) -> bool:
            if cap is None:
                return True
            ecd = median_ecd_px(tried[scale][0].labels) if scale in tried else 0.0
            return ecd * step / scale <= float(cap)

        def climb(scale: float, steps: list[float]) -> float:
            for step in steps:
                if step > scale and not worth_enlarging(scale, step):
                    break
                if score(step) <= score(scale):
                    break
                scale = step
            return scale

        start = [float(v) for v in search.get("start", [1.0]) if allowed(float(v))] or [1.0]
        best = max(start, key=rank)
        # Start scales that score within `tie` of the best also climb: which way to go must not
        # hang on a difference in the fourth decimal (measured: an EMPS image of 497 particles
        # went down to 8 or up to 515 on a 0.0003 difference between 0.7 and 1).
        tie = float(search.get("tie", 0.0))
        candidates = [best]
        if score(max(start)) >= score(best) - tie and (best == max(start) or tie > 0):
            candidates.append(climb(max(start), [float(v) for v in search.get("up", []) if allowed(float(v))]))
        if score(min(start)) >= score(best) - tie and (best == min(start) or tie > 0):
            candidates.append(climb(min(start), [float(v) for v in search.get("down", [])]))
        return max(candidates, key=rank), tried

    def searched(self, img: np.ndarray, network_done: Callable[[], None] | None = None
                 ) -> tuple[float, Instances, ProbabilityMap]:
        """The chosen scale of a normalised image and its instances and probabilities over the
        whole image, at the resampled size (reused from the search unless it ran on a crop).

        An image large enough to be searched on a crop is first segmented whole at scale 1, and
        the search scores scale 1 on the crop of that result: with the shrink penalty 31 of 35
        1280x960 silica and agglomerate frames keep scale 1, so the crop's own pass at scale 1
        is saved on most frames and an extra whole pass is spent on the others.

        ``network_done``: called once the network's last pass is over, before the whole image's
        instance separation (one thread), where the search ran on a crop; at the start where it
        runs on the whole image, whose passes and separations take turns: see :meth:`segment`."""
        search = self.config.get("scale_search") or {}
        if img.size > int(search.get("max_pixels", SEARCH_CROP_PIXELS)) and 1.0 in search.get("start", [1.0]):
            whole = self.probabilities_at(img, 1.0)
            if network_done is None and compute_threads() >= 2:
                # Nothing waits for the network to finish: the whole field's instance separation
                # (one thread) runs beside the search, whose crops' separations and network pass
                # would otherwise leave a core idle while it ran (1280x880 field: 0.77 -> 0.66 s
                # for the search and segmentation, same labels).
                with ThreadPoolExecutor(max_workers=1) as pool:
                    separating = pool.submit(self.instances, whole)
                    scale, _ = self.choose_scale(img, whole_at_1=whole)
                    whole_instances = separating.result()
                if scale == 1.0:
                    return 1.0, whole_instances, whole
                return scale, *self.at_scale(img, scale)
            scale, _ = self.choose_scale(img, whole_at_1=whole)
            prob = whole if scale == 1.0 else self.probabilities_at(img, scale)
            _call(network_done)
            return scale, self.instances(prob), prob
        # Searched on the whole image, each scale's pass is followed by its separation on one
        # thread: a caller's own work fills those gaps better than it waits for the end (11 EMPS
        # figures analysed, the scale bar read beside the search against after it: 7.46 s
        # against 7.97 s).
        _call(network_done)
        scale, tried = self.choose_scale(img)
        if tried[scale][0].labels.shape == _scaled_shape(img.shape, scale):
            return scale, *tried[scale]
        return scale, *self.at_scale(img, scale)

    def segment(self, pixels: np.ndarray, particle_size_px: float | None = None,
                network_done: Callable[[], None] | None = None) -> tuple[Instances, ProbabilityMap]:
        """Segment at the scale where particles look like the training data.

        With ``particle_size_px`` (a typical diameter given by the user) the image is resampled
        once to bring it to :attr:`TARGET_ECD_PX`. Otherwise, if the model's config has a
        ``scale_search``, :meth:`choose_scale` picks the resampling; else the image is segmented
        as it is. Labels come back at the input's size (nearest-neighbour), numbered 1..N; with an
        ``outline_threshold`` in the thresholds, outlines are then cut on the full-size
        probabilities (:func:`~emparticles.instances.trim_outlines`).

        ``network_done``: called once the network's passes are over and what is left (instance
        separation, outlines) runs on one thread: a caller with single-threaded work of its own
        (the scale bar's OCR) starts it then, on the core that frees, rather than beside the
        network, whose threads it would slow. A search on the whole image (a small one) calls it
        at the start: its passes and their separations take turns, and the caller's work fills
        the turns. Called in any case, a failure included.
        """
        return self.segment_normalised(normalise(pixels), particle_size_px, network_done=network_done)

    def hinted_scale(self, pixels: int, particle_size_px: float) -> float:
        """The resampling that brings a typical diameter of ``particle_size_px`` to
        :attr:`TARGET_ECD_PX`, in an image of ``pixels`` pixels (enlarging within
        :attr:`MAX_UPSCALED_PIXELS`). The network sees that size whatever the config's
        ``input_scale``: the scale returned is relative to it, as every scale given to
        :meth:`at_scale` is."""
        scale = float(np.clip(self.TARGET_ECD_PX / particle_size_px, 0.25, 4.0))
        if not self._allowed_scale(pixels)(scale):
            scale = max(1.0, (self.MAX_UPSCALED_PIXELS / pixels) ** 0.5)
        return scale / self.input_scale

    @property
    def input_scale(self) -> float:
        """The resampling the config asks for before the network (``"input_scale"``, default 1):
        every scale of :meth:`at_scale` and of the scale search is relative to it."""
        return float(self.config.get("input_scale", 1.0))

    def scale_for(self, img: np.ndarray, particle_size_px: float | None = None,
                  limits: tuple[float, float] | None = None) -> float:
        """The resampling :meth:`segment_normalised` would apply to the image ``img``: normalised,
        or raw grey values that ``limits`` (:func:`~emparticles.preprocess.normalisation_limits`)
        normalise (for segmenting a large frame in blocks at one scale: :mod:`emparticles.blocks`)."""
        if particle_size_px:
            return self.hinted_scale(img.size, particle_size_px)
        if self.config.get("scale_search"):
            return self.choose_scale(img, limits)[0]
        return 1.0

    def segment_normalised(self, img: np.ndarray, particle_size_px: float | None = None,
                           scale: float | None = None, network_done: Callable[[], None] | None = None
                           ) -> tuple[Instances, ProbabilityMap]:
        """:meth:`segment` of an image already normalised to [0, 1] (as training loads them);
        ``scale``, when given, is used instead of the hint or the search."""
        done = _once(network_done)
        try:
            if self.config.get("scale_search") and scale is None and not particle_size_px:
                # without a caller waiting, the search may keep a core busy beside the network
                _, inst, prob = self.searched(img, done if network_done is not None else None)
            else:
                if scale is None:
                    scale = self.hinted_scale(img.size, particle_size_px) if particle_size_px else 1.0
                prob = self.probabilities_at(img, float(scale))
                done()
                inst = self.instances(prob)
        finally:
            done()  # after a failure too: a caller waiting for it must not wait for ever
        if inst.labels.shape != img.shape:
            inst = _instances_to_shape(inst, img.shape)
            full = np.empty((len(prob.channels), *img.shape), np.float32)  # one channel at a time: no
            for c, p in enumerate(prob.probabilities):                       # second copy of a large map
                full[c] = _resize(p, img.shape)
            prob = ProbabilityMap(full, prob.channels, prob.model_id)
        outline = self.thresholds.get("outline_threshold")
        if outline is not None:
            inst = trim_outlines(inst, prob.foreground, float(outline))
        return inst, prob


def _call(done: Callable[[], None] | None) -> None:
    if done is not None:
        done()


def _once(done: Callable[[], None] | None) -> Callable[[], None]:
    """``done`` made to run at most once (nothing if None)."""
    called = False

    def once() -> None:
        nonlocal called
        if not called:
            called = True
            _call(done)

    return once


def median_ecd_px(labels: np.ndarray) -> float:
    """Median equivalent circular diameter (px) of the particles of an (H, W) label image; 0
    without particles."""
    areas = np.bincount(labels.ravel())[1:]
    areas = areas[areas > 0]
    return float(np.median(np.sqrt(4.0 / np.pi * areas))) if areas.size else 0.0


def _scaled_shape(shape: tuple[int, int], scale: float) -> tuple[int, int]:
    """Size of an (H, W) image resampled by ``scale`` (as :func:`_resize` makes it)."""
    scale = float(scale)
    return (max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale)))


def _instances_to_shape(inst: Instances, shape: tuple[int, int]) -> Instances:
    """Instances resampled to ``shape`` by nearest neighbour; particles that vanish (smaller than
    a pixel at the new size) are dropped, the rest renumbered 1..N with their scores."""
    import cv2

    from ..types import relabel_consecutive

    old = cv2.resize(inst.labels.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST).astype(np.int32)
    new = relabel_consecutive(old)
    old_of_new = np.zeros(int(new.max()) + 1, np.int64)
    old_of_new[new.ravel()] = old.ravel()
    return Instances(new, inst.scores[old_of_new[1:] - 1].astype(np.float32))


def _resize(img: np.ndarray, scale_or_shape) -> np.ndarray:
    """Bilinear resampling (pixel centres aligned) of a float (H, W) image to a scale or shape."""
    import cv2

    shape = scale_or_shape if isinstance(scale_or_shape, tuple) else _scaled_shape(img.shape, scale_or_shape)
    return cv2.resize(np.asarray(img, np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
