"""Copy a trained model folder into the package (as a registered, offline model) with its card.

    python benchmarks/package_model.py RUN/best NAME [--metrics metrics.json] [--description TEXT] [--default]

Writes src/emparticles/models/weights/NAME/{config.json, weights.safetensors, thresholds.json,
MODEL_CARD.md, network.onnx}: the last is the fp32 graph that ONNX Runtime runs on CPU, its
weights read from weights.safetensors (an int8 graph of the folder is copied instead). Refuses weights above 30 MB.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from emparticles.models.onnx import add_graph_to_folder

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "emparticles" / "models" / "weights"


def _extra_data(tc: dict) -> list[str]:
    """Card lines for the training crops that did not come from EMPS."""
    lines = []
    if tc.get("extra_images"):
        lines.append(f"{100 * float(tc.get('extra_fraction', 0)):.0f}% of the training crops came from synthetic SEM "
                     f"images (`{tc['extra_images']}`, made by `emparticles synth`: agglomerates of round, faceted, "
                     "elliptical and rod-like particles, half with an info bar; exact masks).")
    if float(tc.get("paste_fraction") or 0) > 0:
        lines.append(f"{100 * float(tc['paste_fraction']):.0f}% were made by pasting agglomerates cut from the EMPS "
                     "training images (never the validation ones) on empty synthetic SEM backgrounds.")
    return ["", " ".join(lines)] if lines else []


def card(name: str, config: dict, metrics: dict | None, thresholds: dict | None = None) -> str:
    tc = config.get("train_config", {})
    lines = [
        f"# {name}",
        "",
        (f"Architecture `{config['arch']}`, 3 classes (background / particle / particle border), one grey input "
        f"channel normalised per image ({config.get('normalisation', '')}). "
        + (f"Fine-tuned from the weights of `{tc['init_from']}`; no externally pretrained weights."
           if tc.get("init_from") else "Random initialisation; no pretrained weights.")),
        "",
        "## Training data",
        ("EMPS training split (366 electron micrographs with hand-drawn instance masks; Yildirim & Cole, "
        "J. Chem. Inf. Model. 61 (2021) 1136, MIT licence), of which a hash-based 15% was held out for validation "
        "(never trained on). Mostly TEM figure crops" + ("." if tc.get("extra_images") else "; no SEM agglomerates, no info bars.")),
        *_extra_data(tc),
        "",
        "## Training",
        (f"{tc.get('epochs')} epochs x {tc.get('steps_per_epoch')} steps, batch {tc.get('batch_size')} random "
        f"{tc.get('crop')}x{tc.get('crop')} crops, scale augmentation {tc.get('scale_min')}-{tc.get('scale_max')}x, flips, "
        "rotations, elastic/grid/optical distortion, brightness/contrast/gamma, blur, noise; weighted cross-entropy + Dice"
        f"{' (class weights on the border class only)' if tc.get('class_weighting') == 'border' else ''}; "
        f"AdamW one-cycle (peak lr {tc.get('lr')}); border width {config.get('border_width')} px; best epoch {config.get('epoch')} "
        "chosen on validation instance F1 at IoU 0.5. CPU only (2 cores)."),
        "",
    ]
    search = config.get("scale_search")
    if search:
        lines += ["", "## Inference", (
            f"The image is resampled before the network by the scale at which its particles score best (mean "
            f"foreground probability of the particles found): scales {search.get('start')} first, then climbing "
            f"through {search.get('up')} or {search.get('down')} (both when the start scales score within "
            f"{search.get('tie', 0)}) while the score improves; images over "
            f"{search.get('max_pixels')} pixels choose on a centred crop. Particles are separated at the resampled "
            "size and brought back by nearest neighbour. `--particle-size` replaces the search by one resampling "
            "that brings the given diameter to 60 px.")]
    outline = (thresholds or {}).get("outline_threshold")
    if outline is not None:
        lines += ["", (f"Outlines are then cut where the probability of particle or border, interpolated to full "
                       f"size, exceeds {outline} (`outline_threshold` in thresholds.json, tuned on the validation "
                       "images for panoptic quality plus foreground IoU); each particle keeps its largest piece.")]
    if config.get("pad") is not None:
        lines += ["", (f"Tiles are {config.get('tile')} px overlapping by {config.get('overlap')} px; the image's "
                       f"borders get {config['pad']} px of mirrored context"
                       + (" (none: this model scored better without it on its validation images)."
                          if int(config["pad"]) == 0 else "."))]
    onnx = config.get("onnx") or {}
    if onnx:
        lines += ["", (f"On CPU the network runs as `{onnx.get('file')}` in {onnx.get('precision')} with ONNX Runtime "
                       "when it is installed (`pip install emparticles[onnx]`), else from the safetensors weights.")]
    lines += [
        "",
        "## Validation figures (held-out EMPS images)",
    ]
    val = config.get("validation_tuned") or config.get("validation") or {}
    for k, v in val.items():
        lines.append(f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}")
    if metrics:
        lines += ["", "Full evaluation (`benchmarks/bench_segment.py`):"]
        for k, v in metrics.items():
            lines.append(f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}")
    limits = ("Its real training images are TEM-like figure crops; SEM agglomerates were seen only in synthetic images. "
              "Very small (< 8 px) or very large particles and strongly textured substrates are outside its training data."
              if tc.get("extra_images") else
              "Trained on TEM-like figure crops: SEM images of agglomerates, very small (< 8 px) or "
              "very large particles, and strongly textured substrates are outside its training data.")
    lines += ["", "## Limits", limits]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("name")
    parser.add_argument("--metrics", type=Path, default=None)
    parser.add_argument("--description", default="3-class network trained on EMPS")
    parser.add_argument("--default", action="store_true", help="make it the default model of analyze/segment")
    args = parser.parse_args()
    size = (args.folder / "weights.safetensors").stat().st_size
    if size > 30 * 2**20:
        raise SystemExit(f"weights are {size / 2**20:.1f} MB; the package ships at most 30 MB")
    dest = WEIGHTS / args.name
    dest.mkdir(parents=True, exist_ok=True)
    config = json.loads((args.folder / "config.json").read_text())
    config["name"] = args.name
    config["description"] = args.description
    config["default"] = bool(args.default)
    for f in ("weights.safetensors", "thresholds.json"):
        shutil.copy2(args.folder / f, dest / f)
    int8 = (config.get("onnx") or {}).get("precision") == "int8"
    if int8:  # an int8 graph from 'emparticles quantise' travels with its weights
        shutil.copy2(args.folder / config["onnx"]["file"], dest / config["onnx"]["file"])
    else:
        config.pop("onnx", None)
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if not int8 and add_graph_to_folder(dest) is None:  # the fp32 graph ONNX Runtime runs on CPU
        print("no ONNX graph written (needs pip install -e '.[onnx]'): the model will run in PyTorch")
    metrics = json.loads(args.metrics.read_text()) if args.metrics else None
    thresholds = json.loads((dest / "thresholds.json").read_text())
    (dest / "MODEL_CARD.md").write_text(card(args.name, config, metrics, thresholds))
    print(f"packaged {args.name}: {size / 2**20:.1f} MB -> {dest}")


if __name__ == "__main__":
    main()
