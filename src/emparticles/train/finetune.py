"""Fine-tuning a trained model on a handful of a lab's own annotated (or corrected) images, within
a time budget, on a CPU, and only keeping the result when it is better.

The road:

1. Hold out a quarter of the images (at least one, whole sources; from three images on) to judge
   base against fine-tuned; with fewer, nothing is held out and the card says so. When the budget
   leaves each round :data:`MIN_ROUND_MINUTES` of training (or ``rounds`` says so), rotate: each
   round trains from the base without its quarter and scores it, so more images judge the result;
   the weights kept are then the rounds' mean, which together saw every image.
2. Ask the base model's scale search at which resampling it sees these images' particles, and
   train on crops resampled around that scale (x0.8-1.25), with strong augmentation.
3. Adapt the decoder at the full learning rate and the encoder at a third of it; batch-norm
   statistics stay the base's (a few images would pull them off). Warm-up, then cosine decay,
   laid out over the time left for training, so the run ends on time.
4. Retune the post-processing on the training images.
5. Score the held-out images with the base and with the fine-tuned model; keep the fine-tuned
   weights only when F1 at IoU 0.5 and foreground IoU gain together (:data:`MIN_GAIN`) without F1
   dropping by more than one held-out particle's worth (:func:`keeps_fine_tuned`); else keep the
   base's, and say so. The folder records
   the attempt either way; a rejected attempt's weights are kept beside, in ``rejected/``.

Annotations may outline agglomerates instead of single particles (``outlines="agglomerates"``:
touching particles under one label, as a lab counting agglomerates draws them). The network then
learns particle against substrate from them; where particles part inside an agglomerate, the
base's own particles stand in for the annotation (:func:`training_labels`). The post-processing
stays the base's (retuning it needs single particles), and the held-out images are scored at the
level annotated: the predicted particles grouped into agglomerates (8-connected, as ``analyze``
groups them) against the annotated agglomerates.

A non-finite loss stops the training and falls back to the last finite weights. Ctrl-C stops it
too and leaves a usable folder (the best of base and the weights so far, judged on the held-out
images when there is time, else the base's).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import EmparticlesError, InputError

#: Share of the images held out (whole sources) when there are at least MIN_IMAGES_FOR_HOLDOUT
HOLDOUT_SHARE = 0.25
MIN_IMAGES_FOR_HOLDOUT = 3
#: The fine-tuned model is kept when held-out F1 + foreground IoU gain more than MIN_GAIN together
#: and F1 loses at most MAX_F1_LOSS, or one held-out particle's worth where that is more
#: (:func:`keeps_fine_tuned`)
MIN_GAIN = 0.01
MAX_F1_LOSS = 0.01
#: Training time each round of the rotation must keep for a budget to rotate (``rounds`` 0):
#: about what a single 10-minute run trains, so that rotating never trades training for checking
MIN_ROUND_MINUTES = 6.0
#: What the annotations outline: single particles, or agglomerates (touching particles under one label)
OUTLINES = ("particles", "agglomerates")


class TrainingDiverged(EmparticlesError):
    """The loss became NaN or infinite."""


@dataclass
class FinetuneConfig:
    """Settings of a fine-tuning run; saved in the model folder."""

    base: str = ""  # registered name or model folder; "" = the shipped default
    minutes: float = 10.0  # the whole run, loading and scoring included
    lr: float = 5e-4  # decoder; the encoder learns at lr * encoder_lr_factor
    encoder_lr_factor: float = 0.3
    batch_size: int = 4
    crop: int = 256
    warmup_share: float = 0.1
    seed: int = 0
    device: str = "cpu"
    tune: bool = True
    rounds: int = 0  # held-out folds to rotate through; 0 = as many as the budget allows (MIN_ROUND_MINUTES each)
    outlines: str = "particles"  # what the annotations outline: "particles" or "agglomerates"


@dataclass
class FinetuneResult:
    """What a fine-tuning run did: where its model is and the held-out figures."""

    model_dir: Path
    kept: str  # "fine-tuned", "base" or "base (interrupted)"
    reason: str
    train_images: list[str]
    holdout_images: list[str]
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    steps: int = 0
    seconds: float = 0.0
    scale: float = 1.0
    rounds: int = 1


def resolve_base(base: str) -> Path:
    """The folder of a registered model name or a model folder path."""
    from ..models.registry import DEFAULT_MODEL, SHIPPED_DIR

    name = base or DEFAULT_MODEL
    folder = SHIPPED_DIR / name if (SHIPPED_DIR / name / "config.json").is_file() else Path(name)
    if not (folder / "config.json").is_file() or not (folder / "weights.safetensors").is_file():
        raise InputError(folder, "is not a trained network's folder", "give --base a shipped U-Net (emparticles models) "
                                 "or a folder written by emparticles train / finetune")
    config = json.loads((folder / "config.json").read_text())
    if config.get("kind") in ("maskrcnn", "select"):
        raise InputError(folder, f"finetune works on the U-Net family, not on a {config['kind']} model",
                         "give --base a U-Net model folder")
    return folder


def read_annotated(images_dir: Path, masks: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(stem, normalised field, instance labels) of every image with an annotation; the field is
    the image without its info bar (found as ``analyze`` finds it), which is what a model sees.

    ``masks``: a folder of 16-bit label images with the images' stems, or of ImageJ ROI sets
    ``<stem>.zip`` (as ``analyze`` writes them and Fiji's ROI Manager saves them), or one COCO /
    labelme / VIA file (``emparticles annotations import`` reads the same)."""
    from ..io.exports import read_imagej_rois
    from ..io.images import IMAGE_SUFFIXES, read_micrograph
    from ..io.writers import read_labels
    from ..pipeline import locate_infobar
    from ..preprocess import normalise

    images_dir, masks = Path(images_dir), Path(masks)
    if not images_dir.is_dir():
        raise InputError(images_dir, "is not a folder", "give --images the folder of your micrographs")
    images = {p.stem: p for p in sorted(images_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    from_file: dict[str, np.ndarray] = {}
    if masks.is_file():
        from ..io.datasets import read_annotations

        from_file = {Path(k).stem: v for k, v in read_annotations(masks, images_dir).items()}
    elif not masks.is_dir():
        raise InputError(masks, "not found", "give --masks a folder of label images or ROI zips, or an annotation file")
    out = []
    for stem, path in images.items():
        mg = locate_infobar(read_micrograph(path))
        if stem in from_file:
            labels = from_file[stem]
        elif masks.is_dir() and (masks / f"{stem}.zip").is_file():
            labels = read_imagej_rois(masks / f"{stem}.zip", mg.shape)
        else:
            found = [p for p in masks.glob(f"{stem}.*") if p.suffix.lower() in IMAGE_SUFFIXES] if masks.is_dir() else []
            if not found:
                continue
            labels, _ = read_labels(found[0])
        labels = np.asarray(labels, np.int32)
        if labels.shape != mg.shape:
            raise InputError(path, f"its annotation is {labels.shape[1]}x{labels.shape[0]} but the image is "
                                   f"{mg.shape[1]}x{mg.shape[0]}", "annotate the image at its own size")
        # the field as segmentation sees it: the info bar left out, normalised without it
        rows = mg.analysed_pixels.shape[0]
        out.append((stem, normalise(mg.analysed_pixels), np.ascontiguousarray(labels[:rows])))
    if not out:
        raise InputError(masks, f"no annotation matches an image of {images_dir}",
                         "name each mask or ROI zip like its image (image.tif -> image.png or image.zip)")
    return out


def rotation_folds(stems: list[str], images_dir: Path) -> list[list[str]]:
    """The held-out folds a run can rotate through: whole sources, each about
    :data:`HOLDOUT_SHARE` of the images, in the fixed order of :func:`~.splits.split_by_source`
    (so the first fold is the part a single split holds out); none under
    :data:`MIN_IMAGES_FOR_HOLDOUT` images."""
    from .splits import _group_order, source_groups

    if len(stems) < MIN_IMAGES_FOR_HOLDOUT:
        return []
    groups, _ = source_groups(images_dir, stems)
    if len(set(groups.values())) < 2:  # one source: hold out frames of it rather than nothing
        groups = {s: s for s in stems}
    members: dict[str, list[str]] = {}
    for stem in sorted(groups):
        members.setdefault(groups[stem], []).append(stem)
    target = HOLDOUT_SHARE * len(stems)
    folds: list[list[str]] = []
    fold: list[str] = []
    for g in _group_order(groups.values()):
        # the same rule as split_by_source: fill to the share, stop short rather than overshoot
        if fold and (len(fold) >= target or len(fold) + len(members[g]) > 1.5 * target):
            folds.append(fold)
            fold = []
        fold = fold + members[g]
    if fold and len(fold) < len(stems):
        folds.append(fold)
    return [sorted(f) for f in folds if len(f) < len(stems)]


def held_out(stems: list[str], images_dir: Path) -> tuple[list[str], list[str]]:
    """(training stems, held-out stems) of a run without rotation: the first of
    :func:`rotation_folds` held out; with fewer than :data:`MIN_IMAGES_FOR_HOLDOUT` images,
    nothing."""
    folds = rotation_folds(stems, images_dir)
    hold = folds[0] if folds else []
    return [s for s in stems if s not in hold], hold


def predictions(seg, data) -> list[np.ndarray]:
    """Instance labels of a segmenter's whole road (scale search, post-processing) on normalised
    (image, labels) pairs; ``seg`` may also be a list with one segmenter per image."""
    segs = seg if isinstance(seg, (list, tuple)) else [seg] * len(data)
    return [s.segment_normalised(img)[0].labels for s, (img, _) in zip(segs, data)]


def figures(truths: list[np.ndarray], preds: list[np.ndarray], outlines: str = "particles") -> dict:
    """F1, precision, recall, PQ at IoU 0.5, foreground IoU, count ratio and D50 error, pooled
    over the images. ``outlines="agglomerates"``: the truths outline agglomerates, and the
    predicted particles are grouped into agglomerates (8-connected) before they are matched."""
    from ..agglomerates import agglomerate_labels
    from ..evaluate import label_size_agreement
    from .loop import pooled_figures

    if outlines == "agglomerates":
        truths = [agglomerate_truth(t) for t in truths]
        preds = [agglomerate_labels(p)[0] for p in preds]
    out = pooled_figures(zip(truths, preds))
    out["d50_rel_error"] = label_size_agreement(list(truths), list(preds))["d50_rel_error"]
    return out


def agglomerate_truth(labels: np.ndarray) -> np.ndarray:
    """Agglomerate-level annotations as labels: each 8-connected group of annotated pixels is one
    agglomerate, whatever labels the drawing gave its parts."""
    from scipy import ndimage as ndi

    return ndi.label(np.asarray(labels) > 0, structure=np.ones((3, 3), bool))[0].astype(np.int32)


def training_labels(labels: np.ndarray, outlines: str, base_labels: np.ndarray | None = None) -> np.ndarray:
    """Labels as training takes them. Particle outlines stay as they are. Inside agglomerate
    outlines, where particles part is not annotated: the base model's own particles
    (``base_labels``, cut to the annotation) stand in for it, and what the base did not find
    becomes -1 ("particle, not known where particles part": :data:`~.targets.FOREGROUND_ONLY`).

    Without the base's partings the border class has nothing to hold it where a fine-tuning sees
    only agglomerate outlines, and it drifts: fine-tuned on three dense agglomerate frames
    (``bench_finetune.py --set sem-agglomerates --source 10C3``), v6's F1 on the silica test
    frames fell from 0.930 to 0.656, its particles cut into pieces (count ratio 1.69)."""
    if outlines != "agglomerates":
        return labels
    fg = np.asarray(labels) > 0
    out = -fg.astype(np.int32)
    if base_labels is not None:
        inside = fg & (base_labels > 0)
        out[inside] = base_labels[inside]
    return out


def _param_groups(net: torch.nn.Module, lr: float, encoder_factor: float) -> list[dict]:
    """Decoder and head at ``lr``, encoder (modules named stem/down/encoder) at ``lr * encoder_factor``."""
    enc, dec = [], []
    for name, p in net.named_parameters():
        (enc if name.split(".")[0] in ("stem", "down", "encoder", "backbone") else dec).append(p)
    groups = [{"params": dec, "lr": lr, "base_lr": lr}]
    if enc:
        groups.append({"params": enc, "lr": lr * encoder_factor, "base_lr": lr * encoder_factor})
    return groups


def _freeze_batchnorm(net: torch.nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def schedule(fraction: float, warmup: float) -> float:
    """Learning-rate factor at ``fraction`` of the training time: linear warm-up, cosine decay."""
    if fraction < warmup:
        return max(fraction / warmup, 0.05)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (fraction - warmup) / max(1e-9, 1 - warmup))))


