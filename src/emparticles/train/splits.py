"""Splitting annotated images by their source, never image by image.

Crops of one figure, or frames of one sample, look alike: a split that puts some of them in
training and others in validation rewards remembering a source's look. On EMPS a split by a hash
of the file name scored F1 0.92 where articles the model had never seen gave 0.81. Every split
here keeps all images of one source (article, sample group, series) on one side.

Where an image's source comes from (:func:`source_groups`), first match wins:

1. ``sources.csv`` beside the images folder with columns ``filename`` (or ``image``) and ``doi``
   (EMPS: the article each figure crop was cut from);
2. ``images.csv`` or ``groups.csv`` beside the images folder with columns ``image`` and ``group``;
3. the file stem without a trailing frame number (``A02-3`` -> ``A02``, ``10C3_2`` -> ``10C3``);
4. the stem itself (then the split is by image, and :func:`source_groups` says so).
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

_FRAME_NUMBER = re.compile(r"^(.+?)[-_ ]\d+$")


def _group_table(folder: Path) -> dict[str, str]:
    """stem -> group from the first of sources.csv / images.csv / groups.csv in ``folder``."""
    for name, key_cols, group_cols in (("sources.csv", ("filename", "image"), ("doi",)),
                                       ("images.csv", ("image", "filename"), ("group",)),
                                       ("groups.csv", ("image", "filename"), ("group",))):
        path = folder / name
        if not path.exists():
            continue
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        if not rows:
            continue
        key = next((c for c in key_cols if c in rows[0]), None)
        group = next((c for c in group_cols if c in rows[0]), None)
        if key and group:
            return {Path(r[key]).stem: r[group] for r in rows if r.get(key) and r.get(group)}
    return {}


def source_groups(images_dir: Path, stems: Iterable[str]) -> tuple[dict[str, str], str]:
    """(stem -> source group, how the groups were found: ``"table"``, ``"frame-number"`` or
    ``"image"``) for the images ``stems`` of ``images_dir`` (see the module's docstring)."""
    stems = list(stems)
    table = _group_table(Path(images_dir).parent)
    if table and all(s in table for s in stems):
        return {s: table[s] for s in stems}, "table"
    matches = {s: _FRAME_NUMBER.match(s) for s in stems}
    if stems and all(matches.values()):
        groups = {s: m.group(1) for s, m in matches.items()}
        if len(set(groups.values())) < len(stems):  # at least one group holds several frames
            return groups, "frame-number"
    return {s: table.get(s, s) for s in stems}, "image"


def _group_order(groups: Iterable[str], seed: int = 0) -> list[str]:
    """Groups in a fixed pseudo-random order (a hash of the name and the seed): the same on every
    machine, and a group keeps its place when others are added."""
    return sorted(set(groups), key=lambda g: hashlib.sha1(f"{seed}:{g}".encode()).hexdigest())


def split_by_source(groups: dict[str, str], validation: float = 0.15, test: float = 0.0,
                    seed: int = 0) -> dict[str, list[str]]:
    """Split images into ``train``, ``validation`` and ``test`` lists of stems, whole groups on
    each side. Groups are taken in :func:`_group_order` until each held-out part holds its
    share of the images; each held-out part with a share > 0 gets at least one group, and
    training keeps at least one."""
    order = _group_order(groups.values(), seed)
    members: dict[str, list[str]] = {g: [] for g in order}
    for stem in sorted(groups):
        members[groups[stem]].append(stem)
    total = len(groups)
    parts: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    queue = list(order)
    for part, share in (("test", test), ("validation", validation)):
        while share > 0 and len(queue) > 1 and (not parts[part] or len(parts[part]) < share * total):
            if parts[part] and len(parts[part]) + len(members[queue[0]]) > 1.5 * share * total:
                break  # the next group would overshoot: stop short instead
            parts[part] += members[queue.pop(0)]
    for g in queue:
        parts["train"] += members[g]
    return {k: sorted(v) for k, v in parts.items()}


def group_folds(groups: dict[str, str], k: int = 5, seed: int = 0) -> list[list[str]]:
    """``k`` folds of stems, whole groups in each, balanced by image count (each group, largest
    first, joins the fold with the fewest images so far). Fewer folds when there are fewer
    groups."""
    members: dict[str, list[str]] = {}
    for stem in sorted(groups):
        members.setdefault(groups[stem], []).append(stem)
    order = sorted(_group_order(members, seed), key=lambda g: -len(members[g]))
    folds: list[list[str]] = [[] for _ in range(min(k, len(members)))]
    for g in order:
        min(folds, key=len).extend(members[g])
    return [sorted(f) for f in folds]
