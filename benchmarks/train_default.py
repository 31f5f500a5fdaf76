"""Train the default model on EMPS (../shared/data/emps-train) and print its validation figures.

    python benchmarks/train_default.py OUT_DIR [--epochs 24] [--steps 60] [--resume]
        [--real-set ../shared/data/sem-silica 0.15 instances] [--real-sets-shipped]
        [--device cuda --workers 12 --stop-after-minutes 8 --no-tune]

Every set is split by source (EMPS by article, silica by sample group, agglomerates by sample):
15% of the images for validation (choosing the epoch and the post-processing), 15% held out of
training and of every choice (``RUN/split.json`` lists them; ``benchmarks/all_sets.py`` scores
them).

Resumable: re-run with --resume after an interruption. The best model folder ends in OUT_DIR/best.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from emparticles.train.loop import TrainConfig, train

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EMPS = DATA / "emps-train"
#: The real SEM sets beside EMPS, with their share of the training crops (--real-sets-shipped)
REAL_SETS = [(DATA / "sem-silica", 0.15, "instances"), (DATA / "sem-agglomerates", 0.1, "foreground")]


def real_set(folder: Path, share: float, kind: str) -> dict:
    """A --real-set: FOLDER/images with FOLDER/segmaps (or FOLDER/masks)."""
    folder = Path(folder)
    masks = folder / "segmaps" if (folder / "segmaps").is_dir() else folder / "masks"
    return {"images": str(folder / "images"), "masks": str(masks), "share": share, "kind": kind}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--arch", default="compact-unet")
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--scale", type=float, nargs=2, default=(0.5, 2.0), metavar=("MIN", "MAX"))
    parser.add_argument("--border-width", type=int, default=2)
    parser.add_argument("--class-weighting", default="border", choices=["border", "tempered"])
    parser.add_argument("--extra-images", default="", help="a second set for training only (e.g. synthetic SEM)")
    parser.add_argument("--extra-masks", default="")
    parser.add_argument("--extra-fraction", type=float, default=0.3)
    parser.add_argument("--focus-fraction", type=float, default=0.0,
                        help="share of crops placed to hold an annotated pixel (foreground oversampling)")
    parser.add_argument("--paste-fraction", type=float, default=0.0,
                        help="share of crops made by pasting training agglomerates on empty backgrounds")
    parser.add_argument("--init-from", default="", help="model folder whose weights start the training")
    parser.add_argument("--distance-head", action="store_true",
                        help="a fourth output, the distance to each particle's outline, whose seeds part touching particles")
    parser.add_argument("--local-contrast", type=float, default=0.0, metavar="PX",
                        help="local contrast normalisation of this sigma (px) as the network's first stage")
    parser.add_argument("--average-epochs", type=int, default=0,
                        help="the model is the mean of the weights after each of the last N epochs")
    parser.add_argument("--real-set", nargs=3, action="append", default=[], metavar=("FOLDER", "SHARE", "KIND"),
                        help="another annotated real set (FOLDER/images + FOLDER/segmaps or masks), its share of "
                             "the crops, and 'instances' or 'foreground' (agglomerate-level masks)")
    parser.add_argument("--real-sets-shipped", action="store_true",
                        help="add ../shared/data/sem-silica (15%% of crops) and sem-agglomerates (10%%, foreground)")
    parser.add_argument("--test-fraction", type=float, default=0.15,
                        help="share of each set's images (whole sources) held out of training and validation")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=EMPS, help="folder with images/ and segmaps/ (default: EMPS)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--workers", type=int, default=0, help="processes building the batches (for a GPU)")
    parser.add_argument("--no-tune", action="store_true",
                        help="leave the post-processing untuned (run benchmarks/retune.py later)")
    parser.add_argument("--stop-after-minutes", type=float, default=None,
                        help="stop after the first epoch that ends past this time; continue with --resume")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(arch=args.arch, epochs=args.epochs, steps_per_epoch=args.steps, batch_size=args.batch_size, lr=args.lr,
                      crop=args.crop, scale_min=args.scale[0], scale_max=args.scale[1], border_width=args.border_width,
                      extra_images=args.extra_images, extra_masks=args.extra_masks, extra_fraction=args.extra_fraction, paste_fraction=args.paste_fraction,
                      focus_fraction=args.focus_fraction,
                      init_from=args.init_from, class_weighting=args.class_weighting,
                      average_epochs=args.average_epochs, device=args.device, workers=args.workers,
                      test_fraction=args.test_fraction, distance_head=args.distance_head,
                      local_contrast_px=args.local_contrast,
                      real_sets=[real_set(Path(f), float(sh), k) for f, sh, k in args.real_set]
                      + ([real_set(f, sh, k) for f, sh, k in REAL_SETS] if args.real_sets_shipped else []))
    stop = None if args.stop_after_minutes is None else 60 * args.stop_after_minutes
    best = train(args.data / "images", args.data / "segmaps", args.out, cfg, resume=args.resume,
                 log=lambda m: print(m, flush=True), tune=not args.no_tune, stop_after_s=stop)
    print(f"best model: {best}")


if __name__ == "__main__":
    main()
