"""Every model change judged on every real set at once, split by source, with the spread over folds.

    python benchmarks/all_sets.py MODEL [MODEL ...] [--part test|validation|all] [--split RUN/split.json]
        [--folds 5] [--synth runs/synth-val2] [--limit 0] [--sets silica agglomerates]

MODEL is a registered name (``emparticles models``) or a model folder; ``MODEL+flips`` is the
same model with test-time flips (the mean of its four flipped probability maps), and
``MODEL+keep-text`` the same model with what it finds on text drawn over the field kept
(``--keep-figure-text``). The sets are those of
``../shared/data``: EMPS split by article (``sources.csv``), JEOL silica by sample group,
agglomerates on a textured polymer by sample (agglomerate-level masks: foreground figures only);
``--synth`` adds a synthetic SEM set (a training aid, shown for reference, never a yardstick).
``--part test`` (default) scores the images every training run of ``benchmarks/train_default.py``
holds out of training and of every choice (the same split by source, or the one a run's
``--split`` file lists); ``validation`` the images that chose its epoch and settings; ``all``
every image (for a model that never saw the set).

For each set it prints pooled F1 at IoU 0.5, precision, recall, panoptic quality, foreground IoU,
count ratio, D50 error and KS of the ECD, and the share of the predicted foreground on bare
substrate; then the same F1 (or foreground IoU) over ``--folds`` folds of whole sources, as
mean +- standard deviation: a difference between models smaller than that spread is noise. Given
two or more models, each is paired with the first fold by fold, in F1 (or foreground IoU) and,
on instance sets, in |D50 error|.
Every image goes the road of ``emparticles segment`` (info bar found and left out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from emparticles.evaluate import label_size_agreement
from emparticles.io import read_labels, read_micrograph
from emparticles.models import load_model
from emparticles.pipeline import locate_infobar, segment_micrograph
from emparticles.train.data import find_pairs, split_pairs
from emparticles.train.loop import foreground_figures, pooled_figures
from emparticles.train.splits import group_folds, source_groups

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
#: (name, folder, masks sub-folder, kind)
SETS = [("EMPS (by article)", DATA / "emps-train", "segmaps", "instances"),
        ("SEM silica (by group)", DATA / "sem-silica", "segmaps", "instances"),
        ("SEM agglomerates (by sample)", DATA / "sem-agglomerates", "masks", "foreground")]


def set_pairs(folder: Path, masks: str, part: str, split_file: Path | None) -> list[tuple[Path, Path]]:
    """The image/mask pairs of one set in the chosen part of its split by source."""
    pairs = find_pairs(folder / "images", folder / masks)
    if part == "all":
        return pairs
    if split_file is not None:
        split = json.loads(split_file.read_text())
        names = split.get(folder.name, split if folder.name == "emps-train" else None)
        if names is not None and part in names:
            wanted = set(names[part])
            return [p for p in pairs if p[0].stem in wanted]
    return split_pairs(pairs)[part]


def shown(model: str) -> str:
    """A model's name in the tables: a registered name as it is, a folder by its parent and name
    (``v6cont/best``: every run's best model is a folder ``best``)."""
    path = Path(model)
    return f"{path.parent.name}/{path.name}" if len(path.parts) > 1 else path.name


def figures(kind: str, truths: list[np.ndarray], preds: list[np.ndarray]) -> dict:
    """Pooled figures of one set (see the module's docstring)."""
    fg = foreground_figures(zip(truths, preds))
    if kind == "foreground":
        return fg
    out = {**pooled_figures(zip(truths, preds)), **fg}
    agreement = label_size_agreement(truths, preds)
    out.update(d50_rel_error=agreement["d50_rel_error"], ks_statistic=agreement["ks_statistic"])
    return out


def fold_figures(kind: str, stems: list[str], truths, preds, groups: dict[str, str], k: int) -> list[dict]:
    """:func:`figures` of each of ``k`` folds of whole sources (the same folds for every model
    scored on the same images)."""
    index = {s: i for i, s in enumerate(stems)}
    out = []
    for fold in group_folds({s: groups[s] for s in stems}, k):
        sub = [index[s] for s in fold]
        out.append(figures(kind, [truths[i] for i in sub], [preds[i] for i in sub]))
    return out


def fold_values(kind: str, folds: list[dict]) -> list[float]:
    """F1 (instances) or foreground IoU (agglomerates) of each fold of :func:`fold_figures`."""
    return [fig["f1"] if kind == "instances" else fig["foreground_iou"] for fig in folds]


def fold_d50(folds: list[dict]) -> list[float]:
    """|D50 error| of each fold of :func:`fold_figures` (instance sets; NaN where a fold has none)."""
    return [abs(fig.get("d50_rel_error", float("nan"))) for fig in folds]


def fold_spread(values: list[float]) -> tuple[float, float, int]:
    """(mean, standard deviation, folds) of :func:`fold_values`."""
    if len(values) < 2:
        return (values[0] if values else float("nan")), float("nan"), len(values)
    return float(np.mean(values)), float(np.std(values, ddof=1)), len(values)


def _cell(fig: dict, key: str, fmt: str = ".3f") -> str:
    return format(fig[key], fmt) if key in fig and np.isfinite(fig[key]) else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--part", default="test", choices=["test", "validation", "all"])
    parser.add_argument("--split", type=Path, default=None, help="split.json of a training run")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--synth", type=Path, default=None, help="a synthetic SEM set (images/, masks/)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N images of each set")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sets", nargs="+", default=None, metavar="WORD",
                        help="only the sets whose name holds one of these words (e.g. silica agglomerates)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sets = [(name, kind, set_pairs(folder, masks, args.part, args.split)) for name, folder, masks, kind in SETS
            if not args.sets or any(word.lower() in name.lower() for word in args.sets)]
    if args.synth:
        sets.append(("synthetic SEM (aid only)", "instances", find_pairs(args.synth / "images", args.synth / "masks")))
    rows = []
    per_fold: dict[tuple[str, str], list[float]] = {}
    per_fold_d50: dict[tuple[str, str], list[float]] = {}
    for model_name in args.models:
        # MODEL+flips: the same model with test-time flips (the mean of the four flipped maps);
        # MODEL+keep-text: particles on text drawn over the field kept
        base_name, *options = model_name.split("+")
        model = load_model(base_name, "cpu")
        if "flips" in options:
            model.flips = True
        figure_text = "keep-text" not in options
        for name, kind, pairs in sets:
            pairs = pairs[: args.limit] if args.limit else pairs
            truths, preds, times = [], [], []
            for image_path, mask_path in pairs:
                mg = locate_infobar(read_micrograph(image_path))
                t = time.perf_counter()
                _, full = segment_micrograph(mg, model, figure_text=figure_text)
                times.append(time.perf_counter() - t)
                truths.append(read_labels(mask_path)[0])
                preds.append(full)
            stems = [p[0].stem for p in pairs]
            groups, _ = source_groups(pairs[0][0].parent, stems)
            fig = figures(kind, truths, preds)
            folds = fold_figures(kind, stems, truths, preds, groups, args.folds)
            per_fold[(model_name, name)] = fold_values(kind, folds)
            if kind == "instances":
                per_fold_d50[(model_name, name)] = fold_d50(folds)
            mean, sd, k = fold_spread(per_fold[(model_name, name)])
            rows.append((shown(model_name), name, len(pairs), len(set(groups.values())), kind, fig, mean, sd, k,
                         statistics.median(times)))
            print(f"{shown(model_name)} | {name}: {len(pairs)} images, {fig}", flush=True)
    print()
    print(f"part: {args.part}; spread: standard deviation over folds of whole sources")
    print()
    print("| model | set | images (sources) | F1@0.5 | P | R | PQ | fg IoU | on substrate | count | D50 err | KS "
          "| F1 or IoU over folds | s/image |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model_name, name, n, n_groups, kind, fig, mean, sd, k, sec in rows:
        f = partial(_cell, fig)
        print(f"| {model_name} | {name} | {n} ({n_groups}) | {f('f1')} | {f('precision', '.2f')} | {f('recall', '.2f')} "
              f"| {f('panoptic_quality')} | {f('foreground_iou')} | {f('foreground_on_background', '.0%')} "
              f"| {f('count_ratio', '.2f')} | {f('d50_rel_error', '+.1%')} | {f('ks_statistic')} "
              f"| {mean:.3f} +- {sd:.3f} ({k}) | {sec:.2f} |")
    if len(args.models) > 1:
        print()
        print(paired_table(args.models, [name for name, _, _ in sets], per_fold, per_fold_d50))


def _paired(base: list[float], other: list[float]) -> tuple[float, float, np.ndarray]:
    """Mean and standard deviation of the fold-by-fold difference, and the differences."""
    diff = np.array(other, float) - np.array(base, float)
    diff = diff[np.isfinite(diff)]
    if not diff.size:
        return float("nan"), float("nan"), diff
    sd = float(np.std(diff, ddof=1)) if diff.size > 1 else float("nan")
    return float(diff.mean()), sd, diff


def paired_table(models: list[str], set_names: list[str], per_fold: dict[tuple[str, str], list[float]],
                 per_fold_d50: dict[tuple[str, str], list[float]] | None = None) -> str:
    """Each model against the first, fold by fold: both were scored on the same folds, so the
    spread of their difference, not of either model's figure, says whether a change is more than
    noise (the folds' own difficulty, which moves both models alike, cancels). Instance sets also
    get the difference in |D50 error| (negative: sizes nearer the annotation)."""
    per_fold_d50 = per_fold_d50 or {}
    lines = [(f"paired against {shown(models[0])}: F1 (fg IoU for agglomerates) difference per fold, "
              "mean +- standard deviation, folds better; |D50 error| difference per fold (points), folds better"),
             "", "| model | set | difference | folds better | abs D50 error difference | folds better |",
             "|---|---|---|---|---|---|"]
    for model in models[1:]:
        for name in set_names:
            base, other = per_fold.get((models[0], name)), per_fold.get((model, name))
            if not base or not other:
                continue
            mean, sd, diff = _paired(base, other)
            d50 = "| | |"
            if (models[0], name) in per_fold_d50 and (model, name) in per_fold_d50:
                dm, dsd, ddiff = _paired(per_fold_d50[(models[0], name)], per_fold_d50[(model, name)])
                d50 = f"| {100 * dm:+.1f} +- {100 * dsd:.1f} | {int((ddiff < 0).sum())} of {ddiff.size} |"
            lines.append(f"| {shown(model)} | {name} | {mean:+.3f} +- {sd:.3f} | "
                         f"{int((diff > 0).sum())} of {diff.size} {d50}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
