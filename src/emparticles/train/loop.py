"""The training loop: random augmented crops, weighted cross-entropy + Dice, AdamW with cosine
annealing, bf16 on CPU (CUDA when present), validation on instance F1 every epoch, best model kept,
resumable from its checkpoint."""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from ..evaluate import matching
from ..inference import pick_device, predict_tiled
from ..instances import DEFAULT_THRESHOLDS, instances_with, trim_outlines
from ..models.cnn import save_model_folder
from ..models.networks import build_network
from ..types import ProbabilityMap, network_channels
from .data import (
    BatchWorkers,
    PasteSource,
    SharedPairs,
    TimedBatches,
    augmented_sample,
    augmenter,
    epoch_batches,
    find_pairs,
    load_pair,
    split_pairs,
    training_sources,
)
from .lock import run_folder_lock
from .targets import FOREGROUND_ONLY, class_weights, distance_target, three_class_target


@dataclass
class TrainConfig:
    """Settings of a training run; saved with the model."""

    arch: str = "strided-unet"
    epochs: int = 40
    steps_per_epoch: int = 100
    batch_size: int = 8
    crop: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    border_width: int = 2
    dice_weight: float = 1.0
    class_weighting: str = "border"  # "border" (background = particle) or "tempered" (all classes)
    val_fraction: float = 0.15  # share of images (whole sources) that choose the epoch and settings
    test_fraction: float = 0.15  # share of images (whole sources) left out of training and of every choice
    scale_min: float = 0.5
    scale_max: float = 2.0
    seed: int = 0
    device: str = "auto"
    bf16: bool = False
    # Largest tile side at inference (px): a 1280x960 or 1536x1024 frame with its mirrored
    # context is one tile (measured with v6 on a 1280x880 field: 0.34 s for one tile, 0.37-0.39
    # s for two of 1024 px, which also need blending; test figures the same within a particle)
    tile: int = 1600
    overlap: int = 64
    # Mirrored context at the image's borders at inference (px); None: overlap // 2. Which is
    # better depends on the model: on EMPS validation images v3 and v4 (trained with synthetic
    # and pasted crops) scored F1 +0.02 and +0.01 without a margin, v1 (EMPS only) -0.02. Set it
    # in the model folder's config.json ("pad") after measuring.
    pad: int | None = None
    init_from: str = ""  # model folder whose weights start the training (fine-tuning)
    extra_images: str = ""  # a second annotated set used for training only (e.g. synthetic SEM)
    extra_masks: str = ""
    extra_fraction: float = 0.3  # share of training crops drawn from the extra set
    paste_fraction: float = 0.0  # share of crops made by pasting training agglomerates on empty backgrounds
    focus_fraction: float = 0.0  # share of crops placed to hold an annotated pixel (data.augmenter)
    scale_search: bool = True  # the model chooses its resampling per image (SCALE_SEARCH)
    average_epochs: int = 0  # >0: the model is the mean of the weights after each of the last N epochs
    local_contrast_px: float = 0.0  # >0: local contrast normalisation of this sigma (px) before the network
    workers: int = 0  # processes that build the augmented batches (0: the training process itself)
    # More annotated real sets, each {"images": DIR, "masks": DIR, "share": 0.2, "kind": "instances"}
    # ("foreground" for agglomerate-level masks: learnt as particle vs substrate, separation left
    # out). Each is split by source like the main set; its training part gives "share" of the crops.
    real_sets: list = field(default_factory=list)
    # A fourth output: each pixel's distance to its particle's outline relative to the particle's
    # largest (targets.distance_target), learnt beside the classes; its seeds then part touching
    # particles (thresholds "seeds": "distance").
    distance_head: bool = False
    distance_weight: float = 1.0


