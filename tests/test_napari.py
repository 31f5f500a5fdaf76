"""The napari plugin, headless: open a run folder, correct particles, save and re-measure."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")
if not os.environ.get("DISPLAY"):
    # napari draws with OpenGL, which needs an X server: pytest-xvfb starts Xvfb when it is
    # installed (.ci/run installs it); without one Qt would abort the whole test run
    pytest.skip("no X display (apt-get install xvfb; pytest-xvfb starts it)", allow_module_level=True)

@pytest.fixture
def run_folder(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from emparticles.cli import app

    img = np.full((120, 160), 40, np.uint8)
    yy, xx = np.mgrid[:120, :160]
    for cy, cx in ((30, 30), (30, 50), (80, 110), (60, 60), (100, 20)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 81] = 200
    img[115:, :] = 200  # a particle cut by the bottom border: left out of the statistics
    Image.fromarray(img).save(tmp_path / "frame.png")
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["analyze", str(tmp_path / "frame.png"), "-o", str(out), "--model", "classical",
                                   "--pixel-size", "2.5nm", "--scale-bar", "off"])
    assert res.exit_code == 0, res.output
    return out


def test_reader_opens_a_run_with_scale_and_ids(make_napari_viewer, run_folder):
    viewer = make_napari_viewer()
    viewer.open(str(run_folder), plugin="emparticles")
    names = [ly.name for ly in viewer.layers]
    assert names[:2] == ["frame", "frame particles"] and "frame left out of the statistics" in names
    assert tuple(viewer.layers["frame"].scale) == (2.5, 2.5)
    everything = pd.read_csv(run_folder / "all_particles.csv")
    ids = set(np.unique(viewer.layers["frame particles"].data)) - {0}
    assert ids == set(everything["label"])
    left_out = set(np.unique(viewer.layers["frame left out of the statistics"].data)) - {0}
    assert left_out == set(everything.loc[~everything["included"], "label"])


def test_widget_corrects_saves_and_remeasures(make_napari_viewer, run_folder, tmp_path):
    from emparticles.napari._widget import EmparticlesWidget

    viewer = make_napari_viewer()
    viewer.open(str(run_folder), plugin="emparticles")
    viewer.layers.selection.active = viewer.layers["frame particles"]
    widget = EmparticlesWidget(viewer)
    before = len(widget.table_data)
    assert widget.table.rowCount() == before == len(pd.read_csv(run_folder / "all_particles.csv"))
    layer = viewer.layers["frame particles"]
    pair = sorted({int(layer.data[30, 30]), int(layer.data[30, 50])})
    assert len(pair) == 2 and 0 not in pair
    widget.merge_selected(pair)
    assert len(widget.table_data) == before - 1 and widget.table.rowCount() == before - 1
    lone = int(layer.data[80, 110])
    widget.delete_selected([lone])
    assert lone not in set(widget.table_data["label"])
    # selecting a row selects the particle, and back
    widget.table.selectRow(0)
    assert layer.selected_label == int(widget.table_data["label"].iloc[0])
    row = widget.save_corrections()
    assert row["particles_detected"] == before - 2
    particles = pd.read_csv(run_folder / "all_particles.csv")
    assert len(particles) == before - 2
    assert json.loads((run_folder / "run.json").read_text())["corrected_by_hand"] == ["frame"]
    images = pd.read_csv(run_folder / "images.csv")
    assert bool(images.loc[0, "corrected_by_hand"])
    report = (run_folder / "report.html").read_text()
    assert f"<td>{int(images.loc[0, 'particles_measured'])}</td>" in report
    out = widget.add_to_training_set(str(tmp_path / "train"))
    assert (out / "images" / "frame.png").exists() and (out / "masks" / "frame.png").exists()


def test_a_plain_micrograph_opens_with_its_calibration(make_napari_viewer, tmp_path):
    import tifffile

    img = (np.random.default_rng(0).random((64, 80)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "cal.tif", img, imagej=True, resolution=(1 / 4.0, 1 / 4.0), metadata={"unit": "nm"})
    viewer = make_napari_viewer()
    viewer.open(str(tmp_path / "cal.tif"), plugin="emparticles")
    assert tuple(viewer.layers["cal"].scale) == pytest.approx((4.0, 4.0))
    assert viewer.layers["cal"].metadata["unit"] == "nm"
