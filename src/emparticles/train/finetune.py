"""Fine-tuning a trained model on a handful of a lab's own annotated (or corrected) images, within
a time budget, on a CPU, and only keeping the result when it is better.

The road:

1. Hold out a quarter of the images (at least one, whole sources; from three images on) to judge
   base against fine-tuned; with fewer, nothing is held out and the card says so.
2. Ask the base model's scale search at which resampling it sees these images' particles, and
   train on crops resampled around that scale (x0.8-1.25), with strong augmentation.
3. Adapt the decoder at the full learning rate and the encoder at a third of it; batch-norm
   statistics stay the base's (a few images would pull them off). Warm-up, then cosine decay,
   laid out over the time left for training, so the run ends on time.
4. Retune the post-processing on the training images.
5. Score the held-out images with the base and with the fine-tuned model; keep the fine-tuned
   weights only when F1 at IoU 0.5 and foreground IoU gain together (:data:`MIN_GAIN`) without F1
   dropping by more than :data:`MAX_F1_LOSS`; else keep the base's, and say so. The folder records
   the attempt either way; a rejected attempt's weights are kept beside, in ``rejected/``.

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
#: and F1 loses at most MAX_F1_LOSS
MIN_GAIN = 0.01
MAX_F1_LOSS = 0.01


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


def held_out(stems: list[str], images_dir: Path) -> tuple[list[str], list[str]]:
    """(training stems, held-out stems): :data:`HOLDOUT_SHARE` of the images, whole sources,
    from :data:`MIN_IMAGES_FOR_HOLDOUT` images on; else nothing held out."""
    from .splits import source_groups, split_by_source

    if len(stems) < MIN_IMAGES_FOR_HOLDOUT:
        return list(stems), []
    groups, _ = source_groups(images_dir, stems)
    if len(set(groups.values())) < 2:  # one source: hold out frames of it rather than nothing
        groups = {s: s for s in stems}
    parts = split_by_source(groups, validation=HOLDOUT_SHARE, test=0.0)
    return parts["train"], parts["validation"]


def figures(seg, data) -> dict:
    """F1, precision, recall, PQ at IoU 0.5, foreground IoU, count ratio and D50 error of a
    segmenter's whole road on normalised (image, labels) pairs."""
    from ..evaluate import label_size_agreement
    from .loop import pooled_figures

    preds = [seg.segment_normalised(img)[0].labels for img, _ in data]
    out = pooled_figures(zip([lab for _, lab in data], preds))
    out["d50_rel_error"] = label_size_agreement([lab for _, lab in data], preds)["d50_rel_error"]
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