#: Resampling search saved with trained models (see ``CNNSegmenter.choose_scale``): tried on EMPS
#: validation images, this climb tries 1.7 to 3.5 times the work of one pass at scale 1 (median
#: 2.6) and reached F1 0.867, against 0.863 for always trying all five scales (7.7 times the work).
#: Not enlarging particles beyond 120 px (twice ``CNNSegmenter.TARGET_ECD_PX``) halved the median
#: search time of v5 on those images at the same F1 (0.924). A shrunk scale must beat scale 1 by
#: 0.02 per unit of -ln(scale) (``shrink_penalty``, chosen on the validation parts with v6: JEOL
#: silica test F1 0.919 -> 0.932, EMPS unchanged).
SCALE_SEARCH = {"start": [0.7, 1.0], "up": [1.4, 2.0], "down": [0.5], "tie": 0.005, "max_pixels": 400_000,
                "max_upscaled_pixels": 2_000_000, "max_enlarged_ecd_px": 120, "shrink_penalty": 0.02}


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss averaged over the foreground (particle + border) and the border map; the
    border map leaves out pixels whose class is unknown (:data:`~.targets.FOREGROUND_ONLY`)."""
    p = F.softmax(logits.float(), dim=1)
    fg_p = p[:, 1] + p[:, 2]
    fg_t = (target > 0).float()
    known = (target != FOREGROUND_ONLY).float()
    br_p, br_t = p[:, 2] * known, (target == 2).float()
    loss = 0.0
    for a, b in ((fg_p, fg_t), (br_p, br_t)):
        inter = (a * b).sum()
        loss = loss + 1 - (2 * inter + 1) / (a.sum() + b.sum() + 1)
    return loss / 2


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                      dice_weight: float = 1.0, distance_weight: float = 1.0) -> torch.Tensor:
    """Weighted cross-entropy over the three classes plus ``dice_weight`` x :func:`dice_loss`.
    Pixels of agglomerate-level masks (:data:`~.targets.FOREGROUND_ONLY`: particle or border, not
    known which) leave the cross-entropy and count instead by the log-probability of particle +
    border, so they teach what is particle and what is substrate without teaching where
    particles part. A fourth output channel adds ``distance_weight`` x :func:`distance_loss`."""
    logits = logits.float()
    if logits.shape[1] > 3:
        return (segmentation_loss(logits[:, :3], target, weights, dice_weight)
                + distance_weight * distance_loss(logits[:, 3], target))
    loss = F.cross_entropy(logits, target, weight=weights, ignore_index=FOREGROUND_ONLY)
    unknown = target == FOREGROUND_ONLY
    if bool(unknown.any()):
        log_fg = torch.logsumexp(F.log_softmax(logits, dim=1)[:, 1:], dim=1)
        loss = loss - log_fg[unknown].mean() * unknown.float().mean()
    return loss + dice_weight * dice_loss(logits, target)


def distance_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of a (B, H, W) distance logit against
    :func:`~.targets.distance_target` of each class target, over the pixels whose class is known
    (agglomerate-level masks do not say where particles part, so they give no distances)."""
    classes = target.detach().cpu().numpy()
    wanted = torch.from_numpy(np.stack([distance_target(t) for t in classes])).to(logits.device)
    known = target != FOREGROUND_ONLY
    loss = F.binary_cross_entropy_with_logits(logits.float(), wanted, reduction="none")
    return loss[known].mean() if bool(known.any()) else loss.sum() * 0.0


def load_matching_weights(net: torch.nn.Module, state: dict) -> list[str]:
    """Load ``state`` into ``net``; a tensor whose first dimension is smaller than the network's
    (a 3-class head into a network with a distance output) fills the leading rows, the rest
    keeping their random initialisation. Returns the names of the tensors filled in part."""
    own = net.state_dict()
    if own and all(k.startswith("body.") for k in own) and not any(k.startswith("body.") for k in state):
        # a network without the local contrast stage starts one with it: the same weights
        state = {"body." + k: v for k, v in state.items()}
    filled = []
    for name, value in state.items():
        if name in own and own[name].shape != value.shape:
            if own[name].shape[1:] != value.shape[1:] or own[name].shape[0] < value.shape[0]:
                raise ValueError(f"{name}: shape {tuple(value.shape)} does not fit {tuple(own[name].shape)}")
            merged = own[name].clone()
            merged[: value.shape[0]] = value
            state = {**state, name: merged}
            filled.append(name)
    net.load_state_dict(state)
    return filled


def pooled_figures(pairs) -> dict:
    """Pooled F1 and panoptic quality at IoU 0.5, precision, recall, count ratio and foreground
    IoU over (true labels, predicted labels) pairs, with the pooled counts (matched, true,
    predicted)."""
    tp = n_true = n_pred = inter = union = 0
    matched_iou = 0.0
    for labels, predicted in pairs:
        m = matching(labels, predicted, 0.5)
        tp, n_true, n_pred = tp + m.tp, n_true + m.n_true, n_pred + m.n_pred
        matched_iou += m.mean_matched_iou * m.tp
        fg_t, fg_p = labels != 0, predicted > 0  # labels < 0: agglomerate-level foreground
        inter += int((fg_t & fg_p).sum())
        union += int((fg_t | fg_p).sum())
    return {"f1": 2 * tp / (n_true + n_pred) if n_true + n_pred else 1.0,
            "precision": tp / n_pred if n_pred else 0.0, "recall": tp / n_true if n_true else 0.0,
            "count_ratio": n_pred / n_true if n_true else math.nan, "foreground_iou": inter / union if union else 1.0,
            "panoptic_quality": 2 * matched_iou / (n_true + n_pred) if n_true + n_pred else 1.0,
            "matched": tp, "true": n_true, "predicted": n_pred}


def validate(net, val_data, cfg: TrainConfig, device, thresholds=None) -> dict:
    """:func:`pooled_figures` of the network at scale 1 on the validation images, and their
    probability maps (``_probs``) for tuning."""
    net.eval()
    t = thresholds or DEFAULT_THRESHOLDS
    probs = [predict_tiled(net, img, tile=cfg.tile, overlap=cfg.overlap, device=device, bf16=cfg.bf16, pad=cfg.pad)
             for img, _ in val_data]
    figures = pooled_figures((labels, instances_with(ProbabilityMap(p, network_channels(len(p)), "val"), t).labels)
                             for p, (_, labels) in zip(probs, val_data))
    return {**figures, "_probs": probs}


def foreground_figures(pairs) -> dict:
    """Foreground IoU and the share of the predicted foreground that lies on true background
    (``foreground_on_background``) pooled over (true labels, predicted labels) pairs; true
    labels may be agglomerate-level (any non-zero value is foreground)."""
    inter = union = pred = 0
    for labels, predicted in pairs:
        fg_t, fg_p = labels != 0, predicted > 0
        inter += int((fg_t & fg_p).sum())
        union += int((fg_t | fg_p).sum())
        pred += int(fg_p.sum())
    return {"foreground_iou": inter / union if union else 1.0,
            "foreground_on_background": (pred - inter) / pred if pred else 0.0}