def averaged_weights(nets: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The mean of networks' weights, all fine-tuned from one base (a "model soup", Wortsman et
    al. 2022): floating-point tensors averaged, counters taken from the first."""
    states = [n.state_dict() for n in nets]
    return {k: (torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v.clone())
            for k, v in states[0].items()}


@dataclass
class _Round:
    """One round of the rotation: the network trained without ``held_out``, judged on it."""

    held_out: list[str]
    net: torch.nn.Module
    thresholds: dict
    steps: int = 0
    train_s: float = 0.0
    preds: list = field(default_factory=list)
    interrupted: bool = False
    diverged: str = ""


def _train(net: torch.nn.Module, train_data: list, weights: torch.Tensor, cfg: FinetuneConfig, aug, border_width: int,
           until: float, rng: np.random.Generator, device, report: Callable[[str], None], log) -> tuple[int, bool, str]:
    """Train ``net`` in place on crops of ``train_data`` until the monotonic time ``until``, the
    learning rate laid over that time. Returns (steps, interrupted by Ctrl-C, divergence message);
    after a non-finite loss the weights of the last finite step are put back."""
    from .data import augmented_sample
    from .loop import segmentation_loss

    net.train()
    _freeze_batchnorm(net)
    opt = torch.optim.AdamW(_param_groups(net, cfg.lr, cfg.encoder_lr_factor), weight_decay=1e-4)
    t0 = time.monotonic()
    steps, last_good, interrupted, diverged = 0, copy.deepcopy(net.state_dict()), False, ""
    try:
        while time.monotonic() < until:
            fraction = (time.monotonic() - t0) / max(1e-9, until - t0)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * schedule(fraction, cfg.warmup_share)
            batch = [augmented_sample(aug, *train_data[int(rng.integers(len(train_data)))], border_width)
                     for _ in range(cfg.batch_size)]
            x = torch.from_numpy(np.stack([b[0] for b in batch])[:, None]).to(device)
            x = ((x - 0.5) / 0.25).contiguous(memory_format=torch.channels_last)
            y = torch.from_numpy(np.stack([b[1] for b in batch])).to(device)
            loss = segmentation_loss(net(x), y, weights)
            if not torch.isfinite(loss):
                diverged = (f"the loss became {float(loss.detach())} at step {steps + 1}; training stopped and the weights of "
                            "the last finite step were kept (try a lower --lr)")
                net.load_state_dict(last_good)
                log(diverged)
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            if steps % 10 == 0:
                last_good = copy.deepcopy(net.state_dict())
            report(f"step {steps}, loss {float(loss.detach()):.3f}")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: judging the weights so far against the base (Ctrl-C again to keep the base)")
    net.eval()
    return steps, interrupted, diverged


def finetune(data: list[tuple[str, np.ndarray, np.ndarray]], out_dir: Path, cfg: FinetuneConfig,
             images_dir: Path | None = None, log: Callable[[str], None] = print,
             progress: Callable[[float, str], None] | None = None) -> FinetuneResult:
    """Fine-tune ``cfg.base`` on ``data`` ((stem, normalised image, labels) from
    :func:`read_annotated`) into the model folder ``out_dir`` within ``cfg.minutes``; see the
    module's docstring. ``progress(fraction of the budget, what)`` is called as time passes."""
    from ..inference import pick_device
    from ..models.cnn import CNNSegmenter, load_network
    from .data import augmenter
    from .loop import COUNT_RANGE, pooled_counts, tune_thresholds, tuning_trials
    from .targets import class_weights, three_class_target

    if cfg.outlines not in OUTLINES:
        raise InputError(None, f"unknown outlines {cfg.outlines!r}", f"use one of {', '.join(OUTLINES)}")
    started = time.monotonic()
    budget = 60.0 * cfg.minutes
    report = progress or (lambda f, m: None)
    # agglomerate outlines do not say where particles part: the base's post-processing stays
    tune = cfg.tune and cfg.outlines == "particles"

    def score(truths: list[np.ndarray], preds: list[np.ndarray]) -> dict:
        return figures(truths, preds, cfg.outlines)
    out_dir = Path(out_dir)
    base_dir = resolve_base(cfg.base)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    by_stem = {s: (img, lab) for s, img, lab in data}
    stems = list(by_stem)
    folds = rotation_folds(stems, images_dir or Path("."))
    first_train = [s for s in stems if not folds or s not in folds[0]]
    base_seg = CNNSegmenter(base_dir, str(device), onnx=False)
    base_config = dict(base_seg.config)
    border_width = int(base_config.get("border_width", 2))
    # 1. the base's scale for these images (its search needs no annotation)
    t_scale = time.monotonic()
    scales = [base_seg.choose_scale(by_stem[s][0])[0] if base_config.get("scale_search") else 1.0 for s in first_train]
    # crops are resampled as the base's network sees these images: the search's scale times
    # the base's own input_scale (1 for every shipped model)
    scale = float(np.median(scales)) * base_seg.input_scale
    per_image_s = (time.monotonic() - t_scale) / max(1, len(first_train))
    # one post-processing trial of the retuning, timed on the first training image (silica frames
    # of 1,000 spheres take 0.26 s a trial, sixty trials an image: a fixed guess overran budgets)
    trial_s = 0.0
    if tune:
        img, lab = by_stem[first_train[0]]
        prob = _probs(base_seg, img, base_config)
        t_trial = time.monotonic()
        pooled_counts([prob], [(img, lab)], base_seg.thresholds)
        trial_s = (time.monotonic() - t_trial) * tuning_trials(len(prob))

    def kept_for(n_train: int, n_hold: int) -> float:
        return _kept_for(per_image_s, trial_s, n_train, n_hold, tune)

    # 2. how many held-out folds to rotate through: each round trains from the base without its
    # fold, so every held-out image is judged by a model that never saw it
    overheads = [kept_for(len(stems) - len(f), len(f)) for f in folds] or [kept_for(len(stems), 0)]
    soup_overhead = kept_for(len(stems), 0)
    rounds = _rounds(cfg, overheads, soup_overhead, budget - (time.monotonic() - started) - 15.0)
    planned = [list(f) for f in folds[:rounds]] or [[]]
    hold_stems = [s for f in planned for s in f]
    log(f"{len(stems)} annotated image(s)" + (
        (f"; holding out {', '.join(planned[0])} to judge the result" if rounds == 1 else
         f"; {rounds} rounds, holding out {', then '.join(', '.join(f) for f in planned)} to judge the result")
        if folds else "; too few to hold any out (3 or more needed): the result cannot be checked"))
    if cfg.outlines == "agglomerates":
        log("the annotations outline agglomerates: the network learns particle against substrate from them, where "
            "particles part is taken from the base's own particles, the post-processing stays the base's, and the "
            "held-out images are scored as agglomerates")
    t_eval = time.monotonic()
    base_preds = predictions(base_seg, [by_stem[s] for s in hold_stems])
    eval_s = time.monotonic() - t_eval
    if cfg.outlines == "agglomerates":
        # the base's particles, to stand in for the partings the agglomerate outlines do not give
        rest = [s for s in stems if s not in hold_stems]
        base_labels = dict(zip(hold_stems, base_preds)) | dict(zip(rest, predictions(base_seg, [by_stem[s] for s in rest])))
        train_labels = {s: training_labels(by_stem[s][1], cfg.outlines, base_labels[s]) for s in stems}
    else:
        train_labels = {s: by_stem[s][1] for s in stems}
    base_figures = {}
    if hold_stems:
        per_image_s = eval_s / len(hold_stems)
        base_figures = score([by_stem[s][1] for s in hold_stems], base_preds)
        log(f"base {base_dir.name} on the held-out images: F1 {base_figures['f1']:.3f}, foreground IoU "
            f"{base_figures['foreground_iou']:.3f}, count ratio {base_figures['count_ratio']:.2f}")
        # the reserves again, from the time a whole-road segmentation took
        overheads = [kept_for(len(stems) - len(f), len(f)) for f in folds] or [kept_for(len(stems), 0)]
        soup_overhead = kept_for(len(stems), 0)
    # the base's folder first: a usable model whatever happens next
    _write_folder(out_dir, base_dir, None, base_config, base_seg.thresholds, cfg, "base (not yet fine-tuned)",
                  "fine-tuning has not finished", first_train, planned[0], {}, {}, 0, 0.0, scale)
    aug = augmenter(cfg.crop, (scale * 0.8, scale * 1.25))
    # 3. the rounds: train, retune the post-processing on the round's training images, predict its fold
    done: list[_Round] = []
    for r, fold in enumerate(planned):
        train_data = [(by_stem[s][0], train_labels[s]) for s in stems if s not in fold]
        weights = torch.from_numpy(class_weights([three_class_target(lab, border_width) for _, lab in train_data])).to(device)
        now = time.monotonic()
        # what is kept for after training: scoring and retuning of this round and the rounds
        # to come, and the soup's retuning (on a loaded machine these took up to twice the
        # estimate, hence the margin in _kept_for)
        after_this = sum(overheads[r + 1:rounds]) + (soup_overhead if rounds > 1 else 0.0)
        reserve = overheads[r] + after_this + 15.0
        end = started + max(budget * 0.3, budget - min(reserve, 0.6 * budget))
        until = now + max(0.0, (end - now) / (rounds - r))
        net, _, _ = load_network(base_dir, device)
        what = f"fine-tuning{f' (round {r + 1} of {rounds})' if rounds > 1 else ''}"
        steps_before = time.monotonic()
        steps, interrupted, diverged = _train(
            net, train_data, weights, cfg, aug, border_width, until, rng, device,
            lambda m, w=what: report((time.monotonic() - started) / budget, f"{w}, {m}"), log)
        one = _Round(fold, net, dict(base_seg.thresholds), steps, time.monotonic() - steps_before,
                     interrupted=interrupted, diverged=diverged)
        if interrupted and done:
            break  # a later round cut short: the finished rounds stand
        try:
            seg = _segmenter(out_dir, base_dir, net, base_config, one.thresholds, cfg, device)
            if tune and not interrupted:
                report((time.monotonic() - started) / budget, "retuning the post-processing")
                probs = [_probs(seg, img, base_config) for img, _ in train_data]
                # the retuning stops in time to score the fold and leave the later rounds theirs
                deadline = started + budget - after_this - 1.5 * per_image_s * len(fold) - 10.0
                one.thresholds, _ = tune_thresholds(probs, train_data, start=one.thresholds, count_range=COUNT_RANGE,
                                                    deadline=deadline)
                seg.thresholds = one.thresholds
            report((time.monotonic() - started) / budget, "scoring the held-out images")
            one.preds = predictions(seg, [by_stem[s] for s in fold])
        except KeyboardInterrupt:
            if done:
                break
            _write_folder(out_dir, base_dir, None, base_config, base_seg.thresholds, cfg, "base (interrupted)",
                          "interrupted before the fine-tuned weights could be judged: the base's weights are kept",
                          first_train, planned[0], {}, {}, steps, one.train_s, scale)
            return FinetuneResult(out_dir, "base (interrupted)", "interrupted before judging", first_train, planned[0],
                                  {}, {}, steps, time.monotonic() - started, scale)
        done.append(one)
        if interrupted or diverged:
            break
    # 4. the verdict, pooled over the folds judged
    judged = [s for one in done for s in one.held_out]
    truths = [by_stem[s][1] for s in judged]
    before = (base_figures if len(judged) == len(hold_stems) else score(truths, base_preds[:len(judged)])) if judged else {}
    after = score(truths, [p for one in done for p in one.preds]) if judged else {}
    steps, train_s = sum(o.steps for o in done), sum(o.train_s for o in done)
    tuned_config = {**base_config, "name": out_dir.name, "finetuned_from": base_config.get("name", base_dir.name)}
    net, thresholds = done[0].net, done[0].thresholds
    per_round = []
    if len(done) > 1:
        # the kept attempt: the mean of the rounds' weights, which together saw every image,
        # its post-processing retuned on all of them
        per_round = [{"held_out": o.held_out, "steps": o.steps, "training_seconds": round(o.train_s, 1),
                      "before": _plain(score([by_stem[s][1] for s in o.held_out], base_preds[i:i + len(o.held_out)])),
                      "after": _plain(score([by_stem[s][1] for s in o.held_out], o.preds))}
                     for o, i in zip(done, np.cumsum([0] + [len(o.held_out) for o in done[:-1]]))]
        net, _, _ = load_network(base_dir, device)
        net.load_state_dict(averaged_weights([o.net for o in done]))
        net.eval()
        if tune:
            try:
                report((time.monotonic() - started) / budget, "retuning the post-processing of the averaged weights")
                seg = _segmenter(out_dir, base_dir, net, base_config, thresholds, cfg, device)
                all_data = [by_stem[s] for s in stems]
                thresholds, _ = tune_thresholds([_probs(seg, img, base_config) for img, _ in all_data], all_data,
                                                start=thresholds, count_range=COUNT_RANGE,
                                                deadline=started + budget - 10.0)
            except KeyboardInterrupt:
                log("interrupted: the averaged weights keep the first round's post-processing")
    train_stems = first_train if len(done) == 1 else stems
    if judged:
        better = keeps_fine_tuned(before, after)
        reason = (f"held-out F1 {before['f1']:.3f} -> {after['f1']:.3f}, foreground IoU {before['foreground_iou']:.3f} "
                  f"-> {after['foreground_iou']:.3f}")
        if len(done) > 1:
            reason += (f" (over {len(done)} rounds, each image judged by the round that did not train on it; the weights "
                       "are the rounds' mean)")
    else:
        better, reason = True, "no held-out images to judge it (fewer than 3 annotated): kept unchecked"
    diverged = next((o.diverged for o in done if o.diverged), "")
    interrupted = any(o.interrupted for o in done) or (len(done) < rounds and not diverged)
    if diverged:
        reason = f"{diverged}; {reason}"
    kept = "fine-tuned" if better else "base"
    if interrupted:
        reason = f"interrupted after {train_s:.0f} s of training; {reason}"
    round_nets = [(o.net, {**tuned_config, "name": f"{out_dir.name}/rounds/{i + 1}"}, o.thresholds)
                  for i, o in enumerate(done)] if len(done) > 1 else []
    if better:
        _write_folder(out_dir, base_dir, net, tuned_config, thresholds, cfg, kept, reason, train_stems, judged,
                      before, after, steps, train_s, scale, per_round=per_round, round_nets=round_nets)
    else:
        reason = (f"not better than the base, so the base's weights are kept: {reason}; the attempt is in "
                  f"{out_dir.name}/rejected")
        _write_folder(out_dir, base_dir, None, {**base_config, "name": out_dir.name}, base_seg.thresholds, cfg, kept,
                      reason, train_stems, judged, before, after, steps, train_s, scale,
                      rejected=(net, tuned_config, thresholds), per_round=per_round, round_nets=round_nets)
    log(f"{kept} model -> {out_dir} ({reason})")
    report(1.0, "done")
    return FinetuneResult(out_dir, kept, reason, train_stems, judged, before, after, steps,
                          time.monotonic() - started, scale, rounds=len(done))


