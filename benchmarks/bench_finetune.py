"""Fine-tuning on a few images of one source, scored on the rest of the set: before, after, time.

    python benchmarks/bench_finetune.py [--set sem-silica|sem-agglomerates|emps-train] [--source A02]
        [--k 4] [--minutes 10] [--base MODEL] [--spread | --pick A,B,C] [--lr 5e-4]
        [--unseen-by RUN/split.json] [--rounds N] [--outlines particles|agglomerates] [--keep DIR]

Takes the first ``--k`` images of one source (a silica sample group, an agglomerate sample, an
EMPS article; default: the source with the most images), or with ``--spread`` one frame of each
of ``--k`` sources (a few frames annotated across a series, as a lab would pick them; the
silica frames are one JEOL series), or the ``--pick`` ones, runs ``emparticles finetune`` on them
(which itself holds a quarter out to decide whether to keep the result), then scores base and
fine-tuned models on every other image of the set (instance sets: F1, foreground IoU, count
ratio, D50 error; agglomerate masks: foreground IoU, the share on bare substrate, and the count of
agglomerates of 100 px or more against the annotation's, pooled and per frame, as
``agglomerate_counts.py`` counts them), and prints the wall time of the fine-tuning against its
budget. On ``sem-agglomerates`` the fine-tuning is told that the masks outline agglomerates
(``finetune --outlines agglomerates``). ``--unseen-by`` leaves out of the scoring
the images the base model itself was trained on.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from agglomerate_counts import count_large  # the benchmarks folder is the script's own

from emparticles.evaluate import label_size_agreement
from emparticles.io import read_labels, read_micrograph
from emparticles.models import load_model
from emparticles.pipeline import locate_infobar, segment_micrograph
from emparticles.train.data import find_pairs
from emparticles.train.finetune import FinetuneConfig, agglomerate_truth, finetune, read_annotated
from emparticles.train.loop import foreground_figures, pooled_figures
from emparticles.train.splits import source_groups

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def score(model, pairs, kind: str, groups: dict[str, str]) -> tuple[dict, dict[str, dict]]:
    """Pooled figures over ``pairs``, and the same per source."""
    truths, preds = [], []
    for image_path, mask_path in pairs:
        _, full = segment_micrograph(locate_infobar(read_micrograph(image_path)), model)
        truths.append(read_labels(mask_path)[0])
        preds.append(full)

    def figures(idx: list[int]) -> dict:
        fig = foreground_figures(zip([truths[i] for i in idx], [preds[i] for i in idx]))
        if kind == "foreground":  # agglomerates of 100 px or more, annotated and found
            counts = [(count_large(agglomerate_truth(truths[i]), 100), count_large(preds[i], 100)) for i in idx]
            fig["agglomerates_100px"] = counts
            fig["count_ratio_100px"] = sum(p for _, p in counts) / max(1, sum(t for t, _ in counts))
        if kind == "instances":
            fig.update(pooled_figures(zip([truths[i] for i in idx], [preds[i] for i in idx])))
            agreement = label_size_agreement([truths[i] for i in idx], [preds[i] for i in idx])
            fig["d50_rel_error"] = agreement["d50_rel_error"]
        return fig

    sources = sorted({groups[p[0].stem] for p in pairs})
    per_source = {s: figures([i for i, p in enumerate(pairs) if groups[p[0].stem] == s]) for s in sources}
    return figures(list(range(len(pairs)))), per_source


def line(fig: dict) -> str:
    parts = [f"{k} {fig[k]:.3f}" for k in ("f1", "foreground_iou", "count_ratio", "foreground_on_background",
                                           "count_ratio_100px") if k in fig]
    if "d50_rel_error" in fig:
        parts.append(f"D50 error {fig['d50_rel_error']:+.1%}")
    return ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", default="sem-silica", choices=["sem-silica", "sem-agglomerates", "emps-train"])
    parser.add_argument("--source", default=None)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--base", default="")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--spread", action="store_true", help="one frame from each of --k sources")
    parser.add_argument("--pick", default=None, help="the images to fine-tune on, by stem, comma-separated")
    parser.add_argument("--lr", type=float, default=FinetuneConfig.lr)
    parser.add_argument("--rounds", type=int, default=FinetuneConfig.rounds,
                        help="held-out folds to rotate through (0: as many as the budget allows)")
    parser.add_argument("--outlines", default=None, choices=["particles", "agglomerates"],
                        help="what the masks outline, as finetune --outlines (default: agglomerates on sem-agglomerates)")
    parser.add_argument("--keep", type=Path, default=None, help="copy the fine-tuned model folder here")
    parser.add_argument("--unseen-by", type=Path, default=None, metavar="SPLIT_JSON",
                        help="score only images outside the training part of this split (the base's own training "
                             "run's split.json: a base scored on its training images looks better than it is)")
    parser.add_argument("--score-source-only", action="store_true",
                        help="score only the other images of the chosen source (a new material), not the whole set")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = DATA / args.set
    masks = folder / ("masks" if args.set == "sem-agglomerates" else "segmaps")
    kind = "foreground" if args.set == "sem-agglomerates" else "instances"
    pairs = find_pairs(folder / "images", masks)
    groups, _ = source_groups(folder / "images", [p[0].stem for p in pairs])
    if args.pick:
        wanted = args.pick.split(",")
        chosen = [p for p in pairs if p[0].stem in wanted]
        missing = sorted(set(wanted) - {p[0].stem for p in chosen})
        if missing:
            parser.error(f"--pick: no annotated image {', '.join(missing)} in {folder}")
        source = ", ".join(sorted({groups[p[0].stem] for p in chosen}))
    elif args.spread:  # the first frame of every len(sources)/k-th source, in name order
        sources = sorted(set(groups.values()))
        picked = [sources[int(i * len(sources) / args.k)] for i in range(args.k)]
        chosen = [next(p for p in pairs if groups[p[0].stem] == s) for s in picked]
        source = ", ".join(picked)
    else:
        source = args.source or Counter(groups.values()).most_common(1)[0][0]
        chosen = [p for p in pairs if groups[p[0].stem] == source][: args.k]
    rest = [p for p in pairs if p not in chosen
            and (not args.score_source_only or groups[p[0].stem] in {groups[c[0].stem] for c in chosen})]
    if args.unseen_by:
        split = json.loads(args.unseen_by.read_text())
        trained = set((split.get(args.set) if isinstance(split.get(args.set), dict) else split).get("train", []))
        rest = [p for p in rest if p[0].stem not in trained]
    tmp = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    for sub in ("images", "masks"):
        (tmp / sub).mkdir()
    for image_path, mask_path in chosen:
        shutil.copy(image_path, tmp / "images" / image_path.name)
        shutil.copy(mask_path, tmp / "masks" / mask_path.name)
    print(f"{args.set}: fine-tuning on {len(chosen)} image(s) of {'source' if len({groups[c[0].stem] for c in chosen}) == 1 else 'sources'} {source}, "
          f"scoring {len(rest)} others")
    t = time.monotonic()
    result = finetune(read_annotated(tmp / "images", tmp / "masks"), tmp / "model",
                      FinetuneConfig(base=args.base, minutes=args.minutes, lr=args.lr, rounds=args.rounds,
                                     outlines=args.outlines or ("agglomerates" if kind == "foreground" else "particles")),
                      images_dir=tmp / "images")
    took = time.monotonic() - t
    base = load_model(args.base or None, "cpu")
    (before, before_by), (after, after_by) = (score(base, rest, kind, groups),
                                              score(load_model(str(tmp / "model"), "cpu"), rest, kind, groups))
    print(f"  kept: {result.kept} ({result.reason})")
    print(f"  time: {took / 60:.1f} min for a budget of {args.minutes:g} min ({result.steps} steps)")
    print(f"  before: {line(before)}")
    print(f"  after:  {line(after)}")
    if kind == "instances":
        print(f"  F1 change on the other images: {after['f1'] - before['f1']:+.3f}")
    rejected = None
    if (tmp / "model" / "rejected").exists():
        # was the held-out judgement right? the attempt it turned down, on the other images
        rejected, _ = score(load_model(str(tmp / "model" / "rejected"), "cpu"), rest, kind, groups)
        print(f"  the rejected attempt: {line(rejected)}")
        if kind == "instances":
            print(f"  its F1 change on the other images: {rejected['f1'] - before['f1']:+.3f} "
                  f"({'the guard was right' if rejected['f1'] <= before['f1'] else 'the guard turned down a gain'})")
    for round_dir in sorted((tmp / "model" / "rounds").glob("*")):
        # each round's own model (trained without its held-out images), beside their mean
        fig, _ = score(load_model(str(round_dir), "cpu"), rest, kind, groups)
        print(f"  round {round_dir.name} alone: {line(fig)}")
    print("  per source, before -> after:")
    for source in before_by:
        b, a = before_by[source], after_by[source]
        keys = ("f1", "count_ratio") if kind == "instances" else ("foreground_iou", "foreground_on_background",
                                                                  "count_ratio_100px")
        print(f"    {source}: " + ", ".join(f"{k} {b[k]:.3f} -> {a[k]:.3f}" for k in keys))
    if kind == "foreground":
        print("  agglomerates of 100 px or more per frame, annotated: found before -> after"
              + (" (the rejected attempt)" if rejected else ""))
        for i, ((image_path, _), (t, p0), (_, p1)) in enumerate(zip(rest, before["agglomerates_100px"],
                                                                    after["agglomerates_100px"])):
            print(f"    {image_path.stem:14s} {t:4d}: {p0:4d} -> {p1:4d}"
                  + (f" ({rejected['agglomerates_100px'][i][1]})" if rejected else ""))
    if args.keep:
        shutil.copytree(tmp / "model", args.keep, dirs_exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