def figures_line(fig: dict) -> str:
    """One set's validation figures in a few words."""
    if "f1" in fig:
        return f"F1 {fig['f1']:.3f} IoU {fig['foreground_iou']:.3f} count {fig['count_ratio']:.2f}"
    return f"IoU {fig['foreground_iou']:.3f} on bare substrate {fig['foreground_on_background']:.0%}"


def validate_sets(net, val_sets: dict, cfg: TrainConfig, device, thresholds=None) -> dict:
    """Validation on several sets at once: ``val_sets`` maps a name to (kind, pairs). Instance
    sets give :func:`pooled_figures`, agglomerate-level ones :func:`foreground_figures`. The
    ``score`` that chooses the best epoch is the mean over the sets of F1 (instances) or
    foreground IoU (agglomerates), so that no set is traded for another; ``f1``,
    ``foreground_iou`` and ``count_ratio`` are those of the first set."""
    net.eval()
    t = thresholds or DEFAULT_THRESHOLDS
    sets, scores = {}, []
    for name, (kind, data) in val_sets.items():
        if not data:
            continue
        maps = (predict_tiled(net, img, tile=cfg.tile, overlap=cfg.overlap, device=device, bf16=cfg.bf16, pad=cfg.pad)
                for img, _ in data)
        predicted = [instances_with(ProbabilityMap(p, network_channels(len(p)), "val"), t).labels for p in maps]
        pairs = [(labels, pred) for (_, labels), pred in zip(data, predicted)]
        if kind == "instances":
            sets[name] = pooled_figures(pairs)
            scores.append(sets[name]["f1"])
        else:
            sets[name] = foreground_figures(pairs)
            scores.append(sets[name]["foreground_iou"])
    first = next(iter(sets.values()), {})
    return {"score": float(np.mean(scores)) if scores else 0.0, "f1": first.get("f1", math.nan),
            "foreground_iou": first.get("foreground_iou", math.nan), "count_ratio": first.get("count_ratio", math.nan),
            **{f"{name}_{k}": v for name, fig in sets.items() for k, v in fig.items()
               if k in ("f1", "foreground_iou", "count_ratio", "foreground_on_background")}, "sets": sets}


def pooled_counts(probs, val_data, thresholds: dict) -> tuple[int, int, int]:
    """(matched at IoU 0.5, true, predicted) particles pooled over the validation images for one
    post-processing setting.

    ``probs``: (3, h, w) maps, at the image's size or resampled (then the instances are found at
    the map's size and brought back to the image's, as the segmenter does)."""
    from ..models.cnn import _instances_to_shape

    tp = nt = npred = 0
    for p, (_, labels) in zip(probs, val_data):
        inst = instances_with(ProbabilityMap(p, network_channels(len(p)), "val"), thresholds)
        if inst.labels.shape != labels.shape:
            inst = _instances_to_shape(inst, labels.shape)
        m = matching(labels, inst.labels, 0.5)
        tp, nt, npred = tp + m.tp, nt + m.n_true, npred + m.n_pred
    return tp, nt, npred


def counts_by_set(probs, val_data, thresholds: dict, groups) -> dict[str, tuple[int, int, int]]:
    """:func:`pooled_counts` of each set: ``groups`` names the set of every validation image."""
    out: dict[str, tuple[int, int, int]] = {}
    for name in dict.fromkeys(groups):
        idx = [i for i, g in enumerate(groups) if g == name]
        out[name] = pooled_counts([probs[i] for i in idx], [val_data[i] for i in idx], thresholds)
    return out


def balanced_key(counts: dict[str, tuple[int, int, int]], count_range: tuple[float, float] | None = None
                 ) -> tuple[float, float]:
    """:func:`tuning_key` with every set weighing the same: the count ratios' distances to
    ``count_range`` summed over the sets, then the mean of the sets' F1. Pooled over particles, a
    set of dense frames (hundreds of spheres each) outweighs one of figure crops (tens), and
    settings chosen for it dropped the crops' small particles."""
    keys = [tuning_key(*c, count_range) for c in counts.values()]
    return sum(k[0] for k in keys), float(np.mean([k[1] for k in keys]))


def pooled_f1(probs, val_data, thresholds: dict) -> float:
    """F1 at IoU 0.5 pooled over the validation images for one post-processing setting."""
    tp, nt, npred = pooled_counts(probs, val_data, thresholds)
    return 2 * tp / (nt + npred) if nt + npred else 0.0


#: Tuning keeps the pooled predicted/true particle count in this range when it can: settings that
#: win F1 by dropping faint or small particles bias the size distribution (on EMPS validation
#: images, tuning for F1 alone reached count ratio 0.94 and KS 0.11 instead of 1.00 and 0.05).
COUNT_RANGE = (0.95, 1.05)


def tuning_key(tp: int, nt: int, npred: int, count_range: tuple[float, float] | None = None) -> tuple[float, float]:
    """What :func:`tune_thresholds` maximises: first closeness of the count ratio to
    ``count_range`` (0 inside it, always 0 without a range), then F1 at IoU 0.5."""
    ratio = npred / nt if nt else 1.0
    lo, hi = count_range or (-np.inf, np.inf)
    outside = max(0.0, lo - ratio, ratio - hi)
    return -outside, (2 * tp / (nt + npred) if nt + npred else 0.0)