def keeps_fine_tuned(before: dict, after: dict) -> bool:
    """The verdict on the held-out images (:func:`figures` of base and fine-tuned): keep the
    fine-tuned weights when F1 and foreground IoU together gain more than :data:`MIN_GAIN`, and
    F1 does not drop by more than one held-out particle's worth.

    One particle's worth is what one match more or less moves F1 by, 2 / (true + predicted), and
    at least :data:`MAX_F1_LOSS`. On a dense silica frame one sphere is a few thousandths (F1
    0.842 -> 0.836 was one sphere, while foreground IoU rose 0.885 -> 0.920); on a sparse frame of
    15 agglomerates it is 0.07, and a fixed 0.01 turned down an attempt for four extra
    predictions that matched nothing (F1 0.250 -> 0.222, foreground IoU 0.311 -> 0.404) which found
    8 of the 12 agglomerates of the sample's unseen frame, against the base's 3."""
    gain_f1 = after["f1"] - before["f1"]
    gain_iou = after["foreground_iou"] - before["foreground_iou"]
    objects = after.get("true", 0) + after.get("predicted", 0)
    allowed = max(MAX_F1_LOSS, 2.0 / objects if objects else 0.0)
    return gain_f1 + gain_iou > MIN_GAIN and gain_f1 >= -allowed


