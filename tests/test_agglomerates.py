"""Agglomerates from hand-built label images, and the EU nanomaterial share of known tables."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from emparticles.agglomerates import agglomerate_labels, link_particles, measure_agglomerates
from emparticles.stats.agglomeration import agglomeration_summary, nano_share


def field() -> np.ndarray:
    """Three agglomerates away from the border: a pair touching sideways (1, 2), a trio whose
    members touch only diagonally or sideways (3, 4, 5), and a free particle (6); plus one
    particle (7) cut by the border."""
    lab = np.zeros((40, 60), np.int32)
    lab[5:10, 5:10] = 1
    lab[5:10, 10:15] = 2  # shares a side with 1
    lab[20:25, 5:10] = 3
    lab[25:30, 10:15] = 4  # touches 3 at a corner only
    lab[25:30, 15:18] = 5
    lab[5:9, 30:34] = 6  # free
    lab[30:40, 50:60] = 7  # cut by the border
    return lab


def test_touching_particles_form_one_agglomerate_with_8_connectivity():
    merged, of_particle = agglomerate_labels(field())
    assert merged.max() == 4
    assert of_particle[1] == of_particle[2]
    assert of_particle[3] == of_particle[4] == of_particle[5]  # the corner contact counts
    assert len({of_particle[1], of_particle[3], of_particle[6], of_particle[7]}) == 4
    assert of_particle[0] == 0
    assert ((merged > 0) == (field() > 0)).all()


def test_a_particle_in_two_pieces_joins_their_groups():
    lab = np.zeros((20, 30), np.int32)
    lab[2:6, 2:6] = 1
    lab[2:6, 6:10] = 2
    lab[12:16, 20:24] = 2  # particle 2 in a second piece, far away
    lab[12:16, 24:28] = 3
    merged, of_particle = agglomerate_labels(lab)
    assert merged.max() == 1 and of_particle[1] == of_particle[2] == of_particle[3] == 1


def test_agglomerate_table_has_known_counts_areas_and_sizes():
    table, of_particle = measure_agglomerates(field(), pixel_size_nm=2.0, image_name="f")
    assert list(table["agglomerate_id"]) == [1, 2, 3, 4]
    by_first = {int(of_particle[p]): p for p in (1, 3, 6, 7)}
    rows = table.set_index("agglomerate_id")
    pair, trio, free, cut = (rows.loc[i] for i in (of_particle[1], of_particle[3], of_particle[6], of_particle[7]))
    assert (pair["particles"], trio["particles"], free["particles"], cut["particles"]) == (2, 3, 1, 1)
    assert pair["area_px"] == 50 and trio["area_px"] == 25 + 25 + 15 and free["area_px"] == 16
    assert pair["feret_min_px"] == pytest.approx(5.0) and pair["feret_max_px"] == pytest.approx(np.hypot(10, 5))
    assert pair["ecd_nm"] == pytest.approx(2.0 * np.sqrt(4 * 50 / np.pi))
    assert pair["area_nm2"] == pytest.approx(200.0)
    assert bool(cut["touches_edge"]) and not bool(pair["touches_edge"])
    assert set(table["image"]) == {"f"} and len(by_first) == 4


def test_particles_are_linked_and_summarised():
    lab = field()
    table, of_particle = measure_agglomerates(lab)
    particles = pd.DataFrame({"label": [1, 2, 3, 4, 5, 6], "image": "f"})  # 7 excluded (edge)
    linked = link_particles(particles, of_particle, table)
    assert list(linked["in_agglomerate"]) == [True, True, True, True, True, False]
    assert linked["agglomerate_id"].iloc[0] == linked["agglomerate_id"].iloc[1]
    s = agglomeration_summary(linked, table)
    assert (s["free_particles"], s["agglomerated_particles"]) == (1, 5)
    assert s["fraction_agglomerated"] == pytest.approx(5 / 6)
    assert s["agglomerates"] == 4 and s["agglomerates_not_touching_edge"] == 3
    assert s["agglomerates_of_two_or_more"] == 2
    assert s["particles_per_agglomerate_mean"] == pytest.approx(2.0)  # (2 + 3 + 1) / 3
    assert s["particles_per_agglomerate_median"] == 2.0 and s["particles_per_agglomerate_max"] == 3


def test_empty_image_has_no_agglomerates():
    table, of_particle = measure_agglomerates(np.zeros((10, 10), np.int32))
    assert len(table) == 0 and "particles" in table
    linked = link_particles(pd.DataFrame({"label": pd.Series(dtype=int)}), of_particle, table)
    assert list(linked.columns) == ["label", "agglomerate_id", "in_agglomerate"]


def test_nano_share_of_known_tables():
    clear_yes = nano_share(np.r_[np.full(80, 40.0), np.full(20, 300.0)])
    assert clear_yes.share == pytest.approx(0.8) and clear_yes.verdict == "yes"
    assert clear_yes.low < 0.8 < clear_yes.high and clear_yes.low > 0.5
    clear_no = nano_share(np.r_[np.full(20, 40.0), np.full(80, 300.0)])
    assert clear_no.verdict == "no" and clear_no.share == pytest.approx(0.2)
    even = nano_share(np.r_[np.full(50, 40.0), np.full(50, 300.0)])
    assert even.verdict == "undecided" and even.low < 0.5 < even.high
    # the range is 1-100 nm inclusive; below 1 nm is counted apart
    edges = nano_share([0.5, 1.0, 100.0, 100.5])
    assert edges.in_range == 2 and edges.below_range == 1 and edges.share == pytest.approx(0.5)
    # weights (Miles-Lantuejoul) count
    weighted = nano_share([40.0, 300.0], weights=[3.0, 1.0], n_boot=200)
    assert weighted.share == pytest.approx(0.75)
    assert nano_share([]).verdict == "not assessable"


def test_analyze_writes_agglomerates_and_the_nano_share(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from emparticles.cli import app

    img = np.full((96, 128), 30, np.uint8)
    yy, xx = np.mgrid[:96, :128]
    for cy, cx in ((30, 30), (30, 44), (70, 90)):  # a touching pair and a free disk, 7 px radius
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 49] = 200
    Image.fromarray(img).save(tmp_path / "pair.png")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["analyze", str(tmp_path / "pair.png"), "-o", str(out), "--model", "classical",
                                      "--pixel-size", "5nm"])
    assert result.exit_code == 0, result.output
    aggl = pd.read_csv(out / "agglomerates.csv")
    assert sorted(aggl["particles"]) == [1, 2]
    assert aggl["ecd_nm"].notna().all()
    particles = pd.read_csv(out / "particles.csv")
    assert {"agglomerate_id", "in_agglomerate"} <= set(particles.columns)
    assert sorted(particles["in_agglomerate"]) == [False, True, True]
    images = pd.read_csv(out / "images.csv")
    assert images.loc[0, "agglomerates"] == 2 and images.loc[0, "free_particles"] == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eu_nano_share"]["verdict"] == "yes"  # 14 px x 5 nm = 70 nm wide disks
    assert summary["agglomeration"]["fraction_agglomerated"] == pytest.approx(2 / 3)
    assert "EU nanomaterial" in (out / "report.html").read_text()