#: Values tried by :func:`tune_thresholds`: first the two thresholds together, then each filter.
TUNING_GRID = {
    ("foreground_threshold", "seed_threshold"): [(fg, seed) for fg in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
                                                 for seed in (0.2, 0.35, 0.5, 0.65, 0.8)],
    ("min_score",): [(v,) for v in (0.0, 0.5, 0.6, 0.7, 0.8)],
    ("min_relative_area",): [(v,) for v in (0.0, 0.05, 0.1, 0.2, 0.3)],
    ("min_size_px",): [(v,) for v in (9, 16, 30, 60)],
}

#: Tried first for maps with a distance channel: the border seeds, the distance seeds at these
#: levels, or seeds both call particle middle.
SEED_GRID = ([("borders", 0.5)] + [("distance", v) for v in (0.3, 0.4, 0.5, 0.6, 0.7)]
             + [("both", v) for v in (0.2, 0.3, 0.4, 0.5)])


def tuning_trials(channels: int) -> int:
    """How many post-processing settings :func:`tune_thresholds` tries for maps of ``channels``."""
    grid = dict(TUNING_GRID)
    if channels > 3:
        grid = {("seeds", "seed_distance"): SEED_GRID, **grid}
    return 1 + sum(len(v) for v in grid.values())


def tune_thresholds(probs, val_data, start: dict | None = None,
                    count_range: tuple[float, float] | None = None, groups=None,
                    deadline: float | None = None) -> tuple[dict, float]:
    """Post-processing settings with the best pooled F1 on the validation images, searched one
    group of settings at a time (the thresholds jointly, then each filter given the rest),
    starting from ``start`` (default: :data:`DEFAULT_THRESHOLDS`). With ``count_range`` a
    setting must also keep the count ratio in that range, or bring it closer (:func:`tuning_key`);
    start from settings near it, or the greedy search trades F1 for count early and stays there.
    ``groups`` (the set of each image): every set weighs the same (:func:`balanced_key`).
    ``deadline`` (``time.monotonic()``): no new setting is tried after it; the best so far stands.
    Returns the settings and their F1 (the mean of the sets' with ``groups``)."""

    def key_of(thresholds: dict) -> tuple[float, float]:
        if groups is not None and len(set(groups)) > 1:
            return balanced_key(counts_by_set(probs, val_data, thresholds, groups), count_range)
        return tuning_key(*pooled_counts(probs, val_data, thresholds), count_range)

    best = {**DEFAULT_THRESHOLDS, **(start or {})}
    best_key = key_of(best)
    grid = dict(TUNING_GRID)
    if probs and len(probs[0]) > 3:
        grid = {("seeds", "seed_distance"): SEED_GRID, **grid}
    for keys, values in grid.items():
        for vals in values:
            if deadline is not None and time.monotonic() > deadline:
                return best, best_key[1]
            trial = {**best, **dict(zip(keys, vals))}
            key = key_of(trial)
            if key > (best_key[0], best_key[1] + 1e-9):
                best, best_key = trial, key
    return best, best_key[1]


def train(images_dir: Path, masks_dir: Path, out_dir: Path, cfg: TrainConfig, resume: bool = False,
          log=print, tune: bool = True, stop_after_s: float | None = None, progress=None) -> Path:
    """Train, validate every epoch, keep the best model folder in ``out_dir/best`` and a resumable
    checkpoint in ``out_dir/checkpoint.pt``, then tune the best model's post-processing on the
    validation images (:func:`finalise`; ``tune=False`` leaves that to a later
    ``benchmarks/retune.py``). With ``stop_after_s`` the run stops after the first epoch that ends
    past that many seconds, its checkpoint saved for ``resume`` (for machines lent for a fixed
    time). Returns the best model folder. One process at a time trains into ``out_dir``
    (:func:`~emparticles.train.lock.run_folder_lock`). ``progress(steps done, total steps)`` is
    called after every step; the time a run will take is logged after its first steps."""
    with run_folder_lock(out_dir):
        return _train(images_dir, masks_dir, out_dir, cfg, resume, log, tune, stop_after_s, progress)