def _kept_for(per_image_s: float, tuning_s: float, n_train: int, n_hold: int, tune: bool) -> float:
    """Seconds kept after a round's training: scoring its held-out images (``per_image_s`` each),
    and for the retuning one segmentation of each training image plus its post-processing trials
    (``tuning_s`` an image); x1.5, since on a loaded machine these took up to twice the estimate."""
    return 1.5 * (per_image_s * (n_hold + (1.5 * n_train if tune else 0)) + (tuning_s * n_train if tune else 0))


def _rounds(cfg: FinetuneConfig, overheads: list[float], soup_overhead: float, seconds_left: float) -> int:
    """``cfg.rounds`` when given (at most one per fold); else as many rounds as leave each
    :data:`MIN_ROUND_MINUTES` of training, at least one."""
    if cfg.rounds > 0:
        return max(1, min(cfg.rounds, len(overheads)))
    best = 1
    for r in range(2, len(overheads) + 1):
        if (seconds_left - sum(overheads[:r]) - soup_overhead) / r >= 60.0 * MIN_ROUND_MINUTES:
            best = r
    return best


def _segmenter(out_dir: Path, base_dir: Path, net, config: dict, thresholds: dict, cfg: FinetuneConfig, device):
    """A segmenter of ``net`` as its model folder would load it (written to a scratch folder)."""
    import shutil
    import tempfile

    from ..models.cnn import CNNSegmenter, save_model_folder

    scratch = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}-", dir=out_dir.parent))
    try:
        save_model_folder(net, scratch / "model", {k: v for k, v in config.items() if k != "validation_tuned"}, thresholds)
        return CNNSegmenter(scratch / "model", str(device), onnx=False)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _probs(seg, img: np.ndarray, config: dict) -> object:
    return seg.searched(img)[2].probabilities if config.get("scale_search") else seg.at_scale(img, 1.0)[1].probabilities