def finetune(data: list[tuple[str, np.ndarray, np.ndarray]], out_dir: Path, cfg: FinetuneConfig,
             images_dir: Path | None = None, log: Callable[[str], None] = print,
             progress: Callable[[float, str], None] | None = None) -> FinetuneResult:
    """Fine-tune ``cfg.base`` on ``data`` ((stem, normalised image, labels) from
    :func:`read_annotated`) into the model folder ``out_dir`` within ``cfg.minutes``; see the
    module's docstring. ``progress(fraction of the budget, what)`` is called as time passes."""
    from ..inference import pick_device
    from ..models.cnn import CNNSegmenter, load_network
    from .data import augmented_sample, augmenter
    from .loop import COUNT_RANGE, segmentation_loss, tune_thresholds
    from .targets import class_weights, three_class_target

    started = time.monotonic()
    budget = 60.0 * cfg.minutes
    report = progress or (lambda f, m: None)
    out_dir = Path(out_dir)
    base_dir = resolve_base(cfg.base)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    by_stem = {s: (img, lab) for s, img, lab in data}
    train_stems, hold_stems = held_out(list(by_stem), images_dir or Path("."))
    train_data = [by_stem[s] for s in train_stems]
    hold_data = [by_stem[s] for s in hold_stems]
    log(f"{len(train_data)} training image(s)" + (f", {len(hold_data)} held out to judge the result"
                                                  if hold_data else "; too few to hold any out (3 or more needed): "
                                                  "the result cannot be checked"))
    base_seg = CNNSegmenter(base_dir, str(device), onnx=False)
    base_config = dict(base_seg.config)
    # 1. the base's scale for these images, and its held-out figures
    t_scale = time.monotonic()
    scales = [base_seg.choose_scale(img)[0] if base_config.get("scale_search") else 1.0 for img, _ in train_data]
    scale = float(np.median(scales))
    per_image_s = (time.monotonic() - t_scale) / max(1, len(train_data))
    t_eval = time.monotonic()
    before = figures(base_seg, hold_data) if hold_data else {}
    if hold_data:
        per_image_s = (time.monotonic() - t_eval) / len(hold_data)
    if before:
        log(f"base {base_dir.name} on the held-out images: F1 {before['f1']:.3f}, foreground IoU "
            f"{before['foreground_iou']:.3f}, count ratio {before['count_ratio']:.2f}")
    # the base's folder first: a usable model whatever happens next
    _write_folder(out_dir, base_dir, None, base_config, base_seg.thresholds, cfg, "base (not yet fine-tuned)",
                  "fine-tuning has not finished", train_stems, hold_stems, before, {}, 0, 0.0, scale)
    # 2. training, within the time left after scoring and tuning
    net, _, _ = load_network(base_dir, device)
    net.train()
    _freeze_batchnorm(net)
    opt = torch.optim.AdamW(_param_groups(net, cfg.lr, cfg.encoder_lr_factor), weight_decay=1e-4)
    weights = torch.from_numpy(class_weights([three_class_target(lab, int(base_config.get("border_width", 2)))
                                              for _, lab in train_data])).to(device)
    aug = augmenter(cfg.crop, (scale * 0.8, scale * 1.25))
    # kept for what follows training: scoring the held-out images again, and for the retuning one
    # segmentation of each training image plus about 45 post-processing trials of its map
    # (on a loaded machine these took up to twice the estimate, hence the margin)
    reserve = 1.5 * (per_image_s * (len(hold_data) + (1.5 * len(train_data) if cfg.tune else 0))
                     + (8.0 * len(train_data) if cfg.tune else 0)) + 15.0
    train_until = started + max(budget * 0.3, budget - min(reserve, 0.6 * budget))
    t_train = time.monotonic()
    steps, last_good, interrupted, diverged = 0, copy.deepcopy(net.state_dict()), False, ""
    try:
        while time.monotonic() < train_until:
            fraction = (time.monotonic() - t_train) / max(1e-9, train_until - t_train)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * schedule(fraction, cfg.warmup_share)
            batch = [augmented_sample(aug, *train_data[int(rng.integers(len(train_data)))],
                                      int(base_config.get("border_width", 2))) for _ in range(cfg.batch_size)]
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
            report((time.monotonic() - started) / budget, f"fine-tuning, step {steps}, loss {float(loss.detach()):.3f}")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: judging the weights so far against the base (Ctrl-C again to keep the base)")
    net.eval()
    train_s = time.monotonic() - t_train
    # 3. post-processing retuned on the training images, then the held-out verdict
    tuned_config = {**base_config, "name": out_dir.name, "finetuned_from": base_config.get("name", base_dir.name)}
    thresholds = dict(base_seg.thresholds)
    try:
        _write_folder(out_dir, base_dir, net, tuned_config, thresholds, cfg, "fine-tuned (not yet judged)",
                      "scoring", train_stems, hold_stems, before, {}, steps, train_s, scale)
        seg = CNNSegmenter(out_dir, str(device), onnx=False)
        if cfg.tune and not interrupted:
            report((time.monotonic() - started) / budget, "retuning the post-processing")
            probs = [seg.searched(img)[2].probabilities if base_config.get("scale_search")
                     else seg.at_scale(img, 1.0)[1].probabilities for img, _ in train_data]
            thresholds, _ = tune_thresholds(probs, train_data, start=thresholds, count_range=COUNT_RANGE)
            seg.thresholds = thresholds
        report((time.monotonic() - started) / budget, "scoring the held-out images")
        after = figures(seg, hold_data) if hold_data else {}
    except KeyboardInterrupt:
        _write_folder(out_dir, base_dir, None, base_config, base_seg.thresholds, cfg, "base (interrupted)",
                      "interrupted before the fine-tuned weights could be judged: the base's weights are kept",
                      train_stems, hold_stems, before, {}, steps, train_s, scale)
        return FinetuneResult(out_dir, "base (interrupted)", "interrupted before judging", train_stems, hold_stems,
                              before, {}, steps, time.monotonic() - started, scale)
    if hold_data:
        gain = (after["f1"] - before["f1"], after["foreground_iou"] - before["foreground_iou"])
        # better: F1 and foreground IoU together gain, and F1 does not drop by more than a
        # particle or two of the held-out images (on one silica frame: F1 0.842 -> 0.836 is one
        # particle, while foreground IoU rose 0.885 -> 0.920)
        better = gain[0] + gain[1] > MIN_GAIN and gain[0] > -MAX_F1_LOSS
        reason = (f"held-out F1 {before['f1']:.3f} -> {after['f1']:.3f}, foreground IoU {before['foreground_iou']:.3f} "
                  f"-> {after['foreground_iou']:.3f}")
    else:
        better, reason = True, "no held-out images to judge it (fewer than 3 annotated): kept unchecked"
    if diverged:
        reason = f"{diverged}; {reason}"
    kept = "fine-tuned" if better else "base"
    if interrupted:
        reason = f"interrupted after {train_s:.0f} s of training; {reason}"
    if better:
        _write_folder(out_dir, base_dir, net, tuned_config, thresholds, cfg, kept, reason, train_stems, hold_stems,
                      before, after, steps, train_s, scale)
    else:
        reason = (f"not better than the base, so the base's weights are kept: {reason}; the attempt is in "
                  f"{out_dir.name}/rejected")
        _write_folder(out_dir, base_dir, None, {**base_config, "name": out_dir.name}, base_seg.thresholds, cfg, kept,
                      reason, train_stems, hold_stems, before, after, steps, train_s, scale,
                      rejected=(net, tuned_config, thresholds))
    log(f"{kept} model -> {out_dir} ({reason})")
    report(1.0, "done")
    return FinetuneResult(out_dir, kept, reason, train_stems, hold_stems, before, after, steps,
                          time.monotonic() - started, scale)


