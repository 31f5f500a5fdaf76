"""Mask R-CNN (torchvision) for particles: one input channel, small anchors, many detections,
a finer mask head, and tiled inference whose instances are merged across tile seams.

Settings follow the published particle work: anchors of 8-96 px with aspect ratios 0.5/1/2;
up to 3000 detections per image (RPN keeps 5000 proposals before and 3000 after NMS at 0.2);
detection NMS 0.3 and a minimum score of 0.5 at inference; the mask head upsamples once more
(56x56 masks instead of 28x28); FPN levels are assigned with canonical scale 128 at level 3 so
that small particles are pooled from the fine levels. Images are never resized inside the
model: particles keep the size in pixels they have in the micrograph.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..inference import pick_device
from ..instances import Instances, drop_instances
from ..preprocess import normalise
from ..types import TWO_CLASS, ProbabilityMap, relabel_consecutive

#: name -> (ResNet depth, FPN/head width, box-head MLP width, description)
MASKRCNN_ARCHITECTURES = {
    "maskrcnn-resnet50-fpn": ("resnet50", 256, 1024, "Mask R-CNN, ResNet-50 FPN (torchvision), 44 M parameters; train on a GPU"),
    "maskrcnn-resnet18-fpn": ("resnet18", 128, 512, "Mask R-CNN, ResNet-18 FPN of width 128, 16 M parameters; lighter"),
}
ANCHOR_SIZES = (8, 16, 32, 64, 96)


class FinerMaskPredictor(nn.Sequential):
    """torchvision's mask predictor with one more 2x transposed convolution: 14x14 RoI features
    become 56x56 mask logits (the loss adapts to the logits' size)."""

    def __init__(self, in_channels: int = 256, dim: int = 256, classes: int = 2):
        super().__init__(
            nn.ConvTranspose2d(in_channels, dim, 2, 2), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(dim, dim, 2, 2), nn.ReLU(inplace=True),
            nn.Conv2d(dim, classes, 1),
        )


def _no_resize(image, target=None):
    return image, target


def build_maskrcnn(arch: str = "maskrcnn-resnet18-fpn", detections: int = 3000, score_threshold: float = 0.5):
    """A randomly initialised particle Mask R-CNN (2 classes: background, particle).

    Input: a list of (1, H, W) float tensors in [0, 1] (robustly normalised micrographs).
    """
    import torchvision
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
    from torchvision.ops import MultiScaleRoIAlign
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    try:
        depth, width, mlp, _ = MASKRCNN_ARCHITECTURES[arch]
    except KeyError:
        raise KeyError(f"unknown architecture '{arch}'; valid: {', '.join(MASKRCNN_ARCHITECTURES)}") from None
    body = getattr(torchvision.models, depth)(weights=None)
    body.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    in_channels = [64, 128, 256, 512] if depth in ("resnet18", "resnet34") else [256, 512, 1024, 2048]
    backbone = BackboneWithFPN(body, {f"layer{i}": str(i - 1) for i in range(1, 5)}, in_channels, width,
                               extra_blocks=LastLevelMaxPool())
    levels = ["0", "1", "2", "3"]
    model = MaskRCNN(
        backbone, num_classes=None, image_mean=[0.5], image_std=[0.25],
        rpn_anchor_generator=AnchorGenerator(tuple((s,) for s in ANCHOR_SIZES), ((0.5, 1.0, 2.0),) * len(ANCHOR_SIZES)),
        rpn_pre_nms_top_n_train=5000, rpn_post_nms_top_n_train=3000,
        rpn_pre_nms_top_n_test=5000, rpn_post_nms_top_n_test=3000, rpn_nms_thresh=0.2,
        box_roi_pool=MultiScaleRoIAlign(levels, 7, 2, canonical_scale=128, canonical_level=3),
        box_head=TwoMLPHead(width * 7 * 7, mlp), box_predictor=FastRCNNPredictor(mlp, 2),
        mask_roi_pool=MultiScaleRoIAlign(levels, 14, 2, canonical_scale=128, canonical_level=3),
        mask_head=MaskRCNNHeads(width, (width,) * 4, 1),
        mask_predictor=FinerMaskPredictor(width, width, 2),
        box_detections_per_img=detections, box_nms_thresh=0.3, box_score_thresh=score_threshold,
    )
    model.transform.resize = _no_resize  # keep particles at their size in pixels
    return model


def instance_targets(labels: np.ndarray, min_px: int = 4) -> dict[str, torch.Tensor]:
    """Mask R-CNN targets from (H, W) instance labels: boxes (N, 4) x0, y0, x1, y1 in px
    (exclusive ends), labels (N,) all 1, masks (N, H, W) uint8. Particles under ``min_px`` are left out."""
    from scipy import ndimage as ndi

    boxes, masks = [], []
    for lab, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        m = labels == lab
        if m.sum() < min_px:
            continue
        boxes.append([sl[1].start, sl[0].start, sl[1].stop, sl[0].stop])
        masks.append(m)
    h, w = labels.shape
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.ones(len(boxes), dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks).astype(np.uint8)) if masks else torch.zeros((0, h, w), dtype=torch.uint8)}


def _tile_origins(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile, step)) + [length - tile]
    return sorted(set(starts))