def _own_config(config: dict, record: dict) -> dict:
    """The config a fine-tuning writes: the base's, less what belongs to the base alone (its
    validation figures, its being the default model), with a description of its own and the
    record of the run. A base's ``"default": true`` copied along made a fine-tuned folder placed
    among the shipped models a second default."""
    own = {k: v for k, v in config.items() if k not in ("validation_tuned", "default")}
    base = config.get("finetuned_from") or config.get("name") or Path(record["base"]).name
    n = len(record["train_images"])
    own["description"] = (f"{base} fine-tuned with `emparticles finetune` on {n} image(s) "
                          f"({', '.join(record['train_images'][:6])}{', ...' if n > 6 else ''}); kept: {record['kept']}")
    return {**own, "finetune": record}


def _write_folder(out_dir: Path, base_dir: Path, net, config: dict, thresholds: dict, cfg: FinetuneConfig, kept: str,
                  reason: str, train_stems, hold_stems, before: dict, after: dict, steps: int, train_s: float,
                  scale: float, rejected: tuple | None = None, per_round: list | None = None,
                  round_nets: list | None = None) -> None:
    """The model folder (weights of ``net``, or the base's when None) with the record of the run
    in ``config.json`` (``finetune``) and ``MODEL_CARD.md``. Written to a temporary folder and
    swapped in, so that an interruption never leaves a half-written model. ``rejected``: (net,
    config, thresholds) of a fine-tuned attempt that was not kept, written as a model folder of
    its own in ``rejected/`` (``--model MODEL_DIR/rejected`` tries it; the judgement rests on a
    few held-out images, and the user may know better). ``per_round``: the held-out figures of
    each round of a rotation; ``round_nets``: (net, config, thresholds) of each round, written as
    model folders in ``rounds/1``, ``rounds/2``, ..."""
    import shutil

    from ..models.cnn import load_network, save_model_folder
    from ..models.onnx import add_graph_to_folder

    record = {"base": str(base_dir), "kept": kept, "reason": reason, "train_images": list(train_stems),
              "held_out_images": list(hold_stems), "before": _plain(before), "after": _plain(after), "steps": steps,
              "training_seconds": round(train_s, 1), "scale": scale, "settings": asdict(cfg)}
    if per_round:
        record["rounds"] = per_round
    if net is None:
        net, _, _ = load_network(base_dir)  # the base's own network, its stages as its config says
    tmp = out_dir.with_name(out_dir.name + ".writing")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_folder(net, tmp, _own_config(config, record), thresholds, card=_card(out_dir.name, record))
    add_graph_to_folder(tmp)  # CPU inference through ONNX Runtime, as the shipped models run
    if rejected is not None:
        r_net, r_config, r_thresholds = rejected
        r_record = {**record, "kept": "fine-tuned (rejected: not better than the base on the held-out images)"}
        save_model_folder(r_net, tmp / "rejected", _own_config({**r_config, "name": f"{out_dir.name}/rejected"}, r_record),
                          r_thresholds, card=_card(f"{out_dir.name}/rejected", r_record))
    for i, (r_net, r_config, r_thresholds) in enumerate(round_nets or [], start=1):
        r_record = {**record, "kept": f"round {i} of the rotation (trained without {', '.join(per_round[i - 1]['held_out'])})"}
        save_model_folder(r_net, tmp / "rounds" / str(i), _own_config(r_config, r_record), r_thresholds,
                          card=_card(f"{out_dir.name}/rounds/{i}", r_record))
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _plain(d: dict) -> dict:
    return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in d.items()}