def _write_folder(out_dir: Path, base_dir: Path, net, config: dict, thresholds: dict, cfg: FinetuneConfig, kept: str,
                  reason: str, train_stems, hold_stems, before: dict, after: dict, steps: int, train_s: float,
                  scale: float, rejected: tuple | None = None) -> None:
    """The model folder (weights of ``net``, or the base's when None) with the record of the run
    in ``config.json`` (``finetune``) and ``MODEL_CARD.md``. Written to a temporary folder and
    swapped in, so that an interruption never leaves a half-written model. ``rejected``: (net,
    config, thresholds) of a fine-tuned attempt that was not kept, written as a model folder of
    its own in ``rejected/`` (``--model MODEL_DIR/rejected`` tries it; the judgement rests on a
    few held-out images, and the user may know better)."""
    import shutil

    from ..models.cnn import load_network, save_model_folder

    record = {"base": str(base_dir), "kept": kept, "reason": reason, "train_images": list(train_stems),
              "held_out_images": list(hold_stems), "before": _plain(before), "after": _plain(after), "steps": steps,
              "training_seconds": round(train_s, 1), "scale": scale, "settings": asdict(cfg)}
    if net is None:
        net, _, _ = load_network(base_dir)  # the base's own network, its stages as its config says
    tmp = out_dir.with_name(out_dir.name + ".writing")
    shutil.rmtree(tmp, ignore_errors=True)
    config = {k: v for k, v in config.items() if k != "validation_tuned"}
    save_model_folder(net, tmp, {**config, "finetune": record}, thresholds, card=_card(out_dir.name, record))
    if rejected is not None:
        r_net, r_config, r_thresholds = rejected
        r_config = {k: v for k, v in r_config.items() if k != "validation_tuned"}
        r_record = {**record, "kept": "fine-tuned (rejected: not better than the base on the held-out images)"}
        save_model_folder(r_net, tmp / "rejected", {**r_config, "name": f"{out_dir.name}/rejected", "finetune": r_record},
                          r_thresholds, card=_card(f"{out_dir.name}/rejected", r_record))
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
    if r["before"]:
        lines += ["Held-out images, base against fine-tuned (IoU 0.5):", "", "| | base | fine-tuned |", "|---|---|---|",
                  row("f1", ".3f"), row("precision", ".3f"), row("recall", ".3f"), row("panoptic_quality", ".3f"),
                  row("foreground_iou", ".3f"), row("count_ratio", ".2f"), row("d50_rel_error", "+.1%"), ""]
    lines += ["These figures come from a few images of one series: check the model on more before relying on it.", ""]
    return "\n".join(lines)
