"""Splits by source, agglomerate-level targets and the loss that learns foreground from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emparticles.train.splits import group_folds, source_groups, split_by_source


def test_source_groups_from_a_table_from_frame_numbers_or_per_image(tmp_path):
    images = tmp_path / "set" / "images"
    images.mkdir(parents=True)
    (tmp_path / "set" / "sources.csv").write_text("filename,doi,locator\na.png,10.1/x,gr1\nb.png,10.1/x,gr2\nc.png,10.2/y,gr1\n")
    assert source_groups(images, ["a", "b", "c"]) == ({"a": "10.1/x", "b": "10.1/x", "c": "10.2/y"}, "table")
    assert source_groups(tmp_path / "none", ["A02-1", "A02-2", "B01-1"]) == (
        {"A02-1": "A02", "A02-2": "A02", "B01-1": "B01"}, "frame-number")
    assert source_groups(tmp_path / "none", ["10C3_0", "10C3_1", "point5un_4"])[0]["10C3_1"] == "10C3"
    # no table and no shared prefix: each image its own source, and the caller is told so
    assert source_groups(tmp_path / "none", ["f78844", "4ec767"]) == ({"f78844": "f78844", "4ec767": "4ec767"}, "image")


def test_split_by_source_never_puts_one_source_on_two_sides():
    groups = {f"g{g}-{n}": f"g{g}" for g in range(20) for n in range(1 + g % 4)}
    parts = split_by_source(groups, validation=0.15, test=0.15)
    assert sorted(s for stems in parts.values() for s in stems) == sorted(groups)  # every image once
    sides = {}
    for part, stems in parts.items():
        for s in stems:
            assert sides.setdefault(groups[s], part) == part
    n = len(groups)
    for part in ("validation", "test"):
        assert 0.1 * n <= len(parts[part]) <= 0.25 * n
    assert parts == split_by_source(dict(reversed(list(groups.items()))), 0.15, 0.15)  # order does not matter
    # a source keeps its side when another source is added
    more = {**groups, "new-1": "new"}
    again = split_by_source(more, 0.15, 0.15)
    moved = [s for part in ("validation", "test") for s in parts[part] if s not in again[part]]
    assert len(moved) <= 4


def test_split_with_few_sources_holds_out_at_least_one_and_trains_on_one():
    two = split_by_source({"a-1": "a", "b-1": "b"}, 0.15, 0.15)
    assert [len(two[p]) for p in ("train", "validation", "test")] == [1, 0, 1]
    parts = split_by_source({"a-1": "a", "b-1": "b", "c-1": "c"}, 0.15, 0.15)
    assert [len(parts[p]) for p in ("train", "validation", "test")] == [1, 1, 1]
    assert split_by_source({"a-1": "a"}, 0.15, 0.15) == {"train": ["a-1"], "validation": [], "test": []}


def test_group_folds_are_balanced_and_whole():
    groups = {f"g{g}-{n}": f"g{g}" for g in range(10) for n in range(2)}
    folds = group_folds(groups, 5)
    assert [len(f) for f in folds] == [4, 4, 4, 4, 4]
    for fold in folds:
        for s in fold:
            assert all(t in fold for t in groups if groups[t] == groups[s])
    assert len(group_folds({"a": "a", "b": "b"}, 5)) == 2


def test_split_pairs_reads_emps_articles():
    from pathlib import Path

    from emparticles.train.data import find_pairs, split_pairs

    emps = Path(__file__).resolve().parents[2] / "shared" / "data" / "emps-train"
    if not emps.exists():
        pytest.skip("shared data not present")
    pairs = find_pairs(emps / "images", emps / "segmaps")
    parts = split_pairs(pairs)
    doi = {line.split(",")[0][:-4]: line.split(",")[1] for line in (emps / "sources.csv").read_text().splitlines()[1:]}
    articles = {part: {doi[p[0].stem] for p in v} for part, v in parts.items()}
    assert not articles["train"] & articles["validation"] and not articles["train"] & articles["test"]
    assert not articles["validation"] & articles["test"]
    assert 0.12 < len(parts["test"]) / len(pairs) < 0.2


def test_partly_annotated_frames_are_left_out(tmp_path):
    """sem-silica's A02-3 has 195 of about 2,500 spheres annotated: never trained on or scored."""
    from emparticles.train.data import PARTLY_ANNOTATED, find_pairs

    assert ("sem-silica", "A02-3") in PARTLY_ANNOTATED
    for name in ("sem-silica", "my-set"):
        for sub in ("images", "segmaps"):
            (tmp_path / name / sub).mkdir(parents=True)
            for stem in ("A02-2", "A02-3"):
                (tmp_path / name / sub / f"{stem}.png").write_bytes(b"")
    assert [p[0].stem for p in find_pairs(tmp_path / "sem-silica" / "images", tmp_path / "sem-silica" / "segmaps")] == ["A02-2"]
    assert len(find_pairs(tmp_path / "my-set" / "images", tmp_path / "my-set" / "segmaps")) == 2


def test_agglomerate_masks_become_foreground_of_unknown_class():
    from emparticles.train.targets import BORDER, FOREGROUND_ONLY, PARTICLE, three_class_target

    lab = np.zeros((12, 12), np.int32)
    lab[2:6, 2:6] = 1
    lab[6:10, 6:10] = -1  # an agglomerate-level mask
    t = three_class_target(lab, 1)
    assert (t[6:10, 6:10] == FOREGROUND_ONLY).all()
    assert t[3, 3] == PARTICLE and t[2, 2] == BORDER
    assert (t[lab == 0] == 0).all()


def test_loss_on_agglomerate_pixels_asks_only_for_foreground():
    from emparticles.train.loop import segmentation_loss
    from emparticles.train.targets import FOREGROUND_ONLY

    target = torch.full((1, 4, 4), FOREGROUND_ONLY, dtype=torch.long)
    target[0, 0, :] = 0
    weights = torch.ones(3)

    def logits(particle: float, border: float) -> torch.Tensor:
        z = torch.zeros(1, 3, 4, 4)
        z[:, 0, 0, :] = 10.0  # background row: confidently right
        z[:, 1, 1:] = particle
        z[:, 2, 1:] = border
        return z.requires_grad_(True)

    as_particle = segmentation_loss(logits(10.0, 0.0), target, weights, dice_weight=0.0).detach()
    as_border = segmentation_loss(logits(0.0, 10.0), target, weights, dice_weight=0.0).detach()
    as_background = segmentation_loss(logits(-10.0, -10.0), target, weights, dice_weight=0.0).detach()
    assert float(as_particle) == pytest.approx(float(as_border), abs=1e-4)  # which foreground class: not taught
    assert float(as_particle) < 0.01 < float(as_background)
    z = logits(0.0, 0.0)
    segmentation_loss(z, target, weights).backward()
    assert torch.isfinite(z.grad).all()