def _card(name: str, r: dict) -> str:
    def cell(v, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, (int, float)) and np.isfinite(v) else "-"

    def row(key: str, fmt: str) -> str:
        return f"| {key} | {cell(r['before'].get(key), fmt)} | {cell(r['after'].get(key), fmt)} |"

    lines = [f"# {name}", "", f"Fine-tuned from `{r['base']}` with `emparticles finetune`.", "",
             f"**Kept: {r['kept']}.** {r['reason']}.", "",
             f"- training images ({len(r['train_images'])}): {', '.join(r['train_images'])}",
             f"- held-out images ({len(r['held_out_images'])}): {', '.join(r['held_out_images']) or 'none'}",
             (f"- {r['steps']} steps in {r['training_seconds']:.0f} s (budget {r['settings']['minutes']} min for "
              f"the whole run), crops resampled around x{r['scale']:.2f}"), ""]
    agglomerates = r["settings"].get("outlines") == "agglomerates"
    if agglomerates:
        lines[-1:-1] = [("- the annotations outline agglomerates: the network learnt particle against substrate from "
                         "them, and where particles part from the base's own particles; the post-processing is the base's")]
    if r["before"]:
        level = "agglomerates (the predicted particles grouped, 8-connected)" if agglomerates else "particles"
        lines += [f"Held-out images, base against fine-tuned, as {level}, IoU 0.5:", "", "| | base | fine-tuned |", "|---|---|---|",
                  row("f1", ".3f"), row("precision", ".3f"), row("recall", ".3f"), row("panoptic_quality", ".3f"),
                  row("foreground_iou", ".3f"), row("count_ratio", ".2f"), row("d50_rel_error", "+.1%"), ""]
    if r.get("rounds"):
        lines += [(f"The held-out images rotated over {len(r['rounds'])} rounds: each round trained from the base "
                   "without its images, and its model scored them (`rounds/N`). The weights above are the mean of the "
                   "rounds' weights, their post-processing retuned on all the images."), "",
                  "| round | held out | steps | F1 base -> round | foreground IoU base -> round |", "|---|---|---|---|---|"]
        lines += [f"| {i} | {', '.join(x['held_out'])} | {x['steps']} | {cell(x['before'].get('f1'), '.3f')} -> "
                  f"{cell(x['after'].get('f1'), '.3f')} | {cell(x['before'].get('foreground_iou'), '.3f')} -> "
                  f"{cell(x['after'].get('foreground_iou'), '.3f')} |" for i, x in enumerate(r["rounds"], start=1)]
        lines += [""]
    lines += ["These figures come from a few images of one series: check the model on more before relying on it.", ""]
    return "\n".join(lines)