def _train(images_dir: Path, masks_dir: Path, out_dir: Path, cfg: TrainConfig, resume: bool, log,
           tune: bool = True, stop_after_s: float | None = None, progress=None) -> Path:
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = pick_device(cfg.device)
    split = split_pairs(find_pairs(images_dir, masks_dir), cfg.val_fraction, cfg.test_fraction, cfg.seed)
    log(f"{len(split['train'])} training, {len(split['validation'])} validation and {len(split['test'])} test "
        f"images of {Path(images_dir)}, split by source")
    train_data = [load_pair(i, m) for i, m in split["train"]]
    val_sets = {Path(images_dir).parent.name or "main": ("instances", [load_pair(i, m) for i, m in split["validation"]])}
    splits = {"train": [p[0].stem for p in split["train"]], "validation": [p[0].stem for p in split["validation"]],
              "test": [p[0].stem for p in split["test"]]}
    others, instance_train = [], list(train_data)
    for spec in cfg.real_sets:
        kind, share = spec.get("kind", "instances"), float(spec["share"])
        part = split_pairs(find_pairs(Path(spec["images"]), Path(spec["masks"])), cfg.val_fraction, cfg.test_fraction,
                           cfg.seed)
        name = Path(spec["images"]).parent.name
        data = [load_pair(i, m, kind) for i, m in part["train"]]
        others.append((data, share))
        if kind == "instances":
            instance_train += data
        val_sets[name] = (kind, [load_pair(i, m, kind) for i, m in part["validation"]])
        splits[name] = {k: [p[0].stem for p in v] for k, v in part.items()}
        log(f"{name} ({kind}): {len(part['train'])} training, {len(part['validation'])} validation and "
            f"{len(part['test'])} test images, {share:.0%} of crops")
    val_data = [pair for kind, data in val_sets.values() if kind == "instances" for pair in data]
    train_data, extra_data, paste = training_sources(train_data, cfg.extra_images, cfg.extra_masks, cfg.extra_fraction,
                                                     cfg.paste_fraction, cfg.workers, log)
    if cfg.workers > 0:
        others = [(SharedPairs(data), share) for data, share in others]
    (out_dir / "split.json").write_text(json.dumps(splits, indent=1))
    weights = torch.from_numpy(class_weights([three_class_target(lab, cfg.border_width) for _, lab in instance_train],
                                             scheme=cfg.class_weighting)).to(device)
    net = build_network(cfg.arch, outputs(cfg), cfg.local_contrast_px)
    val_thresholds = None  # validation of a fresh network uses the default post-processing
    if cfg.init_from:
        from safetensors.torch import load_file

        filled = load_matching_weights(net, load_file(str(Path(cfg.init_from) / "weights.safetensors")))
        log(f"starting from the weights of {cfg.init_from}"
            + (f" (the distance output of {', '.join(filled)} from random initialisation)" if filled else ""))
        tuned = Path(cfg.init_from) / "thresholds.json"
        if tuned.exists():  # a fine-tuned network is judged with the settings it starts from
            val_thresholds = {**DEFAULT_THRESHOLDS, **json.loads(tuned.read_text())}
    if cfg.distance_head:  # validated with its own seeds
        val_thresholds = {**(val_thresholds or DEFAULT_THRESHOLDS), "seeds": "distance"}
    net = net.to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * cfg.steps_per_epoch
    ckpt_path = out_dir / "checkpoint.pt"
    average = WeightAverage()
    start_epoch, best_f1 = load_checkpoint(ckpt_path, net, opt, device, average) if resume else (0, -1.0)
    # The one-cycle schedule is rebuilt at the resumed step, so a resumed run may also ask for
    # more epochs than the first.
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(total, 1), pct_start=0.05,
                                                anneal_strategy="cos",
                                                last_epoch=start_epoch * cfg.steps_per_epoch - 1)
    if start_epoch:
        rng = np.random.default_rng(cfg.seed + start_epoch)
        log(f"resumed after epoch {start_epoch} (best F1 {best_f1:.3f})")
    aug = augmenter(cfg.crop, (cfg.scale_min, cfg.scale_max), cfg.focus_fraction)
    metrics_path = out_dir / "metrics.csv"
    # bf16 autocast: asked for on CPU, always on CUDA (weights and optimiser stay float32)
    use_bf16 = (cfg.bf16 and device.type == "cpu") or device.type == "cuda"
    pool = (BatchWorkers(batch_maker(aug, cfg, train_data, extra_data, paste, others), cfg.steps_per_epoch, cfg.seed,
                         start_epoch, cfg.workers, pin_memory=device.type == "cuda")
            if cfg.workers > 0 and start_epoch < cfg.epochs else None)
    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        t0, losses = time.perf_counter(), []
        timed = TimedBatches(batches(rng, aug, cfg, train_data, extra_data, paste, device, epoch, pool, others))
        for step, (x, y) in enumerate(timed, start=1):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = net(x)
            loss = segmentation_loss(logits, y, weights, cfg.dice_weight, cfg.distance_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.detach())
            if progress is not None:
                progress(epoch * cfg.steps_per_epoch + step, total)
            if epoch == start_epoch and step == min(10, cfg.steps_per_epoch):
                per_step = (time.perf_counter() - t0) / step
                left = per_step * (total - epoch * cfg.steps_per_epoch - step)
                log(f"about {per_step * cfg.steps_per_epoch / 60:.1f} min per epoch of {cfg.steps_per_epoch} steps on "
                    f"{device.type}, {_duration(left)} for the {cfg.epochs - epoch} epoch(s) to go (from the first "
                    f"{step} steps; validation adds to it)")
        train_s = time.perf_counter() - t0
        val = validate_sets(net, val_sets, cfg, device, val_thresholds)
        row = {"epoch": epoch + 1, "loss": float(torch.stack(losses).mean()), "lr": sched.get_last_lr()[0],
               "train_s": round(train_s, 1), "batch_wait_s": round(timed.wait_s, 1),
               **{f"val_{k}": v for k, v in val.items() if not isinstance(v, dict)}}
        append_metrics(metrics_path, row)
        per_set = ", ".join(f"{name} {figures_line(fig)}" for name, fig in val["sets"].items())
        log(f"epoch {epoch + 1}/{cfg.epochs} loss {row['loss']:.3f} val score {val['score']:.3f} ({per_set}) "
            f"({train_s:.0f} s, {timed.wait_s:.0f} s of it waiting for batches)")
        # With averaging, the best single epoch is kept beside the average, for comparison.
        if val["score"] > best_f1:
            best_f1 = val["score"]
            config = _model_config(cfg, epoch + 1, val)
            save_model_folder(net, out_dir / ("best-epoch" if cfg.average_epochs else "best"), config,
                              card=training_card(config))
        if cfg.average_epochs and epoch >= cfg.epochs - cfg.average_epochs:
            average.add(net)
        save_checkpoint(ckpt_path, net, opt, epoch, best_f1, average)
        if stop_after_s is not None and time.perf_counter() - started > stop_after_s and epoch + 1 < cfg.epochs:
            log(f"stopped after epoch {epoch + 1} ({stop_after_s:.0f} s budget); continue with resume")
            return out_dir / "best"
    pool = None  # the batch workers end here, before the averaging and tuning
    if cfg.average_epochs and average.count:
        save_averaged(net, average, cfg, out_dir, val_sets, device, rng, train_data, extra_data, paste, aug, log,
                      val_thresholds, others=others)
    return finalise(out_dir, cfg, val_data, device, log) if tune else out_dir / "best"


