"""Training a particle Mask R-CNN: heads first, then the whole network; SGD with momentum 0.9,
learning rate 1e-3 then 1e-4, weight decay 1e-4, gradient clipping at 5; validation on
instance F1 each epoch, best model kept, resumable from its checkpoint."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..evaluate import matching
from ..inference import pick_device
from ..models.maskrcnn import MASKRCNN_ARCHITECTURES, MIN_CONTRAST, build_maskrcnn, instance_targets
from .data import (
    BatchWorkers,
    PasteSource,
    TimedBatches,
    augmenter,
    epoch_batches,
    find_pairs,
    load_pair,
    split_validation,
    training_sources,
)
from .lock import run_folder_lock
from .loop import append_metrics, load_checkpoint, pick_sample, save_checkpoint


@dataclass
class MaskRCNNConfig:
    """Settings of a Mask R-CNN training run; saved with the model."""

    arch: str = "maskrcnn-resnet18-fpn"
    epochs: int = 20
    heads_epochs: int = 2  # backbone body frozen for these first epochs
    lr_drop_epoch: int = 15  # learning rate x0.1 from this epoch on
    steps_per_epoch: int = 100
    batch_size: int = 2
    crop: int = 512
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    clip: float = 5.0
    val_fraction: float = 0.15
    scale_min: float = 0.6
    scale_max: float = 1.8
    tile: int = 512
    overlap: int = 96
    seed: int = 0
    device: str = "auto"
    max_val_images: int = 0  # 0 = all
    workers: int = 0  # processes that build the augmented batches (0: the training process itself)
    extra_images: str = ""  # a second annotated set used for training only (e.g. synthetic SEM)
    extra_masks: str = ""
    extra_fraction: float = 0.3  # share of training crops drawn from the extra set
    paste_fraction: float = 0.0  # share of crops made by pasting training agglomerates on empty backgrounds


def _save(net, folder: Path, cfg: MaskRCNNConfig, epoch: int, val: dict) -> Path:
    from ..models.cnn import save_model_folder

    config = {"kind": "maskrcnn", "name": cfg.arch, "arch": cfg.arch, "classes": 2, "tile": cfg.tile,
              "overlap": cfg.overlap, "detections": 3000, "score_threshold": 0.5, "mask_threshold": 0.5,
              "min_contrast": MIN_CONTRAST,
              "epoch": epoch, "validation": val, "train_config": asdict(cfg),
              "description": MASKRCNN_ARCHITECTURES[cfg.arch][1]}
    return save_model_folder(net, folder, config)


def validate_maskrcnn(folder: Path, val_data, device) -> dict:
    """Pooled instance F1 at IoU 0.5 of a saved model folder on (image, labels) pairs."""
    from ..models.maskrcnn import MaskRCNNSegmenter

    seg = MaskRCNNSegmenter(folder, str(device))
    tp = nt = npred = 0
    for img, labels in val_data:
        inst = seg.detect(img)
        m = matching(labels, inst.labels, 0.5)
        tp, nt, npred = tp + m.tp, nt + m.n_true, npred + m.n_pred
    return {"f1": 2 * tp / (nt + npred) if nt + npred else 1.0, "precision": tp / npred if npred else 0.0,
            "recall": tp / nt if nt else 0.0, "count_ratio": npred / nt if nt else float("nan")}


def train_maskrcnn(images_dir: Path, masks_dir: Path, out_dir: Path, cfg: MaskRCNNConfig, resume: bool = False,
                   log=print, stop_after_s: float | None = None) -> Path:
    """Train; the best model folder ends in ``out_dir/best``, the checkpoint in ``out_dir/checkpoint.pt``.
    With ``stop_after_s`` the run stops after the first epoch that ends past that many seconds
    (continue with ``resume``). One process at a time trains into ``out_dir``
    (:func:`~emparticles.train.lock.run_folder_lock`)."""
    with run_folder_lock(out_dir):
        return _train_maskrcnn(images_dir, masks_dir, out_dir, cfg, resume, log, stop_after_s)


def _batch(rng: np.random.Generator, aug, train_data: Sequence, batch_size: int, extra_data: Sequence = (),
           extra_fraction: float = 0.0, paste: PasteSource | None = None, paste_fraction: float = 0.0,
           paste_size: int = 512):
    """``batch_size`` augmented crops: images as (1, h, w) float32 tensors in [0, 1] and their
    torchvision targets (boxes, labels, masks), on the CPU. Each crop comes from ``extra_data``
    with probability ``extra_fraction``, from pasted agglomerates with ``paste_fraction``
    (as for the U-Nets, :func:`~emparticles.train.loop.pick_sample`), else from ``train_data``."""
    images, targets = [], []
    for _ in range(batch_size):
        img, lab = pick_sample(rng, train_data, extra_data, extra_fraction, paste, paste_fraction, paste_size)
        out = aug(image=img, mask=lab.astype(np.int32))
        images.append(torch.from_numpy(out["image"].astype(np.float32))[None])
        targets.append(instance_targets(out["mask"]))
    return images, targets


def _train_maskrcnn(images_dir: Path, masks_dir: Path, out_dir: Path, cfg: MaskRCNNConfig, resume: bool, log,
                    stop_after_s: float | None = None) -> Path:
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = pick_device(cfg.device)
    train_pairs, val_pairs = split_validation(find_pairs(images_dir, masks_dir), cfg.val_fraction)
    if cfg.max_val_images:
        val_pairs = val_pairs[: cfg.max_val_images]
    log(f"{len(train_pairs)} training and {len(val_pairs)} validation images")
    train_data = [load_pair(i, m) for i, m in train_pairs]
    val_data = [load_pair(i, m) for i, m in val_pairs]
    train_data, extra_data, paste = training_sources(train_data, cfg.extra_images, cfg.extra_masks, cfg.extra_fraction,
                                                     cfg.paste_fraction, cfg.workers, log)
    net = build_maskrcnn(cfg.arch).to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    ckpt_path = out_dir / "checkpoint.pt"
    start_epoch, best_f1 = load_checkpoint(ckpt_path, net, opt, device) if resume else (0, -1.0)
    if start_epoch:
        rng = np.random.default_rng(cfg.seed + start_epoch)
        log(f"resumed after epoch {start_epoch} (best F1 {best_f1:.3f})")
    aug = augmenter(cfg.crop, (cfg.scale_min, cfg.scale_max))
    make = partial(_batch, aug=aug, train_data=train_data, batch_size=cfg.batch_size, extra_data=extra_data,
                   extra_fraction=cfg.extra_fraction, paste=paste, paste_fraction=cfg.paste_fraction,
                   paste_size=int(cfg.crop * cfg.scale_max))
    pool = (BatchWorkers(make, cfg.steps_per_epoch, cfg.seed, start_epoch, cfg.workers)
            if cfg.workers > 0 and start_epoch < cfg.epochs else None)
    for epoch in range(start_epoch, cfg.epochs):
        heads_only = epoch < cfg.heads_epochs
        for p in net.backbone.body.parameters():
            p.requires_grad_(not heads_only)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * (0.1 if epoch >= cfg.lr_drop_epoch else 1.0)
        net.train()
        t0, losses = time.perf_counter(), []
        source = pool.epoch(epoch) if pool is not None else epoch_batches(make, cfg.steps_per_epoch, rng, cfg.seed,
                                                                          epoch, cfg.workers)
        timed = TimedBatches(source)
        for images, targets in timed:
            images = [im.to(device) for im in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            loss = sum(net(images, targets).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], cfg.clip)
            opt.step()
            losses.append(float(loss.item()))
        train_s = time.perf_counter() - t0
        last = _save(net, out_dir / "last", cfg, epoch + 1, {})
        val = validate_maskrcnn(last, val_data, device)
        row = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "lr": opt.param_groups[0]["lr"],
               "heads_only": heads_only, "train_s": round(train_s, 1),
               "batch_wait_s": round(timed.wait_s, 1), **{f"val_{k}": v for k, v in val.items()}}
        append_metrics(out_dir / "metrics.csv", row)
        log(f"epoch {epoch + 1}/{cfg.epochs} loss {row['loss']:.3f} val F1 {val['f1']:.3f} "
            f"count {val['count_ratio']:.2f} ({train_s:.0f} s, {timed.wait_s:.0f} s of it waiting for batches)")
        if val["f1"] > best_f1:
            best_f1 = val["f1"]
            _save(net, out_dir / "best", cfg, epoch + 1, val)
        save_checkpoint(ckpt_path, net, opt, epoch, best_f1)
        if stop_after_s is not None and time.perf_counter() - started > stop_after_s and epoch + 1 < cfg.epochs:
            log(f"stopped after epoch {epoch + 1} ({stop_after_s:.0f} s budget); continue with --resume")
            break
    log(f"best validation F1 {best_f1:.3f} -> {out_dir / 'best'}")
    return out_dir / "best"
