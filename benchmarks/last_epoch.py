"""A run's last epoch as a model folder, to compare networks at an equal number of steps.

    python benchmarks/last_epoch.py RUN [--thresholds FOLDER] [--out RUN/last]

Writes the weights of ``RUN/checkpoint.pt`` (read with ``weights_only=True``) with
``RUN/best/config.json`` (``RUN/best-epoch`` while a run that averages epochs is going), and
the post-processing of ``--thresholds`` (a model folder or a registered name; default
``RUN/best``), so that two runs can be scored with the same post-processing and only their
networks differ.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--thresholds", default=None, help="model folder or registered name whose thresholds.json to use")
    parser.add_argument("--out", type=Path, default=None, help="default: RUN/last")
    args = parser.parse_args()
    from emparticles.models.registry import MODELS, SHIPPED_DIR

    source = Path(args.thresholds) if args.thresholds else args.run / "best"
    if args.thresholds in MODELS and not source.exists():
        source = SHIPPED_DIR / args.thresholds
    out = args.out or args.run / "last"
    checkpoint = torch.load(args.run / "checkpoint.pt", map_location="cpu", weights_only=True)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in checkpoint["net"].items()}, str(out / "weights.safetensors"))
    # a run that averages its last epochs writes RUN/best at its end only; RUN/best-epoch before
    best = args.run / "best" if (args.run / "best" / "config.json").exists() else args.run / "best-epoch"
    shutil.copy(best / "config.json", out / "config.json")
    shutil.copy(source / "thresholds.json", out / "thresholds.json")
    print(f"epoch {int(checkpoint['epoch']) + 1} of {args.run} -> {out} (post-processing of {source})")


if __name__ == "__main__":
    main()