def _duration(seconds: float) -> str:
    """2 h 05 min, 12 min, 40 s."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def training_card(config: dict) -> str:
    """MODEL_CARD.md of a trained model folder: what it was trained on, how it was validated and
    its validation figures (tuned ones when there are)."""
    tc = config.get("train_config", {})
    val, tuned = config.get("validation", {}), config.get("validation_tuned", {})

    def figs(d: dict) -> str:
        keys = [("f1", "F1@0.5"), ("precision", "precision"), ("recall", "recall"), ("panoptic_quality", "PQ"),
                ("foreground_iou", "foreground IoU"), ("count_ratio", "count ratio")]
        return ", ".join(f"{name} {d[k]:.3f}" for k, name in keys if isinstance(d.get(k), (int, float)))

    sets = ", ".join(f"{Path(r['images']).parent.name} ({r.get('kind', 'instances')}, {r['share']:.0%} of crops)"
                     for r in tc.get("real_sets", []))
    lines = [f"# {config.get('name', 'model')}", "",
             (f"A `{config.get('arch')}` network (background / particle / border) trained with `emparticles train` "
             f"from {'the weights of ' + tc['init_from'] if tc.get('init_from') else 'random initialisation'}."), "",
             (f"- epochs: {tc.get('epochs')} of {tc.get('steps_per_epoch')} steps of {tc.get('batch_size')} crops of "
             f"{tc.get('crop')} px (this folder: epoch {config.get('epoch')}), peak learning rate {tc.get('lr')}"),
             (f"- more annotated sets: {sets or 'none'}; synthetic: {tc.get('extra_images') or 'none'}; pasted "
             f"agglomerates: {tc.get('paste_fraction', 0):.0%} of crops"),
             (f"- validation: {tc.get('val_fraction', 0):.0%} of each set's images and a test part of "
             f"{tc.get('test_fraction', 0):.0%} held out, whole sources on each side (`split.json` of the run)"), ""]
    if val:
        lines += [f"Validation at scale 1 with the post-processing it was trained with: {figs(val)}.", ""]
    if tuned:
        lines += [(f"Validation after tuning the post-processing on the same images (its scale search included): "
                  f"{figs(tuned)}. These images chose the epoch and the settings, so expect less on unseen ones; "
                  "`benchmarks/all_sets.py` scores the held-out test part."), ""]
    return "\n".join(lines)


class WeightAverage:
    """Running mean of a network's weights over epochs (stochastic weight averaging, Izmailov et
    al. 2018): the mean of the weights along the end of training tends to generalise better than
    one epoch, and needs no validation images to choose it (on v4's run it scored as well as the
    best epoch, not better). Integer buffers (batch-norm counters)
    keep their latest value; batch-norm statistics are recomputed afterwards
    (:func:`save_averaged`)."""

    def __init__(self, state: dict | None = None, count: int = 0):
        self.state, self.count = state, count

    def add(self, net: torch.nn.Module) -> None:
        new = {k: v.detach().clone() for k, v in net.state_dict().items()}
        if self.state is None:
            self.state, self.count = new, 1
            return
        self.count += 1
        for k, v in new.items():
            if v.is_floating_point():
                self.state[k] += (v - self.state[k]) / self.count
            else:
                self.state[k] = v


def save_averaged(net, average: WeightAverage, cfg: TrainConfig, out_dir: Path, val_sets: dict, device, rng,
                  train_data, extra_data, paste, aug, log, val_thresholds: dict | None = None,
                  bn_batches: int = 32, others=()) -> None:
    """Load the averaged weights into ``net``, recompute its batch-norm statistics on
    ``bn_batches`` training batches (``torch.optim.swa_utils.update_bn``: averaged weights do not
    match averaged statistics), validate it with the post-processing the epochs were validated
    with (``val_thresholds``) and save it as ``out_dir/best``."""
    from torch.optim.swa_utils import update_bn

    net.load_state_dict(average.state)
    batches = [training_batch(rng, aug, cfg, train_data, extra_data, paste, device, others)[0] for _ in range(bn_batches)]
    with torch.no_grad():
        update_bn(batches, net, device)
    val = validate_sets(net, val_sets, cfg, device, val_thresholds)
    first = cfg.epochs - average.count + 1
    config = _model_config(cfg, cfg.epochs, val)
    config["averaged_epochs"] = [first, cfg.epochs]
    save_model_folder(net, out_dir / "best", config, card=training_card(config))
    log(f"average of epochs {first}-{cfg.epochs}: val score {val['score']:.3f}")


def save_checkpoint(path: Path, net, opt, epoch: int, best_f1: float, average: WeightAverage | None = None) -> None:
    """Weights, optimiser state, last finished epoch (0-based), best validation F1 and the
    running weight average, if any. Written to a temporary file first, so that an interruption
    while saving leaves the previous checkpoint whole."""
    state = {"net": net.state_dict(), "opt": opt.state_dict(), "epoch": epoch, "best_f1": best_f1}
    if average is not None and average.state is not None:
        state.update(average=average.state, average_count=average.count)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, net, opt, device, average: WeightAverage | None = None) -> tuple[int, float]:
    """Restore a :func:`save_checkpoint` file (tensors only: ``weights_only=True``) into ``net``,
    ``opt`` and ``average`` (when given and the file has one); returns (first epoch to run, best
    F1), or (0, -1.0) when there is no checkpoint."""
    if not path.exists():
        return 0, -1.0
    ckpt = torch.load(path, map_location=device, weights_only=True)
    net.load_state_dict(ckpt["net"])
    opt.load_state_dict(ckpt["opt"])
    if average is not None and "average" in ckpt:
        average.state, average.count = ckpt["average"], int(ckpt["average_count"])
    return int(ckpt["epoch"]) + 1, float(ckpt["best_f1"])


def training_batch(rng: np.random.Generator, aug, cfg: TrainConfig, train_data: list, extra_data: list,
                   paste: PasteSource | None, device, others=()) -> tuple[torch.Tensor, torch.Tensor]:
    """``cfg.batch_size`` augmented crops: inputs (B, 1, crop, crop) float32, normalised and
    channels_last, and 3-class targets (B, crop, crop) uint8 (a batch worker sends them to the
    training process through shared memory: 1.6 MB for 16 crops of 320 px instead of 13 MB as
    int64; :func:`batches` widens them on the device)."""
    batch = [augmented_sample(aug, *pick_sample(rng, train_data, extra_data, cfg.extra_fraction, paste,
                                                cfg.paste_fraction, int(cfg.crop * cfg.scale_max), others),
                             cfg.border_width)
             for _ in range(cfg.batch_size)]
    x = torch.from_numpy(np.stack([b[0] for b in batch])[:, None]).to(device)
    x = ((x - 0.5) / 0.25).contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(np.stack([b[1] for b in batch]).astype(np.uint8)).to(device)
    return x, y


def batches(rng: np.random.Generator, aug, cfg: TrainConfig, train_data: list, extra_data: list,
            paste: PasteSource | None, device, epoch: int, pool: BatchWorkers | None = None, others=()):
    """The ``cfg.steps_per_epoch`` training batches of one epoch (:func:`training_batch`) on
    ``device``: from ``pool`` (the run's :class:`~.data.BatchWorkers`) when given, else built by
    ``cfg.workers`` processes started for this epoch when > 0 (:func:`~.data.epoch_batches`), else
    in this process from ``rng``."""
    source = pool.epoch(epoch) if pool is not None else epoch_batches(
        batch_maker(aug, cfg, train_data, extra_data, paste, others), cfg.steps_per_epoch, rng, cfg.seed, epoch,
        cfg.workers,
        pin_memory=device.type == "cuda")
    for x, y in source:
        yield (x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last),
               y.to(device, non_blocking=True).long())


def batch_maker(aug, cfg: TrainConfig, train_data: list, extra_data: list, paste: PasteSource | None,
                others=()):
    """:func:`training_batch` with everything but the random generator bound (picklable, for
    batch workers); its batches stay on the CPU."""
    return partial(training_batch, aug=aug, cfg=cfg, train_data=train_data, extra_data=extra_data, paste=paste,
                   device=torch.device("cpu"), others=others)


def pick_sample(rng: np.random.Generator, data: list, extra: list, extra_fraction: float,
                paste: PasteSource | None = None, paste_fraction: float = 0.0, paste_size: int = 512,
                others=()):
    """One (image, labels) pair: with probability ``paste_fraction`` pasted agglomerates of the
    training images on an empty background (``paste_size`` pixels square), else from each
    ``(pairs, share)`` of ``others`` with its share, else from ``extra`` with probability
    ``extra_fraction``, else from ``data``."""
    if paste and paste_fraction > 0 and rng.random() < paste_fraction:
        return paste.sample(rng, paste_size)
    if others:
        r = rng.random()
        for pairs, share in others:
            if r < share and len(pairs):
                return pairs[rng.integers(len(pairs))]
            r -= share
    source = extra if extra and rng.random() < extra_fraction else data
    return source[rng.integers(len(source))]


def append_metrics(path: Path, row: dict) -> None:
    """Append one epoch's row to a metrics CSV (header written with the first row). A run resumed
    into a CSV with other columns keeps that file's columns (new ones are left out, missing
    ones empty), so that every row stays under its header."""
    new = not path.exists() or path.stat().st_size == 0
    fields = list(row)
    if not new:
        with path.open(newline="") as fh:
            fields = next(csv.reader(fh), fields)
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def _model_config(cfg: TrainConfig, epoch: int, val: dict) -> dict:
    return {"name": out_name(cfg), "arch": cfg.arch, "classes": 3, "channels": list(network_channels(outputs(cfg))),
            "normalisation": "percentile 0.5-99.5 to [0, 1], then (x - 0.5) / 0.25", "tile": cfg.tile,
            "overlap": cfg.overlap, "pad": cfg.pad, "bf16": cfg.bf16, "border_width": cfg.border_width, "epoch": epoch,
            "validation": {k: v for k, v in val.items() if not k.startswith("_") and k != "sets"},
            "train_config": asdict(cfg),
            **({"local_contrast_px": cfg.local_contrast_px} if cfg.local_contrast_px else {}),
            **({"scale_search": SCALE_SEARCH} if cfg.scale_search else {})}


def outputs(cfg: TrainConfig) -> int:
    """Output maps of the network: the three classes, and a distance map with ``distance_head``."""
    return 3 + int(cfg.distance_head)


def out_name(cfg: TrainConfig) -> str:
    return f"{cfg.arch}-3class"


def finalise(out_dir: Path, cfg: TrainConfig, val_data, device, log=print, groups=None) -> Path:
    """Tune the post-processing thresholds of the best model on the validation images.

    First for F1 at the images' own scale; then, for a model with a resampling search, again on
    the probability maps at the scale each image chooses, keeping the count ratio within
    :data:`COUNT_RANGE`; the validation figures are those of the whole segmentation road (search
    included). ``groups``: the set of each validation image, each set then weighing the same."""
    from ..models.cnn import CNNSegmenter, load_network
    from ..models.onnx import add_graph_to_folder

    best = out_dir / "best"
    net, config, _ = load_network(best, device)
    val = validate(net, val_data, cfg, device)
    thresholds, _ = tune_thresholds(val.pop("_probs"), val_data, groups=groups)
    (best / "thresholds.json").write_text(json.dumps(thresholds, indent=2) + "\n")
    if config.get("scale_search"):
        seg = CNNSegmenter(best, device)
        probs = [seg.searched(img)[2].probabilities for img, _ in val_data]
        thresholds, _ = tune_thresholds(probs, val_data, start=thresholds, count_range=COUNT_RANGE, groups=groups)
        (best / "thresholds.json").write_text(json.dumps(thresholds, indent=2) + "\n")
    outline = tune_outline_threshold(CNNSegmenter(best, device), val_data)
    if outline is not None:
        thresholds["outline_threshold"] = outline
        (best / "thresholds.json").write_text(json.dumps(thresholds, indent=2) + "\n")
    tuned = validate_segmenter(CNNSegmenter(best, device), val_data)
    config["validation_tuned"] = tuned
    (best / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (best / "MODEL_CARD.md").write_text(training_card(config))
    add_graph_to_folder(best)  # CPU inference through ONNX Runtime, as the shipped models run
    log(f"thresholds {thresholds}: validation F1 {tuned['f1']:.3f} with the tuned post-processing and the scale "
        f"search (F1 {val['f1']:.3f} at scale 1 with the defaults)")
    if tuned["f1"] < val["f1"]:
        log("the tuned settings score lower than the defaults at scale 1: tuning keeps the particle count within "
            f"{COUNT_RANGE[0]:.2f}-{COUNT_RANGE[1]:.2f} of the true one before it maximises F1, and the scale search "
            "may resample the images; a count far from 1 biases the size distribution more than a lower F1")
    return best


#: Outline thresholds tried by :func:`tune_outline_threshold`.
OUTLINE_GRID = (0.5, 0.6, 0.7, 0.8, 0.9)


def tune_outline_threshold(seg, val_data, values=OUTLINE_GRID) -> float | None:
    """The threshold of :func:`~emparticles.instances.trim_outlines` with the best pooled
    panoptic quality plus foreground IoU of a segmenter (without an outline threshold) on
    normalised validation images, or None when no cut beats the uncut outlines. Panoptic quality
    alone is flat near its best (v1 on EMPS validation: 0.7634 at 0.7, 0.7637 at 0.8, where
    foreground IoU falls 0.871 -> 0.864). The particles themselves (which and how many) stay as
    the other thresholds found them; only their outlines move."""
    def objective(pairs) -> float:
        figures = pooled_figures(pairs)
        return figures["panoptic_quality"] + figures["foreground_iou"]

    results = [(labels, seg.segment_normalised(img)) for img, labels in val_data]
    best, best_value = None, objective((labels, inst.labels) for labels, (inst, _) in results)
    for value in values:
        v = objective((labels, trim_outlines(inst, prob.foreground, value).labels) for labels, (inst, prob) in results)
        if v > best_value + 1e-9:
            best, best_value = float(value), v
    return best


def validate_segmenter(seg, val_data) -> dict:
    """:func:`pooled_figures` of a segmenter's whole road (resampling search included) on
    normalised validation images."""
    return pooled_figures((labels, seg.segment_normalised(img)[0].labels) for img, labels in val_data)
