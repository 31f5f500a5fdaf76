"""Train a particle Mask R-CNN on EMPS (../shared/data/emps-train) and print its validation F1.

    python benchmarks/train_maskrcnn.py OUT_DIR [--arch maskrcnn-resnet18-fpn] [--epochs 20]
        [--steps 100] [--crop 512] [--heads-epochs 2] [--device auto] [--resume]

Resumable: re-run with --resume. On two CPU cores one step of 2 crops of 384x384 takes about
4 s for the ResNet-18 model, so a useful training (thousands of steps) wants a GPU:

    python benchmarks/train_maskrcnn.py runs/mrcnn50 --arch maskrcnn-resnet50-fpn --epochs 40 \\
        --steps 250 --crop 512 --batch-size 4 --device cuda

The validation split is the same hash split as the U-Net runs, so the figures compare.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from emparticles.train.maskrcnn import MaskRCNNConfig, train_maskrcnn

EMPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "emps-train"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--arch", default="maskrcnn-resnet18-fpn")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--heads-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-val-images", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--data", type=Path, default=EMPS, help="folder with images/ and segmaps/ (default: EMPS)")
    parser.add_argument("--workers", type=int, default=0, help="processes building the batches (for a GPU)")
    parser.add_argument("--extra-images", default="", help="a second set for training only (e.g. synthetic SEM)")
    parser.add_argument("--extra-masks", default="")
    parser.add_argument("--extra-fraction", type=float, default=0.3)
    parser.add_argument("--paste-fraction", type=float, default=0.0,
                        help="share of crops made by pasting training agglomerates on empty backgrounds")
    parser.add_argument("--stop-after-minutes", type=float, default=None,
                        help="stop after the first epoch that ends past this time; continue with --resume")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = MaskRCNNConfig(arch=args.arch, epochs=args.epochs, heads_epochs=args.heads_epochs, steps_per_epoch=args.steps,
                         batch_size=args.batch_size, crop=args.crop, lr=args.lr, device=args.device,
                         lr_drop_epoch=max(1, int(0.75 * args.epochs)), max_val_images=args.max_val_images, workers=args.workers,
                         extra_images=args.extra_images, extra_masks=args.extra_masks, extra_fraction=args.extra_fraction,
                         paste_fraction=args.paste_fraction)
    stop = None if args.stop_after_minutes is None else 60 * args.stop_after_minutes
    best = train_maskrcnn(args.data / "images", args.data / "segmaps", args.out, cfg, resume=args.resume,
                          log=lambda m: print(m, flush=True), stop_after_s=stop)
    print(f"best model: {best}")


if __name__ == "__main__":
    main()