def merge_detections(shape: tuple[int, int], detections: list[tuple[np.ndarray, np.ndarray, tuple[int, int]]],
                     mask_threshold: float = 0.5, min_visible: float = 0.5, min_px: int = 9) -> Instances:
    """Paint detections from all tiles into one label image, best score first.

    ``detections`` holds, per tile, (masks (N, h, w) float probabilities, scores (N,), (y0, x0)
    of the tile). A pixel belongs to the first (highest-scoring) instance that claims it; an
    instance keeping less than ``min_visible`` of its mask (a duplicate from an overlapping tile,
    or a detection mostly inside a better one) or fewer than ``min_px`` pixels is dropped.
    """
    labels = np.zeros(shape, np.int32)
    items = []
    for masks, scores, (y0, x0) in detections:
        for m, s in zip(masks, scores):
            items.append((float(s), m, y0, x0))
    items.sort(key=lambda t: -t[0])
    kept_scores = []
    for s, m, y0, x0 in items:
        binary = m >= mask_threshold
        area = int(binary.sum())
        if area < min_px:
            continue
        h, w = binary.shape
        region = labels[y0 : y0 + h, x0 : x0 + w]
        free = binary & (region == 0)
        if free.sum() < max(min_visible * area, min_px):
            continue
        kept_scores.append(s)
        region[free] = len(kept_scores)
    if not kept_scores:
        return Instances(labels, np.zeros(0, np.float32))
    # number in raster order, carrying the scores along
    order = relabel_consecutive(labels)
    old_for_new = np.zeros(int(order.max()) + 1, np.int64)
    old_for_new[order.ravel()] = labels.ravel()
    scores = np.asarray(kept_scores, np.float32)[old_for_new[1:] - 1]
    return Instances(order, scores)


#: Smallest contrast a Mask R-CNN particle keeps (see :func:`low_contrast`). Measured with the
#: GPU-trained maskrcnn-resnet18-fpn on the 58 EMPS validation images: detections lying on the
#: background (under 10% of their pixels on true particles, 362 of them, up to 130,000 px, scores
#: up to 0.93, which no score threshold separates) had a median contrast of 0.33 against 1.37 for
#: those on particles; 0.2 removed 69% of their pixels for 3% of the detections on particles.
MIN_CONTRAST = 0.2


def low_contrast(labels: np.ndarray, image: np.ndarray, min_contrast: float, ring_px: int = 6) -> np.ndarray:
    """(N + 1,) bool, True for the particles of (H, W) ``labels`` (1..N) whose mean grey level in
    the normalised (H, W) ``image`` differs from the mean of the background ring around them (the
    pixels within ``ring_px`` outside the particle that belong to no particle) by less than
    ``min_contrast`` times the image's standard deviation. Particles with fewer than 10 ring
    pixels (inside dense agglomerates) are never flagged; index 0 is False."""
    from ..instances import contrast_to_surroundings

    spread = float(np.std(image))
    if spread == 0:
        return np.zeros(int(labels.max(initial=0)) + 1, bool)
    with np.errstate(invalid="ignore"):
        return np.abs(contrast_to_surroundings(labels, image, ring_px)) < min_contrast * spread


class MaskRCNNSegmenter:
    """A trained particle Mask R-CNN with tiled inference (tiles of ``tile`` px overlapping by
    ``overlap`` px; instances merged across seams by score)."""

    def __init__(self, folder: str | Path, device: str = "auto"):
        from safetensors.torch import load_file

        self.folder = Path(folder)
        self.device = pick_device(device)
        try:
            self.config = json.loads((self.folder / "config.json").read_text())
            self.net = build_maskrcnn(self.config["arch"], int(self.config.get("detections", 3000)),
                                      float(self.config.get("score_threshold", 0.5)))
            self.net.load_state_dict(load_file(str(self.folder / "weights.safetensors")))
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            raise InputError(self.folder, f"Mask R-CNN folder cannot be loaded ({exc})", "re-export it with this version of emparticles") from None
        self.net.eval().to(self.device)
        self.model_id = self.config.get("name", self.folder.name)

    @torch.inference_mode()
    def detect(self, pixels: np.ndarray) -> Instances:
        """Particles of an (H, W) grey image: overlapping tiles, detections merged by score, then
        those no different in grey level from the background around them dropped
        (``config["min_contrast"]``, default :data:`MIN_CONTRAST`; 0 keeps every detection)."""
        img = normalise(pixels)
        h, w = img.shape
        tile, overlap = int(self.config.get("tile", 512)), int(self.config.get("overlap", 96))
        found = []
        for y0 in _tile_origins(h, tile, overlap):
            for x0 in _tile_origins(w, tile, overlap):
                crop = img[y0 : y0 + tile, x0 : x0 + tile]
                out = self.net([torch.from_numpy(np.ascontiguousarray(crop))[None].to(self.device)])[0]
                found.append((out["masks"][:, 0].float().cpu().numpy(), out["scores"].float().cpu().numpy(), (y0, x0)))
        inst = merge_detections((h, w), found, float(self.config.get("mask_threshold", 0.5)))
        min_contrast = float(self.config.get("min_contrast", MIN_CONTRAST))
        if min_contrast > 0 and inst.scores.size:
            inst = drop_instances(inst, low_contrast(inst.labels, img, min_contrast))
        return inst

    def segment(self, pixels: np.ndarray, particle_size_px: float | None = None) -> tuple[Instances, ProbabilityMap]:
        """Instances and their foreground map. ``particle_size_px`` is not used: the anchors
        (8-96 px) cover the size range, and the image is never resampled."""
        inst = self.detect(pixels)
        fg = (inst.labels > 0).astype(np.float32)
        return inst, ProbabilityMap(np.stack([1 - fg, fg]), TWO_CLASS, self.model_id)

    def predict(self, pixels: np.ndarray) -> ProbabilityMap:
        """Foreground map of the merged instances (Mask R-CNN has no dense class map)."""
        return self.segment(pixels)[1]
